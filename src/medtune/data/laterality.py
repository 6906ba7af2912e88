"""Which patient and which eye each image shows: a manifest, DICOM tags, or the file name.

A screening programme refers patients, not photographs (``docs/screening.md``, "Patients and
eyes"), so images are grouped by patient and eye before the per-eye and per-patient rules of
:mod:`medtune.evaluation.patients` are applied. Each image's patient and eye come from the first
of these sources that gives them (each field on its own, so a ``labels.csv`` with ``patient_id``
and file names such as ``17_left.jpeg`` give the patient from the CSV and the eye from the name):

1. a manifest: a CSV with an image column (``image``, ``id_code``, ``filename``, ``file`` or
   ``path``), a patient column (``patient_id`` or ``patient``) and an eye column (``eye``,
   ``laterality``, ``image_laterality`` or ``side``; values such as ``left``/``right``,
   ``L``/``R``, ``OS``/``OD``, ``LE``/``RE``). A data folder's ``labels.csv`` is its manifest
   when it has either column;
2. DICOM: ``PatientID`` (only as the anonymous ``patient:<hash>`` of
   :func:`medtune.data.dicom.patient_groups`) and ``ImageLaterality`` / ``Laterality``
   (:func:`medtune.data.dicom.dicom_laterality`);
3. the file name (:func:`parse_file_name`): ``<patient><sep><eye word>[<sep><anything>]`` where
   the separator is ``_``, ``-``, ``.`` or a space and the eye word is ``left``/``right``,
   ``L``/``R``, ``OS``/``OD`` (oculus sinister / dexter), ``LE``/``RE``, ``LT``/``RT`` or
   ``lefteye``/``righteye`` in any case (``123_left.jpeg``, ``P001_OD_2.jpg``,
   ``smith-j R macula.png``), ``<patient digits><L|R|OS|OD>`` (``0042L.jpg``), or the folder
   layout ``<patient>/<eye word>/<image>`` (``p7/OD/img001.jpg``).

The file-name patterns are hand-written regular expressions: no maintained library parses
ophthalmic file-name conventions, and the set of spellings above is what public fundus sets
(EyePACS/Kaggle ``<id>_left``, Messidor, clinic exports with ``_OD``/``_OS``) use. A name like
``IMG_20200101_R.jpg`` would be read as patient ``IMG_20200101``: where names are not
patient-based, give a manifest, which always wins.
"""

from __future__ import annotations

import os
import posixpath
import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medtune.data.dicom import dicom_laterality, is_dicom_path, patient_groups
from medtune.errors import MedtuneError

__all__ = [
    "EYE_COLUMNS",
    "EYES",
    "ImageEye",
    "Manifest",
    "PATIENT_COLUMNS",
    "image_eyes",
    "imageset_eyes",
    "normalise_eye",
    "parse_file_name",
    "read_manifest",
    "source_manifest",
]

LEFT, RIGHT = "left", "right"
#: The two eyes, right first (OD before OS, the order of clinical records).
EYES = (RIGHT, LEFT)
#: Manifest columns naming the patient and the eye (first present wins).
PATIENT_COLUMNS = ("patient_id", "patient")
EYE_COLUMNS = ("eye", "laterality", "image_laterality", "side")

# Eye words, compared casefolded: English, clinical Latin abbreviations, DICOM codes.
_EYE_WORDS = {
    **dict.fromkeys(("left", "l", "os", "le", "lt", "lefteye"), LEFT),
    **dict.fromkeys(("right", "r", "od", "re", "rt", "righteye"), RIGHT),
}
# Manifest values that name no single eye: left empty on purpose, both eyes, unpaired.
_NO_EYE = {"", "b", "both", "ou", "u", "unknown", "unpaired", "na", "n/a", "none", "-"}
_TOKEN = re.compile(r"[^\s_.\-]+")
_SEPARATORS = " _.-"
_GLUED = re.compile(r"^(?P<patient>.*\d)(?P<eye>os|od|l|r)$", re.IGNORECASE)


@dataclass(frozen=True)
class ImageEye:
    """The patient and eye of one image, and where each came from.

    Attributes
    ----------
    patient_id : str or None
        The patient (a DICOM ``PatientID`` only as ``patient:<hash>``); ``None`` when unknown.
    eye : {"right", "left"} or None
        ``None`` when unknown.
    patient_source, eye_source : str
        ``"manifest"``, ``"DICOM"``, ``"file name"`` or ``""`` (unknown).
    """

    patient_id: str | None
    eye: str | None
    patient_source: str = ""
    eye_source: str = ""

    @property
    def grouped(self) -> bool:
        """Whether the image belongs to a known patient (it can enter a patient-level result)."""
        return self.patient_id is not None

    def to_dict(self) -> dict[str, Any]:
        """The fields as a plain mapping."""
        return {
            "patient_id": self.patient_id,
            "eye": self.eye,
            "patient_source": self.patient_source,
            "eye_source": self.eye_source,
        }


