"""Labelled image sets: class folders, ``labels.csv``, Kaggle ``trainLabels.csv``, CSV files, npz.

:func:`load_imageset` finds out what ``src`` is and returns an :class:`ImageSet`: stable keys,
int64 labels, class names in a stable order, optional patient/duplicate groups and, for MedMNIST
``.npz`` files, the official split. Only file existence and size are checked here (decoding 30k
images up front would be too slow); undecodable images are found when the cache is built.
Every user-fixable problem is a one-line :class:`~medtune.errors.MedtuneError` naming the file.

Folders are walked by :func:`medtune.data.images.list_image_files` (hidden/system files skipped,
every format Pillow decodes plus DICOM accepted). Class-folder sets log a warning with the count
and an example of the files they ignore, and refuse a class folder without a usable image.

Groups (kept within one split by :func:`medtune.data.splits.make_splits`) are merged with
union-find from every source that has them: a ``patient_id``/``group`` column, ``metadata.csv``
``dup_group``, Kaggle ``<id>_left/right``, DICOM ``PatientID`` (anonymised, see
:mod:`medtune.data.dicom`; used when the CSV gives no patient column) and byte-identical files.
Identical files are found by size first and a sha256 of the bytes only among same-size files, so
a set without duplicates costs one ``stat`` per file. Near-duplicates (re-encoded, resized copies)
are grouped only on request (``near_duplicates``: maximum Hamming distance of a 256-bit
perceptual hash, :func:`perceptual_duplicate_groups`), because that decodes every image once:
about 200 images/s against about 50,000 images/s for the exact check (APTOS-224, 2 cores).
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import io as _io
import logging
import os
import posixpath
import re
import unicodedata
import zipfile
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image

from medtune import io as mio
from medtune.data.dicom import patient_groups
from medtune.data.grade_words import resolve_grade_words
from medtune.data.images import (
    IMAGE_EXTENSIONS,
    ImageListing,
    is_image_file,
    list_image_files,
    load_rgb,
    warn_ignored,
)
from medtune.data.preprocess import decode_source
from medtune.errors import BadImageError, MedtuneError, offer

__all__ = ["ImageSet", "load_imageset", "load_sites", "site_name", "SPLIT_NAMES"]

SPLIT_NAMES = ("train", "val", "test")
IMAGE_COLUMNS = ("image", "id_code", "filename", "file", "path")
LABEL_COLUMNS = ("label", "level", "diagnosis", "class", "grade")
GROUP_COLUMNS = ("patient_id", "group", "patient", "dup_group")
SITE_COLUMNS = ("site",)
IMAGE_SUBDIRS = ("", "images/", "train/")  # where CSV image names are looked up, in this order
_KAGGLE_EYE = re.compile(r"^(.+)_(left|right)$", re.IGNORECASE)
_INT_LABEL = re.compile(r"^[+-]?\d+(\.0*)?$")

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- ImageSet


@dataclass
class ImageSet:
    """A labelled image set; see ``docs/architecture.md`` (data contract)."""

    keys: list[str]
    labels: np.ndarray
    class_names: list[str]
    groups: list[str] | None
    predefined_split: list[str] | None
    root: Path
    source: str
    paths: list[Path] | None = field(default=None, repr=False)
    skipped: list[tuple[str, str]] = field(default_factory=list, repr=False)
    npz: _NpzStore | None = field(default=None, repr=False)
    sites: list[str] | None = None

    def __post_init__(self) -> None:
        self.labels = np.asarray(self.labels, dtype=np.int64)
        n = len(self.keys)
        for name in ("labels", "groups", "predefined_split", "paths", "sites"):
            value = getattr(self, name)
            if value is not None and len(value) != n:
                raise ValueError(f"ImageSet.{name} has {len(value)} entries for {n} keys")
        if self.paths is None and self.npz is None:
            raise ValueError("ImageSet needs file paths or an npz store")

    def __len__(self) -> int:
        return len(self.keys)

    def load(self, i: int, max_side: int | None = None) -> Image.Image:
        """Decode image ``i`` as 8-bit RGB (JPEG draft mode when ``max_side`` is given)."""
        return decode_source(self.source_of(i), max_side)

    def source_of(self, i: int) -> str | np.ndarray:
        """What to decode for image ``i``: a file path, or the array itself for npz sets."""
        if self.paths is not None:
            return str(self.paths[i])
        assert self.npz is not None
        return self.npz.image(self.keys[i])

    def display_path(self, i: int) -> str:
        """A human-readable location of image ``i`` for error messages and logs."""
        if self.paths is not None:
            return str(self.paths[i])
        return f"{self.source}[{self.keys[i]}]"

    def identity(self, i: int) -> str:
        """Changes when image ``i`` changes: ``size:mtime_ns`` of the file, or npz hash + key."""
        if self.paths is not None:
            try:
                st = os.stat(self.paths[i])
            except OSError:
                return "missing"
            return f"{st.st_size}:{st.st_mtime_ns}"
        assert self.npz is not None
        return f"{self.npz.digest()}:{self.keys[i]}"

    def subset(self, indices: Sequence[int] | np.ndarray) -> ImageSet:
        """A new ImageSet with the given items (class names unchanged)."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)

        def pick(values: list[Any] | None) -> list[Any] | None:
            return None if values is None else [values[int(i)] for i in idx]

        return dataclasses.replace(
            self,
            keys=pick(self.keys),
            labels=self.labels[idx],
            groups=pick(self.groups),
            predefined_split=pick(self.predefined_split),
            paths=pick(self.paths),
            sites=pick(self.sites),
        )


