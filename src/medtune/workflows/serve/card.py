"""The model card of ``medtune serve``: what the model is, how it was trained and validated, how
it refers, and which id and version the worklist records for it.

Metrics come from the run folder: the newest ``medtune evaluate`` result (bootstrap CIs), else
the run's own test (or validation) metrics, each figure with its ``<name>_ci`` interval as
:func:`medtune.evaluation.metrics.compute_metrics` writes them. An exported ``model.onnx`` carries
no metrics in its ``model.json``; when the export still sits in its run folder
(``RUN/export/model.onnx``, what ``medtune export`` writes) the run's metrics are shown.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from medtune.errors import MedtuneError
from medtune.runs import RunFolder
from medtune.workflows.predict import prediction_meta

DISCLAIMER = "Research use only. Not a medical device: not for diagnosis or treatment decisions."
INTENDED_USE = (
    "Research on grading diabetic retinopathy in colour fundus photographs. A clinician reviews "
    "every result; a result never replaces an examination."
)


def card(screener: Any) -> dict[str, Any]:
    """What the page's model-card panel shows.

    Parameters
    ----------
    screener : medtune.workflows.serve.screening.Screener
        The loaded model (not imported here: the screener imports this module).

    Returns
    -------
    dict
        ``model`` (backbone, grade names, input size, decoding, id, version), ``training``
        (data, strategy, synthetic), ``metrics`` (the split or evaluation they come from and
        each metric with its 95% CI where the run stored one), ``referral`` (the rule ``refer``
        uses, with its validated sensitivity and specificity), ``intended_use``,
        ``disclaimer``, ``backend`` and ``explain``.
    """
    p = screener.predictor
    meta = prediction_meta(p, screener.operating_point)
    out: dict[str, Any] = {
        "intended_use": INTENDED_USE,
        "disclaimer": DISCLAIMER,
        "backend": _backend(screener),
        "explain": screener.can_explain,
        "model": {
            "backbone": p.backbone,
            "grades": p.grade_names,
            "image_size": p.image_size,
            "decoding": p.decoding.get("method"),
            "tta": p.tta,
            "id": screener.model_id,
            "version": screener.model_version,
        },
        "training": {},
        "referral": meta.get("referral"),
        "quality": meta.get("quality"),
    }
    if screener.run is not None:
        out.update(_run_card(RunFolder(screener.run)))
    else:
        out.update(_export_card(screener.model_path))
    return out


def identity(run: Path | None, model_path: Path | None) -> tuple[str, str]:
    """``(model id, version)`` recorded with each screening: the first 16 hex digits of the
    SHA-256 of the weights (``model.safetensors`` or ``model.onnx``), and the run or export
    folder's name with the medtune version that served it."""
    from medtune.version import __version__

    if run is not None:
        weights, name = RunFolder(run).weights_path, run.name
    else:
        weights = model_path / "model.onnx" if model_path.is_dir() else model_path
        name = weights.parent.name
    digest = hashlib.sha256()
    with weights.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16], f"{name} (medtune {__version__})"


def headline(metrics: dict[str, Any]) -> dict[str, Any]:
    """Scalar metrics with their 95% CI (``<name>_ci``, as ``compute_metrics`` writes them)."""
    out: dict[str, Any] = {}
    for key, value in metrics.items():
        if isinstance(value, bool) or key.endswith("_ci"):
            continue
        if isinstance(value, float) or key == "n":
            out[key] = {"value": value, "ci95": metrics.get(f"{key}_ci")}
    return out


def _run_card(folder: RunFolder) -> dict[str, Any]:
    training: dict[str, Any] = {"synthetic": folder.read_card().synthetic}
    if folder.has_config():
        config = folder.read_config()
        data = Path(str(config.data)).name if config.data else None
        training.update({"data": data, "strategy": config.strategy})
    out: dict[str, Any] = {"training": training}
    source, metrics = _best_metrics(folder)
    if metrics:
        out["metrics"] = {"source": source, "values": headline(metrics)}
    return out


def _best_metrics(folder: RunFolder) -> tuple[str | None, dict[str, Any]]:
    """The newest ``medtune evaluate`` result (bootstrap CIs) or else the run's test metrics."""
    latest = folder.latest_eval_metrics()
    if latest is not None:
        return f"evaluation {latest[0]}", latest[1]
    try:
        metrics = folder.read_metrics()
    except (MedtuneError, OSError, ValueError):
        return None, {}
    for split in ("test", "val"):
        if isinstance(metrics.get(split), dict):
            return f"{split} split", metrics[split]
    return None, {}


def _export_card(model_path: Path) -> dict[str, Any]:
    """``synthetic`` from the export's model card (``model.json``, the run's card copied by
    export); training details and metrics from the run folder the export still sits in."""
    from medtune.deploy.onnx_predictor import SIDECAR_NAME
    from medtune.evaluation.card import read_card

    folder = model_path if model_path.is_dir() else model_path.parent
    try:
        synthetic = read_card(folder / SIDECAR_NAME).synthetic
    except MedtuneError:
        synthetic = False
    run = RunFolder(folder.parent)
    if run.card_path.is_file() and run.metrics_path.is_file():
        try:
            return _run_card(run)
        except (MedtuneError, OSError, ValueError):
            pass
    return {"training": {"synthetic": synthetic}}


def _backend(screener: Any) -> str:
    """What scores the photographs (:func:`medtune.deploy.engine.describe`) and from where."""
    from medtune.deploy.engine import describe

    engine = "ONNX Runtime" if describe(screener.predictor.scorer) == "onnx" else "PyTorch"
    return f"{engine} ({'run folder' if screener.run is not None else 'exported model'})"
