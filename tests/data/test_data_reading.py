"""Data-reading faults: orientation, bit depth, hidden files, extensions, duplicates."""

from __future__ import annotations

import logging
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, PngImagePlugin, features

from medtune.data import formats
from medtune.data.images import IMAGE_EXTENSIONS, is_hidden, list_image_files, load_rgb
from medtune.data.preprocess import prepare_image
from medtune.data.sources import load_imageset
from medtune.data.splits import make_splits
from medtune.errors import MedtuneError

NO_CROP = {"crop": False}

# --------------------------------------------------------------------------- 1. orientation


def upright_card() -> np.ndarray:
    """A 40 wide x 80 tall card with four colour blocks: any flip or rotation changes it."""
    card = np.zeros((80, 40, 3), np.uint8)
    card[:40, :20] = (220, 20, 20)
    card[:40, 20:] = (20, 200, 20)
    card[40:, :20] = (20, 20, 220)
    card[40:, 20:] = (230, 230, 20)
    return card


# stored = upright transformed by the inverse of what the Orientation tag tells a viewer to do
_STORE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_90,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_270,
}
_FORMATS = [
    ("JPEG", "jpg", {"quality": 95}),
    ("PNG", "png", {}),
    ("TIFF", "tif", {}),
    ("TIFF", "tiff", {"compression": "tiff_deflate"}),
    ("WEBP", "webp", {"quality": 95}),
]
if features.check("avif"):
    _FORMATS.append(("AVIF", "avif", {"quality": 95}))


def _save_rotated(path: Path, fmt: str, orientation: int, **kwargs) -> None:
    stored = Image.fromarray(upright_card()).transpose(_STORE[orientation])
    if fmt == "TIFF":
        stored.save(path, format=fmt, tiffinfo={0x0112: orientation}, **kwargs)
    else:
        exif = Image.Exif()
        exif[0x0112] = orientation
        stored.save(path, format=fmt, exif=exif, **kwargs)


@pytest.mark.parametrize("orientation", sorted(_STORE))
@pytest.mark.parametrize(("fmt", "ext", "kwargs"), _FORMATS, ids=[f[1] for f in _FORMATS])
def test_every_format_comes_out_upright_exactly_once(
    tmp_path: Path, fmt: str, ext: str, kwargs: dict, orientation: int
) -> None:
    path = tmp_path / f"card.{ext}"
    _save_rotated(path, fmt, orientation, **kwargs)
    out = np.asarray(load_rgb(path)).astype(int)
    assert out.shape == (80, 40, 3)
    assert np.abs(out - upright_card()).mean() < 8
    small = np.asarray(load_rgb(path, max_side=40)).astype(int)  # draft / shrink path too
    assert small.shape[:2] == (40, 20)


def test_tiff_orientation_6_through_prepare(tmp_path: Path) -> None:
    """The reported case: a TIFF with Orientation=6 came out of ``prepare`` turned 90 degrees."""
    for fmt, ext in (("TIFF", "tif"), ("JPEG", "jpg"), ("PNG", "png")):
        _save_rotated(tmp_path / f"c.{ext}", fmt, 6, **({"quality": 95} if ext == "jpg" else {}))
    ref = prepare_image(tmp_path / "c.png", 32, NO_CROP).astype(int)
    expected = prepare_image(Image.fromarray(upright_card()), 32, NO_CROP).astype(int)
    assert np.abs(ref - expected).mean() < 8
    for ext in ("tif", "jpg"):
        assert np.abs(prepare_image(tmp_path / f"c.{ext}", 32, NO_CROP) - ref).mean() < 8


def test_xmp_only_orientation_applied(tmp_path: Path) -> None:
    stored = Image.fromarray(upright_card()).transpose(_STORE[6])
    xmp = (
        b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/'
        b'22-rdf-syntax-ns#"><rdf:Description xmlns:tiff="http://ns.adobe.com/tiff/1.0/" '
        b'tiff:Orientation="6"/></rdf:RDF></x:xmpmeta>'
    )
    stored.save(tmp_path / "x.jpg", quality=95, xmp=xmp)
    out = np.asarray(load_rgb(tmp_path / "x.jpg")).astype(int)
    assert out.shape == (80, 40, 3) and np.abs(out - upright_card()).mean() < 8


