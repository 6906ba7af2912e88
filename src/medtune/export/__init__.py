"""medtune.export: ONNX / TorchScript export with a JSON sidecar, and a torch-free ONNX predictor.

``export_model`` / ``ExportResult`` are loaded lazily so that ``OnnxPredictor`` (and anything else
from :mod:`medtune.export.onnx_predictor`) can be used without importing torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from medtune.export.onnx_predictor import OnnxPredictor, Prediction

if TYPE_CHECKING:
    from medtune.export.exporter import ExportResult, export_model

__all__ = ["ExportResult", "OnnxPredictor", "Prediction", "export_model"]


def __getattr__(name: str) -> Any:
    if name in ("export_model", "ExportResult"):
        from medtune.export import exporter

        return getattr(exporter, name)
    raise AttributeError(f"module 'medtune.export' has no attribute {name!r}")
