"""``medtune serve``: the JSON endpoint equals ``medtune predict``, upload limits answer a clear
4xx JSON message, loopback by default, nothing left in the temporary folder, no DICOM patient id
in logs or answers, several users at once, and the page end to end in headless Chromium."""

from __future__ import annotations

import csv
import importlib.util
import io
import logging
import shutil
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFilter

from medtune.cli.main import main

pytest.importorskip("fastapi")
pytest.importorskip("httpx")

from fastapi.testclient import TestClient  # noqa: E402

from medtune.workflows.predict import predict, to_csv  # noqa: E402
from medtune.workflows.serve import Screener, UploadLimits, create_app, serve  # noqa: E402

BASE = "http://127.0.0.1"  # the server answers loopback Host names only


# ------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def tiny_run(served_run: Path) -> Path:
    """A linear probe on made-up graded images (64 px, no pretrained weights) and its ONNX."""
    return served_run


@pytest.fixture(scope="module")
def onnx_model(tiny_run: Path) -> Path:
    return tiny_run.parent / "export" / "model.onnx"


@pytest.fixture(scope="module")
def images(tiny_run: Path) -> list[Path]:
    data = tiny_run.parent / "data"
    return [data / "0" / "img_000.png", data / "1" / "img_001.png", data / "2" / "img_002.png"]


def upload(paths: list[Path]) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [("files", (p.name, p.read_bytes(), "application/octet-stream")) for p in paths]


def png_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


# ------------------------------------------------------------------------------ JSON endpoint
@pytest.mark.parametrize("backend", ["run", "onnx"])
def test_json_rows_and_csv_equal_predict_on_the_same_files(
    backend: str, tiny_run: Path, onnx_model: Path, images: list[Path]
) -> None:
    source = {"run": tiny_run} if backend == "run" else {"model_path": onnx_model}
    expected = predict(images, progress=False, **source)
    with TestClient(create_app(**source), base_url=BASE) as client:
        res = client.post("/api/predict", files=upload(images))
        csv_res = client.post("/api/predict.csv", files=upload(images))
    assert res.status_code == 200, res.text
    body = res.json()
    assert [r["image"] for r in body["rows"]] == [p.name for p in images]
    assert body["columns"] == list(expected[0])
    for got, want in zip(body["rows"], expected, strict=True):
        for key, value in want.items():
            if key == "image":
                continue
            if isinstance(value, float):
                assert got[key] == pytest.approx(value, abs=1e-9), key
            else:
                assert got[key] == value, key
    renamed = [{**row, "image": Path(row["image"]).name} for row in expected]
    assert body["csv"] == to_csv(renamed) == csv_res.text
    assert body["skipped"] == []


def test_grad_cam_figures_come_back_for_a_run(tiny_run: Path, images: list[Path]) -> None:
    with TestClient(create_app(run=tiny_run), base_url=BASE) as client:
        card = client.get("/api/model").json()
        res = client.post("/api/predict", files=upload(images), data={"explain": "true"})
    assert card["explain"] is True
    assert card["backend"] == "ONNX Runtime (run folder)"  # the engine scores, PyTorch explains
    cams = res.json()["gradcam"]
    assert sorted(cams) == ["0", "1", "2"]
    assert all(c.startswith("data:image/png;base64,") for c in cams.values())


def test_model_card_reads_the_run_and_says_research_use(tiny_run: Path) -> None:
    with TestClient(create_app(run=tiny_run), base_url=BASE) as client:
        card = client.get("/api/model").json()
    assert "not a medical device" in card["disclaimer"].lower()
    assert card["model"]["grades"][0] == "No DR" and len(card["model"]["grades"]) == 5
    assert card["referral"]["operating_point"] == "sens90"
    assert 0 <= card["referral"]["threshold"] <= 1
    assert card["referral"]["validation_sensitivity"] is not None
    assert card["training"]["data"] == "data" and card["training"]["strategy"] == "linear-probe"
    values = card["metrics"]["values"]
    assert "accuracy" in values and 0 <= values["accuracy"]["value"] <= 1


