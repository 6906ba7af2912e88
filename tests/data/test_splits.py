"""medtune.data.splits: stratified group splits and splits.csv."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from medtune.data import load_imageset, make_splits, read_splits, write_splits
from medtune.errors import MedtuneError


def _fake(n: int, n_classes: int = 3, groups: list[str] | None = None) -> SimpleNamespace:
    labels = np.arange(n) % n_classes
    return SimpleNamespace(labels=labels, groups=groups, predefined_split=None, keys=None)


def test_fractions_stratified_and_deterministic() -> None:
    data = _fake(300)
    a = make_splits(data, val=0.15, test=0.15, seed=3)
    assert set(a) == {"train", "val", "test"} and len(a) == 300
    for name, lo, hi in (("train", 0.65, 0.75), ("val", 0.1, 0.2), ("test", 0.1, 0.2)):
        frac = float(np.mean(a == name))
        assert lo <= frac <= hi, (name, frac)
        counts = np.bincount(data.labels[a == name], minlength=3)
        assert counts.max() - counts.min() <= 2  # stratified
    assert np.array_equal(a, make_splits(data, val=0.15, test=0.15, seed=3))
    assert not np.array_equal(a, make_splits(data, val=0.15, test=0.15, seed=4))


def test_groups_never_cross_splits() -> None:
    groups = [f"p{i // 3}" for i in range(240)]
    data = _fake(240, groups=groups)
    splits = make_splits(data, seed=1)
    for g in set(groups):
        assert len({splits[i] for i in range(240) if groups[i] == g}) == 1


def test_patient_eyes_stay_together_from_labels_csv(tmp_path: Path) -> None:
    lines = ["image,label,patient_id"]
    for p in range(20):
        for eye in ("left", "right"):
            name = f"{p}_{eye}.png"
            Image.new("RGB", (4, 4), (p, 0, 0)).save(tmp_path / name)
            lines.append(f"{name},{(p + (eye == 'left')) % 2},{p}")
    (tmp_path / "labels.csv").write_text("\n".join(lines) + "\n")
    s = load_imageset(tmp_path)
    splits = make_splits(s, val=0.2, test=0.2, seed=0)
    for p in range(20):
        left, right = s.keys.index(f"{p}_left.png"), s.keys.index(f"{p}_right.png")
        assert splits[left] == splits[right]
    assert set(splits) == {"train", "val", "test"}


def test_no_test_split() -> None:
    splits = make_splits(_fake(60), val=0.2, test=0)
    assert set(splits) == {"train", "val"}


def test_predefined_split_returned() -> None:
    split = ["train", "val", "test"]
    data = SimpleNamespace(labels=np.array([0, 1, 0]), groups=None, predefined_split=split)
    assert make_splits(data).tolist() == ["train", "val", "test"]


def test_bad_fractions() -> None:
    with pytest.raises(MedtuneError):
        make_splits(_fake(30), val=0.6, test=0.5)


def test_write_read_roundtrip(tmp_path: Path) -> None:
    keys = ["a.png", "b.png", "é.png"]
    path = tmp_path / "run" / "splits.csv"
    write_splits(path, keys, np.array(["train", "val", "test"]))
    assert path.read_text(encoding="utf-8").splitlines()[0] == "image,split"
    back = read_splits(path, ["é.png", "a.png", "b.png"])
    assert back.tolist() == ["test", "train", "val"]


@pytest.mark.parametrize("keys", [["a.png", "b.png"], ["a.png", "b.png", "c.png", "d.png"]])
def test_read_splits_mismatch(tmp_path: Path, keys: list[str]) -> None:
    path = tmp_path / "splits.csv"
    write_splits(path, ["a.png", "b.png", "c.png"], ["train", "train", "val"])
    with pytest.raises(MedtuneError) as info:
        read_splits(path, keys)
    msg = str(info.value)
    assert str(path) in msg and "\n" not in msg and "delete" in msg


def test_read_splits_bad_value(tmp_path: Path) -> None:
    path = tmp_path / "splits.csv"
    path.write_text("image,split\na.png,training\n")
    with pytest.raises(MedtuneError, match="training"):
        read_splits(path, ["a.png"])