class _NpzStore:
    """Lazily loaded arrays of a MedMNIST-style ``.npz`` (pickles as just its path)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._arrays: dict[str, np.ndarray] = {}
        self._digest: str | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path, "_arrays": {}, "_digest": self._digest}

    def image(self, key: str) -> np.ndarray:
        split, _, index = key.rpartition("/")
        name = f"{split}_images" if split else "images"
        if name not in self._arrays:
            with np.load(self.path, allow_pickle=False) as z:
                self._arrays[name] = z[name]
        return self._arrays[name][int(index)]

    def digest(self) -> str:
        """sha256 of the file contents (computed once)."""
        if self._digest is None:
            h = hashlib.sha256()
            with open(self.path, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    h.update(chunk)
            self._digest = h.hexdigest()[:16]
        return self._digest


# --------------------------------------------------------------------------- entry point


@dataclass
class _Rows:
    """Intermediate result of a source reader, before labels are turned into class indices."""

    keys: list[str]
    raw_labels: list[str]
    where: Path  # the file named in label errors
    paths: list[Path] | None = None
    groups: list[str] | None = None
    split: list[str] | None = None
    npz: _NpzStore | None = None
    row_numbers: list[int] | None = None
    skipped: list[tuple[str, str]] = field(default_factory=list)
    sites: list[str] | None = None


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
    rows = _read_source(path, skip_bad, absent_ok=classes is not None)
    if rows.paths is not None and (duplicates or near_duplicates is not None):
        rows.groups = _with_duplicate_groups(rows, path, duplicates, near_duplicates)
    imageset = _build(rows, path, str(src), classes)
    if skipped_log is not None:
        frame = pd.DataFrame(imageset.skipped, columns=["path", "reason"])
        with mio.atomic_path(skipped_log) as tmp:
            frame.to_csv(tmp, index=False)
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
        union = sorted({c for s in sets for c in s.class_names}, key=_class_sort_key)
        where = Path(" + ".join(str(src) for src in sources))
        read = dict(zip(union, resolve_grade_words(union, where, _class_of(union)), strict=True))
        sets = [dataclasses.replace(s, class_names=[read[c] for c in s.class_names]) for s in sets]
        _check_site_classes(sets, names)
        union = sorted(set(read.values()), key=_class_sort_key)  # one site's 'Moderate' is '2'
        sets = [_relabel(s, union) for s in sets]
        _check_class_counts(Path(str(sources[0])), np.concatenate([s.labels for s in sets]), union)
    combined = _concat(sets, names, [str(src) for src in sources])
    if skipped_log is not None:
        frame = pd.DataFrame(combined.skipped, columns=["path", "reason"])
        with mio.atomic_path(skipped_log) as tmp:
            frame.to_csv(tmp, index=False)
    return combined


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


def _read_source(path: Path, skip_bad: bool, absent_ok: bool = False) -> _Rows:
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix == ".npz":
            return _read_npz(path)
        if suffix in (".csv", ".tsv", ".txt"):
            # labels.csv / trainLabels.csv given directly behave as if their folder was given;
            # any other CSV may list a subset of the folder (e.g. train.csv), so no stray check
            name = path.name.lower()
            standard = name in ("labels.csv", "trainlabels.csv")
            kaggle = name == "trainlabels.csv"
            return _read_csv_source(
                path, path.parent, skip_bad, check_unlabelled=standard, kaggle=kaggle
            )
        raise MedtuneError(
            f"{path}: unsupported data file; give a folder, a CSV (image,label) or an .npz"
        )
    for name, kaggle in (("labels.csv", False), ("trainlabels.csv", True)):
        csv = _find_child(path, name)
        if csv is not None:
            return _read_csv_source(csv, path, skip_bad, check_unlabelled=True, kaggle=kaggle)
    return _read_class_folders(path, skip_bad, absent_ok)


def _find_child(folder: Path, name: str) -> Path | None:
    """The file in ``folder`` whose name equals ``name`` case-insensitively (exact match first)."""
    exact = folder / name
    if exact.is_file():
        return exact
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        if entry.is_file() and entry.name.lower() == name.lower():
            return Path(entry.path)
    return None


# --------------------------------------------------------------------------- file listing


def _nfc(text: str) -> str:
    return unicodedata.normalize("NFC", text)


class _FileIndex:
    """Looks up CSV image names among the files under ``root`` (exact, case-insensitive, stem)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.files = list_image_files(root).files
        self.exact = {_nfc(f): f for f in self.files}
        self.folded: dict[str, list[str]] = {}
        self.stems: dict[str, list[str]] = {}
        for f in self.files:
            norm = _nfc(f).casefold()
            self.folded.setdefault(norm, []).append(f)
            self.stems.setdefault(posixpath.splitext(norm)[0], []).append(f)

    def find(self, name: str) -> str | None:
        """The relative path of the file ``name`` refers to, or ``None``."""
        table = self.folded if is_image_file(name) else self.stems  # no extension: try them all
        for prefix in IMAGE_SUBDIRS:
            rel = _nfc(posixpath.normpath(prefix + name))
            if rel in self.exact:
                return self.exact[rel]
            hits = table.get(rel.casefold())
            if hits:
                order = {e: i for i, e in enumerate(IMAGE_EXTENSIONS)}
                last = len(order)  # extensionless DICOM
                return min(
                    hits, key=lambda h: (order.get(posixpath.splitext(h)[1].lower(), last), h)
                )
        return None


