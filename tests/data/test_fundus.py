"""Tests for medtune.data.fundus (small synthetic images; fast)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from skimage import color, data

from medtune.data.fundus import FundusOptions, field_of_view_mask, fov_bbox, preprocess

FUNDUS_RGB = (180, 80, 40)


def _fake_fundus(h: int = 300, w: int = 400, cy: int = 150, cx: int = 230, r: int = 100):
    """A reddish disc with dark 'vessels' and a dark 'lesion' on a noisy black background."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:h, 0:w]
    disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
    img = rng.normal(4, 3, (h, w, 3))
    texture = rng.normal(0, 8, (h, w, 3))
    img[disc] = np.asarray(FUNDUS_RGB) + texture[disc]
    vessel = disc & (np.abs(yy - cy - 0.3 * (xx - cx)) < 2)
    img[vessel] = (90, 20, 15)
    img[disc & ((yy - cy - 30) ** 2 + (xx - cx + 20) ** 2 < 64)] = (10, 5, 5)
    return np.clip(img, 0, 255).astype(np.uint8), disc


def test_bbox_and_mask_of_offset_disc() -> None:
    arr, disc = _fake_fundus()
    box = fov_bbox(arr)
    assert box is not None
    assert np.allclose(box, (50, 130, 251, 331), atol=4)
    mask = field_of_view_mask(arr)
    assert mask.shape == disc.shape
    assert (mask == disc).mean() > 0.98  # dark lesion inside the disc stays in the FOV


def test_crop_square_and_colour_preserved() -> None:
    arr, disc = _fake_fundus()
    out = preprocess(Image.fromarray(arr), 64)
    assert out.shape == (64, 64, 3) and out.dtype == np.uint8
    assert out[:3, :3].max() < 20  # corners are background
    assert out[32, 2].mean() > 60 and out[2, 32].mean() > 60  # the disc touches all four sides
    inside = field_of_view_mask(out)
    before = arr[disc].mean(0)
    after = out[inside].mean(0)
    assert np.abs(after - before).max() < 8


def test_crop_false_only_pads_and_resizes() -> None:
    arr = np.full((50, 100, 3), 200, np.uint8)
    out = preprocess(arr, 40, FundusOptions(crop=False))
    assert out.shape == (40, 40, 3)
    assert out[:8].max() == 0 and out[-8:].max() == 0  # padding above and below
    assert out[12:28].min() > 190


def test_ben_graham_centres_fov_at_128() -> None:
    arr, _ = _fake_fundus()
    out = preprocess(arr, 96, FundusOptions(ben_graham=True))
    inside = field_of_view_mask(preprocess(arr, 96))
    assert abs(float(out[inside].mean()) - 128) < 10
    assert (out[:2, :2] == 128).all()  # outside the FOV is mid-grey, as in the original


def test_clahe_keeps_hue() -> None:
    img = Image.fromarray(data.retina()).resize((96, 96))
    plain = preprocess(img, 96)
    enhanced = preprocess(img, 96, FundusOptions(clahe=True))
    inside = field_of_view_mask(plain)
    hue_before = np.median(color.rgb2hsv(plain)[..., 0][inside])
    hue_after = np.median(color.rgb2hsv(enhanced)[..., 0][inside])
    assert abs(hue_before - hue_after) < 0.03
    assert not np.array_equal(plain, enhanced)


def test_image_without_black_border_is_left_intact() -> None:
    full = data.retina()[400:1000, 300:1100]  # inside the FOV only: no dark border
    img = Image.fromarray(full).resize((80, 60))
    assert fov_bbox(img) is None
    assert field_of_view_mask(img).all()
    cropped = preprocess(img, 64)
    assert np.array_equal(cropped, preprocess(img, 64, FundusOptions(crop=False)))


@pytest.mark.parametrize("shape", [(5, 3), (1, 1), (30, 80), (80, 30)])
def test_tiny_and_non_square_inputs(shape: tuple[int, int]) -> None:
    arr = np.random.default_rng(1).integers(0, 255, (*shape, 3), dtype=np.uint8)
    out = preprocess(Image.fromarray(arr), 16, FundusOptions(ben_graham=True, clahe=True))
    assert out.shape == (16, 16, 3) and out.dtype == np.uint8


def test_black_and_grayscale_images() -> None:
    assert fov_bbox(np.zeros((40, 40, 3), np.uint8)) is None
    assert preprocess(np.zeros((40, 40, 3), np.uint8), 8).max() == 0
    gray = Image.fromarray(_fake_fundus()[0][..., 0])
    assert preprocess(gray, 8).shape == (8, 8, 3)


def test_options_round_trip() -> None:
    opts = FundusOptions(crop=False, ben_graham=True, ben_graham_sigma=3.0, clahe=True)
    assert FundusOptions.from_dict(opts.to_dict()) == opts
    assert FundusOptions.from_dict(None) == FundusOptions()
    with pytest.raises(ValueError, match="bogus"):
        FundusOptions.from_dict({"bogus": 1})


def test_mask_blacks_out_everything_outside_the_field_of_view() -> None:
    arr, disc = _fake_fundus()
    arr[52:60, 132:150] = 250  # burnt-in text in a corner of the FOV's bounding box
    plain = preprocess(arr, 64)
    masked = preprocess(arr, 64, FundusOptions(mask=True))
    inside = field_of_view_mask(plain)
    assert plain[~inside].max() > 200 and masked[~inside].max() == 0
    assert np.array_equal(plain[inside], masked[inside])


def test_colour_std_gives_two_cameras_the_same_colour_statistics() -> None:
    """The same retina photographed warm and cool: after colour_std the CIELAB statistics
    inside the FOV agree (and equal the target), while the dark lesion stays darker."""
    from medtune.data.fundus import COLOUR_TARGET_MEAN, COLOUR_TARGET_STD

    arr, _ = _fake_fundus()
    cool = np.clip(arr * np.array([0.7, 1.0, 1.4]), 0, 255).astype(np.uint8)
    opts = FundusOptions(colour_std=True)
    stats = []
    for img in (arr, cool):
        out = preprocess(img, 96, opts)
        inside = field_of_view_mask(preprocess(img, 96))
        lab = color.rgb2lab(out)[inside]
        stats.append(np.r_[lab.mean(0), lab.std(0)])
    before = [color.rgb2lab(preprocess(img, 96))[..., 1].mean() for img in (arr, cool)]
    assert abs(before[0] - before[1]) > 5  # the cameras differ in colour before
    assert np.abs(stats[0] - stats[1]).max() < 1.5
    assert np.abs(stats[0][:3] - np.asarray(COLOUR_TARGET_MEAN)).max() < 2.5
    assert np.abs(stats[0][3:] - np.asarray(COLOUR_TARGET_STD)).max() < 2.5
    plain = preprocess(cool, 96)
    out = preprocess(cool, 96, opts)
    inside = field_of_view_mask(plain)
    lum = [color.rgb2lab(a)[..., 0][inside] for a in (plain, out)]
    assert np.corrcoef(lum[0], lum[1])[0, 1] > 0.95  # vessels and lesions keep their contrast
