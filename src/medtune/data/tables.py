"""Label tables: reading a small CSV robustly, the column names medtune looks for, file lookup.

:func:`read_table` is used for every CSV a user gives (``labels.csv``, ``trainLabels.csv``,
``metadata.csv``, a manifest, a splits file); the column-name tuples say which header names are
read as the image, label, patient/group and site of a row.
"""

from __future__ import annotations

import io as _io
import os
import unicodedata
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from medtune.errors import MedtuneError

__all__ = [
    "GROUP_COLUMNS",
    "IMAGE_COLUMNS",
    "LABEL_COLUMNS",
    "SITE_COLUMNS",
    "find_child",
    "nfc",
    "pick_column",
    "read_table",
]

IMAGE_COLUMNS = ("image", "id_code", "filename", "file", "path")
LABEL_COLUMNS = ("label", "level", "diagnosis", "class", "grade")
GROUP_COLUMNS = ("patient_id", "group", "patient", "dup_group")
SITE_COLUMNS = ("site",)


def find_child(folder: Path, name: str) -> Path | None:
    """The file in ``folder`` whose name equals ``name`` case-insensitively (exact match first)."""
    exact = folder / name
    if exact.is_file():
        return exact
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        if entry.is_file() and entry.name.lower() == name.lower():
            return Path(entry.path)
    return None


def nfc(text: str) -> str:
    """``text`` in Unicode normal form C (how file names and CSV cells are compared)."""
    return unicodedata.normalize("NFC", text)


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


def pick_column(frame: pd.DataFrame, names: Sequence[str]) -> str | None:
    """The first of ``names`` that is a column of ``frame``, else ``None``."""
    return next((n for n in names if n in frame.columns), None)
