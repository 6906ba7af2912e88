"""medtune.data.images.load_rgb: mode conversions, EXIF, draft mode, bad files."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps
from PIL.JpegImagePlugin import JpegImageFile

from medtune.data.images import MAX_PIXELS, load_rgb
from medtune.errors import BadImageError


def _assert_bad(path: Path, match: str | None = None) -> None:
    with pytest.raises(BadImageError) as info:
        load_rgb(path)
    msg = str(info.value)
    assert str(path) in msg and "\n" not in msg
    if match:
        assert match in msg


def test_grayscale_becomes_rgb(tmp_path: Path) -> None:
    arr = np.arange(64, dtype=np.uint8).reshape(8, 8) * 3
    Image.fromarray(arr, mode="L").save(tmp_path / "g.png")
    img = load_rgb(tmp_path / "g.png")
    assert img.mode == "RGB" and img.size == (8, 8)
    out = np.asarray(img)
    assert all(np.array_equal(out[..., c], arr) for c in range(3))


def test_rgba_composited_on_black(tmp_path: Path) -> None:
    arr = np.zeros((2, 2, 4), np.uint8)
    arr[..., :3] = (200, 100, 50)
    arr[..., 3] = [[0, 255], [128, 255]]
    Image.fromarray(arr, mode="RGBA").save(tmp_path / "a.png")
    out = np.asarray(load_rgb(tmp_path / "a.png")).astype(int)
    assert out[0, 0].tolist() == [0, 0, 0]
    assert out[0, 1].tolist() == [200, 100, 50]
    assert np.abs(out[1, 0] - np.array([100, 50, 25])).max() <= 1


def test_palette_with_transparency(tmp_path: Path) -> None:
    img = Image.new("P", (4, 4), 1)
    img.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    img.putpixel((0, 0), 0)
    img.info["transparency"] = 0
    img.save(tmp_path / "p.png", transparency=0)
    out = np.asarray(load_rgb(tmp_path / "p.png"))
    assert out[0, 0].tolist() == [0, 0, 0] and out[1, 1].tolist() == [10, 200, 30]


@pytest.mark.parametrize("fmt", ["tiff", "jpeg"])
def test_cmyk_conversion(tmp_path: Path, fmt: str) -> None:
    arr = np.zeros((8, 16, 4), np.uint8)
    arr[:, :8, 0] = 255  # pure cyan -> (0, 255, 255)
    arr[:, 8:, 3] = 255  # pure black -> (0, 0, 0)
    path = tmp_path / f"c.{fmt}"
    Image.fromarray(arr, mode="CMYK").save(path, quality=100)
    out = np.asarray(load_rgb(path)).astype(int)
    tol = 0 if fmt == "tiff" else 8
    assert np.abs(out[4, 2] - [0, 255, 255]).max() <= tol
    assert np.abs(out[4, 13] - [0, 0, 0]).max() <= tol


def test_16bit_grayscale_is_scaled_not_clipped(tmp_path: Path) -> None:
    arr = np.array([[0, 1000, 257 * 100, 65535]], dtype=np.uint16)
    Image.fromarray(arr).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")
    out = np.asarray(load_rgb(tmp_path / "g16.png"))[0, :, 0]
    assert out.tolist() == [0, 4, 100, 255]


def test_16bit_rgb_tiff_is_scaled(tmp_path: Path) -> None:
    tifffile = pytest.importorskip("tifffile")
    arr = np.zeros((2, 2, 3), np.uint16)
    arr[0, 0] = (65535, 32896, 1000)
    arr[1, 1] = (257 * 10, 0, 65535)
    tifffile.imwrite(tmp_path / "rgb16.tif", arr, photometric="rgb")
    out = np.asarray(load_rgb(tmp_path / "rgb16.tif")).astype(int)
    assert np.abs(out[0, 0] - [255, 128, 4]).max() <= 1
    assert np.abs(out[1, 1] - [10, 0, 255]).max() <= 1


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_exif_orientation_applied(tmp_path: Path, orientation: int) -> None:
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 255, (16, 32, 3), dtype=np.uint8))
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / "o.jpg"
    img.save(path, exif=exif, quality=95)
    expected = np.asarray(ImageOps.exif_transpose(Image.open(path).convert("RGB")))
    out = np.asarray(load_rgb(path))
    assert out.shape == expected.shape
    assert np.array_equal(out, expected)
    if orientation in (6, 8):
        assert out.shape[:2] == (32, 16)


@pytest.fixture
def decoded(monkeypatch) -> list[tuple[int, int]]:
    """The sizes the JPEG decoder actually produced, recorded as files are loaded."""
    sizes: list[tuple[int, int]] = []
    original = JpegImageFile.load

    def spy(self):
        sizes.append(self.size)
        return original(self)

    monkeypatch.setattr(JpegImageFile, "load", spy)
    return sizes


def test_draft_mode_decodes_large_jpeg_reduced(tmp_path: Path, decoded) -> None:
    path = tmp_path / "big.jpg"
    Image.new("RGB", (4000, 3000), (120, 60, 30)).save(path, quality=80)
    img = load_rgb(path, max_side=256)
    assert max(img.size) <= 256 and img.size == (256, 192)
    assert decoded and decoded[0][0] < 4000 and decoded[0][1] < 3000
    assert np.abs(np.asarray(img)[96, 128].astype(int) - [120, 60, 30]).max() <= 6


def _camera_jpeg(path: Path, orientation: int, size: tuple[int, int] = (3008, 2000)) -> np.ndarray:
    """A camera-size fundus-like JPEG stored sideways, with an EXIF Orientation tag; returns the
    upright pixels it shows (full decode + ``ImageOps.exif_transpose``)."""
    from medtune.data.synthetic import synthesize_image

    w, h = size
    disc = Image.fromarray(synthesize_image(2, 512, seed=1).image).resize((h, h))
    frame = Image.new("RGB", size, (0, 0, 0))
    frame.paste(disc, ((w - h) // 2, 0))
    frame.paste((250, 250, 0), (0, 0, w // 10, h // 10))  # a yellow patch marks stored top-left
    exif = Image.Exif()
    exif[0x0112] = orientation
    frame.save(path, exif=exif, quality=92)
    return np.asarray(ImageOps.exif_transpose(Image.open(path).convert("RGB")))


@pytest.mark.parametrize("orientation", [1, 6])
def test_min_side_decodes_a_camera_jpeg_reduced_and_upright(
    tmp_path: Path, decoded, orientation: int
) -> None:
    path = tmp_path / "camera.jpg"
    upright = _camera_jpeg(path, orientation)
    decoded.clear()
    img = load_rgb(path, min_side=224)
    assert set(decoded) == {(376, 250)}  # 1/8 DCT scale: shorter side 250 >= 224; never full
    assert img.size == ((376, 250) if orientation == 1 else (250, 376))  # turned upright
    small = np.asarray(Image.fromarray(upright).resize(img.size, Image.Resampling.BOX))
    diff = np.abs(np.asarray(img).astype(int) - small)
    assert diff.mean() < 3 and np.median(diff) <= 2  # the same picture, the same way up
    marker = np.asarray(img)[:10, :10] if orientation == 1 else np.asarray(img)[:10, -10:]
    assert marker[..., 0].min() > 200 and marker[..., 2].max() < 60


def test_prepare_image_from_a_reduced_decode_stays_close_to_the_full_decode(tmp_path) -> None:
    from medtune.data.fundus import preprocess
    from medtune.data.preprocess import prepare_image

    path = tmp_path / "camera.jpg"
    upright = _camera_jpeg(path, 6)
    fast = prepare_image(path, 224).astype(int)
    full = preprocess(Image.fromarray(upright), 224).astype(int)
    assert fast.shape == full.shape == (224, 224, 3)
    diff = np.abs(fast - full)  # 1/8 DCT scale (8 x 8 block means) + Lanczos vs Lanczos alone
    assert diff.mean() < 3.0 and np.median(diff) <= 1  # turned or cropped wrongly: ~40


def test_min_side_reduces_other_formats_by_a_whole_factor(tmp_path: Path) -> None:
    path = tmp_path / "big.png"
    Image.new("RGB", (1000, 700), (120, 60, 30)).save(path)
    assert load_rgb(path, min_side=224).size == (334, 234)  # 700 // 224 = 3
    assert load_rgb(path, min_side=400).size == (1000, 700)  # no whole factor keeps 400
    assert load_rgb(path, max_side=100, min_side=224).size == (100, 70)  # max_side wins


def test_very_large_image_loads_without_bomb_warning(tmp_path: Path) -> None:
    assert Image.MAX_IMAGE_PIXELS is None or Image.MAX_IMAGE_PIXELS >= MAX_PIXELS
    path = tmp_path / "huge.jpg"
    Image.new("L", (10000, 10000), 90).save(path, quality=50)
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        img = load_rgb(path, max_side=512)
    assert img.mode == "RGB" and max(img.size) == 512


def test_non_ascii_file_name(tmp_path: Path) -> None:
    path = tmp_path / "äöü_眼底.png"
    Image.new("RGB", (5, 3), (1, 2, 3)).save(path)
    assert load_rgb(path).size == (5, 3)


def test_zero_byte_file(tmp_path: Path) -> None:
    (tmp_path / "empty.png").write_bytes(b"")
    _assert_bad(tmp_path / "empty.png", "empty")


def test_missing_file(tmp_path: Path) -> None:
    _assert_bad(tmp_path / "nope.png")


def test_text_named_png(tmp_path: Path) -> None:
    (tmp_path / "notes.png").write_text("this is not an image\n")
    _assert_bad(tmp_path / "notes.png", "not a recognised image")


@pytest.mark.parametrize("fmt", ["jpeg", "png"])
def test_truncated_files(tmp_path: Path, fmt: str) -> None:
    rng = np.random.default_rng(1)
    full = tmp_path / f"full.{fmt}"
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(full)
    data = full.read_bytes()
    cut = tmp_path / f"cut.{fmt}"
    cut.write_bytes(data[: len(data) // 2])
    _assert_bad(cut)
    with pytest.raises(BadImageError):
        load_rgb(cut, max_side=16)
