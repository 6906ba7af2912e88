"""The batch shift test where screening happens (issue 21): ``predict`` on a folder tests its
images as one batch, the ONNX export carries the test, the page keeps a running batch, and a
referral made at an operating point not validated for the batch says so (its decision kept)."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import numpy as np
import pytest
from conftest import tiny_flags
from PIL import Image

from medtune.cli.main import main
from medtune.data.synthetic import make_synthetic_dr
from medtune.evaluation.label_free import NOT_VALIDATED
from medtune.evaluation.shift import MIN_BATCH, BatchShiftTest
from medtune.runs import RunFolder
from medtune.workflows.predict import predict

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402
from test_serve import CHROMIUM, LiveServer, launch_chromium, playwright_api  # noqa: E402

from medtune.workflows.serve import create_app  # noqa: E402

BASE = "http://127.0.0.1"


@pytest.fixture(scope="module")
def dr_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A linear probe on made-up fundus photographs (grades 0-4, 64 px: photographs the quality
    gate calls gradable, so the referral rule applies) and its ONNX export in ``RUN/export``."""
    root = tmp_path_factory.mktemp("batch-verdict")
    data = make_synthetic_dr(root / "data", n_per_grade=12, size=96, seed=0)
    args = ["train", "--data", str(data), "--out", str(root / "run"), "--strategy"]
    args += ["linear-probe", "--cache-dir", str(root / "cache"), *tiny_flags(image_size=64)]
    assert main(args) == 0
    assert main(["export", "--run", str(root / "run")]) == 0
    return root / "run"


def _home(folder: Path, n_per_grade: int = 5) -> Path:
    """New photographs made like the training ones (another seed): the validated site."""
    return make_synthetic_dr(folder, n_per_grade=n_per_grade, size=96, seed=5) / "images"


def _new_site(folder: Path, n_per_grade: int = 5) -> Path:
    """The same kind of photographs from a darker camera (every pixel x 0.6): still gradable,
    but a site the model was not validated on."""
    home = _home(folder / "source", n_per_grade)
    out = folder / "darker"
    out.mkdir(parents=True)
    for path in sorted(home.glob("*.png")):
        pixels = np.asarray(Image.open(path).convert("RGB")).astype(np.float64) * 0.6
        Image.fromarray(pixels.astype(np.uint8)).save(out / path.name)
    return out


def _read(out: Path) -> tuple[list[dict], dict]:
    with open(out, newline="") as fh:
        rows = list(csv.DictReader(fh))
    return rows, json.loads(out.with_suffix(".meta.json").read_text())


