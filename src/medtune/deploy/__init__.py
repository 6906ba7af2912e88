"""medtune.deploy: ONNX / TorchScript export with a JSON sidecar, and a torch-free ONNX predictor.

``export_model`` / ``ExportResult`` load lazily (``lazy_loader``), so that ``OnnxPredictor`` (and
anything else from :mod:`medtune.deploy.onnx_predictor`) can be used without importing torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import lazy_loader

if TYPE_CHECKING:
    from medtune.deploy.exporter import ExportResult, export_model  # noqa: F401
    from medtune.deploy.onnx_predictor import OnnxPredictor, Prediction  # noqa: F401

__getattr__, __dir__, __all__ = lazy_loader.attach(
    __name__,
    submod_attrs={
        "exporter": ["ExportResult", "export_model"],
        "onnx_predictor": ["OnnxPredictor", "Prediction"],
    },
)