def test_model_card_of_an_export_shows_its_run_metrics_with_their_intervals(
    tiny_run: Path, onnx_model: Path, tmp_path: Path
) -> None:
    """The card reads ``<name>_ci`` as compute_metrics writes it; an export inside its run folder
    shows the run's metrics, and one moved away shows none (model.json holds no metrics)."""
    import json

    test = json.loads((tiny_run / "metrics.json").read_text())["test"]
    with TestClient(create_app(run=tiny_run), base_url=BASE) as client:
        run_card = client.get("/api/model").json()
    assert run_card["metrics"]["values"]["accuracy"]["ci95"] == test["accuracy_ci"]
    assert run_card["metrics"]["values"]["accuracy"]["ci95"] is not None
    inside = tiny_run / "export"
    shutil.copytree(onnx_model.parent, inside, dirs_exist_ok=True)
    moved = shutil.copytree(onnx_model.parent, tmp_path / "moved")
    with TestClient(create_app(model_path=inside / "model.onnx"), base_url=BASE) as client:
        export_card = client.get("/api/model").json()
    with TestClient(create_app(model_path=moved / "model.onnx"), base_url=BASE) as client:
        moved_card = client.get("/api/model").json()
    assert export_card["metrics"]["values"] == run_card["metrics"]["values"]
    assert export_card["training"]["strategy"] == "linear-probe"
    assert "metrics" not in moved_card and moved_card["training"] == {"synthetic": False}
    assert len(export_card["model"]["id"]) == 16 and "medtune" in export_card["model"]["version"]


def test_unreadable_image_is_listed_by_its_upload_name_not_a_temp_path(
    tiny_run: Path, images: list[Path]
) -> None:
    screener = Screener(model_path=tiny_run.parent / "export" / "model.onnx")
    try:
        truncated = images[0].read_bytes()[:60]  # a PNG signature, then nothing decodable
        result = screener.screen([("broken.png", truncated), ("ok.png", images[1].read_bytes())])
    finally:
        screener.close()
    assert [r["image"] for r in result.rows] == ["ok.png"]
    assert len(result.skipped) == 1 and result.skipped[0]["image"] == "broken.png"
    reason = result.skipped[0]["reason"]
    assert "broken.png" in reason and str(screener.temp_root) not in reason
    assert "--skip-bad" not in reason


def test_jpeg_png_tiff_recognised_by_content_and_screened_like_predict(
    onnx_model: Path, images: list[Path], tmp_path: Path
) -> None:
    from medtune.workflows.serve import sniff_type

    photo = Image.open(images[2]).convert("RGB")
    paths = []
    for fmt, name in (("JPEG", "a.jpg"), ("PNG", "b.png"), ("TIFF", "c.tif")):
        photo.save(tmp_path / name, format=fmt)
        assert sniff_type((tmp_path / name).read_bytes()[:132]) == fmt
        paths.append(tmp_path / name)
    paths.append(tmp_path / "d.bin")  # a PNG under another name: judged by its bytes
    paths[-1].write_bytes(paths[1].read_bytes())
    expected = predict(paths, model_path=onnx_model, progress=False)
    with TestClient(create_app(model_path=onnx_model), base_url=BASE) as client:
        rows = client.post("/api/predict", files=upload(paths)).json()["rows"]
    assert [r["image"] for r in rows] == ["a.jpg", "b.png", "c.tif", "d.bin"]
    for got, want in zip(rows, expected, strict=True):
        assert got["p_referable"] == pytest.approx(want["p_referable"], abs=1e-9)


