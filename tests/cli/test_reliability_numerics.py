"""Issue 8: a NaN / exploding loss stops fine-tuning with one line and keeps the last good ckpt."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import tiny_flags, write_graded_images
from lightning.pytorch.trainer.states import TrainerFn

from medtune.cli.main import main
from medtune.engines.guards import NonFiniteLossGuard, first_non_finite
from medtune.engines.lightning_module import FinetuneModule
from medtune.errors import MedtuneError

FINETUNE = ["--strategy", "finetune", *tiny_flags(epochs=2, early_stopping=0)]


def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch, capsys):
    real_step = FinetuneModule.training_step

    def poisoned_step(self, batch, batch_idx):  # the loss of epoch 1 is NaN
        loss = real_step(self, batch, batch_idx)
        return loss * float("nan") if self.current_epoch == 1 else loss

    monkeypatch.setattr(FinetuneModule, "training_step", poisoned_step)
    data = write_graded_images(tmp_path / "data", n_per_class=4, size=32)
    run = tmp_path / "run"
    code = main(["train", "--data", str(data), "--out", str(run), *FINETUNE])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err
    (line,) = [x for x in err.splitlines() if x.startswith("medtune: error: ")]
    last = run / "checkpoints" / "last.ckpt"
    assert f"{run}: training loss became NaN at epoch 1 step 1;" in line
    assert f"the last good checkpoint {last} is kept" in line and "--lr" in line
    ckpt = torch.load(last, map_location="cpu", weights_only=True)
    assert ckpt["epoch"] == 0 and first_non_finite(ckpt["state_dict"].items()) is None
    assert not (run / "model.safetensors").exists()  # a NaN model is never exported


def test_last_checkpoint_is_refreshed_every_epoch(tmp_path, monkeypatch):
    """--resume continues from the latest epoch, not from the last improvement."""

    def flat_metrics(self, logits, labels):  # the monitored metric never improves
        return {
            "val_loss": 1.0,
            "val_n": float(len(labels)),
            "val_qwk": 0.0,
            "val_balanced_accuracy": 0.5,
        }

    monkeypatch.setattr(FinetuneModule, "_validation_metrics", flat_metrics)
    data = write_graded_images(tmp_path / "data", n_per_class=4, size=32)
    run = tmp_path / "run"
    assert main(["train", "--data", str(data), "--out", str(run), *FINETUNE]) == 0
    last = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert last["epoch"] == 1


# --------------------------------------------------------------------------- the guard itself


def _trainer(tmp_path: Path, *, ckpt_exists: bool = True) -> SimpleNamespace:
    folder = tmp_path / "checkpoints"
    folder.mkdir(exist_ok=True)
    if ckpt_exists:
        (folder / "last.ckpt").write_bytes(b"good")
    from lightning.pytorch.callbacks import ModelCheckpoint

    return SimpleNamespace(
        should_stop=False,
        current_epoch=3,
        global_step=41,
        default_root_dir=str(tmp_path),
        checkpoint_callbacks=[ModelCheckpoint(dirpath=folder)],
        sanity_checking=False,
        state=SimpleNamespace(fn=TrainerFn.FITTING),
        strategy=SimpleNamespace(reduce_boolean_decision=lambda decision, all=True: decision),
    )


@pytest.mark.parametrize(
    "value, shown", [(math.inf, "+inf"), (-math.inf, "-inf"), (math.nan, "NaN")]
)
def test_guard_stops_on_any_non_finite_loss(tmp_path, value, shown):
    trainer = _trainer(tmp_path)
    guard = NonFiniteLossGuard()
    guard.on_before_backward(trainer, None, torch.tensor(2.5))  # finite: nothing happens
    assert not trainer.should_stop
    with pytest.raises(MedtuneError) as err:
        guard.on_before_backward(trainer, None, torch.tensor(value))
    assert trainer.should_stop
    assert f"training loss became {shown} at epoch 3 step 41" in str(err.value)
    assert str(tmp_path / "checkpoints" / "last.ckpt") in str(err.value)


def test_guard_says_when_no_checkpoint_exists_yet(tmp_path):
    with pytest.raises(MedtuneError, match="no checkpoint was written before it"):
        NonFiniteLossGuard().on_before_backward(
            _trainer(tmp_path, ckpt_exists=False), None, torch.tensor(math.nan)
        )


def test_guard_refuses_to_validate_or_save_non_finite_weights(tmp_path):
    """A NaN step can leave finite loss but broken weights: no validation, no checkpoint."""
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    guard = NonFiniteLossGuard()
    trainer = _trainer(tmp_path)
    guard.on_validation_start(trainer, model)
    guard.on_save_checkpoint(trainer, model, {"state_dict": model.state_dict()})
    with torch.no_grad():
        model[0].bias[1] = math.inf
    with pytest.raises(MedtuneError, match="weight 0.bias became NaN or inf at epoch 3"):
        guard.on_validation_start(trainer, model)
    with torch.no_grad():
        model[0].bias[1] = 0.0
        model[1].running_var[0] = math.nan  # a buffer: only the checkpoint holds it
    guard.on_validation_start(trainer, model)
    with pytest.raises(
        MedtuneError, match="weight 1.running_var became NaN or inf; the checkpoint was not written"
    ):
        guard.on_save_checkpoint(trainer, model, {"state_dict": model.state_dict()})
