"""The one inference engine (issue 24): every answer after training comes from the run's fp32 ONNX
graph (RUN/model.onnx); PyTorch and the export give the same grades and referral decisions."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import train_tiny_dr_run

from medtune.deploy.engine import DIGEST_KEY, run_scorer, weights_digest
from medtune.deploy.onnx_predictor import OnnxPredictor
from medtune.evaluation.inference import TorchScorer
from medtune.evaluation.scoring import logits_per_tta
from medtune.runs import RunFolder
from medtune.workflows.export import export
from medtune.workflows.predict import predict


@pytest.fixture(scope="module")
def dr_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_tiny_dr_run(tmp_path_factory.mktemp("engine"))


def _columns(rows: list[dict]) -> tuple[np.ndarray, list, list]:
    names = [k for k in rows[0] if k.startswith("p_")]
    probs = np.array([[r[k] for k in names] for r in rows], dtype=float)
    return probs, [r["grade"] for r in rows], [r["refer"] for r in rows]


def test_training_writes_the_graph_of_its_weights(dr_run: Path) -> None:
    folder = RunFolder(dr_run)
    graph = folder.path(RunFolder.ENGINE)
    assert graph.is_file()
    scorer = run_scorer(folder)
    assert isinstance(scorer, OnnxPredictor)  # the saved graph, no PyTorch model built
    assert scorer.metadata[DIGEST_KEY] == weights_digest(folder.path(RunFolder.MODEL_WEIGHTS))
    assert scorer.site_shift is not None  # the run's site-shift model rides along
    metrics = folder.read_metrics()
    assert metrics["model"]["engine"] == "onnx"


def test_every_engine_gives_the_same_answer(dr_run: Path, tmp_path: Path) -> None:
    data = dr_run.parent / "data"
    onnx = export(dr_run, "onnx", out=tmp_path / "export")
    answers = [
        _columns(predict([data], run=dr_run, progress=False)),
        _columns(predict([data], run=dr_run, progress=False, engine="torch")),
        _columns(predict([data], model_path=onnx.model_path, progress=False)),
    ]
    ref = answers[0]
    assert ref[2] and set(ref[2]) <= {"yes", "no", "ungradable"}
    for probs, grades, refer in answers[1:]:
        assert np.abs(probs - ref[0]).max() < 1e-3
        assert grades == ref[1] and refer == ref[2]


def test_a_stale_graph_is_never_used(dr_run: Path, tmp_path: Path) -> None:
    """Weights changed after the graph was written (e.g. copied over by hand): the run is
    exported again in memory, so the answer is the new weights', and nothing is written."""
    import torch
    from safetensors.torch import load_file, save_file

    run = tmp_path / "run"
    shutil.copytree(dr_run, run)
    folder = RunFolder(run)
    weights = folder.path(RunFolder.MODEL_WEIGHTS)
    state = load_file(str(weights))
    head = [k for k in state if k.startswith("head.") and k.endswith("bias")][0]
    state[head] = state[head] + torch.arange(len(state[head]), dtype=torch.float32)
    save_file(state, str(weights))
    before = folder.path(RunFolder.ENGINE).read_bytes()

    images = np.random.default_rng(1).integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)
    fresh = run_scorer(folder)
    model, card = folder.load_model()
    expected = TorchScorer(model, card).logits(images)
    assert np.abs(fresh.logits(images) - expected).max() < 1e-4
    stale = OnnxPredictor(folder.path(RunFolder.ENGINE), card=card).logits(images)
    assert np.abs(stale - expected).max() > 0.5  # the old graph would have answered wrongly
    assert folder.path(RunFolder.ENGINE).read_bytes() == before  # loading wrote nothing


def test_rot90_logits_reuse_the_plain_pass(dr_run: Path) -> None:
    """Finalisation and adapt take every TTA mode's logits from the plain pass plus three turns:
    the same numbers as the scorer's own rot90, one pass fewer."""
    scorer = run_scorer(RunFolder(dr_run))
    images = np.random.default_rng(2).integers(0, 256, (9, 32, 32, 3), dtype=np.uint8)
    plain = scorer.logits(images)
    passes: list[int] = []
    counted = scorer.logits
    scorer.logits = lambda x, tta="none": passes.append(len(x)) or counted(x, tta)  # type: ignore[method-assign]
    out = logits_per_tta(scorer, images, plain)
    assert passes == [9, 9, 9] and out["none"] is plain
    assert np.array_equal(out["rot90"], counted(images, "rot90"))
    assert not np.allclose(out["rot90"], plain)  # the turns were really scored
    with pytest.raises(ValueError):
        logits_per_tta(scorer, images[:3], plain)


def test_predict_with_a_run_does_not_import_torch(dr_run: Path, tmp_path: Path) -> None:
    """Process start is part of every prediction: the ONNX engine needs no PyTorch."""
    code = (
        "import sys\n"
        "from medtune.workflows.predict import predict\n"
        f"predict([{str(dr_run.parent / 'data')!r}], run={str(dr_run)!r}, progress=False)\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]


@pytest.mark.parametrize("side", [32, 33])
def test_static_padding_keeps_the_outputs_of_dynamic_same_padding(side: int) -> None:
    """TensorFlow-style 'same' padding (timm's Conv2dSame, asymmetric at odd sides) made static
    for the model's input size gives the same outputs, and no dynamic layer is left."""
    import torch
    from timm.layers.conv2d_same import Conv2dSame
    from torch import nn

    from medtune.deploy.exporter import static_same_padding

    torch.manual_seed(0)
    model = nn.Sequential(
        Conv2dSame(3, 8, 3, stride=2),
        nn.ReLU(),
        Conv2dSame(8, 8, 5, stride=2, groups=8, bias=False),
        nn.Conv2d(8, 4, 1),
    ).eval()
    static = static_same_padding(model, side)
    assert not any(isinstance(m, Conv2dSame) for m in static.modules())
    assert any(isinstance(m, Conv2dSame) for m in model.modules())  # the original is untouched
    x = torch.rand(2, 3, side, side)
    with torch.no_grad():
        torch.testing.assert_close(static(x), model(x), rtol=0, atol=1e-6)
