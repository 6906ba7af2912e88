"""Cross-site benchmark: train on APTOS 2019, score at home and at a second site (EyePACS).

    python benchmarks/sites.py [--shared PATH] [--recipes a,b] [--work DIR] [--quick]
    python benchmarks/sites.py --loso ...   # leave-one-site-out (make bench-sites): sites_loso.py

Every recipe is trained by ``medtune.train`` on ``aptos2019-224`` with its own group-aware split
(70/15/15; APTOS duplicate groups stay on one side), then ``medtune.evaluate`` scores it on the
held-out APTOS test split and on every image of ``eyepacs-dev`` (patients kept together in the
bootstrap). Reported per recipe and data set: QWK, referable-DR AUC, and referable sensitivity
and specificity at the operating points chosen on APTOS VALIDATION (sens90 and the Youden
headline point), each with its 95% interval, the share of images the site-shift score flags,
and the training wall time. eyepacs-dev labels are only ever used to score: no training,
checkpoint or threshold selection sees them, and ``finetune+adabn`` (``medtune adapt``) sees its
images unlabelled.

Prints the JSON result to stdout, progress to stderr, and rewrites the generated table between
``<!-- sites:begin -->`` and ``<!-- sites:end -->`` in ``docs/generalisation.md``. Exits 2 when
the shared data is absent. ``--quick`` (a few hundred images, 1 epoch) only checks that the
script runs end to end: its figures are a smoke test and never written into the document.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from benchlib import REPO, rewrite_block, say

TABLE = "sites"  # the generated block <!-- sites:begin --> ... <!-- sites:end -->
HOME, ABROAD = "aptos2019-224", "eyepacs-dev"
DOC = REPO / "docs" / "generalisation.md"
QUICK_HOME, QUICK_ABROAD = 240, 120  # images of each set in --quick


@dataclass(frozen=True)
class Recipe:
    """One way to train (and optionally adapt or test-time augment) a model on APTOS."""

    name: str
    lever: str
    train: dict[str, Any] = field(default_factory=dict)
    adapt: bool = False  # AdaBN on eyepacs-dev's images, unlabelled (medtune adapt)
    tta: str = "none"
    base: str | None = None  # reuse another recipe's trained run


RECIPES = {
    r.name: r
    for r in (
        Recipe(
            "finetune",
            "the default fine-tune at the commit named above (Lite0, 10 epochs, first 4 stages "
            "frozen, rot90; site augmentation once it became the default)",
        ),
        Recipe(
            "finetune-no-aug",
            "fine-tune without site augmentation (rot90 only, the earlier default)",
            {"augment": []},
        ),
        Recipe("linear-probe", "the default linear probe", {"strategy": "linear-probe"}),
        Recipe(
            "finetune+adabn",
            "fine-tune, then AdaBN on eyepacs-dev's unlabelled images",
            adapt=True,
            base="finetune",
        ),
        Recipe("finetune+tta", "fine-tune scored with rot90 TTA", tta="rot90", base="finetune"),
        Recipe(
            "linear-probe+ben-graham",
            "linear probe on field-of-view crop + Ben Graham colour normalisation",
            {"strategy": "linear-probe", "fundus": {"crop": True, "ben_graham": True}},
        ),
        Recipe(
            "finetune+aug-colour",
            "fine-tune with colour augmentation in the FOV (brightness, contrast, gamma, "
            "colour temperature)",
            {"augment": ["colour"]},
        ),
        Recipe(
            "finetune+aug-site",
            "fine-tune with all seven site augmentations (colour + blur, JPEG, scale)",
            {"augment": ["site"]},
        ),
        Recipe(
            "finetune+colour-std",
            "fine-tune on FOV-masked, colour-standardised images (Reinhard, CIELAB)",
            {"fundus": {"crop": True, "mask": True, "colour_std": True}},
        ),
        Recipe(
            "finetune+ema", "fine-tune, shipping an EMA of the weights (decay 0.99)", {"ema": 0.99}
        ),
        Recipe(
            "linear-probe+colour-std",
            "linear probe on FOV-masked, colour-standardised images",
            {
                "strategy": "linear-probe",
                "fundus": {"crop": True, "mask": True, "colour_std": True},
            },
        ),
        Recipe(
            "linear-probe+clahe",
            "linear probe on field-of-view crop + CLAHE of the luminance",
            {"strategy": "linear-probe", "fundus": {"crop": True, "clahe": True}},
        ),
        Recipe(
            "linear-probe+all-preprocessing",
            "linear probe on crop, mask, colour standardisation, CLAHE and Ben Graham together",
            {
                "strategy": "linear-probe",
                "fundus": {
                    "crop": True,
                    "mask": True,
                    "colour_std": True,
                    "clahe": True,
                    "ben_graham": True,
                },
            },
        ),
        Recipe(
            "finetune-lite1",
            "fine-tune EfficientNet-Lite1 (240 px)",
            {"backbone": "efficientnet_lite1"},
        ),
        Recipe(
            "finetune-lite2",
            "fine-tune EfficientNet-Lite2 (260 px)",
            {"backbone": "efficientnet_lite2"},
        ),
    )
}
QUICK_RECIPES = ("finetune", "linear-probe", "finetune+adabn")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    from sites_loso import LOSO_RECIPES, add_arguments  # leave-one-site-out (make bench-sites)

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--shared",
        type=Path,
        default=REPO.parent / "shared" / "data",
        help="folder holding aptos2019-224/ and eyepacs-dev/ (default ../shared/data)",
    )
    p.add_argument(
        "--recipes",
        default=None,
        help=f"comma-separated subset of {', '.join(RECIPES)} (default: all); with --loso, "
        f"of {', '.join(LOSO_RECIPES)} (default: default)",
    )
    p.add_argument(
        "--work",
        type=Path,
        default=Path("/tmp/medtune-bench-sites"),
        help="run folders and caches (default /tmp/medtune-bench-sites)",
    )
    p.add_argument("--seed", type=int, default=0, help="split and training seed (default 0)")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples (default 1000)")
    p.add_argument(
        "--quick",
        action="store_true",
        help=f"smoke test: {QUICK_HOME} APTOS and {QUICK_ABROAD} EyePACS images, 1 epoch, "
        f"recipes {', '.join(QUICK_RECIPES)}; the document is not rewritten",
    )
    p.add_argument("--out", type=Path, default=DOC, help="document to rewrite")
    add_arguments(p)
    p.add_argument(
        "--table",
        default=TABLE,
        help=f"name of the generated block to rewrite (default {TABLE}); another name keeps "
        "the existing table and writes (or rewrites) a second one after it",
    )
    return p.parse_args(argv)


def missing_data(shared: Path) -> list[str]:
    return [s for s in (HOME, ABROAD) if not (shared / s / "labels.csv").is_file()]


# --------------------------------------------------------------------------- quick subsets


def quick_subset(src: Path, dst: Path, n: int, seed: int) -> Path:
    """Copy a seeded random subset of about ``n`` images of ``src`` (whole patients / duplicate
    groups) with its ``labels.csv`` and ``metadata.csv``."""
    if (dst / "labels.csv").is_file():
        return dst
    labels = pd.read_csv(src / "labels.csv")
    meta = pd.read_csv(src / "metadata.csv") if (src / "metadata.csv").is_file() else None
    if "patient_id" in labels.columns:
        keys = labels["patient_id"].astype(str)
    elif meta is not None and "dup_group" in meta.columns:
        dup = labels[["image"]].merge(meta[["image", "dup_group"]], on="image", how="left")
        keys = dup["dup_group"].astype(object).where(dup["dup_group"].notna(), labels["image"])
    else:
        keys = labels["image"]
    keys = keys.astype(str).to_numpy()
    chosen: list[int] = []
    for key in np.random.default_rng(seed).permutation(np.unique(keys)):
        chosen += np.flatnonzero(keys == key).tolist()
        if len(chosen) >= n:
            break
    return copy_subset(src, dst, labels["image"].iloc[sorted(chosen)].tolist())


def copy_subset(src: Path, dst: Path, names: list[str]) -> Path:
    """Copy the images ``names`` of ``src`` (an ``images/`` + ``labels.csv`` set) to ``dst``
    with their rows of ``labels.csv`` and ``metadata.csv``."""
    labels = pd.read_csv(src / "labels.csv")
    subset = labels[labels["image"].isin(set(names))]
    (dst / "images").mkdir(parents=True, exist_ok=True)
    for name in subset["image"]:
        shutil.copy2(src / "images" / name, dst / "images" / name)
    if (src / "metadata.csv").is_file():
        meta = pd.read_csv(src / "metadata.csv")
        meta[meta["image"].isin(subset["image"])].to_csv(dst / "metadata.csv", index=False)
    subset.to_csv(dst / "labels.csv", index=False)
    return dst


# --------------------------------------------------------------------------- running


def train_recipe(recipe: Recipe, home: Path, work: Path, args: argparse.Namespace) -> dict:
    import medtune

    settings: dict[str, Any] = {"seed": args.seed, "progress": False, **recipe.train}
    if args.quick:
        settings["epochs"] = 1
    out = work / "runs" / recipe.name
    say(f"train {recipe.name}")
    started = time.perf_counter()
    result = medtune.train(str(home), out=str(out), cache_dir=str(work / "cache"), **settings)
    return {"run": str(out), "train_seconds": round(time.perf_counter() - started, 1),
            "strategy": result.config.strategy, "backbone": result.config.backbone}  # fmt: skip


def adapt_recipe(base: dict, abroad: Path, work: Path, name: str) -> dict:
    import medtune

    out = work / "runs" / name
    if out.exists():
        shutil.rmtree(out)
    say(f"adapt {name} on {abroad.name}'s images, unlabelled")
    started = time.perf_counter()
    result = medtune.adapt(base["run"], str(abroad / "images"), str(out), progress=False)
    seconds = time.perf_counter() - started
    return {
        **base,
        "run": str(out),
        "adapt_seconds": round(seconds, 1),
        "train_seconds": round(base["train_seconds"] + seconds, 1),
        "adaptation": {k: result.record[k] for k in ("images", "layers_adapted", "layers_kept")},
    }


def score(run: str, data: Path | None, tta: str, name: str, args: argparse.Namespace) -> dict:
    """The figures of one evaluation: QWK, referable AUC, sens/spec at two validated points."""
    import medtune

    result = medtune.evaluate(
        run,
        None if data is None else str(data),
        tta=tta,
        name=name,
        n_boot=args.bootstrap,
        gradcam=False,
        progress=False,
    )
    m = result.metrics
    out = {"n": m["n"]}
    for key in ("qwk", "referable_auc"):
        out[key] = m.get(key)
        out[f"{key}_ci"] = m.get(f"{key}_ci")
    for point in ("sens90", "youden"):
        op = (m.get("operating_points") or {}).get(point, {})
        out[point] = {
            k: op.get(k)
            for k in ("threshold", "sensitivity", "sensitivity_ci", "specificity", "specificity_ci")
        }
        out[point]["referred_by_class"] = op.get("referred_by_class")
    shift = m.get("site_shift")
    out["site_shift_share"] = None if shift is None else shift["share_outside"]
    return out


def run_benchmark(args: argparse.Namespace) -> dict:
    home, abroad = args.shared / HOME, args.shared / ABROAD
    work = args.work / ("quick" if args.quick else "full")
    chosen = args.recipes or ",".join(RECIPES)
    names = QUICK_RECIPES if args.quick else [n.strip() for n in chosen.split(",")]
    unknown = [n for n in names if n not in RECIPES]
    if unknown:
        raise SystemExit(f"unknown recipe(s) {unknown}; choose from {', '.join(RECIPES)}")
    if args.quick:
        home = quick_subset(home, work / "data" / HOME, QUICK_HOME, args.seed)
        abroad = quick_subset(abroad, work / "data" / ABROAD, QUICK_ABROAD, args.seed)
    trained: dict[str, dict] = {}
    results = {}
    for name in names:
        recipe = RECIPES[name]
        base_name = recipe.base or name
        if base_name not in trained:
            trained[base_name] = train_recipe(RECIPES[base_name], home, work, args)
        run = trained[base_name]
        if recipe.adapt:
            run = adapt_recipe(run, abroad, work, name)
        say(f"evaluate {name}")
        results[name] = {
            "lever": recipe.lever,
            **{k: v for k, v in run.items() if k != "run"},
            "tta": recipe.tta,
            HOME: score(run["run"], None, recipe.tta, f"bench-{name}-{HOME}", args),
            ABROAD: score(run["run"], abroad, recipe.tta, f"bench-{name}-{ABROAD}", args),
        }
    return {
        "when": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": _commit(),
        "machine": _machine(),
        "quick": bool(args.quick),
        "images": {HOME: _count(home), ABROAD: _count(abroad)},
        "recipes": results,
    }


def _count(data: Path) -> int:
    return len(pd.read_csv(data / "labels.csv"))


def _commit() -> str:
    try:
        return subprocess.run(
            ["git", "-C", str(REPO), "describe", "--always", "--dirty"],
            capture_output=True, text=True, check=True,
        ).stdout.strip()  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _machine() -> str:
    import torch

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU only"
    return f"{platform.processor() or platform.machine()}, {device}, torch {torch.__version__}"


# --------------------------------------------------------------------------- report


def _ci(value: float | None, ci: list[float] | None) -> str:
    if value is None or value != value:  # None or NaN
        return "n/a"
    return f"{value:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")


def table_md(result: dict) -> str:
    header = (
        "| recipe | data | QWK | referable AUC | sens / spec at sens90 | "
        "sens / spec at Youden | outside (site shift) | train wall s |"
    )
    lines = [header, "|" + "---|" * 8]
    for name, r in result["recipes"].items():
        for data in (HOME, ABROAD):
            s = r[data]
            points = [
                f"{_ci(s[p]['sensitivity'], s[p]['sensitivity_ci'])} / "
                f"{_ci(s[p]['specificity'], s[p]['specificity_ci'])}"
                for p in ("sens90", "youden")
            ]
            share = s["site_shift_share"]
            lines.append(
                f"| {name} | {data} (n={s['n']}) | {_ci(s['qwk'], s['qwk_ci'])} | "
                f"{_ci(s['referable_auc'], s['referable_auc_ci'])} | {points[0]} | {points[1]} | "
                f"{'n/a' if share is None else f'{share:.1%}'} | {r['train_seconds']:.0f} |"
            )
    return "\n".join(lines)


def markers(table: str) -> tuple[str, str]:
    """The comment lines that open and close a generated table."""
    return f"<!-- {table}:begin -->", f"<!-- {table}:end -->"


def report_md(result: dict, table: str = TABLE) -> str:
    begin, end = markers(table)
    lines = [
        begin,
        f"Generated by `make bench-sites` (`python benchmarks/sites.py`) on {result['when']}, "
        f"commit {result['commit']}, {result['machine']}. Images: {result['images'][HOME]} "
        f"APTOS (70/15/15 split, test scored), {result['images'][ABROAD]} EyePACS (all scored).",
        "",
        table_md(result),
        "",
        *[f"- `{name}`: {r['lever']}" for name, r in result["recipes"].items()],
        end,
    ]
    return "\n".join(lines)


def write_report(path: Path, block: str, table: str = TABLE) -> None:
    rewrite_block(path, *markers(table), block, "# Generalisation to a new site")


def main_loso(args: argparse.Namespace) -> int:
    """``--loso``: the leave-one-site-out benchmark (:mod:`sites_loso`)."""
    import sites_loso

    missing = sites_loso.missing(args.shared)
    if missing:
        print(f"benchmarks/sites.py --loso needs {', '.join(sites_loso.SITES)} under "
              f"{args.shared}; missing: {', '.join(missing)}. Pass --shared PATH.",
              file=sys.stderr)  # fmt: skip
        return 2
    result = sites_loso.run_loso(args)
    if args.quick:
        say("--quick: SMOKE TEST ONLY; figures are meaningless and the document is unchanged")
        result["note"] = "smoke test (--quick): not a measurement"
    else:
        write_report(args.out, sites_loso.report_md(result, args.loso_table), args.loso_table)
        say(f"wrote {args.out}")
    print(json.dumps(result, indent=1))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.loso:
        return main_loso(args)
    missing = missing_data(args.shared)
    if missing:
        print(
            f"benchmarks/sites.py needs the shared fundus sets {HOME} and {ABROAD} (labels.csv "
            f"+ images/, see ../shared/README.md) under {args.shared}; missing: "
            f"{', '.join(missing)}. Pass --shared PATH.",
            file=sys.stderr,
        )
        return 2
    result = run_benchmark(args)
    if args.quick:
        say("--quick: SMOKE TEST ONLY (a few hundred images, 1 epoch); figures are meaningless "
            f"and {args.out.name} is left unchanged")  # fmt: skip
        result["note"] = "smoke test (--quick): not a measurement"
    else:
        write_report(args.out, report_md(result, args.table), args.table)
        say(f"wrote {args.out}")
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
