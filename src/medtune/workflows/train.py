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

from medtune.config import (
    PROBE_STRATEGIES,
    TrainConfig,
    apply_preset,
    given_settings,
    settings_docstring,
    unset_defaults,
)
from medtune.data.site_augment import resolve_augment
from medtune.errors import MedtuneError
from medtune.evaluation.card import ModelCard
from medtune.evaluation.labels import LabelSpace
from medtune.models import Backbone, create_backbone
from medtune.runs import RunData, RunFolder, prepare_lock, prepare_run_data

log = logging.getLogger("medtune")

#: train()'s keyword defaults: TrainConfig's, each wrapped as "not given" (config.Unset).
_D = unset_defaults()


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
        A starting configuration, taken as it is (e.g. ``TrainConfig.load("config.yaml")``,
        which already applied the preset the file names beneath the file's values).
    preset : str, optional
        A named recipe (``"seed"``) applied over ``config``.
    **settings
        :class:`TrainConfig` fields given explicitly: they override everything else, whatever
        their value.

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
    config = apply_preset(config, preset)
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
    fundus: dict[str, Any] = _D.fundus,
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
    augment: str | list[str] | None = _D.augment,
    ema: float | None = _D.ema,
    mixstyle: float | None = _D.mixstyle,
    dsu: float | None = _D.dsu,
    swad: bool = _D.swad,
    loss: str = _D.loss,
    class_weights: str | None = _D.class_weights,
    balanced_sampler: bool = _D.balanced_sampler,
    site_balance: float = _D.site_balance,
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

    Every keyword passed explicitly wins over ``preset`` and ``config``, whatever its value
    (even the default); a keyword not passed keeps the value of ``config``, else of the preset,
    else the default. The keywords other than ``data``, ``preset`` and ``config`` are the
    settings of :class:`medtune.TrainConfig`; their entries below are generated from its fields
    (help, allowed values, unit, default), where they are written once.

    Parameters
    ----------
    data : str or pathlib.Path, or a list of them
        Training images: class folders, a folder with ``labels.csv`` / ``trainLabels.csv``, a
        CSV, or a MedMNIST ``.npz`` (``medtune.data.load_imageset``). Required unless
        ``config`` gives it. Several sets (one per site) train on their union, split every
        site separately (groups stay inside one split of their site) and report val/test
        figures per site too (``per_site``); so does a ``site`` column in ``labels.csv``.
    {settings}
    preset : {"seed"} or None, default None
        A named recipe applied over the defaults (and over ``config``): ``"seed"`` is the
        original article's GoogLeNet recipe.
    config : TrainConfig or None, default None
        Start from these settings (e.g. ``TrainConfig.load("RUN/config.yaml")``).

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
    given = given_settings({k: v for k, v in locals().items() if k not in ("data", "preset")})
    if data is not None:
        given["data"] = [str(d) for d in data] if isinstance(data, (list, tuple)) else str(data)
    return run_training(build_config(config, preset, **given))


def _fill_settings(doc: str | None) -> str | None:
    """``train``'s docstring with its ``{settings}`` line replaced by the entries of every
    :class:`TrainConfig` setting it takes as a keyword (generated: the text is written once, on
    the fields; ``None`` under ``python -OO``)."""
    if doc is None:
        return None
    names = [f.name for f in dataclasses.fields(TrainConfig) if f.name not in ("data", "preset")]
    return doc.replace("    {settings}", settings_docstring(TrainConfig, names, indent="    "))


train.__doc__ = _fill_settings(train.__doc__)


def _note_ignored_by_probe(config: TrainConfig) -> None:
    """Say which fine-tuning settings a probe ignores, rather than drop them silently."""
    ignored = []
    if config.epochs != TrainConfig.epochs:
        ignored.append(f"epochs={config.epochs}")
    if config.augment != list(resolve_augment(TrainConfig().augment)):
        ignored.append(f"augment={','.join(config.augment) or 'none'}")
    if config.ema is not None:
        ignored.append(f"ema={config.ema}")
    for name in ("mixstyle", "dsu"):
        if getattr(config, name) is not None:
            ignored.append(f"{name}={getattr(config, name)}")
    if config.swad:
        ignored.append("swad")
    if config.loss != TrainConfig.loss:
        ignored.append(f"loss={config.loss}")
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

    Idempotent, as retries by schedulers and scripts need: a run that already finished (its
    ``metrics.json`` written after its last checkpoint) is left as it is and its results are
    returned, with a warning that nothing was left to do. A run killed after its last epoch but
    before its results were written gets them written.

    Parameters
    ----------
    run : str or pathlib.Path
        A run folder written by :func:`train`.
    epochs : int, optional
        A new total number of epochs, larger than the run's: the run continues from
        ``RUN/checkpoints/last.ckpt`` to that many epochs (the cosine decay is re-planned over
        the new total from where it stands). Without it (or equal to the run's own total), an
        interrupted run finishes its own epochs and a finished run is left as it is.

    Returns
    -------
    RunResult

    Raises
    ------
    MedtuneError
        When the folder holds no ``config.yaml`` or no checkpoint, when ``epochs`` is not more
        than the epochs already done, or for an unfinished probe run (probes fit in one go:
        train again).
    """
    started = time.perf_counter()
    folder = RunFolder(Path(run))
    config = folder.read_config()
    if _finished(folder, config) and epochs in (None, config.epochs):
        log.warning(
            "%s: the run already finished; nothing left to do (--epochs N with N larger than "
            "%d trains it longer)",
            folder.dir,
            config.epochs,
        )
        return RunResult(folder.dir, config, folder.read_metrics(), time.perf_counter() - started)
    if config.strategy in PROBE_STRATEGIES:
        raise MedtuneError(
            f"{folder.dir}: a {config.strategy} run has no epochs to resume; train it again"
        )
    done = _epochs_done(folder)
    if epochs is not None and epochs != config.epochs:
        if epochs <= done:
            raise MedtuneError(
                f"{folder.dir}: {done} epoch(s) are done already; give more than {done} epochs "
                "to extend the run"
            )
        config = dataclasses.replace(config, epochs=epochs)
    return run_training(config, resume=True)  # after the last epoch: writes the results


def _finished(folder: RunFolder, config: TrainConfig) -> bool:
    """Whether the run wrote its results after its last checkpoint (``metrics.json`` is the
    last file :func:`~medtune.engines.finalize.finalize_run` writes) and trained every epoch of
    its ``config.yaml`` (or stopped early); a config edited to more epochs is not finished."""
    metrics = folder.metrics_path
    if not metrics.is_file():
        return False
    last = folder.last_checkpoint
    if not last.is_file():
        return True  # a probe run: fitted in one go
    if metrics.stat().st_mtime_ns < last.stat().st_mtime_ns:
        return False
    state = _last_state(folder)
    stopped = any(  # Lightning's EarlyStopping state records the epoch it stopped at
        isinstance(v, dict) and int(v.get("stopped_epoch", 0) or 0) > 0
        for k, v in state.get("callbacks", {}).items()
        if str(k).startswith("EarlyStopping")
    )
    return stopped or int(state.get("epoch", -1)) + 1 >= config.epochs


def _last_state(folder: RunFolder) -> dict[str, Any]:
    """The last checkpoint's contents (``{}`` without one), read safely."""
    from medtune.engines.finetune import AtomicCheckpointIO

    last = folder.last_checkpoint
    if not last.is_file():
        return {}
    return AtomicCheckpointIO().load_checkpoint(last, map_location="cpu")


def _epochs_done(folder: RunFolder) -> int:
    """Completed epochs of a run, from its last checkpoint (0 without one), read safely."""
    state = _last_state(folder)
    return int(state.get("epoch", -1)) + 1 if state else 0


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