# ------------------------------------------------------------------------------ limits
def test_upload_limits_answer_a_clear_4xx_json_message(onnx_model: Path, images: list[Path]):
    limits = UploadLimits(max_files=2, max_file_mb=0.01, max_request_mb=0.05)
    big = png_bytes(np.random.default_rng(0).integers(0, 255, (80, 80, 3), dtype=np.uint8))
    assert 0.01 * 2**20 < len(big) < 0.05 * 2**20
    with TestClient(create_app(model_path=onnx_model, limits=limits), base_url=BASE) as client:
        answers = {
            "count": client.post("/api/predict", files=upload(images)),
            "size": client.post("/api/predict", files=[("files", ("huge.png", big, "image/png"))]),
            "request": client.post(
                "/api/predict", files=[("files", ("a.png", b"\x89PNG" + b"0" * 60_000, "x/y"))]
            ),
            "chunked": client.post(  # no Content-Length: counted while read
                "/api/predict",
                content=iter(
                    [
                        b"--x\r\nContent-Disposition: form-data; name=files; "
                        b'filename="b.png"\r\n\r\n\x89PNG'
                    ]
                    + [b"0" * 10_000] * 9
                ),
                headers={"content-type": "multipart/form-data; boundary=x"},
            ),
            "type": client.post(
                "/api/predict", files=[("files", ("notes.txt", b"patient notes", "text/plain"))]
            ),
            "gif": client.post(
                "/api/predict", files=[("files", ("anim.gif", b"GIF89a" + b"\0" * 50, "x/y"))]
            ),
            "none": client.post("/api/predict", files={"explain": (None, "false")}),
            "urlencoded": client.post("/api/predict", data={"files": "eye.jpg"}),
            "json": client.post("/api/predict", json={"files": []}),
        }
    expected = {
        "count": (413, "at most 2"),
        "size": (413, "huge.png"),
        "request": (413, "request too large"),
        "type": (415, "notes.txt"),
        "gif": (415, "anim.gif"),
        "none": (400, "no photograph"),
        "json": (415, "multipart/form-data"),
    }
    for case, (status, words) in expected.items():
        res = answers[case]
        assert res.status_code == status, (case, res.text)
        message = res.json()["error"]
        assert words in message, (case, message)
        assert "Traceback" not in message and "\n" not in message


def test_loopback_by_default_and_foreign_host_names_refused(onnx_model: Path) -> None:
    import inspect

    from medtune.cli.main import build_parser

    assert inspect.signature(serve).parameters["host"].default == "127.0.0.1"
    args = build_parser().parse_args(["serve", "--model", str(onnx_model)])
    assert args.host == "127.0.0.1" and args.port == 8000
    with TestClient(create_app(model_path=onnx_model), base_url=BASE) as client:
        assert client.get("/healthz").status_code == 200
        rebinding = client.get("/healthz", headers={"host": "attacker.example"})
    assert rebinding.status_code == 400


def test_page_loads_nothing_remote(onnx_model: Path) -> None:
    with TestClient(create_app(model_path=onnx_model), base_url=BASE) as client:
        page, js, css = client.get("/"), client.get("/page.js"), client.get("/page.css")
        docs = client.get("/docs")  # FastAPI's Swagger page would load a CDN: switched off
    for res in (page, js, css):
        assert res.status_code == 200
        assert "http://" not in res.text and "https://" not in res.text and "//cdn" not in res.text
    assert "default-src 'self'" in page.headers["content-security-policy"]
    assert "innerHTML" not in js.text  # file names and values are set as text, never markup
    assert docs.status_code == 404 and "error" in docs.json()


# ------------------------------------------------------------------------------ temp folder
def test_no_file_left_in_the_temp_folder_and_the_folder_removed_at_stop(
    onnx_model: Path, images: list[Path], tmp_path: Path
) -> None:
    temp = tmp_path / "temp"
    temp.mkdir()
    screener = Screener(model_path=onnx_model, temp_dir=temp)
    before = set(temp.rglob("*"))
    with TestClient(create_app(screener), base_url=BASE) as client:
        assert client.post("/api/predict", files=upload(images)).status_code == 200
        broken = [("files", ("x.png", b"\x89PNG\r\n\x1a\n" + b"\0" * 200, "image/png"))]
        assert client.post("/api/predict", files=broken).status_code == 415  # none readable
        assert client.post("/api/predict", files=upload([images[0]]) * 99).status_code == 413
        assert list(screener.temp_root.iterdir()) == []
    screener.close()
    assert not screener.temp_root.exists()
    assert set(temp.rglob("*")) - before == set()


