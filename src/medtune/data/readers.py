"""The layout readers: class folders, split folders, ``labels.csv``, Kaggle ``trainLabels.csv``,
other CSV files, MedMNIST ``.npz`` and DICOM sets.

:func:`read_source` finds out what a path is and returns its :class:`Rows`: keys, raw labels (as
written), files, groups, sites and, for ``.npz`` files, the official split.
:func:`medtune.data.sources.load_imageset` turns them into an
:class:`~medtune.data.imageset.ImageSet`. Only file existence and size are checked here (decoding
30k images up front would be too slow); undecodable images are found when the cache is built.
Every user-fixable problem is a one-line :class:`~medtune.errors.MedtuneError` naming the file.

Folders are walked by :func:`medtune.data.images.list_image_files` (hidden/system files skipped,
every format Pillow decodes plus DICOM accepted). Class-folder sets log a warning with the count
and an example of the files they ignore, and refuse a class folder without a usable image.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import posixpath
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from medtune.data.dicom import patient_groups
from medtune.data.grouping import any_dicom, table_groups
from medtune.data.images import (
    IMAGE_EXTENSIONS,
    ImageListing,
    is_image_file,
    list_image_files,
    warn_ignored,
)
from medtune.data.imageset import SPLIT_NAMES, NpzStore
from medtune.data.tables import (
    IMAGE_COLUMNS,
    LABEL_COLUMNS,
    SITE_COLUMNS,
    find_child,
    nfc,
    pick_column,
    read_table,
)
from medtune.errors import BadImageError, MedtuneError, offer

__all__ = ["SPLIT_FOLDERS", "Rows", "read_source"]

IMAGE_SUBDIRS = ("", "images/", "train/")  # where CSV image names are looked up, in this order

log = logging.getLogger(__name__)


@dataclass
class Rows:
    """Intermediate result of a source reader, before labels are turned into class indices."""

    keys: list[str]
    raw_labels: list[str]
    where: Path  # the file named in label errors
    paths: list[Path] | None = None
    groups: list[str] | None = None
    split: list[str] | None = None
    npz: NpzStore | None = None
    row_numbers: list[int] | None = None
    skipped: list[tuple[str, str]] = field(default_factory=list)
    sites: list[str] | None = None


def read_source(path: Path, skip_bad: bool, absent_ok: bool = False) -> Rows:
    """The rows of the data source ``path`` (a folder, a CSV or an ``.npz``), labels as written.

    Parameters
    ----------
    path : Path
        An existing absolute path: a class-folder or split-folder root, a folder with
        ``labels.csv``/``trainLabels.csv``, a CSV file or a MedMNIST ``.npz``.
    skip_bad : bool
        Skip missing, empty and unlabelled files (listed in ``Rows.skipped``) instead of raising.
    absent_ok : bool, default False
        A class folder without a usable image is a class absent from the set (a warning), not
        an error (the set is labelled with a model's classes).

    Returns
    -------
    Rows

    Raises
    ------
    MedtuneError
        For an unsupported file, a malformed CSV or ``.npz``, a missing or unlabelled image,
        an empty class folder; :class:`~medtune.errors.BadImageError` for an empty file.
    """
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
        csv = find_child(path, name)
        if csv is not None:
            return _read_csv_source(csv, path, skip_bad, check_unlabelled=True, kaggle=kaggle)
    return _read_class_folders(path, skip_bad, absent_ok)


class _FileIndex:
    """Looks up CSV image names among the files under ``root`` (exact, case-insensitive, stem)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.files = list_image_files(root).files
        self.exact = {nfc(f): f for f in self.files}
        self.folded: dict[str, list[str]] = {}
        self.stems: dict[str, list[str]] = {}
        for f in self.files:
            norm = nfc(f).casefold()
            self.folded.setdefault(norm, []).append(f)
            self.stems.setdefault(posixpath.splitext(norm)[0], []).append(f)

    def find(self, name: str) -> str | None:
        """The relative path of the file ``name`` refers to, or ``None``."""
        table = self.folded if is_image_file(name) else self.stems  # no extension: try them all
        for prefix in IMAGE_SUBDIRS:
            rel = nfc(posixpath.normpath(prefix + name))
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


def _required_columns(frame: pd.DataFrame, path: Path, kaggle: bool) -> tuple[str, str]:
    image_col = pick_column(frame, IMAGE_COLUMNS)
    label_col = pick_column(frame, LABEL_COLUMNS)
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
) -> Rows:
    frame = read_table(csv)
    image_col, label_col = _required_columns(frame, csv, kaggle)
    if frame.empty:
        raise MedtuneError(f"{csv}: the CSV has no rows; add one row per image")
    names = frame[image_col].tolist()
    row_numbers = list(range(2, len(frame) + 2))
    _check_duplicates(csv, names, row_numbers)
    index = _FileIndex(root)
    rows = Rows(keys=[], raw_labels=[], where=csv, paths=[], row_numbers=[])
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
    rows.groups = table_groups(frame, csv, keep, rows.keys, kaggle, rows.paths)
    rows.sites = _sites_for(frame, csv, keep, rows.row_numbers)
    if check_unlabelled:
        _check_unlabelled(csv, root, index, rows, skip_bad)
    return _drop_empty_files(rows, skip_bad)


def _check_duplicates(
    csv: Path, names: list[str], row_numbers: list[int], resolved: bool = False
) -> None:
    seen: dict[str, int] = {}
    for name, row in zip(names, row_numbers, strict=True):
        norm = nfc(name)
        if norm in seen:
            what = "refer to the same file" if resolved else "list the same image"
            raise MedtuneError(
                f"{csv}: rows {seen[norm]} and {row} {what} '{name}'; remove the duplicate row"
            )
        seen[norm] = row


def _report_missing(
    csv: Path, index: _FileIndex, missing: list[tuple[int, str]], skip_bad: bool, rows: Rows
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
        hits = index.stems.get(nfc(posixpath.normpath(prefix + stem)).casefold())
        if hits:
            return f" (there is '{hits[0]}': correct the extension in the CSV)"
    return ""


def _check_unlabelled(csv: Path, root: Path, index: _FileIndex, rows: Rows, skip_bad: bool) -> None:
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


def _drop_empty_files(rows: Rows, skip_bad: bool) -> Rows:
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


def _sites_for(
    frame: pd.DataFrame, csv: Path, keep: list[int], row_numbers: list[int]
) -> list[str] | None:
    """The ``site`` column (where each image was taken), or ``None`` when the CSV has none."""
    col = pick_column(frame, SITE_COLUMNS)
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


def _read_split_folders(root: Path, listing: ImageListing, skip_bad: bool) -> Rows:
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
    rows = Rows(
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
    if any_dicom(rows.paths or []):
        rows.groups = patient_groups(rows.paths or [])
    return rows


def _read_class_folders(root: Path, skip_bad: bool, absent_ok: bool = False) -> Rows:
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
    rows = Rows(
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
    if any_dicom(rows.paths or []):
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


def _read_npz(path: Path) -> Rows:
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
    return Rows(
        keys=keys,
        raw_labels=labels,
        where=path,
        split=split if splits else None,
        npz=NpzStore(path),
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
