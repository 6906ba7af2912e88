"""Augmentation against site shift: what differs between cameras and clinics, inside the FOV.

Another clinic's photographs differ from the training site's in exposure, contrast, tone curve,
white balance, focus, compression and how large the field of view (FOV) sits in the frame.
:func:`augment_site` draws one random change of each chosen kind for a training image, applies
it, and keeps everything outside the image's FOV black, so the network never learns from a
changed border. The FOV mask is detected once per image when the cache is prepared
(``fov.npy``), not every epoch.

Each name and its change, drawn per image:

* ``brightness``: pixel values x U(0.75, 1.25);
* ``contrast``: blend with the mean grey, factor U(0.75, 1.25);
* ``gamma``: tone curve ``x ** g``, log g ~ U(log 0.7, log 1.4);
* ``colour-temperature``: red x (1 + t), blue x (1 - t), t ~ U(-0.1, 0.1) (warmer / cooler);
* ``blur``: with probability 0.5, Gaussian blur with sigma U(0.2, 1.5) % of the side;
* ``jpeg``: with probability 0.5, JPEG re-compression at quality U(30, 95);
* ``scale``: zoom about the centre by U(0.9, 1.1) (field-of-view diameter differences).

Groups: ``colour`` (brightness, contrast, gamma, colour-temperature), ``camera`` (blur, jpeg,
scale) and ``site`` (all seven). The ranges are moderate, so lesions stay visible, and were set
once, not tuned on the cross-site benchmark (``docs/generalisation.md`` measures each group).
Operations come from ``torchvision.transforms.v2`` and Pillow (JPEG); the colour-temperature
gain is written here because neither has a white-balance operation.
"""

from __future__ import annotations

import io
import math
from collections.abc import Iterable

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image

from medtune.data.fundus import field_of_view_mask
from medtune.errors import MedtuneError

__all__ = ["AUGMENT_GROUPS", "SITE_AUGMENTATIONS", "augment_site", "resolve_augment"]

SITE_AUGMENTATIONS = (
    "brightness",
    "contrast",
    "gamma",
    "colour-temperature",
    "blur",
    "jpeg",
    "scale",
)
AUGMENT_GROUPS = {
    "colour": ("brightness", "contrast", "gamma", "colour-temperature"),
    "camera": ("blur", "jpeg", "scale"),
    "site": SITE_AUGMENTATIONS,
}


def resolve_augment(names: Iterable[str] | str | None) -> tuple[str, ...]:
    """Expand names and groups into augmentations, in the order :func:`augment_site` applies them.

    Parameters
    ----------
    names : iterable of str, a comma-separated str, or None
        Augmentation names (:data:`SITE_AUGMENTATIONS`), groups (:data:`AUGMENT_GROUPS`) or
        ``"none"``.

    Returns
    -------
    tuple of str
        Distinct augmentation names in application order; empty for none.

    Raises
    ------
    MedtuneError
        For an unknown name (the message lists the known ones).
    """
    if isinstance(names, str):
        names = names.split(",")
    chosen: set[str] = set()
    for raw in names or ():
        name = raw.strip().replace("_", "-").replace("color", "colour")
        if name in ("", "none"):
            continue
        if name in AUGMENT_GROUPS:
            chosen.update(AUGMENT_GROUPS[name])
        elif name in SITE_AUGMENTATIONS:
            chosen.add(name)
        else:
            known = ", ".join([*AUGMENT_GROUPS, *SITE_AUGMENTATIONS])
            raise MedtuneError(f"augmentation {raw!r} is unknown; use none or some of: {known}")
    return tuple(n for n in SITE_AUGMENTATIONS if n in chosen)


def augment_site(
    image: torch.Tensor,
    names: tuple[str, ...],
    rng: np.random.Generator,
    fov: torch.Tensor | np.ndarray | None = None,
) -> torch.Tensor:
    """Apply one random draw of each named site augmentation inside the field of view.

    Parameters
    ----------
    image : torch.Tensor
        uint8, shape (3, H, W): a prepared training image.
    names : tuple of str
        Output of :func:`resolve_augment`; empty returns ``image`` unchanged.
    rng : numpy.random.Generator
        Source of every random draw (seeded by the dataset, so runs repeat).
    fov : torch.Tensor or numpy.ndarray, optional
        bool (H, W): ``image``'s field-of-view mask, e.g. stored once per image by the prepared
        cache (:meth:`medtune.data.cache.PreparedCache.fov_mask`, turned with the image). When
        omitted it is computed here with :func:`medtune.data.fundus.field_of_view_mask`; the
        result is the same.

    Returns
    -------
    torch.Tensor
        uint8, shape (3, H, W); pixels outside the FOV are black (with ``scale``, the FOV zoomed
        with the image: bilinear, threshold 0.5).
    """
    if not names:
        return image
    if fov is None:
        fov = field_of_view_mask(image.permute(1, 2, 0).numpy())
    keep = torch.as_tensor(np.asarray(fov, dtype=np.uint8)).mul_(255).unsqueeze(0)
    img = image
    if "scale" in names:
        zoom = float(rng.uniform(0.9, 1.1))
        # image and mask in one call (channels are resampled independently: same result as two)
        zoomed = _zoom(torch.cat([img, keep]), zoom)
        img, keep = zoomed[:3], zoomed[3:]
    if "brightness" in names:
        img = TF.adjust_brightness(img, float(rng.uniform(0.75, 1.25)))
    if "contrast" in names:
        img = TF.adjust_contrast(img, float(rng.uniform(0.75, 1.25)))
    if "gamma" in names:
        img = TF.adjust_gamma(img, float(math.exp(rng.uniform(math.log(0.7), math.log(1.4)))))
    if "colour-temperature" in names:
        img = _colour_temperature(img, float(rng.uniform(-0.1, 0.1)))
    if "blur" in names and rng.random() < 0.5:
        sigma = float(rng.uniform(0.002, 0.015)) * img.shape[-1]
        kernel = 2 * math.ceil(3 * sigma) + 1
        img = TF.gaussian_blur(img, [kernel, kernel], [sigma, sigma])
    if "jpeg" in names and rng.random() < 0.5:
        img = _jpeg(img, int(rng.integers(30, 96)))
    return img * (keep >= 128).to(img.dtype)


def _zoom(img: torch.Tensor, zoom: float) -> torch.Tensor:
    """Zoom about the centre (bilinear; outside the source is black)."""
    return TF.affine(
        img,
        angle=0.0,
        translate=[0, 0],
        scale=zoom,
        shear=[0.0, 0.0],
        interpolation=TF.InterpolationMode.BILINEAR,
    )


def _jpeg(img: torch.Tensor, quality: int) -> torch.Tensor:
    """JPEG re-compression through Pillow (torchvision's encoders are deprecated since 0.29)."""
    buffer = io.BytesIO()
    Image.fromarray(img.permute(1, 2, 0).numpy()).save(buffer, format="JPEG", quality=quality)
    buffer.seek(0)
    with Image.open(buffer) as decoded:
        return torch.from_numpy(np.array(decoded.convert("RGB"))).permute(2, 0, 1).contiguous()


def _colour_temperature(img: torch.Tensor, t: float) -> torch.Tensor:
    """Warmer (t > 0) or cooler (t < 0) white balance: red x (1 + t), blue x (1 - t).

    Hand-written: torchvision (and Pillow) have no white-balance operation.
    """
    gains = torch.tensor([1.0 + t, 1.0, 1.0 - t]).view(3, 1, 1)
    return (img.float() * gains).round_().clamp_(0, 255).to(torch.uint8)
