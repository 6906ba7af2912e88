"""One way to score images with a trained model: the :class:`Scorer` protocol and :func:`score`.

Design: a scorer is a loaded model plus its :class:`~medtune.evaluation.card.ModelCard`, fed
prepared uint8 images (N x S x S x 3, as :func:`medtune.data.prepare_image` and the prepared
cache give them). It answers two questions in fp32, the deployment precision:

* :meth:`Scorer.logits`: logits (N, K), with test-time augmentation (``tta="rot90"``: the mean
  logits of the four 90-degree rotations);
* :meth:`Scorer.logits_and_features`: the plain images' logits and the pooled features the head
  sees (N, D), in one pass;

and carries the model's site-shift model (``None`` without one). :func:`score` is the one place
where "logits and features, then TTA, then the site-shift score" is written: the site-shift model
was fitted on plain (no TTA) features, so its score comes from the plain pass whatever ``tta``.

Two implementations: :class:`medtune.deploy.onnx_predictor.OnnxPredictor` (ONNX Runtime on an
fp32 graph, no torch: the one inference engine after training, :mod:`medtune.deploy.engine`) and
:class:`medtune.evaluation.inference.TorchScorer` (PyTorch eager, ``engine="torch"`` and the
fallback for a model that cannot be exported). ``evaluate``, ``predict``, ``adapt``, the
finalisation of a training run and the web page (through ``predict``) use them through this
protocol only.

``images`` may be an array or anything with ``len()`` whose slices are uint8 arrays (a
:class:`medtune.data.Part` of a prepared cache), so a whole test split is read batch by batch.
Imports numpy and the standard library only.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, NamedTuple, Protocol, runtime_checkable

import numpy as np

if TYPE_CHECKING:
    from medtune.evaluation.card import ModelCard
    from medtune.evaluation.shift import SiteShiftModel

__all__ = ["Scored", "Scorer", "logits_per_tta", "score"]

#: Images turned at a time by :func:`logits_per_tta` (bounds the copies it makes).
_TURN_CHUNK = 256


@runtime_checkable
class Scorer(Protocol):
    """A loaded model that scores prepared uint8 images (module docstring)."""

    @property
    def card(self) -> ModelCard:
        """How the model is fed and read."""
        ...

    @property
    def site_shift(self) -> SiteShiftModel | None:
        """The model's site-shift model, or ``None``."""
        ...

    def logits(self, images: Any, tta: str = "none") -> np.ndarray:
        """Logits (N, K) float32 of uint8 images (N, S, S, 3), optionally with TTA."""
        ...

    def logits_and_features(self, images: Any) -> tuple[np.ndarray, np.ndarray]:
        """Logits (N, K) and head-input features (N, D), float32, of the plain images."""
        ...


class Scored(NamedTuple):
    """What :func:`score` returns.

    Attributes
    ----------
    logits : ndarray, shape (N, K), float32
        With the requested test-time augmentation.
    shift_scores : ndarray, shape (N,), or None
        Site-shift scores (Mahalanobis distances), ``None`` without a site-shift model.
    features : ndarray, shape (N, D), or None
        The plain images' features, when they were computed (a site-shift model, or asked).
    plain : ndarray, shape (N, K), or None
        The plain (no TTA) images' logits, when the plain pass ran (what the batch shift test
        reads, like the site-shift model).
    """

    logits: np.ndarray
    shift_scores: np.ndarray | None
    features: np.ndarray | None = None
    plain: np.ndarray | None = None


def score(scorer: Scorer, images: Any, tta: str = "none", *, features: bool = False) -> Scored:
    """Logits with ``tta`` and the site-shift score of ``images`` (module docstring).

    Parameters
    ----------
    scorer : Scorer
        A PyTorch or ONNX scorer.
    images : ndarray (N, S, S, 3) uint8, or a sliceable sequence of such rows
        Prepared images.
    tta : {"none", "rot90"}, default "none"
        Test-time augmentation of the logits.
    features : bool, default False
        Also return the plain images' features and logits when there is no site-shift model.

    Returns
    -------
    Scored
        When the plain pass ran (a site-shift model or ``features``) and ``tta`` is ``"none"``,
        its logits are used (one pass, not two).
    """
    shift = scorer.site_shift
    if shift is None and not features:
        return Scored(scorer.logits(images, tta), None)
    plain, feats = scorer.logits_and_features(images)
    logits = logits_per_tta(scorer, images, plain, modes=(tta,))[tta]
    return Scored(logits, None if shift is None else shift.score(feats), feats, plain)


def logits_per_tta(
    scorer: Scorer, images: Any, plain: np.ndarray, modes: tuple[str, ...] | None = None
) -> dict[str, np.ndarray]:
    """Logits of ``images`` for each test-time augmentation, reusing the plain pass.

    ``"rot90"`` is the mean logit over the four quarter turns (the definition of
    :meth:`Scorer.logits`); its unturned view IS ``plain``, so only three more passes run (a
    fifth fewer than ``plain`` plus ``scorer.logits(images, "rot90")``). Turning the uint8
    images before normalisation equals turning the normalised ones (normalisation is per pixel).

    Parameters
    ----------
    scorer : Scorer
    images : ndarray (N, S, S, 3) uint8, or a sliceable sequence of such rows
        Square prepared images.
    plain : ndarray, shape (N, K), float32
        ``scorer.logits(images, "none")`` (or the logits of ``logits_and_features``).
    modes : tuple of str, optional
        The TTA modes wanted (default: all of :data:`medtune.config.TTA_MODES`).

    Returns
    -------
    dict of str to ndarray, shape (N, K), float32
        One entry per mode.

    Raises
    ------
    ValueError
        For an unknown mode or ``plain`` of another length than ``images``.
    """
    from medtune.config import TTA_MODES

    modes = TTA_MODES if modes is None else modes
    unknown = [m for m in modes if m not in TTA_MODES]
    if unknown or len(plain) != len(images):
        raise ValueError(f"modes {unknown} unknown or {len(plain)} logits for {len(images)} images")
    out = {"none": plain} if "none" in modes else {}
    if "rot90" in modes:
        turned = []
        for start in range(0, len(images), _TURN_CHUNK):
            block = np.asarray(images[start : start + _TURN_CHUNK])
            views = [plain[start : start + len(block)]] + [
                scorer.logits(np.ascontiguousarray(np.rot90(block, k, axes=(1, 2))), "none")
                for k in (1, 2, 3)
            ]
            turned.append(np.mean(views, axis=0, dtype=np.float64).astype(np.float32))
        out["rot90"] = np.concatenate(turned)
    return out
