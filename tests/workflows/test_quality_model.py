"""A run trained on quality grades can be named as the quality model of `predict`."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import TINY_SETTINGS, write_graded_images
from PIL import Image

from medtune.errors import MedtuneError
from medtune.workflows import predict as predict_mod
from medtune.workflows.train import train

PROBE = {**TINY_SETTINGS, "strategy": "linear-probe", "probe_rotations": False, "progress": False}


def _quality_folders(root):
    rng = np.random.default_rng(0)
    for name, level in (("Good", 200), ("Reject", 10), ("Usable", 120)):
        (root / name).mkdir(parents=True)
        for i in range(10):
            img = np.clip(rng.normal(level, 8, size=(32, 32, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(img).save(root / name / f"{i}.png")
    return root


def test_images_the_quality_model_rejects_are_ungradable(tmp_path, monkeypatch):
    dr = train(write_graded_images(tmp_path / "dr"), out=str(tmp_path / "dr-run"), **PROBE)
    quality = train(_quality_folders(tmp_path / "q"), out=str(tmp_path / "q-run"), **PROBE)
    # the rule-based gate passes everything here, so what is judged is the learned model alone
    monkeypatch.setattr(predict_mod, "assess_image_quality", lambda img: (True, None))
    photos = tmp_path / "photos"
    photos.mkdir()
    Image.fromarray(np.full((32, 32, 3), 10, np.uint8)).save(photos / "dark.png")
    Image.fromarray(np.full((32, 32, 3), 200, np.uint8)).save(photos / "bright.png")
    rows = {
        r["image"].rsplit("/", 1)[-1]: r
        for r in predict_mod.predict(
            [photos], run=dr.dir, quality_model=quality.dir, progress=False
        )
    }
    assert rows["dark.png"]["quality"] == "ungradable"
    assert rows["dark.png"]["quality_reason"].startswith("quality model: Reject (P = ")
    assert rows["bright.png"]["quality"] == "gradable"
    without = predict_mod.predict([photos], run=dr.dir, progress=False)
    assert {r["quality"] for r in without} == {"gradable"}


def test_a_quality_model_needs_a_reject_class(tmp_path):
    dr = train(write_graded_images(tmp_path / "dr"), out=str(tmp_path / "dr-run"), **PROBE)
    with pytest.raises(MedtuneError, match="needs a class named like reject"):
        predict_mod.load_predictor(run=dr.dir, quality_model=dr.dir)
