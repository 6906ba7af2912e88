"""Site-balanced sampling: each site drawn in proportion to n_site ** alpha."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import WeightedRandomSampler

from medtune.config import TrainConfig
from medtune.data import Part
from medtune.engines.datamodule import CacheDataModule, sampling_weights
from medtune.errors import MedtuneError

# three sites of 400, 100 and 25 images; labels 0/1 with site-specific prevalence
SIZES = {"a": 400, "b": 100, "c": 25}
SITES = np.repeat(list(SIZES), list(SIZES.values()))
LABELS = np.concatenate([np.arange(n) % (4 if s == "a" else 2) == 0 for s, n in SIZES.items()])
LABELS = LABELS.astype(np.int64)


def _site_shares(weights: np.ndarray, n_draws: int = 60_000) -> dict[str, float]:
    gen = torch.Generator().manual_seed(0)
    drawn = np.array(list(WeightedRandomSampler(weights.tolist(), n_draws, generator=gen)))
    return {s: float(np.mean(SITES[drawn] == s)) for s in SIZES}


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_sites_are_drawn_in_proportion_to_size_to_the_alpha(alpha):
    weights = sampling_weights(LABELS, SITES, site_balance=alpha)
    assert weights.sum() == pytest.approx(1.0)
    expected = np.array([n**alpha for n in SIZES.values()])
    expected /= expected.sum()
    shares = _site_shares(weights)
    assert list(shares.values()) == pytest.approx(expected.tolist(), abs=0.01)
    # inside a site every image is equally likely
    for s in SIZES:
        assert np.ptp(weights[s == SITES]) == pytest.approx(0.0)


def test_class_balance_applies_inside_each_site():
    weights = sampling_weights(LABELS, SITES, site_balance=0.0, class_balanced=True)
    for s in SIZES:
        rows = s == SITES
        pos_share = weights[rows & (LABELS == 1)].sum() / weights[rows].sum()
        assert pos_share == pytest.approx(0.5)
        assert weights[rows].sum() == pytest.approx(1 / 3)


def test_one_site_or_alpha_one_is_uniform_and_bad_alpha_is_refused():
    assert np.ptp(sampling_weights(LABELS, None, site_balance=0.0)) == pytest.approx(0.0)
    assert np.ptp(sampling_weights(LABELS, SITES, site_balance=1.0)) == pytest.approx(0.0)
    with pytest.raises(MedtuneError, match="site_balance"):
        sampling_weights(LABELS, SITES, site_balance=1.5)
    with pytest.raises(MedtuneError, match="site_balance"):
        TrainConfig(data="x", site_balance=-0.1).validate()


def test_datamodule_uses_the_site_balanced_sampler():
    class Cache:
        labels = LABELS
        sites = SITES.tolist()

    part = Part(Cache(), np.arange(len(LABELS)))
    dm = CacheDataModule(part, part, batch_size=8, site_balance=0.0, seed=0)
    sampler = dm._balanced_sampler()
    shares = _site_shares(np.asarray(sampler.weights.numpy(), dtype=float))
    assert list(shares.values()) == pytest.approx([1 / 3] * 3, abs=0.01)
    plain = CacheDataModule(part, part, batch_size=8, seed=0)
    assert plain.site_balance == 1.0
