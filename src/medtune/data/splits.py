"""Group-aware, stratified train/val/test splits and their ``splits.csv`` file.

:func:`make_splits` uses scikit-learn's ``StratifiedGroupKFold`` so every group (patient, or a
set of duplicate images) lands in exactly one split while class proportions stay close to the
whole set's. The result depends only on the data and the seed.

The groups come from :func:`medtune.data.sources.load_imageset`, already merged (union-find) over
patient ids, ``metadata.csv`` duplicate groups, anonymised DICOM ``PatientID`` and byte-identical
(optionally near-identical) files, so a copy of a training image never lands in validation or test.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import pandas as pd

from medtune import io as mio
from medtune.data.imageset import SPLIT_NAMES
from medtune.data.tables import read_table
from medtune.errors import MedtuneError, offer

log = logging.getLogger(__name__)

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

    Small sets and sites are split too: every class with images of at least two groups has one
    in validation (three groups: one in test as well), even where that is more than the fraction
    asks (a six-image site with two images per class holds out one of each). A site or a test
    split that gets nothing is named in a warning.

    Parameters
    ----------
    imageset : Labelled
        ``labels`` (int, shape (N,)), ``groups``, ``predefined_split``, optional ``sites`` and
        ``class_names`` (named in messages).
    val, test : float, default 0.15
        Fractions of the images (of each site) to hold out, each in [0, 1), sum below 1.
    seed : int, default 0
        The split depends only on the data and the seed.

    Returns
    -------
    ndarray of str, shape (N,)

    Raises
    ------
    MedtuneError
        For invalid fractions, or when no class has two groups to spare for validation (the
        message lists the groups per class and what to add).
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
        out = _split(labels, groups, val, test, seed)
        _check_held_out(out, _named(imageset, labels), groups, None, val, test)
        return out
    sites = np.asarray(sites, dtype=object)
    out = np.full(n, "train", dtype=object)
    for i, site in enumerate(sorted(set(sites.tolist()))):
        rows = np.flatnonzero(sites == site)
        out[rows] = _split(labels[rows], groups[rows], val, test, seed + i)
    out = out.astype(str)
    _check_held_out(out, _named(imageset, labels), groups, sites, val, test)
    return out


def _named(imageset: Labelled, labels: np.ndarray) -> np.ndarray:
    """The class name of each item (its label where the set has no ``class_names``)."""
    names = getattr(imageset, "class_names", None)
    if names is None:
        return labels.astype(str)
    return np.asarray([str(c) for c in names], dtype=object)[labels]


def _check_held_out(
    out: np.ndarray,
    labels: np.ndarray,
    groups: np.ndarray,
    sites: np.ndarray | None,
    val: float,
    test: float,
) -> None:
    """Refuse a validation split that came out empty, with advice computed from the data; warn
    about a site (or a test split) too small to contribute."""
    site_of = sites if sites is not None else np.full(len(labels), "", dtype=object)
    for name, frac in (("val", val), ("test", test)):
        if frac <= 0:
            continue
        per_site = {s: bool(np.any(out[site_of == s] == name)) for s in sorted(set(site_of))}
        if name == "val" and not any(per_site.values()):
            raise MedtuneError(
                f"cannot hold out any validation images: {_too_few(labels, groups, site_of)}; "
                "add a second image (of another patient) to a class"
                + offer(", or give {}", "--val-data")
            )
        for site, has in per_site.items():
            if not has:
                where = f"site {site!r}" if sites is not None else "the data"
                log.warning(
                    "%s: too few images for a %s split of its own (a class needs %d "
                    "patients/images; %s); its images are in the other splits",
                    where,
                    "validation" if name == "val" else "test",
                    2 if name == "val" or val <= 0 else 3,
                    _too_few(labels[site_of == site], groups[site_of == site], None),
                )


def _too_few(labels: np.ndarray, groups: np.ndarray, site_of: np.ndarray | None) -> str:
    """E.g. "patients/images per class '0': 1, '1': 1": the groups of each class."""
    if site_of is not None and len(set(site_of)) > 1:
        return "; ".join(
            f"site {s!r}: {_too_few(labels[site_of == s], groups[site_of == s], None)}"
            for s in sorted(set(site_of))
        )
    counts = {str(c): len(set(groups[labels == c].tolist())) for c in np.unique(labels).tolist()}
    return "patients/images per class " + ", ".join(f"'{c}': {k}" for c, k in counts.items())


def _split(labels: np.ndarray, groups: np.ndarray, val: float, test: float, seed: int):
    """Hold out ``test`` then ``val`` (fractions of the whole), each a group-aware stratified
    share of what is left; with validation asked, the test share leaves every class two groups
    (one for training, one for validation)."""
    n = len(labels)
    out = np.full(n, "train", dtype=object)
    rest = np.arange(n)
    rng = np.random.default_rng(seed)
    for name, frac, remaining in (("test", test, 1.0), ("val", val, 1.0 - test)):
        if frac <= 0:
            continue
        keep = 2 if name == "test" and val > 0 else 1
        held = _hold_out(
            labels[rest], groups[rest], frac / remaining, int(rng.integers(2**31)), keep
        )
        out[rest[held]] = name
        rest = rest[~held]
    return out.astype(str)


@dataclass
class _Groups:
    """Which classes each group holds: ``counts[g, c]`` images of class ``c`` in group ``g``."""

    index: np.ndarray  # group number of each item
    counts: np.ndarray  # (n_groups, n_classes)

    @classmethod
    def of(cls, labels: np.ndarray, groups: np.ndarray) -> _Groups:
        _, index = np.unique(np.asarray(groups).astype(str), return_inverse=True)
        _, y = np.unique(labels, return_inverse=True)
        counts = np.zeros((index.max(initial=-1) + 1, y.max(initial=-1) + 1), dtype=np.int64)
        np.add.at(counts, (index, y), 1)
        return cls(index, counts)

    def rest_has(self, held: np.ndarray) -> np.ndarray:
        """Per class: how many groups outside ``held`` hold it."""
        return (self.counts[~held] > 0).sum(axis=0)


def _hold_out(
    labels: np.ndarray, groups: np.ndarray, frac: float, seed: int, keep: int = 1
) -> np.ndarray:
    """Boolean mask holding out about ``frac`` of the items, whole groups at a time.

    One fold of scikit-learn's ``StratifiedGroupKFold`` gives the bulk. Small sets need more
    than a k-fold can give (it cannot make more folds than a class has members, and a fold of a
    six-image site may miss a class), and no library holds out "at least one group of every
    class that has ``keep + 1`` groups, leaving ``keep`` of each in the rest", so that part is
    done here: groups move back until every class keeps ``keep`` groups (or all it has), then
    each class with more than ``keep`` groups and none held out gets its smallest movable group.
    """
    table = _Groups.of(labels, groups)
    rng = np.random.default_rng(seed)
    held = _fold_groups(labels, groups, table, frac, seed)
    total = table.counts.sum(axis=0) > 0
    need = np.minimum(keep, (table.counts > 0).sum(axis=0))  # groups each class keeps in the rest
    for c in rng.permutation(len(need)):  # give the rest back what it must keep
        while table.rest_has(held)[c] < need[c]:
            held[rng.choice(np.flatnonzero(held & (table.counts[:, c] > 0)))] = False
    for c in rng.permutation(len(need)):  # every class that can spare a group shows up held out
        if not total[c] or (table.counts[held, c] > 0).any():
            continue
        rest = table.rest_has(held)
        movable = [
            g
            for g in rng.permutation(np.flatnonzero(~held & (table.counts[:, c] > 0)))
            if np.all(rest - (table.counts[g] > 0) >= need)
        ]
        if movable:
            held[min(movable, key=lambda g: table.counts[g].sum())] = True
    return held[table.index]


def _fold_groups(
    labels: np.ndarray, groups: np.ndarray, table: _Groups, frac: float, seed: int
) -> np.ndarray:
    """The groups of the ``StratifiedGroupKFold`` fold closest to ``frac`` of the items; none
    when the set is too small for the number of folds ``frac`` asks (``1 / frac``)."""
    from sklearn.model_selection import StratifiedGroupKFold  # heavy import, only when splitting

    held = np.zeros(len(table.counts), dtype=bool)
    n_splits = max(2, round(1.0 / frac))
    # sklearn refuses more folds than groups, or than the largest class has members
    if n_splits > min(len(table.counts), int(table.counts.sum(axis=0).max(initial=0))):
        return held
    cv = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "least populated class has only k members"
        folds = [test for _, test in cv.split(np.zeros(len(labels)), labels, groups)]
    target = frac * len(labels)
    best = min(folds, key=lambda f: abs(len(f) - target))
    held[np.unique(table.index[best])] = True
    return held


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
