"""The fine-tuning engine, scenarios 2 and 4: fine-tune the pretrained network with Lightning."""

from __future__ import annotations

import csv
import logging
import os
import pickle
import sys
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.plugins.environments import TorchElasticEnvironment
from lightning.fabric.plugins.io import TorchCheckpointIO
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.accelerators import CPUAccelerator
from lightning.pytorch.callbacks import (
    EarlyStopping,
    EMAWeightAveraging,
    LearningRateMonitor,
    ModelCheckpoint,
    TQDMProgressBar,
)
from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter

from medtune.config import TrainConfig
from medtune.data import Part
from medtune.data.site_augment import resolve_augment
from medtune.engines.datamodule import CacheDataModule, class_weights
from medtune.engines.guards import NonFiniteLossGuard
from medtune.engines.lightning_module import FinetuneModule
from medtune.engines.swad import ValleyWeightAveraging
from medtune.errors import MedtuneError, unpickling_detail
from medtune.evaluation.labels import is_ordinal
from medtune.io import atomic_path
from medtune.logs import route_library_logs
from medtune.models import Backbone, TransferModel
from medtune.runs import RunData, RunFolder

log = logging.getLogger("medtune")

RECORD_SAMPLES_ENV = "MEDTUNE_RECORD_SAMPLES"


class EpochProgressBar(TQDMProgressBar):
    """Lightning's progress bar without ``v_num`` (the logger version, here the tail of
    "tensorboard": ``v_num=oard``) and, when stdout is not a terminal, without the nested
    validation bar, which there cannot redraw and repeats the same line every epoch."""

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict:
        items = super().get_metrics(trainer, pl_module)
        items.pop("v_num", None)
        return items

    def init_validation_tqdm(self) -> Tqdm:
        return super().init_validation_tqdm() if sys.stdout.isatty() else Tqdm(disable=True)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoints written to a temp file, fsynced, then renamed over the old one."""

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:  # noqa: ANN001
        with atomic_path(path) as tmp:
            torch.save(checkpoint, tmp)

    def load_checkpoint(self, path, map_location=None, weights_only=None):  # noqa: ANN001
        """Load with ``weights_only=True``; an unreadable or unsafe file is a one-line error."""
        try:
            return super().load_checkpoint(path, map_location=map_location, weights_only=True)
        except Exception as err:  # torn zip, pickled code, foreign format: name the file
            what = "refused to load" if isinstance(err, pickle.UnpicklingError) else "cannot read"
            detail = unpickling_detail(err)
            raise MedtuneError(
                f"{path}: {what} this checkpoint ({detail}); delete it to restart the run, or "
                "train again into a new --out"
            ) from None


class HistoryKeepingCSVLogger(CSVLogger):
    """Lightning's CSV logger, except that a resumed run appends to ``metrics.csv`` instead of
    deleting the earlier epochs' rows."""

    @property
    def experiment(self):  # noqa: ANN201
        if self._experiment is None:
            self._experiment = _AppendingWriter(log_dir=self.log_dir)
        return self._experiment


class _AppendingWriter(ExperimentWriter):
    def _check_log_dir_exists(self) -> None:
        if os.path.isfile(self.metrics_file_path):
            with open(self.metrics_file_path, newline="") as fh:
                self.metrics_keys = sorted(next(csv.reader(fh), []))


class RecordTrainPositions(L.Callback):
    """Debugging aid, on with ``MEDTUNE_RECORD_SAMPLES=1``: every process appends the positions
    (in the train split) of the images it trained on to ``RUN/debug/train_positions_rank{r}.txt``,
    one ``epoch position`` line per image, so DDP sharding can be checked."""

    def __init__(self, run_dir: Path) -> None:
        self.dir = RunFolder(run_dir).debug_dir
        self.seen: list[int] = []

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, idx: int
    ) -> None:
        self.seen.extend(int(p) for p in batch[2])

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.dir / f"train_positions_rank{trainer.global_rank}.txt"
        with path.open("a", encoding="utf-8") as fh:
            fh.writelines(f"{trainer.current_epoch} {p}\n" for p in self.seen)
        self.seen.clear()