def _relative_name(name: str, root: Path, where: Path, row: int) -> str:
    """Normalise a CSV image name to a path relative to ``root``; refuse names escaping it."""
    name = name.replace("\\", "/")
    if os.path.isabs(name):
        rel = os.path.relpath(os.path.normpath(name), root).replace(os.sep, "/")
    else:
        rel = posixpath.normpath(name)
    if rel == ".." or rel.startswith("../") or os.path.isabs(rel):
        raise MedtuneError(
            f"{where}: row {row}: image path '{name}' points outside the data folder {root}; "
            "image paths must be relative to the CSV's folder"
        )
    return rel


# --------------------------------------------------------------------------- CSV sources


def read_table(path: Path) -> pd.DataFrame:
    """Read a small CSV: UTF-8 (BOM ok), ``,``/``;``/tab sniffed, headers stripped + lowercased."""
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise MedtuneError(
            f"{path}: not UTF-8 text (byte {err.start}); save the CSV as UTF-8"
        ) from None
    first = next((line for line in text.splitlines() if line.strip()), "")
    sep = max((",", ";", "\t"), key=first.count) if first else ","
    try:
        frame = pd.read_csv(
            _io.StringIO(text), sep=sep, dtype=str, keep_default_na=False, skip_blank_lines=True
        )
    except (pd.errors.ParserError, pd.errors.EmptyDataError, ValueError) as err:
        msg = " ".join(str(err).split())
        raise MedtuneError(f"{path}: cannot parse CSV ({msg}); fix the file") from None
    frame.columns = [str(c).strip().lower() for c in frame.columns]
    dup = [c for c, n in Counter(frame.columns).items() if n > 1]
    if dup:
        raise MedtuneError(f"{path}: column '{dup[0]}' appears twice; rename one of them")
    for col in frame.columns:
        frame[col] = frame[col].str.strip()
    return frame


def _pick_column(frame: pd.DataFrame, names: Sequence[str]) -> str | None:
    return next((n for n in names if n in frame.columns), None)


def _required_columns(frame: pd.DataFrame, path: Path, kaggle: bool) -> tuple[str, str]:
    image_col = _pick_column(frame, IMAGE_COLUMNS)
    label_col = _pick_column(frame, LABEL_COLUMNS)
    if image_col is None or label_col is None:
        missing = [n for n, c in (("image", image_col), ("label", label_col)) if c is None]
        need = "image,level" if kaggle else "image,label (optional patient_id or group)"
        found = ",".join(frame.columns) or "none"
        raise MedtuneError(
            f"{path}: missing column(s) {', '.join(missing)}; found columns: {found}; "
            f"the CSV needs columns {need}"
        )
    return image_col, label_col


