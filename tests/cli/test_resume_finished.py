"""``train --resume RUN`` is idempotent: retrying a finished run exits 0 (issue 23, item 9).

A job killed just after its run completed and retried by a scheduler must not fail; a run killed
after its last epoch but before its results were written gets them written; ``--epochs N`` still
extends; other flags with ``--resume`` are still refused in one line.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import tiny_flags, write_graded_images

from medtune.cli.main import main


@pytest.fixture
def finished_run(tmp_path: Path, capsys) -> Path:
    data = write_graded_images(tmp_path / "data", n_per_class=6, size=32)
    run = tmp_path / "run"
    argv = ["train", "--data", str(data), "--out", str(run), "--strategy", "finetune"]
    assert main([*argv, "--epochs", "1", *tiny_flags()]) == 0
    capsys.readouterr()
    return run


def _mtimes(run: Path) -> dict[str, int]:
    names = ("metrics.json", "model.safetensors", "model.json", "checkpoints/last.ckpt")
    return {n: (run / n).stat().st_mtime_ns for n in names}


def test_resume_of_a_finished_run_exits_0_and_changes_nothing(finished_run: Path, capsys):
    before = _mtimes(finished_run)
    metrics = json.loads((finished_run / "metrics.json").read_text())
    for _ in range(2):  # a scheduler may retry more than once
        assert main(["train", "--resume", str(finished_run)]) == 0
        err = capsys.readouterr().err
        assert "nothing left to do" in err and "Traceback" not in err
        assert _mtimes(finished_run) == before  # no retraining, no rewritten results
    assert json.loads((finished_run / "metrics.json").read_text()) == metrics
    # the run's own total given again is the same request: still nothing to do
    assert main(["train", "--resume", str(finished_run), "--epochs", "1"]) == 0
    assert _mtimes(finished_run) == before


def test_resume_after_a_kill_between_last_epoch_and_results(finished_run: Path, capsys):
    (finished_run / "metrics.json").unlink()  # killed while finalising: no results yet
    assert main(["train", "--resume", str(finished_run)]) == 0
    capsys.readouterr()
    assert json.loads((finished_run / "metrics.json").read_text())["val"]["n"] > 0
    last = torch.load(finished_run / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["epoch"] == 0  # no epoch was added


def test_resume_with_epochs_still_extends_and_other_flags_are_refused(finished_run, capsys):
    assert main(["train", "--resume", str(finished_run), "--epochs", "2"]) == 0
    capsys.readouterr()
    last = torch.load(finished_run / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["epoch"] == 1
    assert main(["train", "--resume", str(finished_run), "--epochs", "2"]) == 0  # idempotent
    assert "nothing left to do" in capsys.readouterr().err
    assert main(["train", "--resume", str(finished_run), "--epochs", "1"]) == 2  # fewer: no
    assert "done already" in capsys.readouterr().err
    assert main(["train", "--resume", str(finished_run), "--lr", "0.1"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--lr" in err and len(err.splitlines()) == 1


def test_a_config_edited_to_more_epochs_is_not_finished(finished_run: Path, capsys):
    """Editing RUN/config.yaml to more epochs and resuming trains them (not "nothing to do")."""
    import yaml

    config = yaml.safe_load((finished_run / "config.yaml").read_text())
    config["epochs"] = 2
    (finished_run / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    assert main(["train", "--resume", str(finished_run)]) == 0
    assert "nothing left to do" not in capsys.readouterr().err
    last = torch.load(finished_run / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["epoch"] == 1
