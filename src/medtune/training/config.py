"""The fully resolved configuration of a training run (saved as ``RUN/config.yaml``)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medtune.errors import MedtuneError
from medtune.io import read_yaml

STRATEGIES = ("linear-probe", "layer-probe", "finetune", "auto")


@dataclass
class TrainConfig:
    """Every setting of a run. Defaults are medtune's recommended recipe."""

    data: str = ""
    out: str = "runs/run"
    val_data: str | None = None
    test_data: str | None = None
    val_fraction: float = 0.15
    test_fraction: float = 0.15
    cache_dir: str | None = None
    skip_bad: bool = False

    backbone: str = "efficientnet_lite0"
    weights: str | None = "default"
    image_size: int | None = None
    mean: list[float] | None = None
    std: list[float] | None = None
    fundus: dict[str, Any] = field(default_factory=lambda: {"crop": True})

    strategy: str = "finetune"
    layer: str | None = None
    probe_rotations: bool = True

    epochs: int = 10
    batch_size: int = 32
    lr: float = 2e-3
    optimizer: str = "adamw"
    momentum: float = 0.9
    backbone_lr_mult: float = 0.1
    layer_decay: float | None = None
    freeze: int = 4  # Lite0: stem to blocks.2 (docs/performance.md, recipe)
    weight_decay: float = 1e-4
    l2sp: float = 0.0
    head_epochs: int = 0
    warmup_epochs: float = 1.0
    schedule: str = "cosine"
    lr_floor: float = 0.01
    dropout: float = 0.2
    aux_logits: bool = False

    rot90: bool = True
    hflip: bool = False
    vflip: bool = False
    class_weights: str | None = None
    balanced_sampler: bool = False

    early_stopping: int | None = 5
    seed: int = 0
    precision: str = "bf16-mixed"
    channels_last: bool = True
    num_workers: int = 0
    accelerator: str = "auto"
    devices: int | str = 1
    num_nodes: int = 1
    dist_strategy: str = "auto"
    sync_batchnorm: bool = False
    max_steps_per_epoch: int | None = None
    progress: bool = True
    synthetic: bool = False
    preset: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def bf16(self) -> bool:
        """Whether the run trains, validates and extracts features under bf16 autocast."""
        return self.precision.startswith("bf16")

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "config") -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise MedtuneError(
                f"{source}: unknown setting(s) {', '.join(unknown)}; remove them "
                f"(known settings are listed in docs/configuration.md)"
            )
        return cls(**values)

    @classmethod
    def load(cls, path: str | Path) -> TrainConfig:
        path = Path(path)
        if not path.is_file():
            raise MedtuneError(f"{path}: config file not found; give the path to a config.yaml")
        values = read_yaml(path)
        if not isinstance(values, dict):
            raise MedtuneError(f"{path}: not a YAML mapping of settings; fix or regenerate it")
        return cls.from_dict(values, source=str(path))

    def validate(self) -> None:
        if self.strategy not in STRATEGIES:
            raise MedtuneError(
                f"--strategy {self.strategy!r} is unknown; use one of {', '.join(STRATEGIES)}"
            )
        if self.optimizer not in ("sgd", "adamw"):
            raise MedtuneError(f"--optimizer {self.optimizer!r} is unknown; use sgd or adamw")
        if self.schedule not in ("cosine", "step"):
            raise MedtuneError(f"--schedule {self.schedule!r} is unknown; use cosine or step")
        if self.epochs < 1 or self.batch_size < 1:
            raise MedtuneError("--epochs and --batch-size must be at least 1")
        if self.head_epochs >= self.epochs and self.strategy == "finetune":
            raise MedtuneError("--head-epochs must be smaller than --epochs")


PRESETS: dict[str, dict[str, Any]] = {
    # The seed article's recipe: GoogLeNet, a new head, every layer fine-tuned except the first
    # two, a lower learning rate for the pretrained layers, a slow decay, L2, rotations only.
    "seed": {
        "backbone": "googlenet",
        "strategy": "finetune",
        "freeze": 2,
        "backbone_lr_mult": 0.1,
        "schedule": "step",
        "lr_floor": 0.1,
        "optimizer": "sgd",
        "lr": 1e-2,
        "weight_decay": 5e-4,
        "rot90": True,
        "hflip": False,
        "vflip": False,
        "fundus": {"crop": True},
    },
}


def apply_preset(config: TrainConfig, name: str | None) -> TrainConfig:
    """Return ``config`` with a named preset's settings applied."""
    if name is None:
        return config
    if name not in PRESETS:
        raise MedtuneError(f"--preset {name!r} is unknown; available: {', '.join(PRESETS)}")
    return dataclasses.replace(config, preset=name, **PRESETS[name])