def _read_csv_source(
    csv: Path, root: Path, skip_bad: bool, *, check_unlabelled: bool, kaggle: bool = False
) -> _Rows:
    frame = read_table(csv)
    image_col, label_col = _required_columns(frame, csv, kaggle)
    if frame.empty:
        raise MedtuneError(f"{csv}: the CSV has no rows; add one row per image")
    names = frame[image_col].tolist()
    row_numbers = list(range(2, len(frame) + 2))
    _check_duplicates(csv, names, row_numbers)
    index = _FileIndex(root)
    rows = _Rows(keys=[], raw_labels=[], where=csv, paths=[], row_numbers=[])
    missing: list[tuple[int, str]] = []
    keep: list[int] = []
    for pos, (name, row) in enumerate(zip(names, row_numbers, strict=True)):
        if not name:
            raise MedtuneError(f"{csv}: row {row}: empty image name; fill it in or delete the row")
        found = index.find(_relative_name(name, root, csv, row))
        if found is None:
            missing.append((row, name))
            continue
        keep.append(pos)
        rows.keys.append(found)
    _report_missing(csv, index, missing, skip_bad, rows)
    _check_duplicates(csv, rows.keys, [row_numbers[p] for p in keep], resolved=True)
    rows.raw_labels = [frame[label_col].iat[p] for p in keep]
    rows.row_numbers = [row_numbers[p] for p in keep]
    rows.paths = [root / k for k in rows.keys]
    rows.groups = _groups_for(frame, csv, keep, rows.keys, kaggle, rows.paths)
    rows.sites = _sites_for(frame, csv, keep, rows.row_numbers)
    if check_unlabelled:
        _check_unlabelled(csv, root, index, rows, skip_bad)
    return _drop_empty_files(rows, skip_bad)


def _check_duplicates(
    csv: Path, names: list[str], row_numbers: list[int], resolved: bool = False
) -> None:
    seen: dict[str, int] = {}
    for name, row in zip(names, row_numbers, strict=True):
        norm = _nfc(name)
        if norm in seen:
            what = "refer to the same file" if resolved else "list the same image"
            raise MedtuneError(
                f"{csv}: rows {seen[norm]} and {row} {what} '{name}'; remove the duplicate row"
            )
        seen[norm] = row


def _report_missing(
    csv: Path, index: _FileIndex, missing: list[tuple[int, str]], skip_bad: bool, rows: _Rows
) -> None:
    root = index.root
    if not missing:
        return
    if skip_bad:
        rows.skipped.extend((str(root / name), "image file not found") for _, name in missing)
        return
    row, name = missing[0]
    more = f" (and {len(missing) - 1} more rows)" if len(missing) > 1 else ""
    raise MedtuneError(
        f"{csv}: row {row}: image file '{name}' not found in {root} or its images/ or train/ "
        f"subfolder{more}{_other_extension(index, name)}; fix the CSV or add the file"
        + offer(", or pass {} to skip missing images", "--skip-bad")
    )


def _other_extension(index: _FileIndex, name: str) -> str:
    """``" (there is 'eye0.jpg'; ...)"`` when a file named like ``name`` but with another
    extension exists (a CSV naming ``eye0.png`` beside ``eye0.jpg``), else ``""``."""
    stem = posixpath.splitext(name.replace("\\", "/"))[0]
    for prefix in IMAGE_SUBDIRS:
        hits = index.stems.get(_nfc(posixpath.normpath(prefix + stem)).casefold())
        if hits:
            return f" (there is '{hits[0]}': correct the extension in the CSV)"
    return ""


def _check_unlabelled(
    csv: Path, root: Path, index: _FileIndex, rows: _Rows, skip_bad: bool
) -> None:
    """Image files next to labelled ones but without a label row: an error unless skipped."""
    labelled = set(rows.keys)
    folders = {posixpath.dirname(k) for k in rows.keys}
    extra = [f for f in index.files if f not in labelled and posixpath.dirname(f) in folders]
    if not extra:
        return
    if skip_bad:
        rows.skipped.extend((str(root / f), "no label row") for f in extra)
        return
    folder = root / posixpath.dirname(extra[0])
    raise MedtuneError(
        f"{csv}: {len(extra)} image file(s) in {folder} have no label row, e.g. "
        f"'{posixpath.basename(extra[0])}'; add them to {csv.name} or move them out"
        + offer(", or pass {} to skip them", "--skip-bad")
    )


def _drop_empty_files(rows: _Rows, skip_bad: bool) -> _Rows:
    assert rows.paths is not None
    empty = [i for i, p in enumerate(rows.paths) if _is_empty(p)]
    if not empty:
        return rows
    if not skip_bad:
        raise BadImageError(rows.paths[empty[0]], "empty file")
    rows.skipped.extend((str(rows.paths[i]), "empty file") for i in empty)
    keep = sorted(set(range(len(rows.keys))) - set(empty))
    return dataclasses.replace(
        rows,
        keys=[rows.keys[i] for i in keep],
        raw_labels=[rows.raw_labels[i] for i in keep],
        paths=[rows.paths[i] for i in keep],
        groups=None if rows.groups is None else [rows.groups[i] for i in keep],
        split=None if rows.split is None else [rows.split[i] for i in keep],
        row_numbers=None if rows.row_numbers is None else [rows.row_numbers[i] for i in keep],
        sites=None if rows.sites is None else [rows.sites[i] for i in keep],
    )


