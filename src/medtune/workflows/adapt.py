"""``medtune adapt``: a run adapted to a new site, written as a new run folder.

Without labels, only the BatchNorm running statistics of the fine-tuned stages are re-estimated
on the new site's unlabelled images (AdaBN, Li et al. 2016; :func:`medtune.transfer.adabn.adabn`).
Nothing else changes: not the weights, not the head, not the frozen stages' statistics, not the
temperature nor the operating points. Measured on APTOS -> EyePACS (``findings.md``): the
referable AUC abroad rises (0.687 -> 0.719) but every P(referable) shifts upward, so the
validated operating point no longer holds there; moving it needs labels.

With ``labels`` (a small labelled sample of the new site) the adapted model's temperature is
refitted on the sample (Guo et al. 2017) and every sensitivity operating point moved to the
highest specificity that keeps its validated sensitivity on the sample
(:func:`medtune.evaluation.operating_points.move_operating_point`). The sample's logits then
replace the run's ``val_logits.npz``: every later command that chooses operating points from
validation logits (``evaluate``, ``predict``) finds the moved ones, with the refitted temperature.

Without labels, ``recalibrate`` moves the operating points onto the new site's unlabelled scores
(quantile mapping, optionally with the prevalence estimated by EM, Saerens et al. 2002;
:mod:`medtune.evaluation.label_free`), marked "operating point not validated here". Before
AdaBN, the site's images are tested as a batch against the run's validation images
(:class:`medtune.evaluation.shift.BatchShiftTest`); ``adaptation.json`` records the verdict and
the operating point's status, which ``model.json``'s ``operating_points["status"]`` carries to
``predict``. ``suggest=N`` writes the N images a grader should label first
(``RUN/suggested.csv``, :mod:`medtune.transfer.suggest`).

The source run is never modified. The new run keeps the source's ``config.yaml`` and
``splits.csv`` (``evaluate`` without ``--data`` measures the adapted model on the home site's
test split) and its ``metrics.json`` (the SOURCE model's figures, marked as such). The
site-shift model is not carried over: it describes the source model's features, and AdaBN
moves the new site's features towards them, so its scores would no longer mean what they say.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medtune.config import OPERATING_POINTS
from medtune.deploy.engine import model_scorer, write_run_engine
from medtune.errors import MedtuneError
from medtune.evaluation.card import ModelCard, OperatingPoints, Provenance
from medtune.evaluation.label_free import LABEL_FREE_METHODS, operating_point_status
from medtune.evaluation.labels import BinaryTask
from medtune.evaluation.operating_points import (
    apply_operating_point,
    choose_operating_points,
    move_operating_point,
)
from medtune.evaluation.scoring import Scorer
from medtune.evaluation.shift import batch_words
from medtune.evaluation.site_points import MIN_SITE_POSITIVES
from medtune.runs import RunFolder
from medtune.workflows import new_site

log = logging.getLogger("medtune")

#: The operating point named in the one-line summary (the screening default).
SUMMARY_POINT = "sens90"
#: Files of a run that the adapted run starts from (model files are rewritten).
_COPIED = (RunFolder.SPLITS, RunFolder.METRICS, RunFolder.VAL_LOGITS, RunFolder.ADVICE)


@dataclass
class AdaptResult:
    """What :func:`adapt` wrote.

    Attributes
    ----------
    dir : pathlib.Path
        The new run folder.
    record : dict
        ``adaptation.json``: images used, layers adapted and, with labels, the moved
        operating points.
    """

    dir: Path
    record: dict[str, Any]

    @property
    def suggested_path(self) -> Path | None:
        """``RUN/suggested.csv`` when ``--suggest`` wrote it, else ``None``."""
        name = self.record.get("suggested")
        return None if name is None else RunFolder(self.dir).path(name)

    @property
    def summary(self) -> str:
        """One line: ``adapted N BatchNorm layers on M images; operating point ...``."""
        head = (
            f"adapted {self.record['layers_adapted']} BatchNorm layers on "
            f"{self.record['images']} images"
        )
        shift = self.record.get("batch_shift")
        tail = f"; {shift['message']}" if shift else ""
        calibrated = (self.record.get("operating_point_status") or {}).get("validated")
        if shift and shift["shifted"] and calibrated:  # moved on a random labelled sample
            tail = (
                f"; this batch of {batch_words(shift['n_images'], shift.get('n_patients'))} "
                "differs from every validation site "
                f"(p = {shift['p_value']:.2g}): the operating points were moved on its labels"
            )
        return f"{head}; {self._points_summary()}{tail}"

    def _points_summary(self) -> str:
        points = self.record["operating_points"]
        if not points["moved"]:
            return (
                "operating points kept (no labels from the new site: they may not hold there, "
                "give --labels to move them)"
            )
        if points.get("label_free"):
            moved = points["points"]["none"]
            point = moved.get(SUMMARY_POINT) or next(iter(moved.values()))
            return (
                f"operating point {SUMMARY_POINT} moved without labels ({points['label_free']}) "
                f"from {point['validated_threshold']:.4f} to {point['threshold']:.4f}: "
                "operating point not validated here"
            )
        point = points["points"].get(SUMMARY_POINT) or next(iter(points["points"].values()))
        return (
            f"operating point {point['name']} moved from {point['from']:.4f} to "
            f"{point['to']:.4f} (temperature {points['temperature']['from']:.3f} -> "
            f"{points['temperature']['to']:.3f}) using {points['n_images']} labelled images "
            f"({points['n_positives']} positives)"
        ) + self._sample_warning()

    def _sample_warning(self) -> str:
        check = self.record["operating_points"].get("random_sample")
        if not check or check["random"]:
            return ""
        return (
            f"; WARNING: the labelled images are not a random sample of the site (their "
            f"P(referable) differs from the site's, KS p = {check['p_value']:.2g}; chosen "
            "images such as --suggest's lose sensitivity): operating point not validated here; "
            "label a random sample of the site"
        )


def adapt(
    run: str | Path,
    data: str | Path,
    out: str | Path,
    *,
    labels: str | Path | None = None,
    recalibrate: str = "none",
    suggest: int = 0,
    finetune: bool = False,
    batch_size: int = 32,
    progress: bool = True,
) -> AdaptResult:
    """Adapt a fine-tuned run to a new site: AdaBN on its unlabelled images, optionally moved
    operating points from a small labelled sample; written as a new run folder.

    Parameters
    ----------
    run : str or pathlib.Path
        A fine-tuning run folder written by :func:`medtune.train` (left unchanged).
    data : str or pathlib.Path
        The new site's images: any folder of images (searched recursively, hidden and non-image
        files skipped) or a labelled set :func:`medtune.data.load_imageset` reads (its labels
        are ignored). Prepared like the run's training images (size, fundus options).
    out : str or pathlib.Path
        The new run folder; must not exist or be empty, and must not be ``run``.
    labels : str or pathlib.Path or None, default None
        A labelled sample of the new site (any set :func:`medtune.data.load_imageset` reads,
        labelled with the run's classes): refits the temperature and moves the sensitivity
        operating points (``sens90``, ``sens97.5``; ``youden`` is re-chosen) on it. Needs at
        least 10 positives and one negative of the model's binary task (referable DR for
        five DR grades, the positive class for two classes). It must be a random sample of
        the site: when its P(referable) differs from the site's images' (two-sample KS test,
        :func:`medtune.evaluation.label_free.random_sample_check`), the moved points are
        marked "operating point not validated here" and the summary warns.
    recalibrate : {"none", "quantile", "em-quantile"}, default "none"
        Without ``labels``: move the operating points onto the site's unlabelled scores after
        AdaBN (:mod:`medtune.evaluation.label_free`: quantile mapping at the validation
        prevalence, or at a prevalence estimated by EM, Saerens et al. 2002). The moved points
        are marked "operating point not validated here". Ignored with ``labels``.
    suggest : int, default 0
        Write the ``suggest`` images a grader should label first to ``RUN/suggested.csv``
        (model uncertainty plus feature-space diversity, Cardoso et al. 2017; Sener &
        Savarese 2018; :mod:`medtune.transfer.suggest`). They are not a random sample:
        ``labels`` must be one (operating points moved on suggested images alone kept 0.74-0.86
        of a 0.90 sensitivity, ``docs/generalisation.md``).
    finetune : bool, default False
        With ``labels``: after AdaBN, fine-tune the head and the last backbone stage on the
        sample mixed with the source's training images (each drawn equally often;
        :mod:`medtune.engines.site_finetune`), then move the operating points; the home site's
        validation figures before and after are recorded (``adaptation.json`` ``finetune``).
    batch_size : int, default 32
        Images per AdaBN batch (the images are split into batches of near-equal size, since
        each batch weighs the same in the re-estimated statistics).
    progress : bool, default True
        Show progress bars.

    Returns
    -------
    AdaptResult
        The new run folder and ``adaptation.json``'s record.

    Raises
    ------
    MedtuneError
        For a linear- or layer-probe run (AdaBN makes a probe collapse, ``findings.md``), an
        ``out`` that exists or is the run, no images in ``data``, an unreadable image (naming
        the file), or a labelled sample with too few positives or a model without a binary task.

    Notes
    -----
    AdaBN: Li, Wang, Shi, Liu & Hou 2016, "Revisiting batch normalization for practical domain
    adaptation". Temperature scaling: Guo et al. 2017. Sensitivity and specificity on the
    labelled sample are where the thresholds were chosen (in-sample, optimistic); the
    sensitivity interval is Clopper-Pearson (exact).
    """
    source = RunFolder(Path(run))
    target = RunFolder(Path(out))
    card = source.read_card()
    config = source.read_config()
    _check_adaptable(source, target, card)
    _check_options(batch_size, recalibrate, finetune, labels)
    sample_set = _labelled_set(source, card, labels) if labels is not None else None
    model, card = source.load_model()
    paths = _site_images(data)
    images = _prepare_all(paths, card, progress)
    source_scorer = model_scorer(model, card, batch_size=batch_size)
    source_outputs = new_site.site_outputs(source_scorer, card, images)
    patients = new_site.site_patients(paths)  # fellow eyes count once in both KS tests
    shift = new_site.batch_verdict(source, source_outputs, patients)
    info = _adabn(model, card, images, config.freeze, batch_size)
    points: dict[str, Any] = {"moved": False, "rule": "validated operating points kept"}
    sample, moved = None, None
    label_free = recalibrate if sample_set is None else "none"
    outputs, scorer = None, None
    if label_free != "none" or suggest or sample_set is not None:
        scorer = model_scorer(model, card, batch_size=batch_size, parity_images=images)
        outputs = new_site.site_outputs(scorer, card, images)
    check, sample_images, sample_plain = None, None, None
    if sample_set is not None:  # before --finetune trains on the sample: the same model
        site = (images, outputs["probs"], patients)
        check, sample_images, sample_plain = _check_sample(card, scorer, sample_set, site, progress)
    tuned = None
    if finetune:
        tuned = new_site.finetune_with_sample(
            model, card, config, source, labels, target, batch_size=batch_size, progress=progress
        )
        scorer = model_scorer(model, card, batch_size=batch_size, parity_images=images)
        sample_plain = None
    if sample_set is not None:
        sample = _sample_logits(scorer, sample_set.labels, sample_images, sample_plain)
        points = {**_move_points(card, source, sample, str(labels)), "random_sample": check}
    elif label_free != "none":
        moved = new_site.label_free_points(card, source, outputs["probs"], label_free)
        points = {"moved": True, "rule": f"moved without labels ({label_free})", **moved.to_dict()}
    status = operating_point_status(
        None if shift is None else shift["shifted"],
        labelled=0 if sample is None else len(sample["labels"]),
        method=label_free,
        sample=check,
    )
    card = _adapted_card(card, source, points, moved, status)
    _write_run(source, target, config, model, card, sample, images, scorer=scorer)
    suggested = None
    if suggest:
        task = card.label_space.binary_task
        suggested = new_site.write_suggestions(target, paths, outputs, task, suggest)
    record = {
        "source_run": str(source.dir.resolve()),
        "data": str(data),
        **info,
        "operating_points": points,
        "batch_shift": shift,
        "finetune": tuned,
        "operating_point_status": status,
        "suggested": None if suggested is None else RunFolder.SUGGESTED,
        **_notes(labels),
    }
    target.write_adaptation(record)
    _mark_metrics(target, record)
    return AdaptResult(target.dir, record)


def _write_run(
    source: RunFolder,
    target: RunFolder,
    config: Any,
    model: Any,
    card: ModelCard,
    sample: dict[str, Any] | None,
    parity_images: np.ndarray,
    scorer: Scorer | None = None,
) -> None:
    """The adapted run folder, written once everything is computed: the source's copied files,
    the labelled sample's logits (as ``val_logits.npz``), the model and its ONNX engine (the
    graph of the adapted model's scorer when there is one: it was exported and checked against
    PyTorch on the site's images already)."""
    target.dir.mkdir(parents=True, exist_ok=True)
    target.write_config(config)
    for name in _COPIED:
        if source.path(name).is_file():
            shutil.copy2(source.path(name), target.path(name))
    if sample is not None:
        target.write_val_logits(sample["labels"], sample["logits"])
    target.write_model(model, card)
    engine = scorer if getattr(scorer, "graph", None) else model
    write_run_engine(target, engine, parity_images)  # RUN/model.onnx of the adapted weights


