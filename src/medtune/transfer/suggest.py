"""Which images of a new site a grader should label first.

A new site's operating point needs labels (``medtune adapt --labels``), and labels cost a
grader's time. The images worth grading first are those the model is unsure about and that
cover the site's variety, not a random draw that repeats the commonest healthy eye.

Ranked batch-mode selection (Cardoso, Silva & Mendes 2017, "Ranked batch-mode active learning",
Information Sciences 379): images are picked one at a time by ``w * d + (1 - w) * u``, where
``d`` is the image's feature distance to the nearest image already picked (divided by the largest
such distance at that step, so the farthest image has 1) and
``u`` the model's uncertainty (binary entropy of P(referable), in bits). With ``w = 1`` this is
the greedy k-center core-set of Sener & Savarese 2018 ("Active learning for convolutional neural
networks: a core-set approach"); with ``w = 0`` it is uncertainty sampling. The first pick is
the most uncertain image.

Written here rather than taken from a library: modAL (``modal-python``) implements the same
ranked batch selection but only through its learner wrapper around a scikit-learn estimator and
is no longer maintained (last release 2023); the greedy loop is a dozen lines of numpy over
scikit-learn's ``pairwise_distances``.
"""

from __future__ import annotations

import numpy as np

from medtune.errors import MedtuneError

__all__ = ["binary_entropy", "suggest_images"]


def binary_entropy(p: np.ndarray) -> np.ndarray:
    """Entropy in bits of a Bernoulli(``p``): 1 at ``p = 0.5``, 0 at 0 and 1.

    Parameters
    ----------
    p : ndarray of float, shape (N,)

    Returns
    -------
    ndarray of float, shape (N,)
    """
    from scipy.stats import entropy

    p = np.clip(np.asarray(p, dtype=np.float64).ravel(), 0.0, 1.0)
    return entropy(np.stack([p, 1.0 - p]), base=2, axis=0)


def suggest_images(
    features: np.ndarray, uncertainty: np.ndarray, n: int, *, weight: float = 0.5
) -> np.ndarray:
    """Indices of ``n`` distinct images to label first, in the order to label them.

    Parameters
    ----------
    features : ndarray, shape (N, D)
        Pooled features of the new site's images (the model's penultimate layer).
    uncertainty : ndarray, shape (N,)
        The model's uncertainty per image, in [0, 1] (e.g. :func:`binary_entropy` of
        P(referable)).
    n : int
        How many to suggest (at most N).
    weight : float, default 0.5
        ``w`` in ``w * distance + (1 - w) * uncertainty``: 1 is the k-center core-set (Sener &
        Savarese 2018), 0 uncertainty sampling; 0.5 weighs them equally.

    Returns
    -------
    ndarray of int, shape (n,)
        Distinct row indices, first pick first.

    Raises
    ------
    MedtuneError
        For ``n`` outside [1, N], mismatched lengths, non-finite values or ``weight`` outside
        [0, 1].
    """
    from sklearn.metrics import pairwise_distances

    x = np.asarray(features, dtype=np.float64)
    u = np.asarray(uncertainty, dtype=np.float64).ravel()
    if x.ndim != 2 or len(x) != len(u) or not (np.isfinite(x).all() and np.isfinite(u).all()):
        raise MedtuneError(
            f"suggest: need finite (N, D) features and N uncertainties, got {x.shape} and {u.shape}"
        )
    if not 1 <= int(n) <= len(x):
        raise MedtuneError(f"suggest: cannot choose {n} of {len(x)} images; give 1 to {len(x)}")
    if not 0.0 <= float(weight) <= 1.0:
        raise MedtuneError(f"suggest: weight must be in [0, 1], got {weight}")
    chosen = [int(np.argmax(u))]
    nearest = pairwise_distances(x, x[chosen]).ravel()
    for _ in range(int(n) - 1):
        score = weight * nearest / max(float(nearest.max()), 1e-12) + (1.0 - weight) * u
        score[chosen] = -np.inf  # never twice
        pick = int(np.argmax(score))
        chosen.append(pick)
        nearest = np.minimum(nearest, pairwise_distances(x, x[[pick]]).ravel())
    return np.asarray(chosen, dtype=np.int64)
