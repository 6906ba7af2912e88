"""The last step of training: calibrate and decode on validation, measure val and test, save."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from torch import nn

from medtune.evaluation.calibration import apply_temperature, fit_temperature
from medtune.evaluation.metrics import compute_metrics
from medtune.evaluation.ordinal import choose_decoding
from medtune.io import atomic_path, write_json
from medtune.models.store import ModelMeta, save_model

VAL_LOGITS = "val_logits.npz"
TTA_MODES = ("none", "rot90")


class Evaluator(Protocol):
    def logits(self, part: Any, tta: str = "none") -> np.ndarray: ...


def uint8_batches(part: Any, batch_size: int):
    """The part's cached images as uint8 (B, 3, H, W) tensors, in order."""
    import torch

    for start in range(0, len(part.indices), batch_size):
        batch = part.cache.images[part.indices[start : start + batch_size]]
        yield torch.from_numpy(np.array(batch)).permute(0, 3, 1, 2)


class ImageEvaluator:
    """Logits of a model on a part of the data, optionally with rot90 test-time augmentation."""

    def __init__(
        self,
        model: nn.Module,
        mean,
        std,
        *,
        bf16: bool = False,
        batch_size: int = 32,
        progress: bool = True,
    ) -> None:
        self.model = model.eval()
        self.mean, self.std, self.bf16 = list(mean), list(std), bf16
        self.batch_size, self.progress = batch_size, progress

    def logits(self, part: Any, tta: str = "none") -> np.ndarray:
        from medtune.evaluation.inference import predict_logits

        return predict_logits(
            self.model,
            uint8_batches(part, self.batch_size),
            mean=self.mean,
            std=self.std,
            tta=tta,
            bf16=self.bf16,
            progress=self.progress,
        )


def part_groups(part: Any) -> list[str] | None:
    groups = part.cache.groups
    return None if groups is None else [groups[i] for i in part.indices]


def finalize_run(
    model: nn.Module, meta: ModelMeta, data: Any, run_dir: Path, evaluator: Evaluator, config: Any
) -> dict[str, Any]:
    """Fit the temperature and the decoding on validation logits, compute ``metrics.json``
    (``{"val": ..., "test": ...}``), and save the deployable model with both."""
    y_val = data.val.labels
    val_logits = {tta: evaluator.logits(data.val, tta) for tta in TTA_MODES}
    save_val_logits(run_dir, y_val, val_logits)
    temperature = fit_temperature(val_logits["none"], y_val)
    val_probs = apply_temperature(val_logits["none"], temperature)
    decoding = (
        choose_decoding(y_val, val_probs, meta.num_classes)
        if meta.ordinal
        else {"method": "argmax"}
    )
    meta = dataclasses.replace(
        meta, temperature=float(temperature), decoding=decoding, stage=getattr(model, "stage", None)
    )
    save_model(model, meta, run_dir)
    common = {"class_names": meta.class_names, "ordinal": meta.ordinal, "decoding": decoding}
    metrics = {
        "val": compute_metrics(y_val, val_probs, groups=part_groups(data.val), **common),
    }
    if data.test is not None:
        test_probs = apply_temperature(evaluator.logits(data.test, "none"), temperature)
        metrics["test"] = compute_metrics(
            data.test.labels,
            test_probs,
            groups=part_groups(data.test),
            val=(y_val, val_probs),
            **common,
        )
    metrics["model"] = {
        "temperature": float(temperature),
        "decoding": decoding,
        "strategy": config.strategy,
        "stage": meta.stage,
    }
    write_json(Path(run_dir) / "metrics.json", metrics)
    return metrics


def save_val_logits(run_dir: Path, labels: np.ndarray, logits: dict[str, np.ndarray]) -> None:
    with atomic_path(Path(run_dir) / VAL_LOGITS) as tmp, open(tmp, "wb") as fh:
        np.savez(fh, labels=labels, **{f"logits_{k}": v for k, v in logits.items()})


def load_val_logits(run_dir: Path) -> dict[str, np.ndarray]:
    with np.load(Path(run_dir) / VAL_LOGITS) as npz:
        return {k: npz[k] for k in npz.files}
