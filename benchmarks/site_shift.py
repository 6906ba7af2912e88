"""Site-shift score on the shared data: APTOS (training site) versus EyePACS (a new site).

Fits :class:`medtune.evaluation.shift.SiteShiftModel` on the pooled ImageNet features of the
default backbone (EfficientNet-Lite0, no fine-tuning) of the APTOS training split, sets the
threshold on the APTOS validation split, and reports the share of APTOS held-out (test) images
and of eyepacs-dev images flagged outside, plus the AUROC of the score separating the two sites,
for the full feature space and for a few PCA sizes. Prints JSON.

    PYTHONPATH=src python benchmarks/site_shift.py [--work /tmp/medtune-site-shift]

Splits are medtune's defaults (``make_splits``: 15% validation, 15% test, seed 0, duplicate
groups kept together); images are prepared as ``train`` does (default fundus options: FOV crop).
Features are computed once (fp32) and cached under ``--work``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
SHARED = HERE.parent.parent / "shared" / "data"


def _features(name: str, data: Path, work: Path, backbone) -> tuple[np.ndarray, object]:
    """(features (N, D), prepared cache) of one image set, cached in ``work``."""
    from medtune.data import load_imageset, prepare
    from medtune.transfer.features import TOP, backbone_id, extract_features

    imageset = load_imageset(data)
    cache = prepare(imageset, backbone.image_size, out_dir=work / "cache", progress=False)
    model_id = backbone_id(backbone, "fp32")
    feats = extract_features(
        backbone, cache, [TOP], model_id=model_id, bf16=False, progress=False, batch_size=32
    )
    print(f"{name}: {len(cache)} images", file=sys.stderr)
    return feats[(TOP, 0)], cache


def _gross_outliers(backbone) -> dict[str, np.ndarray]:
    """Features of non-fundus inputs prepared as ``predict`` prepares images."""
    import torch
    from skimage import data

    from medtune.data import prepare_image

    size = backbone.image_size
    images = {
        "cat": data.chelsea(),
        "coffee": data.coffee(),
        "black_frame": np.zeros((size, size, 3), np.uint8),
        "grey_frame": np.full((size, size, 3), 128, np.uint8),
    }
    mean = torch.tensor(backbone.mean).view(1, 3, 1, 1)
    std = torch.tensor(backbone.std).view(1, 3, 1, 1)
    out = {}
    for name, image in images.items():
        x = torch.from_numpy(prepare_image(image, size)[None]).permute(0, 3, 1, 2).float() / 255
        with torch.no_grad():
            out[name] = backbone.features((x - mean) / std).numpy()
    return out


def _row(model, feats: dict[str, np.ndarray], gross: dict[str, np.ndarray]) -> dict:
    from sklearn.metrics import roc_auc_score

    from medtune.evaluation.shift import shift_summary

    scores = {k: model.score(v) for k, v in feats.items()}
    out = {"threshold_p99": round(model.threshold, 3), "shrinkage": round(model.shrinkage, 4)}
    thresholds = {"p99": model.threshold, "p95": float(np.percentile(scores["aptos_val"], 95))}
    for k, v in scores.items():
        out[f"{k}_median_score"] = round(float(np.median(v)), 2)
        for name, thr in thresholds.items():
            out[f"{k}_share_outside_{name}"] = round(float(np.mean(v > thr)), 4)
    for k in ("aptos_test", "eyepacs"):
        out[f"{k}_summary_p99"] = shift_summary(scores[k] > model.threshold, model.percentile)[
            "message"
        ]
    y = np.r_[np.zeros(len(scores["aptos_test"])), np.ones(len(scores["eyepacs"]))]
    out["auroc_aptos_test_vs_eyepacs"] = round(
        float(roc_auc_score(y, np.r_[scores["aptos_test"], scores["eyepacs"]])), 4
    )
    out["gross_outliers_score"] = {k: round(float(model.score(v)[0]), 2) for k, v in gross.items()}
    out["gross_outliers_flagged_p99"] = {k: bool(model.is_outside(v)[0]) for k, v in gross.items()}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--aptos", type=Path, default=SHARED / "aptos2019-224")
    parser.add_argument("--eyepacs", type=Path, default=SHARED / "eyepacs-dev")
    parser.add_argument("--work", type=Path, default=Path("/tmp/medtune-site-shift"))
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--percentile", type=float, default=99.0)
    parser.add_argument("--pca", default="none,16,32,64,128,256", help="comma-separated sizes")
    args = parser.parse_args(argv)

    import torch

    from medtune.data.splits import make_splits
    from medtune.evaluation.shift import SiteShiftModel
    from medtune.models import create_backbone

    torch.set_num_threads(2)
    t0 = time.perf_counter()
    backbone = create_backbone(args.backbone)
    aptos, aptos_cache = _features("aptos", args.aptos, args.work, backbone)
    eyepacs, _ = _features("eyepacs", args.eyepacs, args.work, backbone)
    split = make_splits(aptos_cache, val=0.15, test=0.15, seed=0)
    feats = {
        "aptos_train": aptos[split == "train"],
        "aptos_val": aptos[split == "val"],
        "aptos_test": aptos[split == "test"],
        "eyepacs": eyepacs,
    }
    gross = _gross_outliers(backbone)
    t_feat = time.perf_counter() - t0
    rows = {}
    for size in args.pca.split(","):
        n = None if size.strip().lower() == "none" else int(size)
        t1 = time.perf_counter()
        model = SiteShiftModel.fit(
            feats["aptos_train"], feats["aptos_val"], args.percentile, n_components=n
        )
        row = _row(model, {k: v for k, v in feats.items() if k != "aptos_train"}, gross)
        row["fit_score_seconds"] = round(time.perf_counter() - t1, 2)
        rows["full" if n is None else f"pca{n}"] = row
    result = {
        "backbone": backbone.name,
        "weights": "ImageNet (packaged), no fine-tuning",
        "feature_dim": int(aptos.shape[1]),
        "percentile": args.percentile,
        "n": {k: int(len(v)) for k, v in feats.items()},
        "feature_seconds": round(t_feat, 1),
        "variants": rows,
    }
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
