"""Site-shift score: Mahalanobis distance of pooled features, threshold from validation."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter
from sklearn.covariance import LedoitWolf

from medtune.errors import MedtuneError
from medtune.evaluation.shift import SiteShiftModel, shift_summary
from medtune.models import create_backbone


def _gaussian(n: int, d: int, seed: int, shift: float = 0.0) -> np.ndarray:
    """Correlated Gaussian features: the same distribution for every ``seed`` of one ``d``."""
    mix = np.random.default_rng(d).normal(size=(d, d)) / np.sqrt(d) + np.eye(d)
    return np.random.default_rng(seed).normal(size=(n, d)) @ mix.T + shift


@pytest.fixture(scope="module")
def gaussian_model():
    return SiteShiftModel.fit(_gaussian(400, 12, 0), _gaussian(300, 12, 1), percentile=95.0)


# --------------------------------------------------------------------------- numpy API


def test_score_is_ledoit_wolf_mahalanobis(gaussian_model):
    train = _gaussian(400, 12, 0)
    x = _gaussian(7, 12, 9, shift=0.5)
    expected = np.sqrt(LedoitWolf().fit(train).mahalanobis(x))  # squared distances
    np.testing.assert_allclose(gaussian_model.score(x), expected, rtol=1e-10)
    assert gaussian_model.score(x).shape == (7,)


def test_threshold_is_the_validation_percentile(gaussian_model):
    val = _gaussian(300, 12, 1)
    scores = gaussian_model.score(val)
    assert gaussian_model.threshold == pytest.approx(np.percentile(scores, 95.0))
    assert gaussian_model.is_outside(val).mean() == pytest.approx(0.05, abs=1 / 300)
    # new images from the same distribution: about 5% flagged; a shifted site: nearly all
    assert gaussian_model.is_outside(_gaussian(2000, 12, 2)).mean() == pytest.approx(0.05, abs=0.02)
    assert gaussian_model.is_outside(_gaussian(200, 12, 3, shift=3.0)).mean() > 0.95


def test_json_dict_and_npz_round_trips(gaussian_model, tmp_path):
    x = _gaussian(5, 12, 4, shift=1.0)
    data = json.loads(json.dumps(gaussian_model.to_dict()))
    again = SiteShiftModel.from_dict(data)
    np.testing.assert_array_equal(again.score(x), gaussian_model.score(x))
    assert again.threshold == gaussian_model.threshold
    small = gaussian_model.to_dict(arrays=False)
    assert "precision" not in small and small["n_train"] == 400 and small["percentile"] == 95.0
    path = gaussian_model.save(tmp_path / "shift.npz")
    loaded = SiteShiftModel.load(path)
    np.testing.assert_array_equal(loaded.score(x), gaussian_model.score(x))
    assert loaded.to_dict(arrays=False) == small


def test_npz_holding_pickled_objects_is_refused(tmp_path):
    path = tmp_path / "evil.npz"
    np.savez(path, meta=np.array([{"format": "x"}], dtype=object))
    with pytest.raises(MedtuneError, match="not a readable site-shift file") as err:
        SiteShiftModel.load(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(MedtuneError, match="not a site-shift model"):
        SiteShiftModel.from_dict({"format": "other"})


def test_pca_reduction_scores_in_the_component_space():
    train, val = _gaussian(300, 20, 5), _gaussian(100, 20, 6)
    model = SiteShiftModel.fit(train, val, n_components=4)
    from sklearn.decomposition import PCA

    pca = PCA(n_components=4, svd_solver="full").fit(train)
    x = _gaussian(6, 20, 7, shift=1.0)
    expected = np.sqrt(LedoitWolf().fit(pca.transform(train)).mahalanobis(pca.transform(x)))
    np.testing.assert_allclose(model.score(x), expected, rtol=1e-8)
    again = SiteShiftModel.from_dict(json.loads(json.dumps(model.to_dict())))
    np.testing.assert_allclose(again.score(x), model.score(x), rtol=1e-12)
    assert model.to_dict(arrays=False)["n_components"] == 4


@pytest.mark.parametrize(
    ("train", "val", "kwargs", "match"),
    [
        (np.zeros((5, 3)), np.zeros((2, 4)), {}, "fitted on 3"),
        (np.zeros((1, 3)), np.zeros((2, 3)), {}, "at least 2 images"),
        (np.zeros((5, 3)), np.zeros((0, 3)), {}, "non-empty"),
        (np.ones((5, 3)), np.full((2, 3), np.nan), {}, "row 0 holds NaN"),
        (np.ones((5, 3)), np.ones((2, 3)), {"percentile": 100.0}, "between 0 and 100"),
        (np.ones((5, 3)), np.ones((2, 3)), {"n_components": 9}, "n_components must be"),
    ],
)
def test_bad_input_gives_one_line_errors(train, val, kwargs, match):
    with pytest.raises(MedtuneError, match=match) as err:
        SiteShiftModel.fit(train, val, **kwargs)
    assert "\n" not in str(err.value)


def test_summary_message():
    flags = np.array([True] * 31 + [False] * 69)
    summary = shift_summary(flags)
    assert summary["n_outside"] == 31 and summary["share_outside"] == pytest.approx(0.31)
    assert summary["warning"]
    assert summary["message"] == (
        "31% of these images (31 of 100) lie outside the training distribution: "
        "the validated operating point may not hold"
    )
    calm = shift_summary(np.array([True] + [False] * 99))
    assert not calm["warning"] and "about 1% expected" in calm["message"]
    # the default alarm is 3x the expected share: 4% flagged at the 99th percentile warns,
    # at the 95th (5% expected) it does not
    four = np.array([True] * 4 + [False] * 96)
    assert shift_summary(four)["warning"] and not shift_summary(four, percentile=95.0)["warning"]
    assert not shift_summary(four, alarm=0.05)["warning"]
    few = shift_summary(np.array([True] + [False] * 418))
    assert few["message"].startswith("0.2% of these images (1 of 419)")


# --------------------------------------------------------------------------- real backbones


def _batch(images: list[np.ndarray], size: int, mean, std) -> torch.Tensor:
    arr = np.stack([np.asarray(Image.fromarray(a).resize((size, size))) for a in images])
    x = torch.from_numpy(arr).permute(0, 3, 1, 2).float() / 255
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def _features(backbone, images: list[np.ndarray], size: int) -> np.ndarray:
    with torch.no_grad():
        return backbone.features(_batch(images, size, backbone.mean, backbone.std)).numpy()


def _other_camera(image: np.ndarray) -> np.ndarray:
    """A different site's look: blur, a strong blue-green cast and lifted blacks."""
    blurred = np.asarray(Image.fromarray(image).filter(ImageFilter.GaussianBlur(3)), np.float32)
    cast = blurred * np.array([0.6, 0.9, 1.4]) + np.array([0.0, 20.0, 40.0])
    return np.clip(cast, 0, 255).astype(np.uint8)


