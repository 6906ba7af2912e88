"""SYNTHETIC diabetic-retinopathy demo data set (what ``medtune demo`` trains on).

No DR data set ships in an installable package, so the demo draws grade-dependent lesions onto the
one real fundus photograph that does: ``skimage.data.retina()``. Lesions follow the International
Clinical Diabetic Retinopathy severity scale (see :data:`LESION_SPEC`):

* 0 no DR: no lesions;
* 1 mild NPDR: a few microaneurysms (tiny dark-red dots) only;
* 2 moderate NPDR: more microaneurysms, dot/blot haemorrhages, hard exudates (sharp yellow-white
  spots in clusters or circinate rings);
* 3 severe NPDR: many haemorrhages in all four quadrants, cotton-wool spots (pale, fuzzy patches);
* 4 PDR: grade 3 plus neovascular tufts (fine tortuous new vessels at the disc or on the arcades)
  and sometimes a boat-shaped preretinal haemorrhage.

Every image gets its own lesion placement, flip, rotation (any angle), zoom, shift, uneven
illumination, brightness/contrast/gamma/colour jitter and sensor noise. Lesions are drawn with soft
(logistic) edges at twice the output resolution and then downsampled, so they stay visible at
224 px. The images are NOT real patients and NOT clinically faithful: they exist to exercise the
pipeline and to show that a pretrained CNN learns to grade lesions far above chance.
"""

from __future__ import annotations

import csv
import functools
import io
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from medtune.errors import MedtuneError
from medtune.io import write_bytes, write_text

__all__ = [
    "GRADE_NAMES",
    "LESION_SPEC",
    "SyntheticSample",
    "make_synthetic_dr",
    "synthesize_image",
]

GRADE_NAMES = ("No DR", "Mild", "Moderate", "Severe", "Proliferative DR")

#: Lesion counts per grade as inclusive ``(min, max)`` ranges; each image draws uniformly.
#: ``exudate_clusters`` are groups of 4-14 hard exudates; ``preretinal`` is a 0/1 draw (p=0.5).
LESION_SPEC: dict[int, dict[str, tuple[int, int]]] = {
    0: {},
    1: {"microaneurysm": (3, 8)},
    2: {"microaneurysm": (8, 18), "haemorrhage": (3, 8), "exudate_clusters": (1, 3)},
    3: {
        "microaneurysm": (14, 28),
        "haemorrhage": (16, 28),  # at least 3 per quadrant
        "exudate_clusters": (2, 4),
        "cotton_wool": (3, 7),
    },
    4: {
        "microaneurysm": (14, 28),
        "haemorrhage": (16, 28),
        "exudate_clusters": (2, 4),
        "cotton_wool": (3, 7),
        "neovascular_tuft": (1, 3),
        "preretinal": (0, 1),
    },
}

# Landmarks of skimage.data.retina() in normalised (y, x) image coordinates (measured by hand).
_DISC = (0.455, 0.155)
_DISC_R = 0.055
_MACULA = (0.5, 0.5)
_REF = 224  # lesion sizes below are in output pixels at a 224 px image and scale with size


@dataclass(frozen=True)
class SyntheticSample:
    """One synthetic image: ``image`` (uint8 ``S x S x 3``), ``lesion_mask`` (float32 ``S x S``,
    lesion opacity 0-1), per-type lesion ``counts`` and the DR ``grade``."""

    image: np.ndarray
    lesion_mask: np.ndarray
    counts: dict[str, int]
    grade: int


@dataclass(frozen=True)
class _Base:
    rgb: np.ndarray  # float32 W x W x 3, the retina at working resolution
    fov: np.ndarray  # bool W x W
    center: tuple[float, float]  # FOV centre (y, x) in pixels
    radius: float  # FOV radius in pixels


