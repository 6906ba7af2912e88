"""Prediction from files, process start included, and where each millisecond goes.

    python benchmarks/predict_speed.py --run RUN [--shared PATH] [--repeats R] [--json OUT]
                                       [--no-doc]

For each image set (the last 733 APTOS 224 px PNGs, every eyepacs-dev JPEG of about 1024 px,
every idrid-800 JPEG of 800 px, all under ``--shared``) it times, in one run:

* ``medtune predict --run RUN`` and ``medtune predict --model RUN-export/model.onnx`` as a user
  runs them: a new process each, from the files to the CSV, the quality gate and the site-shift
  score on; images/s = images / wall seconds, the best of ``--repeats``; and the two CSVs'
  agreement (largest probability difference; grades, quality verdicts and referral decisions
  identical or not);
* a per-stage profile of the same work in one process, one thread for the front end (decode,
  field-of-view crop and resize, quality gate, normalisation of 32-image batches) and the
  engine's own threads for the model (its logits and features, normalisation included):
  milliseconds per image for each stage, from ``time.perf_counter``.

The export is made once (``medtune export``) into a temporary folder. Prints JSON to stdout and
rewrites the prediction table of ``docs/performance.md`` (unless ``--no-doc``), naming the CPU.
Run it on an otherwise idle machine; exits 2 when the shared data is absent.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from benchlib import REPO, machine, rewrite_block, say

BEGIN, END = "<!-- predict:begin -->", "<!-- predict:end -->"
SETS = {"aptos2019-224": 733, "eyepacs-dev": 0, "idrid-800": 0}  # 0: every image
MEDTUNE = [sys.executable, "-m", "medtune.cli.main"]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--run", required=True, help="a finished medtune run")
    p.add_argument("--shared", default=str(REPO.parent / "shared" / "data"))
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--json", help="also write the JSON result here")
    p.add_argument("--no-doc", action="store_true", help="do not rewrite docs/performance.md")
    return p.parse_args(argv)


def image_folder(shared: Path, name: str, n: int, work: Path) -> Path:
    """A folder of symlinks to the set's images (the last ``n`` in name order; 0: all)."""
    files = sorted((shared / name / "images").iterdir())
    files = files[-n:] if n else files
    folder = work / name
    folder.mkdir()
    for f in files:
        (folder / f.name).symlink_to(f.resolve())
    return folder


def end_to_end(source: list[str], folder: Path, out: Path, repeats: int) -> tuple[float, Path]:
    """Best wall seconds of ``medtune predict`` in a new process, and its CSV."""
    best = np.inf
    for _ in range(repeats):
        for stale in out.parent.glob(out.stem + "*"):
            stale.unlink()
        started = time.perf_counter()
        subprocess.run([*MEDTUNE, "predict", *source, str(folder), "--out", str(out)], check=True,
                       capture_output=True)  # fmt: skip
        best = min(best, time.perf_counter() - started)
    return best, out


def agreement(a: Path, b: Path) -> dict[str, Any]:
    """How far two prediction CSVs of the same images are apart."""
    rows = []
    for path in (a, b):
        with open(path, encoding="utf-8") as fh:
            rows.append(list(csv.DictReader(fh)))
    pairs = list(zip(*rows, strict=True))
    keys = [k for k in rows[0][0] if k.startswith("p_")]
    diff = max(abs(float(x[k]) - float(y[k])) for x, y in pairs for k in keys if x[k])
    same = {
        col: all(x[col] == y[col] for x, y in pairs)
        for col in ("grade", "quality", "refer")
        if col in rows[0][0]
    }
    return {"max_abs_prob_diff": diff, **{f"same_{k}": v for k, v in same.items()}}


