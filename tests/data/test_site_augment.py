"""Site augmentation (medtune.data.site_augment): changes inside the field of view only."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medtune.data.fundus import field_of_view_mask
from medtune.data.site_augment import (
    ARTEFACTS,
    AUGMENTATIONS,
    SITE_AUGMENTATIONS,
    _colour_temperature,
    _zoom,
    augment_site,
    resolve_augment,
)
from medtune.data.synthetic import synthesize_image
from medtune.errors import MedtuneError


@pytest.fixture(scope="module")
def fundus() -> torch.Tensor:
    return torch.from_numpy(synthesize_image(2, size=96, seed=3).image).permute(2, 0, 1).clone()


def test_names_and_groups_expand_in_application_order() -> None:
    assert resolve_augment(None) == () and resolve_augment("none") == ()
    assert resolve_augment("site") == SITE_AUGMENTATIONS
    assert resolve_augment("jpeg,color") == (
        "brightness", "contrast", "gamma", "colour-temperature", "jpeg",
    )  # fmt: skip
    assert resolve_augment(["scale", "camera"]) == ("blur", "jpeg", "scale")
    assert resolve_augment("spot,site,halo") == (*SITE_AUGMENTATIONS, "halo", "spot")
    assert resolve_augment("artefact") == ARTEFACTS and not set(ARTEFACTS) & set(
        SITE_AUGMENTATIONS
    )  # the default group is unchanged
    with pytest.raises(MedtuneError, match="'hue' is unknown.*brightness"):
        resolve_augment("hue")


@pytest.mark.parametrize("name", AUGMENTATIONS)
def test_each_augmentation_changes_the_fov_and_leaves_the_border_black(fundus, name) -> None:
    fov = field_of_view_mask(fundus.permute(1, 2, 0).numpy())
    changed = 0
    for seed in range(6):
        out = augment_site(fundus, (name,), np.random.default_rng(seed))
        assert out.shape == fundus.shape and out.dtype == torch.uint8
        if name != "scale":  # a zoom moves the FOV edge; the others keep it in place
            assert int(out.permute(1, 2, 0).numpy()[~fov].max()) == 0
        changed += int(not torch.equal(out, fundus))
    assert changed >= 2  # blur and jpeg apply with probability 0.5


def test_all_augmentations_repeat_with_the_same_seed(fundus) -> None:
    a = augment_site(fundus, SITE_AUGMENTATIONS, np.random.default_rng(7))
    b = augment_site(fundus, SITE_AUGMENTATIONS, np.random.default_rng(7))
    c = augment_site(fundus, SITE_AUGMENTATIONS, np.random.default_rng(8))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(augment_site(fundus, (), np.random.default_rng(0)), fundus)


def _applied(fundus: torch.Tensor, name: str) -> torch.Tensor:
    """The first draw (by seed) in which the artefact is applied (probability 0.5)."""
    for seed in range(20):
        out = augment_site(fundus, (name,), np.random.default_rng(seed))
        if (out.float() - fundus.float()).abs().mean() > 0.1:
            return out.float()
    raise AssertionError(f"{name} never applied")


def test_artefacts_darken_a_region_brighten_the_rim_and_add_bright_spots(fundus) -> None:
    before = fundus.float()
    fov = torch.from_numpy(field_of_view_mask(fundus.permute(1, 2, 0).numpy()))
    side = fundus.shape[-1]
    yy, xx = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    radius = torch.sqrt((yy - side / 2) ** 2 + (xx - side / 2) ** 2) / (side / 2)
    rim, centre = fov & (radius > 0.85), fov & (radius < 0.4)
    assert rim.sum() > 50 and centre.sum() > 50
    hole = _applied(fundus, "hole") - before
    assert hole[:, fov].max() <= 0 and hole[:, fov].mean() < -3  # only darker
    halo = _applied(fundus, "halo") - before
    assert halo[:, fov].min() >= 0 and halo[:, rim].mean() > 3 * halo[:, centre].mean()
    spot = _applied(fundus, "spot") - before
    assert spot[:, fov].min() >= 0 and spot.amax() >= 10  # bright, local
    assert (spot.amax(dim=0)[fov] > 2).float().mean() < 0.5


def test_colour_temperature_warms_red_and_cools_blue(fundus) -> None:
    warm = _colour_temperature(fundus, 0.1).float().mean(dim=(1, 2))
    cool = _colour_temperature(fundus, -0.1).float().mean(dim=(1, 2))
    assert warm[0] > cool[0] and warm[2] < cool[2]
    assert abs(float(warm[1] - cool[1])) < 1e-6  # green untouched


def test_scale_zooms_the_image_and_its_mask_alike(fundus) -> None:
    """One resampling call for image and mask gives what two separate calls give."""
    fov = torch.as_tensor(field_of_view_mask(fundus.permute(1, 2, 0).numpy()).astype(np.uint8))
    for seed in range(4):
        out = augment_site(fundus, ("scale",), np.random.default_rng(seed), fov=fov.bool())
        zoom = float(np.random.default_rng(seed).uniform(0.9, 1.1))
        keep = _zoom(fov.mul(255).unsqueeze(0), zoom)
        assert torch.equal(out, _zoom(fundus, zoom) * (keep >= 128).to(torch.uint8))


def test_dataset_applies_site_augmentation_reproducibly(tmp_path) -> None:
    from PIL import Image

    from medtune.data import CachedImageDataset, load_imageset, prepare
    from medtune.data.fundus import FundusOptions

    for grade in (0, 1):
        (tmp_path / "data" / str(grade)).mkdir(parents=True)
        for name in "ab":
            Image.fromarray(synthesize_image(grade, size=48, seed=ord(name)).image).save(
                tmp_path / "data" / str(grade) / f"{name}.png"
            )
    cache = prepare(load_imageset(tmp_path / "data"), 48, FundusOptions(crop=False),
                    tmp_path / "cache", progress=False)  # fmt: skip
    plain = CachedImageDataset(cache, rot90=False, seed=1)
    aug = [CachedImageDataset(cache, rot90=False, site=("brightness", "gamma"), seed=1)
           for _ in "ab"]  # fmt: skip
    assert torch.equal(aug[0][2][0], aug[1][2][0])
    assert not torch.equal(aug[0][2][0], plain[2][0])
    assert aug[0][2][1] == plain[2][1] == 1


def _cache(tmp_path, size: int = 64, junk: bool = False):
    from PIL import Image

    from medtune.data import load_imageset, prepare
    from medtune.data.fundus import FundusOptions

    for grade in (0, 1):
        (tmp_path / "data" / str(grade)).mkdir(parents=True)
        for name in "abc":
            arr = synthesize_image(grade, size=size, seed=ord(name)).image.copy()
            arr[: size // 3, : size // 2] = (
                0  # a dark notch: no turn or flip maps the FOV to itself
            )
            Image.fromarray(arr).save(tmp_path / "data" / str(grade) / f"{name}.png")
    if junk:  # an unreadable file between good ones: the cache is compacted after the build
        (tmp_path / "data" / "0" / "b2.png").write_text("not an image")
    return prepare(load_imageset(tmp_path / "data"), size, FundusOptions(crop=False),
                   tmp_path / "cache", skip_bad=junk, progress=False)  # fmt: skip


@pytest.mark.parametrize("junk", [False, True])
def test_the_cache_stores_each_images_fov_mask_once(tmp_path, junk) -> None:
    from medtune.data import open_cache

    cache = _cache(tmp_path, junk=junk)
    assert len(cache.skipped) == int(junk)
    assert (cache.dir / "fov.npy").is_file() and cache.fov.shape == (6, 64, 8)
    for row in range(len(cache)):
        expected = field_of_view_mask(np.asarray(cache.images[row]))
        assert np.array_equal(cache.fov_mask(row), expected)
        assert 0.3 < expected.mean() < 0.95  # a real disc, not all or nothing
    assert np.array_equal(open_cache(cache.dir).fov_mask(5), cache.fov_mask(5))


@pytest.mark.parametrize("names", [SITE_AUGMENTATIONS, ("scale", "gamma"), ("blur", "jpeg")])
def test_cached_fov_mask_gives_the_per_epoch_computation(tmp_path, monkeypatch, names) -> None:
    """The dataset reads each mask from the cache (turned with the image) instead of detecting
    it every epoch; for the same seed every augmented image equals detection on the fly."""
    from medtune.data import CachedImageDataset
    from medtune.data.fundus import field_of_view_mask as detect

    cache = _cache(tmp_path)
    kwargs = {"rot90": True, "hflip": True, "vflip": True, "site": names, "seed": 11}
    cached, reference = CachedImageDataset(cache, **kwargs), CachedImageDataset(cache, **kwargs)
    detections = []

    def counting(arr):
        detections.append(arr.shape)
        return detect(arr)

    import medtune.data.site_augment as site_module

    monkeypatch.setattr(site_module, "field_of_view_mask", counting)
    for epoch in range(2):
        cached.set_epoch(epoch)
        reference.set_epoch(epoch)
        for i in range(len(cached)):
            img, label = cached[i]
            assert not detections  # no FOV detection on the training path
            row = int(reference.indices[i])
            k, h, v = reference._draws()
            turned = torch.from_numpy(np.array(cache.images[row])).permute(2, 0, 1)
            turned = torch.rot90(turned, k, dims=(1, 2))
            turned = torch.flip(turned, dims=(2,)) if h else turned
            turned = torch.flip(turned, dims=(1,)) if v else turned
            expected = augment_site(turned, names, reference._generator())  # detects the FOV
            assert len(detections) == 1
            detections.clear()
            assert torch.equal(img, expected) and label == int(cache.labels[row])