@functools.lru_cache(maxsize=4)
def _base(work: int) -> _Base:
    """The real retina photo resized once to the working resolution, with its FOV."""
    from skimage import data

    from medtune.data.fundus import field_of_view_mask

    img = Image.fromarray(data.retina()).resize((work, work), Image.Resampling.LANCZOS)
    rgb = np.asarray(img, dtype=np.float32)
    fov = field_of_view_mask(img)
    yy, xx = np.nonzero(fov)
    center = (float(yy.mean()), float(xx.mean()))
    radius = float(np.sqrt(fov.sum() / np.pi))
    rgb.setflags(write=False)
    fov.setflags(write=False)
    return _Base(rgb, fov, center, radius)


# --------------------------------------------------------------------------- drawing primitives


class _Canvas:
    """Working-resolution float image plus a lesion-coverage map; blobs are composited in place."""

    def __init__(self, rgb: np.ndarray) -> None:
        self.rgb = rgb.copy()
        self.cover = np.zeros(rgb.shape[:2], dtype=np.float32)

    def blob(
        self,
        rng: np.random.Generator,
        cy: float,
        cx: float,
        ry: float,
        rx: float,
        *,
        mul: tuple[float, float, float],
        add: tuple[float, float, float],
        opacity: float,
        soft: float,
        irregular: float = 0.0,
        angle: float | None = None,
        flat_top: float | None = None,
    ) -> None:
        """Composite an (irregular) elliptical blob with a logistic edge of relative width ``soft``.

        Colour inside is ``pixel * mul + add`` (``mul`` < 1, ``add`` 0: darken, e.g. blood;
        ``add`` > 0: paint, e.g. exudate). ``flat_top`` cuts the blob at that fraction of ``ry``
        above the centre (the fluid level of a preretinal haemorrhage). Only the blob's bounding
        patch is touched (vectorised numpy over the patch).
        """
        h, w = self.cover.shape
        ext = max(ry, rx) * (1.0 + irregular) * (1.0 + 6.0 * soft) + 2.0
        y0, y1 = max(0, int(cy - ext)), min(h, int(cy + ext) + 2)
        x0, x1 = max(0, int(cx - ext)), min(w, int(cx + ext) + 2)
        if y0 >= y1 or x0 >= x1:
            return
        yy, xx = np.ogrid[y0:y1, x0:x1]
        dy, dx = (yy - cy).astype(np.float32), (xx - cx).astype(np.float32)
        a = rng.uniform(0, np.pi) if angle is None else angle
        u = (dx * np.cos(a) + dy * np.sin(a)) / rx
        v = (-dx * np.sin(a) + dy * np.cos(a)) / ry
        d = np.sqrt(u * u + v * v)
        if irregular > 0:  # wobbly outline: low-order harmonics of the polar angle
            theta = np.arctan2(v, u)
            f = np.ones_like(d)
            for k in (2, 3, 5):
                f += irregular * rng.uniform(0.2, 1.0) / k * np.cos(k * theta + rng.uniform(0, 6.3))
            d = d / np.maximum(f, 0.3)
        alpha = opacity / (1.0 + np.exp(np.clip((d - 1.0) / soft, -30, 30)))
        if flat_top is not None:
            alpha = alpha / (1.0 + np.exp(np.clip((-v - flat_top) / 0.05, -30, 30)))
        self._composite(alpha.astype(np.float32), (y0, y1, x0, x1), mul, add)

    def layer(
        self,
        alpha: np.ndarray,
        box: tuple[int, int, int, int],
        mul: tuple[float, float, float],
        add: tuple[float, float, float],
    ) -> None:
        """Composite a precomputed alpha patch (e.g. drawn curves) at ``box``."""
        self._composite(alpha, box, mul, add)

    def _composite(
        self,
        alpha: np.ndarray,
        box: tuple[int, int, int, int],
        mul: tuple[float, float, float],
        add: tuple[float, float, float],
    ) -> None:
        y0, y1, x0, x1 = box
        patch = self.rgb[y0:y1, x0:x1]
        target = patch * np.asarray(mul, np.float32) + np.asarray(add, np.float32)
        patch += (target - patch) * alpha[..., None]
        np.maximum(self.cover[y0:y1, x0:x1], alpha, out=self.cover[y0:y1, x0:x1])


