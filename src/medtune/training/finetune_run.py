"""Scenarios 2 and 4: fine-tune the pretrained network with Lightning."""

from __future__ import annotations

import logging
import math
import os
import warnings
from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.fabric.plugins.io import TorchCheckpointIO
from lightning.pytorch.callbacks import EarlyStopping, LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

from medtune.errors import MedtuneError
from medtune.io import atomic_path
from medtune.models import Backbone, TransferModel
from medtune.training.config import TrainConfig
from medtune.training.datamodule import CacheDataModule, Part, class_weights
from medtune.training.module import FinetuneModule
from medtune.transfer.finetune import FinetuneRecipe

log = logging.getLogger("medtune")

CHECKPOINTS = "checkpoints"


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoints written to a temp file, fsynced, then renamed over the old one."""

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:  # noqa: ANN001
        with atomic_path(path) as tmp:
            torch.save(checkpoint, tmp)


class ImageEvaluator:
    """Logits of a model on a part of the data, optionally with rot90 test-time augmentation."""

    def __init__(self, model: torch.nn.Module, config: TrainConfig) -> None:
        self.model = model.eval()
        self.config = config

    def logits(self, part: Part, tta: str = "none") -> np.ndarray:
        from medtune.evaluation.inference import predict_logits

        return predict_logits(
            self.model,
            _uint8_batches(part, self.config.batch_size),
            mean=self.config.mean,
            std=self.config.std,
            tta=tta,
            bf16=self.config.precision.startswith("bf16"),
            channels_last=self.config.channels_last,
            progress=self.config.progress,
        )


def _uint8_batches(part: Part, batch_size: int):
    """uint8 (B,3,H,W) tensors of the part's images, in order."""
    for start in range(0, len(part.indices), batch_size):
        batch = part.cache.images[part.indices[start : start + batch_size]]
        yield torch.from_numpy(np.array(batch)).permute(0, 3, 1, 2)


def monitor_metric(ordinal: bool) -> str:
    """Best epoch by quadratic weighted kappa for graded labels, balanced accuracy otherwise."""
    return "val_qwk" if ordinal else "val_balanced_accuracy"


def run_finetune(
    config: TrainConfig, backbone: Backbone, data, run_dir: Path, *, resume: bool = False
) -> tuple[torch.nn.Module, ImageEvaluator]:
    """Fine-tune ``backbone`` with a new head; return the best model (by the monitored metric)."""
    from medtune.training.run import is_ordinal

    L.seed_everything(config.seed, workers=True, verbose=False)
    num_classes = len(data.class_names)
    ordinal = is_ordinal(data.class_names)
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
        balanced_sampler=config.balanced_sampler,
        seed=config.seed,
    )
    module = FinetuneModule(
        model,
        _recipe(config),
        mean=config.mean,
        std=config.std,
        optimizer=config.optimizer,
        momentum=config.momentum,
        class_weights=_class_weights(config, data.train, num_classes),
        ordinal=ordinal,
        channels_last=config.channels_last,
        steps_per_epoch=_steps_per_epoch(config, len(data.train)),
        epochs=config.epochs,
    )
    trainer = _trainer(config, run_dir, monitor_metric(ordinal))
    ckpt = _resume_checkpoint(run_dir) if resume else None
    module.train()  # Lightning keeps the modes it is given; the backbone was built in eval mode
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        trainer.fit(module, datamodule=dm, ckpt_path=ckpt, weights_only=True)
    best = Path(run_dir) / CHECKPOINTS / "best.ckpt"
    if best.is_file():
        state = torch.load(best, map_location="cpu", weights_only=True)["state_dict"]
        module.load_state_dict(state)
    return module.model.eval(), ImageEvaluator(module.model, config)


def _recipe(config: TrainConfig) -> FinetuneRecipe:
    return FinetuneRecipe(
        lr=config.lr,
        backbone_lr_mult=config.backbone_lr_mult,
        layer_decay=config.layer_decay,
        freeze=config.freeze,
        weight_decay=config.weight_decay,
        l2sp=config.l2sp,
        head_epochs=config.head_epochs,
        warmup_epochs=config.warmup_epochs,
        schedule=config.schedule,
        lr_floor=config.lr_floor,
    )


def _class_weights(config: TrainConfig, train: Part, num_classes: int) -> list[float] | None:
    if config.class_weights in (None, "none"):
        return None
    if config.class_weights == "auto":
        return class_weights(train.labels, num_classes)
    raise MedtuneError(f"--class-weights {config.class_weights!r} is unknown; use auto or none")


def _world_size(config: TrainConfig) -> int:
    devices = config.devices if isinstance(config.devices, int) else 1
    return max(1, devices) * max(1, config.num_nodes)


def _steps_per_epoch(config: TrainConfig, n_train: int) -> int:
    per_rank = math.ceil(n_train / _world_size(config))
    steps = per_rank // config.batch_size if per_rank > config.batch_size else 1
    if config.max_steps_per_epoch:
        steps = min(steps, config.max_steps_per_epoch)
    return max(1, steps)


def _trainer(config: TrainConfig, run_dir: Path, monitor: str) -> L.Trainer:
    checkpoints = ModelCheckpoint(
        dirpath=Path(run_dir) / CHECKPOINTS,
        filename="best",
        monitor=monitor,
        mode="max",
        save_last=True,
        enable_version_counter=False,
    )
    callbacks: list = [checkpoints, LearningRateMonitor(logging_interval="epoch")]
    if config.early_stopping:
        callbacks.append(EarlyStopping(monitor=monitor, mode="max", patience=config.early_stopping))
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
        CSVLogger(str(run_dir), name="logs", version=""),
        TensorBoardLogger(str(run_dir), name="logs", version="tensorboard"),
    ]
    if os.environ.get("MLFLOW_TRACKING_URI"):
        from lightning.pytorch.loggers import MLFlowLogger

        loggers.append(MLFlowLogger(tracking_uri=os.environ["MLFLOW_TRACKING_URI"]))
    return loggers


def _resume_checkpoint(run_dir: Path) -> str:
    last = Path(run_dir) / CHECKPOINTS / "last.ckpt"
    if not last.is_file():
        raise MedtuneError(
            f"{last}: no checkpoint to resume from; start the run again without --resume"
        )
    return str(last)
