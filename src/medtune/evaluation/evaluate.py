"""``medtune evaluate``: metrics with intervals, operating points from validation, and the report.

Thresholds, the temperature and the decoding all come from the run's VALIDATION data and are
applied unchanged to the evaluated data.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from medtune.errors import MedtuneError
from medtune.evaluation.calibration import apply_temperature
from medtune.evaluation.finalize import ImageEvaluator, load_val_logits, part_groups
from medtune.evaluation.metrics import compute_metrics
from medtune.evaluation.ordinal import decode
from medtune.io import write_json
from medtune.models.store import ModelMeta, load_model

GRADCAM_PER_CLASS = 1


@dataclass
class EvalResult:
    """Where the evaluation was written and what it measured."""

    dir: Path
    metrics: dict[str, Any]
    report: Path


def evaluate(
    run: str | Path,
    data: str | None = None,
    *,
    tta: str = "none",
    name: str | None = None,
    n_boot: int = 1000,
    gradcam: bool = True,
    skip_bad: bool = False,
    progress: bool = True,
) -> EvalResult:
    """Evaluate a run's model on ``data`` (default: the run's own test split).

    Writes ``RUN/eval/<name>/metrics.json``, ``report.html``, ``summary.md`` and ``MODEL_CARD.md``.
    """
    from medtune.training.config import TrainConfig
    from medtune.training.run import CONFIG_FILE

    run = Path(run)
    if tta not in ("none", "rot90"):
        raise MedtuneError(f"--tta {tta!r} is not supported by evaluate; use none or rot90")
    model, meta = load_model(run)
    config = dataclasses.replace(
        TrainConfig.load(run / CONFIG_FILE), skip_bad=skip_bad, progress=progress
    )
    part = _evaluation_part(config, run, data)
    # the precision the run validated in: its temperature and decoding were fitted on those logits
    evaluator = ImageEvaluator(model, meta.mean, meta.std, bf16=config.bf16, progress=progress)
    probs = apply_temperature(evaluator.logits(part, tta), meta.temperature)
    val = load_val_logits(run)
    val_probs = apply_temperature(val[f"logits_{tta}"], meta.temperature)
    metrics = compute_metrics(
        part.labels,
        probs,
        meta.class_names,
        groups=part_groups(part),
        ordinal=meta.ordinal,
        val=(val["labels"], val_probs),
        decoding=meta.decoding,
        n_boot=n_boot,
    )
    metrics["tta"] = tta
    metrics["data"] = data or f"{config.data} (test split)"
    out = run / "eval" / (name or _default_name(data, tta))
    write_json(out / "metrics.json", metrics)
    examples = _gradcam_examples(model, meta, part, probs) if gradcam else None
    report = _write_report(out, run, meta, config, metrics, part, probs, examples)
    return EvalResult(out, metrics, report)


def _evaluation_part(config: Any, run: Path, data: str | None) -> Any:
    """The run's test split, or every image of another data set, prepared like the training."""
    from medtune.training.datamodule import Part
    from medtune.training.parts import prepare_run_data, prepare_source

    if data is None:
        run_data = prepare_run_data(config, config.image_size, run)
        if run_data.test is None:
            raise MedtuneError(
                f"{run}: the run has no test split; pass --data PATH with labelled test images"
            )
        return run_data.test
    cache = prepare_source(data, config, config.image_size, run, progress=config.progress)
    return Part(cache, np.arange(len(cache)))


def _default_name(data: str | None, tta: str) -> str:
    base = "test" if data is None else Path(data.rstrip("/")).stem or "data"
    base = re.sub(r"[^A-Za-z0-9_.-]+", "_", base)
    return base if tta == "none" else f"{base}-tta-{tta}"


def target_layer(model: nn.Module) -> nn.Module:
    """The module whose activations Grad-CAM explains: the last stage used by the classifier."""
    from medtune.models.probe import StageProbeClassifier

    if isinstance(model, StageProbeClassifier):
        spec = model.backbone_info
        name = model.stage or spec.stages[-1].name
        stage = next(s for s in spec.stages if s.name == name)
        return model.body.get_submodule(stage.tap)
    return model.backbone.get_submodule(model.stages[-1].tap)


def _gradcam_examples(
    model: nn.Module, meta: ModelMeta, part: Any, probs: np.ndarray
) -> list[tuple[np.ndarray, str]]:
    from medtune.evaluation.gradcam import gradcam_overlays, select_gradcam_examples

    pred = decode(probs, meta.decoding)
    picks = select_gradcam_examples(
        part.labels,
        probs,
        meta.class_names,
        pred=pred,
        n_correct=GRADCAM_PER_CLASS,
        n_wrong=GRADCAM_PER_CLASS,
    )
    if not picks:
        return []
    rows = [i for i, _ in picks]
    images = np.array(part.cache.images[part.indices[rows]])
    overlays = gradcam_overlays(
        model,
        target_layer(model),
        images,
        meta.mean,
        meta.std,
        targets=[int(pred[i]) for i in rows],
    )
    return [(overlay, caption) for overlay, (_, caption) in zip(overlays, picks, strict=True)]


def _write_report(out, run, meta, config, metrics, part, probs, examples) -> Path:
    from medtune.evaluation.report import write_report

    curves = run / "logs" / "metrics.csv"
    return write_report(
        out,
        metrics={"test": metrics},
        config=config.to_dict(),
        y_true=part.labels,
        probs=probs,
        class_names=meta.class_names,
        curves_csv=curves if curves.is_file() else None,
        gradcam_examples=examples,
        title=f"medtune evaluation: {run.name}",
        synthetic=meta.synthetic,
        split="test",
        model_info=dataclasses.asdict(meta),
    )