def _points(
    rng: np.random.Generator,
    base: _Base,
    n: int,
    *,
    r_max: float = 0.88,
    quadrant: int | None = None,
    avoid_disc: bool = True,
    around: tuple[float, float] | None = None,
    spread: float = 0.0,
) -> np.ndarray:
    """``n`` random (y, x) points inside the FOV (optionally one quadrant, or near ``around``)."""
    work = base.fov.shape[0]
    out: list[np.ndarray] = []
    got = 0
    for _ in range(20):
        m = max(4 * n, 8)
        if around is None:
            r = base.radius * r_max * rng.uniform(0, 1, m) ** 0.6  # mild posterior-pole bias
            lo = 0.0 if quadrant is None else quadrant * np.pi / 2
            t = rng.uniform(lo, lo + (2 * np.pi if quadrant is None else np.pi / 2), m)
            pts = np.stack([base.center[0] + r * np.sin(t), base.center[1] + r * np.cos(t)], 1)
        else:
            pts = np.asarray(around) + rng.normal(0, spread, (m, 2))
        iy = np.clip(pts[:, 0].astype(int), 0, work - 1)
        ix = np.clip(pts[:, 1].astype(int), 0, work - 1)
        ok = base.fov[iy, ix]
        ok &= np.hypot(pts[:, 0] - base.center[0], pts[:, 1] - base.center[1]) < base.radius * 0.93
        if avoid_disc:
            dy, dx = pts[:, 0] - _DISC[0] * work, pts[:, 1] - _DISC[1] * work
            ok &= np.hypot(dy, dx) > _DISC_R * work * 1.3
        out.append(pts[ok])
        got += int(ok.sum())
        if got >= n:
            break
    return np.concatenate(out)[:n] if out else np.zeros((0, 2))


# --------------------------------------------------------------------------- lesions


def _microaneurysms(c: _Canvas, rng: np.random.Generator, base: _Base, n: int, s: float) -> None:
    for y, x in _points(rng, base, n, r_max=0.8):
        r = rng.uniform(0.9, 1.6) * s
        c.blob(
            rng,
            y,
            x,
            r,
            r,
            mul=(0.5, 0.16, 0.16),
            add=(0, 0, 0),
            opacity=rng.uniform(0.85, 1.0),
            soft=0.25,
        )


def _haemorrhages(
    c: _Canvas, rng: np.random.Generator, base: _Base, n: int, s: float, *, quadrants: bool
) -> None:
    pts = _points(rng, base, n)
    if quadrants:  # severe NPDR "4-2-1 rule": haemorrhages in all four quadrants
        pts = np.concatenate([_points(rng, base, 3, quadrant=q) for q in range(4)] + [pts])[:n]
    work = base.fov.shape[0]
    for y, x in pts:
        r = rng.uniform(2.0, 5.0) * s
        if rng.uniform() < 0.3:  # flame haemorrhage: elongated along the nerve fibres (radial)
            angle = float(np.arctan2(y - _DISC[0] * work, x - _DISC[1] * work))
            ry, rx = r * rng.uniform(0.35, 0.5), r * rng.uniform(1.3, 1.8)
        else:  # dot / blot
            angle, ry, rx = None, r * rng.uniform(0.75, 1.0), r
        dark = rng.uniform(0.45, 0.65)
        c.blob(
            rng,
            y,
            x,
            ry,
            rx,
            mul=(dark, dark * 0.3, dark * 0.3),
            add=(0, 0, 0),
            opacity=rng.uniform(0.8, 0.95),
            soft=0.15,
            irregular=0.25,
            angle=angle,
        )


