"""Export a trained run (``RUN/model.safetensors``) to ONNX or TorchScript with its sidecar."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from medtune.deploy.exporter import ExportResult, export_model
from medtune.errors import MedtuneError
from medtune.runs import RunFolder, prepare_run_data

PARITY_IMAGES = 16


def export(run: str | Path, fmt: str = "onnx", out: str | Path | None = None) -> ExportResult:
    """Export a run's model for deployment, with its JSON sidecar, after a parity check.

    Parameters
    ----------
    run : str or pathlib.Path
        A run folder written by :func:`medtune.train`.
    fmt : {"onnx", "torchscript"}, default "onnx"
        ONNX (through ``torch.onnx``; run it with :class:`medtune.deploy.OnnxPredictor` or any
        ONNX Runtime) or TorchScript.
    out : str or pathlib.Path, optional
        Output folder (default ``RUN/export``); written atomically.

    Returns
    -------
    ExportResult
        The model file, its card ``model.json`` (the run's
        :class:`~medtune.evaluation.card.ModelCard` with an ``export`` block) and the parity
        figures. An ONNX export of a run
        with a site-shift model (``RUN/site_shift.npz``) or a batch shift test
        (``RUN/batch_shift.npz``) also outputs the head's features and carries those files,
        so ``predict --model`` and ``serve`` score site shift and test batches as with the
        run.

    Raises
    ------
    MedtuneError
        For an unknown format, a folder without a trained model, or an export whose
        probabilities differ from PyTorch's by 1e-4 or more on real images (the run's validation
        images when its data is still there, else scikit-image's fundus and natural
        photographs); nothing is left behind then.
    """
    run = Path(run)
    if fmt not in ("onnx", "torchscript"):
        raise MedtuneError(f"format {fmt!r} is unknown; use onnx or torchscript")
    folder = RunFolder(run)
    model, card = folder.load_model()
    spec = card.input_spec
    return export_model(
        model,
        Path(out) if out else folder.export_dir,
        card,
        fmt=fmt,
        parity_inputs=parity_images(run, spec.image_size, spec.fundus),
        site_shift=folder.read_site_shift() if fmt == "onnx" else None,
        batch_shift=folder.read_batch_shift() if fmt == "onnx" else None,
    )


def parity_images(run: Path, image_size: int, fundus: dict) -> np.ndarray:
    """Real images for the parity check, preprocessed exactly as for training."""
    from medtune.data.preprocess import prepare_image

    try:
        config = dataclasses.replace(RunFolder(run).read_config(), progress=False)
        val = prepare_run_data(config, run).val
        return np.array(val.cache.images[val.indices[:PARITY_IMAGES]])
    except MedtuneError:  # the training data moved: fall back to photographs that ship
        from skimage import data

        photos = [data.retina(), data.chelsea(), data.coffee(), data.astronaut()]
        return np.stack(
            [prepare_image(np.ascontiguousarray(p), image_size, fundus) for p in photos]
        )
