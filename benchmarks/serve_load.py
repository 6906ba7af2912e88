"""A bounded load check of ``medtune serve`` on loopback (a measurement, not a timed test).

    python benchmarks/serve_load.py --model RUN/export/model.onnx [--images FOLDER]
        [--clients 20] [--per-client 5] [--workers N] [--out docs/screening.md]

Starts ``medtune serve`` as a separate process on 127.0.0.1 (a free port), waits until it
answers, then lets ``--clients`` threads upload ``--per-client`` photographs each, all at once
(a barrier releases them together), in two modes:

* ``batch``: each client sends its photographs in ONE request (what the page does);
* ``single``: each client sends them one request per photograph, one after the other.

Every answer is checked: status 200, one row per photograph, in order, with the upload's name,
and probabilities equal (to 1e-6) to :func:`medtune.predict` on the same files in this process;
any failure is counted as lost and makes the exit status 1. Latency per photograph is the
request's wall time divided by the photographs it carried (``batch``), or the request's wall
time (``single``), measured at the client, so it includes queueing behind the other clients.

Prints the JSON result to stdout and rewrites the block between ``<!-- serve-load:begin -->``
and ``<!-- serve-load:end -->`` in ``--out``. Photographs: ``--images`` (default the EyePACS
development set in ``../shared/data/eyepacs-dev/images``, full-size clinic JPEGs, else
scikit-image's retina photograph saved as JPEG).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
from benchlib import REPO, rewrite_block

DEFAULT_IMAGES = REPO.parent / "shared" / "data" / "eyepacs-dev" / "images"
BEGIN, END = "<!-- serve-load:begin -->", "<!-- serve-load:end -->"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="an exported model.onnx")
    p.add_argument("--images", default=str(DEFAULT_IMAGES), help="folder of photographs")
    p.add_argument("--clients", type=int, default=20)
    p.add_argument("--per-client", type=int, default=5)
    p.add_argument("--workers", type=int, help="medtune serve --workers (default its own)")
    p.add_argument("--modes", default="batch,single", help="comma-separated: batch,single")
    p.add_argument("--out", default=str(REPO / "docs" / "screening.md"))
    p.add_argument("--no-doc", action="store_true", help="print only; leave --out alone")
    return p.parse_args(argv)


def photographs(folder: Path, n: int, work: Path) -> list[Path]:
    """``n`` photographs from ``folder`` (sorted), or copies of scikit-image's retina."""
    if folder.is_dir():
        found = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
        if len(found) >= n:
            return found[:n]
    from PIL import Image
    from skimage import data

    work.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        path = work / f"retina_{i:03d}.jpg"
        Image.fromarray(data.retina()).rotate(i * 3).save(path, quality=90)
        paths.append(path)
    return paths


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(model: str, port: int, workers: int | None) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "medtune.cli.main", "serve", "--model", model]
    cmd += ["--port", str(port), "--max-files", "50"]
    if workers:
        cmd += ["--workers", str(workers)]
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"medtune serve exited: {proc.stderr.read().decode()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit("medtune serve did not answer within 120 s")


def expected_rows(model: str, paths: list[Path]) -> dict[str, dict[str, Any]]:
    from medtune.workflows.predict import predict

    rows = predict(paths, model_path=model, progress=False)
    return {Path(r["image"]).name: r for r in rows}


def check(rows: list[dict], sent: list[Path], expected: dict[str, dict]) -> bool:
    if [r["image"] for r in rows] != [p.name for p in sent]:
        return False
    for row in rows:
        want = expected[row["image"]]
        for key, value in want.items():
            if isinstance(value, float) and abs(row[key] - value) > 1e-6:
                return False
    return True