def _is_empty(path: Path) -> bool:
    try:
        return os.stat(path).st_size == 0
    except OSError:
        return True


# --------------------------------------------------------------------------- groups


def _groups_for(
    frame: pd.DataFrame,
    csv: Path,
    keep: list[int],
    keys: list[str],
    kaggle: bool,
    paths: list[Path],
) -> list[str] | None:
    """Group ids: a patient/group column (else DICOM PatientID), ``metadata.csv`` dup groups,
    Kaggle ``<id>_left``."""
    sources: list[list[str]] = []
    col = _pick_column(frame, GROUP_COLUMNS)
    if col is not None:
        sources.append([frame[col].iat[p] for p in keep])
    dup = _metadata_dup_groups(csv, frame, keep)
    if dup is not None:
        sources.append(dup)
    if col is None:
        dicom = patient_groups(paths) if _any_dicom(paths) else None
        if dicom is not None:
            sources.append(dicom)
    if kaggle and col is None:
        eyes = [_KAGGLE_EYE.match(posixpath.splitext(posixpath.basename(k))[0]) for k in keys]
        if any(eyes):
            sources.append([m.group(1) if m else "" for m in eyes])
    if not sources:
        return None
    return _merge_groups(sources, keys)


def _sites_for(
    frame: pd.DataFrame, csv: Path, keep: list[int], row_numbers: list[int]
) -> list[str] | None:
    """The ``site`` column (where each image was taken), or ``None`` when the CSV has none."""
    col = _pick_column(frame, SITE_COLUMNS)
    if col is None:
        return None
    sites = [str(frame[col].iat[p]).strip() for p in keep]
    for site, row in zip(sites, row_numbers, strict=True):
        if not site:
            raise MedtuneError(
                f"{csv}: row {row}: empty site; fill in the site of every image or drop the "
                "site column"
            )
    return sites


def _metadata_dup_groups(csv: Path, frame: pd.DataFrame, keep: list[int]) -> list[str] | None:
    """``dup_group`` from a ``metadata.csv`` beside the labels CSV, aligned to the kept rows."""
    meta_path = _find_child(csv.parent, "metadata.csv")
    if meta_path is None or meta_path.samefile(csv):
        return None
    meta = read_table(meta_path)
    image_col = _pick_column(meta, IMAGE_COLUMNS)
    if image_col is None or "dup_group" not in meta.columns:
        return None
    lookup = dict(zip(meta[image_col].map(_nfc), meta["dup_group"], strict=True))
    image_col_labels = _pick_column(frame, IMAGE_COLUMNS)
    return [lookup.get(_nfc(frame[image_col_labels].iat[p]), "") for p in keep]


def _merge_groups(sources: list[list[str]], keys: list[str]) -> list[str]:
    """Combine group columns: images sharing any group id end up in one group (union-find)."""
    if len(sources) == 1:
        return [g if g else f"image:{k}" for g, k in zip(sources[0], keys, strict=True)]
    parent: dict[str, str] = {}

    def find(x: str) -> str:
        while parent.setdefault(x, x) != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    per_image: list[list[str]] = []
    for i, key in enumerate(keys):
        nodes = [f"{j}:{src[i]}" for j, src in enumerate(sources) if src[i]] or [f"image:{key}"]
        for node in nodes[1:]:
            parent[find(node)] = find(nodes[0])
        per_image.append(nodes)
    return [find(nodes[0]) for nodes in per_image]


def _any_dicom(paths: Sequence[Path | str]) -> bool:
    """True when some file is DICOM by extension or has no extension (maybe preamble DICOM)."""
    from medtune.data.dicom import is_dicom_path

    return any(is_dicom_path(p) for p in paths)


