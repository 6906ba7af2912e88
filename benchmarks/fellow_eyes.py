"""Do a patient's two eyes break the batch shift test's false-alarm rate?

    python benchmarks/fellow_eyes.py --run RUN [--site eyepacs-dev] [--draws 400] [--seed 0]
    python benchmarks/fellow_eyes.py --predictions OUT.csv [--sample-patients 50,100]

Takes a trained multi-site run (e.g. a fold of ``make bench-sites``:
``/tmp/medtune-bench-sites/loso/runs/default-without-aptos2019-224``) and the images of one of
its training sites that it never trained on (its validation and test splits), scored by the
run's model. Draws ``--draws`` random halves of those images' PATIENTS (each half a batch of
whole patients, as a clinic sends them) and tests one half against the other with the run's
batch shift test (:class:`medtune.evaluation.shift.BatchShiftTest`: its principal components, the
half as reference): counting images (the test before fellow eyes were counted once) and
counting patients (now). As a control, halves of the IMAGES (fellow eyes split between the
halves) counting images. Both halves come from one site and one model, so every flag is a false
alarm; the stated rate is 0.05. Also the run's own verdict on the site's test split against its
validation split, both ways.

With ``--predictions`` (the CSV of ``medtune predict`` on a site whose file names carry the
patient, e.g. eyepacs-dev's ``10_left.jpeg``): the same question for ``adapt --labels``'s check
that a labelled sample is a random one (:func:`medtune.evaluation.label_free.random_sample_check`
on ``p_referable``), on ``--draws`` random samples of ``--sample-patients`` patients (both eyes
each, as graders label them) against the site's other images, counting images and counting
patients. Prints JSON; writes nothing into the docs.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", type=Path, help="a run trained on several sites")
    p.add_argument("--predictions", type=Path, help="predict's CSV of one site's images")
    p.add_argument("--sample-patients", default="50,100", help="labelled sample sizes (patients)")
    p.add_argument("--site", default="eyepacs-dev", help="one of the run's training sites")
    p.add_argument("--draws", type=int, default=400)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.predictions is not None:
        sizes = [int(n) for n in args.sample_patients.split(",")]
        print(json.dumps(sample_check(args.predictions, sizes, args.draws, args.seed), indent=1))
        return 0
    if args.run is None or not (args.run / "batch_shift.npz").is_file():
        print(f"{args.run}: no batch_shift.npz; give a trained run folder", file=sys.stderr)
        return 2
    print(json.dumps(measure(args.run, args.site, args.draws, args.seed), indent=1))
    return 0


def sample_check(predictions: Path, sizes: list[int], draws: int, seed: int) -> dict[str, Any]:
    """How often random samples of patients are called "not a random sample" (module docstring)."""
    import pandas as pd

    from medtune.data.laterality import image_eyes
    from medtune.evaluation.label_free import random_sample_check

    table = pd.read_csv(predictions)
    ids = np.asarray([e.patient_id or "" for e in image_eyes(list(table["image"]))], dtype=str)
    if (ids == "").any():
        raise SystemExit(f"{predictions}: {(ids == '').sum()} images name no patient")
    scores, people = table["p_referable"].to_numpy(), np.unique(ids)
    rng = np.random.default_rng(seed)
    out: dict[str, Any] = {"predictions": str(predictions), "images": len(ids)}
    out.update(patients=len(people), draws=draws, not_random_rate={})
    for n in sizes:
        flagged = {"images counted": 0, "patients counted": 0}
        for _ in range(draws):
            m = np.isin(ids, rng.choice(people, n, replace=False))
            flagged["images counted"] += not random_sample_check(scores[m], scores[~m])["random"]
            counted = random_sample_check(
                scores[m], scores[~m], sample_patients=ids[m], site_patients=ids[~m]
            )
            flagged["patients counted"] += not counted["random"]
        out["not_random_rate"][f"{n} patients"] = {k: v / draws for k, v in flagged.items()}
    return out


def _site_outputs(run: Path, site: str) -> dict[str, dict[str, np.ndarray]]:
    """Projected features, plain probabilities and patients of the site's validation and test
    images, scored by the run's model."""
    from medtune.deploy.engine import run_scorer
    from medtune.evaluation.scoring import score
    from medtune.runs import RunFolder
    from medtune.runs.data import prepare_run_data

    folder = RunFolder(run)
    scorer, test = run_scorer(folder), folder.read_batch_shift()
    data = prepare_run_data(folder.read_config(), folder.dir)
    out = {}
    for name, part in (("validation", data.val), ("test", data.test)):
        rows = np.flatnonzero(np.asarray(part.sites, dtype=str) == site)
        if not len(rows):
            raise SystemExit(f"{run}: no {name} images of site {site!r}")
        scored = score(scorer, part.images[rows], features=True)
        out[name] = {
            "features": test.project(scored.features),
            "probs": scorer.card.probabilities(scored.plain),
            "patients": np.asarray(part.groups, dtype=str)[rows],
        }
    return out


def _test_of(ref: dict[str, np.ndarray], like: Any, patients: bool) -> Any:
    """A batch shift test with ``ref`` as its one reference (the run's components)."""
    from medtune.evaluation.shift import BatchShiftTest

    return BatchShiftTest(
        like.pca_mean, like.pca_components, ref["features"], ref["probs"],
        np.full(len(ref["probs"]), ""), like.alpha, ref["patients"] if patients else None,
    )  # fmt: skip


def _alarm(ref: dict, batch: dict, like: Any, patients: bool) -> bool:
    test = _test_of(ref, like, patients)
    ids = batch["patients"] if patients else None
    return bool(test.test_projected(batch["features"], batch["probs"], ids)["shifted"])


def measure(run: Path, site: str, draws: int, seed: int) -> dict[str, Any]:
    """The false-alarm rates (module docstring)."""
    from medtune.runs import RunFolder

    like = RunFolder(run).read_batch_shift()
    parts = _site_outputs(run, site)
    pool = {k: np.concatenate([parts["validation"][k], parts["test"][k]]) for k in parts["test"]}
    ids = pool["patients"]
    people = np.unique(ids)
    rng = np.random.default_rng(seed)
    counts = {"patient halves, images counted": 0, "patient halves, patients counted": 0}
    counts["image halves, images counted"] = 0
    for _ in range(draws):
        half = np.isin(ids, rng.choice(people, len(people) // 2, replace=False))
        a, b = ({k: v[m] for k, v in pool.items()} for m in (half, ~half))
        counts["patient halves, images counted"] += _alarm(a, b, like, patients=False)
        counts["patient halves, patients counted"] += _alarm(a, b, like, patients=True)
        mixed = rng.permutation(len(ids)) < half.sum()
        a, b = ({k: v[m] for k, v in pool.items()} for m in (mixed, ~mixed))
        counts["image halves, images counted"] += _alarm(a, b, like, patients=False)
    val, test = parts["validation"], parts["test"]
    return {
        "run": str(run),
        "site": site,
        "images": len(ids),
        "patients": len(people),
        "draws": draws,
        "false_alarm_rate": {k: v / draws for k, v in counts.items()},
        "test split vs validation split, p": {
            "images counted": _test_of(val, like, False).test_projected(
                test["features"], test["probs"]
            )["p_value"],
            "patients counted": _test_of(val, like, True).test_projected(
                test["features"], test["probs"], test["patients"]
            )["p_value"],
        },
    }


if __name__ == "__main__":
    sys.exit(main())