def run_mode(
    mode: str, url: str, assignments: list[list[Path]], expected: dict[str, dict]
) -> dict[str, Any]:
    barrier = threading.Barrier(len(assignments))
    per_image: list[float] = []
    per_request: list[float] = []
    server_seconds: list[float] = []
    lost = 0
    lock = threading.Lock()

    def post(client: httpx.Client, paths: list[Path]) -> None:
        nonlocal lost
        files = [("files", (p.name, p.read_bytes(), "image/jpeg")) for p in paths]
        started = time.perf_counter()
        try:
            res = client.post(f"{url}/api/predict", files=files, timeout=300)
            ok = res.status_code == 200 and check(res.json()["rows"], paths, expected)
        except httpx.HTTPError:
            ok, res = False, None
        took = time.perf_counter() - started
        with lock:
            if not ok:
                lost += len(paths)
                return
            per_request.append(took)
            per_image.extend([took / len(paths)] * len(paths))
            server_seconds.append(res.json()["seconds"])

    def client_job(paths: list[Path]) -> None:
        with httpx.Client() as client:
            barrier.wait()
            if mode == "batch":
                post(client, paths)
            else:
                for path in paths:
                    post(client, [path])

    threads = [threading.Thread(target=client_job, args=(a,)) for a in assignments]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    sent = sum(len(a) for a in assignments)
    return {
        "mode": mode,
        "images": sent,
        "answered": sent - lost,
        "lost": lost,
        "requests": len(per_request),
        "wall_s": round(wall, 3),
        "images_per_s": round((sent - lost) / wall, 2),
        "per_image_p50_s": round(quantile(per_image, 0.50), 3),
        "per_image_p95_s": round(quantile(per_image, 0.95), 3),
        "per_image_max_s": round(max(per_image, default=float("nan")), 3),
        "request_p50_s": round(quantile(per_request, 0.50), 3),
        "request_p95_s": round(quantile(per_request, 0.95), 3),
        "server_predict_mean_s": round(statistics.fmean(server_seconds), 3)
        if server_seconds
        else None,
    }


def quantile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def load_average() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def markdown(result: dict[str, Any]) -> str:
    lines = [
        BEGIN,
        f"Generated by `python benchmarks/serve_load.py` on {result['when']} "
        f"({result['cpus']} CPU cores, {result['machine']}; load average before: "
        f"{result['load_before']}). Model: `{result['model_name']}` "
        f"({result['backbone']}, {result['image_size']} px, ONNX Runtime), "
        f"`--workers {result['workers']}`; photographs: {result['images_desc']}. "
        f"{result['clients']} clients x {result['per_client']} photographs, released together.",
        "",
        "| mode | photographs | answered | lost | wall (s) | photographs/s | per photograph "
        "p50 (s) | per photograph p95 (s) | request p50 (s) | request p95 (s) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for m in result["modes"]:
        lines.append(
            f"| {m['mode']} | {m['images']} | {m['answered']} | {m['lost']} | {m['wall_s']} | "
            f"{m['images_per_s']} | {m['per_image_p50_s']} | {m['per_image_p95_s']} | "
            f"{m['request_p50_s']} | {m['request_p95_s']} |"
        )
    lines.append(END)
    return "\n".join(lines)


def write_report(path: Path, block: str) -> None:
    rewrite_block(path, BEGIN, END, block, "# Screening")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sys.path.insert(0, str(REPO / "src"))
    n = args.clients * args.per_client
    paths = photographs(Path(args.images), n, Path("/tmp") / f"serve-load-{os.getpid()}")
    expected = expected_rows(args.model, paths)
    from medtune.evaluation.card import read_card

    card = read_card(Path(args.model).parent / "model.json")
    load_before = load_average()
    port = free_port()
    proc = start_server(args.model, port, args.workers)
    try:
        url = f"http://127.0.0.1:{port}"
        warm = [("files", (paths[0].name, paths[0].read_bytes(), "image/jpeg"))]
        httpx.post(f"{url}/api/predict", files=warm, timeout=120).raise_for_status()
        assignments = [
            paths[i * args.per_client : (i + 1) * args.per_client] for i in range(args.clients)
        ]
        modes = [run_mode(m, url, assignments, expected) for m in args.modes.split(",")]
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    result = {
        "when": dt.date.today().isoformat(),
        "cpus": os.cpu_count(),
        "machine": platform.machine(),
        "load_before": load_before,
        "model_name": Path(args.model).name,
        "backbone": card.backbone,
        "image_size": card.input_spec.image_size,
        "workers": args.workers or 2,
        "clients": args.clients,
        "per_client": args.per_client,
        "images_desc": (
            f"{n} files from `{Path(args.images).parent.name}/{Path(args.images).name}`"
            if Path(args.images).is_dir()
            else f"{n} rotated copies of scikit-image's retina"
        ),
        "modes": modes,
    }
    print(json.dumps(result, indent=1))
    if not args.no_doc:
        write_report(Path(args.out), markdown(result))
    return 1 if any(m["lost"] for m in modes) else 0


if __name__ == "__main__":
    sys.exit(main())
