"""Reading labelled image sets: :func:`load_imageset` (one source) and :func:`load_sites` (several).

:func:`load_imageset` finds out what ``src`` is (:func:`medtune.data.readers.read_source`: class
folders, ``labels.csv``, Kaggle ``trainLabels.csv``, CSV files, npz, DICOM), adds the groups of
duplicate files (:mod:`medtune.data.grouping`) and returns an
:class:`~medtune.data.imageset.ImageSet`: stable keys, int64 labels, class names in a stable order
(:mod:`medtune.data.classes`), optional patient/duplicate groups and, for MedMNIST ``.npz`` files,
the official split. Every user-fixable problem is a one-line :class:`~medtune.errors.MedtuneError`
naming the file.
"""

from __future__ import annotations

import dataclasses
import os
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from medtune import io as mio
from medtune.data.classes import (
    build_imageset,
    check_class_counts,
    check_site_classes,
    class_sort_key,
)
from medtune.data.grade_words import resolve_grade_words
from medtune.data.grouping import with_duplicate_groups
from medtune.data.imageset import ImageSet
from medtune.data.readers import read_source
from medtune.errors import MedtuneError

__all__ = ["load_imageset", "load_sites", "site_name"]


def load_imageset(
    src: str | os.PathLike[str],
    *,
    skip_bad: bool = False,
    skipped_log: str | os.PathLike[str] | None = None,
    classes: Sequence[Any] | None = None,
    duplicates: bool = True,
    near_duplicates: int | None = None,
) -> ImageSet:
    """Read a labelled image set from a folder, a CSV file or a MedMNIST ``.npz``.

    ``src``: a class-folder root (``root/<class>/*.png``), a folder with ``labels.csv`` (columns
    ``image,label`` and optional ``patient_id``/``group``; a ``metadata.csv`` with ``dup_group``
    beside it adds duplicate groups), a folder with Kaggle ``trainLabels.csv`` (``image,level``),
    a CSV path, or an ``.npz``. ``skip_bad``: skip missing/empty/unlabelled files instead of
    raising; they are listed in ``ImageSet.skipped`` and, when given, in the ``skipped_log`` CSV
    (``path,reason``). ``classes``: the expected class list (its order is kept).
    ``duplicates``: group byte-identical files (default; one INFO log line says how many groups).
    ``near_duplicates``: also group images whose 256-bit perceptual hashes differ in at most this
    many bits (8 is a good value; decodes every image once; ``None``: off).
    """
    path = Path(os.path.abspath(os.path.expanduser(os.fspath(src))))
    if not path.exists():
        raise MedtuneError(f"{path}: data path does not exist; check the path (and the drive)")
    rows = read_source(path, skip_bad, absent_ok=classes is not None)
    if rows.paths is not None and (duplicates or near_duplicates is not None):
        rows.groups = with_duplicate_groups(
            rows.paths, rows.keys, rows.groups, path, duplicates, near_duplicates
        )
    imageset = build_imageset(rows, path, str(src), classes)
    _write_skipped(imageset, skipped_log)
    return imageset


def site_name(src: str | os.PathLike[str]) -> str:
    """The site name of a data source: its folder name, or the CSV/npz file's stem."""
    path = Path(os.path.abspath(os.path.expanduser(os.fspath(src))))
    if path.is_file() and path.name.lower() in ("labels.csv", "trainlabels.csv"):
        path = path.parent
    return (path.stem if path.is_file() else path.name) or "site"


