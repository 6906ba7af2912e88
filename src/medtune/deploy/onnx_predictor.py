"""Run an exported ``model.onnx`` with ONNX Runtime, without importing torch.

The JSON sidecar ``model.json`` next to the model carries everything needed to go from images to
grades: ``image_size``, ``mean``/``std`` (RGB, on the 0-1 scale), ``class_names``, ``temperature``
and ``decoding``; ``operating_points`` (the referral thresholds chosen on validation,
``ModelMeta.operating_points``) lets ``medtune predict --model`` set the refer flag. The network
input is ``image`` (N x 3 x S x S float32, RGB, normalised) and the output is ``logits`` (N x K).
An export made with the run's site-shift model has a second output ``features`` (N x D, the
pooled features the head sees), ``site_shift.npz`` beside it and ``sidecar["site_shift"]``
naming it; :meth:`OnnxPredictor.site_shift_scores` then scores images like ``predict --run``.

Probabilities are ``softmax(logits / temperature)``. With ``tta="rot90"`` the LOGITS of the four
90-degree rotations are averaged first, then temperature and softmax are applied once.

Decoding (``sidecar["decoding"]``):

* ``{"method": "argmax"}``: the most probable class.
* ``{"method": "expected_grade", "thresholds": [t1, ..., t_{K-1}]}``: the expected grade
  ``E = sum_k k * p_k`` is cut by the non-decreasing thresholds; the label is the number of
  thresholds ``t`` with ``E >= t`` (so ``[0.5, 1.5, 2.5, 3.5]`` rounds ``E`` half-up).

This module imports only numpy, PIL and onnxruntime (plus ``medtune.data.fundus`` lazily when the
sidecar asks for fundus preprocessing of files / PIL images, and the numpy-only
``medtune.evaluation.shift`` for the site-shift score).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from PIL import Image

from medtune.config import TTA_MODES
from medtune.data.normalise import normalise_images
from medtune.errors import MedtuneError
from medtune.evaluation.calibration import apply_temperature  # numpy/scipy only, no torch
from medtune.evaluation.decoding import decode

SIDECAR_NAME = "model.json"
INPUT_NAME = "image"
OUTPUT_NAME = "logits"
FEATURES_NAME = "features"
SITE_SHIFT_NAME = "site_shift.npz"
INPUT_LAYOUT = "NCHW float32 RGB normalised"
DECODING_METHODS = ("argmax", "expected_grade")

ImageLike = str | os.PathLike[str] | Image.Image | np.ndarray
Images = np.ndarray | Sequence[ImageLike]


class Prediction(NamedTuple):
    """``probs`` (N x K float64) and decoded ``labels`` (N int64 class indices)."""

    probs: np.ndarray
    labels: np.ndarray


# ---------------------------------------------------------------------------------------------
# numeric helpers shared with the exporter (pure numpy)
# ---------------------------------------------------------------------------------------------


def validate_sidecar(sidecar: dict[str, Any], source: object = "sidecar") -> dict[str, Any]:
    """Check the fields the predictor relies on; return a copy with defaults filled in."""
    out = dict(sidecar)
    names = out.get("class_names")
    if not isinstance(names, list) or len(names) < 2:
        raise MedtuneError(f"{source}: 'class_names' must list at least two class names")
    out["class_names"] = [str(n) for n in names]
    for key in ("mean", "std"):
        vals = out.get(key)
        if vals is None or len(vals) != 3:
            raise MedtuneError(f"{source}: '{key}' must hold 3 numbers (RGB)")
        out[key] = [float(v) for v in vals]
    if min(out["std"]) <= 0:
        raise MedtuneError(f"{source}: 'std' values must be positive")
    size = out.get("image_size")
    if not isinstance(size, int) or size <= 0:
        raise MedtuneError(f"{source}: 'image_size' must be a positive integer")
    temp = out.get("temperature")
    temp = 1.0 if temp is None else float(temp)
    if not temp > 0:
        raise MedtuneError(f"{source}: 'temperature' must be positive, got {temp}")
    out["temperature"] = temp
    out["decoding"] = _validate_decoding(out.get("decoding"), len(names), source)
    return out


def _validate_decoding(spec: Any, n_classes: int, source: object) -> dict[str, Any]:
    spec = dict(spec) if spec else {"method": "argmax"}
    method = spec.get("method")
    if method not in DECODING_METHODS:
        raise MedtuneError(
            f"{source}: decoding method {method!r} is unknown; use one of {DECODING_METHODS}"
        )
    if method == "expected_grade":
        th = spec.get("thresholds")
        if th is None or len(th) != n_classes - 1:
            raise MedtuneError(
                f"{source}: expected_grade decoding needs {n_classes - 1} thresholds "
                f"(one per boundary between {n_classes} grades)"
            )
        th = [float(t) for t in th]
        if any(b < a for a, b in zip(th, th[1:], strict=False)):
            raise MedtuneError(f"{source}: expected_grade thresholds must be non-decreasing")
        spec["thresholds"] = th
    return spec


# ---------------------------------------------------------------------------------------------
# image loading (PIL + numpy only)
# ---------------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------
# predictor
# ---------------------------------------------------------------------------------------------


class OnnxPredictor:
    """ONNX Runtime inference for a medtune export (``model.onnx`` + ``model.json``).

    ``model_path`` is the ``.onnx`` file or the export folder. ``sidecar`` overrides reading
    ``model.json`` (the exporter uses this for its parity check before anything is written).
    """

    def __init__(
        self,
        model_path: str | os.PathLike[str],
        *,
        sidecar: dict[str, Any] | None = None,
        providers: Sequence[str] | None = None,
        num_threads: int | None = None,
        batch_size: int = 32,
    ) -> None:
        path = Path(model_path)
        if path.is_dir():
            path = path / "model.onnx"
        if not path.is_file():
            raise MedtuneError(f"{path}: ONNX model not found; run the export first")
        self.model_path = path
        if sidecar is None:
            sidecar = _read_sidecar(path.parent / SIDECAR_NAME)
            source: object = path.parent / SIDECAR_NAME
        else:
            source = "sidecar"
        self.sidecar = validate_sidecar(sidecar, source)
        self.batch_size = max(1, int(batch_size))
        self._session = _make_session(path, providers, num_threads)
        self._input_name = self._session.get_inputs()[0].name
        self._output_name = self._session.get_outputs()[0].name
        self._has_features = FEATURES_NAME in {o.name for o in self._session.get_outputs()}
        self._site_shift: Any = None

    # --- sidecar views -------------------------------------------------------------------------
    @property
    def class_names(self) -> list[str]:
        return list(self.sidecar["class_names"])

    @property
    def image_size(self) -> int:
        return int(self.sidecar["image_size"])

    @property
    def temperature(self) -> float:
        return float(self.sidecar["temperature"])

    @property
    def decoding(self) -> dict[str, Any]:
        return dict(self.sidecar["decoding"])

    # --- inference -----------------------------------------------------------------------------
    def prepare(self, images: Images) -> np.ndarray:
        """uint8 N x S x S x 3 from an array (already at input size), paths or PIL images."""
        size = self.image_size
        if isinstance(images, np.ndarray):
            arr = images[None] if images.ndim == 3 else images
        else:
            arr = np.stack([self._prepare_one(im) for im in images]) if len(images) else None
            if arr is None:
                raise MedtuneError("no images given to predict")
        if arr.ndim != 4 or arr.shape[1:] != (size, size, 3):
            raise MedtuneError(
                f"images must be N x {size} x {size} x 3 uint8 (the exported input size); "
                f"got {tuple(arr.shape)}: pass file paths or PIL images to have them resized"
            )
        return arr

    def _prepare_one(self, im: ImageLike) -> np.ndarray:
        size = self.image_size
        if isinstance(im, np.ndarray):
            return im
        from medtune.data.preprocess import prepare_image  # numpy/PIL/scipy only, no torch

        return prepare_image(im, size, self.sidecar.get("fundus") or {"crop": False})

    def logits(self, images: Images, *, tta: str | None = None) -> np.ndarray:
        """Raw logits (N x K float32); with ``tta="rot90"`` the mean over 4 rotations."""
        tta = tta or "none"
        if tta not in TTA_MODES:
            raise MedtuneError(f"unknown tta {tta!r}; use one of {', '.join(TTA_MODES)}")
        x = normalise_images(self.prepare(images), self.sidecar["mean"], self.sidecar["std"])
        if tta == "none":
            return self._run(x)
        rots = [self._run(np.ascontiguousarray(np.rot90(x, k, axes=(2, 3)))) for k in range(4)]
        return np.mean(rots, axis=0, dtype=np.float64).astype(np.float32)

    def predict_proba(self, images: Images, *, tta: str | None = None) -> np.ndarray:
        """``softmax(logits / temperature)`` as N x K float64."""
        return apply_temperature(self.logits(images, tta=tta), self.temperature)

    def predict(self, images: Images, *, tta: str | None = None) -> Prediction:
        """Probabilities and labels decoded per the sidecar (argmax or expected grade)."""
        probs = self.predict_proba(images, tta=tta)
        return Prediction(probs=probs, labels=decode(probs, self.decoding))

    def logits_and_features(self, images: Images) -> tuple[np.ndarray, np.ndarray]:
        """Logits (N x K) and the head's input features (N x D) of the plain images (no TTA).

        Raises
        ------
        MedtuneError
            When the model was exported without a ``features`` output.
        """
        if not self._has_features:
            raise MedtuneError(
                f"{self.model_path}: this export has no 'features' output; re-export the run "
                "with medtune export to get site-shift scores"
            )
        x = normalise_images(self.prepare(images), self.sidecar["mean"], self.sidecar["std"])
        step, names = self.batch_size, [self._output_name, FEATURES_NAME]
        outs = [
            self._session.run(names, {self._input_name: x[i : i + step]})
            for i in range(0, len(x), step)
        ]
        return self._checked(np.concatenate([o[0] for o in outs])), np.concatenate(
            [o[1] for o in outs]
        )

    @property
    def site_shift(self) -> Any:
        """The export's :class:`~medtune.evaluation.shift.SiteShiftModel`, or ``None``."""
        entry = self.sidecar.get("site_shift")
        if self._site_shift is None and entry and self._has_features:
            from medtune.evaluation.shift import SiteShiftModel  # numpy only

            self._site_shift = SiteShiftModel.load(self.model_path.parent / entry["file"])
        return self._site_shift

    def site_shift_scores(self, images: Images) -> tuple[np.ndarray, np.ndarray | None]:
        """``(logits, site-shift scores)`` of the plain images; scores are ``None`` when the
        export carries no site-shift model."""
        if self.site_shift is None:
            return self.logits(images), None
        logits, features = self.logits_and_features(images)
        return logits, self.site_shift.score(features)

    def _run(self, x: np.ndarray) -> np.ndarray:
        step = self.batch_size
        outs = [
            self._session.run([self._output_name], {self._input_name: x[i : i + step]})[0]
            for i in range(0, len(x), step)
        ]
        return self._checked(np.concatenate(outs, axis=0))

    def _checked(self, logits: np.ndarray) -> np.ndarray:
        if logits.ndim != 2 or logits.shape[1] != len(self.sidecar["class_names"]):
            raise MedtuneError(
                f"{self.model_path}: model gives outputs shaped {tuple(logits.shape)} but the "
                f"sidecar lists {len(self.sidecar['class_names'])} classes; re-export the model"
            )
        return logits


def _read_sidecar(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise MedtuneError(f"{path}: sidecar not found; re-export the model to write it")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise MedtuneError(f"{path}: cannot parse the sidecar JSON ({exc}); re-export") from exc
    if not isinstance(data, dict):
        raise MedtuneError(f"{path}: sidecar must be a JSON object; re-export the model")
    return data


def _make_session(path: Path, providers: Sequence[str] | None, num_threads: int | None) -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if num_threads:
        opts.intra_op_num_threads = int(num_threads)
        opts.inter_op_num_threads = 1
    provs = list(providers) if providers else ["CPUExecutionProvider"]
    try:
        return ort.InferenceSession(str(path), sess_options=opts, providers=provs)
    except Exception as exc:  # onnxruntime raises its own exception types
        raise MedtuneError(f"{path}: ONNX Runtime cannot load the model ({exc})") from exc
