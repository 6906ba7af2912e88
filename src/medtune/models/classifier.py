"""The transfer model: a pretrained backbone with a new K-class linear head."""

from __future__ import annotations

import copy

from torch import Tensor, nn

from medtune.models.backbones import Backbone, create_backbone
from medtune.models.stages import Stage, StageTaps, param_stage_index


def _new_aux_head(aux: nn.Module, num_classes: int) -> nn.Module:
    """A copy of a GoogLeNet auxiliary classifier whose last layer predicts ``num_classes``."""
    head = copy.deepcopy(aux)
    last = head.fc2
    head.fc2 = nn.Linear(last.in_features, num_classes)
    return head


class TransferModel(nn.Module):
    """Backbone features -> optional dropout -> new ``nn.Linear(num_features, num_classes)``.

    ``backbone`` is the feature-extractor module (its parameters are named ``backbone.*``),
    ``spec`` the :class:`~medtune.models.Backbone` it came from, ``stages`` its stage map. With a
    GoogLeNet built with ``aux_logits=True``, ``aux_heads`` holds new K-class auxiliary
    classifiers used by :meth:`forward_train`; :meth:`forward` never computes them.
    """

    def __init__(self, backbone: Backbone, num_classes: int, dropout: float = 0.0) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be at least 1, got {num_classes}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.spec = backbone
        self.backbone = backbone.model
        self.stages: list[Stage] = backbone.stages
        self.num_classes = num_classes
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.head = nn.Linear(backbone.num_features, num_classes)
        self.aux_heads = nn.ModuleDict(
            {stage: _new_aux_head(aux, num_classes) for stage, aux in backbone.aux_heads.items()}
        )

    def forward(self, x: Tensor) -> Tensor:
        """Class logits, (B, num_classes)."""
        return self.head(self.dropout(self.backbone(x)))

    def forward_train(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        """Main logits and the auxiliary logits (empty list without auxiliary heads)."""
        if not len(self.aux_heads):
            return self(x), []
        with StageTaps(self, list(self.aux_heads), pool=False) as taps:
            logits = self(x)
        aux = [head(taps.captured[name]) for name, head in self.aux_heads.items()]
        return logits, aux

    @property
    def head_index(self) -> int:
        """Stage index given to the new head (and auxiliary heads): after the last stage."""
        return len(self.stages)

    def param_stage_index(self) -> dict[str, int]:
        """Stage index of every parameter (full names); head parameters get :attr:`head_index`."""
        body = param_stage_index(self)
        index = {f"backbone.{name}": i for name, i in body.items()}
        for name, _ in self.named_parameters():
            index.setdefault(name, self.head_index)
        return index


def build_model(
    backbone: str,
    kind: str,
    num_classes: int,
    *,
    stage: str | None = None,
    dropout: float = 0.0,
    weights: str | None = None,
) -> nn.Module:
    """An untrained model of a trained run's architecture, ready for its ``state_dict``.

    Parameters
    ----------
    backbone : str
        Backbone name (:func:`~medtune.models.create_backbone`).
    kind : {"finetune", "probe"}
        :class:`TransferModel`, or a
        :class:`~medtune.models.stage_classifier.StageProbeClassifier` on ``stage``.
    num_classes : int
        K, the number of classes.
    stage : str or None, default None
        The probed stage (``None``: the top pooled features).
    dropout : float, default 0.0
        Dropout before the head of a :class:`TransferModel`.
    weights : str or None, default None
        Pretrained weights to start from; ``None`` builds the architecture only.

    Returns
    -------
    torch.nn.Module
    """
    from medtune.models.stage_classifier import StageProbeClassifier

    spec = create_backbone(backbone, weights=weights)
    if kind == "probe":
        return StageProbeClassifier(spec, stage, num_classes)
    return TransferModel(spec, num_classes, dropout=dropout)
