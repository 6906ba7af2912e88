"""SORD's soft ordinal targets and the training loss built on them."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from medtune.engines.losses import grade_loss, sord_targets


def test_sord_targets_peak_on_the_grade_and_fall_with_the_distance_either_way():
    q = sord_targets(5)
    assert q.shape == (5, 5)
    assert torch.allclose(q.sum(dim=1), torch.ones(5))
    assert torch.equal(q.argmax(dim=1), torch.arange(5))
    for y in range(5):  # strictly falling away from the grade, the same on both sides
        for d in range(1, 5):
            if y + d < 5:
                assert q[y, y + d] < q[y, y + d - 1]
            if y - d >= 0 and y + d < 5:
                assert q[y, y - d] == pytest.approx(q[y, y + d].item())
    # the paper's formula for grade 2 of 0-4 at alpha 1: exp(-|k - 2|) normalised
    expected = torch.tensor([math.exp(-abs(k - 2)) for k in range(5)])
    assert torch.allclose(q[2], expected / expected.sum())
    assert torch.allclose(sord_targets(5, alpha=50.0), torch.eye(5), atol=1e-12)
    with pytest.raises(ValueError):
        sord_targets(1)


def test_sord_charges_a_grade_two_off_more_than_one_off_where_cross_entropy_does_not():
    """True grade 1; one prediction sure of grade 2, one equally sure of grade 3."""
    labels = torch.tensor([1])
    near = torch.tensor([[0.0, 0.0, 4.0, 0.0, 0.0]])
    far = torch.tensor([[0.0, 0.0, 0.0, 4.0, 0.0]])
    soft = sord_targets(5)
    assert grade_loss(near, labels) == pytest.approx(grade_loss(far, labels).item())
    assert grade_loss(near, labels, soft_targets=soft) < grade_loss(far, labels, soft_targets=soft)
    right = torch.tensor([[0.0, 4.0, 0.0, 0.0, 0.0]])
    assert grade_loss(right, labels, soft_targets=soft) < grade_loss(
        near, labels, soft_targets=soft
    )


def test_grade_loss_is_the_soft_cross_entropy_of_each_label_row_with_class_weights():
    torch.manual_seed(0)
    logits, labels = torch.randn(6, 5), torch.tensor([0, 4, 2, 2, 1, 3])
    weight = torch.tensor([0.5, 1.0, 2.0, 1.0, 3.0])
    soft = sord_targets(5)
    manual = -(weight * soft[labels] * F.log_softmax(logits, dim=1)).sum(dim=1).mean()
    assert grade_loss(logits, labels, weight=weight, soft_targets=soft) == pytest.approx(
        manual.item(), rel=1e-6
    )
    assert grade_loss(logits, labels, weight=weight) == pytest.approx(
        F.cross_entropy(logits, labels, weight=weight).item()
    )
