"""The deployable model of a run: ``model.safetensors`` (weights) + ``model.json`` (the rest).

Safetensors holds tensors only, so loading a model never executes code from the file.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file
from torch import nn

from medtune.errors import MedtuneError
from medtune.io import atomic_path, write_json
from medtune.models.backbones import create_backbone
from medtune.models.classifier import TransferModel
from medtune.models.probe import StageProbeClassifier

MODEL_WEIGHTS = "model.safetensors"
MODEL_META = "model.json"


@dataclass
class ModelMeta:
    """What is needed to rebuild, feed and read a trained model."""

    backbone: str
    kind: str  # "finetune" or "probe"
    class_names: list[str]
    input_size: int
    mean: list[float]
    std: list[float]
    fundus: dict[str, Any]
    stage: str | None = None
    dropout: float = 0.0
    temperature: float = 1.0
    decoding: dict[str, Any] = field(default_factory=lambda: {"method": "argmax"})
    ordinal: bool = False
    synthetic: bool = False

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def build_model(meta: ModelMeta, weights: str | None = None) -> nn.Module:
    """An untrained model with the architecture ``meta`` describes."""
    backbone = create_backbone(meta.backbone, weights=weights)
    if meta.kind == "probe":
        return StageProbeClassifier(backbone, meta.stage, meta.num_classes)
    return TransferModel(backbone, meta.num_classes, dropout=meta.dropout)


def save_model(model: nn.Module, meta: ModelMeta, out_dir: str | Path) -> None:
    """Write the weights and the metadata atomically."""
    out_dir = Path(out_dir)
    # GoogLeNet's auxiliary heads only help training; the deployed model never runs them.
    state = {
        k: v.detach().cpu().contiguous()
        for k, v in model.state_dict().items()
        if not k.startswith("aux_heads.")
    }
    with atomic_path(out_dir / MODEL_WEIGHTS) as tmp:
        save_file(state, str(tmp))
    write_json(out_dir / MODEL_META, asdict(meta))


def load_meta(run_dir: str | Path) -> ModelMeta:
    path = Path(run_dir) / MODEL_META
    if not path.is_file():
        raise MedtuneError(
            f"{path}: no trained model here; give a run folder written by `medtune train`"
        )
    return ModelMeta(**json.loads(path.read_text(encoding="utf-8")))


def load_model(run_dir: str | Path) -> tuple[nn.Module, ModelMeta]:
    """Rebuild a run's trained model in eval mode (no pretrained download needed)."""
    meta = load_meta(run_dir)
    model = build_model(meta, weights=None)
    state = load_file(str(Path(run_dir) / MODEL_WEIGHTS))
    model.load_state_dict(state)
    return model.eval(), meta


def update_meta(run_dir: str | Path, **changes: Any) -> ModelMeta:
    meta = load_meta(run_dir)
    for key, value in changes.items():
        setattr(meta, key, value)
    write_json(Path(run_dir) / MODEL_META, asdict(meta))
    return meta
