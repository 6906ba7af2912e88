"""The run folder and the command line behave as documented (issue 16, items 5, 7, 12-14)."""

from __future__ import annotations

import csv
import json
import os
import shutil
from pathlib import Path

import pytest
from conftest import TINY_SETTINGS, tiny_flags, write_graded_images

from medtune.cli.main import main
from medtune.data import load_imageset
from medtune.errors import MedtuneError
from medtune.runs import RunFolder
from medtune.workflows.evaluate import evaluate
from medtune.workflows.train import train

PROBE = {**TINY_SETTINGS, "strategy": "linear-probe", "probe_rotations": False, "progress": False}


def _error_line(capsys: pytest.CaptureFixture, argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err and "Traceback" not in "\n".join(err)
    return err[-1]


def test_run_folder_works_from_another_directory_and_after_a_move(tmp_path, monkeypatch):
    project = tmp_path / "project"
    write_graded_images(project / "data")
    monkeypatch.chdir(project)
    train("data", out="run", **PROBE)  # paths relative to where train was started
    config = RunFolder(project / "run").read_config()
    assert Path(config.data).is_absolute() and Path(config.out) == (project / "run").resolve()

    monkeypatch.chdir(tmp_path)  # another directory, the run named by its absolute path
    assert evaluate(project / "run", gradcam=False, progress=False).metrics["n"] > 0

    moved = tmp_path / "elsewhere" / "project"
    shutil.move(str(project), str(moved))  # the run moves together with its data
    config = RunFolder(moved / "run").read_config()
    assert Path(config.data) == (moved / "data").resolve()
    assert evaluate(moved / "run", gradcam=False, progress=False).metrics["n"] > 0


def test_prepare_and_train_share_one_cache_layout(tmp_path):
    data = write_graded_images(tmp_path / "data")
    cache = tmp_path / "cache"
    assert main(["prepare", "--data", str(data), "--out", str(cache), "--image-size", "32",
                 "--fundus", "none"]) == 0  # fmt: skip
    prepared = sorted(p.name for p in cache.iterdir() if p.is_dir())
    assert len(prepared) == 1
    built = [(p, p.stat().st_mtime_ns) for p in (cache / prepared[0]).iterdir()]
    argv = ["train", "--data", str(data), "--out", str(tmp_path / "run"), "--cache-dir",
            str(cache), "--strategy", "linear-probe", "--no-probe-rotations",
            *tiny_flags()]  # fmt: skip
    assert main(argv) == 0
    assert sorted(p.name for p in cache.iterdir() if p.is_dir()) == prepared  # reused, not rebuilt
    assert all(p.stat().st_mtime_ns == t for p, t in built)


def test_resume_extends_a_finished_run_or_refuses_in_one_line(tmp_path, capsys):
    data = write_graded_images(tmp_path / "data")
    run = tmp_path / "ft"
    base = ["train", "--data", str(data), "--out", str(run), "--strategy", "finetune"]
    assert main([*base, *tiny_flags(epochs=1, early_stopping=0)]) == 0
    # a finished run resumed again (a scheduler's retry) has nothing left to do: exit 0
    assert main(["train", "--resume", str(run)]) == 0
    assert "nothing left to do" in capsys.readouterr().err
    line = _error_line(capsys, ["train", "--resume", str(run), "--epochs", "2", "--lr", "0.1"])
    assert "--lr" in line and "ignores" in line

    assert main(["train", "--resume", str(run), "--epochs", "2"]) == 0
    line = _error_line(capsys, ["train", "--resume", str(run), "--epochs", "1"])
    assert "more than 2" in line
    with (run / "logs" / "metrics.csv").open(newline="") as fh:
        epochs = {row["epoch"] for row in csv.DictReader(fh)} - {""}  # "": step rows
    assert epochs == {"0", "1"}, "the second epoch was trained and logged after the first"
    assert RunFolder(run).read_config().epochs == 2


def test_validation_set_lacking_a_class_is_loaded_with_the_training_classes(tmp_path):
    train_dir = write_graded_images(tmp_path / "train", classes=3)
    val_dir = write_graded_images(tmp_path / "val", classes=2, seed=1)  # classes 0 and 1 only
    result = train(train_dir, out=str(tmp_path / "run"), val_data=str(val_dir), **PROBE)
    assert result.metrics["val"]["class_names"] == ["0", "1", "2"]
    assert result.metrics["val"]["classes_absent"] == ["2"]


def test_already_split_folders_are_used_as_the_splits(tmp_path):
    root = tmp_path / "kaggle"
    write_graded_images(root / "train", n_per_class=8)
    write_graded_images(root / "valid", n_per_class=3, seed=1)
    write_graded_images(root / "test", n_per_class=3, seed=2)
    imageset = load_imageset(root)
    assert imageset.class_names == ["0", "1", "2"]  # not "train", "valid", "test"
    assert sorted(set(imageset.predefined_split)) == ["test", "train", "val"]
    result = train(root, out=str(tmp_path / "run"), **PROBE)
    splits = (tmp_path / "run" / "splits.csv").read_text()
    assert "valid/0/img_000.png,val" in splits and "train/2/img_007.png,train" in splits
    assert result.metrics["test"]["n"] == 9


def test_metrics_json_is_read_back(tmp_path):
    data = write_graded_images(tmp_path / "data")
    train(data, out=str(tmp_path / "run"), **PROBE)
    metrics = RunFolder(tmp_path / "run").read_metrics()
    assert json.loads((tmp_path / "run" / "metrics.json").read_text()) == metrics


def test_a_run_written_before_a_setting_existed_keeps_what_it_trained_with(tmp_path: Path) -> None:
    """config.yaml of an older run lacks augment and ema: reading it (resume, evaluate) must
    give what that run trained with (none), not today's default (site augmentation)."""
    import yaml

    from medtune.config import TrainConfig

    folder = RunFolder(tmp_path / "old")
    folder.dir.mkdir()
    settings = {k: v for k, v in TrainConfig(data=str(tmp_path)).to_dict().items()
                if k not in ("augment", "ema")}  # fmt: skip
    folder.config_path.write_text(yaml.safe_dump({**settings, "out": str(folder.dir)}))
    config = folder.read_config()
    assert config.augment == [] and config.ema is None
    assert TrainConfig().augment == ["site"]  # a new run gets site augmentation


def test_evaluation_files_are_named_by_the_run_folder(tmp_path: Path) -> None:
    folder = RunFolder(tmp_path)
    assert folder.latest_eval_metrics() is None
    old = folder.write_eval_metrics("old", {"n": 1})
    new = folder.write_eval_metrics("new", {"n": 2})
    assert old == tmp_path / "eval" / "old" / "metrics.json" and json.loads(old.read_text()) == {
        "n": 1
    }
    newer = new.stat().st_mtime + 5
    os.utime(new, (newer, newer))
    assert folder.latest_eval_metrics() == ("new", {"n": 2})
    new.write_text("{not json")  # an unreadable newest evaluation falls back to none
    assert folder.latest_eval_metrics() is None
    quality = folder.write_eval_quality("new", {"n_ungradable": 0})
    assert quality.parent == new.parent and quality.name == "quality.json"
    assert folder.export_dir == tmp_path / "export"
    assert folder.metrics_path == tmp_path / "metrics.json"
    with pytest.raises(MedtuneError, match="plain folder name"):
        folder.write_eval_metrics("../x", {})