def test_predict_marks_every_referral_of_a_shifted_batch_and_keeps_the_decision(
    dr_run: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    folder = _new_site(tmp_path / "new-site")
    with caplog.at_level(logging.WARNING, logger="medtune"):
        predict([folder], run=dr_run, out=tmp_path / "p.csv", progress=False)
    rows, meta = _read(tmp_path / "p.csv")
    verdict = meta["batch_shift"]
    assert verdict["shifted"] and verdict["n_images"] == 25 and verdict["p_value"] < 0.05
    assert meta["operating_point_validated"]["validated"] == "no"
    assert "operating_point_validated" in meta["columns"]
    assert any("differs from every validation site" in r.message for r in caplog.records)
    header = list(rows[0])
    assert header.index("operating_point_validated") == header.index("refer") + 1
    referred = [r for r in rows if r["refer"] in ("yes", "no")]
    assert len(referred) == 25  # gradable: every photograph is referred at the threshold
    for r in referred:
        assert r["operating_point_validated"] == "no"
        assert r["operating_point_status"].startswith(NOT_VALIDATED)
    for r in rows:
        if r["refer"] not in ("yes", "no"):
            assert r["operating_point_validated"] == r["operating_point_status"] == ""
    # the decision itself is the threshold's: the same images in small untested batches agree
    few = predict(sorted(folder.iterdir())[:10], run=dr_run, progress=False)
    by_name = {r["image"]: r for r in rows}
    for r in few:
        assert r["refer"] == by_name[r["image"]]["refer"]
        assert r["operating_point_validated"] in ("unknown", "")
    assert (
        str(MIN_BATCH)
        in next(r for r in few if r["refer"] in ("yes", "no"))["operating_point_status"]
    )


def test_predict_counts_fellow_eyes_once_and_tests_from_min_batch_patients(
    dr_run: Path, tmp_path: Path
) -> None:
    """Files named ``<patient>_left/right`` pair up: their batch is tested at the number of
    patients, and MIN_BATCH + 2 photographs of half as many patients are not tested."""
    darker = _new_site(tmp_path / "new-site", n_per_grade=9)
    paired = tmp_path / "paired"
    paired.mkdir()
    for i, path in enumerate(sorted(darker.glob("*.png"))[: 2 * MIN_BATCH + 2]):
        path.rename(paired / f"{i // 2}_{('left', 'right')[i % 2]}.png")
    few = sorted(paired.iterdir())[: MIN_BATCH + 2]  # (MIN_BATCH + 2) / 2 patients
    predict(few, run=dr_run, out=tmp_path / "few.csv", progress=False)
    rows, meta = _read(tmp_path / "few.csv")
    assert "batch_shift" not in meta and meta["operating_point_validated"]["validated"] == "unknown"
    predict([paired], run=dr_run, out=tmp_path / "all.csv", progress=False)
    verdict = _read(tmp_path / "all.csv")[1]["batch_shift"]
    assert (verdict["n_images"], verdict["n_patients"]) == (2 * MIN_BATCH + 2, MIN_BATCH + 1)
    assert verdict["shifted"] and f"({MIN_BATCH + 1} patients)" in verdict["message"]


def test_a_batch_like_validation_is_validated_and_json_carries_the_verdict(
    dr_run: Path, tmp_path: Path
) -> None:
    predict([_home(tmp_path / "home")], run=dr_run, json_path=tmp_path / "p.json",
            progress=False)  # fmt: skip
    doc = json.loads((tmp_path / "p.json").read_text())
    assert doc["meta"]["batch_shift"]["shifted"] is False
    assert doc["meta"]["batch_shift"]["n_images"] == 25
    assert {r["operating_point_validated"] for r in doc["predictions"]} == {"yes"}


def test_onnx_export_carries_the_batch_test_and_predict_model_reaches_the_same_verdict(
    dr_run: Path, tmp_path: Path
) -> None:
    export = dr_run / "export"
    card = json.loads((export / "model.json").read_text())
    assert card["export"]["batch_shift"] == "batch_shift.npz"
    assert card["export"]["features_name"] == "features"
    carried = BatchShiftTest.load(export / "batch_shift.npz")
    original = RunFolder(dr_run).read_batch_shift()
    assert np.array_equal(carried.reference, original.reference)
    folder = _new_site(tmp_path / "new-site")
    by_run = predict([folder], run=dr_run, out=tmp_path / "run.csv", progress=False)
    by_onnx = predict([folder], model_path=export / "model.onnx", out=tmp_path / "onnx.csv",
                      progress=False)  # fmt: skip
    v_run, v_onnx = (_read(tmp_path / f"{n}.csv")[1]["batch_shift"] for n in ("run", "onnx"))
    assert v_run["shifted"] == v_onnx["shifted"] is True
    assert v_onnx["p_value"] == pytest.approx(v_run["p_value"], rel=1e-3, abs=1e-12)
    assert [r["operating_point_validated"] for r in by_onnx] == [
        r["operating_point_validated"] for r in by_run
    ]


def _upload(folder: Path, names: list[str]) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [("files", (n, (folder / n).read_bytes(), "image/png")) for n in names]


def _visits(post, folder: Path, names: list[str], per_visit: int = 2) -> list[dict]:  # noqa: ANN001
    """Screen ``names`` as patients' visits of ``per_visit`` photographs, one request each."""
    chunks = [names[i : i + per_visit] for i in range(0, len(names), per_visit)]
    return [post("/api/predict", files=_upload(folder, chunk)).json() for chunk in chunks]


def test_the_page_keeps_a_running_batch_and_flags_it_once_shifted(
    dr_run: Path, tmp_path: Path
) -> None:
    """A request is one patient's visit: its photographs count as one patient, so the running
    batch is tested from the MIN_BATCH-th visit on."""
    folder = _new_site(tmp_path / "new-site", n_per_grade=13)
    names = sorted(p.name for p in folder.iterdir())
    with TestClient(create_app(run=dr_run), base_url=BASE) as client:
        one = client.post("/api/predict", files=_upload(folder, names[: MIN_BATCH + 2])).json()
        visits = _visits(client.post, folder, names[MIN_BATCH + 2 : MIN_BATCH + 2 + 2 * MIN_BATCH])
        last = visits[-1]
        stored = client.get(f"/api/screenings/{last['screening']['id']}").json()
        listed = client.get("/api/screenings").json()["screenings"]
        exported = client.get("/api/screenings.csv").text
    # MIN_BATCH + 2 photographs of one visit are one patient: not tested
    assert one["batch"]["n_images"] == MIN_BATCH + 2 and one["batch"]["verdict"] is None
    assert one["batch"]["validation"]["validated"] == "unknown"
    assert "at least 20 patients" in one["batch"]["validation"]["status"]
    # the running batch: that visit, then MIN_BATCH - 2 visits of 2 photographs, still untested
    assert visits[MIN_BATCH - 3]["batch"]["verdict"] is None
    batch = visits[MIN_BATCH - 2]["batch"]  # MIN_BATCH patients
    assert batch["verdict"]["shifted"] is True and batch["verdict"]["n_patients"] == MIN_BATCH
    assert batch["validation"]["validated"] == "no"
    assert f"({MIN_BATCH} patients)" in batch["validation"]["status"]
    referred = [r for r in last["rows"] if r["refer"] in ("yes", "no")]
    assert referred and all(r["operating_point_validated"] == "no" for r in referred)
    assert stored["batch_shift"]["validation"]["status"].startswith(NOT_VALIDATED)
    marked = [i for i in stored["images"] if i["refer"] in ("yes", "no")]
    assert all(i["operating_point_validated"] == "no" for i in marked)
    assert listed[0]["batch_shift"]["validation"]["validated"] == "no"  # newest first
    assert listed[-1]["batch_shift"]["validation"]["validated"] == "unknown"
    lines = list(csv.DictReader(exported.splitlines()))
    assert {line["operating_point_validated"] for line in lines} == {"unknown", "no"}


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (.ci/run does)")
def test_the_page_shows_the_banner_beside_each_referral_and_in_the_worklist(
    dr_run: Path, tmp_path: Path
) -> None:
    import httpx

    sync_api = playwright_api()
    folder = _new_site(tmp_path / "new-site", n_per_grade=5)
    earlier = sorted(p.name for p in folder.iterdir())[: MIN_BATCH - 1]
    photos = sorted(folder.iterdir())[MIN_BATCH - 1 : MIN_BATCH + 1]  # the MIN_BATCH-th visit
    with LiveServer(create_app(run=dr_run)) as server, sync_api.sync_playwright() as pw:
        with httpx.Client(base_url=server.url, timeout=60) as client:
            _visits(client.post, folder, earlier, per_visit=1)  # earlier patients, one photo each
        browser = launch_chromium(pw)
        page = browser.new_page()
        page.goto(server.url)
        page.wait_for_selector("#card-body table")
        page.set_input_files("#files", [str(p) for p in photos])
        page.click("#screen")
        page.wait_for_selector("#batch:not([hidden])", timeout=60_000)
        banner = page.locator("#patient-result [data-role=batch-shift]")
        assert banner.get_attribute("data-validated") == "no"
        assert "Operating point not validated here" in banner.inner_text()
        cards = page.locator("article.photo")
        assert cards.count() == len(photos)
        for i in range(cards.count()):  # every referral, yes or no, carries the mark
            card = cards.nth(i)
            assert card.locator("[data-role=decision]").get_attribute("data-refer") in ("yes", "no")
            assert card.locator("[data-role=op-not-validated]").count() == 1
        header = page.locator("#table tr th").all_inner_texts()
        assert header[header.index("refer") + 1] == "operating_point_validated"
        page.screenshot(path=str(tmp_path / "result.png"), full_page=True)
        page.click("#tab-worklist")
        page.wait_for_selector("#worklist-batch:not([hidden])")
        assert page.inner_text("[data-role=worklist-op]") == "not validated here"
        page.screenshot(path=str(tmp_path / "page.png"), full_page=True)
        browser.close()
