"""Settings: the fully resolved configuration of a run (``RUN/config.yaml``) and the narrow values
lower layers take from it.

This is the second layer of the package (above ``errors``/``io``): it imports nothing else from
medtune. Every default is written once, here: :class:`FinetuneRecipe` holds the fine-tuning
recipe's defaults and :class:`TrainConfig` takes its recipe fields from it.

* :class:`InputSpec`: how images are fed to a model (image size, mean/std, fundus options).
* :class:`FinetuneRecipe`: how the pretrained body and the new head are trained.
* :class:`ProbeSettings`: how scenarios 1 and 3 pick their stage and features.
* :class:`TrainConfig`: every setting of a run.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from medtune.errors import MedtuneError
from medtune.io import read_yaml

STRATEGIES = ("linear-probe", "layer-probe", "finetune", "auto")
PROBE_STRATEGIES = ("linear-probe", "layer-probe")
#: Test-time augmentation modes: none, or the mean logits of the four 90-degree rotations.
#: Validation logits are stored for each (``RUN/val_logits.npz``), so every mode has validated
#: operating points, temperature and decoding.
TTA_MODES = ("none", "rot90")


@dataclass(frozen=True)
class FinetuneRecipe:
    """How the pretrained body and the new head are trained (scenarios 2 and 4).

    Parameters
    ----------
    lr : float, default 2e-3
        Learning rate of the new head; the pretrained stages get ``lr * backbone_lr_mult``.
    backbone_lr_mult : float, default 0.1
        Learning-rate multiplier of the pretrained stages.
    layer_decay : float or None, default None
        When set, the last stage gets ``backbone_lr_mult`` and each earlier one a further factor
        ``layer_decay`` (discriminative rates, Howard & Ruder 2018, ULMFiT).
    freeze : int, default 4
        The first ``freeze`` stages (stem first) are frozen, BatchNorm statistics included
        (Lite0: stem to blocks.2; ``docs/performance.md``).
    weight_decay : float, default 1e-4
        L2 / decoupled weight decay, not applied to biases and normalisation parameters.
    l2sp : float, default 0.0
        Strength of the L2-SP penalty towards the pretrained weights (Li et al. 2018).
    head_epochs : int, default 0
        Epochs during which only the new head trains.
    warmup_epochs : float, default 1.0
        Linear warm-up length in epochs.
    schedule : {"cosine", "step"}, default "cosine"
        Decay after warm-up.
    lr_floor : float, default 0.01
        Final learning-rate factor of the decay.
    """

    lr: float = 2e-3
    backbone_lr_mult: float = 0.1
    layer_decay: float | None = None
    freeze: int = 4  # Lite0: stem to blocks.2 (docs/performance.md, recipe)
    weight_decay: float = 1e-4
    l2sp: float = 0.0
    head_epochs: int = 0
    warmup_epochs: float = 1.0
    schedule: str = "cosine"
    lr_floor: float = 0.01


_RECIPE = FinetuneRecipe()


@dataclass(frozen=True)
class InputSpec:
    """How images are fed to a model.

    Parameters
    ----------
    image_size : int
        Side of the square network input, in pixels.
    mean, std : tuple of 3 floats
        Per-channel RGB normalisation on the 0-1 scale: ``x = (pixel / 255 - mean) / std``.
    fundus : dict
        :class:`medtune.data.fundus.FundusOptions` fields (field-of-view crop, Ben Graham, CLAHE).
    """

    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    fundus: dict[str, Any] = field(default_factory=lambda: {"crop": True})


@dataclass(frozen=True)
class ProbeSettings:
    """How a linear or layer probe (scenarios 1 and 3) chooses its features.

    Parameters
    ----------
    strategy : {"linear-probe", "layer-probe"}
        ``linear-probe`` uses the top pooled features; ``layer-probe`` an earlier stage.
    layer : str or None
        The stage of a layer probe, or ``None`` / ``"best"`` to choose on validation.
    rotations : bool, default True
        Train on the features of the four 90-degree rotations of every training image.
    balanced : bool, default False
        Inverse-frequency class weights in the logistic regression.
    batch_size : int, default 32
        Images per feature-extraction batch.
    bf16 : bool, default True
        Extract features under bfloat16 autocast.
    precision : str, default "bf16-mixed"
        The run's precision, part of the feature cache key.
    seed : int, default 0
    progress : bool, default True
    """

    strategy: str
    layer: str | None = None
    rotations: bool = True
    balanced: bool = False
    batch_size: int = 32
    bf16: bool = True
    precision: str = "bf16-mixed"
    seed: int = 0
    progress: bool = True


@dataclass
class TrainConfig:
    """Every setting of a run. Defaults are medtune's recommended recipe.

    ``data`` is one labelled image set, or a list of several (one per site: trained on their
    union, split per site, figures reported per site too); a list of one is stored as its item.
    """

    data: str | list[str] = ""
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
    positive_class: str | None = None

    epochs: int = 10
    batch_size: int = 32
    lr: float = _RECIPE.lr
    optimizer: str = "adamw"
    momentum: float = 0.9
    backbone_lr_mult: float = _RECIPE.backbone_lr_mult
    layer_decay: float | None = _RECIPE.layer_decay
    freeze: int = _RECIPE.freeze
    weight_decay: float = _RECIPE.weight_decay
    l2sp: float = _RECIPE.l2sp
    head_epochs: int = _RECIPE.head_epochs
    warmup_epochs: float = _RECIPE.warmup_epochs
    schedule: str = _RECIPE.schedule
    lr_floor: float = _RECIPE.lr_floor
    dropout: float = 0.2
    aux_logits: bool = False

    rot90: bool = True
    hflip: bool = False
    vflip: bool = False
    # site augmentation (blur, JPEG, scale, colour) inside the FOV: on evidence, the only lever
    # that raised both the home and the new site's figures (docs/generalisation.md)
    augment: list[str] = field(default_factory=lambda: ["site"])
    ema: float | None = None
    class_weights: str | None = None
    balanced_sampler: bool = False
    # P(site) ~ n_site ** site_balance: 1 keeps sites in proportion to their size (unmeasured
    # lever: it becomes a default only on the leave-one-site-out benchmark, docs/generalisation.md)
    site_balance: float = 1.0

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

    def __post_init__(self) -> None:
        if isinstance(self.data, (list, tuple)):
            items = [str(d) for d in self.data]
            self.data = items[0] if len(items) == 1 else items

    def to_dict(self) -> dict[str, Any]:
        """Every setting as plain YAML/JSON values."""
        return dataclasses.asdict(self)

    @property
    def recipe(self) -> FinetuneRecipe:
        """The fine-tuning recipe of this run (its fields share their names with the config's)."""
        return FinetuneRecipe(**{f.name: getattr(self, f.name) for f in fields(FinetuneRecipe)})

    @property
    def probe(self) -> ProbeSettings:
        """The probe settings of this run (scenarios 1 and 3)."""
        return ProbeSettings(
            strategy=self.strategy,
            layer=self.layer,
            rotations=self.probe_rotations,
            balanced=self.class_weights == "auto",
            batch_size=max(self.batch_size, 32),
            bf16=self.bf16,
            precision=self.precision,
            seed=self.seed,
            progress=self.progress,
        )

    def resolve_input(self, backbone: Any) -> TrainConfig:
        """This config with ``image_size``, ``mean`` and ``std`` taken from the backbone's
        pretrained data config wherever they were not given (the one place they are filled).

        Parameters
        ----------
        backbone : medtune.models.Backbone
            Anything with ``image_size``, ``mean`` and ``std`` attributes.
        """
        return dataclasses.replace(
            self,
            image_size=self.image_size or backbone.image_size,
            mean=list(self.mean or backbone.mean),
            std=list(self.std or backbone.std),
        )

    @property
    def input_spec(self) -> InputSpec:
        """How images are fed to the model; needs ``image_size``/``mean``/``std`` resolved."""
        if self.image_size is None or self.mean is None or self.std is None:
            raise MedtuneError(
                "image_size, mean and std are not resolved yet; resolve them from the backbone"
            )
        return InputSpec(self.image_size, tuple(self.mean), tuple(self.std), dict(self.fundus))

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
    def load(cls, path: str | Path, absent: dict[str, Any] | None = None) -> TrainConfig:
        """Read a ``config.yaml``; ``absent`` gives values for settings the file does not name
        (else they take today's defaults)."""
        path = Path(path)
        if not path.is_file():
            raise MedtuneError(f"{path}: config file not found; give the path to a config.yaml")
        values = read_yaml(path)
        if not isinstance(values, dict):
            raise MedtuneError(f"{path}: not a YAML mapping of settings; fix or regenerate it")
        return cls.from_dict({**(absent or {}), **values}, source=str(path))

    def validate(self) -> None:
        if self.strategy not in STRATEGIES:
            raise MedtuneError(
                f"strategy {self.strategy!r} is unknown; use one of {', '.join(STRATEGIES)}"
            )
        if self.optimizer not in ("sgd", "adamw"):
            raise MedtuneError(f"optimizer {self.optimizer!r} is unknown; use sgd or adamw")
        if self.schedule not in ("cosine", "step"):
            raise MedtuneError(f"schedule {self.schedule!r} is unknown; use cosine or step")
        if self.epochs < 1 or self.batch_size < 1:
            raise MedtuneError("epochs and batch_size must be at least 1")
        if self.head_epochs >= self.epochs and self.strategy == "finetune":
            raise MedtuneError("head_epochs must be smaller than epochs")
        if self.ema is not None and not 0.0 < self.ema < 1.0:
            raise MedtuneError(
                f"ema {self.ema} is not a decay in (0, 1); try 0.99, or leave it out"
            )
        if not 0.0 <= self.site_balance <= 1.0:
            raise MedtuneError(
                f"site_balance {self.site_balance} is outside [0, 1]; 1 draws sites by size, "
                "0 every site equally (e.g. --site-balance 0.5)"
            )


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
        "augment": [],
        "ema": None,
        "fundus": {"crop": True},
    },
}


def apply_preset(config: TrainConfig, name: str | None) -> TrainConfig:
    """Return ``config`` with a named preset's settings applied."""
    if name is None:
        return config
    if name not in PRESETS:
        raise MedtuneError(f"preset {name!r} is unknown; available: {', '.join(PRESETS)}")
    return dataclasses.replace(config, preset=name, **PRESETS[name])
