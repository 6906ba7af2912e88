"""The probe engine, scenarios 1 and 3: a linear classifier on frozen, cached features of the
top (scenario 1, ``linear-probe``) or an earlier backbone stage (scenario 3, ``layer-probe``)."""

from __future__ import annotations

import logging

import numpy as np

from medtune.config import ProbeSettings
from medtune.data import Part
from medtune.errors import MedtuneError
from medtune.evaluation.labels import is_ordinal
from medtune.models import Backbone
from medtune.models.stage_classifier import StageProbeClassifier
from medtune.runs import RunData, RunFolder
from medtune.transfer.features import TOP, backbone_id, extract_features
from medtune.transfer.linear_probe import ProbeResult, probe_all_stages

log = logging.getLogger("medtune")

ALL_ROTATIONS = (0, 1, 2, 3)


def stage_features(
    backbone: Backbone, part: Part, stages: list[str], rotations, settings: ProbeSettings
) -> dict[tuple[str, int], np.ndarray]:
    """Cached features of ``part``'s rows for each (stage, rotation)."""
    feats = extract_features(
        backbone,
        part.cache,
        stages,
        rotations=rotations,
        model_id=backbone_id(backbone, settings.precision),
        batch_size=settings.batch_size,
        bf16=settings.bf16,
        progress=settings.progress,
    )
    return {key: value[part.indices] for key, value in feats.items()}


def candidate_stages(settings: ProbeSettings, backbone: Backbone) -> list[str]:
    """Which stage(s) the probe may use: the top features, one named stage, or every stage."""
    if settings.strategy == "linear-probe":
        return [TOP]
    names = [s.name for s in backbone.stages]
    if settings.layer in (None, "best"):
        return names
    if settings.layer not in names:
        raise MedtuneError(
            f"layer {settings.layer!r} is not a stage of {backbone.name}; use best or one of: "
            + ", ".join(names)
        )
    return [settings.layer]


def run_probe(
    settings: ProbeSettings, backbone: Backbone, data: RunData, run: RunFolder
) -> StageProbeClassifier:
    """Fit a probe on cached features and return the equivalent image-level model.

    Parameters
    ----------
    settings : ProbeSettings
        Strategy, layer (a stage name, or ``None``/``"best"`` to choose on validation),
        rotation-augmented training features, class weighting.
    backbone : Backbone
        The frozen pretrained network.
    data : RunData
        Prepared train and validation parts.
    run : RunFolder
        Where ``probe.json`` (the stage and L2 strength chosen, with every candidate's
        validation score) is written.

    Returns
    -------
    StageProbeClassifier
        Backbone + pooled stage + linear layer (standardisation folded in), in eval mode.

    Notes
    -----
    L2-regularised multinomial logistic regression (scikit-learn) on pooled activations, the
    linear probe of Kornblith et al. 2019; the regularisation strength and, for
    ``layer-probe``, the stage are chosen by validation QWK (graded labels) or balanced accuracy.
    """
    stages = candidate_stages(settings, backbone)
    train_rotations = ALL_ROTATIONS if settings.rotations else (0,)
    train_feats = stage_features(backbone, data.train, stages, train_rotations, settings)
    val_feats = stage_features(backbone, data.val, stages, (0,), settings)
    y_train = np.tile(data.train.labels, len(train_rotations))
    by_stage = {
        s: (np.concatenate([train_feats[(s, k)] for k in train_rotations]), val_feats[(s, 0)])
        for s in stages
    }
    ranked = probe_all_stages(
        by_stage,
        y_train,
        data.val.labels,
        ordinal=is_ordinal(data.class_names),
        class_weight="balanced" if settings.balanced else None,
        seed=settings.seed,
    )
    stage, result = ranked[0]
    run.write_probe_report(_probe_report(ranked))
    weight, bias = full_linear_weights(result, len(data.class_names))
    model = StageProbeClassifier(backbone, None if stage == TOP else stage, len(data.class_names))
    model.set_linear(weight, bias)
    log.info(
        "probe on stage %s, C=%g, val %s=%.4f", stage, result.C, result.metric, result.val_score
    )
    return model.eval()


def full_linear_weights(result: ProbeResult, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """(K, D) and (K,) over every class; a class absent from training gets a very low bias."""
    w, b = result.to_linear_weights()
    weight = np.zeros((num_classes, w.shape[1]), dtype=np.float32)
    bias = np.full(num_classes, -1e4, dtype=np.float32)
    weight[result.classes] = w
    bias[result.classes] = b
    return weight, bias


def _probe_report(ranked: list[tuple[str, ProbeResult]]) -> dict:
    return {
        "chosen_stage": ranked[0][0],
        "stages": [
            {
                "stage": s,
                "C": r.C,
                "metric": r.metric,
                "val_score": r.val_score,
                "val_log_loss": r.val_log_loss,
            }
            for s, r in ranked
        ],
    }
