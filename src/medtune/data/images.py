"""Robust image decoding to 8-bit RGB.

:func:`load_rgb` accepts whatever a clinic exports (grayscale, RGBA, palette, CMYK, 16-bit PNG/TIFF,
EXIF-rotated JPEG) and returns an 8-bit RGB :class:`PIL.Image.Image`. Every decoding problem is a
:class:`~medtune.errors.BadImageError` naming the file.

Pixel limit: Pillow refuses images above ``2 * Image.MAX_IMAGE_PIXELS`` (about 179 MP by default)
as possible decompression bombs. Whole-slide-like fundus mosaics can be larger, so importing this
module raises ``Image.MAX_IMAGE_PIXELS`` to :data:`MAX_PIXELS` (20000 x 20000 = 400 MP; Pillow
then warns above that and refuses above twice that). It never lowers a limit set by the caller.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile

from medtune.errors import BadImageError

__all__ = ["IMAGE_EXTENSIONS", "MAX_PIXELS", "is_image_file", "load_rgb", "to_rgb8"]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
MAX_PIXELS = 20000 * 20000

if Image.MAX_IMAGE_PIXELS is not None and Image.MAX_IMAGE_PIXELS < MAX_PIXELS:
    Image.MAX_IMAGE_PIXELS = MAX_PIXELS
# Truncated files must fail: never decode them partially.
ImageFile.LOAD_TRUNCATED_IMAGES = False

_ORIENTATION = 0x0112
_TRANSPOSE = {
    2: (Image.Transpose.FLIP_LEFT_RIGHT,),
    3: (Image.Transpose.ROTATE_180,),
    4: (Image.Transpose.FLIP_TOP_BOTTOM,),
    5: (Image.Transpose.TRANSPOSE,),
    6: (Image.Transpose.ROTATE_270,),
    7: (Image.Transpose.TRANSVERSE,),
    8: (Image.Transpose.ROTATE_90,),
}


def is_image_file(path: str | os.PathLike[str]) -> bool:
    """True when the file name has a supported image extension (case-insensitive)."""
    return os.path.splitext(str(path))[1].lower() in IMAGE_EXTENSIONS


def load_rgb(path: str | os.PathLike[str], max_side: int | None = None) -> Image.Image:
    """Decode ``path`` fully into an 8-bit RGB image, EXIF orientation applied.

    ``max_side``: when given, the result's longer side is at most ``max_side`` pixels. JPEGs are
    then decoded with DCT scaling (``Image.draft``) so large photos are never decoded at full size;
    other formats are decoded and reduced. Raises :class:`BadImageError` for empty, truncated,
    non-image or oversized files.
    """
    path = Path(path)
    try:
        if path.stat().st_size == 0:
            raise BadImageError(path, "empty file")
    except OSError as err:
        raise BadImageError(path, f"cannot open: {err.strerror or err}") from None
    img = None
    try:
        img = Image.open(path)
        out = _decode(img, max_side)
        if out is not img:
            img.close()
        return out  # when ``out is img``, load() already closed the file of a single-frame image
    except BadImageError:
        raise
    except Image.DecompressionBombError:
        raise BadImageError(path, f"larger than {MAX_PIXELS * 2} pixels") from None
    except Image.UnidentifiedImageError:
        raise BadImageError(path, "not a recognised image format") from None
    except MemoryError:
        raise BadImageError(path, "out of memory while decoding") from None
    except Exception as err:  # Pillow raises OSError, SyntaxError, ValueError, zlib.error, ...
        if img is not None:
            img.close()
        raise BadImageError(path, _reason(err)) from None


def _reason(err: BaseException) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return f"{type(err).__name__}: {text}" if not isinstance(err, OSError) else text


def _decode(img: Image.Image, max_side: int | None) -> Image.Image:
    orientation = _orientation(img)
    if max_side is not None and img.format == "JPEG":
        # choose the largest DCT scale that keeps both sides >= max_side; never full size
        img.draft("RGB" if img.mode in ("RGB", "YCbCr") else img.mode, (max_side, max_side))
    img.load()  # full decode here, so truncated files fail now and not later
    out = to_rgb8(img, max_side=max_side)
    for op in _TRANSPOSE.get(orientation, ()):
        out = out.transpose(op)
    return out


def _orientation(img: Image.Image) -> int:
    try:
        return int(img.getexif().get(_ORIENTATION, 1))
    except Exception:  # malformed EXIF must not make a readable image unreadable
        return 1


def to_rgb8(img: Image.Image, max_side: int | None = None) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB (alpha composited on black), optionally shrunk.

    16-bit data is scaled (``65535 -> 255``), not clipped. CMYK uses Pillow's conversion.
    """
    img = _to_8bit(img)
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


def _to_8bit(img: Image.Image) -> Image.Image:
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
        return Image.fromarray(_scale_to_uint8(np.asarray(img), mode), mode="L")
    return img.convert("RGB")  # CMYK, YCbCr, LAB, HSV, RGBX


def _scale_to_uint8(arr: np.ndarray, mode: str) -> np.ndarray:
    """Map 16-bit / 32-bit / float single-channel data to 0..255 by scaling, never clipping."""
    arr = arr.astype(np.float64, copy=False)
    top = float(np.nanmax(arr)) if arr.size else 0.0
    if mode.startswith("I;16"):
        peak = 65535.0
    else:  # "I" (32-bit ints, usually holding 8- or 16-bit data) or "F" (float, maybe 0..1)
        ranges = ((1.0,) if mode == "F" else ()) + (255.0, 65535.0)
        peak = next((r for r in ranges if top <= r), max(top, 1.0))
    out = np.nan_to_num(arr, nan=0.0) * (255.0 / peak)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)