def normalise_eye(value: object) -> str | None:
    """``"right"``, ``"left"`` or ``None`` from a written eye.

    Parameters
    ----------
    value : object
        ``left``/``right``, ``L``/``R``, ``OS``/``OD``, ``LE``/``RE``, ``LT``/``RT``, ``left
        eye`` ... in any case; empty, ``B``/``both``/``OU``, ``U``/``unknown`` mean no single eye.

    Returns
    -------
    str or None

    Raises
    ------
    ValueError
        For any other spelling (the caller names its file and row).
    """
    text = re.sub(r"[\s_\-]+", "", str(value if value is not None else "")).casefold()
    if text in _NO_EYE:
        return None
    eye = _EYE_WORDS.get(text)
    if eye is None:
        raise ValueError(f"unknown eye {value!r}")
    return eye


def _from_stem(stem: str) -> tuple[str, str] | None:
    """``(patient, eye)`` from ``<patient><sep><eye word>[<sep>...]``: the last eye word that
    has a patient before it wins."""
    for token in reversed(list(_TOKEN.finditer(stem))):
        eye = _EYE_WORDS.get(token.group().casefold())
        if eye is None or token.start() == 0:
            continue
        patient = stem[: token.start()].rstrip(_SEPARATORS)
        if patient:
            return patient, eye
    glued = _GLUED.match(stem)
    if glued:
        return glued.group("patient"), _EYE_WORDS[glued.group("eye").casefold()]
    return None


def parse_file_name(name: str | os.PathLike[str]) -> tuple[str, str] | None:
    """The patient and eye a file name (or its folders) spells out.

    Parameters
    ----------
    name : str or path-like
        A file name or path (``/`` or ``\\`` separated).

    Returns
    -------
    (str, str) or None
        ``(patient, eye)`` with eye ``"right"`` or ``"left"``; ``None`` when the name follows
        none of the patterns of the module docstring (``left.jpg`` has no patient, ``123_OU``
        no single eye).

    Examples
    --------
    >>> parse_file_name("train/123_left.jpeg")
    ('123', 'left')
    >>> parse_file_name("P001_OD_2.jpg")
    ('P001', 'right')
    >>> parse_file_name("p7/OS/img001.png")
    ('p7', 'left')
    """
    parts = [p for p in str(name).replace("\\", "/").split("/") if p not in ("", ".")]
    if not parts:
        return None
    stem = posixpath.splitext(parts[-1])[0] if "." in parts[-1] else parts[-1]
    found = _from_stem(stem)
    if found is not None:
        return found
    if len(parts) >= 3:  # <patient>/<eye word>/<image>
        eye = _EYE_WORDS.get(parts[-2].casefold())
        if eye is not None and parts[-3].casefold() not in _EYE_WORDS:
            return parts[-3], eye
    return None


def _key(name: str) -> str:
    """How manifest names and image names are compared: NFC, ``/``, casefolded."""
    text = unicodedata.normalize("NFC", str(name)).replace("\\", "/").casefold()
    return posixpath.normpath(text).lstrip("./") if text else text


@dataclass
class Manifest:
    """Patient and eye per image name, read from a CSV by :func:`read_manifest`.

    Attributes
    ----------
    path : pathlib.Path
        The CSV.
    entries : dict
        Compared name (:func:`lookup`'s rules) -> ``(patient or None, eye or None)``.
    """

    path: Path
    entries: dict[str, tuple[str | None, str | None]]

    def __post_init__(self) -> None:
        self._by_base: dict[str, tuple[str | None, str | None] | None] = {}
        self._by_stem: dict[str, tuple[str | None, str | None] | None] = {}
        for key, value in self.entries.items():
            for table, short in (
                (self._by_base, posixpath.basename(key)),
                (self._by_stem, posixpath.splitext(posixpath.basename(key))[0]),
            ):
                table[short] = None if short in table else value  # None: ambiguous

    def lookup(self, name: str | os.PathLike[str]) -> tuple[str | None, str | None] | None:
        """``(patient, eye)`` of the image ``name``: the same relative path, else the same file
        name, else the same name without extension (the last two only when unique in the
        manifest); ``None`` when the manifest does not list it."""
        key = _key(str(name))
        if key in self.entries:
            return self.entries[key]
        base = posixpath.basename(key)
        for table, short in ((self._by_base, base), (self._by_stem, posixpath.splitext(base)[0])):
            if table.get(short) is not None:
                return table[short]
        return None


