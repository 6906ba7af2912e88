"""Patients and eyes through predict (eyes.csv, patients.csv, JSON) and evaluate (patient-level
figures in metrics.json and the report), on a tiny DR run and made-up images."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from conftest import train_tiny_dr_run
from PIL import Image

from medtune.cli.main import main
from medtune.evaluation.quality import QualityVerdict


@pytest.fixture(scope="module")
def dr_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_tiny_dr_run(tmp_path_factory.mktemp("patients"))


def _clinic(folder: Path, n_patients: int = 6, seed: int = 1) -> dict[str, int]:
    """Two photographs per eye, named <patient>_<eye>_<k>.png; returns name -> grade."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    grades = {}
    for patient in range(n_patients):
        for eye in ("left", "right"):
            for k in (1, 2):
                grade = int(rng.integers(0, 5))
                img = rng.integers(0, 60, size=(32, 32, 3), dtype=np.uint8)
                img[..., grade % 3] += np.uint8(120)
                name = f"{patient}_{eye}_{k}.png"
                Image.fromarray(img).save(folder / name)
                grades[name] = grade
    return grades


def _gate(img: Image.Image | np.ndarray) -> tuple[bool, str | None]:
    """About half the made-up photographs ungradable (by a pixel), so every case occurs."""
    odd = int(np.asarray(img)[1, 1].astype(np.int64).sum()) % 2 == 1
    return (False, "made-up reason") if odd else (True, None)


def _read(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def test_predict_writes_eyes_and_patients_that_follow_the_rules(
    dr_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import medtune.workflows.predict as predict_module

    monkeypatch.setattr(predict_module, "assess_image_quality", _gate)
    _clinic(tmp_path / "clinic")
    out = tmp_path / "screening.csv"
    args = ["predict", str(tmp_path / "clinic"), "--run", str(dr_run), "--out", str(out)]
    assert main([*args, "--json", str(tmp_path / "s.json")]) == 0
    images = _read(out)
    assert "patient_id" not in images[0]  # the image CSV keeps its columns
    eyes, patients = _read(out.with_suffix(".eyes.csv")), _read(out.with_suffix(".patients.csv"))
    assert len(eyes) == 12 and len(patients) == 6
    by_name = {Path(r["image"]).name: r for r in images}
    for eye in eyes:  # per eye: the highest grade of the gradable photographs
        mine = [by_name[f"{eye['patient_id']}_{eye['eye']}_{k}.png"] for k in (1, 2)]
        ok = [r for r in mine if r["quality"] == "gradable"]
        if ok:
            assert int(eye["grade"]) == max(int(r["grade"]) for r in ok)
            assert eye["refer"] == ("yes" if any(r["refer"] == "yes" for r in ok) else "no")
        else:
            assert eye["quality"] == "ungradable" and eye["grade"] == ""
    for patient in patients:  # per patient: either eye referable; no graded eye: insufficient
        mine = [e for e in eyes if e["patient_id"] == patient["patient_id"]]
        if any(e["refer"] == "yes" for e in mine):
            assert patient["refer"] == "yes"
        elif all(e["quality"] == "ungradable" for e in mine):
            assert patient["refer"] == "insufficient quality"
        else:
            assert patient["refer"] == "no"
    doc = json.loads((tmp_path / "s.json").read_text())
    assert len(doc["patients"]) == 6 and len(doc["eyes"]) == 12
    meta = doc["meta"]["patients"]
    assert meta["rule"] == "either-eye" and meta["patient_from"] == {"file name": 24}


def test_predict_manifest_names_patients_and_unnamed_images_stay_ungrouped(
    dr_run: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "photos"
    folder.mkdir()
    rng = np.random.default_rng(3)
    for name in ("a.png", "b.png", "c.png"):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(folder / name)
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("image,patient_id,eye\na.png,X,OD\nb.png,X,OS\n", "utf-8")
    out = tmp_path / "s.csv"
    args = ["predict", str(folder), "--run", str(dr_run), "--out", str(out)]
    assert main([*args, "--manifest", str(manifest), "--patient-rule", "both-eyes"]) == 0
    (patient,) = _read(out.with_suffix(".patients.csv"))
    assert patient["patient_id"] == "X" and patient["rule"] == "both-eyes"
    assert [e["eye"] for e in _read(out.with_suffix(".eyes.csv"))] == ["right", "left"]
    meta = json.loads(out.with_suffix(".meta.json").read_text())["patients"]
    assert meta["n_images_without_patient"] == 1  # c.png
    # without any patient, no patient files: earlier ones at the same place are removed
    assert main(["predict", str(folder / "c.png"), "--run", str(dr_run), "--out", str(out)]) == 0
    assert not out.with_suffix(".patients.csv").exists()
    assert not out.with_suffix(".eyes.csv").exists()
    assert "patients" not in json.loads(out.with_suffix(".meta.json").read_text())


def test_evaluate_reports_patient_level_figures(
    dr_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import medtune.evaluation.quality as quality_module

    def gate(img: Image.Image) -> QualityVerdict:
        ok, reason = _gate(np.asarray(img))
        return QualityVerdict(ok, reason, "ok" if ok else "blur")

    monkeypatch.setattr(quality_module, "assess_quality", gate)
    data = tmp_path / "site"
    grades = _clinic(data / "images", n_patients=8, seed=5)
    rows = ["image,label,patient_id"] + [f"{n},{g},{n.split('_')[0]}" for n, g in grades.items()]
    (data / "labels.csv").write_text("\n".join(rows) + "\n", "utf-8")
    from medtune.workflows.evaluate import evaluate

    result = evaluate(dr_run, str(data), n_boot=20, gradcam=False, progress=False)
    pm = result.metrics["patients"]
    assert pm["n_patients"] == 8 and pm["n_eyes"] == 16 and pm["n_images"] == 32
    assert pm["patient_from"] == {"manifest": 32} and pm["eye_from"] == {"file name": 32}
    truth = {p: any(g >= 2 for n, g in grades.items() if n.startswith(f"{p}_")) for p in range(8)}
    assert pm["n_positive"] == sum(truth.values())
    for name, op in pm["operating_points"].items():
        assert op["threshold"] == result.metrics["operating_points"][name]["threshold"]
        assert op["tp"] + op["fn"] + op["n_insufficient_positive"] == pm["n_positive"]
        assert op["tp"] + op["fn"] + op["tn"] + op["fp"] + op["n_insufficient"] == 8
        if op["sensitivity"] is not None:
            lo, hi = op["sensitivity_ci"]
            assert lo <= op["sensitivity"] <= hi
    assert 0 <= pm["imageability"] <= 1 and pm["headline_operating_point"] == "sens90"
    saved = json.loads((result.dir / "metrics.json").read_text())
    assert saved["patients"]["n_patients"] == 8
    html = result.report.read_text()
    assert 'id="tbl-patients"' in html and "8 patients" in html and "either-eye" in html


def test_evaluate_command_prints_the_patient_line(dr_run: Path, tmp_path: Path, capsys) -> None:
    data = tmp_path / "site"
    grades = _clinic(data, n_patients=3, seed=7)
    rows = ["image,label"] + [f"{n},{g}" for n, g in grades.items()]  # patients from the names
    (data / "labels.csv").write_text("\n".join(rows) + "\n", "utf-8")
    args = ["evaluate", "--run", str(dr_run), "--data", str(data), "--no-gradcam"]
    assert main([*args, "--bootstrap", "0", "--patient-rule", "both-eyes"]) == 0
    out = capsys.readouterr().out
    assert "patients (3, both-eyes rule, sens90): sensitivity" in out
    assert "insufficient quality" in out
