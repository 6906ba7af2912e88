"""medtune.data.cache.prepare / open_cache and medtune.data.datasets.CachedImageDataset."""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

import medtune.data.cache as cache_mod
import medtune.io as mio
from medtune.data import CachedImageDataset, load_imageset, open_cache, prepare
from medtune.data.fundus import FundusOptions
from medtune.errors import BadImageError, MedtuneError

NO_CROP = FundusOptions(crop=False)


def _dataset(root: Path, n: int = 6, size: int = 16, seed: int = 0) -> Path:
    """``n`` random-noise PNGs of ``size`` px in a labels.csv folder (two classes)."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    lines = ["image,label"]
    for i in range(n):
        arr = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        Image.fromarray(arr).save(root / f"img{i}.png")
        lines.append(f"img{i}.png,{i % 2}")
    (root / "labels.csv").write_text("\n".join(lines) + "\n")
    return root


def _dirs(out: Path) -> list[str]:
    return sorted(p.name for p in out.iterdir() if p.is_dir())


def test_prepare_builds_exact_cache(tmp_path: Path) -> None:
    s = load_imageset(_dataset(tmp_path / "data"))
    c = prepare(s, 16, NO_CROP, tmp_path / "cache", progress=False)
    assert c.images.shape == (6, 16, 16, 3) and c.images.dtype == np.uint8
    assert not c.images.flags.writeable
    assert c.keys == s.keys and c.labels.tolist() == s.labels.tolist()
    assert c.class_names == ["0", "1"] and c.image_size == 16 and len(c) == 6
    assert c.dir == tmp_path / "cache" / c.key and c.skipped == []
    for i in range(6):  # same size + no crop: stored pixels are the source pixels
        assert np.array_equal(c.images[i], np.asarray(s.load(i)))
    assert _dirs(tmp_path / "cache") == [c.key]
    again = open_cache(c.dir)
    assert again.keys == c.keys and np.array_equal(again.images, c.images)


def test_default_options_resize(tmp_path: Path) -> None:
    s = load_imageset(_dataset(tmp_path / "data", n=4, size=20))
    c = prepare(s, 12, None, tmp_path / "cache", progress=False)
    assert c.images.shape == (4, 12, 12, 3)
    assert c.params["fundus"] == FundusOptions().to_dict()
    other = prepare(s, 12, NO_CROP, tmp_path / "cache", progress=False)
    assert other.key != c.key


def test_reuse_does_not_decode(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    s = load_imageset(_dataset(tmp_path / "data"))
    first = prepare(s, 16, NO_CROP, tmp_path / "cache", progress=False)

    def boom(*args: object, **kwargs: object) -> None:
        raise AssertionError("decoded again")

    monkeypatch.setattr(cache_mod, "_process_chunk", boom)
    monkeypatch.setattr(cache_mod, "prepare_image", boom)
    second = prepare(load_imageset(tmp_path / "data"), 16, NO_CROP, tmp_path / "cache")
    assert second.key == first.key and second.dir == first.dir


def test_stale_cache_gets_new_key(tmp_path: Path) -> None:
    root = _dataset(tmp_path / "data")
    first = prepare(load_imageset(root), 16, NO_CROP, tmp_path / "cache", progress=False)
    Image.new("RGB", (16, 16), (9, 8, 7)).save(root / "img2.png")
    st = os.stat(root / "img2.png")
    os.utime(root / "img2.png", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    second = prepare(load_imageset(root), 16, NO_CROP, tmp_path / "cache", progress=False)
    assert second.key != first.key
    assert second.images[2].reshape(-1, 3).tolist()[0] == [9, 8, 7]
    assert np.array_equal(second.images[0], first.images[0])
    relabelled = load_imageset(root, classes=["1", "0"])
    assert prepare(relabelled, 16, NO_CROP, tmp_path / "cache", progress=False).key not in (
        first.key,
        second.key,
    )


def test_bad_image_raises_or_is_skipped(tmp_path: Path) -> None:
    root = _dataset(tmp_path / "data", n=8)
    (root / "img3.png").write_text("not a png")
    s = load_imageset(root)  # existence/size only at load time
    out = tmp_path / "cache"
    with pytest.raises(BadImageError) as info:
        prepare(s, 16, NO_CROP, out, progress=False)
    assert str(root / "img3.png") in str(info.value) and "\n" not in str(info.value)
    assert _dirs(out) == []  # nothing half-built left behind
    c = prepare(s, 16, NO_CROP, out, skip_bad=True, progress=False)
    assert len(c) == 7 and "img3.png" not in c.keys
    assert c.source_indices.tolist() == [0, 1, 2, 4, 5, 6, 7]
    assert c.labels.tolist() == [s.labels[i] for i in c.source_indices]
    assert np.array_equal(c.images[3], np.asarray(s.load(4)))
    assert [d["key"] for d in c.skipped] == ["img3.png"]
    listed = pd.read_csv(c.dir / "skipped.csv")
    assert listed["path"].tolist() == [str(root / "img3.png")]
    assert "not a recognised image" in listed["reason"][0]
    with pytest.raises(BadImageError):  # reusing a cache with skipped images needs skip_bad too
        prepare(s, 16, NO_CROP, out, progress=False)


def test_worker_processes_match_in_process(tmp_path: Path) -> None:
    s = load_imageset(_dataset(tmp_path / "data", n=10))
    a = prepare(s, 8, None, tmp_path / "a", num_workers=2, progress=False)
    b = prepare(s, 8, None, tmp_path / "b", num_workers=0, progress=False)
    assert a.key == b.key and np.array_equal(a.images, b.images)


def test_decoding_threads_match_one_thread_and_report_the_first_bad_image(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = _dataset(tmp_path / "data", n=40)  # 3 chunks of 16: the threads share the work
    s = load_imageset(root)
    built = {}
    for threads in (1, 3):
        monkeypatch.setattr(cache_mod, "_decode_threads", lambda t=threads: t)
        c = prepare(s, 8, None, tmp_path / f"t{threads}", progress=False)
        built[threads] = (np.asarray(c.images).copy(), [c.fov_mask(i) for i in range(len(c))])
    assert np.array_equal(built[1][0], built[3][0])
    assert all(np.array_equal(a, b) for a, b in zip(built[1][1], built[3][1], strict=True))
    for name in ("img37.png", "img20.png", "img2.png"):  # bad in the last, middle, first chunk
        (root / name).write_text("not a png")
    with pytest.raises(BadImageError) as info:  # the first in order, as one thread reports it
        prepare(load_imageset(root), 8, None, tmp_path / "bad", progress=False)
    assert str(root / "img2.png") in str(info.value)


def test_npz_cache(tmp_path: Path) -> None:
    path = tmp_path / "tiny.npz"
    rng = np.random.default_rng(0)
    np.savez(
        path,
        train_images=rng.integers(0, 255, (4, 8, 8), dtype=np.uint8),
        train_labels=[[0], [1], [0], [1]],
        test_images=rng.integers(0, 255, (2, 8, 8), dtype=np.uint8),
        test_labels=[[0], [1]],
    )
    s = load_imageset(path)
    c = prepare(s, 8, NO_CROP, tmp_path / "cache", progress=False)
    assert c.predefined_split == ["train"] * 4 + ["test"] * 2
    with np.load(path) as z:
        assert np.array_equal(c.images[5, :, :, 0], z["test_images"][1])


def test_dead_temp_folders_are_removed(tmp_path: Path) -> None:
    out = tmp_path / "cache"
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    dead = out / f".tmp-0123abcd-{mio.host_name()}-{proc.pid}"
    alive = out / f".tmp-0123abcd-{mio.host_name()}-{os.getppid()}"
    dead.mkdir(parents=True)
    alive.mkdir()
    s = load_imageset(_dataset(tmp_path / "data", n=4))
    prepare(s, 8, NO_CROP, out, progress=False)
    assert not dead.exists() and alive.exists()


def test_lost_rename_race_keeps_winner(tmp_path: Path) -> None:
    s = load_imageset(_dataset(tmp_path / "data", n=4))
    c = prepare(s, 8, NO_CROP, tmp_path / "cache", progress=False)
    loser = tmp_path / "cache" / ".tmp-loser"
    loser.mkdir()
    (loser / "index.json").write_text("{}")
    cache_mod._publish(loser, c.dir)  # the other process won: no error, theirs is kept
    assert open_cache(c.dir).key == c.key


def test_open_cache_incomplete(tmp_path: Path) -> None:
    (tmp_path / "abc").mkdir()
    with pytest.raises(MedtuneError) as info:
        open_cache(tmp_path / "abc")
    assert str(tmp_path / "abc") in str(info.value)


_SLOW_PREPARE = """
import sys, time
import medtune.data.cache as cm
from medtune.data import load_imageset, prepare
from medtune.data.fundus import FundusOptions
real = cm._process_chunk
def slow(*args, **kwargs):
    time.sleep(1.5)
    return real(*args, **kwargs)
