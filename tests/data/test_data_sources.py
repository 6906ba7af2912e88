"""medtune.data.sources.load_imageset: every source layout and every user error."""

from __future__ import annotations

import os
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from medtune.data import ImageSet, load_imageset
from medtune.errors import BadImageError, MedtuneError


def _img(path: Path, value: int = 100, size: tuple[int, int] = (6, 4)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fmt = {".jpg": "JPEG", ".jpeg": "JPEG", ".tif": "TIFF", ".bmp": "BMP"}.get(
        path.suffix.lower(), "PNG"
    )
    img = Image.new("RGB", size, (value, value // 2, 10))
    img.putpixel((0, 0), tuple(zlib.crc32(str(path).encode()).to_bytes(4, "big")[:3]))  # unique
    # JPEG may quantise two such pixels to the same bytes: a comment keeps the files distinct
    extra = {"comment": str(path).encode()} if fmt == "JPEG" else {}
    img.save(path, format=fmt, **extra)
    return path


def _labels_folder(root: Path, rows: list[tuple[str, object]], extra: str = "") -> Path:
    for name, _ in rows:
        _img(root / name)
    text = "image,label" + extra + "\n"
    text += "".join(f"{n},{lab}\n" for n, lab in rows)
    (root / "labels.csv").write_text(text, encoding="utf-8")
    return root


def _error(src: Path, named: Path, **kwargs: object) -> str:
    with pytest.raises(MedtuneError) as info:
        load_imageset(src, **kwargs)
    msg = str(info.value)
    assert str(named) in msg, msg
    assert "\n" not in msg
    return msg


# --------------------------------------------------------------------------- layouts


def test_class_folders_numeric_order_and_extensions(tmp_path: Path) -> None:
    for cls in ("0", "1", "2", "10"):
        _img(tmp_path / cls / "a.PNG")
        _img(tmp_path / cls / "b.jpg")
    _img(tmp_path / "2" / "sub" / "c.TIFF")
    (tmp_path / "0" / "notes.txt").write_text("ignored")
    _img(tmp_path / "0" / ".hidden.png")
    s = load_imageset(tmp_path)
    assert s.class_names == ["0", "1", "2", "10"]
    assert len(s) == 9 and s.labels.dtype == np.int64
    assert s.keys[0] == "0/a.PNG"
    assert "2/sub/c.TIFF" in s.keys
    assert s.labels[s.keys.index("10/b.jpg")] == 3
    assert s.groups is None and s.predefined_split is None
    assert s.root == tmp_path and s.source == str(tmp_path)
    img = s.load(0)
    assert img.mode == "RGB" and img.size == (6, 4)


def test_class_folders_string_names_non_ascii(tmp_path: Path) -> None:
    for cls in ("sain", "rétinopathie"):
        _img(tmp_path / cls / "œil_1.png")
        _img(tmp_path / cls / "眼底.png")
    s = load_imageset(tmp_path)
    assert s.class_names == ["rétinopathie", "sain"]
    assert s.load(s.keys.index("sain/眼底.png")).size == (6, 4)


def test_labels_csv_with_patient_id_and_string_labels(tmp_path: Path) -> None:
    rows = [("p1_l.png", "mild"), ("p1_r.png", "none"), ("p2_l.png", "mild"), ("p2_r.png", "none")]
    for name, _ in rows:
        _img(tmp_path / name)
    lines = ["image,label,patient_id"] + [f"{n},{lab},{n[:2]}" for n, lab in rows]
    (tmp_path / "labels.csv").write_text("\n".join(lines) + "\n")
    s = load_imageset(tmp_path)
    assert s.class_names == ["mild", "none"]
    assert s.labels.tolist() == [0, 1, 0, 1]
    assert s.groups == ["p1", "p1", "p2", "p2"]


def test_int_labels_dr_grades(tmp_path: Path) -> None:
    rows = [(f"i{i}.png", i % 5) for i in range(10)]
    s = load_imageset(_labels_folder(tmp_path, rows))
    assert s.class_names == ["0", "1", "2", "3", "4"]
    assert s.labels.tolist() == [i % 5 for i in range(10)]


def test_bom_semicolon_whitespace_headers(tmp_path: Path) -> None:
    for name in ("a.png", "b.png", "c.png", "d.png"):
        _img(tmp_path / name)
    text = "\ufeff Image ; LABEL \na.png;1\nb.png ; 1\nc.png;2.0\nd.png;2\n"
    (tmp_path / "labels.csv").write_bytes(text.encode("utf-8"))
    s = load_imageset(tmp_path)
    assert s.keys == ["a.png", "b.png", "c.png", "d.png"]
    assert s.class_names == ["1", "2"] and s.labels.tolist() == [0, 0, 1, 1]


def test_kaggle_train_labels(tmp_path: Path) -> None:
    names = ["10_left", "10_right", "13_left", "13_right", "15_left", "15_right"]
    for name in names:
        _img(tmp_path / "train" / f"{name}.jpeg")
    _img(tmp_path / "test" / "1_left.jpeg")  # unlabelled test images elsewhere are fine
    levels = [0, 0, 1, 1, 0, 1]
    text = "image,level\n" + "".join(f"{n},{v}\n" for n, v in zip(names, levels, strict=True))
    (tmp_path / "trainLabels.csv").write_text(text)
    s = load_imageset(tmp_path)
    assert s.keys[0] == "train/10_left.jpeg"
    assert s.labels.tolist() == levels
    assert s.groups == ["10", "10", "13", "13", "15", "15"]


def test_csv_path_with_images_subfolder_and_dup_groups(tmp_path: Path) -> None:
    names = [f"x{i}.png" for i in range(6)]
    for name in names:
        _img(tmp_path / "images" / name)
    labels = [0, 0, 0, 1, 1, 1]
    text = "image,label\n" + "".join(f"{n},{v}\n" for n, v in zip(names, labels, strict=True))
    (tmp_path / "labels.csv").write_text(text)
    (tmp_path / "metadata.csv").write_text(
        "image,label,dup_group\nx0.png,0,dupA\nx3.png,1,dupA\nx1.png,0,\n"
    )
    s = load_imageset(tmp_path / "labels.csv")
    assert s.keys[0] == "images/x0.png" and s.root == tmp_path
    assert s.groups is not None
    assert s.groups[0] == s.groups[3] == "dupA"
    assert len(set(s.groups)) == 5


def test_patient_and_dup_groups_are_merged(tmp_path: Path) -> None:
    rows = [("a.png", 0, "p1"), ("b.png", 0, "p2"), ("c.png", 1, "p3"), ("d.png", 1, "p3")]
    for name, *_ in rows:
        _img(tmp_path / name)
    text = "image,label,patient_id\n" + "".join(f"{n},{v},{p}\n" for n, v, p in rows)
    (tmp_path / "labels.csv").write_text(text)
    (tmp_path / "metadata.csv").write_text("image,dup_group\na.png,g\nc.png,g\n")
    g = load_imageset(tmp_path).groups
    assert g is not None
    assert g[0] == g[2] == g[3] and g[1] != g[0]


def _npz(path: Path) -> Path:
    rng = np.random.default_rng(0)
    np.savez(
        path,
        train_images=rng.integers(0, 255, (6, 8, 8, 3), dtype=np.uint8),
        train_labels=np.array([[0], [1], [2], [0], [1], [2]], dtype=np.uint8),
        val_images=rng.integers(0, 255, (3, 8, 8, 3), dtype=np.uint8),
        val_labels=np.array([[0], [1], [2]]),
        test_images=rng.integers(0, 255, (3, 8, 8), dtype=np.uint8),  # grayscale
        test_labels=np.array([[2], [1], [0]]),
    )
    return path


def test_medmnist_npz(tmp_path: Path) -> None:
    path = _npz(tmp_path / "tiny.npz")
    s = load_imageset(path)
    assert len(s) == 12 and s.class_names == ["0", "1", "2"]
    assert s.predefined_split == ["train"] * 6 + ["val"] * 3 + ["test"] * 3
    assert s.keys[0] == "train/0" and s.keys[-1] == "test/2"
    assert s.labels[-3:].tolist() == [2, 1, 0]
    with np.load(path) as z:
        assert np.array_equal(np.asarray(s.load(1)), z["train_images"][1])
        gray = np.asarray(s.load(9))
        assert gray.shape == (8, 8, 3) and np.array_equal(gray[..., 1], z["test_images"][0])
    ident = s.identity(0)
    assert ident != s.identity(1)
    sub = s.subset([9, 0])
    assert sub.keys == ["test/0", "train/0"] and sub.predefined_split == ["test", "train"]
    np.savez(path, train_images=np.zeros((4, 8, 8, 3), np.uint8), train_labels=[[0], [0], [1], [1]])
    changed = load_imageset(path)
    assert changed.predefined_split == ["train"] * 4
    assert changed.identity(0) != ident  # content hash of the file


def test_npz_bad_labels(tmp_path: Path) -> None:
    path = tmp_path / "bad.npz"
    np.savez(path, train_images=np.zeros((4, 8, 8), np.uint8), train_labels=[[1], [0], [0], [0]])
    assert "class '1' has 1 image" in _error(path, path)
    np.savez(path, train_images=np.zeros((4, 8, 8), np.uint8), train_labels=np.eye(4)[:, :1])
    assert "float64" in _error(path, path)
    np.savez(path, x=np.zeros(3))
    assert "train_images" in _error(path, path)


def test_npz_multilabel_refused(tmp_path: Path) -> None:
    path = tmp_path / "multi.npz"
    np.savez(path, train_images=np.zeros((4, 8, 8), np.uint8), train_labels=np.zeros((4, 3)))
    _error(path, path)


def test_subset_identity_and_load_max_side(tmp_path: Path) -> None:
    rows = [(f"i{i}.png", i % 2) for i in range(4)]
    s = load_imageset(_labels_folder(tmp_path, rows))
    sub = s.subset([3, 1])
    assert sub.keys == ["i3.png", "i1.png"] and sub.labels.tolist() == [1, 1]
    assert isinstance(sub, ImageSet) and sub.class_names == s.class_names
    before = s.identity(0)
    _img(tmp_path / "i0.png", value=7, size=(7, 4))
    st = os.stat(tmp_path / "i0.png")
    os.utime(tmp_path / "i0.png", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert s.identity(0) != before
    assert max(s.load(0, max_side=3).size) == 3


# --------------------------------------------------------------------------- errors


def test_path_does_not_exist(tmp_path: Path) -> None:
    msg = _error(tmp_path / "missing", tmp_path / "missing")
    assert "does not exist" in msg


def test_missing_columns(tmp_path: Path) -> None:
    _img(tmp_path / "a.png")
    (tmp_path / "labels.csv").write_text("file_name,grade_x\na.png,1\n")
    msg = _error(tmp_path, tmp_path / "labels.csv")
    assert "file_name,grade_x" in msg and "image" in msg and "label" in msg


def test_row_with_missing_image(tmp_path: Path) -> None:
    _labels_folder(tmp_path, [("a.png", 0), ("b.png", 0), ("c.png", 1), ("d.png", 1)])
    (tmp_path / "c.png").unlink()
    msg = _error(tmp_path, tmp_path / "labels.csv")
    assert "row 4" in msg and "c.png" in msg and "--skip-bad" in msg


def test_unlabelled_image_file(tmp_path: Path) -> None:
    _labels_folder(tmp_path, [("a.png", 0), ("b.png", 0), ("c.png", 1), ("d.png", 1)])
    _img(tmp_path / "stray.png")
    msg = _error(tmp_path, tmp_path / "labels.csv")
    assert "stray.png" in msg and "no label row" in msg


def test_duplicate_image_rows(tmp_path: Path) -> None:
    _labels_folder(tmp_path, [("a.png", 0), ("b.png", 0), ("c.png", 1), ("a.png", 1)])
    msg = _error(tmp_path, tmp_path / "labels.csv")
    assert "rows 2 and 5" in msg and "a.png" in msg


def test_duplicate_via_extensionless_name(tmp_path: Path) -> None:
    _labels_folder(tmp_path, [("a.png", 0), ("b.png", 0), ("c.png", 1), ("a", 1)])
    _error(tmp_path, tmp_path / "labels.csv")


def test_label_outside_given_classes(tmp_path: Path) -> None:
    _labels_folder(tmp_path, [("a.png", 0), ("b.png", 0), ("c.png", 7), ("d.png", 7)])
    msg = _error(tmp_path, tmp_path / "labels.csv", classes=[0, 1, 2])
    assert "'7'" in msg and "row 4" in msg


def test_given_classes_order_kept(tmp_path: Path) -> None:
    _labels_folder(tmp_path, [("a.png", "b"), ("b.png", "b"), ("c.png", "a"), ("d.png", "a")])
    s = load_imageset(tmp_path, classes=["b", "a"])
    assert s.class_names == ["b", "a"] and s.labels.tolist() == [0, 0, 1, 1]


def test_class_with_one_image(tmp_path: Path) -> None:
    _labels_folder(tmp_path, [("a.png", 0), ("b.png", 0), ("c.png", 1)])
    msg = _error(tmp_path, tmp_path / "labels.csv")
    assert "class '1' has 1 image" in msg


def test_single_class(tmp_path: Path) -> None:
    for name in ("a.png", "b.png"):
        _img(tmp_path / "only" / name)
    msg = _error(tmp_path, tmp_path)
    assert "only one class" in msg


def test_no_images_at_all(tmp_path: Path) -> None:
    (tmp_path / "readme.txt").write_text("x")
    _error(tmp_path, tmp_path)


@pytest.mark.parametrize("bad", ["../outside.png", "sub/../../outside.png", "ABS"])
def test_path_escaping_data_folder_refused(tmp_path: Path, bad: str) -> None:
    outside = _img(tmp_path / "outside.png")
    root = tmp_path / "data"
    _labels_folder(root, [("a.png", 0), ("b.png", 0), ("c.png", 1)])
    name = str(outside) if bad == "ABS" else bad
    with open(root / "labels.csv", "a") as fh:
        fh.write(f"{name},1\n")
    msg = _error(root, root / "labels.csv")
    assert "outside the data folder" in msg


def test_absolute_path_inside_root_allowed(tmp_path: Path) -> None:
    _labels_folder(tmp_path, [("a.png", 0), ("b.png", 0), ("c.png", 1)])
    with open(tmp_path / "labels.csv", "a") as fh:
        fh.write(f"{tmp_path / 'd.png'},1\n")
    _img(tmp_path / "d.png")
    assert load_imageset(tmp_path).keys[-1] == "d.png"


def test_zero_byte_image_is_bad(tmp_path: Path) -> None:
    _labels_folder(tmp_path, [("a.png", 0), ("b.png", 0), ("c.png", 1), ("d.png", 1)])
    (tmp_path / "b.png").write_bytes(b"")
    with pytest.raises(BadImageError) as info:
        load_imageset(tmp_path)
    assert str(tmp_path / "b.png") in str(info.value) and "\n" not in str(info.value)


def test_not_utf8_csv(tmp_path: Path) -> None:
    _img(tmp_path / "é.png")
    (tmp_path / "labels.csv").write_bytes("image,label\né.png,1\n".encode("latin-1"))
    msg = _error(tmp_path, tmp_path / "labels.csv")
    assert "UTF-8" in msg


def test_skip_bad_lists_skipped_files(tmp_path: Path) -> None:
    rows = [("a.png", 0), ("b.png", 0), ("c.png", 0), ("d.png", 1), ("e.png", 1), ("f.png", 1)]
    _labels_folder(tmp_path, rows)
    (tmp_path / "a.png").unlink()
    (tmp_path / "d.png").write_bytes(b"")
    _img(tmp_path / "stray.png")
    log = tmp_path / "out" / "skipped.csv"
    s = load_imageset(tmp_path, skip_bad=True, skipped_log=log)
    assert s.keys == ["b.png", "c.png", "e.png", "f.png"]
    frame = pd.read_csv(log)
    assert list(frame.columns) == ["path", "reason"]
    reasons = dict(zip(frame["path"].map(lambda p: Path(p).name), frame["reason"], strict=True))
    assert reasons == {
        "a.png": "image file not found",
        "stray.png": "no label row",
        "d.png": "empty file",
    }


def test_csv_given_directly(tmp_path: Path) -> None:
    _labels_folder(tmp_path, [("a.png", 0), ("b.png", 0), ("c.png", 1), ("d.png", 1)])
    (tmp_path / "subset.csv").write_text("image,label\na.png,0\nb.png,0\nc.png,1\nd.png,1\n")
    _img(tmp_path / "e.png")  # not listed: fine for an arbitrary CSV (a subset) ...
    assert len(load_imageset(tmp_path / "subset.csv")) == 4
    # ... but labels.csv given directly behaves like its folder
    assert "e.png" in _error(tmp_path / "labels.csv", tmp_path / "labels.csv")


def test_unsupported_file(tmp_path: Path) -> None:
    path = _img(tmp_path / "x.png")
    assert "unsupported" in _error(path, path)