def stages(run: Path, folder: Path) -> dict[str, float]:
    """Milliseconds per image of each stage of ``predict``, in this process."""
    from medtune.data.normalise import normalise_images
    from medtune.data.preprocess import decode_source, prepare_image
    from medtune.deploy.engine import run_scorer
    from medtune.evaluation.quality import assess_quality, working_side
    from medtune.runs import RunFolder
    from medtune.workflows.predict import to_csv

    scorer = run_scorer(RunFolder(run))
    spec = scorer.card.input_spec
    files = sorted(folder.iterdir())
    clock: dict[str, float] = {}

    def timed(name: str, fn: Any) -> Any:
        started = time.perf_counter()
        value = fn()
        clock[name] = (time.perf_counter() - started) * 1000 / len(files)
        return value

    decoded = timed(
        "decode",
        lambda: [decode_source(str(f), min_side=working_side(spec.image_size)) for f in files],
    )
    images = timed(
        "crop_resize",
        lambda: np.stack([prepare_image(d, spec.image_size, spec.fundus) for d in decoded]),
    )
    timed("quality_gate", lambda: [assess_quality(im) for im in images])
    step = scorer.batch_size  # as predict runs them: a batch at a time
    timed("normalise", lambda: [normalise_images(images[i : i + step], spec.mean, spec.std)
                                for i in range(0, len(images), step)])  # fmt: skip
    logits, feats = timed("model", lambda: scorer.logits_and_features(images))
    timed("site_shift", lambda: scorer.site_shift.score(feats))
    rows = [{"image": str(f), "logit": float(z[0])} for f, z in zip(files, logits, strict=True)]
    timed("write_csv", lambda: to_csv(rows))
    return {k: round(v, 3) for k, v in clock.items()}


def table(result: dict[str, Any]) -> str:
    lines = [
        "| images | n | `predict --run`, images/s | `predict --model`, images/s | run vs model |"
        " decode | crop + resize | quality gate | normalise | model (normalising too) |"
        " site shift | CSV |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, r in result["sets"].items():
        s, a = r["stages_ms_per_image"], r["agreement"]
        same = all(v for k, v in a.items() if k.startswith("same_"))
        lines.append(
            f"| {name} | {r['n']} | {r['run_images_per_s']} | {r['model_images_per_s']} | "
            f"max prob diff {a['max_abs_prob_diff']:.1g}, "
            f"{'identical' if same else 'DIFFERENT'} grades/quality/referrals | "
            + " | ".join(f"{s[k]:.2f}" for k in STAGES)
            + " |"
        )
    return (
        f"{BEGIN}\n_Generated by `python benchmarks/predict_speed.py --run RUN` on "
        f"{result['machine']}; run `{result['run']}`; images/s from the files, a new process "
        "each (process start included), best of "
        f"{result['repeats']}; stages in milliseconds per image (one thread for the front end)._"
        "\n\n" + "\n".join(lines) + f"\n{END}"
    )


STAGES = ("decode", "crop_resize", "quality_gate", "normalise", "model", "site_shift", "write_csv")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    shared, run = Path(args.shared), Path(args.run).resolve()
    if not all((shared / name / "images").is_dir() for name in SETS):
        print(f"needs {', '.join(SETS)} under {shared}", file=sys.stderr)
        return 2
    result: dict[str, Any] = {
        "machine": machine(),
        "run": run.name,
        "repeats": args.repeats,
        "sets": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        export = work / "export"
        subprocess.run([*MEDTUNE, "export", "--run", str(run), "--out", str(export)], check=True,
                       capture_output=True)  # fmt: skip
        for name, n in SETS.items():
            folder = image_folder(shared, name, n, work)
            say(f"{name}: predict --run / --model")
            run_s, a = end_to_end(
                ["--run", str(run)], folder, work / f"{name}-run.csv", args.repeats
            )
            onnx = ["--model", str(export / "model.onnx")]
            model_s, b = end_to_end(onnx, folder, work / f"{name}-model.csv", args.repeats)
            count = len(os.listdir(folder))
            result["sets"][name] = {
                "n": count,
                "run_images_per_s": round(count / run_s, 1),
                "model_images_per_s": round(count / model_s, 1),
                "agreement": agreement(a, b),
                "stages_ms_per_image": stages(run, folder),
            }
            say(f"{name}: {result['sets'][name]}")
    print(json.dumps(result, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1), encoding="utf-8")
    if not args.no_doc:
        rewrite_block(REPO / "docs" / "performance.md", BEGIN, END, table(result), "# Performance")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
