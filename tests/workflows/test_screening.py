"""Screening output (issue 14): the referral columns of ``predict`` (CSV, JSON, sidecar; run and
ONNX alike), the thresholds stored at training, and the clinician report's sections (also
rendered in headless Chromium)."""

from __future__ import annotations

import csv
import io
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from conftest import train_tiny_dr_run
from PIL import Image
from scipy.special import softmax

from medtune.cli.main import main
from medtune.evaluation.card import OperatingPoints
from medtune.evaluation.labels import DR_GRADE_NAMES, LabelSpace
from medtune.evaluation.metrics import compute_metrics
from medtune.evaluation.plots import GradcamExample
from medtune.evaluation.referral import build_rows, referral_rule
from medtune.evaluation.report import SECTION_IDS, write_report
from medtune.workflows.predict import to_csv

DR = ["0", "1", "2", "3", "4"]


def _probs(n: int, k: int, seed: int) -> np.ndarray:
    return softmax(np.random.default_rng(seed).normal(size=(n, k)) * 2, axis=1)


def _points(threshold: float) -> OperatingPoints:
    point = {"threshold": threshold, "rule": "r", "sensitivity": 0.9, "specificity": 0.7}
    return OperatingPoints.from_dict(
        {"n_val": 50, "n_val_positive": 20, "points": {"none": {"sens90": point}}}
    )


SPACE_DR = LabelSpace.of(DR)


# ---------------------------------------------------------------- rows and CSV


def test_csv_quotes_any_class_name_and_round_trips():
    names = ['a, "odd" one', "plain"]
    probs = _probs(3, 2, 0)
    space = LabelSpace.of(names)
    rule = referral_rule(space, _points(0.5))
    rows = build_rows(["x,1.png", "y.png", "z.png"], probs, probs.argmax(1), space, None, rule)
    parsed = list(csv.reader(io.StringIO(to_csv(rows))))
    assert parsed[0] == [
        "image",
        "quality",
        "quality_reason",
        "grade",
        "grade_name",
        'p_a, "odd" one',
        "p_plain",
        "p_referable",
        "refer",
    ]
    assert parsed[1][0] == "x,1.png" and len({len(r) for r in parsed}) == 1
    assert float(parsed[1][5]) == pytest.approx(probs[0, 0], abs=1e-6)
    assert [r[4] for r in parsed[1:]] == [names[k] for k in probs.argmax(1)]
    # binary: P(referable) is the positive class's probability
    assert [float(r[7]) for r in parsed[1:]] == pytest.approx(probs[:, 1], abs=1e-6)


def test_p_referable_is_the_sum_of_grades_2_to_4_and_refer_follows_the_threshold():
    probs = _probs(40, 5, 1)
    labels = probs.argmax(1)
    rule = referral_rule(SPACE_DR, _points(0.55))
    quality = [(i % 7 != 0, "too dark" if i % 7 == 0 else None) for i in range(40)]
    rows = build_rows([f"{i}.png" for i in range(40)], probs, labels, SPACE_DR, None, rule, quality)
    ref = probs[:, 2:].sum(1)
    assert [r.p_referable for r in rows] == pytest.approx(ref)
    for r, p, (ok, _) in zip(rows, ref, quality, strict=True):
        assert r.refer == ("ungradable" if not ok else ("yes" if p >= 0.55 else "no"))
        assert r.quality == ("gradable" if ok else "ungradable")
        assert r.quality_reason == ("" if ok else "too dark")
        assert r.grade_name == DR_GRADE_NAMES[r.grade]
    assert list(rows[0].probabilities) == list(DR_GRADE_NAMES)
    assert {r.refer for r in rows} == {"yes", "no", "ungradable"}
    # grade names: DR names only for 5 ordinal grades
    assert LabelSpace.of(DR, ordinal=False).grade_names == DR
    assert LabelSpace.of(["a", "b", "c"], ordinal=True).grade_names == ["a", "b", "c"]
    # no referral for a 3-class model; no validated threshold leaves refer empty
    assert referral_rule(LabelSpace.of(["a", "b", "c"]), None) is None
    bare = build_rows(["a"], probs[:1], labels[:1], SPACE_DR, None, referral_rule(SPACE_DR, None))
    assert bare[0].refer == "" and bare[0].p_referable == pytest.approx(ref[0])


