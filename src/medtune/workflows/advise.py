"""``medtune advise``: measure a data set and recommend one of the four transfer scenarios.

Measures, per backbone, on features extracted once per stage (cached like the probes'):
size per class; similarity to ImageNet (the pretrained classifier's prediction entropy and top-1
probability against the same on natural photographs, plus NCE and LEEP); per-stage LogME and a
cross-validated linear-probe score. :func:`medtune.transfer.advisor.decide` turns these into a
recommendation with one-sentence reasons.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medtune.config import TrainConfig
from medtune.data import PreparedCache, make_splits
from medtune.data.normalise import normalise_batch
from medtune.io import write_json
from medtune.models import Backbone, create_backbone
from medtune.runs import RunFolder
from medtune.transfer.advisor import Advice, SimilarityEvidence, decide, format_table
from medtune.transfer.features import TOP, backbone_id, extract_features
from medtune.transfer.linear_probe import cv_probe_score
from medtune.transfer.transferability import (
    leep,
    logme,
    mean_max_probability,
    mean_prediction_entropy,
    nce,
)

log = logging.getLogger("medtune")

# A coarse grid and capped iterations keep the cross-validated probes quick: the advisor ranks
# stages, it does not need each probe fully converged.
PROBE_CS = (1e-3, 1e-2, 1e-1, 1.0)
PROBE_MAX_ITER = 100


@dataclass
class BackboneReport:
    """Everything measured for one backbone, and its advice."""

    backbone: str
    advice: Advice
    stages: list[dict[str, Any]]
    similarity: dict[str, float | None]
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "advice": self.advice.to_dict()}


@dataclass
class AdviceReport:
    """The recommendation (best backbone first) and every backbone's measurements."""

    n_per_class: dict[str, int]
    reports: list[BackboneReport] = field(default_factory=list)

    @property
    def best(self) -> BackboneReport:
        return self.reports[0]

    def to_dict(self) -> dict[str, Any]:
        advice = self.best.advice
        return {
            "scenario": advice.scenario,
            "strategy": advice.strategy,
            "stage": advice.stage,
            "freeze": advice.freeze,
            "backbone_lr_mult": advice.backbone_lr_mult,
            "backbone": self.best.backbone,
            "reasons": advice.reasons,
            "n_per_class": self.n_per_class,
            "backbones": [r.to_dict() for r in self.reports],
        }

    def text(self) -> str:
        table = format_table(
            {
                r.backbone: [(s["stage"], s["channels"], s["logme"], s["probe"]) for s in r.stages]
                for r in self.reports
            },
            {r.backbone: r.advice for r in self.reports},
        )
        a = self.best.advice
        lines = [
            table,
            "",
            f"recommendation: scenario {a.scenario} -> --strategy {a.strategy}"
            f" --backbone {self.best.backbone}"
            + (f" --layer {a.stage}" if a.strategy == "layer-probe" else "")
            + (
                f" --freeze {a.freeze} --backbone-lr-mult {a.backbone_lr_mult:g}"
                if a.strategy == "finetune"
                else ""
            ),
        ]
        lines += [f"  {k}: {v}" for k, v in a.reasons.items()]
        return "\n".join(lines)


def natural_photos() -> list[np.ndarray]:
    """scikit-image's natural photographs (and their rotations): the 'similar' reference."""
    from skimage import data

    photos = [data.astronaut(), data.chelsea(), data.coffee(), data.rocket()]
    return [np.rot90(p, k) for p in photos for k in range(4)]


def imagenet_probs(backbone: Backbone, top_features: np.ndarray) -> np.ndarray | None:
    """Softmax of the original 1000-class head on the pooled features (None without a head)."""
    head = backbone.imagenet_head
    if head is None:
        return None
    with torch.inference_mode():
        logits = head.eval()(torch.from_numpy(top_features).float())
    return torch.softmax(logits, dim=1).numpy()


def reference_similarity(backbone: Backbone, image_size: int) -> tuple[float | None, float | None]:
    """Normalised entropy and top-1 probability of the ImageNet head on natural photographs."""
    from PIL import Image

    if backbone.imagenet_head is None:
        return None, None
    batch = np.stack(
        [
            np.asarray(Image.fromarray(np.ascontiguousarray(p)).resize((image_size, image_size)))
            for p in natural_photos()
        ]
    )
    x = normalise_batch(torch.from_numpy(batch).permute(0, 3, 1, 2), backbone.mean, backbone.std)
    with torch.inference_mode():
        feats = backbone.features(x.contiguous(memory_format=torch.channels_last)).float().numpy()
    probs = imagenet_probs(backbone, feats)
    return mean_prediction_entropy(probs, normalise=True), mean_max_probability(probs)


