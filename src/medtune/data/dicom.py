"""DICOM input through pydicom: single-frame images to 8-bit RGB, patient ids to anonymous groups.

:func:`medtune.data.images.load_rgb` dispatches here for ``.dcm``/``.dicom`` files and for any
file carrying the ``DICM`` preamble (extensionless exports such as ``IM000001``), so ``prepare``,
``train``, ``predict`` and ``evaluate`` all read DICOM.

Decoding (pydicom 3, ``pydicom.pixels.pixel_array``): uncompressed data natively; JPEG baseline /
extended through Pillow or pylibjpeg-libjpeg, JPEG lossless and JPEG-LS through
pylibjpeg-libjpeg, JPEG 2000 through pylibjpeg-openjpeg, RLE natively. Colour:
``YBR_FULL``/``YBR_FULL_422`` (typical of ophthalmic photography, JPEG baseline) is converted to
RGB by pydicom (ITU-T T.871 equations), ``PALETTE COLOR`` through its colour LUT. Grayscale:
``MONOCHROME2`` as stored, ``MONOCHROME1`` inverted (0 = white). Bit depth: samples are scaled by
``2**BitsStored - 1`` (signed data first shifted by ``2**(BitsStored-1)``); no modality or VOI
LUT (windowing) is applied.

Multi-frame files (``NumberOfFrames > 1``) are refused with a one-line
:class:`~medtune.errors.BadImageError` naming the file and the frame count: one row per frame
would give several labelled items per file and silently multiply a patient's weight, so the user
exports the frames they mean.

Laterality: :func:`dicom_laterality` reads ``ImageLaterality`` (0020,0062), else the series'
``Laterality`` (0020,0060): ``R`` / ``L`` (``B`` both and ``U`` unpaired are no single eye).

Patient identifiers: :func:`patient_groups` reads ``PatientID`` (never pixel data) and returns
only ``patient:<hash>`` ids, an HMAC-SHA256 of each id keyed by a hash of *all* the set's ids,
truncated to 16 hex digits. The raw ids stay in memory only; they never reach outputs, logs,
caches or reports, and the key cannot be rebuilt from the outputs (a short numeric id cannot be
found by hashing candidates without knowing every other id of the set). pydicom's own warnings
(which may quote element values) are suppressed while reading.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from medtune.data.formats import DICOM_EXTENSIONS, PILLOW_EXTENSIONS, scale_to_uint8, to_rgb8
from medtune.errors import BadImageError

__all__ = [
    "dicom_laterality",
    "is_dicom_path",
    "looks_like_dicom",
    "patient_groups",
    "read_dicom",
]

_PREAMBLE = 128
_MAGIC = b"DICM"


def looks_like_dicom(path: str | os.PathLike[str]) -> bool:
    """True when the file has the DICOM Part 10 ``DICM`` marker after its 128-byte preamble."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(_PREAMBLE + 4)
    except OSError:
        return False
    return head[_PREAMBLE:] == _MAGIC


def is_dicom_path(path: str | os.PathLike[str]) -> bool:
    """True for ``.dcm``/``.dicom`` files and for files without an image extension that carry the
    ``DICM`` marker (files with a Pillow extension are not opened)."""
    ext = os.path.splitext(str(path))[1].lower()
    if ext in DICOM_EXTENSIONS:
        return True
    return ext not in PILLOW_EXTENSIONS and looks_like_dicom(path)


def _dcmread(path: Path, **kwargs: Any) -> Any:
    import pydicom
    from pydicom.errors import InvalidDicomError

    # force: .dcm files without the preamble (older exports) are still DICOM data sets
    force = os.path.splitext(str(path))[1].lower() in DICOM_EXTENSIONS
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pydicom warnings may quote identifying values
            return pydicom.dcmread(path, force=force, **kwargs)
    except InvalidDicomError:
        raise BadImageError(path, "not a DICOM file") from None
    except Exception as err:  # truncated or malformed data set
        raise BadImageError(path, f"unreadable DICOM ({type(err).__name__})") from None


def read_dicom(path: str | os.PathLike[str], max_side: int | None = None) -> Image.Image:
    """Decode a single-frame DICOM image to 8-bit RGB.

    Parameters
    ----------
    path : path-like
        A DICOM Part 10 file (or a ``.dcm`` data set without preamble).
    max_side : int, optional
        Longest side of the result in pixels (bicubic reduction after decoding).

    Returns
    -------
    PIL.Image.Image
        Mode ``RGB``; colour converted from YCbCr, MONOCHROME1 inverted, BitsStored honoured.

    Raises
    ------
    BadImageError
        Not DICOM, no pixel data, multi-frame, or compressed with a transfer syntax no installed
        decoder handles (the message names the syntax).
    """
    path = Path(path)
    ds = _dcmread(path)
    if "PixelData" not in ds and "FloatPixelData" not in ds:
        raise BadImageError(path, "DICOM file without pixel data (not an image)")
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        raise BadImageError(
            path,
            f"multi-frame DICOM with {frames} frames; medtune reads single-frame images, so "
            "export each frame you need as its own file",
        )
    arr = _pixels(ds, path)
    return to_rgb8(Image.fromarray(arr), max_side=max_side)


