"""One image from its source to the network's uint8 input: decode, then fundus preprocessing.

:func:`prepare_image` is the single per-image path shared by the prepared cache, ``predict``, the
web page and the torch-free ONNX predictor, so deployed inputs match the training cache. This
module imports only numpy, PIL, OpenCV and scipy (through :mod:`medtune.data.fundus`).
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
from PIL import Image

from medtune.data import fundus
from medtune.data.images import load_rgb, reduce_to_min_side, to_rgb8


def decode_source(
    src: str | os.PathLike[str] | np.ndarray,
    max_side: int | None = None,
    *,
    min_side: int | None = None,
) -> Image.Image:
    """Decode a file path with :func:`load_rgb` or convert an in-memory array to RGB.

    Parameters
    ----------
    src : path-like or numpy.ndarray
        An image file (any format :func:`load_rgb` reads) or pixels (uint8/uint16/float, grey
        or RGB).
    max_side : int, optional
        The result's longer side is at most this (see :func:`load_rgb`).
    min_side : int, optional
        Decode only as large as a ``min_side`` px network input needs: the shorter side stays
        >= ``min_side`` (JPEG DCT scaling, or a whole-factor box reduction; see
        :func:`load_rgb`). :func:`prepare_image` uses it with the model's image size.

    Returns
    -------
    PIL.Image.Image
        Mode ``RGB``, EXIF orientation applied.

    Raises
    ------
    BadImageError
        For unreadable files.
    """
    if isinstance(src, np.ndarray):
        out = to_rgb8(_array_to_pil(src), max_side=max_side)
        return out if max_side is not None else reduce_to_min_side(out, min_side)
    return load_rgb(src, max_side=max_side, min_side=min_side)


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
    image_size: int,
    fundus_opts: Any = None,
) -> np.ndarray:
    """Decode and preprocess ONE image exactly as :func:`prepare` does (uint8, S x S x 3).

    The image is decoded only as large as ``image_size`` (S) needs (shorter side >= S: JPEG DCT
    scaling, or a whole-factor box reduction; :func:`decode_source`), then the field of view is
    found on it, cropped and resized once (:func:`medtune.data.fundus.preprocess`). ``predict``,
    the web page and the ONNX predictor use it, so deployed inputs match the training cache; the
    image-quality gate (:func:`medtune.evaluation.quality.assess_quality`) takes its output.

    Parameters
    ----------
    src : path-like, numpy.ndarray or PIL.Image.Image
        A file, pixels, or an already decoded image (any size and mode).
    image_size : int
        The network's input size in pixels.
    fundus_opts : FundusOptions or dict, optional
        Fundus preprocessing (default: crop to the field of view only).

    Returns
    -------
    numpy.ndarray
        uint8 ``image_size x image_size x 3``.

    Raises
    ------
    BadImageError
        For unreadable files.
    """
    opts = (
        fundus_opts
        if isinstance(fundus_opts, fundus.FundusOptions)
        else (fundus.FundusOptions.from_dict(fundus_opts))
    )
    if isinstance(src, Image.Image):
        img = reduce_to_min_side(to_rgb8(src), image_size)
    else:
        img = decode_source(src, min_side=image_size)
    return fundus.preprocess(img, image_size, opts)