def test_tiny_random_backbone_flags_a_colour_shifted_site():
    torch.manual_seed(0)
    backbone = create_backbone("test_efficientnet", weights=None)
    rng = np.random.default_rng(0)

    def site_a(n: int) -> list[np.ndarray]:
        out = []
        for _ in range(n):
            img = rng.integers(0, 80, size=(48, 48, 3)).astype(np.uint8)
            img[..., 0] += np.uint8(120)  # reddish, like a fundus
            out.append(img)
        return out

    train, val, home = (_features(backbone, site_a(n), 48) for n in (80, 30, 30))
    other = _features(backbone, [_other_camera(a) for a in site_a(30)], 48)
    model = SiteShiftModel.fit(train, val)
    assert model.is_outside(home).mean() <= 0.1
    assert model.is_outside(other).mean() >= 0.9
    assert np.median(model.score(other)) > 2 * np.median(model.score(home))


@pytest.mark.slow
def test_lite0_scores_home_fundi_below_cat_blank_and_other_site():
    """Measured (160 px, 60 training / 20 validation synthetic fundi): held-out fundi score
    45-54, threshold 70, another camera look 139-160, blank 104, chelsea 188."""
    from skimage import data

    from medtune.data.synthetic import synthesize_image

    size = 160
    backbone = create_backbone("efficientnet_lite0")
    fundi = [synthesize_image(i % 5, size, seed=i).image for i in range(100)]
    feats = _features(backbone, fundi, size)
    model = SiteShiftModel.fit(feats[:60], feats[60:80])
    home = model.score(feats[80:])
    cat = model.score(_features(backbone, [data.chelsea()], size))
    blank = model.score(_features(backbone, [np.zeros((size, size, 3), np.uint8)], size))
    other = model.score(_features(backbone, [_other_camera(a) for a in fundi[80:]], size))
    assert home.max() < min(cat.min(), blank.min(), other.min())
    assert model.is_outside(feats[80:]).mean() <= 0.05
    assert cat[0] > model.threshold and blank[0] > model.threshold
    assert (other > model.threshold).all()
    assert "100% of these images" in shift_summary(other > model.threshold)["message"]