def _pixels(ds: Any, path: Path) -> np.ndarray:
    """Pixel data as uint8 ``H x W`` or ``H x W x 3``."""
    from pydicom.pixels import apply_color_lut, pixel_array

    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            arr = pixel_array(ds)  # as_rgb: YBR_FULL / YBR_FULL_422 -> RGB
            if photometric == "PALETTE COLOR":
                arr = apply_color_lut(arr, ds)
    except (NotImplementedError, RuntimeError) as err:
        syntax = ds.file_meta.get("TransferSyntaxUID") if "file_meta" in ds else None
        name = getattr(syntax, "name", syntax) or "unknown transfer syntax"
        detail = " ".join(str(err).split())[:160]
        raise BadImageError(
            path,
            f"cannot decode {name} pixel data ({detail}); install pylibjpeg-libjpeg, "
            "pylibjpeg-openjpeg or gdcm",
        ) from None
    except Exception as err:
        raise BadImageError(path, f"bad DICOM pixel data ({type(err).__name__})") from None
    if photometric == "PALETTE COLOR":
        peak = 255.0 if arr.dtype == np.uint8 else 65535.0
        return scale_to_uint8(arr, peak=peak, name=str(path))
    bits = int(ds.get("BitsStored", 8 * arr.dtype.itemsize))
    if int(ds.get("PixelRepresentation", 0)) == 1:  # two's complement: shift to unsigned
        arr = arr.astype(np.int64) + 2 ** (bits - 1)
    out = scale_to_uint8(arr, peak=float(2**bits - 1), name=str(path))
    if photometric == "MONOCHROME1":
        out = 255 - out
    if out.ndim == 3 and out.shape[2] == 1:
        out = out[:, :, 0]
    return np.ascontiguousarray(out)


def patient_groups(paths: Sequence[str | os.PathLike[str]]) -> list[str] | None:
    """Anonymous group ids from the DICOM ``PatientID`` of each file, or ``None`` when none has one.

    Parameters
    ----------
    paths : sequence of path-like
        Image files; non-DICOM files and DICOM files without ``PatientID`` get ``""``.

    Returns
    -------
    list of str or None
        ``"patient:<16 hex digits>"`` per file (``""`` where unknown); only the keyed hash, never
        the identifier, leaves this function.
    """
    ids: list[str] = []
    for path in paths:
        pid = ""
        if is_dicom_path(path):
            try:
                ds = _dcmread(Path(path), stop_before_pixels=True, specific_tags=["PatientID"])
                pid = str(ds.get("PatientID", "") or "").strip()
            except BadImageError:
                pid = ""  # the decoder names the file later, when the pixels are read
        ids.append(pid)
    known = sorted({i for i in ids if i})
    if not known:
        return None
    key = hashlib.sha256(("medtune-patient-groups\0" + "\0".join(known)).encode()).digest()
    return [
        "patient:" + hmac.new(key, i.encode(), hashlib.sha256).hexdigest()[:16] if i else ""
        for i in ids
    ]


#: DICOM laterality codes (PS3.3 C.7.3.1 Laterality, C.7.6.1 Image Laterality) of one eye.
_LATERALITY_CODES = ("R", "L")


def dicom_laterality(paths: Sequence[str | os.PathLike[str]]) -> list[str | None]:
    """The eye each DICOM file shows: ``ImageLaterality`` (0020,0062), else ``Laterality``
    (0020,0060).

    Parameters
    ----------
    paths : sequence of path-like
        Image files; non-DICOM files are not opened.

    Returns
    -------
    list of str or None
        ``"R"`` or ``"L"`` per file; ``None`` for non-DICOM files, unreadable headers, a missing
        tag, and the codes ``B`` (both eyes) and ``U`` (unpaired), which name no single eye.
        Only the header is read (no pixel data).
    """
    out: list[str | None] = []
    for path in paths:
        code = None
        if is_dicom_path(path):
            try:
                ds = _dcmread(
                    Path(path),
                    stop_before_pixels=True,
                    specific_tags=["ImageLaterality", "Laterality"],
                )
            except BadImageError:
                ds = None  # the decoder names the file later, when the pixels are read
            for tag in ("ImageLaterality", "Laterality"):
                value = str(ds.get(tag, "") or "").strip().upper() if ds is not None else ""
                if value in _LATERALITY_CODES:
                    code = value
                    break
        out.append(code)
    return out