def load_sites(
    sources: Sequence[str | os.PathLike[str]],
    *,
    skip_bad: bool = False,
    skipped_log: str | os.PathLike[str] | None = None,
    classes: Sequence[Any] | None = None,
) -> ImageSet:
    """Several labelled image sets, one per site, read as one set whose images know their site.

    Each source is read by :func:`load_imageset`. Keys become ``<site>/<key>``, groups
    ``<site>/<group>`` (an image without a group is its own group), so a patient id that two
    sites happen to share never links their images. The site of an image is the source's name
    (:func:`site_name`; a repeated name gets ``-2``, ``-3``...), or ``<name>/<site>`` where the
    source's CSV has its own ``site`` column. :func:`medtune.data.splits.make_splits` then splits
    every site separately.

    Parameters
    ----------
    sources : sequence of str or path-like
        Labelled image sets (folders, CSVs); ``.npz`` sets cannot be combined.
    skip_bad : bool, default False
        As in :func:`load_imageset`.
    skipped_log : str or path-like, optional
        One CSV (``path,reason``) listing the skipped files of every source.
    classes : sequence, optional
        The expected class list; default: the classes of all sources together, in
        :func:`load_imageset`'s order (every class needs 2 images in total).

    Returns
    -------
    ImageSet
        With ``sites`` set (one name per image); ``predefined_split`` only when every source
        has one.

    Raises
    ------
    MedtuneError
        For no sources, an ``.npz`` source, or any error of :func:`load_imageset`.
    """
    if not sources:
        raise MedtuneError("no data sources given; give at least one labelled image set")
    if len(sources) == 1 and classes is None:
        return load_imageset(sources[0], skip_bad=skip_bad, skipped_log=skipped_log)
    sets = [load_imageset(src, skip_bad=skip_bad, classes=classes) for src in sources]
    for src, imageset in zip(sources, sets, strict=True):
        if imageset.paths is None:
            raise MedtuneError(f"{src}: an .npz set cannot be combined with other sites")
    names = _unique([site_name(src) for src in sources])
    if classes is None:  # the union of the classes, relabelled to one list
        union = sorted({c for s in sets for c in s.class_names}, key=class_sort_key)
        where = Path(" + ".join(str(src) for src in sources))
        read = dict(zip(union, resolve_grade_words(union, where, _class_of(union)), strict=True))
        sets = [dataclasses.replace(s, class_names=[read[c] for c in s.class_names]) for s in sets]
        check_site_classes(sets, names)
        union = sorted(set(read.values()), key=class_sort_key)  # one site's 'Moderate' is '2'
        sets = [_relabel(s, union) for s in sets]
        check_class_counts(Path(str(sources[0])), np.concatenate([s.labels for s in sets]), union)
    combined = _concat(sets, names, [str(src) for src in sources])
    _write_skipped(combined, skipped_log)
    return combined


def _write_skipped(imageset: ImageSet, skipped_log: str | os.PathLike[str] | None) -> None:
    """Write ``imageset.skipped`` to the CSV ``skipped_log`` (``path,reason``) when given."""
    if skipped_log is not None:
        frame = pd.DataFrame(imageset.skipped, columns=["path", "reason"])
        with mio.atomic_path(skipped_log) as tmp:
            frame.to_csv(tmp, index=False)


def _class_of(names: list[str]) -> Callable[[int], str]:
    return lambda i: f"class '{names[i]}'"


def _unique(names: list[str]) -> list[str]:
    seen: Counter[str] = Counter()
    out = []
    for name in names:
        seen[name] += 1
        out.append(name if seen[name] == 1 else f"{name}-{seen[name]}")
    return out


def _relabel(imageset: ImageSet, class_names: list[str]) -> ImageSet:
    lookup = np.array([class_names.index(c) for c in imageset.class_names], dtype=np.int64)
    return dataclasses.replace(imageset, labels=lookup[imageset.labels], class_names=class_names)


def _concat(sets: list[ImageSet], names: list[str], sources: list[str]) -> ImageSet:
    keys, groups, sites, paths, labels, splits, skipped = [], [], [], [], [], [], []
    for imageset, name in zip(sets, names, strict=True):
        own = imageset.groups or [None] * len(imageset)
        inner = imageset.sites or [None] * len(imageset)
        for key, group, site in zip(imageset.keys, own, inner, strict=True):
            keys.append(f"{name}/{key}")
            groups.append(f"{name}/{group if group else 'image:' + key}")
            sites.append(name if site is None else f"{name}/{site}")
        paths += list(imageset.paths or [])
        labels.append(imageset.labels)
        splits.append(imageset.predefined_split)
        skipped += imageset.skipped
    roots = [str(s.root) for s in sets]
    return ImageSet(
        keys=keys,
        labels=np.concatenate(labels),
        class_names=list(sets[0].class_names),
        groups=groups,
        predefined_split=None if any(s is None for s in splits) else sum(splits, []),
        root=Path(os.path.commonpath(roots)) if len(set(roots)) > 1 else Path(roots[0]),
        source=" + ".join(sources),
        paths=paths,
        skipped=skipped,
        sites=sites,
    )
