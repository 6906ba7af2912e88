"""``medtune.train()``: one call from a labelled image set to a trained, evaluated run folder.

The run folder's files are listed in :mod:`medtune.runs.folder`. With several processes (DDP:
``devices``/``num_nodes``, torchrun, SLURM) every process runs :func:`train`; one at a time
prepares the data (``RUN/.prepare.lock``), all of them fine-tune, and only global rank 0
evaluates and writes the results (see ``docs/scaling.md``).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lightning import seed_everything
from lightning.fabric.utilities.rank_zero import rank_zero_only

from medtune.config import PROBE_STRATEGIES, TrainConfig, apply_preset
from medtune.data.site_augment import resolve_augment
from medtune.errors import MedtuneError
from medtune.evaluation.card import ModelCard
from medtune.evaluation.labels import LabelSpace
from medtune.models import Backbone, create_backbone
from medtune.runs import RunData, RunFolder, prepare_lock, prepare_run_data

log = logging.getLogger("medtune")

_D = TrainConfig  # the defaults, written once in medtune.config


@dataclass
class RunResult:
    """What :func:`train` returns: where the run lives and what it measured.

    Attributes
    ----------
    dir : pathlib.Path
        The run folder.
    config : TrainConfig
        The fully resolved settings (as in ``RUN/config.yaml``).
    metrics : dict
        ``metrics.json``: ``{"val": ..., "test": ..., "model": ...}`` (keys in
        ``docs/metrics.md``). In a multi-process run only global rank 0 evaluates: the other
        processes get ``is_global_zero=False`` and empty ``metrics``.
    seconds : float
        Wall time of the call.
    is_global_zero : bool
    """

    dir: Path
    config: TrainConfig
    metrics: dict[str, Any]
    seconds: float
    is_global_zero: bool = True


def build_config(
    config: TrainConfig | None = None, preset: str | None = None, **settings: Any
) -> TrainConfig:
    """Resolve a run's settings: defaults < ``config`` < ``preset`` < ``settings``.

    Parameters
    ----------
    config : TrainConfig, optional
        A starting configuration (e.g. a loaded ``config.yaml``).
    preset : str, optional
        A named recipe (``"seed"``); defaults to ``config.preset``.
    **settings
        :class:`TrainConfig` fields that override everything else.

    Returns
    -------
    TrainConfig
        Validated.

    Raises
    ------
    MedtuneError
        For an unknown setting or preset, no training data, or an invalid value.
    """
    config = config or TrainConfig()
    config = apply_preset(config, preset or config.preset)
    unknown = sorted(set(settings) - {f.name for f in dataclasses.fields(TrainConfig)})
    if unknown:
        raise MedtuneError(f"unknown training setting(s): {', '.join(unknown)}")
    config = dataclasses.replace(config, **settings)
    config.augment = list(resolve_augment(config.augment))
    if not config.data:
        raise MedtuneError("no training data given: set data to a folder, CSV or .npz")
    config.validate()
    return config


def train(
    data: str | Path | list[str] | None = None,
    *,
    out: str = _D.out,
    val_data: str | None = _D.val_data,
    test_data: str | None = _D.test_data,
    val_fraction: float = _D.val_fraction,
    test_fraction: float = _D.test_fraction,
    cache_dir: str | None = _D.cache_dir,
    skip_bad: bool = _D.skip_bad,
    backbone: str = _D.backbone,
    weights: str | None = _D.weights,
    image_size: int | None = _D.image_size,
    mean: list[float] | None = _D.mean,
    std: list[float] | None = _D.std,
    fundus: dict[str, Any] | None = None,
    strategy: str = _D.strategy,
    layer: str | None = _D.layer,
    probe_rotations: bool = _D.probe_rotations,
    positive_class: str | None = _D.positive_class,
    epochs: int = _D.epochs,
    batch_size: int = _D.batch_size,
    lr: float = _D.lr,
    optimizer: str = _D.optimizer,
    momentum: float = _D.momentum,
    backbone_lr_mult: float = _D.backbone_lr_mult,
    layer_decay: float | None = _D.layer_decay,
    freeze: int = _D.freeze,
    weight_decay: float = _D.weight_decay,
    l2sp: float = _D.l2sp,
    head_epochs: int = _D.head_epochs,
    warmup_epochs: float = _D.warmup_epochs,
    schedule: str = _D.schedule,
    lr_floor: float = _D.lr_floor,
    dropout: float = _D.dropout,
    aux_logits: bool = _D.aux_logits,
    rot90: bool = _D.rot90,
    hflip: bool = _D.hflip,
    vflip: bool = _D.vflip,
    augment: str | list[str] | None = None,
    ema: float | None = _D.ema,
    class_weights: str | None = _D.class_weights,
    balanced_sampler: bool = _D.balanced_sampler,
    early_stopping: int | None = _D.early_stopping,
    seed: int = _D.seed,
    precision: str = _D.precision,
    channels_last: bool = _D.channels_last,
    num_workers: int = _D.num_workers,
    accelerator: str = _D.accelerator,
    devices: int | str = _D.devices,
    num_nodes: int = _D.num_nodes,
    dist_strategy: str = _D.dist_strategy,
    sync_batchnorm: bool = _D.sync_batchnorm,
    max_steps_per_epoch: int | None = _D.max_steps_per_epoch,
    progress: bool = _D.progress,
    synthetic: bool = _D.synthetic,
    preset: str | None = None,
    config: TrainConfig | None = None,
) -> RunResult:
    """Train a model on a labelled image set and evaluate it on validation (and test).

    Picks the transfer scenario (``strategy``), prepares and caches the images once, trains,
    fits the temperature and decoding on validation, and writes the run folder (model,
    ``metrics.json`` with 95% intervals, ``config.yaml``, ``splits.csv``, logs).

    Parameters
    ----------
    data : str or pathlib.Path, or a list of them
        Training images: class folders, a folder with ``labels.csv`` / ``trainLabels.csv``, a
        CSV, or a MedMNIST ``.npz`` (``medtune.data.load_imageset``). Required unless
        ``config`` gives it. Several sets (one per site) train on their union, split every
        site separately (groups stay inside one split of their site) and report val/test
        figures per site too (``per_site``); so does a ``site`` column in ``labels.csv``.
    out : str, default "runs/run"
        The run folder; nothing is written outside it (prepared images go to ``cache_dir``).
    val_data, test_data : str or None, default None
        Separate validation / test sets; otherwise group-aware stratified splits of ``data``.
    val_fraction, test_fraction : float, default 0.15
        Shares of ``data`` split off for validation and test.
    cache_dir : str or None, default None
        Where prepared images and cached features live (``$MEDTUNE_CACHE`` or
        ``~/.cache/medtune/prepared``).
    skip_bad : bool, default False
        Leave unreadable images out (listed in ``RUN/skipped_images.csv``) instead of failing.
    backbone : str, default "efficientnet_lite0"
        ``efficientnet_lite0`` (offline ImageNet weights), ``googlenet``, or any timm /
        torchvision model name.
    weights : str or None, default "default"
        ``"default"`` (the bundled or library ImageNet weights), a local ``.pth`` /
        ``.safetensors`` file, or ``None`` for random initialisation.
    image_size : int or None, default None
        Input side in pixels; ``None`` takes the backbone's pretrained size.
    mean, std : list of 3 floats or None, default None
        RGB normalisation on the 0-1 scale; ``None`` takes the backbone's.
    fundus : dict or None, default None (``{"crop": True}``)
        Fundus preprocessing: ``crop`` (field of view), ``ben_graham``, ``ben_graham_sigma``,
        ``clahe`` (:class:`medtune.data.fundus.FundusOptions`).
    strategy : {"finetune", "linear-probe", "layer-probe", "auto"}, default "finetune"
        The transfer scenario; ``auto`` lets the advisor decide (``docs/advisor.md``).
    layer : str or None, default None
        Stage of a ``layer-probe``, or ``"best"`` to choose on validation.
    probe_rotations : bool, default True
        Probes train on the features of all four 90-degree rotations of each image.
    positive_class : str or None, default None
        The positive class of a two-class task, for the headline sensitivity, specificity and
        AUC (default: the class not named like a negative finding, e.g. ``DR`` beside
        ``No_DR``). Stored with the model.
    epochs : int, default 10
        Fine-tuning epochs (probes fit in closed form and ignore it).
    batch_size : int, default 32
        Images per step and process.
    lr : float, default 0.002
        Learning rate of the new head.
    optimizer : {"adamw", "sgd"}, default "adamw"
        AdamW (decoupled weight decay) or SGD with Nesterov momentum (try ``lr=0.01``).
    momentum : float, default 0.9
        SGD's momentum.
    backbone_lr_mult : float, default 0.1
        Learning-rate factor of the pretrained stages.
    layer_decay : float or None, default None
        Extra factor per stage toward the input (discriminative rates).
    freeze : int, default 4
        The first N stages are frozen, BatchNorm statistics included; ``0`` trains them all
        (Lite0's first four hold most of a step's cost, ``docs/performance.md``).
    weight_decay : float, default 1e-4
        Weight decay (not on BatchNorm and biases).
    l2sp : float, default 0.0
        L2-SP pull toward the pretrained weights (Li et al. 2018).
    head_epochs : int, default 0
        Epochs that train only the new head.
    warmup_epochs : float, default 1.0
        Linear warm-up, in epochs.
    schedule : {"cosine", "step"}, default "cosine"
        Decay after warm-up, down to ``lr_floor`` times the rate.
    lr_floor : float, default 0.01
        Final learning-rate factor.
    dropout : float, default 0.2
        Dropout before the new head.
    aux_logits : bool, default False
        Train GoogLeNet's auxiliary classifiers too (loss weight 0.3).
    rot90, hflip, vflip : bool, default True, False, False
        Exact rotation / flip augmentation (colours untouched).
    augment : str, list of str or None, default None (``["site"]``: all seven)
        Site augmentation inside the field of view, against camera and clinic differences:
        ``brightness``, ``contrast``, ``gamma``, ``colour-temperature``, ``blur``, ``jpeg``,
        ``scale``, or the groups ``colour``, ``camera``, ``site`` (all); ``"none"`` or ``[]``
        turns it off (:mod:`medtune.data.site_augment`; measured in
        ``docs/generalisation.md``). Stored expanded in ``config.yaml``.
    ema : float or None, default None
        Keep an exponential moving average of the weights with this per-step decay (e.g.
        0.99) and validate, checkpoint and ship the average (Lightning's
        ``EMAWeightAveraging``; Polyak & Juditsky 1992). ``None`` turns it off.
    class_weights : {None, "auto"}, default None
        ``"auto"``: inverse-frequency loss weights.
    balanced_sampler : bool, default False
        Draw training images class-balanced.
    early_stopping : int or None, default 5
        Patience in epochs on the monitored metric; ``None`` turns it off.
    seed : int, default 0
        Splits, initialisation and augmentation.
    precision : str, default "bf16-mixed"
        Any Lightning precision (``"32-true"``, ``"16-mixed"``, ...).
    channels_last : bool, default True
        Channels-last memory layout.
    num_workers : int, default 0
        DataLoader workers and cache-building processes.
    accelerator, devices, num_nodes, dist_strategy : default "auto", 1, 1, "auto"
        Lightning scale-out (``docs/scaling.md``).
    sync_batchnorm : bool, default False
        Synchronised BatchNorm across GPUs.
    max_steps_per_epoch : int or None, default None
        Cap on training batches per epoch.
    progress : bool, default True
        Progress bars.
    synthetic : bool, default False
        Marks every output as made on synthetic data.
    preset : str or None, default None
        ``"seed"``: the original article's GoogLeNet recipe. Its settings replace the defaults;
        any argument given a value other than its default overrides the preset.
    config : TrainConfig or None, default None
        Start from these settings (e.g. ``TrainConfig.load("RUN/config.yaml")``); arguments that
        differ from the defaults override them.

    Returns
    -------
    RunResult
        The run folder, the resolved settings and the metrics.

    Raises
    ------
    MedtuneError
        For bad settings or data (one line naming the file or setting and the fix).

    See Also
    --------
    resume : continue an interrupted run.
    medtune.evaluate, medtune.predict, medtune.export

    Notes
    -----
    Scenarios (Yosinski et al. 2014; Kornblith et al. 2019): 1 ``linear-probe`` (L2 logistic
    regression on the top pooled features), 3 ``layer-probe`` (the same on an earlier stage),
    2 and 4 ``finetune`` (new head at ``lr``, pretrained stages at ``lr * backbone_lr_mult``,
    warm-up then cosine decay, AdamW (Loshchilov & Hutter 2019), the first ``freeze`` stages
    frozen). Metrics and their intervals: ``docs/metrics.md``.

    Examples
    --------
    >>> import medtune
    >>> run = medtune.train("data/", strategy="linear-probe", out="runs/probe")  # doctest: +SKIP
    >>> run.metrics["test"]["qwk"]  # doctest: +SKIP
    """
    settings = {k: v for k, v in locals().items() if k not in ("data", "preset", "config")}
    for name in ("fundus", "augment"):
        if settings[name] is None:
            del settings[name]
    defaults = TrainConfig()
    changed = {k: v for k, v in settings.items() if v != getattr(defaults, k)}
    if data is not None:
        changed["data"] = [str(d) for d in data] if isinstance(data, (list, tuple)) else str(data)
    return run_training(build_config(config, preset, **changed))


def _note_ignored_by_probe(config: TrainConfig) -> None:
    """Say which fine-tuning settings a probe ignores, rather than drop them silently."""
    ignored = []
    if config.epochs != TrainConfig.epochs:
        ignored.append(f"epochs={config.epochs}")
    if config.augment != list(resolve_augment(TrainConfig().augment)):
        ignored.append(f"augment={','.join(config.augment) or 'none'}")
    if config.ema is not None:
        ignored.append(f"ema={config.ema}")
    if ignored:
        log.warning(
            "note: %s ignores %s: a probe fits its logistic-regression head to convergence on "
            "features computed once; these settings apply to fine-tuning only",
            config.strategy,
            ", ".join(ignored),
        )


def run_training(config: TrainConfig, *, resume: bool = False) -> RunResult:
    """Train (or, with ``resume=True``, continue) a run from fully given settings.

    Parameters
    ----------
    config : TrainConfig
        Validated settings (:func:`build_config`).
    resume : bool, default False
        Continue from ``RUN/checkpoints/last.ckpt`` with the same splits and schedule.

    Returns
    -------
    RunResult

    Raises
    ------
    MedtuneError
        For unreadable data, a missing checkpoint, or settings the hardware cannot run.
    """
    started = time.perf_counter()
    run = RunFolder(Path(config.out))
    run.dir.mkdir(parents=True, exist_ok=True)
    seed_everything(config.seed, workers=True, verbose=False)  # random inits are reproducible too
    with prepare_lock(run.dir):  # other processes of a DDP run wait, then reuse what it built
        backbone = create_backbone(
            config.backbone, weights=config.weights, aux_logits=config.aux_logits
        )
        config = config.resolve_input(backbone)
        data = prepare_run_data(config, run.dir)
        if config.strategy == "auto":
            config = _apply_advice(config, backbone, data, run.dir)
        if global_rank() == 0:
            run.write_config(config)
    card = _card(config, data)

    if config.strategy in PROBE_STRATEGIES:
        from medtune.engines.probe import run_probe

        if global_rank() != 0:  # probes run in one process
            return _other_rank_result(run.dir, config, started)
        _note_ignored_by_probe(config)
        model = run_probe(config.probe, backbone, data, run)
    else:
        from medtune.engines.finetune import run_finetune

        model = run_finetune(config, backbone, data, run, resume=resume)
        if global_rank() != 0:  # DDP: global rank 0 alone evaluates and writes the results
            return _other_rank_result(run.dir, config, started)

    from medtune.engines.finalize import finalize_run

    metrics = finalize_run(
        model,
        card,
        data,
        run,
        config.strategy,
        batch_size=config.batch_size,
        progress=config.progress,
    )
    seconds = time.perf_counter() - started
    log.info("run finished in %.1f s: %s", seconds, run.dir)
    return RunResult(run.dir, config, metrics, seconds)


def global_rank() -> int:
    """This process's global rank: Lightning's, from torchrun/SLURM/launcher variables until a
    trainer sets it up (0 in a single-process run)."""
    return int(rank_zero_only.rank)


def _other_rank_result(run_dir: Path, config: TrainConfig, started: float) -> RunResult:
    seconds = time.perf_counter() - started
    log.info("rank %d done in %.1f s; rank 0 writes the results", global_rank(), seconds)
    return RunResult(run_dir, config, {}, seconds, is_global_zero=False)


def resume(run: str | Path, *, epochs: int | None = None) -> RunResult:
    """Continue an interrupted fine-tuning run, or extend a finished one, with its own settings.

    Parameters
    ----------
    run : str or pathlib.Path
        A fine-tuning run folder written by :func:`train`.
    epochs : int, optional
        A new total number of epochs, larger than the run's: the run continues from
        ``RUN/checkpoints/last.ckpt`` to that many epochs (the cosine decay is re-planned over
        the new total from where it stands). Without it, an interrupted run finishes its own
        epochs.

    Returns
    -------
    RunResult

    Raises
    ------
    MedtuneError
        When the folder holds no ``config.yaml`` or no checkpoint, when the run already finished
        and ``epochs`` does not extend it, or for a probe run (probes fit in one go: train again).
    """
    folder = RunFolder(Path(run))
    config = folder.read_config()
    if config.strategy in PROBE_STRATEGIES:
        raise MedtuneError(
            f"{folder.dir}: a {config.strategy} run has no epochs to resume; train it again"
        )
    done = _epochs_done(folder)
    if epochs is not None:
        if epochs <= done:
            raise MedtuneError(
                f"{folder.dir}: {done} epoch(s) are done already; give more than {done} epochs "
                "to extend the run"
            )
        config = dataclasses.replace(config, epochs=epochs)
    elif done >= config.epochs:
        raise MedtuneError(
            f"{folder.dir}: the run finished its {config.epochs} epoch(s); give epochs "
            f"(--epochs N) larger than {done} to train longer"
        )
    return run_training(config, resume=True)


def _epochs_done(folder: RunFolder) -> int:
    """Completed epochs of a run, from its last checkpoint (0 without one), read safely."""
    from medtune.engines.finetune import AtomicCheckpointIO

    last = folder.last_checkpoint
    if not last.is_file():
        return 0
    state = AtomicCheckpointIO().load_checkpoint(last, map_location="cpu")
    return int(state.get("epoch", -1)) + 1


def _card(config: TrainConfig, data: RunData) -> ModelCard:
    """The new model's card before finalisation: network, input spec and label space (the
    positive class of a two-class task checked against the classes)."""
    probe = config.strategy in PROBE_STRATEGIES
    return ModelCard(
        label_space=LabelSpace.of(data.class_names, positive_class=config.positive_class),
        input_spec=config.input_spec,
        backbone=config.backbone,
        kind="probe" if probe else "finetune",
        stage=None,
        dropout=0.0 if probe else config.dropout,
        synthetic=config.synthetic,
    )


def _apply_advice(config: TrainConfig, backbone: Backbone, data: RunData, run_dir: Path):
    from medtune.workflows.advise import advise_for_run

    return advise_for_run(config, backbone, data, run_dir)
