"""The screenshot of ``medtune serve`` in ``docs/serve.png``, taken in headless Chromium.

    python benchmarks/serve_screenshot.py --run RUN [--photo PATH ...] [--out docs/serve.png]
    python benchmarks/serve_screenshot.py --model RUN/export/model.onnx [...]   # the ONNX page

Serves ``RUN`` on 127.0.0.1 (a free port), opens the page in Debian's ``chromium`` through
Playwright, uploads scikit-image's fundus photograph, a heavily blurred copy and its cat photograph
(plus any ``--photo``), waits for the results and saves the page (PNG, palette-quantised to stay
small). Look at it before committing it.
"""

from __future__ import annotations

import argparse
import shutil
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--run")
    source.add_argument("--model", help="an exported model.onnx instead of a run folder")
    p.add_argument("--photo", action="append", default=[])
    p.add_argument("--out", default=str(REPO / "docs" / "serve.png"))
    p.add_argument("--width", type=int, default=1280)
    args = p.parse_args(argv)

    import uvicorn
    from PIL import Image, ImageFilter
    from playwright.sync_api import sync_playwright
    from skimage import data

    from medtune.workflows.serve import create_app

    work = Path(tempfile.mkdtemp(prefix="serve-shot-"))
    retina = Image.fromarray(data.retina()).resize((768, 768))
    photos = [work / "good_fundus.jpg", work / "blurred_fundus.jpg", work / "cat.png"]
    retina.save(photos[0], quality=92)
    retina.filter(ImageFilter.GaussianBlur(18)).save(photos[1], quality=92)
    Image.fromarray(data.chelsea()).save(photos[2])
    photos += [Path(x) for x in args.photo]

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(run=args.run, model_path=args.model),
            host="127.0.0.1",
            port=port,
            log_level="warning",
        )
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(
                executable_path=shutil.which("chromium"),
                args=["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                      "--disable-component-update", "--no-first-run"],
            )  # fmt: skip
            page = browser.new_page(viewport={"width": args.width, "height": 900})
            page.goto(f"http://127.0.0.1:{port}/")
            page.wait_for_selector("#card-body dl")
            page.set_input_files("#files", [str(p) for p in photos])
            page.click("#screen")
            page.wait_for_selector("#batch:not([hidden])", timeout=120_000)
            raw = work / "raw.png"
            page.screenshot(path=str(raw), full_page=True)
            browser.close()
    finally:
        server.should_exit = True
        thread.join(timeout=30)
    image = Image.open(raw).convert("RGB")
    image.quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(args.out, optimize=True)
    print(f"{args.out}: {Path(args.out).stat().st_size / 1024:.0f} KiB, {image.size}")
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
