"""The image-quality gate: each rule on made-up photographs, size independence, overrides."""

from __future__ import annotations

import dataclasses
import functools

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFilter

from medtune.evaluation.quality import (
    QUALITY_CODES,
    QualityThresholds,
    QualityVerdict,
    assess_quality,
    quality_measures,
)

ALL_MEASURES = {
    "frame_level",
    "frame_spread",
    "fov_found",
    "fov_fraction",
    "corner_ratio",
    "fov_solidity",
    "brightness",
    "saturation",
    "clipped_share",
    "red_blue",
    "red_green",
    "sharpness",
    "coarse_sharpness",
}


@functools.lru_cache(maxsize=4)
def retina(size: int = 512) -> Image.Image:
    """The real fundus photograph shipped with scikit-image, resized to ``size`` px."""
    from skimage import data

    return Image.fromarray(data.retina()).resize((size, size), Image.Resampling.LANCZOS)


def blurred(img: Image.Image, sigma_per_512: float = 4.0) -> Image.Image:
    return img.filter(ImageFilter.GaussianBlur(sigma_per_512 * max(img.size) / 512))


def scaled(img: Image.Image, factor: float) -> Image.Image:
    arr = np.asarray(img, dtype=np.float32) * factor
    return Image.fromarray(np.clip(arr + 0.5, 0, 255).astype(np.uint8))


def document() -> Image.Image:
    page = Image.new("RGB", (300, 400), (250, 250, 247))
    draw = ImageDraw.Draw(page)
    for y in range(30, 370, 14):
        for x in range(25, 260, 45):
            draw.rectangle((x, y, x + 35, y + 6), fill=(20, 20, 20))
    return page


def synthetic(grade: int, size: int = 512) -> Image.Image:
    from medtune.data.synthetic import synthesize_image

    return Image.fromarray(synthesize_image(grade, size, seed=grade).image)


def skimage_photo(name: str) -> Image.Image:
    from skimage import data

    return Image.fromarray(getattr(data, name)())


def test_real_fundus_photograph_is_gradable_with_every_measure() -> None:
    verdict = assess_quality(retina())
    assert isinstance(verdict, QualityVerdict)
    assert (verdict.gradable, verdict.code, verdict.reason) == (True, "ok", None)
    assert set(verdict.measures) == ALL_MEASURES
    assert all(isinstance(v, float) and np.isfinite(v) for v in verdict.measures.values())
    assert verdict.measures["fov_found"] == 1.0


def test_synthetic_fundus_photographs_are_gradable() -> None:
    from medtune.data.synthetic import synthesize_image

    for grade in (0, 4):
        img = Image.fromarray(synthesize_image(grade, 224, seed=grade).image)
        assert assess_quality(img).code == "ok", grade


@pytest.mark.parametrize(
    ("make", "code"),
    [
        (blurred, "blur"),
        (lambda im: scaled(im, 0.15), "dark"),
        (lambda im: scaled(im, 4.0), "bright"),
        (lambda im: Image.fromarray(np.asarray(im)[..., ::-1]), "not_fundus"),  # BGR mix-up
        (lambda im: im.convert("L").convert("RGB"), "not_fundus"),  # grey-scale (red-free)
    ],
    ids=["blurred", "dark", "overexposed", "bgr", "greyscale"],
)
def test_each_defect_of_a_fundus_photograph_gets_its_code(make, code: str) -> None:
    verdict = assess_quality(make(retina()))
    assert (verdict.gradable, verdict.code, verdict.reason) == (False, code, QUALITY_CODES[code])


@pytest.mark.parametrize(
    ("name", "code"),
    [("chelsea", "not_fundus"), ("coffee", "not_fundus"), ("document", "not_fundus")],
)
def test_photographs_that_are_not_fundus_are_rejected_as_such(name: str, code: str) -> None:
    from skimage import data

    img = document() if name == "document" else Image.fromarray(getattr(data, name)())
    verdict = assess_quality(img)
    assert verdict.code == code
    assert verdict.reason == "not a colour fundus photograph"
    assert verdict.measures["corner_ratio"] > QualityThresholds().max_corner_ratio