# --------------------------------------------------------------------------- 2. bit depth


def _insert_chunk(path: Path, cid: bytes, data: bytes) -> None:
    """Put a chunk right after IHDR (Pillow cannot write sBIT for 16-bit colour)."""
    raw = path.read_bytes()
    end = 8 + 8 + 13 + 4
    chunk = struct.pack(">I", len(data)) + cid + data + struct.pack(">I", zlib.crc32(cid + data))
    path.write_bytes(raw[:end] + chunk + raw[end:])


def _gray12() -> np.ndarray:
    """12-bit detector data in 16-bit samples: 0 .. 4095 (right-aligned)."""
    return np.linspace(0, 4095, 64).astype(np.uint16).reshape(8, 8)


def _expected8(data12: np.ndarray) -> np.ndarray:
    return np.rint(data12.astype(float) / 4095 * 255).astype(int)


def test_png_sbit_12_is_scaled_by_4095(tmp_path: Path, caplog) -> None:
    info = PngImagePlugin.PngInfo()
    info.add(b"sBIT", bytes([12]))
    Image.fromarray(_gray12()).save(tmp_path / "g.png", pnginfo=info)
    with caplog.at_level(logging.WARNING):
        out = np.asarray(load_rgb(tmp_path / "g.png"))[..., 0].astype(int)
    assert out.max() == 255 and len(np.unique(out)) > 60  # was max 15, 16 grey levels
    assert np.abs(out - _expected8(_gray12())).max() <= 1
    assert "bit depth" not in caplog.text  # declared: no warning


def test_png_sbit_left_aligned_data_per_spec(tmp_path: Path) -> None:
    info = PngImagePlugin.PngInfo()
    info.add(b"sBIT", bytes([12]))
    Image.fromarray(_gray12() << 4).save(tmp_path / "g.png", pnginfo=info)
    out = np.asarray(load_rgb(tmp_path / "g.png"))[..., 0].astype(int)
    assert np.abs(out - _expected8(_gray12())).max() <= 1