def _check_options(batch_size: int, recalibrate: str, finetune: bool, labels: Any) -> None:
    if batch_size < 1:
        raise MedtuneError(f"batch_size must be at least 1, got {batch_size}")
    if recalibrate not in LABEL_FREE_METHODS:
        raise MedtuneError(
            f"recalibrate {recalibrate!r} is unknown; use one of {', '.join(LABEL_FREE_METHODS)}"
        )
    if finetune and labels is None:
        raise MedtuneError("finetune needs labels (--labels): a labelled sample of the new site")


def _notes(labels: Any) -> dict[str, str]:
    """What ``adaptation.json`` says about the copied files."""
    return {
        "val_logits": (
            f"the labelled sample of the new site ({labels})"
            if labels is not None
            else "the source run's validation logits (without labels; model.json holds the points)"
        ),
        "metrics_json": "the SOURCE run's figures, before adaptation; evaluate this run",
        "site_shift": (
            "not carried over: it was fitted on the source model's features, which AdaBN "
            "changed for the new site's images"
        ),
    }


def _check_adaptable(source: RunFolder, target: RunFolder, card: ModelCard) -> None:
    if card.kind == "probe":
        raise MedtuneError(
            f"{source.dir}: a probe run cannot be adapted by AdaBN: its linear layer was fitted "
            "on features computed with ImageNet BatchNorm statistics, and new statistics put "
            "its logits on another scale (AUC ~0.50 even at home, findings.md); adapt a "
            "fine-tuning run"
        )
    if target.dir.resolve() == source.dir.resolve():
        raise MedtuneError(f"{target.dir}: out must be a new folder, not the run being adapted")
    if target.dir.exists() and (not target.dir.is_dir() or any(target.dir.iterdir())):
        raise MedtuneError(f"{target.dir}: already exists and is not empty; choose a new --out")


