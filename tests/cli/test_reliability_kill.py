"""Issue 8: real `medtune train` processes killed with SIGKILL, then the same command again.

Each child runs the real CLI with one test-only hook that makes it hang at a chosen point: half of
a feature file or of the first last.ckpt written, or inside a training step of epoch 1. The test
then SIGKILLs it. The rerun must complete, every file left must be whole, and ``splits.csv`` must
not change. (Killing the cache build: test_cache.py::test_sigkill_mid_build_is_safe.)
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_flags, write_graded_images

from medtune.cli.main import main

TINY = tiny_flags(weights=...)

# Runs the real CLI after installing ONE hook chosen by $HOOK; the hook writes $MARKER, then hangs.
_DRIVER = """
import io, os, sys, time
from pathlib import Path

MARKER = Path(os.environ["MARKER"])


def hang():
    MARKER.write_text(str(os.getpid()))
    time.sleep(600)


def torn(data, fh):
    fh.write(data[: len(data) // 2])  # half of the file is on disk when the kill comes
    fh.flush()
    os.fsync(fh.fileno())
    hang()


hook = os.environ["HOOK"]
if hook == "features":  # the second feature array is being saved
    import types
    import numpy
    import medtune.transfer.features as features

    saves = []

    def save(file, arr, *args, **kwargs):
        saves.append(file)
        if len(saves) < 2:
            return numpy.save(file, arr, *args, **kwargs)
        buf = io.BytesIO()
        numpy.save(buf, arr, *args, **kwargs)
        if hasattr(file, "write"):
            torn(buf.getvalue(), file)
        else:
            with open(file, "wb") as fh:
                torn(buf.getvalue(), fh)

    proxy = types.ModuleType("numpy")
    proxy.__dict__.update(numpy.__dict__)
    proxy.save = save
    features.np = proxy
elif hook == "checkpoint":  # the second checkpoint (last.ckpt of epoch 0) is being written
    import torch

    real_save = torch.save
    checkpoints = []

    def save(obj, f, *args, **kwargs):
        if isinstance(obj, dict) and "state_dict" in obj:
            checkpoints.append(f)
        if len(checkpoints) < 2:
            return real_save(obj, f, *args, **kwargs)
        buf = io.BytesIO()
        real_save(obj, buf, *args, **kwargs)
        if hasattr(f, "write"):
            torn(buf.getvalue(), f)
        else:
            with open(f, "wb") as fh:
                torn(buf.getvalue(), fh)

    torch.save = save
elif hook == "step":  # inside a training step of epoch 1
    from medtune.engines.lightning_module import FinetuneModule

    real_step = FinetuneModule.training_step

    def step(self, batch, batch_idx):
        if self.current_epoch >= 1:
            hang()
        return real_step(self, batch, batch_idx)

    FinetuneModule.training_step = step

from medtune.cli.main import main

sys.exit(main(sys.argv[1:]))
"""


def _kill_when_hung(tmp_path: Path, hook: str, argv: list[str]) -> None:
    """Run the CLI with ``hook``; SIGKILL it once it hangs at the hooked point."""
    driver = tmp_path / "driver.py"
    driver.write_text(textwrap.dedent(_DRIVER))
    marker = tmp_path / f"hung-{hook}"
    log = tmp_path / f"{hook}.log"
    env = {**os.environ, "HOOK": hook, "MARKER": str(marker)}
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, str(driver), *argv], stdout=out, stderr=out, env=env
        )
    try:
        deadline = time.time() + 240
        while not marker.exists():
            if proc.poll() is not None:
                pytest.fail(f"exited ({proc.returncode}) before the kill:\n{log.read_text()}")
            assert time.time() < deadline, log.read_text()
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL


def _temp_files(*roots: Path) -> list[Path]:
    return [p for root in roots for p in root.rglob("*") if p.name.endswith(".tmp")]


def _ckpt_epochs(run: Path) -> dict[str, int]:
    """Every checkpoint in the run loads with weights_only=True; their epochs."""
    found = {}
    for path in sorted((run / "checkpoints").glob("*.ckpt")):
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        state = ckpt["state_dict"]
        assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())
        found[path.name] = int(ckpt["epoch"])
    return found


def _fixed_weights(path: Path) -> Path:
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(0)
    save_file(timm.create_model("test_efficientnet").state_dict(), str(path))
    return path


def test_killed_during_feature_extraction_then_rerun(tmp_path: Path, isolated_cache: Path):
    data = write_graded_images(tmp_path / "data", n_per_class=4, size=32)
    run = tmp_path / "probe"
    weights = _fixed_weights(tmp_path / "weights.safetensors")  # the same net in every process
    argv = [
        "train",
        "--data",
        str(data),
        "--out",
        str(run),
        "--strategy",
        "linear-probe",
        "--weights",
        str(weights),
        *TINY,
    ]
    _kill_when_hung(tmp_path, "features", argv)

    (folder,) = {p.parent for p in isolated_cache.rglob("features/*/top_rot0.npy")}
    rot0 = (folder / "top_rot0.npy").read_bytes()
    assert np.load(folder / "top_rot0.npy").shape[0] == 12
    assert sorted(p.name for p in folder.glob("*.npy")) == ["top_rot0.npy"]  # no torn array
    assert _temp_files(folder)  # the torn half went to a temp file
    splits = (run / "splits.csv").read_text()

    assert main(argv) == 0
    assert sorted(p.name for p in folder.glob("*.npy")) == [f"top_rot{k}.npy" for k in range(4)]
    assert (folder / "top_rot0.npy").read_bytes() == rot0  # reused, not recomputed
    assert (run / "splits.csv").read_text() == splits
    assert (run / "metrics.json").is_file() and (run / "model.safetensors").is_file()
    assert _temp_files(isolated_cache, run) == []
    # the array finished by the rerun is what a clean extraction gives
    from medtune.data import open_cache
    from medtune.models import create_backbone
    from medtune.transfer.features import extract_features

    backbone = create_backbone("test_efficientnet", weights=str(weights))
    fresh = extract_features(
        backbone,
        open_cache(folder.parent.parent),
        ["top"],
        rotations=(1,),
        model_id="check",
        bf16=False,
        progress=False,
    )
    np.testing.assert_allclose(np.load(folder / "top_rot1.npy"), fresh[("top", 1)], atol=1e-4)


def test_killed_writing_a_checkpoint_then_mid_epoch_then_resumed(tmp_path: Path, capsys):
    data = write_graded_images(tmp_path / "data", n_per_class=4, size=32)
    run = tmp_path / "ft"
    argv = [
        "train",
        "--data",
        str(data),
        "--out",
        str(run),
        "--strategy",
        "finetune",
        "--weights",
        "none",
        "--epochs",
        "2",
        "--early-stopping",
        "0",
        *TINY,
    ]

    _kill_when_hung(tmp_path, "checkpoint", argv)  # half of the first last.ckpt on disk
    assert _ckpt_epochs(run) == {"best.ckpt": 0}  # no torn last.ckpt
    assert _temp_files(run / "checkpoints")  # the torn half is in a temp file only
    splits = (run / "splits.csv").read_text()
    assert main(["train", "--resume", str(run)]) == 2  # nothing to resume from yet: one line
    assert "no checkpoint to resume from" in capsys.readouterr().err

    _kill_when_hung(tmp_path, "step", argv)  # the same command again, killed mid-epoch 1
    assert _ckpt_epochs(run) == {"best.ckpt": 0, "last.ckpt": 0}
    assert _temp_files(run) == []  # the killed writer's temp file was removed
    assert (run / "splits.csv").read_text() == splits

    assert main(["train", "--resume", str(run)]) == 0
    assert set(_ckpt_epochs(run)) == {"best.ckpt", "last.ckpt"}
    logged = (run / "logs" / "metrics.csv").read_text().splitlines()
    assert any(line.startswith("1,") for line in logged)  # epoch 1 was trained
    assert (run / "splits.csv").read_text() == splits
    assert (run / "metrics.json").is_file() and (run / "model.safetensors").is_file()
    assert _temp_files(run) == []


class _Interrupted(Exception):
    pass


def test_resume_keeps_the_logged_history(tmp_path: Path, monkeypatch):
    from medtune.engines.lightning_module import FinetuneModule

    real_step = FinetuneModule.training_step

    def step(self, batch, batch_idx):
        if self.current_epoch == 1:
            raise _Interrupted
        return real_step(self, batch, batch_idx)

    data = write_graded_images(tmp_path / "data", n_per_class=4, size=32)
    run = tmp_path / "ft"
    monkeypatch.setattr(FinetuneModule, "training_step", step)
    with pytest.raises(_Interrupted):
        main(
            [
                "train",
                "--data",
                str(data),
                "--out",
                str(run),
                "--weights",
                "none",
                "--epochs",
                "2",
                "--early-stopping",
                "0",
                *TINY,
            ]
        )
    monkeypatch.undo()
    assert main(["train", "--resume", str(run)]) == 0
    logged = (run / "logs" / "metrics.csv").read_text().splitlines()
    assert any(line.startswith("0,") for line in logged)  # epoch 0 is still in the log
