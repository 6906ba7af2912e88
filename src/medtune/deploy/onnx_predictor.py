"""Run an exported ``model.onnx`` with ONNX Runtime, without importing torch.

The model card ``model.json`` next to the model (:class:`medtune.evaluation.card.ModelCard`, read
by :func:`medtune.evaluation.card.read_card`, the one reader) carries everything needed to go
from images to grades: the input spec (image size, ``mean``/``std`` on the 0-1 scale, fundus
options), the label space, ``temperature``, ``decoding`` and the ``operating_points`` chosen on
validation, so ``medtune predict --model`` sets the refer flag. The network input is ``image``
(N x 3 x S x S float32, RGB, normalised) and the output is ``logits`` (N x K). An export made
with the run's site-shift model has a second output ``features`` (N x D, the pooled features the
head sees), ``site_shift.npz`` beside it and ``card.site_shift`` naming it; the site-shift score
is then computed like ``predict --run`` (:func:`medtune.evaluation.scoring.score`).

:class:`OnnxPredictor` is the ONNX implementation of :class:`medtune.evaluation.scoring.Scorer`
(the PyTorch one is :class:`medtune.evaluation.inference.TorchScorer`).

Probabilities are ``softmax(logits / temperature)``. With ``tta="rot90"`` the LOGITS of the four
90-degree rotations are averaged first, then temperature and softmax are applied once.

Decoding (``card.decoding``):

* ``{"method": "argmax"}``: the most probable class.
* ``{"method": "expected_grade", "thresholds": [t1, ..., t_{K-1}]}``: the expected grade
  ``E = sum_k k * p_k`` is cut by the non-decreasing thresholds; the label is the number of
  thresholds ``t`` with ``E >= t`` (so ``[0.5, 1.5, 2.5, 3.5]`` rounds ``E`` half-up).

This module imports only numpy, scipy, PIL and onnxruntime (plus ``medtune.data.preprocess``
lazily when files or PIL images are given, and the numpy-only ``medtune.evaluation.shift`` for
the site-shift score).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from PIL import Image

from medtune.config import TTA_MODES
from medtune.data.normalise import normalisation_table, normalise_with_table
from medtune.errors import MedtuneError
from medtune.evaluation.card import CARD_FILE, ExportInfo, ModelCard, read_card  # no torch

SIDECAR_NAME = CARD_FILE
INPUT_NAME = ExportInfo.input_name
OUTPUT_NAME = ExportInfo.output_name
FEATURES_NAME = "features"
SITE_SHIFT_NAME = "site_shift.npz"
INPUT_LAYOUT = ExportInfo.input_layout

ImageLike = str | os.PathLike[str] | Image.Image | np.ndarray
Images = np.ndarray | Sequence[ImageLike]


#: Images per ``session.run`` call by default. ONNX Runtime's memory arena keeps the activations
#: of the largest batch it has run: EfficientNet-Lite0 at 224 px holds about 320 MB after batches
#: of 32 and 80 MB after batches of 8, at the same speed (measured, ``docs/performance.md``), and
#: the same logits (ONNX Runtime's convolutions treat each image alone).
RUN_BATCH = 8

#: ``OnnxPredictor(site_shift=...)`` default: the site-shift model the export's card names.
FROM_CARD: Any = object()


class Prediction(NamedTuple):
    """``probs`` (N x K float64) and decoded ``labels`` (N int64 class indices)."""

    probs: np.ndarray
    labels: np.ndarray


# ---------------------------------------------------------------------------------------------
# predictor
# ---------------------------------------------------------------------------------------------


class OnnxPredictor:
    """ONNX Runtime inference for a medtune export (``model.onnx`` + ``model.json``).

    ``model_path`` is the ``.onnx`` file or the export folder, or the serialised graph (bytes,
    with ``card``; :mod:`medtune.deploy.engine`). ``card`` overrides reading ``model.json`` (the
    exporter uses this for its parity check before anything is written). ``site_shift``: the
    :class:`~medtune.evaluation.shift.SiteShiftModel` to score with (``None``: none); by default
    the one the card names beside the model file. ``num_threads``: ONNX Runtime's intra-op
    threads (default one per core); ``batch_size``: images per ``run`` call (default
    :data:`RUN_BATCH`).
    """

    def __init__(
        self,
        model_path: str | os.PathLike[str] | bytes,
        *,
        card: ModelCard | None = None,
        providers: Sequence[str] | None = None,
        num_threads: int | None = None,
        batch_size: int = RUN_BATCH,
        site_shift: Any = FROM_CARD,
        name: str = "model.onnx (in memory)",
    ) -> None:
        #: the serialised graph when given as bytes (``medtune.deploy.engine`` saves it)
        self.graph: bytes | None = None
        if isinstance(model_path, bytes):  # a serialised graph (medtune.deploy.engine)
            if card is None:
                raise MedtuneError(f"{name}: an in-memory ONNX model needs its card")
            path, source, self.graph = Path(name), model_path, model_path
        else:
            path = Path(model_path)
            if path.is_dir():
                path = path / "model.onnx"
            if not path.is_file():
                raise MedtuneError(f"{path}: ONNX model not found; run the export first")
            source = path
        self.model_path = path
        self.card = read_card(path.parent / SIDECAR_NAME) if card is None else card
        self.batch_size = max(1, int(batch_size))
        self._session = _make_session(source, path, providers, num_threads)
        self._input_name = self._session.get_inputs()[0].name
        self._output_name = self._session.get_outputs()[0].name
        self._has_features = FEATURES_NAME in {o.name for o in self._session.get_outputs()}
        self._from_card = site_shift is FROM_CARD
        self._site_shift: Any = None if self._from_card else site_shift
        spec = self.card.input_spec
        self._lut = normalisation_table(spec.mean, spec.std)

    @property
    def metadata(self) -> dict[str, str]:
        """The graph's custom metadata (``medtune.deploy.engine`` stores the weights' digest)."""
        return dict(self._session.get_modelmeta().custom_metadata_map)

    # --- inference -----------------------------------------------------------------------------
    def prepare(self, images: Images) -> np.ndarray:
        """uint8 N x S x S x 3 from an array (already at input size), paths or PIL images (or a
        sliceable view of prepared images, :attr:`medtune.data.Part.images`)."""
        size = self.card.input_spec.image_size
        if not isinstance(images, (np.ndarray, list, tuple)) and hasattr(images, "__getitem__"):
            images = np.asarray(images[0 : len(images)])
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
        if isinstance(im, np.ndarray):
            return im
        from medtune.data.preprocess import prepare_image  # numpy/PIL/scipy only, no torch

        spec = self.card.input_spec
        return prepare_image(im, spec.image_size, spec.fundus)

    def _batches(self, images: Images) -> Iterator[np.ndarray]:
        """Normalised float32 batches (B, 3, S, S), ``batch_size`` images at a time, never the
        whole set at once (2,000 training images of 224 px are 1.2 GB in float32)."""
        if isinstance(images, (list, tuple)):
            images = self.prepare(images)  # paths or PIL images: prepared once
        if isinstance(images, np.ndarray) and images.ndim == 3:
            images = images[None]
        if not len(images):
            raise MedtuneError("no images given to predict")
        for start in range(0, len(images), self.batch_size):
            chunk = self.prepare(images[start : start + self.batch_size])
            yield normalise_with_table(chunk, self._lut)

    def logits(self, images: Images, tta: str | None = None) -> np.ndarray:
        """Raw logits (N x K float32); with ``tta="rot90"`` the mean over 4 rotations."""
        tta = tta or "none"
        if tta not in TTA_MODES:
            raise MedtuneError(f"unknown tta {tta!r}; use one of {', '.join(TTA_MODES)}")
        outs = []
        for x in self._batches(images):
            if tta == "none":
                outs.append(self._run(x))
                continue
            views = [self._run(np.ascontiguousarray(np.rot90(x, k, axes=(2, 3)))) for k in range(4)]
            outs.append(np.mean(views, axis=0, dtype=np.float64).astype(np.float32))
        return self._checked(np.concatenate(outs))

    def predict_proba(self, images: Images, *, tta: str | None = None) -> np.ndarray:
        """``softmax(logits / temperature)`` as N x K float64."""
        return self.card.probabilities(self.logits(images, tta=tta))

    def predict(self, images: Images, *, tta: str | None = None) -> Prediction:
        """Probabilities and labels decoded per the card (argmax or expected grade)."""
        probs = self.predict_proba(images, tta=tta)
        return Prediction(probs=probs, labels=self.card.decode(probs))

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
        names = [self._output_name, FEATURES_NAME]
        outs = [self._session.run(names, {self._input_name: x}) for x in self._batches(images)]
        return self._checked(np.concatenate([o[0] for o in outs])), np.concatenate(
            [o[1] for o in outs]
        )

    @property
    def site_shift(self) -> Any:
        """The export's :class:`~medtune.evaluation.shift.SiteShiftModel`, or ``None``."""
        ref = self.card.site_shift
        if self._from_card and self._site_shift is None and ref is not None and self._has_features:
            from medtune.evaluation.shift import SiteShiftModel  # numpy only

            self._site_shift = SiteShiftModel.load(self.model_path.parent / ref.file)
        return self._site_shift

    def _run(self, x: np.ndarray) -> np.ndarray:
        """Logits of one normalised batch."""
        return self._session.run([self._output_name], {self._input_name: x})[0]

    def _checked(self, logits: np.ndarray) -> np.ndarray:
        k = self.card.num_classes
        if logits.ndim != 2 or logits.shape[1] != k:
            raise MedtuneError(
                f"{self.model_path}: model gives outputs shaped {tuple(logits.shape)} but its "
                f"card lists {k} classes; re-export the model"
            )
        return logits


def _make_session(
    source: Path | bytes, path: Path, providers: Sequence[str] | None, num_threads: int | None
) -> Any:
    """An ONNX Runtime session with every graph optimisation (BatchNorm folded into the
    convolutions, fused activations) and NO spinning: medtune decodes the next batch in a thread
    while the model runs, and on a 2-core CPU spinning intra-op threads starve it (measured in
    ``benchmarks/engines.py``)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
    if num_threads:
        opts.intra_op_num_threads = int(num_threads)
    opts.inter_op_num_threads = 1
    provs = list(providers) if providers else ["CPUExecutionProvider"]
    model = source if isinstance(source, bytes) else str(source)
    try:
        return ort.InferenceSession(model, sess_options=opts, providers=provs)
    except Exception as exc:  # onnxruntime raises its own exception types
        raise MedtuneError(f"{path}: ONNX Runtime cannot load the model ({exc})") from exc
