"""Group-aware, stratified train/val/test splits and their ``splits.csv`` file.

:func:`make_splits` uses scikit-learn's ``StratifiedGroupKFold`` so every group (patient, or a
set of duplicate images) lands in exactly one split while class proportions stay close to the
whole set's. The result depends only on the data and the seed.

The groups come from :func:`medtune.data.sources.load_imageset`, already merged (union-find) over
patient ids, ``metadata.csv`` duplicate groups, anonymised DICOM ``PatientID`` and byte-identical
(optionally near-identical) files, so a copy of a training image never lands in validation or test.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import numpy as np
import pandas as pd

from medtune import io as mio
from medtune.data.sources import SPLIT_NAMES, read_table
from medtune.errors import MedtuneError

__all__ = ["make_splits", "read_splits", "write_splits"]


class Labelled(Protocol):
    """Anything with labels, optional groups and an optional official split (ImageSet, cache);
    an optional ``sites`` attribute (one site name per item) splits every site separately."""

    labels: np.ndarray
    groups: list[str] | None
    predefined_split: list[str] | None


def make_splits(
    imageset: Labelled, val: float = 0.15, test: float = 0.15, seed: int = 0
) -> np.ndarray:
    """Assign ``'train'``/``'val'``/``'test'`` to every item (the official split when present).

    Fractions are approximate (a fold of ``StratifiedGroupKFold``); ``val=0`` or ``test=0`` gives no
    such split. Groups (``imageset.groups``, else one per image) never cross splits. When the items
    know their site (``imageset.sites``: several data sources or a ``site`` column), every site is
    split on its own, stratified within the site, so each site contributes about ``val`` and
    ``test`` of its images to those splits and a group stays inside one split of its site.

    Raises
    ------
    MedtuneError
        For invalid fractions, or a set (or site, named) with too few images or groups to split.
    """
    if imageset.predefined_split is not None:
        return np.asarray(imageset.predefined_split, dtype=str)
    if not (0.0 <= val < 1.0 and 0.0 <= test < 1.0 and val + test < 1.0):
        raise MedtuneError(
            f"invalid split fractions val={val}, test={test}; each must be in [0, 1) with "
            "val + test < 1"
        )
    labels = np.asarray(imageset.labels)
    n = len(labels)
    groups = (
        np.asarray(imageset.groups, dtype=object)
        if imageset.groups is not None
        else np.arange(n).astype(str).astype(object)
    )
    sites = getattr(imageset, "sites", None)
    if sites is None:
        return _split(labels, groups, val, test, seed)
    sites = np.asarray(sites, dtype=object)
    out = np.full(n, "train", dtype=object)
    for i, site in enumerate(sorted(set(sites.tolist()))):
        rows = np.flatnonzero(sites == site)
        try:
            out[rows] = _split(labels[rows], groups[rows], val, test, seed + i)
        except MedtuneError as err:
            raise MedtuneError(f"site {site!r}: {err}") from None
    return out.astype(str)


def _split(labels: np.ndarray, groups: np.ndarray, val: float, test: float, seed: int):
    n = len(labels)
    out = np.full(n, "train", dtype=object)
    rest = np.arange(n)
    rng = np.random.default_rng(seed)
    for name, frac, remaining in (("test", test, 1.0), ("val", val, 1.0 - test)):
        if frac <= 0:
            continue
        held = _hold_out(labels[rest], groups[rest], frac / remaining, int(rng.integers(2**31)))
        out[rest[held]] = name
        rest = rest[~held]
    return out.astype(str)


def _hold_out(labels: np.ndarray, groups: np.ndarray, frac: float, seed: int) -> np.ndarray:
    """Boolean mask of one StratifiedGroupKFold fold holding out about ``frac`` of the items."""
    from sklearn.model_selection import StratifiedGroupKFold  # heavy import, only when splitting

    n_groups = len(set(groups.tolist()))
    n_splits = min(max(2, round(1.0 / frac)), n_groups)
    if n_splits < 2:
        raise MedtuneError(
            f"too few images/groups ({n_groups}) to make a split; add data or set val/test to 0"
        )
    cv = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "least populated class has only k members"
        try:
            folds = [test for _, test in cv.split(np.zeros(len(labels)), labels, groups)]
        except ValueError as err:
            raise MedtuneError(
                f"cannot hold out {frac:.0%} of {len(labels)} images ({err}); add images, or "
                "lower --val-fraction / --test-fraction, or give --val-data / --test-data"
            ) from None
    target = frac * len(labels)
    best = min(folds, key=lambda f: abs(len(f) - target))
    mask = np.zeros(len(labels), dtype=bool)
    mask[best] = True
    return mask


def write_splits(
    path: str | os.PathLike[str], keys: Sequence[str], splits: Sequence[str] | np.ndarray
) -> None:
    """Write ``splits.csv`` (columns ``image,split``) atomically."""
    if len(keys) != len(splits):
        raise ValueError(f"{len(keys)} keys but {len(splits)} split values")
    frame = pd.DataFrame({"image": list(keys), "split": [str(s) for s in splits]})
    with mio.atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False)


def read_splits(path: str | os.PathLike[str], keys: Sequence[str]) -> np.ndarray:
    """Read ``splits.csv`` back, aligned to ``keys``; a mismatch with the data set is an error."""
    path = Path(path)
    if not path.is_file():
        raise MedtuneError(f"{path}: split file not found; run without it to make new splits")
    frame = read_table(path)
    if "image" not in frame.columns or "split" not in frame.columns:
        raise MedtuneError(
            f"{path}: needs columns image,split but has {','.join(frame.columns) or 'none'}; "
            "delete it to make new splits"
        )
    mapping = dict(zip(frame["image"], frame["split"], strict=True))
    bad = sorted(set(frame["split"]) - set(SPLIT_NAMES))
    if len(mapping) != len(frame) or bad:
        what = f"unknown split '{bad[0]}'" if bad else "duplicate image rows"
        raise MedtuneError(f"{path}: {what}; delete it to make new splits")
    missing = [k for k in keys if k not in mapping]
    extra = len(set(mapping) - set(keys))
    if missing or extra:
        example = f", e.g. '{missing[0]}'" if missing else ""
        raise MedtuneError(
            f"{path}: does not match the data set ({len(missing)} images not in the file"
            f"{example}; {extra} listed images not in the data set); delete {path.name} to make "
            "new splits, or use the data it was made for"
        )
    return np.asarray([mapping[k] for k in keys], dtype=str)