# ------------------------------------------------------------------------------ DICOM
def test_dicom_patient_id_never_in_logs_or_answers(onnx_model: Path, tmp_path: Path, caplog):
    pydicom = pytest.importorskip("pydicom")
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    secret_id, secret_name = "PID-SECRET-4711", "Doe^Secretia"
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = SecondaryCaptureImageStorage, generate_uid()
    ds.PatientID, ds.PatientName, ds.Modality = secret_id, secret_name, "OP"
    ds.Rows, ds.Columns, ds.SamplesPerPixel = 40, 40, 3
    ds.PhotometricInterpretation, ds.PlanarConfiguration = "RGB", 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = np.full((40, 40, 3), 120, dtype=np.uint8).tobytes()
    path = tmp_path / "eye.dcm"
    ds.save_as(path, enforce_file_format=True)
    assert pydicom.dcmread(path).PatientID == secret_id
    caplog.set_level(logging.DEBUG)
    with TestClient(create_app(model_path=onnx_model), base_url=BASE) as client:
        res = client.post("/api/predict", files=upload([path]))
        csv_res = client.post("/api/predict.csv", files=upload([path]))
    assert res.status_code == 200 and [r["image"] for r in res.json()["rows"]] == ["eye.dcm"]
    for text in (res.text, csv_res.text, caplog.text):
        assert secret_id not in text and "Secretia" not in text


# ------------------------------------------------------------------------------ real server
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class LiveServer:
    """uvicorn serving the app on 127.0.0.1 in a thread, stopped on exit."""

    def __init__(self, app, port: int | None = None) -> None:  # noqa: ANN001
        import uvicorn

        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.05)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


def test_several_users_at_once_all_answered_with_their_own_rows(
    onnx_model: Path, images: list[Path]
) -> None:
    import httpx

    expected = {p.name: predict([p], model_path=onnx_model, progress=False)[0] for p in images}

    def one(i: int) -> tuple[str, dict]:
        path = images[i % len(images)]
        res = httpx.post(f"{server.url}/api/predict", files=upload([path]), timeout=60)
        assert res.status_code == 200, res.text
        return path.name, res.json()["rows"][0]

    with LiveServer(create_app(model_path=onnx_model)) as server, ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(one, range(12)))
    assert len(answers) == 12
    for name, row in answers:
        assert row["image"] == name
        assert row["p_referable"] == pytest.approx(expected[name]["p_referable"], abs=1e-9)


# ------------------------------------------------------------------------------ browser
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def browser_photographs(folder: Path) -> list[Path]:
    """A real fundus photograph, a heavily blurred copy of it, and a cat (scikit-image data)."""
    from skimage import data

    folder.mkdir(parents=True, exist_ok=True)
    retina = Image.fromarray(data.retina()).resize((512, 512))
    paths = [folder / "good_fundus.jpg", folder / "blurred_fundus.jpg", folder / "cat.png"]
    retina.save(paths[0], quality=92)
    retina.filter(ImageFilter.GaussianBlur(12)).save(paths[1], quality=92)
    Image.fromarray(data.chelsea()).save(paths[2])
    return paths


def playwright_api():  # noqa: ANN201
    """``playwright.sync_api``, or skip the test (``.ci/run`` installs playwright)."""
    return pytest.importorskip(
        "playwright.sync_api", reason="playwright is not installed (.ci/run installs it)"
    )


