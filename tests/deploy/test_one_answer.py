"""One model, one answer: `predict --run` and the exported ONNX model give the same
probabilities and grades, for a fine-tuned and for a probe run (issue 16, item 10)."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import TINY_SETTINGS, write_graded_images

from medtune.workflows.export import export
from medtune.workflows.predict import predict
from medtune.workflows.train import train


@pytest.mark.parametrize("strategy", ["finetune", "linear-probe"])
def test_predict_run_and_onnx_agree(tmp_path, strategy):
    data = write_graded_images(tmp_path / "data", n_per_class=10)
    extra = {"epochs": 1, "early_stopping": None} if strategy == "finetune" else {}
    settings = {**TINY_SETTINGS, "precision": "bf16-mixed"}  # the default training precision
    run = train(data, out=str(tmp_path / strategy), strategy=strategy, progress=False,
                **settings, **extra)  # fmt: skip
    onnx = export(run.dir, "onnx")
    by_run = predict([data], run=run.dir, progress=False)
    by_onnx = predict([data], model_path=onnx.model_path, progress=False)
    assert [r["image"] for r in by_run] == [r["image"] for r in by_onnx]
    probs = [[k for k in row if k.startswith("p_")] for row in by_run[:1]][0]
    a = np.array([[r[k] for k in probs] for r in by_run])
    b = np.array([[r[k] for k in probs] for r in by_onnx])
    assert np.abs(a - b).max() < 1e-4
    assert [r["grade"] for r in by_run] == [r["grade"] for r in by_onnx]
    # the export carries the run's site-shift model: the same score for every image
    assert onnx.site_shift_path is not None and onnx.card.site_shift.threshold > 0
    shift = np.array([[r["site_shift"] for r in rows] for rows in (by_run, by_onnx)])
    assert np.allclose(shift[0], shift[1], rtol=1e-3)
    assert [r["outside_training"] for r in by_run] == [r["outside_training"] for r in by_onnx]