def test_a_shadowed_field_of_view_is_partial() -> None:
    arr = np.asarray(retina()).copy()
    yy, xx = np.mgrid[:512, :512]
    lid = (yy**2 + (xx - 256) ** 2) < 200**2  # an eyelid's shadow over the top of the retina
    arr[lid] //= 12
    verdict = assess_quality(Image.fromarray(arr))
    assert verdict.code == "partial_fov"
    assert verdict.measures["fov_solidity"] < QualityThresholds().min_solidity


@pytest.mark.parametrize("level", [0, 128, 255])
def test_blank_frames_have_no_field_of_view(level: int) -> None:
    verdict = assess_quality(Image.new("RGB", (320, 240), (level, level, level)))
    assert (verdict.gradable, verdict.code) == (False, "no_fov")
    assert verdict.reason == "no field of view found"
    assert "sharpness" not in verdict.measures  # later rules did not run


def test_lens_cap_sensor_noise_has_no_field_of_view() -> None:
    rng = np.random.default_rng(0)
    noise = np.clip(rng.normal(8, 6, (240, 320, 3)), 0, 255).astype(np.uint8)
    assert assess_quality(Image.fromarray(noise)).code == "no_fov"


def test_verdict_and_sharpness_do_not_depend_on_pixel_size() -> None:
    good = [assess_quality(retina(s)) for s in (224, 512, 1024)]
    assert [v.code for v in good] == ["ok", "ok", "ok"]
    sharp = [v.measures["sharpness"] for v in good]
    assert max(sharp) - min(sharp) < 0.05, sharp
    bad = [assess_quality(blurred(retina(s))) for s in (224, 512, 1024)]
    assert [v.code for v in bad] == ["blur", "blur", "blur"]


@pytest.mark.parametrize("source", ["retina", "synthetic"])
def test_blur_verdict_is_monotonic_in_blur_radius(source: str) -> None:
    # Heavy blur leaves both the finest and the next band to quantisation noise, whose ratio
    # (``sharpness``) rises again (radius 20 px per 512 px passed as "ok" before the
    # fine-to-coarse rule); once rejected, a harder blur must stay rejected.
    img = retina() if source == "retina" else synthetic(2)
    radii = (0, 1, 2, 3, 4, 5, 6, 8, 10, 12, 15, 20, 25, 30)
    codes = [
        assess_quality(img.filter(ImageFilter.GaussianBlur(r)) if r else img).code for r in radii
    ]
    assert codes[0] == "ok", codes
    first = codes.index("blur")
    assert set(codes[first:]) == {"blur"}, dict(zip(radii, codes, strict=True))
    assert radii[first] <= 5, dict(zip(radii, codes, strict=True))


def test_exposure_is_judged_before_blur_and_shape_before_exposure() -> None:
    assert assess_quality(scaled(blurred(retina()), 0.15)).code == "dark"
    assert assess_quality(scaled(document(), 1.5)).code == "not_fundus"  # white page, clipped


def test_thresholds_are_overridable_and_frozen() -> None:
    soft = dataclasses.replace(QualityThresholds(), min_sharpness=0.1)
    assert assess_quality(blurred(retina()), thresholds=soft).code == "ok"
    strict = dataclasses.replace(QualityThresholds(), max_brightness=50.0)
    assert assess_quality(retina(), thresholds=strict).code == "bright"
    with pytest.raises(dataclasses.FrozenInstanceError):
        QualityThresholds().min_sharpness = 0.0  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        assess_quality(retina()).code = "ok"  # type: ignore[misc]


def test_quality_measures_computes_everything_even_for_a_blank_frame() -> None:
    m = quality_measures(Image.new("L", (64, 48), 0))  # grey-scale mode is accepted
    assert set(m) == ALL_MEASURES


def test_non_image_input_is_a_type_error() -> None:
    with pytest.raises(TypeError, match="uint8 H x W x 3 array or a PIL image, got list"):
        assess_quality([[0, 0, 0]])  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="got float32 array"):
        assess_quality(np.zeros((8, 8, 3), dtype=np.float32))


# ------------------------------------------------ the gate on the working-size network input

