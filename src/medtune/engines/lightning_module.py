"""The Lightning module that fine-tunes a :class:`~medtune.models.TransferModel`."""

from __future__ import annotations

import math
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from medtune.config import FinetuneRecipe, InputSpec
from medtune.data.normalise import normalise_batch
from medtune.engines.losses import grade_loss, sord_targets
from medtune.evaluation.metrics import quick_metrics
from medtune.models.mixstyle import DSU, MixStyle, attach_style
from medtune.models.stages import param_stage_index
from medtune.transfer.recipe import (
    apply_freeze,
    build_param_groups,
    keep_frozen_norms_in_eval,
    l2sp_penalty,
    lr_lambda,
    make_optimizer,
)

AUX_WEIGHT = 0.3
#: The logged validation loss (one-hot cross-entropy), read by ``engines.swad``.
VAL_LOSS = "val_loss"
BN_MOMENTUM = 0.1
"""Running-statistics momentum while fine-tuning. TF-ported weights (Lite0) come with 0.01, which
needs hundreds of steps to track the changing weights: a short fine-tune then evaluates with
stale statistics. PyTorch's default 0.1 tracks within a few dozen steps."""


def set_norm_momentum(root: nn.Module, momentum: float) -> None:
    for module in root.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.momentum = momentum


def module_prefix(root: nn.Module, target: nn.Module) -> str:
    """The dotted name under which ``target`` is registered inside ``root``."""
    for name, module in root.named_modules():
        if module is target:
            return name
    raise ValueError("module is not part of the model")


