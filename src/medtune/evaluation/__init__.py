"""medtune.evaluation: the evaluation core. Clinical metrics with intervals, operating points,
calibration, ordinal decoding, TTA inference, Grad-CAM, figures, the HTML report, and the
image-quality gate (``assess_quality``), and eyes and patients from image rows
(``aggregate_eyes``, ``aggregate_patient``, ``screen_patients``).

Names are imported lazily (PEP 562, through ``lazy_loader``): the torch-free ONNX predictor
imports :mod:`medtune.evaluation.calibration` and :mod:`medtune.evaluation.decoding`
(numpy/scipy only) without pulling in scikit-learn, torch or matplotlib.
"""

from __future__ import annotations

import lazy_loader

__getattr__, __dir__, __all__ = lazy_loader.attach(
    __name__,
    submod_attrs={
        "calibration": [
            "apply_temperature",
            "expected_calibration_error",
            "fit_temperature",
            "reliability_curve",
        ],
        "metrics": [
            "apply_operating_point",
            "bootstrap_weights",
            "choose_operating_points",
            "compute_metrics",
            "is_ordinal",
            "quick_metrics",
        ],
        "decoding": ["choose_decoding", "decode", "expected_grade", "fit_qwk_thresholds"],
        "scores": ["balanced_accuracy", "qwk"],
        "inference": ["predict_logits", "softmax"],
        "gradcam": ["gradcam_overlays", "select_gradcam_examples"],
        "report": ["write_report"],
        "quality": ["QualityThresholds", "QualityVerdict", "assess_quality"],
        "patients": [
            "EyeResult",
            "PatientResult",
            "aggregate_eyes",
            "aggregate_patient",
            "aggregate_patients",
            "screen_patients",
        ],
    },
)
