"""medtune against fastai and a plain PyTorch/timm loop, in one invocation on one machine.

    python benchmarks/run.py [--data PATH] [--n-images N] [--epochs E] [--out docs/benchmarks.md]

Same backbone and weights (EfficientNet-Lite0 from ``medtune.models.create_backbone``), same
images (a seeded, stratified subset of ``--data``), image size, batch size and epochs for all.
Each contender's task runs in its own process (``worker.py``) so peak memory is its own.
Progress goes to stderr; the JSON result to stdout; the Markdown table to ``--out`` (between the
``bench:begin``/``bench:end`` markers when the file has them, so prose around them is kept).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

from benchlib import (
    DEFAULT_DATA,
    HERE,
    REPO,
    Spec,
    build_subset,
    check_data,
    machine,
    rewrite_block,
    say,
    write_lite0_weights,
)

TASKS = [
    ("medtune", "finetune"),
    ("medtune", "probe"),
    ("medtune", "infer"),
    ("fastai", "finetune"),
    ("fastai", "infer"),
    ("plain", "finetune"),
    ("plain", "infer"),
]
PEERS = ("fastai", "plain")
BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--data", default=str(DEFAULT_DATA), help="APTOS-style folder (labels.csv)")
    p.add_argument("--n-images", type=int, default=800, help="subset size (train + val)")
    p.add_argument("--val-fraction", type=float, default=0.25)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3, help="repeats of the short measurements")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", default=str(REPO / "runs" / "bench"), help="scratch folder")
    p.add_argument("--out", default=str(REPO / "docs" / "benchmarks.md"))
    p.add_argument("--only", nargs="*", choices=sorted({c for c, _ in TASKS}), help="contenders")
    return p.parse_args(argv)


# --------------------------------------------------------------------------- set-up


def make_spec(args: argparse.Namespace) -> Spec:
    work = Path(args.work).resolve()
    spec = Spec(
        data=str(Path(args.data).resolve()),
        work=str(work),
        n_train=0,
        n_val=0,
        image_size=args.image_size,
        batch_size=args.batch_size,
        epochs=args.epochs,
        seed=args.seed,
        repeats=args.repeats,
    )
    build_subset(spec, args.n_images, args.val_fraction)
    spec.weights_file = str(write_lite0_weights(work))
    return spec


def run_task(contender: str, task: str, spec_path: Path, work: Path) -> dict[str, Any]:
    out = work / f"result-{contender}-{task}.json"
    out.unlink(missing_ok=True)
    cmd = [sys.executable, str(HERE / "worker.py"), contender, task, str(spec_path), str(out)]
    say(f"--- {contender} {task}")
    proc = subprocess.run(cmd, stdout=sys.stderr, stderr=sys.stderr, cwd=str(REPO))
    if proc.returncode != 0 or not out.is_file():
        raise SystemExit(f"{contender} {task} failed (exit {proc.returncode}); see the log above")
    return json.loads(out.read_text(encoding="utf-8"))


# --------------------------------------------------------------------------- figures


def _full_epochs(ft: dict[str, Any]) -> list[dict[str, Any]]:
    return [e for e in ft["epochs"] if e["phase"] == "full"]


def time_to_qwk(ft: dict[str, Any], target: float) -> float | None:
    """Seconds from the contender's start to the end of the first epoch at or above ``target``."""
    for e in ft["epochs"]:
        if e["val_qwk"] is not None and e["val_qwk"] >= target - 1e-9:
            return e["t_end"]
    return None


def fastest_to(ft: dict[str, Any], probe: dict[str, Any] | None, target: float) -> float | None:
    """The sooner of: the fine-tuning epoch reaching ``target``, or the probe when it does."""
    times = [time_to_qwk(ft, target)]
    if probe is not None and probe["val_qwk"] >= target - 1e-9:
        times.append(probe["total_s"])
    known = [t for t in times if t is not None]
    return min(known) if known else None


