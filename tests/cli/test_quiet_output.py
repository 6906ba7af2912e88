"""Issue 16 item 15: quiet, honest output. medtune's progress and results always; Lightning's
INFO lines and library warnings only with -v, and then once."""

from __future__ import annotations

import io
import logging
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from medtune import logs

SRC = Path(__file__).resolve().parents[2] / "src"
TINY = [
    "--strategy",
    "finetune",
    "--epochs",
    "1",
    "--weights",
    "none",
    "--image-size",
    "40",
    "--batch-size",
    "8",
    "--fundus",
    "none",
    "--val-fraction",
    "0.25",
    "--test-fraction",
    "0.25",
    "--precision",
    "32-true",
]
# a tqdm rendering ("Epoch 0: 50%|...| 1/2 [00:01<00:01, 1.2it/s]", "predict: 1batch [...]")
PROGRESS = re.compile(
    r"\[\d\d:\d\d[^\]]*(?:it|batch|img)/s|\?(?:it|batch|img)/s|s/(?:it|batch|img)"
)


@pytest.fixture(autouse=True)
def _restore_logging():
    """configure() changes process-wide logging and warnings; undo it after each test."""
    root = logging.getLogger()
    handlers, level, show = root.handlers[:], root.level, warnings.showwarning
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    warnings.showwarning = show


def _train(tmp_path: Path, name: str, *flags: str) -> tuple[str, str]:
    from conftest import write_graded_images

    data = tmp_path / "data"
    if not data.exists():
        write_graded_images(data, n_per_class=8, size=40)
    env = {**os.environ, "PYTHONPATH": str(SRC), "MEDTUNE_CACHE": str(tmp_path / "cache")}
    env.pop("MLFLOW_TRACKING_URI", None)
    args = [*flags, "train", "--data", str(data), "--out", str(tmp_path / name), *TINY]
    done = subprocess.run(
        [sys.executable, "-m", "medtune.cli.main", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout, done.stderr


def _message_lines(text: str) -> list[str]:
    """Printed lines other than progress-bar redraws (which repeat by design)."""
    return [ln.strip() for ln in text.split("\n") if ln.strip() and not PROGRESS.search(ln)]


def _duplicates(lines: list[str]) -> set[str]:
    return {ln for ln in lines if lines.count(ln) > 1}


def test_training_output_is_quiet_and_verbose_shows_library_lines_once(tmp_path: Path) -> None:
    out, err = _train(tmp_path, "quiet")
    both = out + err
    for chatter in (
        "litlogger",
        "v_num",
        "module(s) in eval mode",
        "eprecat",  # DeprecationWarning / "is deprecated"
        "GPU available",  # Lightning INFO
        "log_every_n_steps",
        "Warning",
    ):
        assert chatter not in both, chatter
    assert not _duplicates(_message_lines(out)) and not _duplicates(_message_lines(err))
    assert "accuracy" in out and "run folder:" in out  # medtune's results are still there
    assert "Epoch 0" in out  # and its training progress

    out_v, err_v = _train(tmp_path, "verbose", "-v")
    lines = _message_lines(out_v + err_v)
    assert sum("GPU available" in ln for ln in lines) == 1
    assert not any(ln.startswith("INFO:") for ln in lines)  # Lightning's own handler is gone
    assert not _duplicates(lines)
    assert "v_num" not in out_v + err_v


def test_route_library_logs_prints_library_info_once_and_only_when_verbose() -> None:
    lib = logging.getLogger("lightning.pytorch.some_module")
    own = logging.StreamHandler(io.StringIO())  # what `import lightning` installs
    logging.getLogger("lightning").addHandler(own)
    for verbose, expected in ((False, 0), (True, 1)):
        stream = io.StringIO()
        logs.configure(verbose, stream=stream)
        lib.info("GPU available: False")
        lib.warning("a real problem")
        printed = stream.getvalue().splitlines()
        assert printed.count("GPU available: False") == expected, verbose
        assert printed.count("a real problem") == 1
    assert own not in logging.getLogger("lightning").handlers
    assert own.stream.getvalue() == ""


def test_library_warnings_hidden_unless_verbose_but_medtune_warnings_shown(tmp_path) -> None:
    shown: list[str] = []
    warnings.showwarning = lambda msg, *a, **k: shown.append(str(msg))
    logs.configure(False, stream=io.StringIO())
    lib_file = str(tmp_path / "site-packages" / "lightning" / "fit_loop.py")
    own_file = str(Path(logs.__file__).parent / "training" / "run.py")
    warnings.showwarning("Found 45 module(s) in eval mode", UserWarning, lib_file, 1)
    warnings.showwarning("medtune's own", UserWarning, own_file, 1)
    assert shown == ["medtune's own"]
    logs.configure(True, stream=io.StringIO())
    warnings.showwarning("Found 45 module(s) in eval mode", UserWarning, lib_file, 1)
    assert shown[-1] == "Found 45 module(s) in eval mode"
    assert logs.is_library_file(lib_file) and not logs.is_library_file(own_file)
