"""End to end: ``medtune.train`` for probes and fine-tuning, the run folder, resume, the preset."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from medtune.config import TrainConfig, apply_preset
from medtune.errors import MedtuneError
from medtune.runs import RunFolder
from medtune.workflows.train import resume, train

TINY = {
    "backbone": "efficientnet_lite0",
    "weights": None,
    "image_size": 48,
    "batch_size": 8,
    "progress": False,
    "fundus": {"crop": False},
    "val_fraction": 0.25,
    "test_fraction": 0.25,
}


def test_linear_probe_run_folder_and_model_match_the_features(graded_folder: Path, tmp_path):
    out = tmp_path / "probe"
    result = train(
        data=str(graded_folder), out=str(out), strategy="linear-probe", precision="32-true", **TINY
    )
    for name in (
        "config.yaml",
        "splits.csv",
        "model.safetensors",
        "model.json",
        "metrics.json",
        "probe.json",
        "val_logits.npz",
    ):
        assert (out / name).is_file(), name
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics) >= {"val", "test"}
    for split in ("val", "test"):
        assert {"n", "accuracy", "balanced_accuracy", "qwk", "macro_auc"} <= set(metrics[split])
    assert metrics["val"]["n"] + metrics["test"]["n"] < 24
    # the saved image-level model gives the same logits as the probe on cached features
    model, card = RunFolder(out).load_model()
    assert card.kind == "probe" and card.class_names == ["0", "1", "2"]
    saved = np.load(out / "val_logits.npz")
    splits = (out / "splits.csv").read_text().splitlines()[1:]
    val_keys = [line.rsplit(",", 1)[0] for line in splits if line.endswith(",val")]
    from medtune.data import load_imageset
    from medtune.data.fundus import FundusOptions, preprocess

    imageset = load_imageset(str(graded_folder))
    index = {k: i for i, k in enumerate(imageset.keys)}
    batch = np.stack(
        [preprocess(imageset.load(index[k]), 48, FundusOptions(crop=False)) for k in val_keys]
    )
    x = torch.from_numpy(batch).permute(0, 3, 1, 2).float() / 255
    spec = card.input_spec
    x = (x - torch.tensor(spec.mean).view(1, 3, 1, 1)) / torch.tensor(spec.std).view(1, 3, 1, 1)
    with torch.no_grad():
        logits = model(x).numpy()
    np.testing.assert_allclose(logits, saved["logits_none"], atol=1e-3, rtol=1e-4)
    assert result.metrics["model"]["strategy"] == "linear-probe"


def test_layer_probe_best_tries_every_stage(graded_folder: Path, tmp_path):
    out = tmp_path / "layer"
    train(
        data=str(graded_folder),
        out=str(out),
        strategy="layer-probe",
        layer="best",
        probe_rotations=False,
        **TINY,
    )
    probe = json.loads((out / "probe.json").read_text())
    stages = [s["stage"] for s in probe["stages"]]
    assert len(stages) == 9 and probe["chosen_stage"] == stages[0]
    assert json.loads((out / "model.json").read_text())["stage"] == probe["chosen_stage"]


def test_unknown_layer_is_a_clear_error(graded_folder: Path, tmp_path):
    with pytest.raises(MedtuneError, match="layer 'nope' is not a stage"):
        train(
            data=str(graded_folder),
            out=str(tmp_path / "x"),
            strategy="layer-probe",
            layer="nope",
            **TINY,
        )


class StopAfterFirstEpoch(Exception):
    pass


def test_finetune_resumes_where_it_stopped(graded_folder: Path, tmp_path, monkeypatch):
    """A run interrupted after epoch 1 continues at epoch 2 with its optimiser and schedule."""
    import lightning as L

    out = tmp_path / "ft"
    settings = dict(
        data=str(graded_folder),
        out=str(out),
        strategy="finetune",
        epochs=2,
        precision="32-true",
        early_stopping=None,
        **TINY,
    )
    original_fit = L.Trainer.fit

    class Interrupt(L.Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            if trainer.current_epoch == 1:  # epoch 0 is done and its last.ckpt written
                raise StopAfterFirstEpoch

    def fit_with_interrupt(self, *args, **kwargs):
        self.callbacks.append(Interrupt())
        return original_fit(self, *args, **kwargs)

    monkeypatch.setattr(L.Trainer, "fit", fit_with_interrupt)
    with pytest.raises(StopAfterFirstEpoch):
        train(**settings)
    monkeypatch.setattr(L.Trainer, "fit", original_fit)
    ckpt = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["epoch"] == 0
    steps_after_first = ckpt["global_step"]
    splits_before = (out / "splits.csv").read_text()

    result = resume(out)
    final = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)
    assert final["epoch"] > ckpt["epoch"]
    assert final["global_step"] == 2 * steps_after_first
    assert (out / "splits.csv").read_text() == splits_before
    assert result.metrics["val"]["n"] > 0
    assert (out / "logs" / "metrics.csv").is_file()


def test_resume_without_a_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(MedtuneError, match="config.yaml: not found"):
        resume(tmp_path / "missing")


def test_seed_preset_is_the_articles_recipe():
    config = apply_preset(TrainConfig(data="x"), "seed")
    assert config.backbone == "googlenet" and config.freeze == 2
    assert config.backbone_lr_mult < 1 and config.rot90 and not config.hflip
    assert config.weight_decay > 0 and config.schedule == "step"


def test_config_round_trip_reruns_the_same_settings(graded_folder: Path, tmp_path):
    out = tmp_path / "probe"
    train(
        data=str(graded_folder),
        out=str(out),
        strategy="linear-probe",
        probe_rotations=False,
        **TINY,
    )
    config = TrainConfig.load(out / "config.yaml")
    assert config.image_size == 48 and config.strategy == "linear-probe"
    assert config.mean is not None and len(config.mean) == 3


@pytest.mark.slow
def test_seed_preset_trains_googlenet_with_its_first_two_stages_frozen(graded_folder, tmp_path):
    from safetensors.torch import load_file

    from medtune.models import create_backbone

    out = tmp_path / "seed"
    settings = {**TINY, "image_size": 64, "precision": "32-true"}
    settings.pop("backbone")
    train(
        data=str(graded_folder),
        out=str(out),
        preset="seed",
        epochs=1,
        aux_logits=True,
        early_stopping=None,
        **settings,
    )
    config = TrainConfig.load(out / "config.yaml")
    assert config.backbone == "googlenet" and config.freeze == 2 and config.preset == "seed"
    trained = load_file(str(out / "model.safetensors"))
    torch.manual_seed(0)
    initial = create_backbone("googlenet", weights=None)
    frozen = [p for s in initial.stages[:2] for p in s.modules]
    changed_later = False
    for name, value in initial.model.state_dict().items():
        key = f"backbone.{name}"
        if any(name.startswith(p + ".") for p in frozen) and "num_batches" not in name:
            assert torch.equal(trained[key], value), name
        elif name.startswith("body.inception5b") and value.is_floating_point():
            changed_later |= not torch.equal(trained[key], value)
    assert changed_later


def test_ema_run_ships_the_averaged_weights_and_records_site_augmentation(
    graded_folder: Path, tmp_path
):
    """With ema, validation, best.ckpt and the shipped model hold the moving average (not the
    last step's weights); augment is stored expanded in config.yaml and runs in training."""
    from safetensors.torch import load_file

    out = tmp_path / "ema"
    result = train(
        data=str(graded_folder), out=str(out), epochs=2, early_stopping=None, ema=0.5,
        augment="colour,jpeg", **TINY,
    )  # fmt: skip
    assert result.config.augment == [
        "brightness",
        "contrast",
        "gamma",
        "colour-temperature",
        "jpeg",
    ]
    saved = TrainConfig.load(out / "config.yaml")
    assert saved.ema == 0.5 and saved.augment == result.config.augment
    ckpt = torch.load(out / "checkpoints" / "best.ckpt", weights_only=True)
    average, current = ckpt["state_dict"], ckpt["current_model_state"]
    head = next(k for k in average if k.endswith("head.weight"))
    assert not torch.allclose(average[head], current[head])
    shipped = load_file(str(out / "model.safetensors"))
    assert torch.allclose(shipped[head.removeprefix("model.")], average[head])


def test_ema_outside_zero_one_is_a_clear_error(graded_folder: Path, tmp_path):
    with pytest.raises(MedtuneError, match="ema 1.5 is not a decay"):
        train(data=str(graded_folder), out=str(tmp_path / "x"), ema=1.5, **TINY)


def test_swad_run_ships_the_checkpointed_average_and_refuses_ema_beside_it(
    graded_folder: Path, tmp_path
):
    """With swad the best checkpoint is either the plain weights (valley not reached when it was
    saved) or the average, and the shipped model is that checkpoint; swad is stored; swad with
    ema is a clear error (both average the weights)."""
    from safetensors.torch import load_file

    out = tmp_path / "swad"
    train(data=str(graded_folder), out=str(out), epochs=6, early_stopping=None, swad=True,
          lr=0.05, **TINY)  # fmt: skip
    assert TrainConfig.load(out / "config.yaml").swad is True
    ckpt = torch.load(out / "checkpoints" / "best.ckpt", weights_only=True)
    shipped = load_file(str(out / "model.safetensors"))
    head = next(k for k in ckpt["state_dict"] if k.endswith("head.weight"))
    assert torch.equal(shipped[head.removeprefix("model.")], ckpt["state_dict"][head])
    last = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["callbacks"]["ValleyWeightAveraging"]["started"]  # this seed's loss turns
    assert last["averaging_state"]["n_averaged"] >= 1
    assert not torch.equal(last["state_dict"][head], last["current_model_state"][head])
    with pytest.raises(MedtuneError, match="swad and ema both average the weights"):
        train(data=str(graded_folder), out=str(tmp_path / "x"), swad=True, ema=0.9, **TINY)


def test_sord_loss_trains_graded_labels_and_refuses_unordered_classes(
    graded_folder: Path, tmp_path
):
    """``loss sord`` changes the trained weights (same seed), is stored in config.yaml, and on
    classes that are not grades is a clear error naming the fix."""
    from safetensors.torch import load_file

    graded, heads = graded_folder, {}
    for loss in ("cross-entropy", "sord"):
        out = tmp_path / loss
        train(data=str(graded), out=str(out), epochs=1, early_stopping=None, loss=loss, **TINY)
        heads[loss] = load_file(str(out / "model.safetensors"))["head.weight"]
        assert TrainConfig.load(out / "config.yaml").loss == loss
    assert not torch.allclose(heads["cross-entropy"], heads["sord"])
    named = tmp_path / "named"
    for i, name in enumerate(("cat", "dog", "fox")):
        shutil.copytree(graded / str(i), named / name)
    with pytest.raises(MedtuneError, match="loss sord needs graded classes.*cross-entropy"):
        train(data=str(named), out=str(tmp_path / "x"), loss="sord", **TINY)


def test_mixstyle_and_dsu_change_training_only_and_are_recorded(graded_folder: Path, tmp_path):
    """MixStyle and DSU change feature statistics while training (the weights differ from a run
    without them, same seed) and are stored in config.yaml; a bad probability or both at once is
    a clear error."""
    from safetensors.torch import load_file

    runs = {}
    for name, p in (("plain", None), ("mixed", 1.0)):
        out = tmp_path / name
        train(data=str(graded_folder), out=str(out), epochs=1, early_stopping=None, mixstyle=p,
              **TINY)  # fmt: skip
        runs[name] = load_file(str(out / "model.safetensors"))
        assert TrainConfig.load(out / "config.yaml").mixstyle == p
    out = tmp_path / "dsu"
    train(data=str(graded_folder), out=str(out), epochs=1, early_stopping=None, dsu=1.0, **TINY)
    runs["dsu"] = load_file(str(out / "model.safetensors"))
    assert TrainConfig.load(out / "config.yaml").dsu == 1.0
    for name in ("mixed", "dsu"):
        assert not torch.allclose(runs["plain"]["head.weight"], runs[name]["head.weight"])
    with pytest.raises(MedtuneError, match="mixstyle 1.5 is not a probability"):
        train(data=str(graded_folder), out=str(tmp_path / "x"), mixstyle=1.5, **TINY)
    with pytest.raises(MedtuneError, match="mixstyle and dsu both replace"):
        train(data=str(graded_folder), out=str(tmp_path / "x"), mixstyle=0.5, dsu=0.5, **TINY)
