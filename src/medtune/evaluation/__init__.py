"""medtune.evaluation: clinical metrics with bootstrap intervals, operating points, calibration,
ordinal decoding, TTA inference, Grad-CAM, figures, the HTML report / model card, and the
image-quality gate (``assess_quality``).

Submodules needing torch or grad-cam (``inference``, ``gradcam``), matplotlib (``plots``,
``report``) or ``medtune.data`` (``quality``) are imported lazily, so ``import medtune.evaluation``
stays light.
"""

from __future__ import annotations

import importlib
from typing import Any

from medtune.evaluation.calibration import (
    apply_temperature,
    expected_calibration_error,
    fit_temperature,
    reliability_curve,
)
from medtune.evaluation.metrics import (
    apply_operating_point,
    bootstrap_weights,
    choose_operating_points,
    compute_metrics,
    quick_metrics,
)
from medtune.evaluation.ordinal import (
    choose_decoding,
    decode,
    expected_grade,
    fit_qwk_thresholds,
)

_LAZY = {
    "predict_logits": "medtune.evaluation.inference",
    "softmax": "medtune.evaluation.inference",
    "gradcam_overlays": "medtune.evaluation.gradcam",
    "select_gradcam_examples": "medtune.evaluation.gradcam",
    "write_report": "medtune.evaluation.report",
    "assess_quality": "medtune.evaluation.quality",
    "QualityThresholds": "medtune.evaluation.quality",
    "QualityVerdict": "medtune.evaluation.quality",
}

__all__ = [
    "apply_operating_point",
    "apply_temperature",
    "bootstrap_weights",
    "choose_decoding",
    "choose_operating_points",
    "compute_metrics",
    "decode",
    "expected_calibration_error",
    "expected_grade",
    "fit_qwk_thresholds",
    "fit_temperature",
    "quick_metrics",
    "reliability_curve",
    *_LAZY,
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