def test_undeclared_depth_warns_naming_file_and_keeps_range(
    tmp_path: Path, caplog, monkeypatch
) -> None:
    monkeypatch.setattr(formats, "_warned", 0)  # the per-process warning cap
    data = (_gray12().astype(int) * 2700 // 4095).astype(np.uint16)  # a dim 12-bit image, max 2700
    Image.fromarray(data).save(tmp_path / "dim.png")
    with caplog.at_level(logging.WARNING):
        out = np.asarray(load_rgb(tmp_path / "dim.png"))[..., 0].astype(int)
    assert np.abs(out - _expected8(data)).max() <= 1  # read as 12-bit: 2700 -> 168, not 10
    assert str(tmp_path / "dim.png") in caplog.text and "12-bit" in caplog.text


def test_tiff_max_sample_value_honoured(tmp_path: Path) -> None:
    data = (_gray12() // 2).astype(np.uint16)  # max 2047
    Image.fromarray(data).save(tmp_path / "g.tif", tiffinfo={281: 4095})
    out = np.asarray(load_rgb(tmp_path / "g.tif"))[..., 0].astype(int)
    assert np.abs(out - _expected8(data)).max() <= 1  # 2047 -> 127, not 255 (stretch) or 8


def test_16bit_colour_png_with_sbit(tmp_path: Path) -> None:
    cv2 = pytest.importorskip("cv2")
    rgb = np.zeros((4, 6, 3), np.uint16)
    rgb[0, 0] = (4095, 0, 2048)
    rgb[3, 5] = (1024, 3000, 4095)
    path = tmp_path / "c.png"
    cv2.imwrite(str(path), rgb[..., ::-1])  # OpenCV writes BGR
    _insert_chunk(path, b"sBIT", bytes([12, 12, 12]))
    out = np.asarray(load_rgb(path)).astype(int)
    assert np.abs(out[0, 0] - [255, 0, 128]).max() <= 1
    assert np.abs(out[3, 5] - [64, 187, 255]).max() <= 1


def test_signed_and_float_tiff(tmp_path: Path, caplog, monkeypatch) -> None:
    monkeypatch.setattr(formats, "_warned", 0)
    tifffile = pytest.importorskip("tifffile")
    signed = np.array([[-1000, 0], [500, 1000]], np.int16)
    tifffile.imwrite(tmp_path / "s.tif", signed)
    with caplog.at_level(logging.WARNING):
        out = np.asarray(load_rgb(tmp_path / "s.tif"))[..., 0].astype(int)
    assert out.tolist() == [[0, 128], [191, 255]]
    assert str(tmp_path / "s.tif") in caplog.text
    unit = np.array([[0.0, 0.25], [0.5, 1.0]], np.float32)
    tifffile.imwrite(tmp_path / "f.tif", unit)
    assert np.asarray(load_rgb(tmp_path / "f.tif"))[..., 0].tolist() == [[0, 64], [128, 255]]


# --------------------------------------------------------------------------- 3. hidden files


def _png(path: Path, seed: int, size: tuple[int, int] = (8, 6)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return path


def _junk(root: Path) -> None:
    """What macOS, Windows and zip tools leave behind; none of it is an image."""
    (root / "0").mkdir(parents=True, exist_ok=True)
    (root / "0" / "._x.png").write_bytes(b"\x00\x05\x16\x07AppleDouble" + bytes(100))
    (root / "0" / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (root / "0" / "Thumbs.db").write_bytes(b"\xd0\xcf\x11\xe0")
    (root / "0" / "desktop.ini").write_text("[.ShellClassInfo]")
    (root / "__MACOSX" / "0").mkdir(parents=True)
    (root / "__MACOSX" / "0" / "._y.png").write_bytes(b"\x00\x05\x16\x07")
    (root / ".cache").mkdir()
    (root / ".cache" / "z.png").write_bytes(b"junk")


def test_walker_skips_hidden_and_system_files(tmp_path: Path) -> None:
    _png(tmp_path / "0" / "x.png", 1)
    _png(tmp_path / "1" / "y.png", 2)
    _junk(tmp_path)
    listing = list_image_files(tmp_path)
    assert listing.files == ["0/x.png", "1/y.png"]
    assert listing.ignored == [] and listing.folders == ["0", "1"]
    assert all(is_hidden(n) for n in ("._x.png", "__MACOSX", "Thumbs.db", "desktop.ini"))


def test_predict_walker_skips_appledouble(tmp_path: Path) -> None:
    from medtune.workflows.predict import expand_inputs

    _png(tmp_path / "0" / "x.png", 1)
    _junk(tmp_path)
    assert expand_inputs([str(tmp_path / "0")]) == [tmp_path / "0" / "x.png"]
    assert expand_inputs([str(tmp_path)]) == [tmp_path / "0" / "x.png"]


def test_train_loader_skips_the_same_files(tmp_path: Path) -> None:
    for i in range(2):
        _png(tmp_path / "0" / f"a{i}.png", i)
        _png(tmp_path / "1" / f"b{i}.png", 10 + i)
    _junk(tmp_path)
    s = load_imageset(tmp_path)
    assert s.keys == ["0/a0.png", "0/a1.png", "1/b0.png", "1/b1.png"]


# --------------------------------------------------------------------------- 4. extensions


def test_every_pillow_format_is_a_class(tmp_path: Path, caplog) -> None:
    for i in range(2):
        _png(tmp_path / "0" / f"a{i}.png", i)
        _png(tmp_path / "2" / f"b{i}.png", 10 + i)
        (tmp_path / "4").mkdir(exist_ok=True)
        Image.open(_png(tmp_path / "tmp" / f"c{i}.png", 20 + i)).save(tmp_path / "4" / f"c{i}.webp")
    for i, ext in enumerate((".gif", ".ppm", ".tga", ".jp2")):
        Image.open(tmp_path / "tmp" / "c0.png").convert("RGB").save(tmp_path / "4" / f"d{i}{ext}")
    shutil.rmtree(tmp_path / "tmp")
    (tmp_path / "4" / "notes.txt").write_text("x")
    (tmp_path / "4" / "scan.pdf").write_bytes(b"%PDF-1.4")
    with caplog.at_level(logging.WARNING):
        s = load_imageset(tmp_path)
    assert s.class_names == ["0", "2", "4"]
    assert sum(k.startswith("4/") for k in s.keys) == 6
    assert "ignored 2 non-image file(s)" in caplog.text and "4/notes.txt" in caplog.text
    assert {".webp", ".gif", ".tga", ".jp2", ".dcm"} <= set(IMAGE_EXTENSIONS)


def test_class_folder_without_usable_image_is_refused(tmp_path: Path) -> None:
    for i in range(2):
        _png(tmp_path / "0" / f"a{i}.png", i)
        _png(tmp_path / "1" / f"b{i}.png", 10 + i)
    (tmp_path / "4").mkdir()
    (tmp_path / "4" / "x.raw").write_bytes(b"\x00" * 10)
    with pytest.raises(MedtuneError) as info:
        load_imageset(tmp_path)
    msg = str(info.value)
    assert str(tmp_path / "4") in msg and "4/x.raw" in msg and "\n" not in msg


def test_class_whose_images_were_all_skipped_is_refused(tmp_path: Path) -> None:
    for i in range(2):
        _png(tmp_path / "0" / f"a{i}.png", i)
        _png(tmp_path / "1" / f"b{i}.png", 10 + i)
        (tmp_path / "2").mkdir(exist_ok=True)
        (tmp_path / "2" / f"e{i}.png").write_bytes(b"")
    with pytest.raises(MedtuneError) as info:
        load_imageset(tmp_path, skip_bad=True)
    assert str(tmp_path / "2") in str(info.value)


# --------------------------------------------------------------------------- 6. duplicates


def _duplicated_set(root: Path, n: int = 10) -> None:
    """Every image also exists under a second name (as in the report)."""
    for i in range(n):
        cls = str(i % 2)
        src = _png(root / cls / f"img{i:02d}.png", i, size=(8 + i % 3, 6))
        shutil.copyfile(src, root / cls / f"copy_of_img{i:02d}.png")


def test_identical_files_never_cross_splits(tmp_path: Path, caplog) -> None:
    _duplicated_set(tmp_path, 20)
    with caplog.at_level(logging.INFO, logger="medtune.data.grouping"):
        s = load_imageset(tmp_path)
    assert "20 groups of byte-identical files (40 files)" in caplog.text
    for seed in range(3):
        split = dict(zip(s.keys, make_splits(s, val=0.25, test=0.25, seed=seed), strict=True))
        assert len(set(split.values())) == 3
        for key, part in split.items():
            if key.split("/")[1].startswith("img"):
                twin = key.replace("/img", "/copy_of_img")
                assert split[twin] == part, (key, seed)


def test_same_size_different_content_not_grouped(tmp_path: Path) -> None:
    for i in range(4):
        (tmp_path / str(i % 2)).mkdir(exist_ok=True)
        arr = np.full((4, 4, 3), i * 40, np.uint8)
        Image.fromarray(arr).save(tmp_path / str(i % 2) / f"x{i}.bmp")
    s = load_imageset(tmp_path)
    assert len({(tmp_path / k).stat().st_size for k in s.keys}) == 1
    assert s.groups is None


def test_duplicate_groups_merge_with_patient_ids(tmp_path: Path) -> None:
    # p1 = {a, b}; c (patient p2) is a byte copy of b -> a, b, c must be one group
    for name, seed in (("a", 1), ("b", 2), ("d", 3), ("e", 4), ("f", 5)):
        _png(tmp_path / f"{name}.png", seed)
    shutil.copyfile(tmp_path / "b.png", tmp_path / "c.png")
    rows = [("a", 0, "p1"), ("b", 1, "p1"), ("c", 0, "p2"), ("d", 1, "p3"), ("e", 0, "p4")]
    rows.append(("f", 1, "p5"))
    text = "image,label,patient_id\n" + "".join(f"{n}.png,{v},{p}\n" for n, v, p in rows)
    (tmp_path / "labels.csv").write_text(text)
    g = dict(zip(load_imageset(tmp_path).keys, load_imageset(tmp_path).groups, strict=True))
    assert g["a.png"] == g["b.png"] == g["c.png"]
    assert len({g["a.png"], g["d.png"], g["e.png"], g["f.png"]}) == 4


def _texture(rng: np.random.Generator, side: int = 128) -> np.ndarray:
    """A photo-like test image: a sum of random plane waves (phash needs real structure)."""
    y, x = np.mgrid[0:side, 0:side] / side
    img = np.zeros((side, side, 3))
    for _ in range(12):
        fx, fy = rng.uniform(-12, 12, 2)
        wave = np.sin(2 * np.pi * (fx * x + fy * y) + rng.uniform(0, 6.3))
        img += wave[..., None] * rng.uniform(0, 1, 3)
    return ((img - img.min()) / np.ptp(img) * 255).astype(np.uint8)


def test_near_duplicates_only_on_request(tmp_path: Path) -> None:
    pytest.importorskip("imagehash")
    rng = np.random.default_rng(0)
    for cls in ("0", "1"):
        (tmp_path / cls).mkdir()
    for i in range(3):
        base = _texture(rng)
        Image.fromarray(base).save(tmp_path / str(i % 2) / f"x{i}.png")
        Image.fromarray(base).save(tmp_path / str((i + 1) % 2) / f"x{i}_reencoded.jpg", quality=85)
    exact = load_imageset(tmp_path)
    assert exact.groups is None  # not byte-identical
    near = load_imageset(tmp_path, near_duplicates=8)
    g = dict(zip(near.keys, near.groups, strict=True))
    for i in range(3):
        assert g[f"{i % 2}/x{i}.png"] == g[f"{(i + 1) % 2}/x{i}_reencoded.jpg"]
    assert len(set(near.groups)) == 3


def test_predict_glob_skips_hidden_and_non_images_but_keeps_named_files(tmp_path: Path) -> None:
    from medtune.workflows.predict import expand_inputs

    _png(tmp_path / "0" / "x.png", 1)
    _junk(tmp_path)
    (tmp_path / "0" / "notes.txt").write_text("x")
    assert expand_inputs([str(tmp_path / "0" / "*")]) == [tmp_path / "0" / "x.png"]
    named = tmp_path / "0" / "Thumbs.db"  # named explicitly: used (and fails later if bad)
    assert expand_inputs([str(named)]) == [named]


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_16bit_colour_upright_and_declared_depth(tmp_path: Path, orientation: int) -> None:
    """16-bit colour is read at full depth, scaled by its declared maximum, turned once."""
    tifffile = pytest.importorskip("tifffile")
    cv2 = pytest.importorskip("cv2")
    stored8 = np.asarray(Image.fromarray(upright_card()).transpose(_STORE[orientation]))
    stored = (stored8.astype(np.uint32) * 4095 // 255).astype(np.uint16)  # 12-bit colour
    tags = [(0x0112, 3, 1, orientation, False), (281, 3, 1, 4095, False)]
    tifffile.imwrite(tmp_path / "c.tif", stored, photometric="rgb", extratags=tags)
    tifffile.imwrite(
        tmp_path / "p.tif",
        np.moveaxis(stored, -1, 0),
        photometric="rgb",
        planarconfig="separate",
        extratags=tags,
    )
    cv2.imwrite(str(tmp_path / "c.png"), stored[..., ::-1])
    exif = Image.Exif()
    exif[0x0112] = orientation
    _insert_chunk(tmp_path / "c.png", b"eXIf", exif.tobytes()[6:])  # without the "Exif" header
    _insert_chunk(tmp_path / "c.png", b"sBIT", bytes([12, 12, 12]))
    for name in ("c.tif", "p.tif", "c.png"):
        out = np.asarray(load_rgb(tmp_path / name)).astype(int)
        assert out.shape == (80, 40, 3), name
        assert np.abs(out - upright_card()).max() <= 1, name
