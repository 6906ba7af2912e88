"""Tests for medtune.data.synthetic (tiny images so they stay fast)."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medtune.data.synthetic import LESION_SPEC, make_synthetic_dr, synthesize_image
from medtune.errors import MedtuneError

SIZE = 64


def _read_labels(root: Path) -> list[dict[str, str]]:
    with open(root / "labels.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def test_writes_images_labels_and_readme(tmp_path: Path) -> None:
    out = make_synthetic_dr(tmp_path / "demo", n_per_grade=2, size=SIZE, seed=0)
    assert out == tmp_path / "demo"
    rows = _read_labels(out)
    assert list(rows[0]) == ["image", "label"]
    assert sorted(int(r["label"]) for r in rows) == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    assert rows[0]["image"] == "images/g0_0000.png"
    for r in rows:
        img = Image.open(out / r["image"])
        assert img.size == (SIZE, SIZE) and img.mode == "RGB"
    assert "synthetic" in (out / "README.txt").read_text().lower()


def test_deterministic_by_seed(tmp_path: Path) -> None:
    a = make_synthetic_dr(tmp_path / "a", n_per_grade=1, size=32, seed=3)
    b = make_synthetic_dr(tmp_path / "b", n_per_grade=1, size=32, seed=3)
    for name in ("g0_0000.png", "g4_0000.png"):
        assert (a / "images" / name).read_bytes() == (b / "images" / name).read_bytes()
    assert not np.array_equal(synthesize_image(2, 32, 1).image, synthesize_image(2, 32, 2).image)


def test_images_of_same_grade_differ() -> None:
    x, y = synthesize_image(0, SIZE, 10).image, synthesize_image(0, SIZE, 11).image
    assert x.shape == (SIZE, SIZE, 3) and x.dtype == np.uint8
    assert np.abs(x.astype(int) - y.astype(int)).mean() > 5


def test_higher_grades_have_more_lesion_pixels() -> None:
    area = {
        g: np.mean([synthesize_image(g, SIZE, s).lesion_mask.sum() for s in range(3)])
        for g in range(5)
    }
    assert area[0] == 0
    assert 0 < area[1] < area[2] < area[3] < area[4]


def test_counts_follow_spec() -> None:
    for grade, spec in LESION_SPEC.items():
        counts = synthesize_image(grade, 32, grade).counts
        assert set(counts) == set(spec)
        for name, (lo, hi) in spec.items():
            assert lo <= counts[name] <= hi


def test_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        synthesize_image(5)
    with pytest.raises(MedtuneError):
        make_synthetic_dr(tmp_path, n_per_grade=0)
