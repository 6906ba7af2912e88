"""``medtune advise`` and ``--strategy auto`` on a tiny set with the real Lite0 weights."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from medtune.cli.main import main
from medtune.config import TrainConfig
from medtune.workflows.advise import advise, natural_photos, reference_similarity
from medtune.workflows.train import train

SMALL = {"image_size": 64, "fundus": {"crop": False}, "progress": False}


def test_advise_measures_every_stage_and_explains_its_choice(graded_folder: Path, tmp_path):
    json_path = tmp_path / "advice.json"
    report = advise(
        str(graded_folder),
        config=TrainConfig(data=str(graded_folder), **SMALL),
        json_path=json_path,
    )
    advice = json.loads(json_path.read_text())
    assert advice["scenario"] in (1, 2, 3, 4)
    assert advice["strategy"] in ("linear-probe", "layer-probe", "finetune")
    assert {"stage", "freeze", "reasons"} <= set(advice)
    assert {"size", "similarity", "scenario"} <= set(advice["reasons"])
    # 24 images is small: a probe scenario (1 or 3), never full fine-tuning
    assert advice["scenario"] in (1, 3)
    stages = report.best.stages
    assert [s["stage"] for s in stages][0] == "stem" and len(stages) == 9
    assert all(np.isfinite(s["logme"]) and 0 <= s["probe"] <= 1 or s["probe"] < 0 for s in stages)
    sim = report.best.similarity
    assert 0 < sim["entropy"] <= 1 and 0 < sim["reference_entropy"] <= 1
    assert sim["nce"] <= 0 and sim["leep"] <= 0


def test_imagenet_head_is_more_certain_on_natural_photos_than_on_noise_like_images():
    from medtune.models import create_backbone

    backbone = create_backbone("efficientnet_lite0")
    entropy, max_prob = reference_similarity(backbone, 224)
    assert len(natural_photos()) == 16
    assert entropy < 0.5 and max_prob > 0.3


def test_strategy_auto_records_and_runs_the_advice(graded_folder: Path, tmp_path, capsys):
    out = tmp_path / "auto"
    result = train(
        data=str(graded_folder),
        out=str(out),
        strategy="auto",
        batch_size=8,
        epochs=1,
        val_fraction=0.25,
        test_fraction=0.25,
        **SMALL,
    )
    advice = json.loads((out / "advice.json").read_text())
    assert result.config.strategy == advice["advice"]["strategy"]
    assert result.metrics["model"]["strategy"] == advice["advice"]["strategy"]
    assert (
        main(["advise", "--data", str(graded_folder), "--image-size", "64", "--fundus", "none"])
        == 0
    )
    assert "recommendation: scenario" in capsys.readouterr().out
