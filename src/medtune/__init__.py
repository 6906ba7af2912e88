"""medtune: transfer learning and fine-tuning of ImageNet-pretrained CNNs on medical images."""

__version__ = "0.1.0"