def measure_backbone(
    backbone: Backbone,
    cache: PreparedCache,
    rows: np.ndarray,
    config: TrainConfig,
    *,
    folds: int = 3,
) -> BackboneReport:
    """Features of every stage once, then similarity, LogME and probe scores, then the advice."""
    started = time.perf_counter()
    from medtune.evaluation.labels import is_ordinal

    names = [s.name for s in backbone.stages]
    feats = extract_features(
        backbone,
        cache,
        [*names, TOP],
        model_id=backbone_id(backbone, config.precision),
        batch_size=64,
        bf16=config.bf16,
        progress=config.progress,
    )
    y = np.asarray(cache.labels)[rows]
    groups = None if cache.groups is None else np.asarray(cache.groups)[rows]
    ordinal = is_ordinal(cache.class_names)
    stages = []
    for stage in backbone.stages:
        X = feats[(stage.name, 0)][rows]
        stages.append(
            {
                "stage": stage.name,
                "channels": int(X.shape[1]),
                "logme": logme(X, y),
                "probe": cv_probe_score(
                    X,
                    y,
                    groups,
                    folds=folds,
                    seed=config.seed,
                    ordinal=ordinal,
                    Cs=PROBE_CS,
                    max_iter=PROBE_MAX_ITER,
                ),
            }
        )
    similarity = _similarity(backbone, feats[(TOP, 0)][rows], y, config.image_size)
    counts = np.bincount(y, minlength=len(cache.class_names))
    advice = decide(
        {c: int(n) for c, n in zip(cache.class_names, counts, strict=True)},
        SimilarityEvidence(**similarity),
        [(s["stage"], s["logme"], s["probe"]) for s in stages],
        len(stages),
    )
    return BackboneReport(backbone.name, advice, stages, similarity, time.perf_counter() - started)


def _similarity(backbone: Backbone, top: np.ndarray, y: np.ndarray, image_size: int) -> dict:
    probs = imagenet_probs(backbone, top)
    if probs is None:
        return {}
    ref_entropy, ref_max = reference_similarity(backbone, image_size)
    return {
        "entropy": mean_prediction_entropy(probs, normalise=True),
        "reference_entropy": ref_entropy,
        "max_prob": mean_max_probability(probs),
        "reference_max_prob": ref_max,
        "nce": nce(probs.argmax(axis=1), y),
        "leep": leep(probs, y),
    }


def advise(
    data: str,
    backbones: list[str] | None = None,
    *,
    config: TrainConfig | None = None,
    json_path: str | Path | None = None,
) -> AdviceReport:
    """Measure a labelled image set and recommend one of the four transfer scenarios.

    Parameters
    ----------
    data : str
        A labelled image set (:func:`medtune.data.load_imageset`). Only the training and
        validation rows of a group-aware split are used, never the test rows.
    backbones : list of str, optional
        Backbones to measure (default: ``config.backbone``); the report ranks them.
    config : TrainConfig, optional
        Image size, fundus options, cache folder, seed.
    json_path : str or pathlib.Path, optional
        Also write the evidence and the advice as JSON here.

    Returns
    -------
    AdviceReport
        Per class image counts, and per backbone the similarity to ImageNet (prediction entropy
        of the ImageNet head on the data against natural photographs), LogME evidence
        (You et al. 2021) and cross-validated probe scores of every stage, with the advice.

    Raises
    ------
    MedtuneError
        For unreadable data or a backbone without weights.

    Notes
    -----
    The decision rule and its evidence: ``docs/advisor.md`` (Yosinski et al. 2014; Kornblith
    et al. 2019).
    """
    from medtune.runs.data import prepare_source

    config = config or TrainConfig(data=data)
    reports = []
    n_per_class: dict[str, int] = {}
    for name in backbones or [config.backbone]:
        backbone = create_backbone(name, weights=config.weights)
        cfg = dataclasses.replace(config, data=data, backbone=name).resolve_input(backbone)
        cache = prepare_source(data, cfg, Path(cfg.out), progress=cfg.progress)
        rows = np.flatnonzero(make_splits(cache, seed=cfg.seed) != "test")
        reports.append(measure_backbone(backbone, cache, rows, cfg))
        counts = np.bincount(np.asarray(cache.labels)[rows], minlength=len(cache.class_names))
        n_per_class = {c: int(n) for c, n in zip(cache.class_names, counts, strict=True)}
    reports.sort(key=lambda r: -max(s["probe"] for s in r.stages))
    report = AdviceReport(n_per_class, reports)
    if json_path:
        write_json(json_path, report.to_dict())
    return report


def advise_for_run(
    config: TrainConfig, backbone: Backbone, data: Any, run_dir: Path
) -> TrainConfig:
    """``--strategy auto``: measure the run's training+validation rows, apply the advice."""
    cache = data.train.cache
    rows = (
        np.concatenate([data.train.indices, data.val.indices])
        if data.val.cache is cache
        else data.train.indices
    )
    report = measure_backbone(backbone, cache, np.sort(rows), config)
    write_json(RunFolder(run_dir).path(RunFolder.ADVICE), report.to_dict())
    a = report.advice
    log.info("advisor: scenario %d -> %s", a.scenario, a.strategy)
    changes: dict[str, Any] = {"strategy": a.strategy}
    if a.strategy == "layer-probe":
        changes["layer"] = a.stage
    if a.strategy == "finetune":
        changes.update(freeze=a.freeze, backbone_lr_mult=a.backbone_lr_mult)
    return dataclasses.replace(config, **changes)