def _site_images(data: str | Path) -> list[Any]:
    """What to decode for each image of the new site: file paths, or arrays of an npz set."""
    path = Path(data)
    if not path.exists():
        raise MedtuneError(f"{path}: no such file or folder; give the new site's images")
    if path.is_dir():
        from medtune.data.images import iter_image_files

        found: list[Any] = list(iter_image_files(path))
    else:  # a labelled set given as a CSV or an .npz: its images, labels ignored
        from medtune.data import load_imageset

        imageset = load_imageset(path)
        found = [imageset.source_of(i) for i in range(len(imageset))]
    if not found:
        raise MedtuneError(f"{path}: no images found; give a folder of the new site's images")
    return found


def _prepare_all(sources: list[Any], card: ModelCard, progress: bool) -> np.ndarray:
    """The images as uint8 (N, S, S, 3), prepared like the training cache
    (:func:`medtune.data.prepare_image`), decoded once for every pass."""
    from tqdm.auto import tqdm

    from medtune.data.preprocess import prepare_image

    spec = card.input_spec
    # closed on an unreadable image too, so the one-line error starts a line of its own
    with tqdm(sources, desc="adapt", unit="image", disable=not progress) as bar:
        return np.stack([prepare_image(src, spec.image_size, spec.fundus) for src in bar])


