"""Fine-tuning losses on graded labels: cross-entropy, or SORD's soft ordinal targets.

Díaz & Marathe 2019, "Soft labels for ordinal regression" (CVPR): the one-hot target of grade
``y`` is replaced by ``q_k = softmax_k(-alpha * |k - y|)``, so the network is trained towards a
distribution that puts most mass on the grade and decreasing mass on its neighbours. A grade
one off then costs less than two off (cross-entropy charges both alike), the class order enters
training without changing the head: the model still gives K logits, so the temperature,
operating points, P(referable), exports and every reader of a run work unchanged.

Written here rather than taken from ``dlordinal`` (whose ``SORDLoss`` is the same soft target):
that package builds the target in float64, which Apple's MPS backend does not support, and the
target is one line over PyTorch's ``cross_entropy``, which takes probability targets itself.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

#: SORD's scale on the grade distance |k - y|: 1 is the paper's unscaled linear metric. For five
#: DR grades it puts 0.50 of an interior grade's target on the grade, 0.18 on each neighbour and
#: 0.07 two away (0.64 on grade 0 for grade 0). Not tuned on the development sites.
SORD_ALPHA = 1.0


def sord_targets(num_classes: int, alpha: float = SORD_ALPHA) -> Tensor:
    """The soft target of every grade.

    Parameters
    ----------
    num_classes : int
        Number of grades K (at least 2), in order.
    alpha : float, default 1.0
        Scale on the grade distance: larger is closer to one-hot.

    Returns
    -------
    Tensor, (K, K) float32
        Row ``y`` is the target of grade ``y``: ``softmax(-alpha * |k - y|)`` over ``k``.

    Raises
    ------
    ValueError
        For fewer than two grades or a non-positive ``alpha``.

    Notes
    -----
    Díaz & Marathe 2019, "Soft labels for ordinal regression", CVPR (eq. 1, with the absolute
    difference as the metric).
    """
    if num_classes < 2 or alpha <= 0:
        raise ValueError(f"SORD needs >= 2 grades and alpha > 0, got {num_classes}, {alpha}")
    grades = torch.arange(num_classes, dtype=torch.float32)
    distance = (grades.view(1, -1) - grades.view(-1, 1)).abs()
    return torch.softmax(-alpha * distance, dim=1)


def grade_loss(
    logits: Tensor,
    labels: Tensor,
    *,
    weight: Tensor | None = None,
    soft_targets: Tensor | None = None,
) -> Tensor:
    """The mean training loss of a batch.

    Parameters
    ----------
    logits : Tensor, (B, K)
        Class logits (computed in float32).
    labels : Tensor, (B,) of int64
        True classes.
    weight : Tensor, (K,), optional
        Class weights (``class_weights auto``); with soft targets a class's weight scales its
        term of every target, as ``torch.nn.functional.cross_entropy`` does.
    soft_targets : Tensor, (K, K), optional
        Row ``y`` is the target of class ``y`` (:func:`sord_targets`); None: one-hot
        cross-entropy.

    Returns
    -------
    Tensor, scalar
        ``cross_entropy(logits, targets, weight)`` (PyTorch).
    """
    targets = labels if soft_targets is None else soft_targets[labels]
    return F.cross_entropy(logits.float(), targets, weight=weight)
