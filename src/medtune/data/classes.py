"""Labels to classes: canonical label text, the order of the classes, and the checks of both.

:func:`build_imageset` turns a reader's :class:`~medtune.data.readers.Rows` (labels as written)
into an :class:`~medtune.data.imageset.ImageSet` (int64 labels, class names in a stable order:
integers by value, then names), refusing empty labels, labels outside a given class list, a class
with fewer than 2 images and a class named differently in two splits or sites, each with a hint
at the nearest class name (:mod:`difflib`).
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from medtune.data.grade_words import resolve_grade_words
from medtune.data.imageset import ImageSet
from medtune.data.readers import Rows
from medtune.data.tables import nfc
from medtune.errors import MedtuneError

__all__ = ["build_imageset", "check_class_counts", "check_site_classes", "class_sort_key"]

_INT_LABEL = re.compile(r"^[+-]?\d+(\.0*)?$")


def _canon(value: Any) -> str:
    """Canonical label text: integral numbers as plain ints ('2.0' -> '2'), others stripped."""
    text = str(value).strip()
    if _INT_LABEL.match(text):
        return str(int(float(text)))
    return text


def class_sort_key(name: str) -> tuple[int, int, str]:
    """Sort key of a class name: integers by value first, then other names alphabetically."""
    return (0, int(name), "") if re.fullmatch(r"[+-]?\d+", name) else (1, 0, name)


def build_imageset(rows: Rows, path: Path, source: str, classes: Sequence[Any] | None) -> ImageSet:
    """The :class:`ImageSet` of a reader's rows: labels turned into class indices, and checked.

    Parameters
    ----------
    rows : Rows
        What :func:`medtune.data.readers.read_source` read.
    path : Path
        The data source (its folder, or the file's folder, becomes ``ImageSet.root``).
    source : str
        The source as the user gave it (``ImageSet.source``).
    classes : sequence, optional
        The expected class list, in its order (labels outside it are refused; classes absent
        from the set are allowed); default: the labels found, in :func:`class_sort_key` order,
        each with at least 2 images.

    Returns
    -------
    ImageSet

    Raises
    ------
    MedtuneError
        For an empty label, a label outside ``classes``, a class of a validation/test folder
        absent from training, fewer than 2 classes or a class with fewer than 2 images.
    """
    raw = [_canon(v) for v in rows.raw_labels]
    numbers = rows.row_numbers

    def row_of(i: int) -> str:
        return f"row {numbers[i]}" if numbers else f"image '{rows.keys[i]}'"

    for i, value in enumerate(raw):
        if not value:
            raise MedtuneError(
                f"{rows.where}: {row_of(i)}: empty label; fill it in or delete the row"
            )
    given = None if classes is None else [_canon(c) for c in classes]
    raw = resolve_grade_words(raw, rows.where, row_of, given)  # 'Moderate' among 0, 2 -> '2'
    if given is not None:
        class_names = given
        if len(set(class_names)) != len(class_names):
            raise MedtuneError(f"{rows.where}: the given classes {class_names} contain duplicates")
    else:
        class_names = sorted(set(raw), key=class_sort_key)
    lookup = {c: i for i, c in enumerate(class_names)}
    for i, value in enumerate(raw):
        if value not in lookup:
            row = row_of(i)
            raise MedtuneError(
                f"{rows.where}: {row}: label '{value}' is not one of the classes {class_names}"
                f"{_nearest_hint(value, class_names)}; fix the label or the class list"
            )
    if classes is None:
        _check_split_classes(rows, raw)
    labels = np.array([lookup[v] for v in raw], dtype=np.int64)
    if classes is None:  # a set labelled with a model's classes may lack some of them
        check_class_counts(rows.where, labels, class_names)
    elif len(labels) == 0:
        raise MedtuneError(f"{rows.where}: no labelled images; check the path")
    return ImageSet(
        keys=rows.keys,
        labels=labels,
        class_names=class_names,
        groups=rows.groups,
        predefined_split=rows.split,
        root=path if path.is_dir() else path.parent,
        source=source,
        paths=rows.paths,
        skipped=rows.skipped,
        npz=rows.npz,
        sites=rows.sites,
    )


def _fold_name(name: str) -> str:
    """A class name without case, spaces and punctuation: ``'Grade 0'`` and ``'grade_0'`` meet."""
    return re.sub(r"[\W_]+", "", nfc(name).casefold())


def _nearest_hint(name: str, choices: Sequence[str]) -> str:
    """``" (nearest: 'Grade 0')"`` for the choice closest to ``name`` (difflib), else ``""``."""
    folded = {_fold_name(c): c for c in choices}
    if _fold_name(name) in folded:
        return f" (nearest: '{folded[_fold_name(name)]}')"
    close = difflib.get_close_matches(_fold_name(name), list(folded), n=1, cutoff=0.6)
    return f" (nearest: '{folded[close[0]]}')" if close else ""


def _check_split_classes(rows: Rows, raw: list[str]) -> None:
    """In an already-split layout, refuse a validation/test class folder with no training folder
    (``valid/grade_0`` beside ``train/Grade 0``): it would become a class the model never sees."""
    if rows.split is None or rows.paths is None:
        return
    trained = sorted({v for v, s in zip(raw, rows.split, strict=True) if s == "train"})
    for key, value, split in zip(rows.keys, raw, rows.split, strict=True):
        if split == "train" or value in trained:
            continue
        folder = rows.where / "/".join(key.split("/")[:2])
        raise MedtuneError(
            f"{folder}: class '{value}' has no folder in the training split "
            f"(training classes: {', '.join(trained)}){_nearest_hint(value, trained)}; rename "
            "the folder so that every split names its classes alike"
        )


def check_site_classes(sets: Sequence[ImageSet], names: list[str]) -> None:
    """Refuse two sites naming one class differently (``'Grade 0'`` and ``'grade_0'``)."""
    seen: dict[str, tuple[str, str]] = {}
    for imageset, site in zip(sets, names, strict=True):
        for name in imageset.class_names:
            first = seen.setdefault(_fold_name(name), (name, site))
            if first[0] != name:
                raise MedtuneError(
                    f"{imageset.root}: class '{name}' of site '{site}' and class '{first[0]}' "
                    f"of site '{first[1]}' differ only in case, spaces or punctuation; rename "
                    "one so that every site names its classes alike"
                )


def check_class_counts(where: Path, labels: np.ndarray, class_names: list[str]) -> None:
    """Refuse fewer than 2 classes present, or a class with fewer than 2 images."""
    counts = np.bincount(labels, minlength=len(class_names))
    present = [c for c, n in zip(class_names, counts, strict=True) if n > 0]
    if len(present) < 2:
        only = f"('{present[0]}')" if present else "(none)"
        raise MedtuneError(
            f"{where}: only one class {only} found; a classifier needs at least 2 classes "
            "(check the label column or the class folders)"
        )
    for name, n in zip(class_names, counts, strict=True):
        if n < 2:
            raise MedtuneError(
                f"{where}: class '{name}' has {n} image(s); every class needs at least 2 "
                "(add images, merge the class into another, or remove it)"
            )