def _adabn(
    model: Any, card: ModelCard, images: np.ndarray, freeze: int, batch_size: int
) -> dict[str, Any]:
    from medtune.data.normalise import normalise_batch
    from medtune.transfer.adabn import adabn

    spec = card.input_spec
    normalised = (
        normalise_batch(x, spec.mean, spec.std) for x in new_site.batches(images, batch_size)
    )
    return adabn(model, normalised, freeze)


def _labelled_set(source: RunFolder, card: ModelCard, labels: str | Path) -> Any:
    """The labelled sample, checked before any work: a binary task and enough positives."""
    from medtune.data import load_imageset

    task = card.label_space.binary_task
    if task is None:
        raise MedtuneError(
            f"{source.dir}: the model's {card.num_classes} classes define no binary task "
            "(referable DR or a positive class), so it has no operating point to move; "
            "adapt without labels"
        )
    imageset = load_imageset(labels, classes=card.class_names)
    n_pos = int(task.labels(imageset.labels).sum())
    n_neg = len(imageset) - n_pos
    if n_pos < MIN_SITE_POSITIVES or n_neg < 1:
        raise MedtuneError(
            f"{labels}: {n_pos} positive and {n_neg} negative images ({task.name}); moving the "
            f"operating points needs at least {MIN_SITE_POSITIVES} positives and one negative: "
            "label more images of the new site, or adapt without labels"
        )
    return imageset


