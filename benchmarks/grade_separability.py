"""How separable is each site's moderate NPDR from no or mild DR, on the site's own labels?

    python benchmarks/grade_separability.py [--shared ../shared/data] [--sizes 224,448]

The leave-one-site-out table's worst site (EyePACS) misses mostly moderate NPDR (grade 2): the
validated point refers about a quarter of its grade-2 eyes and most of its severe and
proliferative ones (the by-grade table in ``docs/generalisation.md``). This asks whether that
is the site gap or the grade itself: for each development site, frozen ImageNet features
(EfficientNet-Lite0's pooled output, the packaged weights, bf16, after the default field-of-view
crop) and a logistic regression (standardised features, ``C`` = 0.01, sklearn) fitted and
scored on the SITE'S OWN images in 5-fold cross-validation grouped by patient (or duplicate
group) and stratified by referable DR, at each input size. Reported per site and size, on the
out-of-fold scores, each with a 95% percentile bootstrap interval over patients (1,000
resamples): referable AUC; grade 2 against grades 0-1; grades 3-4 against grades 0-1. A frozen
linear probe is weaker than fine-tuning, so these are lower bounds on what the features hold,
comparable across sites and sizes because the method is the same. Prints JSON and rewrites the
``grade-separability`` block of ``docs/generalisation.md``. Exits 2 without the data.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from benchlib import machine, rewrite_block, say

SITES = ("aptos2019-224", "eyepacs-dev", "idrid-800")
NATIVE_224 = {"aptos2019-224"}  # stored at 224 px: a larger input adds no detail
DOC = Path(__file__).resolve().parents[1] / "docs" / "generalisation.md"
TABLE = "grade-separability"
C = 0.01
FOLDS = 5
N_BOOT = 1000


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shared", type=Path, default=Path("../shared/data"))
    p.add_argument("--sizes", default="224,448", help="input sizes (px) for the larger sites")
    p.add_argument("--work", type=Path, default=Path("/tmp/medtune-grade-separability"))
    p.add_argument("--out", type=Path, default=DOC, help="document to rewrite")
    args = p.parse_args(argv)
    missing = [s for s in SITES if not (args.shared / s / "labels.csv").is_file()]
    if missing:
        print(f"{args.shared}: missing {', '.join(missing)}; see ../shared/README.md",
              file=sys.stderr)  # fmt: skip
        return 2
    sizes = [int(s) for s in args.sizes.split(",")]
    rows = [
        measure(args.shared / site, size, args.work)
        for site in SITES
        for size in ([224] if site in NATIVE_224 else sizes)
    ]
    result = {
        "when": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine(),
        "rows": rows,
    }
    print(json.dumps(result, indent=1))
    rewrite_block(args.out, *_markers(), report_md(result), "# Generalisation to a new site")
    return 0


def measure(site: Path, size: int, work: Path) -> dict[str, Any]:
    """Out-of-fold probe scores of one site at one input size, and their AUCs."""
    from medtune.data.cache import prepare
    from medtune.data.sources import load_imageset
    from medtune.models.backbones import create_backbone
    from medtune.transfer.features import TOP, backbone_id, extract_features

    say(f"{site.name} at {size} px")
    started = time.perf_counter()
    cache = prepare(load_imageset(site), size, None, work / "cache", progress=False)
    backbone = create_backbone("efficientnet_lite0")
    model_id = backbone_id(backbone, "bf16")
    x = extract_features(backbone, cache, [TOP], model_id=model_id, progress=False)[(TOP, 0)]
    y = np.asarray(cache.labels).astype(int)
    groups = np.asarray(cache.groups if cache.groups is not None else cache.keys)
    scores = out_of_fold(x, (y >= 2).astype(int), groups)
    none_mild = y <= 1
    return {
        "site": site.name,
        "n": len(y),
        "size": size,
        "referable": auc_ci(y >= 2, scores, groups),
        "moderate": auc_ci(
            y[none_mild | (y == 2)] == 2, scores[none_mild | (y == 2)], groups[none_mild | (y == 2)]
        ),  # fmt: skip
        "severe_plus": auc_ci(
            y[none_mild | (y >= 3)] >= 3, scores[none_mild | (y >= 3)], groups[none_mild | (y >= 3)]
        ),  # fmt: skip
        "n_per_grade": np.bincount(y, minlength=5).tolist(),
        "seconds": round(time.perf_counter() - started, 1),
    }


def out_of_fold(x: np.ndarray, y: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """P(referable) of every image from the fold that did not see its patient."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedGroupKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    scores = np.zeros(len(y))
    for train, test in StratifiedGroupKFold(FOLDS, shuffle=True, random_state=0).split(
        x, y, groups
    ):
        clf = make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=3000))
        scores[test] = clf.fit(x[train], y[train]).predict_proba(x[test])[:, 1]
    return scores


def auc_ci(positive: np.ndarray, scores: np.ndarray, groups: np.ndarray) -> dict[str, Any]:
    """AUC with a percentile bootstrap interval resampling whole groups (patients): medtune's
    own cluster bootstrap (``evaluation.intervals.bootstrap_weights``, ``WeightedAUC``)."""
    from medtune.evaluation.intervals import WeightedAUC, bootstrap_weights

    positive = np.asarray(positive, dtype=int)
    auc = WeightedAUC(positive, scores)
    boot = [auc(w) for w in bootstrap_weights(len(positive), groups, n_boot=N_BOOT, seed=0)]
    lo, hi = np.nanpercentile(boot, [2.5, 97.5])
    return {"auc": auc(np.ones(len(positive))), "ci": [float(lo), float(hi)],
            "n_positive": int(positive.sum())}  # fmt: skip


def _markers() -> tuple[str, str]:
    return f"<!-- {TABLE}:begin -->", f"<!-- {TABLE}:end -->"


def report_md(result: dict[str, Any]) -> str:
    def cell(d: dict[str, Any]) -> str:
        return f"{d['auc']:.3f} [{d['ci'][0]:.3f}, {d['ci'][1]:.3f}] ({d['n_positive']})"

    lines = [
        _markers()[0],
        f"Generated by `python benchmarks/grade_separability.py` on {result['when']}, "
        f"{result['machine']}. Out-of-fold AUC [95% CI] (positives).",
        "",
        "| site (images) | input px | referable | grade 2 vs 0-1 | grades 3-4 vs 0-1 | s |",
        "|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['site']} ({r['n']}) | {r['size']} | {cell(r['referable'])} | "
            f"{cell(r['moderate'])} | {cell(r['severe_plus'])} | {r['seconds']:.0f} |"
        )
    return "\n".join([*lines, _markers()[1]])


if __name__ == "__main__":
    raise SystemExit(main())
