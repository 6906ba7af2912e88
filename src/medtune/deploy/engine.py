"""The one inference engine for everything after training: ONNX Runtime on the model's fp32 graph.

Training runs in PyTorch; every answer after it (the finalisation of a run: validation and test
logits, temperature, thresholds, site-shift fit; ``evaluate``, ``predict --run``,
``predict --model``, ``adapt`` and ``serve``) comes from the same fp32 ONNX graph run by ONNX
Runtime, so "one model, one answer" holds by construction (this module imports torch only when
it makes a graph or falls back to PyTorch): ``predict --run`` and
``predict --model`` run the same graph with the same session options.

Why ONNX Runtime (``benchmarks/engines.py``, ``docs/performance.md``): on a 2-core AMD EPYC it
ran EfficientNet-Lite0 at 4x PyTorch eager fp32's images/s (BatchNorm folded into the
convolutions, static "same" padding, fused activations) with logits equal to PyTorch's within
2e-5; PyTorch bf16 and OpenVINO bf16 were faster still but moved logits by 0.4 (and give another
answer on a CPU without bf16), and post-training INT8 moved them by 8.

A run keeps its graph as ``RUN/model.onnx`` (written at the end of training and by ``adapt``,
parity-checked against PyTorch, with the SHA-256 of ``model.safetensors`` in its metadata). A run
whose graph is missing or stale (weights changed since) is exported in memory when it is loaded
(about a second), never written back: loading a run never writes into it. ``engine="torch"``
keeps the PyTorch scorer (Grad-CAM and training need PyTorch anyway).
"""

from __future__ import annotations

import hashlib
import logging
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from medtune.config import ENGINES
from medtune.data.normalise import normalise_images
from medtune.deploy.onnx_predictor import OnnxPredictor
from medtune.errors import MedtuneError
from medtune.evaluation.card import ModelCard
from medtune.evaluation.scoring import Scorer
from medtune.io import atomic_path
from medtune.runs import RunFolder

if TYPE_CHECKING:
    from torch import nn

    from medtune.evaluation.shift import SiteShiftModel

log = logging.getLogger(__name__)

__all__ = ["DIGEST_KEY", "engine_graph", "model_scorer", "run_scorer", "write_run_engine"]

#: The ONNX metadata key holding the SHA-256 of the ``model.safetensors`` the graph was made from.
DIGEST_KEY = "medtune.weights_sha256"
#: Largest |logit| difference allowed between the graph and PyTorch on the parity images.
LOGIT_TOLERANCE = 1e-3
PARITY_IMAGES = 4