class FinetuneModule(L.LightningModule):
    """Trains the new head at ``lr`` and the pretrained stages at lower, per-stage rates.

    Batches are ``(uint8 images, labels, positions)``; validation predictions are gathered across
    processes and de-duplicated by position, so every validation image counts exactly once under
    DDP. Frozen stages have ``requires_grad=False`` from the start (DDP never sees them) and
    ``head_epochs`` hold the body with a zero learning-rate factor, so the set of parameters that
    receive gradients never changes: no "unused parameters" errors, no ``find_unused_parameters``.
    """

    def __init__(
        self,
        model: nn.Module,
        recipe: FinetuneRecipe,
        *,
        spec: InputSpec,
        optimizer: str = "adamw",
        momentum: float = 0.9,
        class_weights: list[float] | None = None,
        ordinal: bool = True,
        channels_last: bool = True,
        steps_per_epoch: int = 1,
        epochs: int = 1,
        mixstyle: float | None = None,
        dsu: float | None = None,
        loss: str = "cross-entropy",
    ) -> None:
        super().__init__()
        self.model = model
        self.recipe = recipe
        self.optimizer_name = optimizer
        self.momentum = momentum
        self.ordinal = ordinal
        self.channels_last = channels_last
        self.steps_per_epoch = steps_per_epoch
        self.epochs = epochs
        # the input spec's normalisation as buffers: they move to the device with the module
        self.register_buffer("mean", torch.tensor(spec.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(spec.std).view(1, 3, 1, 1), persistent=False)
        weights = torch.tensor(class_weights, dtype=torch.float32) if class_weights else None
        self.register_buffer("class_weights", weights, persistent=False)
        soft = sord_targets(model.num_classes) if loss == "sord" else None
        self.register_buffer("soft_targets", soft, persistent=False)

        body = model.backbone
        stages = model.stages
        self.body_prefix = module_prefix(self, body)
        self.stage_index = param_stage_index(model)
        self.n_stages = len(stages)
        names = {id(m): n for n, m in body.named_modules()}
        frozen = apply_freeze(body, self.stage_index, recipe.freeze)
        self._frozen_norm_names = [names[id(m)] for m in frozen]
        set_norm_momentum(body, BN_MOMENTUM)
        self.anchors = self._pretrained_anchors(body) if recipe.l2sp > 0 else {}
        # MixStyle and DSU act only on modules in training mode; detach_style() removes them
        style = MixStyle(mixstyle) if mixstyle else DSU(dsu) if dsu else None
        self._style = attach_style(body, stages, style) if style else []
        self._val_outputs: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self.val_history: list[dict[str, float]] = []

    def detach_style(self) -> None:
        """Remove the MixStyle or DSU hooks: the trained model then runs exactly as built."""
        for handle in self._style:
            handle.remove()
        self._style = []

    def _pretrained_anchors(self, body: nn.Module) -> dict[str, torch.Tensor]:
        return {
            f"{self.body_prefix}.{n}": p.detach().clone()
            for n, p in body.named_parameters()
            if p.requires_grad
        }

    @property
    def frozen_norms(self) -> list[nn.Module]:
        """BatchNorm layers of the frozen stages, looked up by name: ``--sync-batchnorm`` replaces
        the modules (SyncBatchNorm and back) after this module was built."""
        body = self.model.backbone
        return [body.get_submodule(name) for name in self._frozen_norm_names]

    def train(self, mode: bool = True) -> FinetuneModule:
        """Switch modes, keeping BatchNorm of frozen stages in eval (running stats fixed)."""
        super().train(mode)
        keep_frozen_norms_in_eval(self.frozen_norms)
        if mode and self._body_is_warming_up():
            self.model.backbone.eval()
        return self

    def _body_is_warming_up(self) -> bool:
        """During ``head_epochs`` the body is fixed, so its BatchNorm statistics must be too."""
        trainer = self._trainer
        return trainer is not None and self.current_epoch < self.recipe.head_epochs

    def on_train_epoch_start(self) -> None:
        """Lightning keeps the modes it is given, so set them for each epoch: frozen BatchNorm
        in eval always, the whole body in eval during ``head_epochs``."""
        self.train()

    def on_fit_start(self) -> None:
        """The L2-SP anchors follow the model to its device (a GPU under Lightning)."""
        self.anchors = {n: a.to(self.device) for n, a in self.anchors.items()}

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = normalise_batch(images, self.mean, self.std, channels_last=self.channels_last)
        return self.model(x)

    def training_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int) -> torch.Tensor:
        images, labels = batch[0], batch[1]
        x = normalise_batch(images, self.mean, self.std, channels_last=self.channels_last)
        logits, aux_logits = self.model.forward_train(x)
        loss = self._loss(logits, labels)
        for aux in aux_logits:  # GoogLeNet's auxiliary classifiers, weighted as in the paper
            loss = loss + AUX_WEIGHT * self._loss(aux, labels)
        self.log("train_loss", loss, prog_bar=True, on_step=True, on_epoch=True, sync_dist=True)
        if self.anchors:
            penalty = l2sp_penalty(self.named_parameters(), self.anchors)
            loss = loss + 0.5 * self.recipe.l2sp * penalty
        return loss

    def _loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return grade_loss(logits, labels, weight=self.class_weights, soft_targets=self.soft_targets)

    def validation_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int) -> None:
        images, labels, indices = batch
        logits = self(images).float()
        self._val_outputs.append((logits.detach(), labels, indices))

    def on_validation_epoch_end(self) -> None:
        if not self._val_outputs:
            return
        logits, labels, indices = (torch.cat(t) for t in zip(*self._val_outputs, strict=True))
        self._val_outputs.clear()
        logits, labels, indices = self._gather_unique(logits, labels, indices)
        metrics = self._validation_metrics(logits, labels)
        self.log_dict(metrics, prog_bar=True, sync_dist=False, rank_zero_only=False)
        if not self.trainer.sanity_checking:
            self.val_history.append({"epoch": self.current_epoch, **metrics})

    def _gather_unique(self, logits, labels, indices):
        """Gather predictions from every process and keep one row per validation index."""
        if self.trainer.world_size > 1:
            logits = self.all_gather(logits).flatten(0, 1)
            labels = self.all_gather(labels).flatten(0, 1)
            indices = self.all_gather(indices).flatten(0, 1)
        order = torch.argsort(indices, stable=True)
        indices, labels, logits = indices[order], labels[order], logits[order]
        keep = torch.ones_like(indices, dtype=torch.bool)
        keep[1:] = indices[1:] != indices[:-1]
        return logits[keep], labels[keep], indices[keep]

    def _validation_metrics(self, logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
        # the one-hot cross-entropy (the validation NLL) whatever the training loss: SWAD's
        # valley is read on it
        loss = F.cross_entropy(logits, labels).item()
        probs = torch.softmax(logits, dim=1).cpu().numpy()
        stats = quick_metrics(labels.cpu().numpy(), probs, ordinal=self.ordinal)
        out = {VAL_LOSS: loss, "val_n": float(len(labels))}
        out.update({f"val_{k}": float(v) for k, v in stats.items() if np.isfinite(v)})
        return out

    def configure_optimizers(self) -> dict[str, Any]:
        groups = build_param_groups(
            self, self.body_prefix, self.stage_index, self.n_stages, self.recipe
        )
        optimizer = make_optimizer(groups, self.optimizer_name, self.recipe.lr, self.momentum)
        steps = self._steps_per_epoch()
        lambdas = [lr_lambda(self.recipe, steps, self.epochs, g["is_backbone"]) for g in groups]
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambdas)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }

    def _steps_per_epoch(self) -> int:
        """Optimizer steps per epoch as the attached trainer runs them (per process, so any
        number of processes and ``limit_train_batches``); ``steps_per_epoch`` without one."""
        trainer = self._trainer
        if trainer is None or not trainer.max_epochs or trainer.max_epochs < 1:
            return self.steps_per_epoch
        total = trainer.estimated_stepping_batches
        if not math.isfinite(total):
            return self.steps_per_epoch
        return max(1, int(total) // trainer.max_epochs)
