"""Issue 14, done when: `medtune predict --run RUN good.png blurred.png dark.png cat.png good.dcm`
writes five rows: the blurred, dark and cat images ungradable with their reasons, the PNG and its
DICOM copy gradable with the same probabilities, a P(referable) and a referral flag; no patient
identifier anywhere in the outputs."""

from __future__ import annotations

import csv
import json

import numpy as np
from conftest import TINY_SETTINGS, write_dicom
from PIL import Image, ImageFilter
from skimage import data as skdata

from medtune.cli.main import main
from medtune.data.synthetic import make_synthetic_dr
from medtune.workflows.train import train

SECRET = "PAT-SECRET-4711"


def test_predict_screens_good_bad_and_dicom_images(tmp_path, capsys):
    dr = make_synthetic_dr(tmp_path / "dr", n_per_grade=6, size=224, seed=0)
    settings = {**TINY_SETTINGS, "image_size": 224, "strategy": "linear-probe"}
    run = train(dr, out=str(tmp_path / "run"), probe_rotations=False, progress=False, **settings)

    retina = np.asarray(Image.fromarray(skdata.retina()).resize((448, 448)))
    photos = tmp_path / "photos"
    photos.mkdir()
    Image.fromarray(retina).save(photos / "good.png")
    Image.fromarray(retina).filter(ImageFilter.GaussianBlur(8)).save(photos / "blurred.png")
    Image.fromarray((retina * 0.15).astype(np.uint8)).save(photos / "dark.png")
    Image.fromarray(skdata.chelsea()).save(photos / "cat.png")
    write_dicom(photos / "good.dcm", retina, photometric="RGB", rows=448, cols=448, samples=3,
                patient_id=SECRET)  # fmt: skip

    out = tmp_path / "out" / "preds.csv"
    names = ["good.png", "blurred.png", "dark.png", "cat.png", "good.dcm"]
    argv = ["predict", "--run", str(run.dir), "--out", str(out), *(str(photos / n) for n in names)]
    assert main(argv) == 0
    with out.open(newline="") as fh:
        rows = {r["image"].rsplit("/", 1)[-1]: r for r in csv.DictReader(fh)}
    assert list(rows) == names
    assert {n: rows[n]["quality"] for n in names} == {
        "good.png": "gradable",
        "blurred.png": "ungradable",
        "dark.png": "ungradable",
        "cat.png": "ungradable",
        "good.dcm": "gradable",
    }
    assert "focus" in rows["blurred.png"]["quality_reason"]
    assert "underexposed" in rows["dark.png"]["quality_reason"]
    assert "not a colour fundus photograph" in rows["cat.png"]["quality_reason"]
    probs = [k for k in rows["good.png"] if k.startswith("p_")]
    assert "p_referable" in probs and len(probs) == 6  # five grades + P(referable)
    png = np.array([float(rows["good.png"][k]) for k in probs])
    dcm = np.array([float(rows["good.dcm"][k]) for k in probs])
    assert np.abs(png - dcm).max() <= 1e-5
    assert rows["good.png"]["refer"] in ("yes", "no")
    assert all(float(r["site_shift"]) >= 0 for r in rows.values())  # the run's site-shift model
    assert {r["outside_training"] for r in rows.values()} <= {"yes", "no"}
    assert rows["cat.png"]["refer"] == "ungradable"

    written = [p for p in (tmp_path / "out").rglob("*") if p.is_file()]
    assert written and all(SECRET not in p.read_text(errors="ignore") for p in written)
    assert "Jane" not in out.read_text() and SECRET not in capsys.readouterr().err
    meta = json.loads(out.with_suffix(".meta.json").read_text())
    assert meta and SECRET not in json.dumps(meta)
