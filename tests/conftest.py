"""Shared fixtures and settings: tiny labelled image sets made on the fly (no network, no
../shared), and the settings of a tiny, fast training run for the API and the CLI."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

#: A tiny, fast run: timm's 0.1M-parameter test network at 32 px, no pretrained weights, no
#: fundus crop, fp32. What the tests check does not depend on the architecture.
TINY_SETTINGS: dict[str, object] = {
    "backbone": "test_efficientnet",
    "weights": None,
    "image_size": 32,
    "batch_size": 8,
    "fundus": {"crop": False},
    "val_fraction": 0.25,
    "test_fraction": 0.25,
    "precision": "32-true",
}


def cli_flags(**settings: object) -> list[str]:
    """Command-line flags for training settings: ``cli_flags(batch_size=3)`` ->
    ``["--batch-size", "3"]``; ``weights=None`` is ``--weights none``, ``fundus={"crop":
    False}`` is ``--fundus none``, and a setting given as ``...`` (Ellipsis) is left out."""
    flags: list[str] = []
    for key, value in settings.items():
        if value is ...:
            continue
        if key == "fundus" and isinstance(value, dict):
            on = [k.replace("_", "-") for k, v in value.items() if v is True]
            value = ",".join(on) or "none"
        flags += [f"--{key.replace('_', '-')}", "none" if value is None else str(value)]
    return flags


def tiny_flags(**changes: object) -> list[str]:
    """:data:`TINY_SETTINGS` as CLI flags, with ``changes`` applied."""
    return cli_flags(**{**TINY_SETTINGS, **changes})


def write_graded_images(
    root: Path, n_per_class: int = 8, size: int = 40, classes: int = 3, seed: int = 0
) -> Path:
    """Class folders whose images differ in colour and a blob, so a probe can learn them."""
    rng = np.random.default_rng(seed)
    for c in range(classes):
        folder = root / str(c)
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(n_per_class):
            img = rng.integers(0, 60, size=(size, size, 3), dtype=np.uint8)
            img[..., c % 3] += np.uint8(120)
            y, x = rng.integers(4, size - 12, size=2)
            img[y : y + 8 * (c + 1) // 2 + 2, x : x + 8] = 250
            Image.fromarray(img).save(folder / f"img_{i:03d}.png")
    return root


def train_tiny_dr_run(root: Path) -> Path:
    """A linear probe of the tiny settings on made-up 5-grade DR images (``root/run``)."""
    from medtune.cli.main import main

    data = write_graded_images(root / "data", n_per_class=8, size=32, classes=5)
    args = ["train", "--data", str(data), "--out", str(root / "run")]
    args += ["--strategy", "linear-probe", "--cache-dir", str(root / "cache"), *tiny_flags()]
    assert main(args) == 0
    return root / "run"


@pytest.fixture
def graded_folder(tmp_path: Path) -> Path:
    return write_graded_images(tmp_path / "data")


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Prepared caches go to the test's own folder, never to ~/.cache."""
    cache = tmp_path / "medtune-cache"
    monkeypatch.setenv("MEDTUNE_CACHE", str(cache))
    monkeypatch.setenv("MEDTUNE_DATA", str(tmp_path / "medtune-data"))  # serve's worklist
    return cache


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
    syntax: str = "1.2.840.10008.1.2.1",  # Explicit VR Little Endian
    patient_id: str | None = "PAT-0001",
    preamble: bool = True,
) -> Path:
    """A minimal Secondary Capture data set written with pydicom itself."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

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


def imagenet_input(image: np.ndarray, size: int, mean, std, crop_pct: float = 0.875):
    """(1, 3, size, size) float tensor of a photograph as ImageNet evaluation feeds it: the
    short side resized to size / crop_pct (bicubic), centre-cropped, normalised."""
    import torch

    img = Image.fromarray(image)
    scale = round(size / crop_pct) / min(img.size)
    img = img.resize((round(img.width * scale), round(img.height * scale)), Image.BICUBIC)
    left, top = (img.width - size) // 2, (img.height - size) // 2
    img = img.crop((left, top, left + size, top + size))
    x = torch.from_numpy(np.array(img)).permute(2, 0, 1).float() / 255
    x = (x - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]
    return x[None]


def imagenet_probs(backbone, image: np.ndarray):
    """ImageNet class probabilities (1000,) of a photograph through the backbone's own head."""
    import torch

    x = imagenet_input(image, backbone.image_size, backbone.mean, backbone.std)
    with torch.no_grad():
        return backbone.imagenet_logits(x).softmax(-1)[0]


@pytest.fixture(scope="session")
def served_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A linear probe on made-up graded images (grades 0-4: a DR model with a referral rule,
    64 px, no pretrained weights) and its ONNX export in ``RUN/../export``; shared by the tests
    of ``medtune serve``. 64 px: the image-quality gate judges the network input, and below
    64 px it finds even a sharp fundus photograph out of focus."""
    from medtune.cli.main import main

    root = tmp_path_factory.mktemp("served")
    data = write_graded_images(root / "data", classes=5)
    run = root / "run"
    args = ["train", "--data", str(data), "--out", str(run), "--strategy", "linear-probe"]
    assert main([*args, "--cache-dir", str(root / "cache"), *tiny_flags(image_size=64)]) == 0
    assert main(["export", "--run", str(run), "--out", str(root / "export")]) == 0
    return run


def patient_photographs(folder: Path) -> dict[str, Path]:
    """One patient's four fundus photographs, two per eye, named as cameras do
    (``..._right_1.jpg``): scikit-image's retina, turned a little for the second photograph of
    each eye, and the left eye's second one darkened until the quality gate rejects it as
    underexposed."""
    from PIL import ImageEnhance
    from skimage import data as skdata

    folder.mkdir(parents=True, exist_ok=True)
    retina = Image.fromarray(skdata.retina()).resize((448, 448))
    photos = {
        "p17_right_1.jpg": retina,
        "p17_right_2.jpg": retina.rotate(8),
        "p17_left_1.jpg": retina.transpose(Image.Transpose.FLIP_LEFT_RIGHT),
        "p17_left_2.jpg": ImageEnhance.Brightness(retina).enhance(0.15),
    }
    for name, img in photos.items():
        img.save(folder / name, quality=92)
    return {name: folder / name for name in photos}
