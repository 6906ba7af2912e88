"""DDP through Lightning: two CPU processes (gloo) running the real CLI, and the pieces it needs.

The two-process runs start ``python -m medtune.cli.main train --accelerator cpu --devices 2``;
Lightning re-executes that command for rank 1 (the cache and splits rank 0 made are reused).
``MEDTUNE_RECORD_SAMPLES=1`` makes each rank list the train positions it saw in ``RUN/debug/``.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml
from conftest import write_graded_images
from safetensors.torch import load_file

from medtune.config import FinetuneRecipe, InputSpec
from medtune.data import Part
from medtune.engines.datamodule import CacheDataModule
from medtune.engines.lightning_module import FinetuneModule
from medtune.models import TransferModel, create_backbone
from medtune.runs.data import prepare_lock
from medtune.workflows.train import train

LAUNCHER_ENV = {"RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "NODE_RANK"}
TINY = dict(
    weights="default",
    image_size=48,
    fundus="none",
    val_fraction=0.3,
    test_fraction=0.2,
    precision="32-true",
    accelerator="cpu",
    early_stopping=0,
)


def flags(**values: object) -> list[str]:
    """``flags(batch_size=3)`` -> ``["--batch-size", "3"]``."""
    return [a for k, v in values.items() for a in (f"--{k.replace('_', '-')}", str(v))]


def run_cli(*args: str, cwd: Path, torchrun: bool = False) -> subprocess.CompletedProcess:
    """``medtune train ARGS`` in a fresh interpreter (or two, started by torchrun), outside any
    SLURM job or torchrun the tests themselves may run in."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("SLURM_", "MASTER_", "TORCHELASTIC_")) and k not in LAUNCHER_ENV
    }
    env["MEDTUNE_RECORD_SAMPLES"] = "1"
    torchrun_args = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    launcher = [sys.executable, *(torchrun_args if torchrun else [])]
    cmd = [*launcher, "-m", "medtune.cli.main", "train", *args]
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc


def split_rows(run: Path) -> dict[str, int]:
    with open(run / "splits.csv", newline="") as fh:
        splits = [row["split"] for row in csv.DictReader(fh)]
    return {name: splits.count(name) for name in ("train", "val", "test")}


def positions(run: Path, rank: int) -> dict[int, list[int]]:
    """``{epoch: [train positions]}`` recorded by one rank."""
    out: dict[int, list[int]] = {}
    for line in (run / "debug" / f"train_positions_rank{rank}.txt").read_text().splitlines():
        epoch, pos = map(int, line.split())
        out.setdefault(epoch, []).append(pos)
    return out


def logged(run: Path, key: str) -> list[float]:
    with open(run / "logs" / "metrics.csv", newline="") as fh:
        return [float(row[key]) for row in csv.DictReader(fh) if row.get(key)]


def stage_keys(backbone, stages: range) -> list[str]:
    """State-dict keys (parameters and BatchNorm buffers) of the given backbone stages."""
    prefixes = [m for i in stages for m in backbone.stages[i].modules]
    return [
        k
        for k in backbone.model.state_dict()
        if any(k == p or k.startswith(p + ".") for p in prefixes)
    ]


