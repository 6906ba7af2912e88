"""A classification network with its classifier removed, as every medtune backbone is wrapped."""

from __future__ import annotations

from torch import Tensor, nn

#: Attribute of :class:`FeatureExtractor` that holds the wrapped network.
BODY = "body"


class FeatureExtractor(nn.Module):
    """A classification network with its classifier removed: ``forward(x) -> (B, num_features)``.

    ``forward_features`` is the same pooled output (the medtune contract), whatever the wrapped
    library calls it.
    """

    def __init__(self, body: nn.Module, num_features: int) -> None:
        super().__init__()
        self.body = body
        self.num_features = num_features

    def forward(self, x: Tensor) -> Tensor:
        out = self.body(x)
        if isinstance(out, tuple):  # torchvision named-tuple outputs
            out = out[0]
        return out.flatten(1) if out.ndim > 2 else out

    def forward_features(self, x: Tensor) -> Tensor:
        """Pooled features, (B, num_features)."""
        return self(x)