def _check_sample(
    card: ModelCard, scorer: Any, sample_set: Any, site: tuple, progress: bool
) -> tuple[dict[str, Any] | None, np.ndarray, np.ndarray]:
    """Score the labelled sample with the adapted model and test whether it looks like a random
    sample of the site (``site``: its prepared images, probabilities and patients;
    :func:`new_site.sample_check`); returns the check, the sample's prepared images and their
    plain logits."""
    sample_images = _prepare_all(_sources(sample_set), card, progress)
    sample_plain = scorer.logits(sample_images, "none")
    images, probs, patients = site
    check = new_site.sample_check(
        card,
        sample_images,
        card.probabilities(sample_plain),
        images,
        probs,
        (sample_set.groups, patients),
    )
    return check, sample_images, sample_plain


def _sources(imageset: Any) -> list[Any]:
    return [imageset.source_of(i) for i in range(len(imageset))]


def _sample_logits(
    scorer: Any, labels: Any, images: np.ndarray, plain: np.ndarray | None
) -> dict[str, Any]:
    """Labels (N,) and logits per TTA mode of the labelled sample's prepared images, from the
    adapted model's scorer (:func:`medtune.deploy.engine.model_scorer`); ``plain``: its
    untransformed logits when already computed."""
    from medtune.evaluation.scoring import logits_per_tta

    plain = scorer.logits(images, "none") if plain is None else plain
    return {"labels": np.asarray(labels), "logits": logits_per_tta(scorer, images, plain)}


