"""Which images to label first: N distinct ones, preferring uncertain and diverse images."""

from __future__ import annotations

import numpy as np
import pytest

from medtune.errors import MedtuneError
from medtune.transfer.suggest import binary_entropy, suggest_images


def _clusters(rng: np.random.Generator, sizes=(60, 30, 10)):
    """Three well-separated clusters of features; the big one holds the most images."""
    centres = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    feats = np.vstack(
        [rng.normal(c, 0.5, size=(n, 2)) for c, n in zip(centres, sizes, strict=True)]
    )
    labels = np.repeat(np.arange(3), sizes)
    return feats, labels


def test_n_distinct_images_in_range():
    rng = np.random.default_rng(0)
    feats, _ = _clusters(rng)
    chosen = suggest_images(feats, rng.random(len(feats)), 25)
    assert len(chosen) == 25 == len(set(chosen.tolist()))
    assert chosen.min() >= 0 and chosen.max() < len(feats)
    assert len(suggest_images(feats, rng.random(len(feats)), len(feats))) == len(feats)


def test_diversity_covers_every_cluster_where_random_or_uncertainty_would_not():
    rng = np.random.default_rng(1)
    feats, labels = _clusters(rng)
    flat = np.full(len(feats), 0.5)
    chosen = suggest_images(feats, flat, 3, weight=1.0)  # k-center: one per cluster
    assert sorted(labels[chosen].tolist()) == [0, 1, 2]
    # uncertainty concentrated in the big cluster: the mixed rule still reaches the small ones
    unsure = np.where(labels == 0, 0.9, 0.1)
    mixed = suggest_images(feats, unsure, 6, weight=0.5)
    assert set(labels[mixed].tolist()) == {0, 1, 2}
    only_unsure = suggest_images(feats, unsure, 6, weight=0.0)
    assert set(labels[only_unsure].tolist()) == {0}


def test_the_most_uncertain_image_comes_first_and_uncertain_ones_are_preferred():
    rng = np.random.default_rng(2)
    feats = rng.normal(size=(200, 8))
    p_ref = rng.random(200)
    u = binary_entropy(p_ref)
    chosen = suggest_images(feats, u, 20)
    assert chosen[0] == int(np.argmax(u))
    assert u[chosen].mean() > u.mean() + 0.1
    assert binary_entropy(np.array([0.5, 0.0, 1.0])) == pytest.approx([1.0, 0.0, 0.0])


def test_bad_requests_are_one_line_errors():
    feats = np.zeros((5, 2))
    with pytest.raises(MedtuneError, match="cannot choose 6 of 5"):
        suggest_images(feats, np.zeros(5), 6)
    with pytest.raises(MedtuneError, match="weight"):
        suggest_images(feats, np.zeros(5), 2, weight=2.0)
