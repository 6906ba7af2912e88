"""medtune.evaluation: the evaluation core. The label space and the model card (how a trained
model is fed and read), the scorer protocol, clinical metrics with intervals, operating points,
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
        "metrics": ["compute_metrics", "quick_metrics"],
        "operating_points": ["apply_operating_point", "choose_operating_points"],
        "intervals": ["bootstrap_weights", "proportion_ci"],
        "labels": ["LabelSpace", "is_ordinal"],
        "card": ["ModelCard", "read_card", "write_card"],
        "scoring": ["Scorer", "score"],
        "decoding": ["choose_decoding", "decode", "expected_grade", "fit_qwk_thresholds"],
        "scores": ["balanced_accuracy", "qwk"],
        "inference": ["TorchScorer", "predict_logits"],
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
