"""A killed ``medtune predict`` continues where it stopped (issue 23, item 7).

``predict --out OUT`` keeps a journal of finished batches; ``--resume`` predicts only the
others and writes exactly the rows, in the same order, of an uninterrupted run.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import tiny_flags, write_graded_images
from PIL import Image

import medtune.workflows.predict as predict_module
from medtune.cli.main import main
from medtune.errors import MedtuneError
from medtune.workflows.predict import predict
from medtune.workflows.predict_journal import journal_path

REAL_PREDICT_BATCH = predict_module._predict_batch
N_IMAGES = 40
BATCH = 8  # five batches


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("journal")
    data = write_graded_images(root / "data", n_per_class=6, size=32, classes=3)
    args = ["train", "--data", str(data), "--out", str(root / "run")]
    args += ["--strategy", "linear-probe", "--cache-dir", str(root / "cache"), *tiny_flags()]
    assert main(args) == 0
    return root / "run"


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    for i in range(N_IMAGES):
        pixels = rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"eye{i:03d}.png")
    return folder


class Killed(Exception):
    """Stands in for SIGKILL in-process: nothing after it runs."""


def _counting(monkeypatch, kill_at: int | None = None) -> list[int]:
    calls: list[int] = []

    def counted(batch, predictor, rule):
        if kill_at is not None and len(calls) == kill_at:
            raise Killed
        calls.append(len(batch.names))
        return REAL_PREDICT_BATCH(batch, predictor, rule)

    monkeypatch.setattr(predict_module, "_predict_batch", counted)
    return calls


def test_resume_predicts_only_the_unfinished_batches_and_writes_the_full_rows(
    run, photos, tmp_path, monkeypatch
):
    monkeypatch.setattr(predict_module, "BATCH", BATCH)
    full = tmp_path / "full.csv"
    predict([photos], run=run, out=full, progress=False)
    assert not journal_path(full).exists()  # finished: the journal is gone

    out = tmp_path / "preds.csv"
    _counting(monkeypatch, kill_at=2)  # killed at 40%: two of five batches done
    with pytest.raises(Killed):
        predict([photos], run=run, out=out, progress=False)
    assert not out.exists()  # no torn output
    journal = journal_path(out)
    lines = journal.read_text().splitlines()
    assert len(lines) == 1 + 2  # the header and the two finished batches
    with journal.open("a") as fh:  # the kill tore the third batch's line
        fh.write('{"batch": 2, "rows": [{"image": "eye0')

    calls = _counting(monkeypatch)
    rows = predict([photos], run=run, out=out, progress=False, resume=True)
    assert calls == [BATCH] * 3  # only batches 2, 3 and 4 were predicted
    assert out.read_text() == full.read_text()  # exactly the rows of a full run, same order
    assert [r["image"] for r in rows] == sorted(str(p) for p in photos.glob("*.png"))
    assert not journal.exists()
    meta = json.loads(out.with_suffix(".meta.json").read_text())
    full_meta = json.loads(full.with_suffix(".meta.json").read_text())
    assert meta["model"] == full_meta["model"]
    # the batch verdict of all 40 images, two fifths of them read back from the journal
    assert meta["batch_shift"]["n_images"] == N_IMAGES
    assert meta["batch_shift"] == full_meta["batch_shift"]


def test_a_journal_for_other_images_is_refused_in_one_line(run, photos, tmp_path, monkeypatch):
    monkeypatch.setattr(predict_module, "BATCH", BATCH)
    out = tmp_path / "preds.csv"
    _counting(monkeypatch, kill_at=1)
    with pytest.raises(Killed):
        predict([photos], run=run, out=out, progress=False)
    monkeypatch.undo()
    monkeypatch.setattr(predict_module, "BATCH", BATCH)
    one = sorted(photos.glob("*.png"))[:5]
    with pytest.raises(MedtuneError) as info:
        predict(one, run=run, out=out, progress=False, resume=True)
    msg = str(info.value)
    assert str(journal_path(out)) in msg and "without --resume" in msg and "\n" not in msg
    calls = _counting(monkeypatch)  # without --resume: starts over and predicts everything
    predict([photos], run=run, out=out, progress=False, operating_point="youden")
    assert len(calls) == N_IMAGES // BATCH and not journal_path(out).exists()


def test_resume_without_a_journal_predicts_everything(run, photos, tmp_path, monkeypatch):
    monkeypatch.setattr(predict_module, "BATCH", BATCH)
    calls = _counting(monkeypatch)
    out = tmp_path / "preds.csv"
    predict([photos], run=run, out=out, progress=False, resume=True)
    assert len(calls) == N_IMAGES // BATCH and len(out.read_text().splitlines()) == 1 + N_IMAGES


KILLER = """
import os, signal, sys
import medtune.workflows.predict as p
p.BATCH = 8
original, calls = p._predict_batch, []
def killing(*args):
    if len(calls) == 2:  # two of five batches journalled: SIGKILL, as the OOM killer would
        os.kill(os.getpid(), signal.SIGKILL)
    calls.append(1)
    return original(*args)
p._predict_batch = killing
from medtune.cli.main import main
sys.exit(main(sys.argv[1:]))
"""


def test_sigkilled_cli_predict_resumes_to_the_same_csv(run, photos, tmp_path, monkeypatch):
    """A real SIGKILL of ``medtune predict`` at 40%, then the same command with ``--resume``."""
    monkeypatch.setattr(predict_module, "BATCH", BATCH)
    full, out = tmp_path / "full.csv", tmp_path / "killed.csv"
    predict([photos], run=run, out=full, progress=False)
    argv = ["predict", str(photos), "--run", str(run), "--out", str(out)]
    killed = subprocess.run([sys.executable, "-c", KILLER, *argv], capture_output=True)
    assert killed.returncode == -signal.SIGKILL
    assert not out.exists() and len(journal_path(out).read_text().splitlines()) == 3
    calls = _counting(monkeypatch)
    assert main([*argv, "--resume"]) == 0
    assert len(calls) == 3
    assert out.read_text() == full.read_text()
    assert not journal_path(out).exists()
