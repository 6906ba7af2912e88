"""Shared fixtures: tiny labelled image sets made on the fly (no network, no ../shared)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image


def write_graded_images(
    root: Path, n_per_class: int = 8, size: int = 40, classes: int = 3, seed: int = 0
) -> Path:
    """Class folders whose images differ in colour and a blob, so a probe can learn them."""
    rng = np.random.default_rng(seed)
    for c in range(classes):
        folder = root / str(c)
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(n_per_class):
            img = rng.integers(0, 60, size=(size, size, 3), dtype=np.uint8)
            img[..., c % 3] += np.uint8(120)
            y, x = rng.integers(4, size - 12, size=2)
            img[y : y + 8 * (c + 1) // 2 + 2, x : x + 8] = 250
            Image.fromarray(img).save(folder / f"img_{i:03d}.png")
    return root


@pytest.fixture
def graded_folder(tmp_path: Path) -> Path:
    return write_graded_images(tmp_path / "data")


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Prepared caches go to the test's own folder, never to ~/.cache."""
    cache = tmp_path / "medtune-cache"
    monkeypatch.setenv("MEDTUNE_CACHE", str(cache))
    return cache
