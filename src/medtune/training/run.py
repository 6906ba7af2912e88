"""``medtune.train()``: one call from a labelled image set to a trained, evaluated run folder.

Run folder layout::

    RUN/config.yaml          fully resolved settings (``medtune train --config RUN/config.yaml``)
    RUN/splits.csv           image,split (train/val/test), reused by every later command
    RUN/checkpoints/         best.ckpt and last.ckpt (fine-tuning; Lightning format)
    RUN/logs/                CSV (and TensorBoard) logs
    RUN/model.safetensors    the deployable model; RUN/model.json says how to feed and read it
    RUN/metrics.json         {"val": {...}, "test": {...}}
    RUN/val_logits.npz       validation logits, used to choose thresholds for later evaluations

With several processes (DDP: ``--devices``/``--num-nodes``, torchrun, SLURM) every process runs
:func:`train`; one at a time prepares the data (``RUN/.prepare.lock``), all of them fine-tune, and
only global rank 0 evaluates and writes the results (see ``docs/scaling.md``).
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

from medtune.errors import MedtuneError
from medtune.evaluation.metrics import is_ordinal_names
from medtune.io import write_yaml
from medtune.models import Backbone, create_backbone
from medtune.models.store import ModelMeta
from medtune.training.config import TrainConfig, apply_preset
from medtune.training.parts import RunData, prepare_lock, prepare_run_data

log = logging.getLogger("medtune")

CONFIG_FILE = "config.yaml"


@dataclass
class RunResult:
    """What :func:`train` returns: where the run lives and what it measured.

    In a multi-process run only global rank 0 evaluates: the other processes get
    ``is_global_zero=False`` and empty ``metrics`` (``RUN/metrics.json`` has them).
    """

    dir: Path
    config: TrainConfig
    metrics: dict[str, Any]
    seconds: float
    is_global_zero: bool = True


def resolve_config(config: TrainConfig | None = None, **overrides: Any) -> TrainConfig:
    """Defaults < preset < explicit settings."""
    config = config or TrainConfig()
    preset = overrides.pop("preset", None) or config.preset
    config = apply_preset(config, preset)
    unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(TrainConfig)})
    if unknown:
        raise MedtuneError(f"unknown training setting(s): {', '.join(unknown)}")
    config = dataclasses.replace(config, **overrides)
    if not config.data:
        raise MedtuneError("no training data given; pass --data PATH (a folder, CSV or .npz)")
    config.validate()
    return config


def train(
    config: TrainConfig | None = None, *, resume: bool = False, **overrides: Any
) -> RunResult:
    """Train (or, with ``resume=True``, continue) a run and evaluate it on val (and test).

    ``overrides`` are :class:`TrainConfig` fields, e.g. ``train(data="x", strategy="finetune")``.
    """
    started = time.perf_counter()
    config = resolve_config(config, **overrides)
    run_dir = Path(config.out)
    run_dir.mkdir(parents=True, exist_ok=True)
    seed_everything(config.seed, workers=True, verbose=False)  # random inits are reproducible too
    with prepare_lock(run_dir):  # other processes of a DDP run wait, then reuse what it built
        backbone = create_backbone(
            config.backbone, weights=config.weights, aux_logits=config.aux_logits
        )
        config = _with_input_settings(config, backbone)
        data = prepare_run_data(config, config.image_size, run_dir)
        if config.strategy == "auto":
            config = _apply_advice(config, backbone, data, run_dir)
        if global_rank() == 0:
            write_yaml(run_dir / CONFIG_FILE, config.to_dict())
    meta = _meta(config, data, backbone)

    if config.strategy in ("linear-probe", "layer-probe"):
        from medtune.transfer.scenarios import run_probe

        if global_rank() != 0:  # probes run in one process
            return _other_rank_result(run_dir, config, started)
        if config.epochs != TrainConfig.epochs:  # say so rather than drop the setting silently
            log.warning(
                "note: %s ignores epochs=%d: a probe fits its logistic-regression head to "
                "convergence; epochs applies to fine-tuning only",
                config.strategy,
                config.epochs,
            )
        model, evaluator = run_probe(config, backbone, data, run_dir)
    else:
        from medtune.training.finetune_run import run_finetune

        model, evaluator = run_finetune(config, backbone, data, run_dir, resume=resume)
        if global_rank() != 0:  # DDP: global rank 0 alone evaluates and writes the results
            return _other_rank_result(run_dir, config, started)

    from medtune.evaluation.finalize import finalize_run

    metrics = finalize_run(model, meta, data, run_dir, evaluator, config)
    seconds = time.perf_counter() - started
    log.info("run finished in %.1f s: %s", seconds, run_dir)
    return RunResult(run_dir, config, metrics, seconds)


def global_rank() -> int:
    """This process's global rank: Lightning's, from torchrun/SLURM/launcher variables until a
    trainer sets it up (0 in a single-process run)."""
    return int(rank_zero_only.rank)


def _other_rank_result(run_dir: Path, config: TrainConfig, started: float) -> RunResult:
    seconds = time.perf_counter() - started
    log.info("rank %d done in %.1f s; rank 0 writes the results", global_rank(), seconds)
    return RunResult(run_dir, config, {}, seconds, is_global_zero=False)


def resume(run_dir: str | Path) -> RunResult:
    """Continue an interrupted run from ``RUN/checkpoints/last.ckpt`` with its own config."""
    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        raise MedtuneError(f"{path}: not found; --resume needs a run folder made by medtune train")
    config = TrainConfig.load(path)
    return train(dataclasses.replace(config, out=str(run_dir)), resume=True)


def _with_input_settings(config: TrainConfig, backbone: Backbone) -> TrainConfig:
    """Fill image size, mean and std from the backbone's pretrained config unless given."""
    return dataclasses.replace(
        config,
        image_size=config.image_size or backbone.input_size,
        mean=list(config.mean or backbone.mean),
        std=list(config.std or backbone.std),
    )


def _meta(config: TrainConfig, data: RunData, backbone: Backbone) -> ModelMeta:
    probe = config.strategy in ("linear-probe", "layer-probe")
    return ModelMeta(
        backbone=config.backbone,
        kind="probe" if probe else "finetune",
        class_names=data.class_names,
        input_size=config.image_size,
        mean=config.mean,
        std=config.std,
        fundus=dict(config.fundus),
        stage=None,
        dropout=0.0 if probe else config.dropout,
        ordinal=is_ordinal(data.class_names),
        synthetic=config.synthetic,
    )


def is_ordinal(class_names: list[str]) -> bool:
    """Graded labels (e.g. DR grades 0-4): more than two classes named by consecutive integers.
    Two classes are a binary task, judged by balanced accuracy rather than kappa."""
    return len(class_names) > 2 and is_ordinal_names(class_names)


def _apply_advice(config: TrainConfig, backbone: Backbone, data: RunData, run_dir: Path):
    from medtune.transfer.advise import advise_for_run

    return advise_for_run(config, backbone, data, run_dir)
