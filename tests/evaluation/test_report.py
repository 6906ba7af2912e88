"""Report (HTML, summary, model card), TTA inference and Grad-CAM overlays on tiny models."""

from __future__ import annotations

import base64
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.special import softmax
from torch import nn

from medtune.config import InputSpec
from medtune.evaluation.gradcam import gradcam_overlays, select_gradcam_examples
from medtune.evaluation.inference import predict_logits
from medtune.evaluation.metrics import compute_metrics
from medtune.evaluation.plots import GradcamExample
from medtune.evaluation.report import FIGURE_IDS, write_report

SPEC = InputSpec(32, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
DR = ["0", "1", "2", "3", "4"]


def _pooled_cnn(k: int = 5) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, k),
    )


def _position_sensitive(k: int = 5, size: int = 8) -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * size * size, k)
    )


def _images(n: int, size: int = 8, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g)


# ---------------------------------------------------------------- TTA


def test_tta_on_symmetric_images_equals_no_tta() -> None:
    x = _images(2).to(torch.int32)
    views = [torch.rot90(v, k, dims=(2, 3)) for v in (x, x.flip(3)) for k in range(4)]
    sym = (sum(views) // 8).to(torch.uint8)  # invariant under all 8 symmetries of the square
    assert torch.equal(sym, torch.rot90(sym, 1, dims=(2, 3))) and torch.equal(sym, sym.flip(3))
    model = _pooled_cnn()
    plain = predict_logits(model, [sym], SPEC)
    got = predict_logits(model, [sym], SPEC, tta="rot90")
    np.testing.assert_allclose(got, plain, rtol=1e-5, atol=1e-5)


def test_tta_equals_mean_of_manual_rotations() -> None:
    model = _position_sensitive()
    x = _images(3, seed=1)
    batches = [(x[:2], torch.tensor([0, 1])), (x[2:], torch.tensor([2]))]  # (images, labels)
    got = predict_logits(model, batches, SPEC, tta="rot90")
    manual = [predict_logits(model, [torch.rot90(x, k, dims=(2, 3))], SPEC) for k in range(4)]
    np.testing.assert_allclose(got, np.mean(manual, axis=0), rtol=1e-5, atol=1e-5)
    assert not np.allclose(got, manual[0], atol=1e-3)  # the model is not rotation invariant
    assert got.shape == (3, 5) and got.dtype == np.float32


def test_predict_logits_options_and_validation() -> None:
    model = _pooled_cnn().train()
    x = _images(4, seed=2)
    a = predict_logits(model, [x], SPEC, channels_last=False)
    b = predict_logits(model, [x[:1], x[1:]], SPEC, channels_last=True)
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    assert model.training  # mode restored
    c = predict_logits(model, [x], SPEC, bf16=True)
    np.testing.assert_allclose(c, a, atol=0.1)
    with pytest.raises(ValueError, match="uint8"):
        predict_logits(model, [x.float()], SPEC)
    with pytest.raises(ValueError, match="tta"):
        predict_logits(model, [x], SPEC, tta="rot45")


# ---------------------------------------------------------------- Grad-CAM


def test_gradcam_overlay_shapes_even_with_frozen_weights() -> None:
    pytest.importorskip("pytorch_grad_cam")
    model = _pooled_cnn(3)
    for p in model.parameters():
        p.requires_grad_(False)  # a linear probe freezes everything before the head
    images = _images(3, size=32, seed=3).permute(0, 2, 3, 1).numpy()
    overlays = gradcam_overlays(model, model[2], images, SPEC, batch_size=2)
    assert len(overlays) == 3
    for o in overlays:
        assert o.shape == (32, 32, 3) and o.dtype == np.uint8
    targeted = gradcam_overlays(model, model[2], images, SPEC, targets=[0, 1, 2])
    assert [o.shape for o in targeted] == [(32, 32, 3)] * 3


def test_select_gradcam_examples() -> None:
    y = np.array([0, 0, 1, 1])
    probs = np.array([[0.9, 0.1], [0.4, 0.6], [0.2, 0.8], [0.3, 0.7]])
    picks = select_gradcam_examples(y, probs, ["no", "yes"])
    assert [i for i, _ in picks] == [0, 1, 2]
    assert picks[1][1] == "predicted: yes, P = 0.60\ntrue: no"


# ---------------------------------------------------------------- report


def _fake_eval(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 5, n)
    z = rng.normal(size=(n, 5))
    z[np.arange(n), y] += 1.5
    return y, softmax(z, axis=1)


def _curves_csv(path: Path) -> Path:
    rows = ["epoch,step,train_loss,val_loss,val_qwk,val_acc"]
    for e in range(3):
        rows += [f"{e},{10 * e + 5},{1.5 - 0.3 * e},,,", f"{e},{10 * e + 9},,{1.4 - 0.2 * e},"
                 f"{0.3 + 0.1 * e},{0.4 + 0.05 * e}"]  # fmt: skip
    path.write_text("\n".join(rows) + "\n")
    return path


def _data_uri_pngs(text: str) -> list[bytes]:
    return [
        base64.b64decode(b) for b in re.findall(r"data:image/png;base64,([A-Za-z0-9+/=]+)", text)
    ]


def test_report_is_self_contained(tmp_path: Path) -> None:
    y_val, p_val = _fake_eval(120, seed=0)
    y, probs = _fake_eval(100, seed=1)
    metrics = {
        "val": compute_metrics(y_val, p_val, DR, n_boot=50),
        "test": compute_metrics(y, probs, DR, val=(y_val, p_val), n_boot=50),
    }
    rng = np.random.default_rng(0)
    examples = [
        GradcamExample(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8), rng.random((32, 32)), "e")
        for i in range(5)
    ]
    counts = {"train": {c: 10 for c in DR}, "val": {c: 3 for c in DR}, "test": {c: 2 for c in DR}}
    out = write_report(
        tmp_path / "rep",
        metrics=metrics,
        config={"backbone": "efficientnet_lite0", "lr": 1e-3, "path": tmp_path},
        y_true=y,
        probs=probs,
        class_names=DR,
        class_counts=counts,
        curves_csv=_curves_csv(tmp_path / "metrics.csv"),
        gradcam_examples=examples,
        title="DR <test> report",
        synthetic=True,
        model_info={"temperature": 1.3},
    )
    assert out == tmp_path / "rep" / "report.html"
    text = out.read_text()
    for fig_id in FIGURE_IDS:
        assert f'id="{fig_id}"' in text
    pngs = _data_uri_pngs(text)
    assert len(pngs) == len(FIGURE_IDS) and all(p.startswith(b"\x89PNG") for p in pngs)
    without_images = re.sub(r"data:image/png;base64,[A-Za-z0-9+/=]+", "", text)
    assert "http" not in without_images and "://" not in text and "<script" not in text
    assert "DR &lt;test&gt; report" in text and 'id="synthetic-warning"' in text
    assert 'id="tbl-metrics"' in text and 'id="tbl-operating-points"' in text
    table = text.split('id="tbl-referred-by-grade"')[1].split("</table>")[0]
    assert table.count("<tr>") == 1 + len(DR) and "Proliferative DR" in table
    n4 = int((y == 4).sum())
    assert f"/{n4})" in table.split("Proliferative DR")[1]  # k/n of grade 4 in its row
    summary = (out.parent / "summary.md").read_text()
    card = (out.parent / "MODEL_CARD.md").read_text()
    assert "synthetic" in summary.lower() and "synthetic" in card.lower()
    assert "Not a standalone diagnostic" in card and "Dataset shift" in card
    assert "Referable DR sensitivity" in summary and "sens97.5" in card
    assert "by true grade" in summary and "| Severe NPDR |" in summary
    assert not list(out.parent.glob(".*.tmp"))  # atomic writes left no temp files


def test_report_without_optional_parts(tmp_path: Path) -> None:
    y, probs = _fake_eval(40, seed=2)
    names = ["a", "b", "c", "d", "e"]
    m = compute_metrics(y, probs, names, n_boot=0)
    out = write_report(tmp_path, metrics=m, config={}, y_true=y, probs=probs, class_names=names)
    text = out.read_text()
    for fig_id in FIGURE_IDS:
        assert f'id="{fig_id}"' in text
    assert "No training log was given." in text and "No Grad-CAM examples" in text
    assert "synthetic-warning" not in text