def _exudates(c: _Canvas, rng: np.random.Generator, base: _Base, n: int, s: float) -> None:
    work = base.fov.shape[0]
    mac = (_MACULA[0] * work, _MACULA[1] * work)
    for centre in _points(rng, base, n, around=mac, spread=0.22 * base.radius):
        k = int(rng.integers(4, 15))
        if rng.uniform() < 0.5:  # circinate ring (partial) around a leaking focus
            ring = rng.uniform(6, 14) * s
            arc = rng.uniform(0.6, 1.6) * np.pi * np.sort(rng.uniform(0, 1, k))
            t = rng.uniform(0, 2 * np.pi) + arc
            pts = centre + np.stack([np.sin(t), np.cos(t)], 1) * ring + rng.normal(0, s, (k, 2))
        else:  # irregular cluster
            pts = centre + rng.normal(0, rng.uniform(3, 7) * s, (k, 2))
        for y, x in pts:
            if not base.fov[int(np.clip(y, 0, work - 1)), int(np.clip(x, 0, work - 1))]:
                continue
            r = rng.uniform(0.7, 2.0) * s
            c.blob(
                rng,
                y,
                x,
                r * rng.uniform(0.7, 1.0),
                r,
                mul=(0.15, 0.15, 0.15),
                add=(215.0, 200.0, 110.0),
                opacity=rng.uniform(0.85, 1.0),
                soft=0.07,
                irregular=0.2,
            )


def _cotton_wool(c: _Canvas, rng: np.random.Generator, base: _Base, n: int, s: float) -> None:
    work = base.fov.shape[0]
    arcade = ((_DISC[0] + _MACULA[0]) / 2 * work, (_DISC[1] + _MACULA[1]) / 2 * work)
    for y, x in _points(rng, base, n, around=arcade, spread=0.35 * base.radius):
        r = rng.uniform(3.5, 7.0) * s
        c.blob(
            rng,
            y,
            x,
            r * rng.uniform(0.55, 0.9),
            r,
            mul=(0.3, 0.3, 0.3),
            add=(178.0, 172.0, 150.0),
            opacity=rng.uniform(0.6, 0.85),
            soft=0.35,
            irregular=0.3,
        )


def _neovascular_tuft(c: _Canvas, rng: np.random.Generator, base: _Base, s: float) -> None:
    """A 'sea-fan' of fine tortuous new vessels at the disc (NVD) or on an arcade (NVE)."""
    work = base.fov.shape[0]
    if rng.uniform() < 0.5:
        centre = np.array([_DISC[0] * work, _DISC[1] * work]) + rng.normal(0, 4 * s, 2)
    else:
        side = rng.choice([-1.0, 1.0])
        t = rng.uniform(0.2, 0.9)
        centre = np.array(
            [
                base.center[0] + side * base.radius * rng.uniform(0.35, 0.5),
                work * (_DISC[1] + t * (_MACULA[1] - _DISC[1] + 0.1)),
            ]
        )
    half = int(30 * s) + 4
    box = (
        max(0, int(centre[0]) - half),
        min(work, int(centre[0]) + half),
        max(0, int(centre[1]) - half),
        min(work, int(centre[1]) + half),
    )
    layer = Image.new("L", (box[3] - box[2], box[1] - box[0]), 0)
    draw = ImageDraw.Draw(layer)
    origin = centre - np.array([box[0], box[2]])
    step = 0.6 * s
    for _ in range(int(rng.integers(8, 16))):
        n = int(rng.uniform(14, 34) * s / step)
        curl = rng.choice([-1.0, 1.0]) * rng.uniform(0.03, 0.15)
        heading = rng.uniform(0, 2 * np.pi) + np.cumsum(curl + rng.normal(0, 0.25, n))
        start = origin + rng.normal(0, 5 * s, 2)
        path = start + np.cumsum(step * np.stack([np.sin(heading), np.cos(heading)], 1), 0)
        draw.line([(float(x), float(y)) for y, x in path], fill=255, width=max(1, round(s)))
    alpha = np.asarray(layer.filter(ImageFilter.GaussianBlur(0.4 * s)), np.float32) / 255.0
    c.layer(alpha * rng.uniform(0.8, 0.95), box, mul=(0.62, 0.2, 0.2), add=(25.0, 0.0, 0.0))


