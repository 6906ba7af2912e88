"""Site-shift score: how far each image's backbone features lie from the training distribution.

The score is the Mahalanobis distance of an image's pooled backbone features (what the model's
head sees) to the training images' features, with the covariance estimated by Ledoit-Wolf
shrinkage (Ledoit & Wolf 2004, ``sklearn.covariance.LedoitWolf``): with about as many images as
feature dimensions (1,280 for EfficientNet-Lite0) the sample covariance is singular, the shrunk
one is well conditioned. Using Mahalanobis distances of pretrained features to flag
out-of-distribution inputs follows Lee et al. 2018 ("A simple unified framework for detecting
out-of-distribution samples and adversarial attacks").

An image is *outside* when its score exceeds the ``percentile`` (default 99) of the VALIDATION
images' scores: validation images are in-distribution but were not used for the fit, so by
construction about ``100 - percentile`` % of new images from the training site are flagged. With
M validation images the percentile is interpolated between order statistics (numpy's linear
rule), so below about 100 images the 99th percentile sits near the largest validation score.

Optionally the features are first projected onto their leading principal components
(``n_components``; ``sklearn.decomposition.PCA``) to make the stored model smaller. The default
keeps all dimensions, on evidence (``benchmarks/site_shift.py``, ImageNet Lite0 features, APTOS
train/val fit): the full 1,280-D score separates held-out APTOS from eyepacs-dev images with
AUROC 0.83 (PCA 64-256: 0.85-0.86, PCA 16: 0.71) and puts a cat photo at 4x the threshold, while
with 32 or 64 components the cat or a coffee photo falls below the threshold: what lies outside
the training images' principal subspace is exactly what PCA throws away. The full model is a
(1280, 1280) float64 precision matrix, 13 MB in :meth:`SiteShiftModel.save`'s ``.npz``.

A limit measured there: a uniform grey frame scores 41, like a typical APTOS image (median 32,
threshold 89), while a black frame (96), a cat (368) and a coffee cup (348) are flagged. The
score measures how familiar the features look, not image quality; empty frames need their own
check.

A per-image score goes blind when training covers several sites: the training distribution
widens until a new site's images look familiar one by one. :class:`BatchShiftTest` asks the
question of a whole batch instead (a new clinic's first images): is the batch's distribution of
features, and of predicted probabilities, the one seen on validation? Two-sample
Kolmogorov-Smirnov tests on the leading principal components of the pooled features and on each
class probability (black-box shift detection, BBSD), Bonferroni-corrected, as recommended by
Rabanser, Guennemann & Lipton 2019 ("Failing loudly: an empirical study of methods for detecting
dataset shift"), with a stated family-wise false-alarm rate ``alpha`` on batches drawn from a
validated site.

The KS p-values assume independent images, and a patient's two eyes are not: fellow eyes share
the camera, the sitting and mostly the grade. Measured on eyepacs-dev (two eyes per patient;
the held-out images of the ten leave-one-site-out folds trained on it,
``benchmarks/fellow_eyes.py``): random halves of its patients, each half a batch of whole
patients as a clinic sends them, were flagged as differing from the other half 14-23% of the
time against the stated 5%; halves of its images (fellow eyes split between the halves)
1.3-5.8%. So when the images' patients are known the test counts patients, not images: each
KS statistic is computed on all images and its p-value taken at the sample sizes of the
patients (Kolmogorov's distribution at ``n1 n2 / (n1 + n2)`` patients, as scipy's asymptotic
two-sample KS does). That treats fellow eyes as one observation, the conservative end of Kish's
design effect (``1 + (m - 1) rho`` with ``rho = 1``; Kish 1965, "Survey sampling"): the same
halves were flagged 0-0.3% of the time, and every held-out site was still detected from 100
images. Images without a known patient count one each.

Inputs and outputs are numpy arrays only; computing the features is the caller's job.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medtune.errors import MedtuneError
from medtune.io import atomic_path

__all__ = [
    "MIN_BATCH",
    "BatchShiftTest",
    "SiteShiftModel",
    "batch_words",
    "count_patients",
    "ks_test",
    "shift_summary",
]

#: Default percentile of the validation scores used as the threshold.
DEFAULT_PERCENTILE = 99.0
#: :func:`shift_summary` warns when the flagged share exceeds this multiple of the share expected
#: at the training site (3 x 1% = 3% with the default percentile). Measured with ImageNet
#: Lite0 features fitted on APTOS (benchmarks/site_shift.py): 0.2% of held-out APTOS images and
#: 7.7% of eyepacs-dev images are flagged at the 99th percentile, so a fixed 10% alarm would
#: miss the EyePACS shift under which the APTOS operating point fails (findings.md).
ALARM_FACTOR = 3.0
_FORMAT = "medtune-site-shift/1"
_ARRAYS = ("location", "precision", "pca_mean", "pca_components")


def _as_features(x: Any, what: str, dim: int | None = None) -> np.ndarray:
    """A finite float64 (N, D) array, or a one-line :class:`MedtuneError`."""
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise MedtuneError(f"{what}: need a non-empty (N, D) feature array, got shape {arr.shape}")
    if dim is not None and arr.shape[1] != dim:
        raise MedtuneError(
            f"{what}: features have {arr.shape[1]} dimensions but the site-shift model was "
            f"fitted on {dim}; use features of the same backbone and layer"
        )
    if not np.isfinite(arr).all():
        row = int(np.flatnonzero(~np.isfinite(arr).all(axis=1))[0])
        raise MedtuneError(f"{what}: row {row} holds NaN or infinite features; drop that image")
    return arr


@dataclass
class SiteShiftModel:
    """Mahalanobis distance to the training features, thresholded on validation scores.

    Build it with :meth:`fit`; ``location`` (D',) and ``precision`` (D', D') are the Ledoit-Wolf
    mean and inverse covariance in the (optionally PCA-reduced, D' = ``n_components``) feature
    space; ``pca_mean`` (D,) and ``pca_components`` (D', D) are empty arrays without PCA.
    """

    location: np.ndarray
    precision: np.ndarray
    pca_mean: np.ndarray
    pca_components: np.ndarray
    threshold: float
    percentile: float
    n_features: int
    n_train: int
    n_val: int
    shrinkage: float
    val_median: float

    # ------------------------------------------------------------------ fit and score

    @classmethod
    def fit(
        cls,
        train_features: np.ndarray,
        val_features: np.ndarray,
        percentile: float = DEFAULT_PERCENTILE,
        n_components: int | None = None,
    ) -> SiteShiftModel:
        """Fit on training features; set the threshold from validation features.

        Parameters
        ----------
        train_features : ndarray, shape (N, D)
            Pooled backbone features of the training images (N >= 2).
        val_features : ndarray, shape (M, D)
            Features of the validation images (same backbone and layer), M >= 1.
        percentile : float, default 99.0
            Percentile (0-100, exclusive) of the validation scores used as the threshold.
        n_components : int or None, default None
            Project onto this many principal components of the training features first
            (``sklearn.decomposition.PCA``); ``None`` keeps all D dimensions.

        Returns
        -------
        SiteShiftModel

        Raises
        ------
        MedtuneError
            On empty, non-finite or mismatched arrays, or a percentile outside (0, 100).
        """
        from sklearn.covariance import LedoitWolf

        train = _as_features(train_features, "training features")
        val = _as_features(val_features, "validation features", train.shape[1])
        if train.shape[0] < 2:
            raise MedtuneError("training features: need at least 2 images to fit a covariance")
        if not 0.0 < float(percentile) < 100.0:
            raise MedtuneError(f"percentile must be between 0 and 100, got {percentile}")
        pca_mean, components = _fit_pca(train, n_components)
        reduced = _project(train, pca_mean, components)
        lw = LedoitWolf(assume_centered=False).fit(reduced)
        model = cls(
            location=lw.location_,
            precision=lw.precision_,
            pca_mean=pca_mean,
            pca_components=components,
            threshold=np.inf,
            percentile=float(percentile),
            n_features=int(train.shape[1]),
            n_train=int(train.shape[0]),
            n_val=int(val.shape[0]),
            shrinkage=float(lw.shrinkage_),
            val_median=0.0,
        )
        val_scores = model.score(val)
        model.threshold = float(np.percentile(val_scores, percentile))
        model.val_median = float(np.median(val_scores))
        return model

    def score(self, features: np.ndarray) -> np.ndarray:
        """Mahalanobis distance of each row to the training features.

        Parameters
        ----------
        features : ndarray, shape (K, D)
            Features of the same backbone and layer as the fit.

        Returns
        -------
        ndarray, shape (K,)
            Distances (float64, >= 0; larger is farther from the training site).
        """
        x = _as_features(features, "features", self.n_features)
        diff = _project(x, self.pca_mean, self.pca_components) - self.location
        squared = ((diff @ self.precision) * diff).sum(axis=1)
        return np.sqrt(np.maximum(squared, 0.0))

    def is_outside(self, features: np.ndarray) -> np.ndarray:
        """Boolean (K,) array: True where the score exceeds :attr:`threshold`."""
        return self.score(features) > self.threshold

    # ------------------------------------------------------------------ storage

    def _meta(self) -> dict[str, Any]:
        return {
            "format": _FORMAT,
            "method": "Mahalanobis distance, Ledoit-Wolf covariance",
            "threshold": float(self.threshold),
            "percentile": float(self.percentile),
            "n_features": int(self.n_features),
            "n_components": int(self.location.shape[0]) if self.pca_components.size else None,
            "n_train": int(self.n_train),
            "n_val": int(self.n_val),
            "shrinkage": float(self.shrinkage),
            "val_median": float(self.val_median),
        }

    def to_dict(self, arrays: bool = True) -> dict[str, Any]:
        """JSON-safe dict (plain floats, ints and lists).

        ``arrays=False`` gives only the scalar metadata (threshold, percentile, counts) for a
        ``model.json`` whose arrays live in a sidecar written by :meth:`save`; with all 1,280
        Lite0 dimensions the precision matrix alone is 1.6 million numbers.
        """
        out = self._meta()
        if arrays:
            out.update({name: getattr(self, name).tolist() for name in _ARRAYS})
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SiteShiftModel:
        """Rebuild from :meth:`to_dict` output (with arrays); a wrong dict raises MedtuneError."""
        if data.get("format") != _FORMAT or any(name not in data for name in _ARRAYS):
            raise MedtuneError(
                f"not a site-shift model (format {data.get('format')!r}, needs {_FORMAT} with "
                "arrays); refit it with SiteShiftModel.fit"
            )
        arrays = {name: np.asarray(data[name], dtype=np.float64) for name in _ARRAYS}
        d = arrays["location"].shape[0]
        arrays["precision"] = arrays["precision"].reshape(d, d)
        if arrays["pca_components"].size:
            arrays["pca_components"] = arrays["pca_components"].reshape(d, -1)
        else:
            arrays["pca_components"] = np.zeros((0, 0))
        return cls(
            **arrays,
            threshold=float(data["threshold"]),
            percentile=float(data["percentile"]),
            n_features=int(data["n_features"]),
            n_train=int(data["n_train"]),
            n_val=int(data["n_val"]),
            shrinkage=float(data["shrinkage"]),
            val_median=float(data["val_median"]),
        )

    def save(self, path: str | Path) -> Path:
        """Write an ``.npz`` (``np.savez``: float64 arrays + a JSON metadata string); atomic."""
        path = Path(path)
        meta = np.array(json.dumps(self._meta()))
        with atomic_path(path) as tmp, open(tmp, "wb") as fh:
            np.savez(fh, meta=meta, **{name: getattr(self, name) for name in _ARRAYS})
        return path

    @classmethod
    def load(cls, path: str | Path) -> SiteShiftModel:
        """Read a file written by :meth:`save` (``allow_pickle=False``: no code can run)."""
        path = Path(path)
        try:
            with np.load(path, allow_pickle=False) as z:
                data = json.loads(str(z["meta"]))
                data.update({name: z[name] for name in _ARRAYS})
        except (OSError, ValueError, KeyError) as err:
            reason = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise MedtuneError(
                f"{path}: not a readable site-shift file ({reason}); refit and save it again"
            ) from None
        return cls.from_dict(data)


def _fit_pca(train: np.ndarray, n_components: int | None) -> tuple[np.ndarray, np.ndarray]:
    if n_components is None:
        return np.zeros(0), np.zeros((0, 0))
    limit = min(train.shape)
    if not 1 <= int(n_components) <= limit:
        raise MedtuneError(
            f"n_components must be between 1 and {limit} (images and feature dimensions), "
            f"got {n_components}"
        )
    from sklearn.decomposition import PCA

    pca = PCA(n_components=int(n_components), svd_solver="full").fit(train)
    return pca.mean_.astype(np.float64), pca.components_.astype(np.float64)


def _project(x: np.ndarray, centre: np.ndarray, components: np.ndarray) -> np.ndarray:
    """``x`` on the PCA components (centred on the training features' mean), or unchanged."""
    return x if components.size == 0 else (x - centre) @ components.T


def _pct(share: float) -> str:
    """Whole percents from 10% up or when exact, else one decimal (0.2%, not 0%)."""
    whole = abs(share * 100 - round(share * 100)) < 1e-9
    return f"{share:.0%}" if share >= 0.1 or whole else f"{share:.1%}"


def shift_summary(
    outside: np.ndarray,
    percentile: float = DEFAULT_PERCENTILE,
    alarm: float | None = None,
) -> dict[str, Any]:
    """Share of images outside the training distribution, with a one-line message.

    Parameters
    ----------
    outside : ndarray of bool, shape (K,)
        :meth:`SiteShiftModel.is_outside` of the images.
    percentile : float, default 99.0
        The model's :attr:`SiteShiftModel.percentile`: ``100 - percentile`` % of images from the
        training site are flagged by construction.
    alarm : float or None, default None
        ``warning`` is True when more than this share is flagged; ``None`` means
        :data:`ALARM_FACTOR` times the expected share (3% at the 99th percentile).

    Returns
    -------
    dict
        ``n_images``, ``n_outside``, ``share_outside``, ``expected_share`` (at the training
        site), ``warning`` (bool) and ``message``.
    """
    flags = np.asarray(outside, dtype=bool).ravel()
    n, k = int(flags.size), int(flags.sum())
    share = k / n if n else 0.0
    expected = (100.0 - float(percentile)) / 100.0
    limit = ALARM_FACTOR * expected if alarm is None else float(alarm)
    warning = n > 0 and share > limit
    head = f"{_pct(share)} of these images ({k} of {n}) lie outside the training distribution"
    if warning:
        message = f"{head}: the validated operating point may not hold"
    else:
        message = f"{head} (about {_pct(expected)} expected at the training site)"
    return {
        "n_images": n,
        "n_outside": k,
        "share_outside": share,
        "expected_share": expected,
        "warning": bool(warning),
        "message": message,
    }


# ---------------------------------------------------------------------- batch-level shift test

#: Family-wise false-alarm rate of :class:`BatchShiftTest` on a batch from a validated site.
BATCH_ALPHA = 0.05
#: Principal components of the pooled features the batch test compares (Rabanser et al. 2019
#: reduce to a few dozen dimensions before univariate tests).
BATCH_COMPONENTS = 32
#: Validation images per principal component kept. The components are fitted on the same
#: images that serve as the reference, whose projections on the minor components are therefore
#: narrower than a new image's: a small validation set with many components raises false alarms
#: on batches from its own site. Measured on made-up correlated features (48-D, 5 classes, 100
#: same-distribution batches of 25): with 32 components, 52% false alarms at 15 validation
#: images, 37% at 40, 13% at 100, 5% at 400; keeping at most one component per 12 images (32
#: from 384 images on), 2-5% at every size. A full-size run (hundreds of validation images)
#: keeps its 32.
IMAGES_PER_COMPONENT = 12
#: Fewest validation images of a site for it to be a reference of its own.
MIN_REFERENCE = 20
#: Fewest patients a batch needs before ``predict`` and ``serve`` test it
#: (:func:`count_patients`; the same floor as a reference site's images). The reason is power,
#: not validity (the KS p-values hold at any size): with the Bonferroni correction over 32
#: components, K probabilities and two tests (alpha about 0.05 / 74), a two-sample KS test
#: flags one dimension only when its statistic exceeds about ``sqrt(ln(2 / alpha') / (2 n))``
#: (Kolmogorov's asymptotic bound, large reference): 0.45 at n = 20, 0.63 at n = 10, 0.20 at
#: the 100 images the benchmarks test. Below 20 only a gross change of site could show, so a
#: smaller batch is reported as not tested rather than as consistent. ``n`` counts patients
#: when they are known (module notes).
MIN_BATCH = MIN_REFERENCE
_BATCH_FORMAT = "medtune-batch-shift/1"
_BATCH_ARRAYS = ("pca_mean", "pca_components", "reference", "reference_probs", "sites")
#: Arrays a file may lack (written before they existed): ``patients`` (every image its own).
_BATCH_OPTIONAL = ("patients",)


@dataclass
class BatchShiftTest:
    """Is a batch of images from the distribution the model was validated on?

    Build it with :meth:`fit` on the validation images; :meth:`test` a batch. The batch is
    compared with the pooled validation set and with every validation site holding at least
    :data:`MIN_REFERENCE` images; it is *shifted* only when it differs from all of them, so a
    batch from any one validated site raises a false alarm with probability at most ``alpha``
    (each comparison's p-value is Bonferroni-corrected over its dimensions and its two tests).

    Attributes
    ----------
    pca_mean : ndarray, shape (D,)
    pca_components : ndarray, shape (d, D)
        The projection of pooled features onto their leading principal components (fitted on
        the validation features).
    reference : ndarray, shape (M, d)
        The validation images' projected features.
    reference_probs : ndarray, shape (M, K)
        Their calibrated class probabilities.
    sites : ndarray of str, shape (M,)
        Their sites (``""`` for a single-site run).
    alpha : float
        The stated false-alarm rate.
    patients : ndarray of str, shape (M,) or None
        Their patients (``""`` when unknown: the image counts as one patient); ``None``: every
        image its own patient.
    """

    pca_mean: np.ndarray
    pca_components: np.ndarray
    reference: np.ndarray
    reference_probs: np.ndarray
    sites: np.ndarray
    alpha: float = BATCH_ALPHA
    patients: np.ndarray | None = None

    @classmethod
    def fit(
        cls,
        val_features: np.ndarray,
        val_probs: np.ndarray,
        sites: Any = None,
        *,
        n_components: int = BATCH_COMPONENTS,
        alpha: float = BATCH_ALPHA,
        patients: Any = None,
    ) -> BatchShiftTest:
        """Keep the validation images' projected features and probabilities as references.

        Parameters
        ----------
        val_features : ndarray, shape (M, D)
            Pooled features of the validation images.
        val_probs : ndarray, shape (M, K)
            Their calibrated class probabilities.
        sites : sequence of str, shape (M,), optional
            Their sites.
        n_components : int, default :data:`BATCH_COMPONENTS` (32)
            Principal components kept: at most ``D`` and at most ``M //``
            :data:`IMAGES_PER_COMPONENT` (at least 1).
        alpha : float, default :data:`BATCH_ALPHA` (0.05)
            The family-wise false-alarm rate of a verdict.
        patients : sequence of str, shape (M,), optional
            Their patients (``""`` or ``None`` when unknown); fellow eyes then count as one
            patient in the tests' sample sizes (module notes).

        Returns
        -------
        BatchShiftTest

        Raises
        ------
        MedtuneError
            For fewer than 2 images, non-finite features, mismatched lengths or an ``alpha``
            outside (0, 1).
        """
        feats = _as_features(val_features, "validation features")
        probs = _as_features(val_probs, "validation probabilities")
        if len(probs) != len(feats) or len(feats) < 2:
            raise MedtuneError(
                f"batch shift test: {len(feats)} feature rows and {len(probs)} probability rows;"
                " need the same number, at least 2"
            )
        if not 0.0 < float(alpha) < 1.0:
            raise MedtuneError(f"batch shift test: alpha must be in (0, 1), got {alpha}")
        names = np.full(len(feats), "") if sites is None else np.asarray(sites, dtype=str)
        if len(names) != len(feats):
            raise MedtuneError(f"{len(names)} site names for {len(feats)} validation images")
        who = _patient_ids(patients, len(feats), "validation images")
        keep = min(int(n_components), feats.shape[1], max(1, len(feats) // IMAGES_PER_COMPONENT))
        mean, comps = _fit_pca(feats, keep)
        projected = _project(feats, mean, comps)
        return cls(mean, comps, projected, probs, names, float(alpha), who)

    def _references(self) -> list[tuple[str, np.ndarray]]:
        refs = [("validation (all sites)", np.arange(len(self.sites)))]
        named = sorted(set(self.sites.tolist()) - {""})
        if len(named) > 1:
            for site in named:
                rows = np.flatnonzero(self.sites == site)
                if len(rows) >= MIN_REFERENCE:
                    refs.append((site, rows))
        return refs

    def project(self, features: np.ndarray) -> np.ndarray:
        """The batch's features on the test's principal components: what :meth:`test_projected`
        compares (a short record per image, ``d`` numbers instead of ``D``, for callers that
        gather a batch over time: ``predict``'s journal, the worklist).

        Parameters
        ----------
        features : ndarray, shape (N, D)
            Pooled features (the model and layer of :meth:`fit`).

        Returns
        -------
        ndarray, shape (N, d), float64

        Raises
        ------
        MedtuneError
            For features of another dimension or non-finite values.
        """
        x = _as_features(features, "batch features", self.pca_mean.shape[0])
        return _project(x, self.pca_mean, self.pca_components)

    def test(self, features: np.ndarray, probs: np.ndarray, patients: Any = None) -> dict[str, Any]:
        """The verdict on one batch.

        Parameters
        ----------
        features : ndarray, shape (N, D)
            Pooled features of the batch's images (the same model and layer as :meth:`fit`).
        probs : ndarray, shape (N, K)
            Their calibrated class probabilities.
        patients : sequence of str, shape (N,), optional
            Their patients (``""`` or ``None`` when unknown: the image counts as one); fellow
            eyes count as one patient in the tests' sample sizes (module notes).

        Returns
        -------
        dict
            ``shifted`` (bool), ``p_value`` (of the closest reference, Bonferroni-corrected),
            ``closest`` (its name), ``features_p`` and ``probabilities_p`` there, ``alpha``,
            ``n_images``, ``n_patients`` (images without a known patient counted one each),
            ``method`` and a one-line ``message``.

        Raises
        ------
        MedtuneError
            For features of another dimension, non-finite values or mismatched lengths.
        """
        return self.test_projected(self.project(features), probs, patients)

    def test_projected(
        self, projected: np.ndarray, probs: np.ndarray, patients: Any = None
    ) -> dict[str, Any]:
        """:meth:`test` on features already projected by :meth:`project`.

        Parameters
        ----------
        projected : ndarray, shape (N, d)
            :meth:`project` of the batch's features.
        probs : ndarray, shape (N, K)
            Their calibrated class probabilities.
        patients : sequence of str, shape (N,), optional
            As :meth:`test`.

        Returns
        -------
        dict
            As :meth:`test`.

        Raises
        ------
        MedtuneError
            For another number of components, non-finite values or mismatched lengths.
        """
        x = _as_features(projected, "projected batch features", self.reference.shape[1])
        p = _as_features(probs, "batch probabilities", self.reference_probs.shape[1])
        if len(p) != len(x):
            raise MedtuneError(f"{len(x)} feature rows but {len(p)} probability rows")
        who = _patient_ids(patients, len(x), "batch images")
        results = []
        for name, rows in self._references():
            ref = None if self.patients is None else self.patients[rows]
            pf = ks_test(self.reference[rows], x, ref, who)[1]
            pp = ks_test(self.reference_probs[rows], p, ref, who)[1]
            feat_p = min(1.0, float(np.min(pf)) * pf.size)  # Bonferroni over dimensions
            prob_p = min(1.0, float(np.min(pp)) * pp.size)
            results.append((min(1.0, 2 * min(feat_p, prob_p)), name, feat_p, prob_p))
        p_value, closest, feat_p, prob_p = max(results, key=lambda r: r[0])
        n_batch = _count_patients(who)
        return _verdict(p_value, closest, feat_p, prob_p, len(x), self.alpha, n_batch)

    def save(self, path: str | Path) -> Path:
        """Write an ``.npz`` (arrays + a JSON metadata string); atomic."""
        meta = np.array(json.dumps({"format": _BATCH_FORMAT, "alpha": self.alpha}))
        arrays = {name: getattr(self, name) for name in _BATCH_ARRAYS + _BATCH_OPTIONAL}
        with atomic_path(Path(path)) as tmp, open(tmp, "wb") as fh:
            np.savez(fh, meta=meta, **{k: v for k, v in arrays.items() if v is not None})
        return Path(path)

    @classmethod
    def load(cls, path: str | Path) -> BatchShiftTest:
        """Read a file written by :meth:`save` (no pickles are loaded).

        Raises
        ------
        MedtuneError
            When the file is not a readable batch-shift file.
        """
        try:
            with np.load(path, allow_pickle=False) as z:
                meta = json.loads(str(z["meta"]))
                arrays = {name: z[name] for name in _BATCH_ARRAYS}
                arrays.update({name: z[name] for name in _BATCH_OPTIONAL if name in z.files})
        except (OSError, ValueError, KeyError) as err:
            reason = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise MedtuneError(f"{path}: not a readable batch-shift file ({reason})") from None
        if meta.get("format") != _BATCH_FORMAT:
            raise MedtuneError(f"{path}: format {meta.get('format')!r}, expected {_BATCH_FORMAT}")
        return cls(**arrays, alpha=float(meta["alpha"]))


def _patient_ids(patients: Any, n: int, what: str) -> np.ndarray | None:
    """``patients`` as an array of str (``""`` for unknown), or ``None`` when not given."""
    if patients is None:
        return None
    ids = np.asarray(["" if v is None else str(v) for v in patients], dtype=str)
    if len(ids) != n:
        raise MedtuneError(f"{len(ids)} patient ids for {n} {what}")
    return ids


def _count_patients(ids: np.ndarray | None) -> int | None:
    """Distinct known patients plus one per image of an unknown patient; ``None`` without ids."""
    if ids is None:
        return None
    known = ids[ids != ""]
    return len(np.unique(known)) + int(len(ids) - len(known))


def count_patients(patients: Any) -> int:
    """How many patients a batch's images come from, as :class:`BatchShiftTest` counts them.

    Parameters
    ----------
    patients : sequence of str or None, shape (N,)
        Each image's patient; ``""`` or ``None`` when unknown.

    Returns
    -------
    int
        Distinct known patients plus one for each image of an unknown patient (``N`` when no
        patient is known).
    """
    ids = _patient_ids(patients, len(patients), "images")
    return int(_count_patients(ids) or 0)


def ks_test(
    a: Any, b: Any, a_patients: Any = None, b_patients: Any = None
) -> tuple[np.ndarray, np.ndarray]:
    """Two-sample Kolmogorov-Smirnov tests, column by column, counting patients.

    Parameters
    ----------
    a : array-like, shape (n,) or (n, d)
    b : array-like, shape (m,) or (m, d)
        The two samples (the same columns).
    a_patients, b_patients : sequence of str, shape (n,) and (m,), optional
        Each row's patient (``""`` or ``None``: unknown, counts as one).

    Returns
    -------
    statistic, p_value : ndarray, shape (d,) (``(1,)`` for 1-D samples)
        The KS distances over all rows; with as many patients as rows on both sides, scipy's
        exact p-values
        (``scipy.stats.ks_2samp``); else the statistic over all rows with its p-value from
        Kolmogorov's distribution at ``round(n1 n2 / (n1 + n2))`` for ``n1``, ``n2`` patients
        (scipy's asymptotic two-sample rule, ``scipy.stats.kstwo``): fellow eyes count once
        (module notes).

    Raises
    ------
    MedtuneError
        When a patient list's length differs from its sample's.
    """
    from scipy.stats import ks_2samp, kstwo

    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    result = ks_2samp(a, b, axis=0)
    n1 = _count_patients(_patient_ids(a_patients, len(a), "rows")) or len(a)
    n2 = _count_patients(_patient_ids(b_patients, len(b), "rows")) or len(b)
    statistic = np.atleast_1d(result.statistic)
    if (n1, n2) == (len(a), len(b)):
        return statistic, np.atleast_1d(result.pvalue)
    return statistic, kstwo.sf(statistic, round(n1 * n2 / (n1 + n2)))


def batch_words(n_images: int, n_patients: int | None = None) -> str:
    """A batch's size in words, as the verdicts say it: ``"100 images"``, or ``"100 images (52
    patients)"`` when fellow eyes made the patients fewer."""
    more = n_patients is not None and n_patients != n_images
    return f"{n_images} images" + (f" ({n_patients} patients)" if more else "")


def _verdict(
    p_value: float,
    closest: str,
    feat_p: float,
    prob_p: float,
    n: int,
    alpha: float,
    patients: int | None = None,
) -> dict[str, Any]:
    shifted = p_value < alpha
    of = batch_words(n, patients)
    if shifted:
        message = (
            f"this batch of {of} differs from every validation site (p = {p_value:.2g} < "
            f"{alpha:g}): the validated operating point is not validated here"
        )
    else:
        message = (
            f"this batch of {of} is consistent with {closest} (p = {p_value:.2g}; "
            f"false-alarm rate {alpha:g})"
        )
    return {
        "n_images": n,
        "n_patients": n if patients is None else patients,
        "shifted": bool(shifted),
        "p_value": float(p_value),
        "closest": closest,
        "features_p": float(feat_p),
        "probabilities_p": float(prob_p),
        "alpha": float(alpha),
        "method": (
            "two-sample Kolmogorov-Smirnov tests on the principal components of the pooled "
            "features and on each class probability (BBSD), Bonferroni-corrected, at the "
            "number of patients (fellow eyes count once); shifted when it differs from every "
            "validation site (Rabanser et al. 2019)"
        ),
        "message": message,
    }