def _with_duplicate_groups(
    rows: _Rows, path: Path, exact: bool, near: int | None
) -> list[str] | None:
    """``rows.groups`` merged (union-find) with groups of identical / near-identical files."""
    assert rows.paths is not None
    sources = [] if rows.groups is None else [rows.groups]
    n_before = len(sources)
    if exact:
        dup, n_groups, n_files = content_duplicate_groups(rows.paths)
        if n_groups:
            log.info(
                "%s: %d groups of byte-identical files (%d files) found; each group is kept "
                "within one split",
                path,
                n_groups,
                n_files,
            )
            sources.append(dup)
    if near is not None:
        dup, n_groups, n_files = perceptual_duplicate_groups(rows.paths, near)
        if n_groups:
            log.info(
                "%s: %d groups of near-identical images (%d files, pHash distance <= %d) found; "
                "each group is kept within one split",
                path,
                n_groups,
                n_files,
                near,
            )
            sources.append(dup)
    if len(sources) == n_before:
        return rows.groups
    return _merge_groups(sources, rows.keys)


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _label_components(
    n: int, pairs: list[tuple[int, int]], prefix: str
) -> tuple[list[str], int, int]:
    """Connected components of ``pairs`` as group ids (``""`` for items in no pair)."""
    parent = list(range(n))

    def find(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for a, b in pairs:
        parent[find(a)] = find(b)
    members: dict[int, list[int]] = defaultdict(list)
    for i in range(n):
        members[find(i)].append(i)
    out = [""] * n
    n_groups = n_files = 0
    for group in members.values():
        if len(group) > 1:
            n_groups += 1
            n_files += len(group)
            for i in group:
                out[i] = f"{prefix}:{group[0]}"
    return out, n_groups, n_files


def content_duplicate_groups(paths: Sequence[Path]) -> tuple[list[str], int, int]:
    """Group byte-identical files.

    Files are bucketed by size (one ``stat`` each); only files sharing a size are hashed
    (:mod:`hashlib` sha256 of the bytes), so nothing is decoded.

    Parameters
    ----------
    paths : sequence of Path
        The image files.

    Returns
    -------
    groups : list of str
        ``"dup:<index>"`` per file in a group of identical files, ``""`` for unique files.
    n_groups, n_files : int
        Number of groups and of files in them.
    """
    by_size: dict[int, list[int]] = defaultdict(list)
    for i, p in enumerate(paths):
        try:
            by_size[os.stat(p).st_size].append(i)
        except OSError:
            continue  # missing files are reported by the reader / decoder
    pairs: list[tuple[int, int]] = []
    for same_size in by_size.values():
        if len(same_size) < 2:
            continue
        by_hash: dict[str, int] = {}
        for i in same_size:
            try:
                digest = _file_sha256(paths[i])
            except OSError:
                continue
            if digest in by_hash:
                pairs.append((by_hash[digest], i))
            else:
                by_hash[digest] = i
    return _label_components(len(paths), pairs, "dup")


PHASH_SIZE = 16  # 16 x 16 = 256-bit hashes; 64-bit ones link different fundus photos (see below)


def perceptual_duplicate_groups(
    paths: Sequence[Path], max_distance: int = 8
) -> tuple[list[str], int, int]:
    """Group near-identical images (re-encoded, resized copies) by perceptual hash.

    Each image is decoded once at reduced size (JPEG DCT scaling, see :func:`load_rgb`) and
    hashed with ``imagehash.phash(hash_size=16)``: the DCT-based perceptual hash of Zauner,
    "Implementation and benchmarking of perceptual image hash functions" (2010), here with 256
    bits. Images whose hashes differ in at most ``max_distance`` bits are grouped, transitively.
    The default 64-bit hash is too coarse for fundus photos: on APTOS-224 it linked photos of
    different eyes even at distance 0, while the 256-bit hash found all 118 pairs of the
    set's curated duplicate list at distance <= 8 and no other pair up to 12. Unreadable files
    are left alone (the decoder reports them later).

    Parameters
    ----------
    paths : sequence of Path
        The image files.
    max_distance : int
        Largest Hamming distance (bits, 0..256) still counted as a duplicate; default 8.

    Returns
    -------
    groups : list of str
        ``"near:<index>"`` per grouped file, ``""`` otherwise.
    n_groups, n_files : int
        Number of groups and of files in them.
    """
    import imagehash

    n_bytes = PHASH_SIZE * PHASH_SIZE // 8
    hashes = np.zeros((len(paths), n_bytes), dtype=np.uint8)
    valid = np.zeros(len(paths), dtype=bool)
    for i, p in enumerate(paths):
        try:
            img = load_rgb(p, max_side=8 * PHASH_SIZE)
        except BadImageError:
            continue
        hashes[i] = np.packbits(imagehash.phash(img, hash_size=PHASH_SIZE).hash.reshape(-1))
        valid[i] = True
    words = hashes.view(np.uint64)  # n x 4
    idx = np.flatnonzero(valid)
    pairs: list[tuple[int, int]] = []
    for pos, i in enumerate(idx[:-1]):
        rest = idx[pos + 1 :]
        dist = _popcount(words[rest] ^ words[i]).sum(axis=1)
        pairs.extend((int(i), int(j)) for j in rest[dist <= max_distance])
    return _label_components(len(paths), pairs, "near")


def _popcount(x: np.ndarray) -> np.ndarray:
    """Set bits per element of a uint64 array (same shape)."""
    if hasattr(np, "bitwise_count"):  # NumPy >= 2.0
        return np.bitwise_count(x)
    bits = np.unpackbits(x.view(np.uint8).reshape(*x.shape, 8), axis=-1)
    return bits.sum(axis=-1)


# --------------------------------------------------------------------------- class folders


#: Folder names of an already-split layout (``root/train/<class>/``, ``root/valid/<class>/``,
#: the common Kaggle layout), mapped to medtune's split names.
SPLIT_FOLDERS = {
    "train": "train",
    "training": "train",
    "val": "val",
    "valid": "val",
    "validation": "val",
    "dev": "val",
    "test": "test",
    "testing": "test",
}


def _split_layout(folders: list[str]) -> bool:
    """Whether the top-level folders are split names (train/valid/test) rather than classes."""
    names = {f.lower() for f in folders}
    return bool(names) and names <= set(SPLIT_FOLDERS) and "train" in names | {"training"}


def _read_split_folders(root: Path, listing: ImageListing, skip_bad: bool) -> _Rows:
    """``root/<split>/<class>/<image>``: the folders give the split and the class of each image."""
    files = [f for f in listing.files if f.count("/") >= 2]
    loose = [f for f in listing.files if f.count("/") < 2]
    if loose:
        warn_ignored(root, loose, "image (outside any <split>/<class>/ folder)")
    warn_ignored(root, listing.ignored)
    if not files:
        raise MedtuneError(
            f"{root}: split folders ({', '.join(listing.folders)}) hold no <class>/ folders with "
            f"images; put images in {root}/train/<class>/ and {root}/valid/<class>/"
        )
    rows = _Rows(
        keys=files,
        raw_labels=[f.split("/")[1] for f in files],
        where=root,
        paths=[root / f for f in files],
        split=[SPLIT_FOLDERS[f.split("/", 1)[0].lower()] for f in files],
    )
    rows = _drop_empty_files(rows, skip_bad)
    log.info(
        "%s: already split (%s): those folders are the train/val/test splits",
        root,
        ", ".join(listing.folders),
    )
    if _any_dicom(rows.paths or []):
        rows.groups = patient_groups(rows.paths or [])
    return rows


def _read_class_folders(root: Path, skip_bad: bool, absent_ok: bool = False) -> _Rows:
    listing = list_image_files(root)
    if _split_layout(listing.folders):
        return _read_split_folders(root, listing, skip_bad)
    files = [f for f in listing.files if "/" in f]
    if not files:
        raise MedtuneError(
            f"{root}: no labels.csv, trainLabels.csv or class subfolders with images (any format "
            f"Pillow reads, or DICOM); put images in {root}/<class>/ or add a labels.csv"
        )
    outside = [f for f in listing.files if "/" not in f]
    if outside:
        warn_ignored(root, outside, "image (outside any class folder)")
    warn_ignored(root, listing.ignored)
    rows = _Rows(
        keys=files,
        raw_labels=[f.split("/", 1)[0] for f in files],
        where=root,
        paths=[root / f for f in files],
    )
    if not absent_ok:  # else said once below, as an absent class
        _check_class_folders(root, listing.folders, files, listing.ignored, "")
    rows = _drop_empty_files(rows, skip_bad)
    skipped = "" if absent_ok else " (all were skipped)"
    _check_class_folders(root, listing.folders, rows.keys, listing.ignored, skipped, absent_ok)
    if _any_dicom(rows.paths or []):
        rows.groups = patient_groups(rows.paths or [])
    return rows


def _check_class_folders(
    root: Path,
    folders: list[str],
    files: list[str],
    ignored: list[str],
    why: str,
    absent_ok: bool = False,
) -> None:
    """Refuse a class folder that holds no usable image (e.g. only unsupported files).

    With ``absent_ok`` (a set labelled with a model's classes: ``--val-data``, ``--test-data``,
    ``evaluate --data``) such a folder is a class absent from the set, said in a warning, as a
    class without a folder is.
    """
    used = {f.split("/", 1)[0] for f in files}
    for folder in folders:
        if folder in used:
            continue
        other = [f for f in ignored if f.startswith(folder + "/")]
        detail = f"{len(other)} other file(s), e.g. {other[0]}" if other else "it is empty"
        if absent_ok:
            log.warning(
                "%s: class folder has no usable image%s (%s); class '%s' is absent from this set",
                root / folder,
                why,
                detail,
                folder,
            )
            continue
        raise MedtuneError(
            f"{root / folder}: class folder has no usable image{why} ({detail}); add images "
            f"(any format Pillow reads, or DICOM), or move the folder out of {root}"
        )


# --------------------------------------------------------------------------- npz


def _npz_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Array shapes of an ``.npz`` without reading the data."""
    shapes: dict[str, tuple[int, ...]] = {}
    try:
        with zipfile.ZipFile(path) as zf:
            for member in zf.namelist():
                if not member.endswith(".npy"):
                    continue
                with zf.open(member) as fh:
                    version = np.lib.format.read_magic(fh)
                    reader = (
                        np.lib.format.read_array_header_1_0
                        if version == (1, 0)
                        else np.lib.format.read_array_header_2_0
                    )
                    shapes[member[:-4]] = tuple(reader(fh)[0])
    except (zipfile.BadZipFile, ValueError, OSError) as err:
        raise MedtuneError(f"{path}: not a readable .npz file ({err}); re-download it") from None
    return shapes


def _read_npz(path: Path) -> _Rows:
    shapes = _npz_shapes(path)
    splits = [s for s in SPLIT_NAMES if f"{s}_images" in shapes]
    prefixes = [f"{s}_" for s in splits] or ([""] if "images" in shapes else [])
    if not prefixes:
        found = ", ".join(sorted(shapes)) or "none"
        raise MedtuneError(
            f"{path}: no train_images/train_labels (or images/labels) arrays, found: {found}; "
            "give a MedMNIST-style .npz"
        )
    keys: list[str] = []
    labels: list[str] = []
    split: list[str] = []
    with np.load(path, allow_pickle=False) as z:
        for prefix, name in zip(prefixes, splits or [""], strict=True):
            lab = _npz_labels(path, z, prefix, shapes)
            n = len(lab)
            keys.extend(f"{name}/{i}" if name else str(i) for i in range(n))
            labels.extend(str(int(v)) for v in lab)
            split.extend([name] * n)
    return _Rows(
        keys=keys,
        raw_labels=labels,
        where=path,
        split=split if splits else None,
        npz=_NpzStore(path),
    )


def _npz_labels(path: Path, z: Any, prefix: str, shapes: dict[str, tuple[int, ...]]) -> np.ndarray:
    img_shape = shapes[f"{prefix}images"]
    if f"{prefix}labels" not in shapes:
        raise MedtuneError(f"{path}: has {prefix}images but no {prefix}labels; re-export it")
    lab = np.asarray(z[f"{prefix}labels"])
    if lab.ndim == 2 and lab.shape[1] == 1:
        lab = lab[:, 0]
    if lab.ndim != 1:
        raise MedtuneError(
            f"{path}: {prefix}labels has shape {lab.shape}; multi-label data is not supported, "
            "give one integer class per image"
        )
    ok_img = len(img_shape) == 3 or (len(img_shape) == 4 and img_shape[3] in (1, 3, 4))
    if not ok_img or img_shape[0] != len(lab):
        raise MedtuneError(
            f"{path}: {prefix}images has shape {img_shape} for {len(lab)} labels; expected "
            "(N, H, W) or (N, H, W, 3) with one label per image"
        )
    if lab.dtype.kind not in "iub":
        raise MedtuneError(f"{path}: {prefix}labels are {lab.dtype}, expected integer classes")
    return lab


# --------------------------------------------------------------------------- labels


def _canon(value: Any) -> str:
    """Canonical label text: integral numbers as plain ints ('2.0' -> '2'), others stripped."""
    text = str(value).strip()
    if _INT_LABEL.match(text):
        return str(int(float(text)))
    return text


def _class_sort_key(name: str) -> tuple[int, int, str]:
    return (0, int(name), "") if re.fullmatch(r"[+-]?\d+", name) else (1, 0, name)


def _build(rows: _Rows, path: Path, source: str, classes: Sequence[Any] | None) -> ImageSet:
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
        class_names = sorted(set(raw), key=_class_sort_key)
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
        _check_class_counts(rows.where, labels, class_names)
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
    return re.sub(r"[\W_]+", "", _nfc(name).casefold())


def _nearest_hint(name: str, choices: Sequence[str]) -> str:
    """``" (nearest: 'Grade 0')"`` for the choice closest to ``name`` (difflib), else ``""``."""
    folded = {_fold_name(c): c for c in choices}
    if _fold_name(name) in folded:
        return f" (nearest: '{folded[_fold_name(name)]}')"
    close = difflib.get_close_matches(_fold_name(name), list(folded), n=1, cutoff=0.6)
    return f" (nearest: '{folded[close[0]]}')" if close else ""


def _check_split_classes(rows: _Rows, raw: list[str]) -> None:
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


def _check_site_classes(sets: Sequence[ImageSet], names: list[str]) -> None:
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


def _check_class_counts(where: Path, labels: np.ndarray, class_names: list[str]) -> None:
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