cm._process_chunk = slow
prepare(load_imageset(sys.argv[1]), 8, FundusOptions(crop=False), sys.argv[2], progress=False)
"""


def test_sigkill_mid_build_is_safe(tmp_path: Path) -> None:
    root = _dataset(tmp_path / "data", n=40, size=8)
    out = tmp_path / "cache"
    script = tmp_path / "slow.py"
    script.write_text(textwrap.dedent(_SLOW_PREPARE))
    proc = subprocess.Popen([sys.executable, str(script), str(root), str(out)])
    try:
        deadline = time.time() + 30
        while time.time() < deadline and not (out.is_dir() and any(out.glob(".tmp-*/images.npy"))):
            assert proc.poll() is None, "prepare finished before it could be killed"
            time.sleep(0.05)
        time.sleep(1.3)  # first chunk of 16 written, second one in progress
        assert proc.poll() is None
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert _dirs(out) != [] and all(d.startswith(".tmp-") for d in _dirs(out))
    s = load_imageset(root)
    c = prepare(s, 8, NO_CROP, out, progress=False)
    assert _dirs(out) == [c.key]  # the killed build's temp folder is gone
    assert len(c) == 40 and np.array_equal(c.images[39], np.asarray(s.load(39)))


# --------------------------------------------------------------------------- dataset


def test_dataset_rot90_is_exact(tmp_path: Path) -> None:
    s = load_imageset(_dataset(tmp_path / "data", n=4, size=12))
    c = prepare(s, 12, NO_CROP, tmp_path / "cache", progress=False)
    plain = CachedImageDataset(c, [2, 0], rot90=False)
    x, y = plain[0]
    assert x.dtype == torch.uint8 and x.shape == (3, 12, 12) and y == int(c.labels[2])
    original = torch.from_numpy(np.array(c.images[2])).permute(2, 0, 1)
    assert torch.equal(x, original)
    rotations = [torch.rot90(original, k, dims=(1, 2)) for k in range(4)]

    def which(ds: CachedImageDataset, variants: list[torch.Tensor], n: int = 16) -> list[int]:
        out = []
        for _ in range(n):  # the same item, fetched repeatedly (as over epochs)
            img, _ = ds[0]
            matches = [k for k, v in enumerate(variants) if torch.equal(img, v)]
            assert len(matches) == 1  # exactly one rotation: no interpolation
            out.append(matches[0])
        return out

    seq = which(CachedImageDataset(c, [2, 0], rot90=True, seed=0), rotations)
    assert len(set(seq)) >= 3  # varies between fetches without set_epoch
    assert seq == which(CachedImageDataset(c, [2, 0], rot90=True, seed=0), rotations)
    assert len(set(which(CachedImageDataset(c, [2, 0]), rotations))) >= 2  # torch RNG
    aug = CachedImageDataset(c, [2, 0], seed=0)
    aug.set_epoch(3)
    first = aug[0][0]
    aug.set_epoch(3)
    assert torch.equal(aug[0][0], first)  # set_epoch restarts the seeded generator
    flips = CachedImageDataset(c, [2], rot90=False, hflip=True, vflip=True, seed=1)
    variants = [original, original.flip(2), original.flip(1), original.flip(1).flip(2)]
    assert len(set(which(flips, variants))) >= 3


def test_dataset_pickles_and_works_with_dataloader(tmp_path: Path) -> None:
    s = load_imageset(_dataset(tmp_path / "data", n=4, size=8))
    c = prepare(s, 8, NO_CROP, tmp_path / "cache", progress=False)
    ds = CachedImageDataset(c, np.arange(4), rot90=True)
    _ = ds[0]
    clone = pickle.loads(pickle.dumps(ds))
    assert clone._images is None and clone.labels.tolist() == c.labels.tolist()
    loader = torch.utils.data.DataLoader(clone, batch_size=4, num_workers=1)
    batch, labels = next(iter(loader))  # the worker maps the cache file itself
    assert batch.shape == (4, 3, 8, 8) and batch.dtype == torch.uint8
    assert labels.tolist() == c.labels.tolist()


def test_all_images_bad(tmp_path: Path) -> None:
    root = _dataset(tmp_path / "data", n=4)
    for i in range(4):
        (root / f"img{i}.png").write_text("junk")
    with pytest.raises(MedtuneError, match="none of the 4 images"):
        prepare(load_imageset(root), 8, NO_CROP, tmp_path / "cache", skip_bad=True, progress=False)
    assert _dirs(tmp_path / "cache") == []
