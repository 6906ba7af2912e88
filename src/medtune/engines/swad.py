"""Dense weight averaging from the validation-loss valley (SWAD, Cha et al. 2021), on
Lightning's ``WeightAveraging`` callback.

SWAD averages the weights of every optimizer step over the stretch of training where the
validation loss has stopped falling, so that the shipped model sits in a flat region of the loss
surface; flat minima move less when the test distribution shifts (Cha et al., "SWAD: Domain
Generalization by Seeking Flat Minima", NeurIPS 2021). Lightning's ``WeightAveraging`` keeps an
``torch.optim.swa_utils.AveragedModel`` (equal weights when no ``avg_fn`` is given) and swaps it
in for validation and checkpoints; what it lacks, and this module adds, is SWAD's start rule:
the average must not exist (nor be validated, checkpointed or shipped) before the valley is
reached. Differences from the paper, stated in ``docs/generalisation.md``: the loss is read once
per epoch (the paper: every few hundred steps), averaging starts at the step after the first
epoch whose validation loss does not improve on the best so far (the paper also folds in the
iterations since the minimum, which it buffers), and there is no end rule (the learning rate
decays to its floor; the best-validated average is kept by the checkpoint callback instead).
"""

from __future__ import annotations

import logging
import math
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import WeightAveraging

from medtune.engines.lightning_module import VAL_LOSS

log = logging.getLogger("medtune")


class ValleyWeightAveraging(WeightAveraging):
    """Average the weights of every optimizer step once the validation loss stops falling.

    Parameters
    ----------
    use_buffers : bool, default True
        Average the BatchNorm running statistics with the weights (Lightning's default), so the
        shipped average needs no extra pass over the training images.

    Notes
    -----
    Before the valley the callback is inert: validation, ``best.ckpt`` and ``last.ckpt`` hold
    the current weights, exactly as without it. From the valley on they hold the running equal
    average (Izmailov et al. 2018's SWA, updated every step as in SWAD), so the checkpoint
    callback keeps the best-validated average. The state (started, best loss) is saved in
    checkpoints, so ``--resume`` continues the same average. When the loss falls until the last
    epoch (a decaying learning rate does that) nothing is averaged and a note says so.

    References
    ----------
    Cha et al., "SWAD: Domain Generalization by Seeking Flat Minima", NeurIPS 2021.
    Lightning ``lightning.pytorch.callbacks.WeightAveraging``.
    """

    def __init__(self, use_buffers: bool = True) -> None:
        super().__init__(use_buffers=use_buffers)
        self.started = False
        self.best_loss = math.inf

    def should_update(self, step_idx: int | None = None, epoch_idx: int | None = None) -> bool:
        """Every optimizer step after the valley; never at an epoch's end."""
        return self.started and step_idx is not None

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Read the epoch's validation loss (logged by the module after the callbacks' own
        ``on_validation_epoch_end``) and start averaging when it no longer improves."""
        if self.started or trainer.sanity_checking:
            return
        loss = trainer.callback_metrics.get(VAL_LOSS)
        if loss is None:
            return
        loss = float(loss)
        if loss < self.best_loss:
            self.best_loss = loss
            return
        self.started = True
        log.info(
            "weight averaging starts after epoch %d: validation loss %.4f, best %.4f",
            trainer.current_epoch,
            loss,
            self.best_loss,
        )

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._has_average():  # no step runs during validation: the end swaps back alike
            self._swap_models(pl_module)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._has_average():
            self._swap_models(pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._has_average():
            self._copy_average_to_current(pl_module)
        elif trainer.is_global_zero:  # otherwise --swad would change nothing, silently
            log.warning(
                "note: swad averaged no weights: the validation loss fell until the last epoch; "
                "train at a constant rate as SWAD does (--schedule constant) or for more epochs"
            )

    def on_save_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        if self._has_average():
            super().on_save_checkpoint(trainer, pl_module, checkpoint)

    def on_load_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        if "averaging_state" in checkpoint:
            super().on_load_checkpoint(trainer, pl_module, checkpoint)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "started": self.started, "best_loss": self.best_loss}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.started = bool(state_dict.get("started", False))
        self.best_loss = float(state_dict.get("best_loss", math.inf))

    def _has_average(self) -> bool:
        average = self._average_model
        return average is not None and int(average.n_averaged) > 0
