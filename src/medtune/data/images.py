"""Robust image decoding to 8-bit RGB, and the one folder walker every command uses.

:func:`load_rgb` accepts whatever a clinic exports (every format Pillow opens, grayscale, RGBA,
palette, CMYK, 16-bit PNG/TIFF, EXIF-rotated photos, DICOM) and returns an 8-bit RGB
:class:`PIL.Image.Image`. Every decoding problem is a :class:`~medtune.errors.BadImageError`
naming the file. DICOM files (``.dcm``/``.dicom``, or any file with the ``DICM`` preamble) are
read by :mod:`medtune.data.dicom`.

Orientation: the EXIF (or XMP) Orientation tag is applied exactly once, with the semantics of
:func:`PIL.ImageOps.exif_transpose`. Pillow itself already transposes TIFF images while loading
(and then removes the tag), so the tag is read *after* decoding: whatever Pillow left is applied.

Bit depth (the rule for data deeper than 8 bits, e.g. 16-bit PNG/TIFF holding 10-, 12- or 14-bit
detector values):

1. Declared depth wins: PNG ``sBIT`` and TIFF ``MaxSampleValue`` (and DICOM ``BitsStored``) give
   the value that maps to 255, so 12-bit data is scaled by 4095, not by 65535. PNG data stored
   left-aligned as the PNG specification asks (values above the declared maximum) is scaled by
   the container maximum instead, which gives the same picture.
2. Undeclared depth: values are scaled by the smallest of 8/10/12/14/16 bits that holds the
   image's largest value (consistent across images of one detector, unlike a per-image stretch);
   when that is below 16 bits a warning names the file and the depth assumed. Signed data with
   negative values and floats outside 0..1 are stretched from their minimum to their maximum,
   with a warning naming the file. Nothing is ever clipped silently.
3. 16-bit colour PNG/TIFF are read at full depth through OpenCV (Pillow keeps only the high
   byte, which makes right-aligned 12-bit colour data black).

Folders: :func:`list_image_files` / :func:`iter_image_files` are the only folder walkers; they skip
hidden and system entries (:func:`is_hidden`: dot-files such as AppleDouble ``._x.png`` and
``.DS_Store``, ``__MACOSX``, ``Thumbs.db``, ``desktop.ini``, ``$RECYCLE.BIN``, ...) and count the
other files they ignore. Image files are those with one of :data:`IMAGE_EXTENSIONS` (every
extension Pillow registers for a format it can decode, plus ``.dcm``) and extensionless DICOM.

Pixel limit: Pillow refuses images above ``2 * Image.MAX_IMAGE_PIXELS`` (about 179 MP by default)
as possible decompression bombs. Whole-slide-like fundus mosaics can be larger, so importing this
module raises ``Image.MAX_IMAGE_PIXELS`` to :data:`MAX_PIXELS` (20000 x 20000 = 400 MP; Pillow
then warns above that and refuses above twice that). It never lowers a limit set by the caller.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import ExifTags, Image, ImageFile, PngImagePlugin

from medtune.data import dicom
from medtune.data.formats import (
    IMAGE_EXTENSIONS,
    scale_to_uint8,
    to_rgb8,
    warn_depth,
)
from medtune.errors import BadImageError

__all__ = [
    "IMAGE_EXTENSIONS",
    "MAX_PIXELS",
    "ImageListing",
    "is_hidden",
    "is_image_file",
    "is_listed_image",
    "iter_image_files",
    "list_image_files",
    "load_rgb",
    "reduce_to_min_side",
    "scale_to_uint8",
    "to_rgb8",
]

log = logging.getLogger(__name__)

MAX_PIXELS = 20000 * 20000

if Image.MAX_IMAGE_PIXELS is not None and Image.MAX_IMAGE_PIXELS < MAX_PIXELS:
    Image.MAX_IMAGE_PIXELS = MAX_PIXELS
# Truncated files must fail: never decode them partially.
ImageFile.LOAD_TRUNCATED_IMAGES = False

# Names that are never data: OS/file-manager metadata and archive leftovers (compared lowercased).
_SYSTEM_NAMES = frozenset(
    {
        "__macosx",
        "thumbs.db",
        "ehthumbs.db",
        "desktop.ini",
        "$recycle.bin",
        "system volume information",
        "@eadir",
        "icon\r",
    }
)


def is_hidden(name: str) -> bool:
    """True for hidden or system entries that are never data.

    Dot-files and dot-folders (``.DS_Store``, AppleDouble ``._x.png``, ``.git``), ``__MACOSX``,
    ``Thumbs.db``, ``desktop.ini``, ``$RECYCLE.BIN``, ``System Volume Information`` and Synology's
    ``@eaDir``. ``name`` is one path component (not a path).
    """
    return name.startswith(".") or name.lower() in _SYSTEM_NAMES


def is_image_file(path: str | os.PathLike[str]) -> bool:
    """True when the file name has a supported image extension (case-insensitive, no I/O)."""
    return os.path.splitext(str(path))[1].lower() in IMAGE_EXTENSIONS


@dataclass
class ImageListing:
    """What :func:`list_image_files` found under ``root``.

    ``files``: sorted relative POSIX paths of image files; ``ignored``: sorted relative paths of
    the other (non-hidden) files; ``folders``: relative paths of the non-hidden top-level folders.
    """

    root: Path
    files: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    folders: list[str] = field(default_factory=list)


def list_image_files(root: str | os.PathLike[str]) -> ImageListing:
    """Walk ``root`` (following symlinks, cycles cut) and sort its files into images and others.

    Hidden and system entries (:func:`is_hidden`) are skipped, folders included. Files without an
    image extension are sniffed for the DICOM ``DICM`` preamble (extensionless DICOM is common).

    Parameters
    ----------
    root : path-like
        The folder to walk.

    Returns
    -------
    ImageListing
        Image files, ignored files and top-level folders, relative to ``root``.
    """

    root = Path(root)
    listing = ImageListing(root=root)
    visited: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in visited:  # a symlink cycle
            dirnames[:] = []
            continue
        visited.add(real)
        dirnames[:] = sorted(d for d in dirnames if not is_hidden(d))
        rel_dir = os.path.relpath(dirpath, root)
        if rel_dir == ".":
            listing.folders = list(dirnames)
        for name in filenames:
            if is_hidden(name):
                continue
            rel = (name if rel_dir == "." else f"{rel_dir}/{name}").replace(os.sep, "/")
            image = is_image_file(name) or dicom.looks_like_dicom(os.path.join(dirpath, name))
            (listing.files if image else listing.ignored).append(rel)
    listing.files.sort()
    listing.ignored.sort()
    return listing


def is_listed_image(path: str | os.PathLike[str]) -> bool:
    """The walker's rule for one file: not hidden/system, and an image extension or DICOM.

    For files that reach a command by other means than :func:`list_image_files` (glob patterns).
    """

    name = os.path.basename(os.fspath(path))
    return not is_hidden(name) and (is_image_file(name) or dicom.looks_like_dicom(path))


def warn_ignored(root: str | os.PathLike[str], ignored: list[str], what: str = "non-image") -> None:
    """Log one warning saying how many files under ``root`` were ignored, with an example."""
    if ignored:
        log.warning("ignored %d %s file(s) under %s, e.g. %s", len(ignored), what, root, ignored[0])


def iter_image_files(root: str | os.PathLike[str]) -> Iterator[Path]:
    """The image files under ``root`` as paths (``root / relative``), in sorted order.

    Hidden/system entries are skipped (see :func:`list_image_files`); other non-image files are
    skipped with one logged warning naming how many and an example.
    """
    listing = list_image_files(root)
    warn_ignored(root, listing.ignored)
    return iter([Path(root) / f for f in listing.files])


# --------------------------------------------------------------------------- decoding


def load_rgb(
    path: str | os.PathLike[str],
    max_side: int | None = None,
    *,
    min_side: int | None = None,
) -> Image.Image:
    """Decode ``path`` fully into an 8-bit RGB image, EXIF orientation applied exactly once.

    Parameters
    ----------
    path : path-like
        Any image Pillow decodes, or a DICOM file (by extension or ``DICM`` preamble).
    max_side : int, optional
        When given, the result's longer side is at most ``max_side`` pixels. JPEGs are then
        decoded with DCT scaling (``Image.draft``) so large photos are never decoded at full
        size; other formats are decoded and reduced.
    min_side : int, optional
        Decode only as large as a ``min_side`` px network input needs (ignored with
        ``max_side``): JPEGs at the smallest DCT scale (1/2, 1/4 or 1/8, libjpeg's scaled
        decoding through ``Image.draft``) whose shorter side is still at least ``min_side``;
        other formats reduced by the largest whole factor that keeps it so (``Image.reduce``,
        a box filter). Nothing else is resampled, so the field-of-view crop is found on the
        decoded image and resized once.

    Returns
    -------
    PIL.Image.Image
        Mode ``RGB``, upright, deeper data scaled by the module's bit-depth rule.

    Raises
    ------
    BadImageError
        Empty, truncated, non-image, undecodable or oversized files.
    """
    path = Path(path)
    try:
        if path.stat().st_size == 0:
            raise BadImageError(path, "empty file")
    except OSError as err:
        raise BadImageError(path, f"cannot open: {err.strerror or err}") from None
    if dicom.is_dicom_path(path):
        return reduce_to_min_side(dicom.read_dicom(path, max_side=max_side), min_side)
    img = None
    try:
        img = Image.open(path)
        out = _decode(img, max_side, path, None if max_side is not None else min_side)
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


def _decode(
    img: Image.Image, max_side: int | None, path: Path, min_side: int | None = None
) -> Image.Image:
    peak = _declared_peak(img, path)
    deep = _read_deep_colour(img, path)
    if deep is not None:  # 16-bit colour as stored: orientation still to apply
        orientation = _orientation(img)
        out = to_rgb8(Image.fromarray(_scale_colour(deep, peak, path)), max_side=max_side)
        return _transpose(reduce_to_min_side(out, min_side), orientation)
    request = max_side if max_side is not None else min_side
    if request is not None and img.format == "JPEG":
        # libjpeg's DCT scaling: the largest of 1/2, 1/4, 1/8 that keeps both sides >= request
        img.draft("RGB" if img.mode in ("RGB", "YCbCr") else img.mode, (request, request))
    img.load()  # full decode here, so truncated files fail now and not later
    # read after load(): Pillow has already transposed TIFF and removed the tag; never twice
    orientation = _orientation(img)
    out = to_rgb8(img, max_side=max_side, peak=peak, name=str(path))
    return _transpose(reduce_to_min_side(out, min_side), orientation)


def reduce_to_min_side(img: Image.Image, min_side: int | None) -> Image.Image:
    """``img`` reduced by the largest whole factor that keeps its shorter side >= ``min_side``.

    Parameters
    ----------
    img : PIL.Image.Image
        Any size (a JPEG already DCT-scaled by ``draft`` is usually left as is).
    min_side : int or None
        ``None`` returns ``img``.

    Returns
    -------
    PIL.Image.Image
        ``Image.reduce`` (box filter over whole blocks) of ``img``, or ``img`` itself.
    """
    if min_side is None or min_side < 1:
        return img
    factor = min(img.size) // int(min_side)
    return img.reduce(factor) if factor >= 2 else img


_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}  # the table of PIL.ImageOps.exif_transpose


def _transpose(img: Image.Image, orientation: int) -> Image.Image:
    op = _TRANSPOSE.get(orientation)
    return img if op is None else img.transpose(op)


def _orientation(img: Image.Image) -> int:
    try:
        return int(img.getexif().get(ExifTags.Base.Orientation, 1))
    except Exception:  # malformed EXIF must not make a readable image unreadable
        return 1


# --------------------------------------------------------------------------- bit depth


def _declared_peak(img: Image.Image, path: Path) -> float | None:
    """The sample value that means full intensity, when the file declares it (else ``None``)."""
    try:
        if img.format == "PNG":
            if not _png_is_16bit(img):  # sBIT only matters above 8 bits: no extra file read
                return None
            bits = _png_sbit(path)
            return float(2**bits - 1) if bits else None
        if img.format == "TIFF":
            top = img.tag_v2.get(281)  # MaxSampleValue (one value per sample, or one for all)
            if top is not None:
                top = max(top) if isinstance(top, tuple) else top
                return float(top) if top > 0 else None
    except Exception:  # malformed metadata: fall back to the undeclared rule
        return None
    return None


def _png_sbit(path: Path) -> int | None:
    """The largest colour-channel value of the PNG ``sBIT`` chunk (Pillow does not read it).

    Walks the chunk headers with Pillow's own :class:`PIL.PngImagePlugin.ChunkStream` up to the
    first ``IDAT``; ``None`` when there is no ``sBIT`` or the image is not deeper than 8 bits.
    """
    with open(path, "rb") as fh:
        if fh.read(8) != b"\x89PNG\r\n\x1a\n":
            return None
        stream = PngImagePlugin.ChunkStream(fh)
        depth = colour = 0
        while True:
            cid, pos, length = stream.read()
            if cid == b"IHDR":
                head = fh.read(length)
                depth, colour = head[8], head[9]
            elif cid == b"sBIT":
                data = fh.read(length)
                if depth <= 8 or not data:
                    return None
                channels = {0: 1, 2: 3, 3: 3, 4: 1, 6: 3}.get(colour, len(data))
                bits = max(data[:channels])
                return bits if 0 < bits < depth else None
            elif cid in (b"IDAT", b"IEND", b""):
                return None
            fh.seek(pos + length + 4)  # skip the CRC


def _read_deep_colour(img: Image.Image, path: Path) -> np.ndarray | None:
    """Full-depth 16-bit colour pixels (H x W x 3/4, RGB order, as stored), else ``None``.

    Pillow decodes 16-bit colour to 8 bits by keeping the high byte. PNG is read with OpenCV
    (``IMREAD_UNCHANGED`` leaves the EXIF orientation to us), TIFF with tifffile (which never
    applies the Orientation tag; OpenCV's TIFF reader does, so it is not used for TIFF). When
    neither can read the file (e.g. LZW TIFF without ``imagecodecs``), Pillow's 8-bit decode
    is used with a warning.
    """
    if img.format not in ("PNG", "TIFF") or img.mode not in ("RGB", "RGBA"):
        return None
    if img.format == "PNG":
        if not _png_is_16bit(img):
            return None
        arr = _read_png16(path)
    else:
        if max(_as_tuple(img.tag_v2.get(258, (8,)))) <= 8:  # BitsPerSample
            return None
        arr = _read_tiff16(path)
    if arr is None:
        warn_depth(str(path), "16-bit colour could not be read at full depth; read at 8 bits")
    return arr


def _read_png16(path: Path) -> np.ndarray | None:
    try:
        import cv2

        # np.fromfile + imdecode: non-ASCII paths work
        arr = cv2.imdecode(np.fromfile(path, dtype=np.uint8), cv2.IMREAD_UNCHANGED)
    except Exception:  # ImportError, cv2.error: fall back to Pillow's 8 bits
        return None
    if arr is None or arr.ndim != 3 or arr.dtype != np.uint16 or arr.shape[2] not in (3, 4):
        return None
    return np.ascontiguousarray(arr[..., [2, 1, 0, 3][: arr.shape[2]]])  # BGR(A) -> RGB(A)


def _read_tiff16(path: Path) -> np.ndarray | None:
    try:
        import tifffile

        with tifffile.TiffFile(path) as tif:
            page = tif.pages[0]
            arr, axes = page.asarray(), page.axes
    except Exception:  # ImportError, a codec tifffile lacks: fall back to Pillow's 8 bits
        return None
    if axes.startswith("S"):  # planar configuration 2: samples first
        arr = np.moveaxis(arr, 0, -1)
    if arr.ndim != 3 or arr.shape[2] not in (3, 4) or arr.dtype.itemsize != 2:
        return None
    return arr


def _png_is_16bit(img: Image.Image) -> bool:
    """True for 16-bit samples (Pillow's raw mode, e.g. ``RGB;16B``, before decoding)."""
    return any("16" in str(tile.args) for tile in getattr(img, "tile", None) or ())


def _as_tuple(value: object) -> tuple:
    return value if isinstance(value, tuple) else (value,)


def _scale_colour(arr: np.ndarray, peak: float | None, path: Path) -> np.ndarray:
    colour = scale_to_uint8(arr[..., :3], peak=peak, name=str(path))
    if arr.shape[2] == 4:  # alpha: always the full container range
        alpha = scale_to_uint8(arr[..., 3:], peak=65535.0, name=str(path))
        return np.concatenate([colour, alpha], axis=2)
    return colour