def _preretinal(c: _Canvas, rng: np.random.Generator, base: _Base, s: float) -> None:
    for y, x in _points(rng, base, 1, r_max=0.6):
        r = rng.uniform(10, 18) * s
        c.blob(
            rng,
            y,
            x,
            r * rng.uniform(0.7, 0.9),
            r,
            mul=(0.5, 0.12, 0.12),
            add=(0, 0, 0),
            opacity=0.92,
            soft=0.08,
            angle=0.0,
            flat_top=rng.uniform(0.0, 0.4),
        )


def _draw_lesions(
    c: _Canvas, rng: np.random.Generator, base: _Base, grade: int, s: float
) -> dict[str, int]:
    spec = LESION_SPEC[grade]
    counts = {k: int(rng.integers(lo, hi + 1)) for k, (lo, hi) in spec.items()}
    if "preretinal" in counts:
        counts["preretinal"] = int(rng.uniform() < 0.5)
    _microaneurysms(c, rng, base, counts.get("microaneurysm", 0), s)
    _haemorrhages(c, rng, base, counts.get("haemorrhage", 0), s, quadrants=grade >= 3)
    _exudates(c, rng, base, counts.get("exudate_clusters", 0), s)
    _cotton_wool(c, rng, base, counts.get("cotton_wool", 0), s)
    for _ in range(counts.get("neovascular_tuft", 0)):
        _neovascular_tuft(c, rng, base, s)
    if counts.get("preretinal", 0):
        _preretinal(c, rng, base, s)
    return counts


# --------------------------------------------------------------------------- augmentation


def _affine(rng: np.random.Generator, work: int) -> tuple[float, ...]:
    """Inverse affine coefficients (output -> input): rotation, zoom and shift about the centre."""
    angle = rng.uniform(0, 2 * np.pi)
    zoom = rng.uniform(0.92, 1.12)
    ty, tx = rng.uniform(-0.03, 0.03, 2) * work
    c = (work - 1) / 2.0
    cos, sin = np.cos(angle) / zoom, np.sin(angle) / zoom
    # input = c + R/zoom @ (output - c - t)
    ox, oy = c + tx, c + ty
    return (cos, -sin, c - cos * ox + sin * oy, sin, cos, c - sin * ox - cos * oy)


