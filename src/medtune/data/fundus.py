"""Fundus photograph preprocessing: field-of-view crop, pad to square, resize, optional enhancement.

A colour fundus photograph is a bright, roughly circular field of view (FOV) on a dark background;
cameras and data sets differ in how much black border surrounds it and whether the circle is
clipped at the top and bottom. :func:`preprocess` makes them comparable:

1. detect the FOV on a small thumbnail (smoothed max-of-RGB luminance, dark pixels connected to the
   image border are background, largest remaining component, holes filled) and map its bounding box
   back to full resolution; an image without a dark border is left uncropped;
2. crop to that box, resize keeping the aspect ratio so the long side is ``size`` and pad centred
   with black to ``size x size``;
3. optionally black out everything outside the FOV (``mask``), standardise the colour inside it
   (``colour_std``), apply CLAHE to the luminance (``clahe``) and/or Ben Graham's local-average
   colour subtraction (``ben_graham``), in that order.

By default colours are left untouched (no normalisation): ImageNet backbones normalise later.
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np
from PIL import Image
from scipy import ndimage

__all__ = ["FundusOptions", "field_of_view_mask", "fov_bbox", "preprocess"]

_THUMB = 256  # FOV detection runs on a thumbnail whose long side is at most this many pixels
_DARK_MAX = 40.0  # the background level (1st percentile of luminance) must be at most this ...
_DARK_FRAC = 0.35  # ... and at most this fraction of the bright level (99th percentile)
_MIN_BG = 0.005  # less border-connected dark area than this fraction means "no dark border"

BBox = tuple[int, int, int, int]

VERSION = 1
"""Bump whenever :func:`preprocess` changes its output: prepared caches are keyed on it."""


@dataclass(frozen=True)
class FundusOptions:
    """Fundus preprocessing options (all off except ``crop``; colour is untouched by default).

    ``crop``: crop to the detected field of view before padding/resizing.
    ``ben_graham``: local-average colour subtraction (Kaggle DR 2015 winner).
    ``ben_graham_sigma``: Gaussian sigma in output pixels for it; ``None`` means ``size / 30``.
    ``clahe``: contrast-limited adaptive histogram equalisation of the luminance only.
    ``mask``: set every pixel outside the field of view to black (text, reflections, stray light).
    ``colour_std``: standardise the colour inside the FOV to a typical fundus photograph's
    (Reinhard et al. 2001 colour transfer in CIELAB, to fixed target statistics).
    """

    crop: bool = True
    ben_graham: bool = False
    ben_graham_sigma: float | None = None
    clahe: bool = False
    mask: bool = False
    colour_std: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> FundusOptions:
        """Build from a dict (e.g. a config file); unknown keys raise ``ValueError``."""
        data = dict(data or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown fundus option(s): {', '.join(unknown)}")
        if data.get("ben_graham_sigma") is not None:
            data["ben_graham_sigma"] = float(data["ben_graham_sigma"])
        for key in ("crop", "ben_graham", "clahe", "mask", "colour_std"):
            if key in data:
                data[key] = bool(data[key])
        return cls(**data)


# --------------------------------------------------------------------------- FOV detection


def _as_pil(img: Image.Image | np.ndarray) -> Image.Image:
    if isinstance(img, Image.Image):
        return img if img.mode in ("RGB", "L") else img.convert("RGB")
    arr = np.asarray(img)
    if arr.dtype != np.uint8:
        arr = np.clip(arr, 0, 255).astype(np.uint8)
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if arr.ndim == 3 and arr.shape[2] == 4:
        arr = arr[:, :, :3]
    return Image.fromarray(arr)


def _thumb_luminance(img: Image.Image) -> np.ndarray:
    """Max-of-RGB luminance of a thumbnail (long side <= ``_THUMB``), lightly smoothed."""
    thumb = img
    if max(img.size) > _THUMB:
        scale = _THUMB / max(img.size)
        new = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
        thumb = img.resize(new, Image.Resampling.BOX, reducing_gap=2.0)
    arr = np.asarray(thumb)  # uint8: a channel max over uint8 planes is ~20x faster than float32
    lum = np.maximum(np.maximum(arr[..., 0], arr[..., 1]), arr[..., 2]) if arr.ndim == 3 else arr
    lum = lum.astype(np.float32)
    sigma = max(0.5, min(lum.shape) / 128.0)  # ~2 px at 256: kills JPEG/sensor noise in the border
    return ndimage.gaussian_filter(lum, sigma, mode="nearest")


def _thumb_mask(lum: np.ndarray, fill_holes: bool = True) -> np.ndarray | None:
    """FOV mask on the thumbnail, or ``None`` when the image has no dark background border.

    ``fill_holes=False`` skips filling holes, which cannot change the mask's bounding box.
    """
    if lum.size < 4:
        return None
    lo, hi = np.percentile(lum, [1.0, 99.0])
    if hi < 10.0 or lo > _DARK_MAX or lo > _DARK_FRAC * hi:
        return None  # all dark, or no dark pixels at all
    thr = lo + max(8.0, 0.1 * (hi - lo))
    dark = lum < thr
    # background = dark pixels connected to the image border (dark lesions/vessels inside stay FOV)
    labels, _ = ndimage.label(dark)
    edge = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
    edge = edge[edge > 0]
    background = np.isin(labels, edge)
    if background.mean() < _MIN_BG:
        return None
    fg_labels, n = ndimage.label(~background)
    if n == 0:
        return None
    sizes = np.bincount(fg_labels.ravel())
    sizes[0] = 0
    mask = fg_labels == int(sizes.argmax())  # drop specks and burnt-in text outside the FOV
    return ndimage.binary_fill_holes(mask) if fill_holes else mask


def _bbox_of(mask: np.ndarray) -> BBox | None:
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return None
    return int(rows[0]), int(cols[0]), int(rows[-1]) + 1, int(cols[-1]) + 1


def _scale_bbox(box: BBox, thumb_shape: tuple[int, int], full_hw: tuple[int, int]) -> BBox:
    (th, tw), (h, w) = thumb_shape, full_hw
    sy, sx = h / th, w / tw
    top, left, bottom, right = box
    return (
        max(0, int(np.floor(top * sy))),
        max(0, int(np.floor(left * sx))),
        min(h, int(np.ceil(bottom * sy))),
        min(w, int(np.ceil(right * sx))),
    )


def fov_bbox(arr: np.ndarray | Image.Image) -> BBox | None:
    """Bounding box ``(top, left, bottom, right)`` (bottom/right exclusive) of the field of view.

    Returns ``None`` when the image has no dark border (nothing to crop) or is entirely dark.
    """
    img = _as_pil(arr)
    lum = _thumb_luminance(img)
    mask = _thumb_mask(lum, fill_holes=False)
    if mask is None:
        return None
    box = _bbox_of(mask)
    if box is None:
        return None
    box = _scale_bbox(box, lum.shape, (img.height, img.width))
    if box == (0, 0, img.height, img.width):
        return None
    return box


def field_of_view_mask(arr: np.ndarray | Image.Image) -> np.ndarray:
    """Boolean ``H x W`` mask of the field of view (all ``True`` when there is no dark border)."""
    img = _as_pil(arr)
    lum = _thumb_luminance(img)
    mask = _thumb_mask(lum)
    if mask is None:
        return np.ones((img.height, img.width), dtype=bool)
    if mask.shape != (img.height, img.width):
        # upsample the thumbnail mask smoothly, then threshold at 0.5 (nearest would be blocky)
        soft = Image.fromarray(mask.astype(np.uint8) * 255).resize(
            (img.width, img.height), Image.Resampling.BILINEAR
        )
        mask = np.asarray(soft) >= 128
    return mask


# --------------------------------------------------------------------------- geometry


def _square_resize(img: Image.Image, size: int) -> Image.Image:
    """Resize keeping the aspect ratio so the long side is ``size``, pad centred with black."""
    w, h = img.size
    scale = size / max(w, h)
    new_w, new_h = max(1, round(w * scale)), max(1, round(h * scale))
    if (new_w, new_h) != (w, h):
        # reducing_gap: a fast integer box reduce first for big downsizing, then LANCZOS
        img = img.resize((new_w, new_h), Image.Resampling.LANCZOS, reducing_gap=3.0)
    if (new_w, new_h) == (size, size):
        return img
    canvas = Image.new("RGB", (size, size), (0, 0, 0))
    canvas.paste(img, ((size - new_w) // 2, (size - new_h) // 2))
    return canvas


# --------------------------------------------------------------------------- enhancement


def _clahe_luminance(arr: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """CLAHE on the L channel of CIELAB (a*, b* kept, so hue is preserved); outside FOV as is."""
    from skimage import color, exposure

    lab = color.rgb2lab(arr)
    lum = np.clip(lab[..., 0] / 100.0, 0.0, 1.0)
    lab[..., 0] = exposure.equalize_adapthist(lum, clip_limit=0.01) * 100.0
    return _lab_inside_fov(lab, arr, mask)


def _lab_inside_fov(lab: np.ndarray, arr: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """uint8 RGB of ``lab`` inside the FOV ``mask``; ``arr`` (the input) outside it."""
    from skimage import color

    with warnings.catch_warnings():  # out-of-gamut values are clipped, which is what we want
        warnings.simplefilter("ignore", UserWarning)
        rgb = color.lab2rgb(lab)
    out = np.clip(rgb * 255.0 + 0.5, 0, 255).astype(np.uint8)
    out[~mask] = arr[~mask]
    return out


#: CIELAB mean and standard deviation (L*, a*, b*) inside the FOV of a typical colour fundus
#: photograph at 224 px: per-image medians over 60 APTOS and 60 EyePACS photographs, rounded
#: (APTOS 41.6/26.7/44.2 +- 9.2/7.1/8.9, EyePACS 42.2/12.6/18.8 +- 12.2/6.5/7.4).
COLOUR_TARGET_MEAN = (42.0, 20.0, 31.0)
COLOUR_TARGET_STD = (10.5, 7.0, 8.0)


def _colour_standardise(arr: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Reinhard, Ashikhmin, Gooch & Shirley 2001 colour transfer inside the FOV.

    Each CIELAB channel of the FOV pixels is shifted and scaled to :data:`COLOUR_TARGET_MEAN` /
    :data:`COLOUR_TARGET_STD`, so white balance, exposure and saturation differences between
    cameras are removed while vessels and lesions keep their contrast to the background.
    Hand-written: scikit-image provides the colour spaces but no statistics transfer.
    """
    from skimage import color

    if mask.sum() < 16:
        return arr
    lab = color.rgb2lab(arr)
    inside = lab[mask]
    mean, std = inside.mean(axis=0), inside.std(axis=0)
    target_mean, target_std = np.asarray(COLOUR_TARGET_MEAN), np.asarray(COLOUR_TARGET_STD)
    lab[mask] = (inside - mean) / np.maximum(std, 1e-3) * target_std + target_mean
    lab[..., 0] = np.clip(lab[..., 0], 0.0, 100.0)
    return _lab_inside_fov(lab, arr, mask)