def weights_digest(path: Path) -> str:
    """SHA-256 (hex) of a weights file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def engine_graph(
    model: nn.Module, card: ModelCard, parity_images: np.ndarray | None = None
) -> bytes:
    """The model as a serialised fp32 ONNX graph with outputs ``logits`` and ``features``.

    Parameters
    ----------
    model : torch.nn.Module
        A trained image-level model with a ``head`` (put in eval mode on a CPU copy).
    card : ModelCard
        Its description (input size and normalisation).
    parity_images : ndarray, shape (N, S, S, 3), uint8, optional
        Real images to compare the graph with PyTorch on (the first :data:`PARITY_IMAGES`);
        default: seeded uniform noise, which still catches a layer exported wrongly.

    Returns
    -------
    bytes
        The ONNX model (opset ``medtune.deploy.exporter.MIN_OPSET``, dynamic batch).

    Raises
    ------
    MedtuneError
        When the model cannot be exported or the graph's logits differ from PyTorch's by more
        than :data:`LOGIT_TOLERANCE`.
    """
    graph = _checked_scorer(model, card, parity_images).graph
    assert graph is not None  # made from bytes
    return graph


def _checked_scorer(
    model: nn.Module, card: ModelCard, parity_images: np.ndarray | None, **options: Any
) -> OnnxPredictor:
    """The model exported in memory and its session, checked against PyTorch on the parity
    images (:func:`engine_graph`); ``options`` go to :class:`OnnxPredictor` (the session that
    passed the check is the one returned, not built again)."""
    from medtune.deploy.exporter import (  # torch: only when a graph is made
        MIN_OPSET,
        LogitsAndFeatures,
        _check_onnx,
        _cpu_eval_copy,
        _example_batch,
        _export_onnx,
        _parity,
        _torch_logits,
        static_same_padding,
    )

    images = _parity_images(card.input_spec.image_size, parity_images)
    with _cpu_eval_copy(model) as net, tempfile.TemporaryDirectory() as tmp:
        graph = LogitsAndFeatures(static_same_padding(net, card.input_spec.image_size)).eval()
        path = Path(tmp) / "model.onnx"
        # the torch exporters write files only; a private temporary folder, removed at once
        spec = card.input_spec
        x = normalise_images(images, spec.mean, spec.std)
        _export_onnx(graph, path, _example_batch(x), MIN_OPSET, "auto")
        _check_onnx(path, MIN_OPSET, features=True)
        data = path.read_bytes()
        ref = _torch_logits(net, x)
    scorer = OnnxPredictor(data, card=card, **options)
    _, gap = _parity(ref, scorer.logits(images), card.temperature)
    if not gap <= LOGIT_TOLERANCE:
        raise MedtuneError(
            f"the ONNX graph's logits differ from PyTorch's by {gap:.3g} (tolerance "
            f"{LOGIT_TOLERANCE:g}); use engine='torch' for this model"
        )
    return scorer


def write_run_engine(
    folder: RunFolder,
    model: nn.Module | Scorer,
    parity_images: np.ndarray | None = None,
) -> Path | None:
    """Write ``RUN/model.onnx`` for the run's saved weights (call after ``write_model``).

    Parameters
    ----------
    folder : RunFolder
        A run whose ``model.safetensors`` and ``model.json`` hold ``model``.
    model : torch.nn.Module or Scorer
        The same model, or the scorer :func:`model_scorer` made of it (its graph is written
        as it is, not exported again).
    parity_images : ndarray (N, S, S, 3) uint8, optional
        Real images for the parity check (:func:`engine_graph`).

    Returns
    -------
    pathlib.Path or None
        The graph written; ``None`` (with a logged warning) when the model cannot be exported:
        the run is then scored by PyTorch, slower but the same fp32 answer.
    """
    card = folder.read_card()
    try:
        data = getattr(model, "graph", None) or engine_graph(model, card, parity_images)
    except (MedtuneError, ValueError) as err:
        log.warning("no ONNX engine for this run (PyTorch will score it): %s", err)
        return None
    data = _with_digest(data, weights_digest(folder.path(RunFolder.MODEL_WEIGHTS)))
    target = folder.path(RunFolder.ENGINE)
    with atomic_path(target) as tmp:
        tmp.write_bytes(data)
    return target


def run_scorer(
    folder: RunFolder,
    *,
    engine: str = "onnx",
    batch_size: int = 32,
    progress: bool = False,
    num_threads: int | None = None,
) -> Scorer:
    """The run's model as a :class:`~medtune.evaluation.scoring.Scorer` on ``engine``.

    Parameters
    ----------
    folder : RunFolder
        A trained run.
    engine : {"onnx", "torch"}, default "onnx"
        ``"onnx"``: ``RUN/model.onnx`` when its digest matches ``model.safetensors`` (no PyTorch
        model is built), else the model exported in memory; ``"torch"``: PyTorch eager fp32.
    batch_size : int, default 32
        Images per forward pass of the PyTorch engine. ONNX Runtime runs
        :data:`~medtune.deploy.onnx_predictor.RUN_BATCH` (8) at a time whatever this says: its
        memory arena keeps the activations of the largest batch it ran.
    progress : bool, default False
        A progress bar per pass (PyTorch scorer only).
    num_threads : int, optional
        ONNX Runtime's intra-op threads (default: one per core).

    Returns
    -------
    Scorer
        With the run's card and site-shift model.

    Raises
    ------
    MedtuneError
        For an unknown engine or a folder without a trained model.
    """
    _check_engine(engine)
    card, shift = folder.read_card(), folder.read_site_shift()
    if engine == "onnx":
        path = folder.path(RunFolder.ENGINE)
        if path.is_file():
            scorer = OnnxPredictor(path, card=card, site_shift=shift, num_threads=num_threads)
            if scorer.metadata.get(DIGEST_KEY) == weights_digest(
                folder.path(RunFolder.MODEL_WEIGHTS)
            ):
                return scorer
            log.info("%s is older than the run's weights: exporting them in memory", path)
    model, card = folder.load_model()
    return model_scorer(
        model,
        card,
        shift,
        engine=engine,
        batch_size=batch_size,
        progress=progress,
        num_threads=num_threads,
    )


def model_scorer(
    model: nn.Module,
    card: ModelCard,
    site_shift: SiteShiftModel | None = None,
    *,
    engine: str = "onnx",
    batch_size: int = 32,
    progress: bool = False,
    num_threads: int | None = None,
    parity_images: np.ndarray | None = None,
) -> Scorer:
    """A model in memory as a :class:`~medtune.evaluation.scoring.Scorer` on ``engine``.

    ``engine="onnx"`` exports it in memory (:func:`engine_graph`, about a second for
    EfficientNet-Lite0); a model that cannot be exported falls back to PyTorch with a logged
    warning (the same fp32 answer, slower). Parameters as :func:`run_scorer`, plus
    ``parity_images`` (:func:`engine_graph`).
    """
    _check_engine(engine)
    if engine == "onnx":
        try:
            return _checked_scorer(
                model,
                card,
                parity_images,
                site_shift=site_shift,
                num_threads=num_threads,
            )
        except (MedtuneError, ValueError) as err:  # ValueError: a model without a head
            log.warning("the ONNX engine cannot run this model; PyTorch scores it: %s", err)
    from medtune.evaluation.inference import TorchScorer

    return TorchScorer(model, card, site_shift, batch_size=batch_size, progress=progress)


def _check_engine(engine: str) -> None:
    if engine not in ENGINES:
        raise MedtuneError(f"engine {engine!r} is unknown; use one of {', '.join(ENGINES)}")


def _parity_images(image_size: int, images: np.ndarray | None) -> np.ndarray:
    if images is not None and len(images):
        return np.asarray(images[:PARITY_IMAGES], dtype=np.uint8)
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (PARITY_IMAGES, image_size, image_size, 3), dtype=np.uint8)


def _with_digest(data: bytes, digest: str) -> bytes:
    """The graph with ``DIGEST_KEY`` set in its metadata (``onnx`` package)."""
    import onnx

    proto = onnx.load_from_string(data)
    onnx.helper.set_model_props(proto, {DIGEST_KEY: digest})
    return proto.SerializeToString()


def describe(scorer: Any) -> str:
    """``"onnx"`` or ``"torch"``: the engine behind a scorer (for run records and benchmarks)."""
    return "onnx" if isinstance(scorer, OnnxPredictor) else "torch"
