"""A linear classifier on the pooled activations of one backbone stage (scenarios 1 and 3)."""

from __future__ import annotations

import torch
from torch import nn

from medtune.models.backbones import Backbone


class StageProbeClassifier(nn.Module):
    """Frozen backbone + global average pooling of stage ``stage`` + a linear layer.

    ``stage=None`` uses the backbone's top pooled features (scenario 1); a stage name taps that
    stage's output with a forward hook (scenario 3). The weights usually come from
    :func:`medtune.transfer.probe.fit_probe` (standardisation folded in).
    """

    def __init__(self, backbone: Backbone, stage: str | None, num_classes: int) -> None:
        super().__init__()
        self.backbone_info = backbone
        self.body = backbone.model
        self.stage = stage
        channels = backbone.num_features if stage is None else _stage(backbone, stage).channels
        self.head = nn.Linear(channels, num_classes)
        self._tapped: torch.Tensor | None = None
        if stage is not None:
            module = self.body.get_submodule(_stage(backbone, stage).tap)
            module.register_forward_hook(self._keep_output)
        self.requires_grad_(False)

    def _keep_output(self, _module: nn.Module, _inputs: object, output: torch.Tensor) -> None:
        self._tapped = output

    def features(self, x: torch.Tensor) -> torch.Tensor:
        pooled = self.backbone_info.features(x)
        if self.stage is None:
            return pooled
        tapped, self._tapped = self._tapped, None
        return tapped.float().mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).float())

    def train(self, mode: bool = True) -> StageProbeClassifier:
        """The backbone is always in eval mode (BatchNorm statistics are never updated)."""
        super().train(mode)
        self.body.eval()
        return self

    def set_linear(self, weight: torch.Tensor, bias: torch.Tensor) -> None:
        with torch.no_grad():
            self.head.weight.copy_(torch.as_tensor(weight, dtype=torch.float32))
            self.head.bias.copy_(torch.as_tensor(bias, dtype=torch.float32))


def _stage(backbone: Backbone, name: str):
    for stage in backbone.stages:
        if stage.name == name:
            return stage
    names = ", ".join(s.name for s in backbone.stages)
    raise ValueError(f"unknown stage {name!r}; stages are: {names}")
