"""Which files are images, and how samples deeper than 8 bits become 8-bit RGB.

The bit-depth rule (declared depth wins; otherwise the smallest of 8/10/12/14/16 bits that holds
the data, with a warning naming the file) is described in :mod:`medtune.data.images`, which
decodes files; :mod:`medtune.data.dicom` uses the same rule for DICOM pixel data.
"""

from __future__ import annotations

import logging

import numpy as np
from PIL import Image

log = logging.getLogger("medtune.data.images")

# Formats Pillow registers but cannot decode here: stubs needing an external handler (BUFR, GRIB,
# HDF5, WMF off Windows), MPEG (header only) and PostScript (needs Ghostscript; not an image).
_UNDECODABLE = frozenset({"BUFR", "GRIB", "HDF5", "WMF", "MPEG", "EPS"})
_PREFERRED = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")  # tie-break order for CSV stems
DICOM_EXTENSIONS = (".dcm", ".dicom")


def _pillow_extensions() -> tuple[str, ...]:
    registered = Image.registered_extensions()  # imports every plugin once
    usable = {e for e, fmt in registered.items() if fmt in Image.OPEN and fmt not in _UNDECODABLE}
    return tuple(e for e in _PREFERRED if e in usable) + tuple(sorted(usable - set(_PREFERRED)))


PILLOW_EXTENSIONS = _pillow_extensions()
IMAGE_EXTENSIONS = PILLOW_EXTENSIONS + DICOM_EXTENSIONS


_DEPTHS = (8, 10, 12, 14, 16)
_warned = 0
_MAX_WARNINGS = 20  # per process: a folder of 30k such images must not flood the log


def warn_depth(name: str | None, message: str) -> None:
    global _warned
    if _warned < _MAX_WARNINGS:
        _warned += 1
        tail = " (further bit-depth warnings suppressed)" if _warned == _MAX_WARNINGS else ""
        log.warning("%s: %s%s", name or "image", message, tail)


def scale_to_uint8(
    arr: np.ndarray, peak: float | None = None, name: str | None = None
) -> np.ndarray:
    """Map deeper-than-8-bit samples to 0..255 by the module's bit-depth rule (never clipping).

    Parameters
    ----------
    arr : numpy.ndarray
        Samples of any shape; unsigned/signed integers or floats.
    peak : float, optional
        The declared full-intensity value (e.g. ``2**BitsStored - 1``). Values above it mean the
        data is left-aligned in its container, which is then used instead.
    name : str, optional
        The file named in warnings when the depth has to be guessed.

    Returns
    -------
    numpy.ndarray
        uint8, same shape.
    """
    data = np.nan_to_num(np.asarray(arr, dtype=np.float64))
    if data.size == 0:
        return np.zeros(data.shape, np.uint8)
    low, top = float(data.min()), float(data.max())
    kind = np.asarray(arr).dtype.kind
    if peak is not None and low >= 0:
        if top > peak:  # left-aligned (PNG spec): the container is the scale
            peak = _container_peak(np.asarray(arr).dtype, top)
        return _rescale(data, 0.0, peak)
    if low < 0 or (kind == "f" and top > 65535.0):
        warn_depth(name, f"no declared bit depth for values {low:g}..{top:g}; stretched to 0..255")
        return _rescale(data, low, top if top > low else low + 1.0)
    if kind == "f" and top <= 1.0:
        return _rescale(data, 0.0, 1.0)
    bits = next((b for b in _DEPTHS if top <= 2**b - 1), None)
    if bits is None:  # wider than 16 bits (32-bit integers or big floats): stretch to the max
        warn_depth(name, f"no declared bit depth, values reach {top:g}; scaled by that maximum")
        return _rescale(data, 0.0, top)
    if bits < 16 and np.asarray(arr).dtype.itemsize > 1:
        warn_depth(
            name,
            f"no declared bit depth (PNG sBIT / TIFF MaxSampleValue), values reach {top:g}; "
            f"read as {bits}-bit data (scaled by {2**bits - 1})",
        )
    return _rescale(data, 0.0, float(2**bits - 1))


def _container_peak(dtype: np.dtype, top: float) -> float:
    if dtype.kind in "ui" and dtype.itemsize <= 2:
        return float(np.iinfo(dtype).max)
    return top


def _rescale(data: np.ndarray, low: float, high: float) -> np.ndarray:
    out = (data - low) * (255.0 / (high - low))
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def to_rgb8(
    img: Image.Image,
    max_side: int | None = None,
    *,
    peak: float | None = None,
    name: str | None = None,
) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB (alpha composited on black), optionally shrunk.

    Parameters
    ----------
    img : PIL.Image.Image
        Any mode. 16-bit/32-bit/float single-channel data follows the module's bit-depth rule.
    max_side : int, optional
        Longest side of the result (bicubic reduction), when given.
    peak : float, optional
        Declared full-intensity sample value for deep data (PNG sBIT, TIFF MaxSampleValue).
    name : str, optional
        The file named in bit-depth warnings.

    Returns
    -------
    PIL.Image.Image
        Mode ``RGB``. CMYK uses Pillow's conversion.
    """
    img = _to_8bit(img, peak, name)
    if max_side is not None and max(img.size) > max_side:
        img = _shrink(img, max_side)
    if img.mode in ("RGBA", "LA"):
        rgba = img.convert("RGBA")
        canvas = Image.new("RGB", img.size, (0, 0, 0))
        canvas.paste(rgba, mask=rgba.getchannel("A"))
        return canvas
    return img if img.mode == "RGB" else img.convert("RGB")


def _shrink(img: Image.Image, max_side: int) -> Image.Image:
    scale = max_side / max(img.size)
    new = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
    if img.mode not in ("L", "LA", "RGB", "RGBA"):
        img = img.convert("RGBA" if "A" in img.getbands() else "RGB")
    return img.resize(new, Image.Resampling.BICUBIC, reducing_gap=2.0)


def _to_8bit(img: Image.Image, peak: float | None, name: str | None) -> Image.Image:
    """Return an image in mode L, LA, RGB or RGBA (palette/CMYK/16-bit/float resolved)."""
    mode = img.mode
    if mode in ("L", "LA", "RGB", "RGBA"):
        return img
    if mode == "P":
        return img.convert("RGBA" if "transparency" in img.info else "RGB")
    if mode == "PA":
        return img.convert("RGBA")
    if mode == "1":
        return img.convert("L")
    if mode == "RGBa":
        return img.convert("RGBA")
    if mode.startswith("I;16") or mode in ("I", "F"):
        arr = np.asarray(img)
        return Image.fromarray(scale_to_uint8(arr, peak=peak, name=name), mode="L")
    return img.convert("RGB")  # CMYK, YCbCr, LAB, HSV, RGBX
