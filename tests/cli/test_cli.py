"""The command line end to end: train -> evaluate -> export -> predict, and its error contract."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from conftest import tiny_flags

from medtune.cli.main import main

TINY = tiny_flags(backbone=..., image_size=48)


def test_help_lists_every_command(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for command in ("demo", "prepare", "train", "evaluate", "predict", "export", "advise"):
        assert command in out


def test_missing_data_is_one_line_error_without_traceback(tmp_path, capsys):
    code = main(["train", "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2
    assert str(tmp_path / "nope") in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    from conftest import write_graded_images

    root = tmp_path_factory.mktemp("cli")
    data = write_graded_images(root / "data")
    run = root / "run"
    args = [
        "train",
        "--data",
        str(data),
        "--out",
        str(run),
        "--strategy",
        "linear-probe",
        "--cache-dir",
        str(root / "cache"),
        *TINY,
    ]
    assert main(args) == 0
    return run


def test_evaluate_writes_metrics_and_a_self_contained_report(trained_run: Path, capsys):
    assert (
        main(["evaluate", "--run", str(trained_run), "--tta", "rot90", "--bootstrap", "100"]) == 0
    )
    out_dir = trained_run / "eval" / "test-tta-rot90"
    metrics = json.loads((out_dir / "metrics.json").read_text())
    assert metrics["n"] == 6 and metrics["tta"] == "rot90"
    assert metrics["accuracy_ci"][0] <= metrics["accuracy"] <= metrics["accuracy_ci"][1]
    html = (out_dir / "report.html").read_text()
    for fig in ("fig-class-balance", "fig-roc", "fig-confusion", "fig-reliability", "fig-gradcam"):
        assert f'id="{fig}"' in html
    assert "data:image/png;base64" in html
    assert (out_dir / "MODEL_CARD.md").is_file()
    assert "quadratic kappa" in capsys.readouterr().out


def test_export_then_onnx_predictions_equal_pytorch_predictions(trained_run: Path, tmp_path):
    assert main(["export", "--run", str(trained_run), "--out", str(tmp_path / "exp")]) == 0
    images = str(trained_run.parent / "data" / "2")
    torch_csv, onnx_csv = tmp_path / "torch.csv", tmp_path / "onnx.csv"
    assert (
        main(
            [
                "predict",
                images,
                "--run",
                str(trained_run),
                "--out",
                str(torch_csv),
                "--explain",
                str(tmp_path / "cams"),
            ]
        )
        == 0
    )
    assert (
        main(
            [
                "predict",
                images,
                "--model",
                str(tmp_path / "exp" / "model.onnx"),
                "--out",
                str(onnx_csv),
            ]
        )
        == 0
    )
    torch_rows = list(csv.DictReader(torch_csv.open()))
    onnx_rows = list(csv.DictReader(onnx_csv.open()))
    assert len(torch_rows) == len(onnx_rows) == 8
    for a, b in zip(torch_rows, onnx_rows, strict=True):
        assert a["image"] == b["image"] and a["grade"] == b["grade"]
        for k in ("p_0", "p_1", "p_2"):
            assert abs(float(a[k]) - float(b[k])) < 1e-4
    cams = sorted(p.name for p in (tmp_path / "cams").iterdir())
    assert cams[0] == "img_000_gradcam.png" and len(cams) == 8
