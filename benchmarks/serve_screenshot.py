"""Screenshots of ``medtune serve`` for the docs, taken in headless Chromium: a patient's result
(``docs/serve-patient.png``) and the worklist (``docs/serve-worklist.png``).

    python benchmarks/serve_screenshot.py --run RUN [--eyepacs ../shared/data/eyepacs-dev]
    python benchmarks/serve_screenshot.py --model RUN/export/model.onnx [...]   # the ONNX page

Serves ``RUN`` on 127.0.0.1 (a free port) with a fresh worklist and one grader, opens the page
in Debian's ``chromium`` through Playwright, logs in, and screens three patients of four
photographs each (two per eye; the second photograph of the left eye darkened until the quality
gate rejects it as underexposed): EyePACS patients' left and right photographs when
``--eyepacs`` is given, else scikit-image's fundus photograph. The first patient's left eye is
then corrected by the grader. Both pages are saved as palette-quantised PNGs; look at them before
committing them.
"""

from __future__ import annotations

import argparse
import csv
import shutil
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
PASSWORD = "screenshot-password"


def patients(eyepacs: Path | None, work: Path) -> list[tuple[str, list[Path]]]:
    """Three patients' four photographs each (right, right turned, left, left darkened)."""
    from PIL import Image, ImageEnhance
    from skimage import data

    pairs: list[tuple[str, Image.Image, Image.Image]] = []
    if eyepacs is not None:
        rows = list(csv.DictReader((eyepacs / "labels.csv").open()))
        by_patient: dict[str, dict[str, str]] = {}
        for row in rows:
            side = "left" if "left" in row["image"] else "right"
            by_patient.setdefault(row["patient_id"], {})[side] = row["image"]
        for pid, sides in list(by_patient.items())[:3]:
            open_ = [
                Image.open(eyepacs / "images" / Path(sides[s]).name) for s in ("right", "left")
            ]
            pairs.append((f"EP-{pid}", *open_))
    else:
        retina = Image.fromarray(data.retina()).resize((768, 768))
        for i in range(3):
            pairs.append((f"P-{101 + i}", retina.rotate(4 * i), retina.transpose(0).rotate(-3 * i)))
    out = []
    for name, right, left in pairs:
        folder = work / name
        folder.mkdir(parents=True)
        photos = {
            f"{name}_right_1.jpg": right,
            f"{name}_right_2.jpg": right.rotate(6),
            f"{name}_left_1.jpg": left,
            f"{name}_left_2.jpg": ImageEnhance.Brightness(left).enhance(0.15),
        }
        for file, img in photos.items():
            img.convert("RGB").save(folder / file, quality=92)
        out.append((name, [folder / f for f in photos]))
    return out


def save(raw: Path, out: Path) -> None:
    from PIL import Image

    image = Image.open(raw).convert("RGB")
    image.quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(out, optimize=True)
    print(f"{out}: {out.stat().st_size / 1024:.0f} KiB, {image.size}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--run")
    source.add_argument("--model", help="an exported model.onnx instead of a run folder")
    p.add_argument("--eyepacs", help="the eyepacs-dev folder (labels.csv with patient_id)")
    p.add_argument("--out-dir", default=str(REPO / "docs"))
    p.add_argument("--width", type=int, default=1280)
    args = p.parse_args(argv)

    import uvicorn
    from playwright.sync_api import sync_playwright

    from medtune.workflows.serve import create_app
    from medtune.worklist.db import open_database
    from medtune.worklist.users import Users

    work = Path(tempfile.mkdtemp(prefix="serve-shot-"))
    db = open_database(folder=work / "data")
    Users(db).add("grader", PASSWORD, "grader")
    db.close()
    people = patients(Path(args.eyepacs) if args.eyepacs else None, work / "photos")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    app = create_app(run=args.run, model_path=args.model, folder=work / "data")
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    out = Path(args.out_dir)
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(
                executable_path=shutil.which("chromium"),
                args=["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                      "--disable-component-update", "--no-first-run"],
            )  # fmt: skip
            page = browser.new_page(viewport={"width": args.width, "height": 900})
            page.goto(f"http://127.0.0.1:{port}/")
            page.fill("#username", "grader")
            page.fill("#password", PASSWORD)
            page.click("#login-button")
            page.wait_for_selector("#card-body dl")
            for name, photos in reversed(people):  # the first patient screened last: on screen
                page.fill("#patient", name)
                page.set_input_files("#files", [str(x) for x in photos])
                page.click("#screen")
                page.wait_for_selector(f"#patient-result h2:has-text('{name}')", timeout=120_000)
            left = page.locator('article.eye-summary[data-side="left"]')
            grade = int(left.locator("[data-role=review-grade]").input_value())
            left.locator("[data-role=review-grade]").select_option(str(min(grade + 1, 4)))
            left.locator("[data-role=review-save]").click()
            page.wait_for_selector(
                'article.eye-summary[data-side="left"] [data-role=review][data-grade]'
            )
            page.locator(
                'article.photo:has(.badge[data-verdict="ungradable"]) summary'
            ).first.click()
            page.screenshot(path=str(work / "patient.png"), full_page=True)
            page.click("#tab-worklist")
            page.wait_for_selector("#worklist-table tr[data-id]")
            page.screenshot(path=str(work / "worklist.png"), full_page=True)
            browser.close()
    finally:
        server.should_exit = True
        thread.join(timeout=30)
    save(work / "patient.png", out / "serve-patient.png")
    save(work / "worklist.png", out / "serve-worklist.png")
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