def figures(results: dict[str, dict[str, Any]], target_qwk: float) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for name, r in results.items():
        ft, infer = r["finetune"], r["infer"]
        full = _full_epochs(ft)
        probe = r.get("probe")
        out[name] = {
            "train_images_per_s": sum(e["images"] for e in full) / sum(e["train_s"] for e in full),
            # medtune's whole run (cache, model, epochs, finalisation, site-shift fit) counted
            "train_images_per_s_startup": sum(e["images"] for e in full) / ft["total_s"]
            if name == "medtune"
            else None,
            "seconds_per_epoch": statistics.median(e["train_s"] + e["val_s"] for e in full),
            "features_images_per_s": infer["features_images_per_s"],
            "probe_model_s": probe["total_s"] if probe else ft.get("frozen_s"),
            "probe_val_qwk": probe["val_qwk"] if probe else ft.get("frozen_val_qwk"),
            "time_to_target_qwk_s": time_to_qwk(ft, target_qwk),
            "time_to_target_any_s": fastest_to(ft, probe, target_qwk),
            "finetune_total_s": ft["total_s"],
            "final_val_qwk": ft["final_val_qwk"],
            "predict_images_per_s": infer["predict_images_per_s"],
            "predict_model_only_images_per_s": infer.get("predict_model_only_images_per_s"),
            "peak_rss_mb": ft["peak_rss"]["self_mb"],
            "peak_rss_worker_mb": ft["peak_rss"]["largest_child_mb"],
        }
    return out


ROWS = [  # key, label, better ("high"/"low"/"qwk"), format
    ("train_images_per_s", "fine-tuning, training images/s", "high", "{:.1f}"),
    (
        "train_images_per_s_startup",
        "fine-tuning images/s, medtune's start-up and finalisation included",
        "high",
        "{:.1f}",
    ),
    ("seconds_per_epoch", "seconds per epoch (train + val)", "low", "{:.1f}"),
    ("features_images_per_s", "feature extraction, images/s", "high", "{:.1f}"),
    ("probe_model_s", "scenario-1 model, end-to-end s", "low", "{:.1f}"),
    ("probe_val_qwk", "scenario-1 model, val QWK", "qwk", "{:.3f}"),
    ("time_to_target_qwk_s", "time to fastai's final val QWK by fine-tuning, s", "low", "{:.1f}"),
    ("time_to_target_any_s", "time to fastai's final val QWK, fastest route, s", "low", "{:.1f}"),
    ("finetune_total_s", "fine-tuning run, end-to-end s", "low", "{:.1f}"),
    ("final_val_qwk", "final val QWK (last epoch)", "qwk", "{:.3f}"),
    ("predict_images_per_s", "prediction from files, images/s", "high", "{:.1f}"),
    ("predict_model_only_images_per_s", "prediction, prepared images, images/s", "high", "{:.1f}"),
    ("peak_rss_mb", "peak RSS fine-tuning, MB", "low", "{:.0f}"),
]


def advantage(mine: float | None, peer: float | None, better: str) -> str:
    """How many times better medtune is (or the QWK difference)."""
    if mine is None or peer is None:
        return "n/a"
    if better == "qwk":
        return f"{mine - peer:+.3f}"
    if better == "high":
        return f"{mine / peer:.2f}x" if peer else "n/a"
    return f"{peer / mine:.2f}x" if mine else "n/a"


def _fmt(value: float | None, fmt: str) -> str:
    return "n/a" if value is None else fmt.format(value)