def _photometric(rng: np.random.Generator, arr: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Uneven illumination, brightness/contrast/gamma/colour jitter and noise inside the FOV."""
    h, w = mask.shape
    x = arr * np.float32(1 / 255)
    yy = np.linspace(-0.5, 0.5, h, dtype=np.float32)[:, None]
    xx = np.linspace(-0.5, 0.5, w, dtype=np.float32)[None, :]
    g = rng.normal(0, 0.25, 2).astype(np.float32)
    x *= (1.0 + g[0] * yy + g[1] * xx)[..., None]  # illumination gradient
    inside = mask > 0.5
    mean = x[inside].mean(0) if inside.any() else x.reshape(-1, 3).mean(0)
    x = (x - mean) * np.float32(rng.uniform(0.8, 1.25)) + mean
    x *= (rng.uniform(0.78, 1.22) * rng.uniform(0.9, 1.1, 3)).astype(np.float32)
    x = np.clip(x, 0, 1) ** np.float32(rng.uniform(0.8, 1.25))
    noise = rng.standard_normal(x.shape, dtype=np.float32) * np.float32(rng.uniform(0.5, 3.0))
    x = x * 255.0 + noise
    return np.clip(x * mask[..., None] + 0.5, 0, 255).astype(np.uint8)


def _warp(
    layer: Image.Image, coeffs: tuple[float, ...], flip: bool, size: int, smooth: bool
) -> np.ndarray:
    """Flip, affine-warp at working resolution, then downsample to ``size`` (float32 array)."""
    if flip:
        layer = layer.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    # bilinear is 3x faster than bicubic and the 2x LANCZOS downsample hides the difference
    layer = layer.transform(
        layer.size, Image.Transform.AFFINE, coeffs, resample=Image.Resampling.BILINEAR
    )
    down = Image.Resampling.LANCZOS if smooth else Image.Resampling.BOX
    return np.asarray(layer.resize((size, size), down), dtype=np.float32)


# --------------------------------------------------------------------------- public API


def synthesize_image(
    grade: int, size: int = 224, seed: int | np.random.Generator = 0
) -> SyntheticSample:
    """Draw one synthetic fundus image of DR ``grade`` (0-4) at ``size`` px; deterministic."""
    if grade not in LESION_SPEC:
        raise ValueError(f"grade must be 0-4, got {grade}")
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    work = 2 * size
    base = _base(work)
    s = max(0.75, 2.0 * size / _REF)  # lesion scale in working pixels
    canvas = _Canvas(base.rgb)
    counts = _draw_lesions(canvas, rng, base, grade, s)

    img = Image.fromarray(np.clip(canvas.rgb + 0.5, 0, 255).astype(np.uint8))
    # lesion coverage and FOV travel together in one RGB image: one warp instead of two
    aux = np.zeros((work, work, 3), dtype=np.uint8)
    aux[..., 0] = np.clip(canvas.cover * 255 + 0.5, 0, 255)
    aux[..., 1] = base.fov * np.uint8(255)
    flip = rng.uniform() < 0.5  # left / right eye
    coeffs = _affine(rng, work)
    image = _warp(img, coeffs, flip, size, smooth=True)
    aux_small = _warp(Image.fromarray(aux), coeffs, flip, size, smooth=False) / 255.0
    image = _photometric(rng, image, aux_small[..., 1])
    lesion = aux_small[..., 0]
    return SyntheticSample(image=image, lesion_mask=lesion, counts=counts, grade=grade)


_README = """SYNTHETIC diabetic retinopathy demo data set - NOT real patient data.

Made by medtune.data.synthetic.make_synthetic_dr(n_per_grade={n}, size={size}, seed={seed}).
Each image is the single public-domain fundus photograph shipped with scikit-image
(skimage.data.retina()) with computer-drawn lesions following the International Clinical
Diabetic Retinopathy severity scale (0 no DR, 1 mild, 2 moderate, 3 severe NPDR, 4 proliferative),
then randomly flipped, rotated, zoomed, shifted and colour/brightness/contrast jittered.

labels.csv: image (path relative to this folder), label (DR grade 0-4).
Use it only to try the medtune pipeline; results on it say nothing about clinical performance.
"""


def make_synthetic_dr(
    out_dir: str | Path,
    n_per_grade: int = 40,
    size: int = 224,
    seed: int = 0,
    *,
    progress: bool = False,
) -> Path:
    """Write ``n_per_grade`` SYNTHETIC images per DR grade 0-4 and ``labels.csv``; return out_dir.

    Layout: ``out_dir/images/g{grade}_{i:04d}.png``, ``out_dir/labels.csv`` (``image,label``) and
    ``out_dir/README.txt``. Deterministic in ``seed``; ``labels.csv`` is written last, atomically.
    """
    if n_per_grade < 1:
        raise MedtuneError(f"n_per_grade must be >= 1, got {n_per_grade}")
    if size < 16:
        raise MedtuneError(f"size must be >= 16 pixels, got {size}")
    out = Path(out_dir)
    images = out / "images"
    try:
        images.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise MedtuneError(f"{out}: cannot create the demo data folder ({exc})") from exc
    seeds = np.random.SeedSequence(seed).spawn(len(LESION_SPEC) * n_per_grade)
    rows: list[tuple[str, int]] = []
    for grade in LESION_SPEC:
        for i in range(n_per_grade):
            rng = np.random.default_rng(seeds[grade * n_per_grade + i])
            sample = synthesize_image(grade, size, rng)
            rel = f"images/g{grade}_{i:04d}.png"
            Image.fromarray(sample.image).save(out / rel, compress_level=3)
            rows.append((rel, grade))
        if progress:
            print(f"synthetic DR: grade {grade} done ({n_per_grade} images)", file=sys.stderr)
    write_text(out / "README.txt", _README.format(n=n_per_grade, size=size, seed=seed))
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["image", "label"])
    writer.writerows(rows)
    write_bytes(out / "labels.csv", buf.getvalue().encode("utf-8"))
    return out
