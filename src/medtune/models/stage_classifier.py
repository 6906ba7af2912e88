"""A linear classifier on the pooled activations of one backbone stage (scenarios 1 and 3)."""

from __future__ import annotations

import torch
from torch import nn

from medtune.models.backbones import Backbone
from medtune.models.stages import StageTaps


class StageProbeClassifier(nn.Module):
    """Frozen backbone + global average pooling of stage ``stage`` + a linear layer.

    ``stage=None`` uses the backbone's top pooled features (scenario 1); a stage name taps that
    stage's output with a forward hook (scenario 3). The weights usually come from
    :func:`medtune.transfer.linear_probe.fit_probe` (standardisation folded in).
    """

    def __init__(self, backbone: Backbone, stage: str | None, num_classes: int) -> None:
        super().__init__()
        self.backbone_info = backbone
        self.body = backbone.model
        self.stage = stage
        channels = backbone.num_features if stage is None else _stage(backbone, stage).channels
        self.head = nn.Linear(channels, num_classes)
        # hooks registered for the model's lifetime: every forward pass refreshes the stage
        self._taps = StageTaps(backbone, [stage]).__enter__() if stage is not None else None
        self.requires_grad_(False)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled activations of the probed stage, (B, C) float32."""
        pooled = self.backbone_info.features(x)
        if self._taps is None:
            return pooled
        return self._taps.captured.pop(self.stage)

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
