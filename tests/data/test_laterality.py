"""Patient and eye of each image: file-name patterns, manifests, DICOM laterality."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import write_dicom

from medtune.data.laterality import (
    ImageEye,
    image_eyes,
    imageset_eyes,
    normalise_eye,
    parse_file_name,
    read_manifest,
)
from medtune.errors import MedtuneError


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("123_left.jpeg", ("123", "left")),
        ("train/10_right.jpeg", ("10", "right")),
        ("123_LEFT.JPG", ("123", "left")),
        ("123-right.png", ("123", "right")),
        ("123 right.tif", ("123", "right")),
        ("17.left.jpeg", ("17", "left")),
        ("P001_OD.jpg", ("P001", "right")),
        ("P001_OS_2.jpg", ("P001", "left")),
        ("p001-od-macula.png", ("p001", "right")),
        ("00123_L.dcm", ("00123", "left")),
        ("00123_R_1.jpg", ("00123", "right")),
        ("00123_LE.png", ("00123", "left")),
        ("00123_RT.png", ("00123", "right")),
        ("7_LeftEye.jpg", ("7", "left")),
        ("smith_john_right_eye_02.jpg", ("smith_john", "right")),
        ("0042L.jpg", ("0042", "left")),
        ("0042od.png", ("0042", "right")),
        ("patient7/OD/img001.jpg", ("patient7", "right")),
        ("patient7/left/1.png", ("patient7", "left")),
        ("C:\\exports\\9_right.jpg", ("9", "right")),
    ],
)
def test_file_name_patterns(name: str, expected: tuple[str, str]) -> None:
    assert parse_file_name(name) == expected


@pytest.mark.parametrize(
    "name",
    [
        "aptos_0a4e1a29ffff.png",  # a hex id: no eye word
        "left.jpg",  # an eye but no patient
        "OD_only.png",  # the eye word first: no patient before it
        "123_OU.jpg",  # both eyes: no single eye
        "gold_12.png",
        "Lena.png",
        "IM000001",
        "left/right/x.png",  # eye folders without a patient folder
    ],
)
def test_names_without_patient_and_eye(name: str) -> None:
    assert parse_file_name(name) is None


def test_both_eyes_of_one_patient_share_the_patient() -> None:
    left, right = parse_file_name("p9_OS_1.jpg"), parse_file_name("p9_OD_3.jpg")
    assert left is not None and right is not None
    assert left[0] == right[0] == "p9" and {left[1], right[1]} == {"left", "right"}


@pytest.mark.parametrize(
    ("value", "eye"),
    [("L", "left"), ("os", "left"), ("Left eye", "left"), ("left-eye", "left"), ("OD", "right"),
     ("R", "right"), ("RE", "right"), ("", None), ("OU", None), ("B", None), ("unknown", None)],
)  # fmt: skip
def test_normalise_eye(value: str, eye: str | None) -> None:
    assert normalise_eye(value) == eye


def test_normalise_eye_refuses_other_words() -> None:
    with pytest.raises(ValueError, match="unknown eye"):
        normalise_eye("middle")


def test_manifest_wins_over_the_file_name(tmp_path: Path) -> None:
    manifest = tmp_path / "manifest.csv"
    manifest.write_text(
        "image,patient_id,eye\nimgs/a_left.jpg,P7,right\nb.jpg,P7,OS\nc.jpg,,L\n", "utf-8"
    )
    paths = [tmp_path / "imgs" / "a_left.jpg", tmp_path / "other" / "b.jpg", tmp_path / "c.jpg"]
    eyes = image_eyes(paths, manifest=manifest, names=["imgs/a_left.jpg", "other/b.jpg", "c.jpg"])
    assert eyes[0] == ImageEye("P7", "right", "manifest", "manifest")  # not 'a', 'left'
    assert eyes[1] == ImageEye("P7", "left", "manifest", "manifest")  # by file name, unique
    assert eyes[2] == ImageEye(None, "left", "", "manifest")  # no patient anywhere
    assert not eyes[2].grouped


def test_patient_from_labels_csv_and_eye_from_the_file_name(tmp_path: Path) -> None:
    """The eyepacs-dev layout: labels.csv with patient_id, names like 17_left.jpeg."""
    (tmp_path / "images").mkdir()
    rows = ["image,label,patient_id"]
    for pid in (17, 19):
        for eye in ("left", "right"):
            arr = np.full((8, 8, 3), pid + len(eye), np.uint8)
            from PIL import Image

            Image.fromarray(arr).save(tmp_path / "images" / f"{pid}_{eye}.png")
            rows.append(f"{pid}_{eye}.png,{int(eye == 'left')},{pid}")
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n", "utf-8")
    from medtune.data.sources import load_imageset

    s = load_imageset(tmp_path)
    eyes = dict(zip(s.keys, imageset_eyes(s), strict=True))
    assert eyes["images/17_left.png"] == ImageEye("17", "left", "manifest", "file name")
    assert eyes["images/19_right.png"] == ImageEye("19", "right", "manifest", "file name")


def test_manifest_errors_name_the_file_and_row(tmp_path: Path) -> None:
    bad = tmp_path / "m.csv"
    bad.write_text("image,patient_id,eye\na.jpg,1,left\nb.jpg,1,middle\n", "utf-8")
    with pytest.raises(MedtuneError, match=r"m\.csv: row 3: eye 'middle' is not an eye"):
        read_manifest(bad)
    cols = tmp_path / "c.csv"
    cols.write_text("image,label\na.jpg,0\n", "utf-8")
    with pytest.raises(MedtuneError, match=r"c\.csv: a manifest needs the columns"):
        read_manifest(cols)
    assert read_manifest(cols, required=False) is None
    with pytest.raises(MedtuneError, match="manifest not found"):
        read_manifest(tmp_path / "missing.csv")


def _with_laterality(path: Path, image: str | None, series: str | None) -> Path:
    import pydicom

    ds = pydicom.dcmread(path)
    if image is not None:
        ds.ImageLaterality = image
    if series is not None:
        ds.Laterality = series
    ds.save_as(path)
    return path


def test_dicom_patient_and_laterality(tmp_path: Path) -> None:
    pytest.importorskip("pydicom")
    arr = np.zeros((4, 4), np.uint8)
    specs = [
        ("a.dcm", "PAT-1", "L", None),  # Image Laterality
        ("b.dcm", "PAT-1", None, "R"),  # only the series' Laterality
        ("c.dcm", "PAT-2", "R", "L"),  # Image Laterality wins
        ("d.dcm", "PAT-2", "B", None),  # both eyes: no single eye
        ("IMG_9_left.dcm", "PAT-3", None, None),  # no tag: the file name gives the eye
    ]
    paths = []
    for i, (name, pid, image, series) in enumerate(specs):
        dcm = write_dicom(
            tmp_path / name, arr + i, photometric="MONOCHROME2", rows=4, cols=4, patient_id=pid
        )
        paths.append(_with_laterality(dcm, image, series))
    eyes = image_eyes(paths)
    assert [e.eye for e in eyes] == ["left", "right", "right", None, "left"]
    assert [e.eye_source for e in eyes] == ["DICOM", "DICOM", "DICOM", "", "file name"]
    assert eyes[0].patient_id == eyes[1].patient_id != eyes[2].patient_id
    assert all(e.patient_id.startswith("patient:") for e in eyes)  # never the PatientID itself
    assert all("PAT" not in str(e.to_dict()) for e in eyes)
    assert eyes[4].patient_source == "DICOM"  # PatientID beats the file name's 'IMG_9'