# ---------------------------------------------------------------- a tiny DR run


@pytest.fixture(scope="module")
def dr_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_tiny_dr_run(tmp_path_factory.mktemp("screening"))


def _read_csv(path: Path) -> list[dict]:
    with path.open(newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def test_training_stores_the_validation_thresholds_in_model_json(dr_run: Path):
    meta = json.loads((dr_run / "model.json").read_text())
    val = json.loads((dr_run / "metrics.json").read_text())["val"]
    ops = meta["operating_points"]
    assert ops["positive_classes"] == [2, 3, 4] and ops["n_val"] == val["n"]
    assert set(ops["points"]) == {"none", "rot90"}
    for name, point in val["operating_points"].items():
        stored = ops["points"]["none"][name]
        assert stored["threshold"] == point["threshold"]
        assert stored["sensitivity"] == point["val_sensitivity"]
        assert stored["sensitivity_ci"] == point["sensitivity_ci"]


def _fake_gate(img: np.ndarray) -> tuple[bool, str | None]:
    """Made-up images fail the real gate (too small, not fundus photographs): call about half
    of them ungradable (by the network input's centre pixel), so both kinds occur."""
    odd = int(img[img.shape[0] // 2, img.shape[1] // 2].sum()) % 2 == 1
    return (False, "made-up reason") if odd else (True, None)


def test_run_and_onnx_give_the_same_rows_and_sidecar(dr_run: Path, tmp_path: Path, monkeypatch):
    import medtune.workflows.predict as predict_module

    monkeypatch.setattr(predict_module, "assess_image_quality", _fake_gate)
    images = str(dr_run.parent / "data")
    export = tmp_path / "exp"
    assert main(["export", "--run", str(dr_run), "--out", str(export)]) == 0
    assert "operating_points" in json.loads((export / "model.json").read_text())
    run_csv, onnx_csv = tmp_path / "run.csv", tmp_path / "onnx.csv"
    assert main(["predict", images, "--run", str(dr_run), "--out", str(run_csv)]) == 0
    onnx_json = tmp_path / "onnx.json"
    args = ["predict", images, "--model", str(export / "model.onnx"), "--out", str(onnx_csv)]
    assert main([*args, "--json", str(onnx_json)]) == 0
    a, b = _read_csv(run_csv), _read_csv(onnx_csv)
    # the export carries the run's site-shift model: the same columns, the same scores
    assert list(a[0]) == list(b[0]) and len(a) == len(b) == 40
    assert list(a[0])[-2:] == ["site_shift", "outside_training"]
    assert list(a[0])[:5] == ["image", "quality", "quality_reason", "grade", "grade_name"]
    assert {f"p_{n}" for n in DR_GRADE_NAMES} < set(a[0]) and "pred" not in a[0]
    threshold = json.loads((dr_run / "model.json").read_text())["operating_points"]["points"]
    threshold = threshold["none"]["sens90"]["threshold"]
    for x, y in zip(a, b, strict=True):
        assert x["grade"] == y["grade"] and x["quality"] == y["quality"]
        if x["site_shift"]:  # empty for images the quality gate rejected
            assert float(x["site_shift"]) == pytest.approx(float(y["site_shift"]), rel=1e-3)
        assert float(x["p_referable"]) == pytest.approx(float(y["p_referable"]), abs=1e-4)
        # thresholds are validation scores: a validation image can sit exactly on one, where
        # the 1e-6 gap between PyTorch and ONNX Runtime may flip the flag
        if abs(float(x["p_referable"]) - threshold) > 1e-4:
            assert x["refer"] == y["refer"]

    meta = json.loads(run_csv.with_suffix(".meta.json").read_text())
    ref = meta["referral"]
    assert ref["operating_point"] == "sens90" and ref["threshold"] == threshold
    assert ref["validation_sensitivity"] >= 0.9 and len(ref["validation_sensitivity_ci"]) == 2
    assert meta["model"] == str(dr_run) and meta["medtune_version"] and meta["created"]
    assert meta["decoding"]["rule"] and meta["grades"]["2"] == "Moderate NPDR"
    assert {r["quality"] for r in a} == {"gradable", "ungradable"}
    for row in a:  # the flag is the stored validation threshold applied to p_referable
        p = sum(float(row[f"p_{n}"]) for n in DR_GRADE_NAMES[2:])
        assert float(row["p_referable"]) == pytest.approx(p, abs=2e-6)
        if row["quality"] == "ungradable":
            assert row["refer"] == "ungradable" and row["quality_reason"] == "made-up reason"
        else:
            assert row["refer"] == ("yes" if float(row["p_referable"]) >= threshold else "no")

    doc = json.loads(onnx_json.read_text())  # --json: the same fields as the CSV and sidecar
    assert list(doc["predictions"][0]) == list(b[0]) and doc["meta"]["referral"] == {
        **ref,
        "note": doc["meta"]["referral"]["note"],
    }


def test_json_to_stdout_uses_the_chosen_operating_point(dr_run: Path, capsys):
    image = str(next((dr_run.parent / "data" / "3").iterdir()))
    args = ["predict", image, "--run", str(dr_run), "--operating-point", "youden", "--json"]
    assert main(args) == 0
    doc = json.loads(capsys.readouterr().out)
    stored = json.loads((dr_run / "model.json").read_text())["operating_points"]["points"]
    assert doc["meta"]["referral"]["threshold"] == stored["none"]["youden"]["threshold"]
    assert len(doc["predictions"]) == 1


def test_the_quality_gate_marks_a_blank_photograph_ungradable(dr_run: Path, tmp_path: Path):
    from medtune.workflows.predict import predict

    Image.new("RGB", (300, 300), (0, 0, 0)).save(tmp_path / "lens-cap.png")
    (row,) = predict([tmp_path / "lens-cap.png"], run=dr_run, progress=False)
    assert (row["quality"], row["quality_reason"]) == ("ungradable", "no field of view found")
    assert row["refer"] == "ungradable" and 0.0 <= row["p_referable"] <= 1.0


def test_explain_writes_a_captioned_figure(dr_run: Path, tmp_path: Path):
    image = next((dr_run.parent / "data" / "2").iterdir())
    cams = tmp_path / "cams"
    assert main(["predict", str(image), "--run", str(dr_run), "--explain", str(cams)]) == 0
    (png,) = cams.iterdir()
    with Image.open(png) as fig:  # the figure, not a bare 32 px overlay
        assert fig.width > 300 and fig.height > 300


# ---------------------------------------------------------------- the report


def _report(out: Path, *, sites: bool = True) -> Path:
    rng = np.random.default_rng(0)
    y_val, y = rng.integers(0, 5, 80), rng.integers(0, 5, 60)
    p_val, p = _probs(80, 5, 2), _probs(60, 5, 3)
    p_val[np.arange(80), y_val] += 1
    p[np.arange(60), y] += 1
    p_val, p = p_val / p_val.sum(1, keepdims=True), p / p.sum(1, keepdims=True)
    m = compute_metrics(y, p, DR, val=(y_val, p_val), n_boot=20)
    half = compute_metrics(y[:30], p[:30], DR, val=(y_val, p_val), n_boot=20)
    cam = np.outer(np.hanning(32), np.hanning(32))
    image = rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)
    return write_report(
        out,
        metrics={"test": m},
        config={"backbone": "test_efficientnet", "lr": 0.001},
        y_true=y,
        probs=p,
        class_names=DR,
        gradcam_examples=[GradcamExample(image, cam, "predicted: No DR, P = 0.50")],
        header={"Model": "tiny", "Training data": "made-up", "Evaluated data": "made-up test"},
        sites={"site A": half, "site B": m} if sites else None,
        quality={"n": 60, "n_ungradable": 6, "reasons": {"too dark": 6}, "gradable_metrics": m},
        site_shift={"n_images": 60, "share_outside": 0.05, "warning": True, "message": "5% out"},
        curves_note="A linear probe has no training epochs.",
    )


def test_report_sections_in_reading_order_with_grade_names(tmp_path: Path):
    text = _report(tmp_path).read_text()
    where = [text.index(f'id="{s}"') for s in SECTION_IDS]
    assert where == sorted(where)  # header and headline first, configuration last
    assert text.index('id="tbl-operating-points"') < text.index('id="sec-data"')
    assert "<details>" in text[where[-1] :] and "backbone: test_efficientnet" in text
    for name in DR_GRADE_NAMES:
        assert f"<td>{name}</td>" in text  # per-grade table by name
    assert "medtune version" in text and "made-up test" in text
    assert "6 of 60" in text and 'id="tbl-quality-metrics"' in text and "5% out" in text
    assert "A linear probe has no training epochs." in text
    assert 'id="sec-sites"' not in _report(tmp_path / "one", sites=False).read_text()


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(
    _chromium() is None,
    reason="needs headless Chromium (`apt-get install -y chromium`; .ci/run installs it)",
)
def test_report_of_a_real_run_renders_in_headless_chromium(dr_run: Path, tmp_path: Path):
    from medtune.workflows.evaluate import evaluate

    report = evaluate(dr_run, n_boot=50, progress=False).report
    quality = json.loads((report.parent / "quality.json").read_text())
    assert quality["n"] == 10 and 0 <= quality["n_ungradable"] <= 10
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--no-first-run",
        f"--user-data-dir={tmp_path / 'profile'}",
    ]
    url = report.resolve().as_uri()
    shot = tmp_path / "report.png"
    cmd = [_chromium(), *flags, f"--screenshot={shot}", "--window-size=1280,4000", url]
    subprocess.run(cmd, capture_output=True, timeout=120, check=True)
    dom = subprocess.run(
        [_chromium(), *flags, "--dump-dom", url], capture_output=True, text=True, timeout=120
    ).stdout
    for section in set(SECTION_IDS) - {"sec-sites"}:
        assert f'id="{section}"' in dom, section
    assert "Moderate NPDR" in dom and "<details>" in dom
    assert f"{quality['n_ungradable']} of 10" in dom  # the quality gate's share ungradable
    with Image.open(shot) as png:
        assert png.size == (1280, 4000)
        assert len(set(np.asarray(png.convert("L").resize((64, 200))).ravel())) > 20  # drawn


def test_training_curves_keep_epoch_series_with_words_for_labels(tmp_path: Path):
    from medtune.evaluation.plots import _epoch_curves, _read_curves, curve_label

    log = tmp_path / "metrics.csv"
    log.write_text(
        "epoch,step,train_loss_step,train_loss_epoch,val_loss,val_qwk\n"
        "0,4,0.9,,,\n0,7,,0.8,0.7,0.3\n1,15,,0.6,0.5,0.5\n"
    )
    _, curves = _read_curves(log)
    kept = _epoch_curves(curves)
    assert "train_loss_step" not in kept and {"train_loss_epoch", "val_loss", "val_qwk"} <= set(
        kept
    )
    assert curve_label("train_loss_epoch") == "training loss"
    assert curve_label("val_qwk") == "validation quadratic weighted kappa"
    assert curve_label("val_balanced_accuracy") == "validation balanced accuracy"