def monitor_metric(ordinal: bool) -> str:
    """Best epoch by quadratic weighted kappa for graded labels, balanced accuracy otherwise."""
    return "val_qwk" if ordinal else "val_balanced_accuracy"


def run_finetune(
    config: TrainConfig,
    backbone: Backbone,
    data: RunData,
    run: RunFolder,
    *,
    resume: bool = False,
) -> torch.nn.Module:
    """Fine-tune ``backbone`` with a new K-class head.

    Parameters
    ----------
    config : TrainConfig
        The recipe (``config.recipe``), augmentation, loader, precision and scale-out settings.
    backbone : Backbone
        The pretrained network.
    data : RunData
        Prepared train and validation parts.
    run : RunFolder
        Receives checkpoints (``best``/``last``, written atomically) and logs.
    resume : bool, default False
        Continue from ``last.ckpt`` (same optimiser state, schedule and epoch).

    Returns
    -------
    TransferModel
        The best epoch's model (by validation QWK for grades, balanced accuracy otherwise), in
        eval mode on the device it trained on.

    Raises
    ------
    MedtuneError
        For settings the hardware or launcher cannot run, or an unreadable checkpoint.
    """
    L.seed_everything(config.seed, workers=True, verbose=False)
    num_classes = len(data.class_names)
    ordinal = is_ordinal(data.class_names)
    if config.loss == "sord" and not ordinal:
        raise MedtuneError(
            f"loss sord needs graded classes (consecutive numbers such as DR grades 0-4); "
            f"these are {', '.join(map(str, data.class_names))}: use --loss cross-entropy"
        )
    model = TransferModel(backbone, num_classes, dropout=config.dropout)
    if config.channels_last:
        model = model.to(memory_format=torch.channels_last)
    dm = CacheDataModule(
        data.train,
        data.val,
        batch_size=config.batch_size,
        num_workers=config.num_workers,
        rot90=config.rot90,
        hflip=config.hflip,
        vflip=config.vflip,
        site_augment=resolve_augment(config.augment),  # also when build_config was skipped
        balanced_sampler=config.balanced_sampler,
        site_balance=config.site_balance,
        seed=config.seed,
    )
    module = FinetuneModule(
        model,
        config.recipe,
        spec=config.input_spec,
        optimizer=config.optimizer,
        momentum=config.momentum,
        class_weights=_class_weights(config, data.train, num_classes),
        ordinal=ordinal,
        channels_last=config.channels_last,
        epochs=config.epochs,
        mixstyle=config.mixstyle,
        dsu=config.dsu,
        loss=config.loss,
    )
    trainer = _trainer(config, run, monitor_metric(ordinal))
    ckpt = _resume_checkpoint(run) if resume else None
    module.train()  # Lightning keeps the modes it is given; the backbone was built in eval mode
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        # validation metrics are computed from predictions gathered from every process
        warnings.filterwarnings("ignore", message=".*sync_dist=True.*")
        trainer.fit(module, datamodule=dm, ckpt_path=ckpt, weights_only=True)
    module.detach_style()
    best = run.best_checkpoint
    if trainer.is_global_zero:  # only global rank 0 goes on to evaluate
        if best.is_file():
            state = torch.load(best, map_location="cpu", weights_only=True)["state_dict"]
            module.load_state_dict(state)
        module.to(trainer.strategy.root_device)  # evaluate where it trained (fit ends on the CPU)
    return module.model.eval()


def _class_weights(config: TrainConfig, train: Part, num_classes: int) -> list[float] | None:
    if config.class_weights in (None, "none"):
        return None
    if config.class_weights == "auto":
        return class_weights(train.labels, num_classes)
    raise MedtuneError(f"class_weights {config.class_weights!r} is unknown; use auto or none")