def test_two_process_ddp_run_shards_counts_freezes_and_resumes(tmp_path: Path):
    data = write_graded_images(tmp_path / "data")
    run = tmp_path / "run"
    # 12 train images, 3 per batch on each of 2 processes; 7 validation images (an odd number, so
    # the distributed sampler pads one process and the gathered predictions must be de-duplicated)
    args = flags(data=data, out=run, devices=2, batch_size=3, epochs=2, head_epochs=1, freeze=2)
    run_cli(*args, *flags(**TINY), cwd=tmp_path)
    rows = split_rows(run)
    assert rows["train"] == 12 and rows["val"] == 7

    # each epoch, the two processes trained on disjoint halves covering the whole train split
    seen = [positions(run, 0), positions(run, 1)]
    for epoch in (0, 1):
        a, b = seen[0][epoch], seen[1][epoch]
        assert len(a) == len(b) == 6 and not set(a) & set(b)
        assert sorted(a + b) == list(range(12))

    # every validation image counted exactly once, in the logs and in metrics.json
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["val"]["n"] == rows["val"] and metrics["test"]["n"] == rows["test"]
    assert logged(run, "val_n") == [rows["val"]] * 2

    # the frozen stages (weights and BatchNorm statistics) are exactly the pretrained ones;
    # the rest of the body trained once the head epoch was over
    pretrained = create_backbone("efficientnet_lite0", weights="default")
    initial = pretrained.model.state_dict()
    saved = load_file(str(run / "model.safetensors"))
    frozen = stage_keys(pretrained, range(2))
    assert frozen and all(torch.equal(saved[f"backbone.{k}"], initial[k]) for k in frozen)
    trained = [k for k in stage_keys(pretrained, range(2, 9)) if k.endswith("weight")]
    assert any(not torch.equal(saved[f"backbone.{k}"], initial[k]) for k in trained)

    # resume under torchrun (both ranks start at once): one more epoch from last.ckpt
    first = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert first["epoch"] == 1 and first["global_step"] == 4
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["devices"] == 2
    config["epochs"] = 3
    (run / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    run_cli("--resume", str(run), cwd=tmp_path, torchrun=True)
    final = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert final["global_step"] == 6
    assert final["epoch"] > first["epoch"]  # one more epoch (2 steps) on top of the first two
    a, b = positions(run, 0)[2], positions(run, 1)[2]
    assert sorted(a + b) == list(range(12))
    assert json.loads((run / "metrics.json").read_text())["val"]["n"] == rows["val"]


def test_one_and_two_processes_agree_with_the_same_global_batch(tmp_path: Path):
    """1 process x 12 images and 2 processes x 6 images per step give the same run.

    Everything but the head is frozen so that no BatchNorm layer normalises with batch statistics
    (those are per process: 6 images instead of 12, a small real difference, see
    docs/scaling.md); augmentation and dropout are off. What is left differs only by the order of
    floating-point sums: tolerance 1e-4 on the validation loss, equal accuracy and kappa.
    """
    data = write_graded_images(tmp_path / "data")
    same = dict(freeze=9, epochs=2, dropout=0, seed=3)
    two, one = tmp_path / "two", tmp_path / "one"
    args = flags(data=data, out=two, devices=2, batch_size=6, **same, **TINY)
    run_cli(*args, "--no-rot90", "--augment", "none", cwd=tmp_path)
    api = {**TINY, "fundus": {"crop": False}, "early_stopping": None, "progress": False}
    train(data=str(data), out=str(one), devices=1, batch_size=12, rot90=False, augment=[], **same,
          **api)  # fmt: skip
    assert (one / "splits.csv").read_text() == (two / "splits.csv").read_text()
    np.testing.assert_allclose(logged(one, "val_loss"), logged(two, "val_loss"), atol=1e-4)
    assert logged(one, "val_accuracy") == logged(two, "val_accuracy")
    assert logged(one, "val_n") == logged(two, "val_n") == [7.0, 7.0]
    m1, m2 = (json.loads((r / "metrics.json").read_text())["val"] for r in (one, two))
    for key in ("n", "accuracy", "qwk"):
        assert m1[key] == pytest.approx(m2[key], abs=1e-6), key
    h1, h2 = (load_file(str(r / "model.safetensors"))["head.weight"] for r in (one, two))
    torch.testing.assert_close(h1, h2, atol=1e-5, rtol=0)


# ------------------------------------------------------------------ the pieces, in one process


@pytest.fixture(scope="module")
def lite0():
    return create_backbone("efficientnet_lite0", weights=None)


def make_module(backbone, **recipe) -> FinetuneModule:
    return FinetuneModule(
        TransferModel(backbone, 3),
        FinetuneRecipe(**recipe),
        spec=InputSpec(32, (0.5,) * 3, (0.25,) * 3),
    )


def test_frozen_norms_are_found_again_after_sync_batchnorm_conversion(lite0):
    module = make_module(lite0, freeze=2)
    torch.nn.SyncBatchNorm.convert_sync_batchnorm(module)  # what --sync-batchnorm does under DDP
    norms = module.frozen_norms
    assert norms and all(isinstance(bn, torch.nn.SyncBatchNorm) for bn in norms)
    module.train()
    assert not any(bn.training for bn in norms)


def test_head_epochs_hold_the_whole_body_in_eval_then_release_it(lite0):
    module = make_module(lite0, head_epochs=1, freeze=1)
    module._trainer = SimpleNamespace(current_epoch=0)  # what Lightning attaches during fit
    module.on_train_epoch_start()
    assert module.model.head.training and not module.model.backbone.training
    module._trainer.current_epoch = 1
    module.on_train_epoch_start()
    assert module.model.backbone.training
    assert module.frozen_norms and not any(bn.training for bn in module.frozen_norms)


def test_train_batches_are_per_process_and_never_all_dropped(tmp_path: Path):
    from medtune.data import load_imageset, prepare

    cache = prepare(
        load_imageset(str(write_graded_images(tmp_path / "d", 4))),
        16,
        None,
        tmp_path / "c",
        progress=False,
    )
    part = Part(cache, np.arange(12))
    dm = CacheDataModule(part, part, batch_size=8)
    assert dm.train_dataloader().drop_last  # one process: 12 images, a ragged batch of 4 dropped
    dm.trainer = SimpleNamespace(world_size=2, global_rank=1)
    loader = dm.train_dataloader()
    assert not loader.drop_last  # two processes get 6 each: a short batch, not none at all
    images, labels, pos = next(iter(loader))
    assert images.dtype == torch.uint8 and len(labels) == len(pos) == 8


def test_prepare_lock_lets_one_process_at_a_time_through(tmp_path: Path):
    events: list[str] = []

    def other() -> None:
        with prepare_lock(tmp_path):
            events.append("other")

    with prepare_lock(tmp_path):
        thread = threading.Thread(target=other)
        thread.start()
        time.sleep(0.3)
        events.append("first done")
    thread.join(10)
    assert events == ["first done", "other"]
