"""A bounded load check of ``medtune serve`` and its worklist on loopback (a measurement, not a
timed test).

    python benchmarks/serve_load.py --model RUN/export/model.onnx [--images FOLDER]
        [--clients 20] [--patients 5] [--photos 4] [--workers N] [--db URL]
        [--kill-after N] [--out docs/screening.md] [--no-doc]

Makes a fresh data folder with one user per client, starts ``medtune serve`` as a separate
process on 127.0.0.1 (a free port) and lets ``--clients`` threads log in and screen
``--patients`` patients each, all at once (a barrier releases them together); a patient is
``--photos`` photographs, half of them right eye, half left. Every answer is checked: status 200,
one row per photograph, in order, with probabilities equal (to 1e-6) to :func:`medtune.predict`
on the same files. Then the worklist database is read directly: every answered screening must be
there EXACTLY once, with all its photographs and both eyes; any failure makes the exit status 1.

``--kill-after N`` kills the server with SIGKILL once N screenings were answered, restarts it on
the same database, and checks that no answered (committed) screening was lost and that no stored
screening is half-written (every one has all its photographs and eyes); the clients then carry on
with the patients they had left (a patient whose request was cut off by the kill is screened
again after the restart; if the kill fell between the commit and the answer, that patient is
then stored twice, which is counted and reported as ``resent_twice``, not as a loss).

Prints the JSON result to stdout and, unless ``--no-doc``, rewrites the block between
``<!-- serve-load:begin -->`` and ``<!-- serve-load:end -->`` in ``--out``. Photographs:
``--images`` (default the EyePACS development set in ``../shared/data/eyepacs-dev/images``,
full-size clinic JPEGs, else scikit-image's retina photograph saved as JPEG).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
from benchlib import REPO, machine, rewrite_block

DEFAULT_IMAGES = REPO.parent / "shared" / "data" / "eyepacs-dev" / "images"
BEGIN, END = "<!-- serve-load:begin -->", "<!-- serve-load:end -->"
PASSWORD = "load-test-password"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="an exported model.onnx")
    p.add_argument("--images", default=str(DEFAULT_IMAGES), help="folder of photographs")
    p.add_argument("--clients", type=int, default=20)
    p.add_argument("--patients", type=int, default=5, help="patients per client")
    p.add_argument("--photos", type=int, default=4, help="photographs per patient (even)")
    p.add_argument("--workers", type=int, help="medtune serve --workers (default its own)")
    p.add_argument("--db", help="worklist database URL (default SQLite in a fresh data folder)")
    p.add_argument("--kill-after", type=int, help="SIGKILL the server after N screenings")
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


def medtune(*args: str, stdin: str | None = None) -> None:
    cmd = [sys.executable, "-m", "medtune.cli.main", *args]
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    subprocess.run(cmd, env=env, input=stdin, text=True, check=True, capture_output=True)


def start_server(args: argparse.Namespace, folder: Path, port: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "medtune.cli.main", "serve", "--model", args.model]
    cmd += ["--port", str(port), "--max-files", "50", "--data-dir", str(folder)]
    if args.workers:
        cmd += ["--workers", str(args.workers)]
    if args.db:
        cmd += ["--db", args.db]
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


def rows_match(rows: list[dict], sent: list[str], expected: dict[str, dict]) -> bool:
    if [r["image"] for r in rows] != sent:
        return False
    for row in rows:
        want = expected[row["image"].split("__", 1)[1]]
        for key, value in want.items():
            if isinstance(value, float) and abs(row[key] - value) > 1e-6:
                return False
    return True


class Load:
    """The clients' shared record: answers, latencies, failures."""

    def __init__(self, args: argparse.Namespace, url: str, paths: list[Path], expected: dict):
        self.args, self.url, self.paths, self.expected = args, url, paths, expected
        self.lock = threading.Lock()
        self.answered: dict[str, str] = {}  # patient -> screening id
        self.latency: list[float] = []
        self.wrong = 0
        self.cut_off: set[str] = set()
        self.killed = threading.Event()

    def patient(self, client: int, k: int) -> tuple[str, list[tuple], list[str]]:
        n = self.args.photos
        start = ((client * self.args.patients + k) * n) % len(self.paths)
        chosen = [self.paths[(start + j) % len(self.paths)] for j in range(n)]
        patient = f"LOAD-{client:02d}-{k:02d}"
        files = [
            ("files", (f"{patient}_{j}__{p.name}", p.read_bytes())) for j, p in enumerate(chosen)
        ]
        return patient, files, ["right" if j < n // 2 else "left" for j in range(n)]

    def screen(self, http: httpx.Client, csrf: str, client: int, k: int) -> bool:
        patient, files, sides = self.patient(client, k)
        started = time.perf_counter()
        try:
            res = http.post(
                f"{self.url}/api/predict",
                files=files,
                data={"patient": patient, "eye": sides},
                headers={"X-CSRF-Token": csrf},
                timeout=600,
            )
        except httpx.HTTPError:
            with self.lock:
                self.cut_off.add(patient)
            return False
        took = time.perf_counter() - started
        sent = [f[1][0] for f in files]
        with self.lock:
            if res.status_code != 200 or not rows_match(res.json()["rows"], sent, self.expected):
                self.wrong += 1
                return False
            self.answered[patient] = res.json()["screening"]["id"]
            self.latency.append(took)
            done = len(self.answered)
        if self.args.kill_after and done >= self.args.kill_after:
            self.killed.set()
        return True


def client_job(load: Load, client: int, barrier: threading.Barrier, resume: threading.Event):
    with httpx.Client() as http:
        csrf = login(http, load.url, client)
        barrier.wait()
        k = 0
        while k < load.args.patients:
            if load.screen(http, csrf, client, k):
                k += 1
                continue
            if not load.args.kill_after or not resume.wait(timeout=300):
                k += 1  # counted as wrong or cut off; go on
                continue
            csrf = login(http, load.url, client)  # the same session works; a fresh one is simpler


def login(http: httpx.Client, url: str, client: int) -> str:
    for _ in range(100):
        try:
            res = http.post(
                f"{url}/api/login", json={"username": f"load{client:02d}", "password": PASSWORD}
            )
            res.raise_for_status()
            return res.json()["csrf"]
        except httpx.HTTPError:
            time.sleep(0.5)  # the server is restarting
    raise SystemExit("could not log in")


def check_database(url: str | None, folder: Path, photos: int) -> dict[str, Any]:
    """Screenings per patient, and the ones missing photographs or an eye (half-written)."""
    from sqlalchemy import func, select

    from medtune.worklist.db import open_database
    from medtune.worklist.models import Eye, ImageRecord, Screening

    db = open_database(url, folder=folder)
    try:
        with db.session() as s:
            per_patient = dict(
                s.execute(select(Screening.patient, func.count()).group_by(Screening.patient)).all()
            )
            images = dict(
                s.execute(
                    select(ImageRecord.screening_id, func.count()).group_by(
                        ImageRecord.screening_id
                    )
                ).all()
            )
            eyes = dict(
                s.execute(select(Eye.screening_id, func.count()).group_by(Eye.screening_id)).all()
            )
            ids = list(s.scalars(select(Screening.id)))
    finally:
        db.close()
    torn = [i for i in ids if images.get(i) != photos or eyes.get(i) != 2]
    return {"per_patient": per_patient, "ids": set(ids), "torn": torn}


def run(args: argparse.Namespace, paths: list[Path], expected: dict, folder: Path) -> dict:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start_server(args, folder, port)
    load = Load(args, url, paths, expected)
    barrier, resume = threading.Barrier(args.clients), threading.Event()
    threads = [
        threading.Thread(target=client_job, args=(load, c, barrier, resume))
        for c in range(args.clients)
    ]
    started = time.perf_counter()
    for t in threads:
        t.start()
    kill = {}
    try:
        if args.kill_after:
            load.killed.wait()
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            with load.lock:
                answered_before = dict(load.answered)
            kill = check_database(args.db, folder, args.photos)
            kill = {
                "answered_before_kill": len(answered_before),
                "lost": sorted(set(answered_before.values()) - kill["ids"]),
                "torn": kill["torn"],
            }
            proc = start_server(args, folder, port)
            resume.set()
        for t in threads:
            t.join()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    wall = time.perf_counter() - started
    final = check_database(args.db, folder, args.photos)
    expected_patients = args.clients * args.patients
    counts = final["per_patient"]
    return {
        "patients": expected_patients,
        "answered": len(load.answered),
        "wrong_answers": load.wrong,
        "stored_once": sum(1 for p in load.answered if counts.get(p) == 1),
        "missing": sorted(p for p, i in load.answered.items() if i not in final["ids"]),
        "resent_twice": sorted(p for p, n in counts.items() if n > 1),
        "torn": final["torn"],
        "kill": kill,
        "wall_s": round(wall, 3),
        "patients_per_s": round(len(load.answered) / wall, 3),
        "request_p50_s": round(quantile(load.latency, 0.50), 3),
        "request_p95_s": round(quantile(load.latency, 0.95), 3),
        # a request screens one patient (--photos photographs): its latency per photograph
        "photo_p95_s": round(quantile([t / args.photos for t in load.latency], 0.95), 3),
    }


def quantile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def markdown(result: dict[str, Any]) -> str:
    r = result["run"]
    kill = r["kill"]
    lines = [
        BEGIN,
        f"Generated by `python benchmarks/serve_load.py` on {result['when']} "
        f"({result['machine']}). Model: `{result['model_name']}` "
        f"({result['backbone']}, {result['image_size']} px, ONNX Runtime); {result['clients']} "
        f"logged-in clients x {result['patients']} patients x {result['photos']} photographs, "
        f"released together; worklist: {result['db']}.",
        "",
        "| patients | answered | stored exactly once | missing | half-written | wall (s) | "
        "patients/s | request p50 (s) | request p95 (s) | p95 per photograph (s) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        f"| {r['patients']} | {r['answered']} | {r['stored_once']} | {len(r['missing'])} | "
        f"{len(r['torn'])} | {r['wall_s']} | {r['patients_per_s']} | {r['request_p50_s']} | "
        f"{r['request_p95_s']} | {r.get('photo_p95_s', 'n/a')} |",
    ]
    if kill:
        lines += [
            "",
            f"SIGKILL after {kill['answered_before_kill']} answered screenings: "
            f"{len(kill['lost'])} of them lost, {len(kill['torn'])} half-written.",
        ]
    lines.append(END)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sys.path.insert(0, str(REPO / "src"))
    work = Path(tempfile.mkdtemp(prefix="serve-load-"))
    folder = work / "data"
    n = max(args.photos, min(100, args.clients * args.patients * args.photos))
    paths = photographs(Path(args.images), n, work / "photos")
    expected = expected_rows(args.model, paths)
    for c in range(args.clients):
        where = ["--data-dir", str(folder)] + (["--db", args.db] if args.db else [])
        medtune("users", "add", f"load{c:02d}", "--password-stdin", *where, stdin=PASSWORD + "\n")
    from medtune.evaluation.card import read_card

    card = read_card(Path(args.model).parent / "model.json")
    result = {
        "when": dt.date.today().isoformat(),
        "cpus": os.cpu_count(),
        "machine": machine(),
        "model_name": Path(args.model).name,
        "backbone": card.backbone,
        "image_size": card.input_spec.image_size,
        "workers": args.workers or 2,
        "clients": args.clients,
        "patients": args.patients,
        "photos": args.photos,
        "db": "PostgreSQL" if args.db else "SQLite",
        "run": run(args, paths, expected, folder),
    }
    print(json.dumps(result, indent=1, default=list))
    if not args.no_doc:
        rewrite_block(Path(args.out), BEGIN, END, markdown(result), "# Screening")
    r = result["run"]
    bad = r["wrong_answers"] or r["missing"] or r["torn"]
    bad = bad or (r["kill"] and (r["kill"]["lost"] or r["kill"]["torn"]))
    bad = bad or (not args.kill_after and r["stored_once"] != r["patients"])
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
