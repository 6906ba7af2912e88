"""SWAD's start rule on Lightning's weight averaging: nothing is averaged, validated or
checkpointed as an average before the validation loss stops falling; from then on every step's
weights enter an equal average, which is what validation, the checkpoint and the end of
training hold."""

from __future__ import annotations

import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

from medtune.engines.swad import ValleyWeightAveraging

STEPS_PER_EPOCH = 4
#: scripted validation losses, one per epoch: the first that does not improve is epoch 2
LOSSES = [1.0, 0.8, 0.85, 0.7, 0.9]


class Scripted(L.LightningModule):
    """A linear model trained by SGD; its validation loss is read from ``LOSSES`` so the
    valley's epoch is known, and its weights after every step are recorded."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(3, 1)
        self.after_step: list[torch.Tensor] = []
        self.validated: list[torch.Tensor] = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.mse_loss(self.layer(x).squeeze(1), y)

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        self.after_step.append(self.layer.weight.detach().clone())

    def validation_step(self, batch, batch_idx) -> None:
        if batch_idx == 0:
            self.validated.append(self.layer.weight.detach().clone())

    def on_validation_epoch_end(self) -> None:
        if not self.trainer.sanity_checking:
            self.log("val_loss", LOSSES[self.current_epoch])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _loader() -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(STEPS_PER_EPOCH * 2, 3, generator=g)
    return DataLoader(TensorDataset(x, x.sum(1)), batch_size=2)


def _fit(tmp_path: Path) -> tuple[Scripted, ValleyWeightAveraging, ModelCheckpoint]:
    torch.manual_seed(0)
    module, swad = Scripted(), ValleyWeightAveraging()
    checkpoint = ModelCheckpoint(dirpath=tmp_path, filename="last-{epoch}", save_top_k=-1)
    trainer = L.Trainer(
        max_epochs=len(LOSSES), callbacks=[swad, checkpoint], logger=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
        default_root_dir=tmp_path,
    )  # fmt: skip
    trainer.fit(module, _loader(), _loader())
    return module, swad, checkpoint


def test_averaging_starts_after_the_first_epoch_whose_validation_loss_does_not_improve(
    tmp_path: Path,
):
    module, swad, _ = _fit(tmp_path)
    assert swad.started and swad.best_loss == pytest.approx(0.8)
    start = 3 * STEPS_PER_EPOCH  # epochs 0-2 trained before the valley was seen
    steps = module.after_step
    assert int(swad._average_model.n_averaged) == len(steps) - start
    average = torch.stack(steps[start:]).mean(0)
    # validation before the valley saw the current weights; after it, the running average
    for epoch in range(3):
        assert torch.equal(module.validated[epoch], steps[(epoch + 1) * STEPS_PER_EPOCH - 1])
    first = torch.stack(steps[start : start + STEPS_PER_EPOCH]).mean(0)
    assert torch.allclose(module.validated[3], first, atol=1e-6)
    assert torch.allclose(module.validated[4], average, atol=1e-6)
    # the end of training ships the average, not the last step
    assert torch.allclose(module.layer.weight, average, atol=1e-6)
    assert not torch.allclose(steps[-1], average, atol=1e-4)


def test_a_loss_that_falls_to_the_end_averages_nothing_and_says_so(
    tmp_path: Path, caplog, monkeypatch
):
    monkeypatch.setattr(sys.modules[__name__], "LOSSES", [1.0, 0.9, 0.8, 0.7, 0.6])
    module, swad, _ = _fit(tmp_path)
    assert not swad.started and int(swad._average_model.n_averaged) == 0
    assert torch.equal(module.layer.weight, module.after_step[-1])  # the last step, untouched
    assert "swad averaged no weights" in caplog.text


def test_checkpoints_hold_the_current_weights_before_the_valley_and_the_average_after(
    tmp_path: Path,
):
    module, _, _ = _fit(tmp_path)
    steps = module.after_step
    early = torch.load(tmp_path / "last-epoch=1.ckpt", weights_only=True)
    assert "averaging_state" not in early
    assert torch.equal(early["state_dict"]["layer.weight"], steps[2 * STEPS_PER_EPOCH - 1])
    late = torch.load(tmp_path / "last-epoch=4.ckpt", weights_only=True)
    average = torch.stack(steps[3 * STEPS_PER_EPOCH :]).mean(0)
    assert torch.allclose(late["state_dict"]["layer.weight"], average, atol=1e-6)
    assert torch.equal(late["current_model_state"]["layer.weight"], steps[-1])
    assert late["callbacks"]["ValleyWeightAveraging"]["started"] is True


def test_resuming_continues_the_same_average(tmp_path: Path):
    """A run interrupted after the valley resumes with its average and start state."""
    whole, swad, _ = _fit(tmp_path / "whole")
    torch.manual_seed(0)
    module, resumed = Scripted(), ValleyWeightAveraging()
    trainer = L.Trainer(
        max_epochs=len(LOSSES), callbacks=[resumed], logger=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, default_root_dir=tmp_path,
    )  # fmt: skip
    trainer.fit(module, _loader(), _loader(), ckpt_path=tmp_path / "whole" / "last-epoch=3.ckpt")
    assert resumed.started and int(resumed._average_model.n_averaged) == int(
        swad._average_model.n_averaged
    )
    assert torch.allclose(module.layer.weight, whole.layer.weight, atol=1e-6)