def _trainer(config: TrainConfig, run: RunFolder, monitor: str) -> L.Trainer:
    run_dir, folder = run.dir, run.checkpoints
    best = ModelCheckpoint(
        dirpath=folder, filename="best", monitor=monitor, mode="max", enable_version_counter=False
    )
    # Lightning's save_last only refreshes last.ckpt when best.ckpt improves; --resume must
    # continue from the latest epoch, so "last" is its own checkpoint, written every epoch.
    last = ModelCheckpoint(
        dirpath=folder, filename="last", monitor=None, save_top_k=1, enable_version_counter=False
    )
    callbacks: list = [best, last, LearningRateMonitor(logging_interval="epoch")]
    callbacks.append(NonFiniteLossGuard())  # NaN/inf loss: stop, keep the last good ckpt
    if config.progress:
        callbacks.append(EpochProgressBar())
    if config.ema is not None:  # validate, checkpoint and ship the averaged weights
        callbacks.append(EMAWeightAveraging(decay=config.ema, use_buffers=True))
    if config.swad:  # from the validation-loss valley on: the average is validated and shipped
        callbacks.append(ValleyWeightAveraging())
    if config.early_stopping:
        callbacks.append(EarlyStopping(monitor=monitor, mode="max", patience=config.early_stopping))
    if os.environ.get(RECORD_SAMPLES_ENV, "") not in ("", "0"):
        callbacks.append(RecordTrainPositions(run_dir))
    try:
        trainer = _make_trainer(config, run_dir, callbacks)
    except (MisconfigurationException, ValueError) as err:
        raise MedtuneError(
            f"cannot set up training ({err}); check --accelerator, --devices, --num-nodes, "
            "--dist-strategy and --precision (and the launcher's process count)"
        ) from None
    _check_launch(config, trainer)
    cpu = isinstance(trainer.accelerator, CPUAccelerator)
    if config.sync_batchnorm and trainer.world_size > 1 and cpu:
        raise MedtuneError(
            "--sync-batchnorm needs GPUs (PyTorch's SyncBatchNorm does not run on the CPU); "
            "drop the flag"
        )
    return trainer


def _check_launch(config: TrainConfig, trainer: L.Trainer) -> None:
    """torchrun started several processes but the settings make one: each would train alone."""
    if TorchElasticEnvironment.detect() and trainer.world_size == 1:
        started = int(os.environ["WORLD_SIZE"])
        if started > 1:
            raise MedtuneError(
                f"torchrun started {started} processes but --devices {config.devices} x "
                f"--num-nodes {config.num_nodes} is 1; set --devices to --nproc-per-node "
                "and --num-nodes to --nnodes"
            )


def _make_trainer(config: TrainConfig, run_dir: Path, callbacks: list) -> L.Trainer:
    """Lightning picks DDP whenever more than one process runs (``--dist-strategy auto``) and
    detects torchrun / SLURM from their environment variables."""
    route_library_logs()  # Lightning's INFO lines once, and only at medtune's level (-v)
    return L.Trainer(
        default_root_dir=str(run_dir),
        max_epochs=config.epochs,
        accelerator=config.accelerator,
        devices=config.devices,
        num_nodes=config.num_nodes,
        strategy=config.dist_strategy,
        precision=config.precision,
        sync_batchnorm=config.sync_batchnorm,
        callbacks=callbacks,
        logger=_loggers(run_dir),
        plugins=[AtomicCheckpointIO()],
        limit_train_batches=config.max_steps_per_epoch or 1.0,
        log_every_n_steps=10,
        enable_progress_bar=config.progress,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        use_distributed_sampler=True,
    )


def _loggers(run_dir: Path) -> list:
    loggers: list = [
        HistoryKeepingCSVLogger(str(run_dir), name=RunFolder.LOGS, version=""),
        TensorBoardLogger(str(run_dir), name=RunFolder.LOGS, version="tensorboard"),
    ]
    if os.environ.get("MLFLOW_TRACKING_URI"):
        from lightning.pytorch.loggers import MLFlowLogger

        loggers.append(MLFlowLogger(tracking_uri=os.environ["MLFLOW_TRACKING_URI"]))
    return loggers


def _resume_checkpoint(run: RunFolder) -> str:
    last = run.last_checkpoint
    if not last.is_file():
        raise MedtuneError(
            f"{last}: no checkpoint to resume from; start the run again without --resume"
        )
    return str(last)
