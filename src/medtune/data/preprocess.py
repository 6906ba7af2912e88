"""One image from its source to the network's uint8 input: decode, then fundus preprocessing.

:func:`prepare_image` is the single per-image path shared by the prepared cache, ``predict``, the
web page and the torch-free ONNX predictor, so deployed inputs match the training cache. This
module imports only numpy, PIL and scipy (through :mod:`medtune.data.fundus`).
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
from PIL import Image

from medtune.data import fundus
from medtune.data.images import load_rgb, to_rgb8

#: Decode at most ``DECODE_SIDE_FACTOR * size`` pixels on the long side (JPEG draft), then
#: preprocess: enough resolution for the field-of-view crop, far less work for large photos.
DECODE_SIDE_FACTOR = 2


def decode_source(src: str | np.ndarray, max_side: int | None = None) -> Image.Image:
    """Decode a file path with :func:`load_rgb` or convert an in-memory array to RGB."""
    if isinstance(src, np.ndarray):
        return to_rgb8(_array_to_pil(src), max_side=max_side)
    return load_rgb(src, max_side=max_side)


def _array_to_pil(arr: np.ndarray) -> Image.Image:
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if arr.dtype == np.uint16:
        arr = np.rint(arr.astype(np.float32) / 257.0).astype(np.uint8)
    elif arr.dtype.kind == "f":
        scale = 255.0 if arr.size and float(np.nanmax(arr)) <= 1.0 else 1.0
        arr = np.clip(np.rint(np.nan_to_num(arr) * scale), 0, 255).astype(np.uint8)
    elif arr.dtype != np.uint8:
        arr = np.clip(arr, 0, 255).astype(np.uint8)
    return Image.fromarray(np.ascontiguousarray(arr))


def prepare_image(
    src: str | os.PathLike[str] | np.ndarray | Image.Image,
    size: int,
    fundus_opts: Any = None,
) -> np.ndarray:
    """Decode and preprocess ONE image exactly as :func:`prepare` does (uint8 size x size x 3).

    ``predict`` and the ONNX predictor use it, so deployed inputs match the training cache.
    """
    opts = (
        fundus_opts
        if isinstance(fundus_opts, fundus.FundusOptions)
        else (fundus.FundusOptions.from_dict(fundus_opts))
    )
    side = DECODE_SIDE_FACTOR * size
    img = to_rgb8(src, side) if isinstance(src, Image.Image) else decode_source(src, side)
    return fundus.preprocess(img, size, opts)