WORKING_CASES = [
    ("sharp", lambda: retina(), "ok"),
    ("blurred", lambda: blurred(retina()), "blur"),
    ("dark", lambda: scaled(retina(), 0.15), "dark"),
    ("overexposed", lambda: scaled(retina(), 4.0), "bright"),
    ("bgr", lambda: Image.fromarray(np.asarray(retina())[..., ::-1]), "not_fundus"),
    ("greyscale", lambda: retina().convert("L").convert("RGB"), "not_fundus"),
    ("synthetic-dr", lambda: synthetic(3), "ok"),
    ("synthetic-dr-blurred", lambda: blurred(synthetic(3)), "blur"),
    ("cat", lambda: skimage_photo("chelsea"), "not_fundus"),
    ("coffee", lambda: skimage_photo("coffee"), "not_fundus"),
    ("document", document, "not_fundus"),
    ("black", lambda: Image.new("RGB", (320, 240)), "no_fov"),
    ("white", lambda: Image.new("RGB", (320, 240), (255, 255, 255)), "no_fov"),
]


@pytest.mark.parametrize(("make", "code"), [c[1:] for c in WORKING_CASES],
                         ids=[c[0] for c in WORKING_CASES])  # fmt: skip
@pytest.mark.parametrize("size", [224, 260])
def test_gate_on_the_prepared_network_input_gives_the_photographs_verdict(make, code, size) -> None:
    """What predict feeds the gate (prepare_image: FOV crop, black square padding, model size)
    gets the verdict the photograph gets, and the same as the photograph as a PIL image."""
    from medtune.data.preprocess import prepare_image

    photo = make()
    prepared = prepare_image(photo, size)
    assert prepared.shape == (size, size, 3)
    on_input, on_photo = assess_quality(prepared), assess_quality(photo)
    assert on_input.code == on_photo.code == code
    assert set(on_input.measures) == set(on_photo.measures)


def test_square_padding_is_not_part_of_the_photograph() -> None:
    """A uniform frame padded square with black (prepare_image, crop or not) stays 'no field of
    view': the padding's dark rows would otherwise make a bright frame with a dark border."""
    from medtune.data.fundus import FundusOptions
    from medtune.data.preprocess import prepare_image

    for crop in (True, False):
        grey = prepare_image(Image.new("RGB", (320, 160), (128, 128, 128)), 224,
                             FundusOptions(crop=crop))  # fmt: skip
        assert grey[:40].max() == 0  # padded above and below
        assert assess_quality(grey).code == "no_fov"


def test_working_array_drops_padding_and_reduces_large_inputs() -> None:
    from medtune.evaluation.quality import WORK_MAX_SIDE, working_array

    arr = np.zeros((100, 100, 3), np.uint8)
    arr[20:80, 10:90] = 200
    assert working_array(arr).shape == (60, 80, 3)
    assert working_array(np.zeros((30, 40, 3), np.uint8)).shape == (30, 40, 3)  # all black: kept
    big = working_array(Image.new("RGB", (1024, 512), (90, 40, 20)))
    assert big.shape == (WORK_MAX_SIDE // 2, WORK_MAX_SIDE, 3)
    assert working_array(np.full((8, 8), 7, np.uint8)).shape == (8, 8, 3)  # grey to RGB


def test_histogram_percentiles_equal_numpys() -> None:
    from medtune.data.fundus import histogram_percentiles

    rng = np.random.default_rng(0)
    values = rng.integers(0, 256, (37, 53), dtype=np.uint8)
    mask = rng.random((37, 53)) < 0.3
    qs = (0.0, 1.0, 37.5, 50.0, 99.0, 100.0)
    assert np.allclose(histogram_percentiles(values, qs), np.percentile(values, qs))
    assert np.allclose(histogram_percentiles(values, qs, mask), np.percentile(values[mask], qs))
    assert np.isnan(histogram_percentiles(values, (50.0,), np.zeros_like(mask))).all()


def test_gate_is_exported_lazily_from_the_evaluation_package() -> None:
    import medtune.evaluation as evaluation

    assert evaluation.assess_quality is assess_quality
    assert "QualityThresholds" in evaluation.__all__


def test_models_smaller_than_224_px_are_judged_at_224() -> None:
    from medtune.data.preprocess import prepare_image
    from medtune.evaluation.quality import MIN_WORKING_SIDE, working_side

    assert working_side(48) == MIN_WORKING_SIDE == 224 and working_side(260) == 260
    sharp = retina()
    assert assess_quality(prepare_image(sharp, 48)).code == "blur"  # too few pixels to judge
    assert assess_quality(prepare_image(sharp, working_side(48))).code == "ok"
    assert assess_quality(prepare_image(blurred(sharp), working_side(48))).code == "blur"
