"""Export a trained run (``RUN/model.safetensors``) to ONNX or TorchScript with its sidecar."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from medtune.errors import MedtuneError
from medtune.export.exporter import ExportResult, export_model
from medtune.models.store import load_model

PARITY_IMAGES = 16


def export_run(run: str | Path, fmt: str = "onnx", out: str | Path | None = None) -> ExportResult:
    """Export ``run``'s model into ``out`` (default ``RUN/export``), checking parity on real
    images: the run's validation images when its data is still there, else scikit-image's
    fundus and natural photographs."""
    run = Path(run)
    if fmt not in ("onnx", "torchscript"):
        raise MedtuneError(f"--format {fmt!r} is unknown; use onnx or torchscript")
    model, meta = load_model(run)
    sidecar = {k: v for k, v in dataclasses.asdict(meta).items() if k not in ("mean", "std")}
    sidecar["input_size"] = meta.input_size
    return export_model(
        model,
        Path(out) if out else run / "export",
        fmt=fmt,
        input_size=meta.input_size,
        sidecar=sidecar,
        parity_inputs=parity_images(run, meta.input_size, meta.fundus),
        mean=meta.mean,
        std=meta.std,
    )


def parity_images(run: Path, size: int, fundus: dict) -> np.ndarray:
    """Real images for the parity check, preprocessed exactly as for training."""
    from medtune.data.cache import prepare_image
    from medtune.training.config import TrainConfig
    from medtune.training.run import CONFIG_FILE

    try:
        from medtune.training.parts import prepare_run_data

        config = dataclasses.replace(TrainConfig.load(run / CONFIG_FILE), progress=False)
        val = prepare_run_data(config, size, run).val
        return np.array(val.cache.images[val.indices[:PARITY_IMAGES]])
    except MedtuneError:  # the training data moved: fall back to photographs that ship
        from skimage import data

        photos = [data.retina(), data.chelsea(), data.coffee(), data.astronaut()]
        return np.stack([prepare_image(np.ascontiguousarray(p), size, fundus) for p in photos])
