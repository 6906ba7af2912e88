"""DICOM input: colour, JPEG baseline, MONOCHROME1/2, BitsStored, multi-frame, patient ids."""

from __future__ import annotations

import io
import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pydicom = pytest.importorskip("pydicom")

from pydicom.dataset import Dataset, FileMetaDataset  # noqa: E402
from pydicom.encaps import encapsulate  # noqa: E402
from pydicom.uid import (  # noqa: E402
    ExplicitVRLittleEndian,
    JPEGBaseline8Bit,
    SecondaryCaptureImageStorage,
    generate_uid,
)

from medtune.data.images import list_image_files, load_rgb  # noqa: E402
from medtune.data.preprocess import prepare_image  # noqa: E402
from medtune.data.sources import load_imageset  # noqa: E402
from medtune.errors import BadImageError  # noqa: E402


def write_dicom(
    path: Path,
    pixels: np.ndarray | bytes,
    *,
    photometric: str,
    rows: int,
    cols: int,
    samples: int = 1,
    bits_allocated: int = 8,
    bits_stored: int = 8,
    frames: int = 1,
    syntax: str = ExplicitVRLittleEndian,
    patient_id: str | None = "PAT-0001",
    preamble: bool = True,
) -> Path:
    """A minimal Secondary Capture data set written with pydicom itself."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = syntax
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    if patient_id is not None:
        ds.PatientID = patient_id
        ds.PatientName = "Doe^Jane"
    ds.Modality = "OP"
    ds.Rows, ds.Columns = rows, cols
    ds.SamplesPerPixel = samples
    ds.PhotometricInterpretation = photometric
    if samples == 3:
        ds.PlanarConfiguration = 0
    ds.BitsAllocated = bits_allocated
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 0
    if frames > 1:
        ds.NumberOfFrames = frames
    if isinstance(pixels, bytes):
        ds.PixelData = pixels
    else:
        ds.PixelData = np.ascontiguousarray(pixels).tobytes()
    if syntax != ExplicitVRLittleEndian:
        ds["PixelData"].VR = "OB"
    ds.save_as(path, enforce_file_format=preamble)
    return path


def card(h: int = 24, w: int = 32) -> np.ndarray:
    """An asymmetric RGB test card: four flat colour blocks (JPEG-friendly)."""
    arr = np.zeros((h, w, 3), np.uint8)
    arr[: h // 2, : w // 2] = (200, 30, 40)
    arr[: h // 2, w // 2 :] = (20, 180, 60)
    arr[h // 2 :, : w // 2] = (30, 60, 210)
    arr[h // 2 :, w // 2 :] = (240, 230, 20)
    return arr


def test_uncompressed_rgb_equals_png(tmp_path: Path) -> None:
    arr = card()
    dcm = write_dicom(tmp_path / "a.dcm", arr, photometric="RGB", rows=24, cols=32, samples=3)
    Image.fromarray(arr).save(tmp_path / "a.png")
    assert np.array_equal(np.asarray(load_rgb(dcm)), arr)
    fundus = {"crop": False}
    assert np.array_equal(
        prepare_image(dcm, 16, fundus), prepare_image(tmp_path / "a.png", 16, fundus)
    )


def test_jpeg_baseline_ybr_full_422_colour_round_trips(tmp_path: Path) -> None:
    arr = card(32, 32)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=95, subsampling=1)  # 4:2:2 YCbCr
    dcm = write_dicom(
        tmp_path / "j.dcm",
        encapsulate([buf.getvalue()]),
        photometric="YBR_FULL_422",
        rows=32,
        cols=32,
        samples=3,
        syntax=JPEGBaseline8Bit,
    )
    out = np.asarray(load_rgb(dcm)).astype(int)
    # block centres: a known RGB colour comes back as that RGB colour (not YCbCr, not swapped)
    for y, x in ((8, 8), (8, 24), (24, 8), (24, 24)):
        assert np.abs(out[y, x] - arr[y, x]).max() <= 6, (y, x, out[y, x], arr[y, x])
    Image.fromarray(arr).save(tmp_path / "j.png")
    fundus = {"crop": False}
    diff = prepare_image(dcm, 16, fundus).astype(int) - prepare_image(
        tmp_path / "j.png", 16, fundus
    )
    assert np.abs(diff).mean() < 4


def test_monochrome2_16bit_bits_stored_12(tmp_path: Path) -> None:
    ramp = np.linspace(0, 4095, 64).astype(np.uint16).reshape(8, 8)
    dcm = write_dicom(
        tmp_path / "m2.dcm",
        ramp,
        photometric="MONOCHROME2",
        rows=8,
        cols=8,
        bits_allocated=16,
        bits_stored=12,
    )
    out = np.asarray(load_rgb(dcm))
    assert out.shape == (8, 8, 3) and np.array_equal(out[..., 0], out[..., 2])
    assert out[..., 0].min() == 0 and out[..., 0].max() == 255  # 4095 is full white, not 16/255
    expected = np.rint(ramp / 4095 * 255).astype(np.uint8)
    assert np.abs(out[..., 0].astype(int) - expected).max() <= 1
    png = tmp_path / "m2.png"
    Image.fromarray(expected).save(png)
    assert np.array_equal(np.asarray(load_rgb(png)), out)


def test_monochrome1_is_inverted(tmp_path: Path) -> None:
    arr = np.array([[0, 255], [128, 10]], np.uint8)
    m1 = write_dicom(tmp_path / "m1.dcm", arr, photometric="MONOCHROME1", rows=2, cols=2)
    m2 = write_dicom(tmp_path / "m2.dcm", arr, photometric="MONOCHROME2", rows=2, cols=2)
    assert np.array_equal(np.asarray(load_rgb(m1))[..., 0], 255 - arr)
    assert np.array_equal(np.asarray(load_rgb(m2))[..., 0], arr)


def test_multi_frame_is_one_line_error_naming_the_file(tmp_path: Path) -> None:
    arr = np.zeros((3, 4, 4), np.uint8)
    dcm = write_dicom(tmp_path / "mf.dcm", arr, photometric="MONOCHROME2", rows=4, cols=4, frames=3)
    with pytest.raises(BadImageError) as info:
        load_rgb(dcm)
    msg = str(info.value)
    assert str(dcm) in msg and "3 frames" in msg and "\n" not in msg


def test_extensionless_dicom_found_and_read(tmp_path: Path) -> None:
    arr = card()
    (tmp_path / "0").mkdir()
    write_dicom(tmp_path / "0" / "IM000001", arr, photometric="RGB", rows=24, cols=32, samples=3)
    (tmp_path / "0" / "README").write_text("not an image")
    listing = list_image_files(tmp_path)
    assert listing.files == ["0/IM000001"] and listing.ignored == ["0/README"]
    assert np.array_equal(np.asarray(load_rgb(tmp_path / "0" / "IM000001")), arr)


def test_not_dicom_named_dcm(tmp_path: Path) -> None:
    bad = tmp_path / "x.dcm"
    bad.write_bytes(b"hello world, not a DICOM file at all" * 10)
    with pytest.raises(BadImageError) as info:
        load_rgb(bad)
    assert str(bad) in str(info.value)


def test_patient_id_groups_are_anonymous(tmp_path: Path, caplog) -> None:
    caplog.set_level(logging.DEBUG)
    arr = np.zeros((4, 4), np.uint8)
    for cls in ("0", "1"):
        (tmp_path / cls).mkdir()
    for cls, name, pid in (
        ("0", "a.dcm", "PAT-0001"),
        ("1", "b.dcm", "PAT-0001"),
        ("0", "c.dcm", "PAT-0002"),
        ("1", "d.dcm", "PAT-0003"),
    ):
        arr = arr + 1  # distinct pixels: no duplicate grouping involved
        write_dicom(
            tmp_path / cls / name, arr, photometric="MONOCHROME2", rows=4, cols=4, patient_id=pid
        )
    s = load_imageset(tmp_path)
    g = dict(zip(s.keys, s.groups, strict=True))
    assert g["0/a.dcm"] == g["1/b.dcm"]  # same patient -> same group
    assert len({g["0/a.dcm"], g["0/c.dcm"], g["1/d.dcm"]}) == 3
    text = " ".join(s.groups) + caplog.text
    assert "PAT-" not in text and "Doe" not in text
    assert all(x.startswith("patient:") and len(x) == len("patient:") + 16 for x in s.groups)


def test_csv_set_uses_patient_id_unless_the_csv_has_a_patient_column(tmp_path: Path) -> None:
    rows = [("a.dcm", 0, "P1"), ("b.dcm", 1, "P1"), ("c.dcm", 0, "P2"), ("d.dcm", 1, "P3")]
    for i, (name, _, pid) in enumerate(rows):
        arr = np.full((4, 4), 10 * i, np.uint8)
        write_dicom(tmp_path / name, arr, photometric="MONOCHROME2", rows=4, cols=4, patient_id=pid)
    (tmp_path / "labels.csv").write_text(
        "image,label\n" + "".join(f"{n},{v}\n" for n, v, _ in rows)
    )
    g = load_imageset(tmp_path).groups
    assert g is not None and g[0] == g[1] and len({g[0], g[2], g[3]}) == 3
    # a patient column in the CSV is the grouping key: the DICOM ids are not read
    (tmp_path / "labels.csv").write_text(
        "image,label,patient_id\n" + "".join(f"{n},{v},x{i}\n" for i, (n, v, _) in enumerate(rows))
    )
    assert load_imageset(tmp_path).groups == ["x0", "x1", "x2", "x3"]