def read_manifest(path: str | os.PathLike[str], *, required: bool = True) -> Manifest | None:
    """Read ``image,patient_id,eye`` rows.

    Parameters
    ----------
    path : str or path-like
        A CSV (UTF-8; ``,``, ``;`` or tab separated; read by
        :func:`medtune.data.tables.read_table`) with an image column and a patient column
        (:data:`PATIENT_COLUMNS`), an eye column (:data:`EYE_COLUMNS`), or both. Empty cells
        leave that field to DICOM tags or the file name.
    required : bool, default True
        Raise when the CSV has neither column (``False``: return ``None``, for a ``labels.csv``
        that may or may not be a manifest).

    Returns
    -------
    Manifest or None

    Raises
    ------
    MedtuneError
        For a missing file, no image column, neither a patient nor an eye column (when
        ``required``), or an eye value that names no eye (naming the row).
    """
    # pandas only when a manifest is read (``normalise_eye`` is imported by light modules)
    from medtune.data.tables import IMAGE_COLUMNS, pick_column, read_table

    path = Path(path)
    if not path.is_file():
        raise MedtuneError(f"{path}: manifest not found; give a CSV with image,patient_id,eye")
    frame = read_table(path)
    image_col = pick_column(frame, IMAGE_COLUMNS)
    patient_col = pick_column(frame, PATIENT_COLUMNS)
    eye_col = pick_column(frame, EYE_COLUMNS)
    if image_col is None or (patient_col is None and eye_col is None):
        if not required:
            return None
        raise MedtuneError(
            f"{path}: a manifest needs the columns image,patient_id,eye (found "
            f"{','.join(frame.columns) or 'none'}); rename the columns"
        )
    entries: dict[str, tuple[str | None, str | None]] = {}
    for row, record in enumerate(frame.to_dict("records"), start=2):
        patient = str(record[patient_col]).strip() if patient_col else ""
        try:
            eye = normalise_eye(record[eye_col]) if eye_col else None
        except ValueError:
            raise MedtuneError(
                f"{path}: row {row}: eye {record[eye_col]!r} is not an eye; write left/right, "
                "L/R or OS/OD (or leave it empty)"
            ) from None
        entries[_key(str(record[image_col]))] = (patient or None, eye)
    return Manifest(path, entries)


def source_manifest(source: str | os.PathLike[str]) -> Manifest | None:
    """The manifest a labelled data source carries: its labels CSV when that CSV has a patient or
    an eye column (a folder's ``labels.csv`` / ``trainLabels.csv``, or the CSV given)."""
    path = Path(os.path.expanduser(os.fspath(source)))
    if path.is_file():
        csv = path if path.suffix.lower() in (".csv", ".tsv", ".txt") else None
    elif path.is_dir():
        names = ("labels.csv", "trainlabels.csv")
        csv = next((c for c in sorted(path.iterdir()) if c.name.lower() in names), None)
    else:
        csv = None
    return None if csv is None else read_manifest(csv, required=False)


def image_eyes(
    paths: Sequence[str | os.PathLike[str]],
    *,
    manifest: Manifest | str | os.PathLike[str] | None = None,
    names: Sequence[str] | None = None,
) -> list[ImageEye]:
    """The patient and eye of each image: manifest, then DICOM tags, then the file name.

    Parameters
    ----------
    paths : sequence of path-like
        The image files (DICOM headers are read from them; nothing else is opened).
    manifest : Manifest or path-like, optional
        A manifest (:func:`read_manifest`) or its CSV.
    names : sequence of str, optional
        The names to look up in the manifest and to parse (e.g. paths relative to the data
        folder); default the paths.

    Returns
    -------
    list of ImageEye
        One per image, in order.

    Raises
    ------
    MedtuneError
        From :func:`read_manifest`.
    """
    if manifest is not None and not isinstance(manifest, Manifest):
        manifest = read_manifest(manifest)
    names = [str(p) for p in paths] if names is None else [str(n) for n in names]
    if len(names) != len(paths):
        raise ValueError(f"{len(names)} names for {len(paths)} paths")
    dicom = any(is_dicom_path(p) for p in paths)
    patients = (patient_groups(paths) if dicom else None) or [""] * len(paths)
    sides = dicom_laterality(paths) if dicom else [None] * len(paths)
    out = []
    for i, name in enumerate(names):
        found = manifest.lookup(name) if manifest is not None else None
        if manifest is not None and found is None and name != str(paths[i]):
            found = manifest.lookup(str(paths[i]))
        candidates = [
            ("manifest", found or (None, None)),
            ("DICOM", (patients[i] or None, normalise_eye(sides[i]))),
            ("file name", parse_file_name(name) or (None, None)),
        ]
        patient = next(((s, v[0]) for s, v in candidates if v[0]), ("", None))
        eye = next(((s, v[1]) for s, v in candidates if v[1]), ("", None))
        out.append(ImageEye(patient[1], eye[1], patient[0], eye[0]))
    return out


def imageset_eyes(imageset: Any) -> list[ImageEye]:
    """:func:`image_eyes` of a labelled :class:`~medtune.data.imageset.ImageSet`, with its labels
    CSV as the manifest when it has a patient or eye column (:func:`source_manifest`); images of
    an ``.npz`` set have no patient."""
    if imageset.paths is None:
        return [ImageEye(None, None) for _ in imageset.keys]
    return image_eyes(
        imageset.paths, manifest=source_manifest(imageset.source), names=imageset.keys
    )
