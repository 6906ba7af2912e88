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
* ``scale``: zoom about the centre by U(0.9, 1.1) (field-of-view diameter differences);

and the artefacts of a poor fundus photograph (GDRNet's "fundus visual-artifact augmentation",
Che et al. 2023, MICCAI, with GDRBench: halo, hole, spot), each with probability 0.5:

* ``halo``: a bright tinted ring at the rim of the field of view (light scattered at the edge of
  a small pupil): ``+ a * tint / (1 + exp(-(r - r0) / w))``, ``a`` ~ U(20, 70) grey levels,
  ``r0`` ~ U(0.55, 0.85) and ``w`` ~ U(0.05, 0.15) of the half side, one of three tints;
* ``hole``: a large soft under-exposed region (uneven illumination): pixels x ``1 - d * g``,
  ``g`` a Gaussian of width U(0.25, 0.5) half sides about a centre within 0.3 of the middle,
  depth ``d`` ~ U(0.2, 0.5);
* ``spot``: 3-8 bright diffuse spots (dust on the lens, reflections): Gaussians of width
  U(0.03, 0.08) half sides and height U(20, 60) grey levels, wider and fainter than hard
  exudates (a lesion) so that they do not teach the network to ignore those.

Groups: ``colour`` (brightness, contrast, gamma, colour-temperature), ``camera`` (blur, jpeg,
scale), ``site`` (those seven) and ``artefact`` (halo, hole, spot). The ranges are moderate, so
lesions stay visible, and were set once, not tuned on the cross-site benchmark
(``docs/generalisation.md`` measures each group). Operations come from
``torchvision.transforms.v2`` and Pillow (JPEG); the colour-temperature gain and the artefacts
are written here because neither has a white-balance operation, and the artefact transforms
of general libraries (albumentations' sun flare, shadow and spatter) model outdoor scenes, not
a fundus camera's circular field of view.
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

__all__ = [
    "ARTEFACTS",
    "AUGMENTATIONS",
    "AUGMENT_GROUPS",
    "SITE_AUGMENTATIONS",
    "augment_site",
    "resolve_augment",
]

SITE_AUGMENTATIONS = (
    "brightness",
    "contrast",
    "gamma",
    "colour-temperature",
    "blur",
    "jpeg",
    "scale",
)
#: Fundus photograph artefacts (GDRNet's halo, hole and spot; not in the ``site`` group).
ARTEFACTS = ("halo", "hole", "spot")
#: Every name, in application order.
AUGMENTATIONS = SITE_AUGMENTATIONS + ARTEFACTS
AUGMENT_GROUPS = {
    "colour": ("brightness", "contrast", "gamma", "colour-temperature"),
    "camera": ("blur", "jpeg", "scale"),
    "site": SITE_AUGMENTATIONS,
    "artefact": ARTEFACTS,
}
#: Halo tints (RGB gains): warm white, yellow-green, cyan; set once, not tuned.
HALO_TINTS = ((1.0, 0.95, 0.85), (0.75, 1.0, 0.6), (0.55, 0.9, 1.0))


def resolve_augment(names: Iterable[str] | str | None) -> tuple[str, ...]:
    """Expand names and groups into augmentations, in the order :func:`augment_site` applies them.

    Parameters
    ----------
    names : iterable of str, a comma-separated str, or None
        Augmentation names (:data:`AUGMENTATIONS`), groups (:data:`AUGMENT_GROUPS`) or
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
        elif name in AUGMENTATIONS:
            chosen.add(name)
        else:
            known = ", ".join([*AUGMENT_GROUPS, *AUGMENTATIONS])
            raise MedtuneError(f"augmentation {raw!r} is unknown; use none or some of: {known}")
    return tuple(n for n in AUGMENTATIONS if n in chosen)


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
    img = _artefacts(img, names, rng)  # in the optics: before the sensor's blur and JPEG
    if "blur" in names and rng.random() < 0.5:
        sigma = float(rng.uniform(0.002, 0.015)) * img.shape[-1]
        kernel = 2 * math.ceil(3 * sigma) + 1
        img = TF.gaussian_blur(img, [kernel, kernel], [sigma, sigma])
    if "jpeg" in names and rng.random() < 0.5:
        img = _jpeg(img, int(rng.integers(30, 96)))
    return img * (keep >= 128).to(img.dtype)


def _artefacts(img: torch.Tensor, names: tuple[str, ...], rng: np.random.Generator) -> torch.Tensor:
    """Halo, hole and spots (each drawn with probability 0.5), in grey levels of ``img``."""
    chosen = [n for n in ARTEFACTS if n in names and rng.random() < 0.5]
    if not chosen:
        return img
    h, w = img.shape[-2:]
    yy = torch.linspace(-1.0, 1.0, h).view(h, 1)  # half sides from the centre
    xx = torch.linspace(-1.0, 1.0, w).view(1, w)
    out = img.float()
    if "hole" in chosen:
        cy, cx = rng.uniform(-0.3, 0.3, size=2)
        width, depth = rng.uniform(0.25, 0.5), rng.uniform(0.2, 0.5)
        out = out * (1.0 - depth * _bump(yy, xx, cy, cx, width))
    if "halo" in chosen:
        radius = torch.sqrt(yy**2 + xx**2)
        ring = torch.sigmoid((radius - rng.uniform(0.55, 0.85)) / rng.uniform(0.05, 0.15))
        tint = torch.tensor(HALO_TINTS[int(rng.integers(len(HALO_TINTS)))]).view(3, 1, 1)
        out = out + rng.uniform(20.0, 70.0) * tint * ring
    if "spot" in chosen:
        for _ in range(int(rng.integers(3, 9))):
            cy, cx = rng.uniform(-0.8, 0.8, size=2)
            width, height = rng.uniform(0.03, 0.08), rng.uniform(20.0, 60.0)
            out = out + height * _bump(yy, xx, cy, cx, width)
    return out.round_().clamp_(0, 255).to(torch.uint8)


def _bump(yy: torch.Tensor, xx: torch.Tensor, cy: float, cx: float, width: float) -> torch.Tensor:
    """A unit-height Gaussian centred at (cy, cx) on the (H, 1) x (1, W) grid, in half sides."""
    return torch.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * width**2))


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
