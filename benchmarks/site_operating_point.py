"""Moving the validated sens90 operating point to eyepacs-dev with a few labelled images.

A linear probe (``medtune.transfer.linear_probe.fit_probe``) on the ImageNet Lite0 features of the
APTOS training split is calibrated (temperature) and given its sens90 point on the APTOS validation
split, as ``medtune train`` does. On eyepacs-dev the stale point is applied, then
:func:`medtune.evaluation.operating_points.move_operating_point` is run on random labelled samples
of whole patients (``--sizes`` images, ``--draws`` draws each) and the moved point is scored on the
REST of eyepacs-dev. Prints JSON. Features are shared with ``site_shift.py`` (same cache).

    PYTHONPATH=src python benchmarks/site_operating_point.py
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from site_shift import SHARED, _features


def _patient_sample(groups: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """Indices of whole patients, drawn at random until at least ``n`` images are taken."""
    chosen: list[int] = []
    for patient in rng.permutation(np.unique(groups)):
        if len(chosen) >= n:
            break
        chosen += np.flatnonzero(groups == patient).tolist()
    return np.asarray(chosen)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--aptos", type=Path, default=SHARED / "aptos2019-224")
    parser.add_argument("--eyepacs", type=Path, default=SHARED / "eyepacs-dev")
    parser.add_argument("--work", type=Path, default=Path("/tmp/medtune-site-shift"))
    parser.add_argument("--sizes", default="50,100,200")
    parser.add_argument("--draws", type=int, default=50)
    args = parser.parse_args(argv)

    import torch

    from medtune.data.splits import make_splits
    from medtune.errors import MedtuneError
    from medtune.evaluation.calibration import apply_temperature, fit_temperature
    from medtune.evaluation.labels import LabelSpace
    from medtune.evaluation.operating_points import (
        apply_operating_point,
        choose_operating_points,
        move_operating_point,
    )
    from medtune.models import create_backbone
    from medtune.transfer.linear_probe import fit_probe

    torch.set_num_threads(2)
    backbone = create_backbone("efficientnet_lite0")
    aptos, aptos_cache = _features("aptos", args.aptos, args.work, backbone)
    eyepacs, eyepacs_cache = _features("eyepacs", args.eyepacs, args.work, backbone)
    split = make_splits(aptos_cache, val=0.15, test=0.15, seed=0)
    y_aptos, y_eye = np.asarray(aptos_cache.labels), np.asarray(eyepacs_cache.labels)
    groups = np.asarray(eyepacs_cache.groups)
    train, val = split == "train", split == "val"
    probe = fit_probe(aptos[train], y_aptos[train], aptos[val], y_aptos[val], ordinal=True)
    task = LabelSpace.of([str(c) for c in range(5)], ordinal=True).binary_task
    val_logits = probe.decision_function(aptos[val])
    temperature = fit_temperature(val_logits, y_aptos[val])
    val_score = task.score(apply_temperature(val_logits, temperature))
    point = choose_operating_points(task.labels(y_aptos[val]), val_score)["sens90"]
    eye_logits = probe.decision_function(eyepacs)
    eye_bin = task.labels(y_eye)
    stale = apply_operating_point(
        eye_bin, task.score(apply_temperature(eye_logits, temperature)), point["threshold"]
    )
    from sklearn.metrics import roc_auc_score

    result = {
        "probe_C": probe.C,
        "eyepacs_referable_auc": round(
            float(roc_auc_score(eye_bin, task.score(apply_temperature(eye_logits, 1.0)))), 4
        ),
        "validated_sens90": {k: round(v, 4) for k, v in point.items() if k != "rule"},
        "aptos_temperature": round(temperature, 3),
        "eyepacs_stale_point": {k: stale[k] for k in ("sensitivity", "specificity")},
        "moved": {},
    }
    rng = np.random.default_rng(0)
    for size in (int(s) for s in args.sizes.split(",")):
        sens, spec, refused, temps = [], [], 0, []
        for _ in range(args.draws):
            sample = _patient_sample(groups, size, rng)
            rest = np.setdiff1d(np.arange(len(y_eye)), sample)
            try:
                moved = move_operating_point(
                    eye_logits[sample],
                    y_eye[sample],
                    task,
                    validated_threshold=point["threshold"],
                    target_sensitivity=0.9,
                    temperature=temperature,
                )
            except MedtuneError:
                refused += 1
                continue
            score = task.score(apply_temperature(eye_logits[rest], moved["temperature"]))
            applied = apply_operating_point(eye_bin[rest], score, moved["threshold"])
            sens.append(applied["sensitivity"])
            spec.append(applied["specificity"])
            temps.append(moved["temperature"])
        result["moved"][f"{size}_images"] = {
            "draws": args.draws,
            "refused_fewer_than_10_positives": refused,
            "rest_sensitivity_mean": round(float(np.mean(sens)), 3) if sens else None,
            "rest_sensitivity_p10_p90": np.round(np.percentile(sens, [10, 90]), 3).tolist()
            if sens
            else None,
            "rest_specificity_mean": round(float(np.mean(spec)), 3) if spec else None,
            "share_of_draws_with_rest_sensitivity_ge_0.9": round(
                float(np.mean(np.asarray(sens) >= 0.9)), 3
            )
            if sens
            else None,
            "temperature_median": round(float(np.median(temps)), 3) if temps else None,
        }
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
