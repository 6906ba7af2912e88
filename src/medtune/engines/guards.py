"""Training guards: a run whose loss or weights stop being finite ends with a clear message.

:class:`NonFiniteLossGuard` checks the training loss of every step before its backward pass (so
a NaN gradient never reaches the weights), the weights before each validation, and every
checkpoint before it is written. On a NaN/inf it stops the run with a one-line
:class:`~medtune.errors.MedtuneError`; the last good ``last.ckpt`` is never overwritten.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.trainer.states import TrainerFn

from medtune.errors import MedtuneError, offer


def _describe(value: float) -> str:
    return "NaN" if math.isnan(value) else ("+inf" if value > 0 else "-inf")


def first_non_finite(named: Iterable[tuple[str, Any]]) -> str | None:
    """The name of the first floating-point tensor holding a NaN or inf, or ``None``."""
    for name, value in named:
        floating = torch.is_tensor(value) and value.is_floating_point()
        if floating and not bool(torch.isfinite(value.detach()).all()):
            return name
    return None


class NonFiniteLossGuard(L.Callback):
    """Stops training at the first NaN/inf training loss (or weight) with a one-line error."""

    def on_before_backward(
        self, trainer: L.Trainer, pl_module: L.LightningModule, loss: torch.Tensor
    ) -> None:
        value = float(loss.detach().float().sum())
        # any process seeing it stops them all (every rank raises, none waits in a collective)
        if trainer.strategy.reduce_boolean_decision(not math.isfinite(value), all=False):
            what = _describe(value) if not math.isfinite(value) else "NaN on another process"
            self._stop(trainer, f"training loss became {what}")

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != TrainerFn.FITTING:
            return
        name = first_non_finite(pl_module.named_parameters())
        if trainer.strategy.reduce_boolean_decision(name is not None, all=False):
            self._stop(trainer, f"weight {name or '(on another process)'} became NaN or inf")

    def on_save_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        state: Mapping[str, Any] = checkpoint.get("state_dict", {})
        name = first_non_finite(state.items())
        if name is not None:
            self._stop(trainer, f"weight {name} became NaN or inf; the checkpoint was not written")

    def _stop(self, trainer: L.Trainer, what: str) -> None:
        trainer.should_stop = True
        epoch, step = trainer.current_epoch, trainer.global_step
        last = _last_checkpoint(trainer)
        if last is not None and last.is_file():
            kept = f"the last good checkpoint {last} is kept"
        else:
            kept = "no checkpoint was written before it"
        raise MedtuneError(
            f"{trainer.default_root_dir}: {what} at epoch {epoch} step {step}; {kept}; train "
            "again"
            + offer(" into a new {}", "--out")
            + offer(" with a lower {}", "--lr", "--backbone-lr-mult")
            + offer(" or with {} 32-true", "--precision")
            + offer(" ({} continues with the same settings)", "--resume")
        )


def _last_checkpoint(trainer: L.Trainer) -> Path | None:
    """Where the run's ``last.ckpt`` lives, or ``None`` without a checkpoint callback."""
    for callback in trainer.checkpoint_callbacks:
        if isinstance(callback, ModelCheckpoint) and callback.dirpath:
            name = f"{callback.CHECKPOINT_NAME_LAST}{callback.FILE_EXTENSION}"
            return Path(callback.dirpath) / name
    return None