def _ben_graham(arr: np.ndarray, mask: np.ndarray, sigma: float) -> np.ndarray:
    """Ben Graham's preprocessing (Kaggle Diabetic Retinopathy Detection 2015, 1st place).

    ``out = 4 * img - 4 * GaussianBlur(img, sigma) + 128``: subtracting the local average colour
    removes illumination and pigmentation differences between cameras/patients and leaves local
    structure (vessels, lesions) around mid-grey. The original blurred the whole image, so the
    black border bled into the rim of the FOV (a bright ring) and it then kept only 90 % of the
    radius. Here the local average is taken over FOV pixels only (normalised convolution:
    ``blur(img * mask) / blur(mask)``), so no ring forms; as in the original, everything outside
    the (slightly shrunk) FOV is set to 128.
    """
    m = mask.astype(np.float32)
    img = arr.astype(np.float32)
    num = ndimage.gaussian_filter(img * m[..., None], (sigma, sigma, 0), mode="constant")
    den = ndimage.gaussian_filter(m, sigma, mode="constant")[..., None]
    local = num / np.maximum(den, 1e-3)
    out = np.clip(4.0 * img - 4.0 * local + 128.0 + 0.5, 0, 255).astype(np.uint8)
    margin = max(1.0, 0.01 * max(arr.shape[:2]))  # drop the anti-aliased rim pixels
    inner = ndimage.distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1] > margin
    out[~inner] = 128
    return out