def _move_points(
    card: ModelCard, source: RunFolder, sample: dict[str, Any], labels: str
) -> dict[str, Any]:
    """The moved operating points, as recorded in ``adaptation.json``."""
    from medtune.evaluation.calibration import apply_temperature, fit_temperature

    task = card.label_space.binary_task
    assert task is not None  # checked by _labelled_set
    y, logits = sample["labels"], sample["logits"]["none"]
    val = source.read_val_logits()
    old = choose_operating_points(
        task.labels(val["labels"]),
        task.score(apply_temperature(val["logits_none"], card.temperature)),
        val.get("sites"),
    )
    if not old:
        raise MedtuneError(
            f"{source.dir}: the run's validation images hold no positive or no negative case, "
            "so it has no validated operating point to move"
        )
    new_t = fit_temperature(logits, y)  # the temperature move_operating_point refits
    points: dict[str, Any] = {}
    for name, target in OPERATING_POINTS.items():
        if target is None:
            continue
        moved = move_operating_point(
            logits,
            y,
            task,
            validated_threshold=old[name]["threshold"],
            target_sensitivity=target,
            temperature=card.temperature,
        )
        points[name] = _point(name, old[name]["threshold"], moved, task, y, logits)
    new = choose_operating_points(task.labels(y), task.score(apply_temperature(logits, new_t)))
    points["youden"] = _point(
        "youden", old["youden"]["threshold"], new["youden"], task, y, logits, new_t
    )
    y_bin = task.labels(y)
    return {
        "moved": True,
        "labels": labels,
        "task": task.name,
        "n_images": len(y),
        "n_positives": int(y_bin.sum()),
        "n_negatives": int(len(y_bin) - y_bin.sum()),
        "temperature": {"from": float(card.temperature), "to": float(new_t)},
        "points": points,
        "note": (
            "sensitivity and specificity are on the labelled sample the thresholds were chosen "
            "on (in-sample, optimistic); 95% intervals are Clopper-Pearson"
        ),
    }


def _point(
    name: str,
    old_threshold: float,
    moved: dict[str, Any],
    task: BinaryTask,
    y: np.ndarray,
    logits: np.ndarray,
    temperature: float | None = None,
) -> dict[str, Any]:
    """One moved point: thresholds from and to, sensitivity/specificity on the sample with
    exact (Clopper-Pearson) 95% intervals."""
    from scipy.stats import binomtest

    from medtune.evaluation.calibration import apply_temperature

    t = moved.get("temperature", temperature)
    y_bin = task.labels(y)
    applied = apply_operating_point(
        y_bin, task.score(apply_temperature(logits, t)), moved["threshold"]
    )
    n_pos, n_neg = int(y_bin.sum()), int(len(y_bin) - y_bin.sum())
    sens_ci = binomtest(applied["tp"], n_pos).proportion_ci(0.95, method="exact")
    spec_ci = binomtest(applied["tn"], n_neg).proportion_ci(0.95, method="exact")
    return {
        "name": name,
        "from": float(old_threshold),
        "to": float(moved["threshold"]),
        "rule": moved["rule"],
        "sensitivity": applied["sensitivity"],
        "sensitivity_ci95": [float(sens_ci.low), float(sens_ci.high)],
        "specificity": applied["specificity"],
        "specificity_ci95": [float(spec_ci.low), float(spec_ci.high)],
    }


def _adapted_card(
    card: ModelCard,
    source: RunFolder,
    points: dict[str, Any],
    label_free: OperatingPoints | None,
    status: dict[str, Any],
) -> ModelCard:
    """The adapted model's card: no site-shift model (not carried over) and its source run.

    Points moved on labels: the refitted temperature and no stored operating points (the
    source's no longer hold: readers choose them again from ``val_logits.npz``, which then holds
    the labelled sample, i.e. the moved points). Points moved without labels replace the stored
    ones. Stored points carry their ``status`` at the new site
    (:func:`medtune.evaluation.label_free.operating_point_status`)."""
    ops = card.operating_points
    changes: dict[str, Any] = {
        "site_shift": None,
        "provenance": Provenance(adapted_from=str(source.dir.resolve())),
    }
    if label_free is not None:
        ops = label_free
    elif points["moved"]:
        changes["temperature"] = float(points["temperature"]["to"])
        ops = None
    if ops is not None:
        ops = dataclasses.replace(ops, validated=status["validated"], status=status["status"])
    return card.replace(operating_points=ops, **changes)


def _mark_metrics(target: RunFolder, record: dict[str, Any]) -> None:
    """Say in the copied ``metrics.json`` that its figures are the source model's."""
    if not target.metrics_path.is_file():
        return
    metrics = target.read_metrics()
    metrics["adaptation"] = {
        "source_run": record["source_run"],
        "note": "val/test figures are the source run's, before adaptation; evaluate this run",
        "layers_adapted": record["layers_adapted"],
        "images": record["images"],
        "operating_points_moved": record["operating_points"]["moved"],
    }
    target.write_metrics(metrics)