def launch_chromium(playwright):  # noqa: ANN001, ANN201
    return playwright.chromium.launch(
        executable_path=CHROMIUM,
        headless=True,
        args=[
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--no-first-run",
        ],
    )


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (.ci/run does)")
def test_page_end_to_end_in_headless_chromium(tiny_run: Path, tmp_path: Path) -> None:
    sync_api = playwright_api()
    photos = browser_photographs(tmp_path / "photos")
    gate = importlib.util.find_spec("medtune.evaluation.quality") is not None
    if gate:  # the three photographs are what they claim to be, judged as predict judges them
        from medtune.data.preprocess import prepare_image  # on the network's input
        from medtune.evaluation.quality import assess_quality
        from medtune.runs import RunFolder

        spec = RunFolder(tiny_run).read_card().input_spec
        inputs = [prepare_image(Image.open(p), spec.image_size, spec.fundus) for p in photos]
        verdicts = [assess_quality(x) for x in inputs]
        assert [(v.gradable, v.code) for v in verdicts] == [
            (True, "ok"),
            (False, "blur"),
            (False, "not_fundus"),
        ]
    remote: list[str] = []
    with LiveServer(create_app(run=tiny_run)) as server, sync_api.sync_playwright() as pw:
        browser = launch_chromium(pw)
        page = browser.new_page(accept_downloads=True)
        page.on(
            "request",
            lambda r: (
                None if r.url.startswith((server.url, "data:", "blob:")) else remote.append(r.url)
            ),
        )
        page.goto(server.url)
        page.wait_for_selector("#card-body table")  # the model card with its metrics
        assert "not a medical device" in page.inner_text("#card").lower()
        page.set_input_files("#files", [str(p) for p in photos])
        page.click("#screen")
        page.wait_for_selector("#batch:not([hidden])", timeout=60_000)
        cards = page.locator("article.photo")
        assert cards.count() == 3
        shown = {cards.nth(i).get_attribute("data-image"): cards.nth(i) for i in range(3)}
        assert set(shown) == {p.name for p in photos}
        for card in shown.values():
            assert card.locator("[data-role=grade]").count() == 1
            assert card.locator(".bars .num").count() == 5  # one probability per grade
            assert card.locator("figure img").count() == 1  # Grad-CAM
        header = page.locator("#table tr th").all_inner_texts()
        if gate:  # the image-quality gate is installed: predict's rows carry its verdict
            verdict = {
                n: c.locator(".badge").get_attribute("data-verdict") for n, c in shown.items()
            }
            assert verdict == {
                "good_fundus.jpg": "gradable",
                "blurred_fundus.jpg": "ungradable",
                "cat.png": "ungradable",
            }
            reason = shown["blurred_fundus.jpg"].locator(".reason").inner_text().lower()
            assert "focus" in reason or "blur" in reason
            assert header[:3] == ["image", "quality", "quality_reason"]
            decision = {n: c.locator("[data-role=decision]") for n, c in shown.items()}
            assert decision["blurred_fundus.jpg"].get_attribute("data-refer") == "ungradable"
            assert decision["cat.png"].get_attribute("data-refer") == "ungradable"
            good = decision["good_fundus.jpg"]  # refer or not, at the validated threshold
            assert good.get_attribute("data-refer") in ("yes", "no")
            rule = page.inner_text("#patient-result")  # the threshold with its validation
            assert "sensitivity" in rule and "specificity" in rule
        else:  # no gate, no verdict: the page may not invent one
            assert page.locator(".badge").count() == 0
        with page.expect_download() as download_info:
            page.click("#download")
        downloaded = Path(download_info.value.path()).read_text()
        page.screenshot(path=str(tmp_path / "page.png"), full_page=True)
        browser.close()
    assert remote == [], f"the page asked for remote assets: {remote}"
    out = tmp_path / "cli.csv"
    assert main(["predict", *map(str, photos), "--run", str(tiny_run), "--out", str(out)]) == 0
    page_rows = list(csv.DictReader(io.StringIO(downloaded)))
    cli_rows = list(csv.DictReader(out.open()))
    assert len(page_rows) == len(cli_rows) == 3
    for got, want in zip(page_rows, cli_rows, strict=True):
        assert got["image"] == Path(want["image"]).name
        assert list(got) == list(want)
        for key in want:
            if key.startswith("p_"):
                assert abs(float(got[key]) - float(want[key])) <= 1e-5, key
            elif key != "image":
                assert got[key] == want[key], key