# --------------------------------------------------------------------------- public entry point


def preprocess(
    img: Image.Image | np.ndarray, size: int, opts: FundusOptions | None = None
) -> np.ndarray:
    """Crop a fundus photo to its field of view, pad to square, resize; optional masking, colour
    standardisation, CLAHE and Ben Graham.

    Returns a ``size x size x 3`` uint8 array. With ``opts.crop=False`` the image is only padded to
    square and resized. Images without a dark border are not cropped.
    """
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    opts = opts or FundusOptions()
    pil = _as_pil(img)
    if pil.mode != "RGB":
        pil = pil.convert("RGB")
    if opts.crop:
        box = fov_bbox(pil)
        if box is not None:
            top, left, bottom, right = box
            pil = pil.crop((left, top, right, bottom))
    arr = np.array(_square_resize(pil, size), dtype=np.uint8)
    if not (opts.mask or opts.colour_std or opts.clahe or opts.ben_graham):
        return arr
    mask = field_of_view_mask(arr)
    if opts.mask:
        arr[~mask] = 0
    if opts.colour_std:
        arr = _colour_standardise(arr, mask)
    if opts.clahe:
        arr = _clahe_luminance(arr, mask)
    if opts.ben_graham:
        sigma = opts.ben_graham_sigma if opts.ben_graham_sigma is not None else size / 30.0
        arr = _ben_graham(arr, mask, max(0.1, float(sigma)))
    return arr
