"""The new-site steps of ``medtune adapt`` beyond AdaBN: the batch shift verdict, label-free
operating points, whether a labelled sample is a random one, and the images a grader should
label first (``RUN/suggested.csv``)."""

from __future__ import annotations

import csv
import hashlib
from pathlib import Path
from typing import Any

import numpy as np

from medtune.errors import MedtuneError
from medtune.evaluation.calibration import apply_temperature
from medtune.evaluation.card import ModelCard, OperatingPoint, OperatingPoints
from medtune.evaluation.operating_points import choose_operating_points
from medtune.io import atomic_path
from medtune.runs import RunFolder


def batches(images: np.ndarray, batch_size: int) -> list[Any]:
    """uint8 (B, 3, S, S) tensors of near-equal size B <= ``batch_size`` (AdaBN weighs every
    batch the same) from prepared ``(N, S, S, 3)`` images."""
    import torch

    chunks = np.array_split(np.arange(len(images)), -(-len(images) // batch_size))
    return [torch.from_numpy(images[c]).permute(0, 3, 1, 2) for c in chunks]


def site_outputs(scorer: Any, card: ModelCard, images: np.ndarray) -> dict:
    """Calibrated probabilities (N, K) and pooled features (N, D) of the site's images, through
    the scorer protocol (:func:`medtune.evaluation.scoring.score`; ``scorer`` from the one
    inference engine, :func:`medtune.deploy.engine.model_scorer`)."""
    from medtune.evaluation.scoring import score

    scored = score(scorer, images, features=True)
    return {"probs": card.probabilities(scored.plain), "features": scored.features}


def site_patients(sources: list[Any]) -> list[str | None]:
    """Each image's patient (``None`` when unknown), as ``predict`` finds it without a manifest:
    DICOM tags, then the file name (``10_left.jpeg``; :func:`medtune.data.laterality.image_eyes`);
    images given as arrays (an ``.npz`` set) have none."""
    from medtune.data.laterality import image_eyes

    paths = [i for i, src in enumerate(sources) if isinstance(src, (str, Path))]
    found: list[str | None] = [None] * len(sources)
    for i, eye in zip(paths, image_eyes([sources[i] for i in paths]), strict=True):
        found[i] = eye.patient_id
    return found


def batch_verdict(
    source: RunFolder, outputs: dict[str, np.ndarray], patients: list[str | None] | None = None
) -> dict[str, Any] | None:
    """The batch shift test of the site's images against the source run's validation images
    (:class:`medtune.evaluation.shift.BatchShiftTest`), on the SOURCE model's outputs, counting
    fellow eyes as one patient (``patients``, :func:`site_patients`); ``None`` for a run trained
    before the test existed."""
    test = source.read_batch_shift()
    if test is None:
        return None
    return test.test(outputs["features"], outputs["probs"], patients)


def validated_points(card: ModelCard, source: RunFolder) -> tuple[Any, dict, np.ndarray]:
    """The binary task, the operating points chosen on the source's validation logits (the
    worst-site rule included), and the validation labels."""
    task = card.label_space.binary_task
    val = source.read_val_logits()
    points = {}
    if task is not None:
        score = task.score(apply_temperature(val["logits_none"], card.temperature))
        points = choose_operating_points(task.labels(val["labels"]), score, val.get("sites"))
    if not points:
        raise MedtuneError(
            f"{source.dir}: the run has no validated operating point to move (no referral task, "
            "or validation without positives or negatives); adapt with --recalibrate none"
        )
    return task, points, np.asarray(val["labels"])


def label_free_points(
    card: ModelCard, source: RunFolder, probs: np.ndarray, method: str
) -> OperatingPoints:
    """``ModelCard.operating_points`` moved onto the site's unlabelled scores by ``method``
    (:mod:`medtune.evaluation.label_free`), marked ``label_free`` and not validated."""
    from medtune.evaluation.label_free import estimate_prevalence, label_free_threshold

    task, points, y_val = validated_points(card, source)
    val_prev = float(task.labels(y_val).mean())
    prevalence, how = val_prev, f"the validation prevalence {val_prev:.2f}"
    if method == "em-quantile":
        priors = np.bincount(y_val, minlength=card.num_classes) / len(y_val)
        prevalence = float(estimate_prevalence(probs, priors)[list(task.positive)].sum())
        how = f"a prevalence of {prevalence:.2f} estimated by EM (Saerens et al. 2002)"
    score = task.score(probs)
    moved = {}
    for name, d in points.items():
        sens, spec = d["val_sensitivity"], d["val_specificity"]
        moved[name] = OperatingPoint(
            threshold=label_free_threshold(
                score, sensitivity=sens, specificity=spec, prevalence=prevalence
            ),
            validated_threshold=d["threshold"],
            rule=(
                f"{method}: refers the share of this site's {len(score)} unlabelled images that "
                f"the validated point ({d['rule']}) would at {how}; not validated here"
            ),
            sensitivity=sens,
            specificity=spec,
        )
    return OperatingPoints(
        name=task.name,
        positive_classes=task.positive,
        score=task.score_name,
        n_val=int(len(y_val)),
        n_val_positive=int(task.labels(y_val).sum()),
        points={"none": moved},  # rot90 TTA points would need the site's TTA scores
        label_free=method,
        prevalence=prevalence,
    )


def sample_check(
    card: ModelCard,
    images: np.ndarray,
    probs: np.ndarray,
    site_images: np.ndarray,
    site_probs: np.ndarray,
    patients: tuple[Any, Any] = (None, None),
) -> dict[str, Any] | None:
    """Whether the labelled sample's prepared ``images`` (calibrated probabilities ``probs``)
    look like a random sample of the site's prepared ``site_images`` (``site_probs``, from the
    same model): :func:`medtune.evaluation.label_free.random_sample_check` on P(referable),
    against the site's images the sample does not hold, counting ``patients`` (the sample's
    and the site's, each a sequence or ``None``) once; ``None`` for a model without a binary
    task."""
    from medtune.evaluation.label_free import random_sample_check

    task = card.label_space.binary_task
    if task is None:
        return None
    drawn = np.isin(_digests(site_images), _digests(images))
    sample_ids, site_ids = patients
    check = random_sample_check(
        task.score(probs),
        task.score(site_probs[~drawn]),
        sample_patients=sample_ids,
        site_patients=None if site_ids is None else np.asarray(site_ids, dtype=object)[~drawn],
    )
    return {**check, "sample_images_among_the_site": int(drawn.sum())}


def _digests(images: np.ndarray) -> np.ndarray:
    """One 128-bit BLAKE2 digest per prepared image (N, S, S, 3), as bytes strings: which of
    the site's images the labelled sample holds (the same file prepares to the same array)."""
    return np.array([hashlib.blake2b(im.tobytes(), digest_size=16).digest() for im in images])


def write_suggestions(
    target: RunFolder, paths: list[Any], outputs: dict[str, np.ndarray], task: Any, n: int
) -> list[dict[str, Any]]:
    """Rank ``n`` of the site's images for a grader (:func:`medtune.transfer.suggest.
    suggest_images`) and write them to ``RUN/suggested.csv``; returns the rows."""
    from medtune.transfer.suggest import binary_entropy, suggest_images

    if task is None:
        raise MedtuneError("suggest: the model has no referral task whose uncertainty to use")
    p_ref = task.score(outputs["probs"])
    uncertainty = binary_entropy(p_ref)
    order = suggest_images(outputs["features"], uncertainty, min(int(n), len(paths)))
    rows = [
        {
            "rank": r + 1,
            "image": str(paths[i]) if isinstance(paths[i], (str, Path)) else f"#{i}",
            "p_referable": round(float(p_ref[i]), 4),
            "uncertainty": round(float(uncertainty[i]), 4),
        }
        for r, i in enumerate(order.tolist())
    ]
    with atomic_path(target.path(RunFolder.SUGGESTED)) as tmp, open(tmp, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return rows


#: Figures compared at home before and after ``--finetune`` (keys of ``metrics.json``).
HOME_FIGURES = ("qwk", "auc", "referable_auc", "accuracy")


def finetune_with_sample(
    model: Any,
    card: ModelCard,
    config: Any,
    source: RunFolder,
    labels: str | Path,
    target: RunFolder,
    *,
    batch_size: int,
    progress: bool,
) -> dict[str, Any]:
    """Fine-tune the head and last stage on the labelled sample mixed with the source's training
    images (:func:`medtune.engines.site_finetune.finetune_on_mix`), then measure the home site:
    the source run's validation figures before and the fine-tuned model's after (no forgetting
    at home is the point of the mix)."""
    from medtune.data import Part
    from medtune.deploy.engine import model_scorer
    from medtune.engines.site_finetune import finetune_on_mix
    from medtune.evaluation.metrics import compute_metrics
    from medtune.runs.data import prepare_run_data, prepare_source

    home = prepare_run_data(config, source.dir)  # the source's own splits.csv
    cache = prepare_source(
        str(labels), config, target.dir, classes=card.class_names, progress=progress
    )

    info = finetune_on_mix(
        model,
        home.train,
        Part(cache, np.arange(len(cache))),
        spec=card.input_spec,
        ordinal=card.label_space.ordinal,
        batch_size=min(batch_size, 16),
        seed=config.seed,
        progress=progress,
    )
    logits = model_scorer(model, card).logits(home.val.images)
    after = compute_metrics(
        home.val.labels,
        card.probabilities(logits),
        card.label_space,
        decoding=card.decoding,
        n_boot=0,
    )
    before = source.read_metrics().get("val", {})
    info["home"] = {
        "images": f"the source run's {len(home.val)} validation images",
        "before": {k: before.get(k) for k in HOME_FIGURES},
        "after": {k: after.get(k) for k in HOME_FIGURES},
    }
    info["note"] = (
        "the operating points are then moved on the same labelled sample the model was "
        "fine-tuned on: their sample figures are optimistic"
    )
    return info