def markdown_table(figs: dict[str, dict[str, Any]]) -> str:
    peers = [p for p in PEERS if p in figs]
    head = ["figure", "medtune", *peers, *(f"medtune vs {p}" for p in peers)]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for key, label, better, fmt in ROWS:
        mine = figs["medtune"][key]
        cells = [label, _fmt(mine, fmt), *(_fmt(figs[p][key], fmt) for p in peers)]
        cells += [advantage(mine, figs[p][key], better) for p in peers]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def targets(figs: dict[str, dict[str, Any]], results: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets, each with its measured value and whether it is met."""
    m, out = figs["medtune"], []

    def add(name: str, value: float | None, goal: str, ok: bool) -> None:
        out.append({"target": name, "value": value, "goal": goal, "met": bool(ok)})

    if "fastai" in figs:
        f = figs["fastai"]
        r = m["train_images_per_s"] / f["train_images_per_s"]
        add("fine-tuning images/s vs fastai", r, ">= 3x", r >= 3)
        r = m["train_images_per_s_startup"] / f["train_images_per_s"]
        add("fine-tuning images/s vs fastai, medtune's start-up included", r, ">= 3x", r >= 3)
        r = f["probe_model_s"] / m["probe_model_s"]
        add("scenario-1 model sooner than fastai's frozen-body result", r, ">= 10x", r >= 10)
        d = m["probe_val_qwk"] - f["probe_val_qwk"]
        add("scenario-1 val QWK minus fastai frozen-body QWK", d, ">= 0", d >= 0)
        t = m["time_to_target_any_s"]
        frac = None if t is None else t / f["finetune_total_s"]
        add(
            "time to fastai's final QWK / fastai's time",
            frac,
            "<= 1/3",
            frac is not None and frac <= 1 / 3,
        )
    if "plain" in figs:
        r = m["train_images_per_s"] / figs["plain"]["train_images_per_s"]
        add("fine-tuning images/s vs plain loop", r, ">= 2x", r >= 2)
    p = m["predict_images_per_s"]
    add("prediction images/s (from files)", p, ">= 150", p >= 150)
    mo = results["medtune"]["infer"]["predict_model_only_images_per_s"]
    add("prediction images/s (model only, prepared images)", mo, ">= 150", mo >= 150)
    add("peak RSS fine-tuning (MB)", m["peak_rss_mb"], "<= 3072", m["peak_rss_mb"] <= 3072)
    return out


def versions() -> str:
    from importlib.metadata import PackageNotFoundError, version

    parts = []
    for pkg in ("torch", "timm", "lightning", "fastai", "medtune"):
        try:
            parts.append(f"{pkg} {version(pkg)}")
        except PackageNotFoundError:
            parts.append(f"{pkg} (not installed)")
    return ", ".join(parts)


def report_md(spec: Spec, figs: dict[str, Any], goals: list[dict[str, Any]], when: str) -> str:
    rows = ["| target | measured | goal | met |", "| --- | --- | --- | --- |"]
    for g in goals:
        value = "not reached" if g["value"] is None else f"{g['value']:.3g}"
        rows.append(f"| {g['target']} | {value} | {g['goal']} | {'yes' if g['met'] else 'NO'} |")
    return "\n".join(
        [
            BEGIN,
            f"Measured {when} on {machine()}; {versions()}.",
            "",
            f"Data: {spec.n_train} training + {spec.n_val} validation images of "
            f"`{Path(spec.data).name}` (seed {spec.seed}, stratified, one image per duplicate "
            f"group), {spec.image_size} px, batch {spec.batch_size}, {spec.epochs} epochs "
            f"(fastai's `fine_tune({spec.epochs})` adds its one frozen-body epoch), "
            f"{spec.repeats} repeats (median) for feature extraction and prediction.",
            "",
            markdown_table(figs),
            "",
            rows[0],
            *rows[1:],
            END,
        ]
    )


def write_report(path: Path, block: str) -> None:
    rewrite_block(
        path,
        BEGIN,
        END,
        block,
        "# Benchmarks\n\nGenerated by `make bench` (`python benchmarks/run.py`).",
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    problem = check_data(Path(args.data))
    if problem:
        print(
            f"benchmarks/run.py needs the APTOS 2019 images at 224 px (labels.csv + images/, "
            f"optional metadata.csv with dup_group): {problem}. Pass --data PATH.",
            file=sys.stderr,
        )
        return 2
    when = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    spec = make_spec(args)
    spec_path = work / "spec.json"
    spec.to_json(spec_path)
    say(f"subset: {spec.n_train} train + {spec.n_val} val at {spec.image_size} px in {work}")
    results: dict[str, dict[str, Any]] = {}
    for contender, task in TASKS:
        if args.only and contender not in args.only:
            continue
        results.setdefault(contender, {})[task] = run_task(contender, task, spec_path, work)
    target = results.get("fastai", {}).get("finetune", {}).get("final_val_qwk")
    figs = figures(results, target if target is not None else 1.0)
    goals = targets(figs, results) if "medtune" in figs else []
    if "medtune" in figs:
        write_report(Path(args.out), report_md(spec, figs, goals, when))
        say(f"wrote {args.out}")
    print(
        json.dumps(
            {
                "when": when,
                "machine": machine(),
                "spec": spec.__dict__,
                "figures": figs,
                "targets": goals,
                "raw": results,
            },
            indent=1,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
