"""Scenarios 1 and 3: a linear classifier on frozen, cached features of one backbone stage."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from medtune.errors import MedtuneError
from medtune.io import write_json
from medtune.models import Backbone
from medtune.models.probe import StageProbeClassifier
from medtune.training.config import TrainConfig
from medtune.training.datamodule import Part
from medtune.training.parts import RunData
from medtune.transfer.features import TOP, backbone_id, extract_features
from medtune.transfer.probe import ProbeResult, probe_all_stages

log = logging.getLogger("medtune")

ALL_ROTATIONS = (0, 1, 2, 3)


class FeatureEvaluator:
    """Logits of a probe computed from cached features (no backbone pass when features exist)."""

    def __init__(
        self,
        backbone: Backbone,
        stage: str,
        weight: np.ndarray,
        bias: np.ndarray,
        config: TrainConfig,
    ) -> None:
        self.backbone, self.stage, self.weight, self.bias = backbone, stage, weight, bias
        self.config = config

    def logits(self, part: Part, tta: str = "none") -> np.ndarray:
        if tta not in ("none", "rot90"):
            raise MedtuneError(f"--tta {tta!r} is not available for probes; use none or rot90")
        rotations = ALL_ROTATIONS if tta == "rot90" else (0,)
        feats = stage_features(self.backbone, part, [self.stage], rotations, self.config)
        per_rotation = [feats[(self.stage, k)] @ self.weight.T + self.bias for k in rotations]
        return np.mean(per_rotation, axis=0)


def stage_features(
    backbone: Backbone, part: Part, stages: list[str], rotations, config: TrainConfig
) -> dict[tuple[str, int], np.ndarray]:
    """Cached features of ``part``'s rows for each (stage, rotation)."""
    model_id = backbone_id(backbone, config.precision)
    feats = extract_features(
        backbone,
        part.cache,
        stages,
        rotations=rotations,
        model_id=model_id,
        batch_size=max(config.batch_size, 32),
        bf16=config.bf16,
        progress=config.progress,
    )
    return {key: value[part.indices] for key, value in feats.items()}


def candidate_stages(config: TrainConfig, backbone: Backbone) -> list[str]:
    """Which stage(s) the probe may use: the top features, one named stage, or every stage."""
    if config.strategy == "linear-probe":
        return [TOP]
    names = [s.name for s in backbone.stages]
    if config.layer in (None, "best"):
        return names
    if config.layer not in names:
        raise MedtuneError(
            f"--layer {config.layer!r} is not a stage of {backbone.name}; use best or one of: "
            + ", ".join(names)
        )
    return [config.layer]


def run_probe(
    config: TrainConfig, backbone: Backbone, data: RunData, run_dir: Path
) -> tuple[StageProbeClassifier, FeatureEvaluator]:
    """Fit the probe on cached features, choosing the stage (for ``--layer best``) and L2 strength
    on validation; return the equivalent image-level model and an evaluator over features."""
    from medtune.training.run import is_ordinal

    stages = candidate_stages(config, backbone)
    train_rotations = ALL_ROTATIONS if config.probe_rotations else (0,)
    train_feats = stage_features(backbone, data.train, stages, train_rotations, config)
    val_feats = stage_features(backbone, data.val, stages, (0,), config)
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
        class_weight="balanced" if config.class_weights == "auto" else None,
        seed=config.seed,
    )
    stage, result = ranked[0]
    _write_probe_report(run_dir, ranked)
    weight, bias = full_linear_weights(result, len(data.class_names))
    model = StageProbeClassifier(backbone, None if stage == TOP else stage, len(data.class_names))
    model.set_linear(weight, bias)
    log.info(
        "probe on stage %s, C=%g, val %s=%.4f", stage, result.C, result.metric, result.val_score
    )
    return model.eval(), FeatureEvaluator(backbone, stage, weight, bias, config)


def full_linear_weights(result: ProbeResult, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """(K, D) and (K,) over every class; a class absent from training gets a very low bias."""
    w, b = result.to_linear_weights()
    weight = np.zeros((num_classes, w.shape[1]), dtype=np.float32)
    bias = np.full(num_classes, -1e4, dtype=np.float32)
    weight[result.classes] = w
    bias[result.classes] = b
    return weight, bias


def _write_probe_report(run_dir: Path, ranked: list[tuple[str, ProbeResult]]) -> None:
    write_json(
        Path(run_dir) / "probe.json",
        {
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
        },
    )
