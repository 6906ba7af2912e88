"""Every error's advice fits the command it came from (issue 23, item 6).

Each command is driven into the errors its users meet (a full disk, an unreadable image, a
``labels.csv`` naming ``eye0.png`` beside ``eye0.jpg``, a DICOM without pixel data); every option
the one-line message advises must be an option of that command's own ``--help``.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from conftest import tiny_flags, write_dicom, write_graded_images
from PIL import Image

import medtune.io as mio
from medtune.cli.main import main
from medtune.errors import MedtuneError, offer, render

OPTION = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")


def _help_options(command: str, capsys) -> set[str]:
    with pytest.raises(SystemExit):
        main([command, "--help"])
    return set(OPTION.findall(capsys.readouterr().out))


def _error(argv: list[str], capsys) -> str:
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("medtune: error:")]
    assert len(lines) == 1 and lines[0] == err.strip().splitlines()[-1], err
    return lines[0]


def _fits(command: str, message: str, capsys) -> None:
    named = set(OPTION.findall(message))
    assert named <= _help_options(command, capsys), (command, named, message)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    root = tmp_path_factory.mktemp("advice")
    data = write_graded_images(root / "data", n_per_class=6, size=32, classes=3)
    args = [
        "train",
        "--data",
        str(data),
        "--out",
        str(root / "run"),
        "--cache-dir",
        str(root / "c"),
    ]
    assert main([*args, "--strategy", "linear-probe", *tiny_flags()]) == 0
    args = ["train", "--data", str(data), "--out", str(root / "ft"), "--cache-dir", str(root / "c")]
    assert main([*args, "--strategy", "finetune", "--epochs", "1", *tiny_flags()]) == 0
    bad = root / "bad"
    shutil.copytree(data, bad)
    (bad / "0" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    photos = root / "photos"
    photos.mkdir()
    for i, src in enumerate(sorted((data / "1").glob("*.png"))[:3]):
        shutil.copy(src, photos / f"eye{i}.png")
    bad_photos = root / "bad_photos"
    shutil.copytree(photos, bad_photos)
    (bad_photos / "broken.png").write_bytes(b"not an image")
    # labels.csv names eye0.png; the file beside it is eye0.jpg
    csv_set = root / "csv_set"
    csv_set.mkdir()
    lines = ["image,label"]
    for i, src in enumerate(sorted(data.glob("*/*.png"))[:6]):
        name = f"eye{i}.jpg" if i == 0 else f"eye{i}.png"
        Image.open(src).convert("RGB").save(csv_set / name)
        lines.append(f"eye{i}.png,{i % 2}")
    (csv_set / "labels.csv").write_text("\n".join(lines) + "\n")
    dicom = write_dicom(
        root / "nopix.dcm", np.zeros((8, 8), np.uint8), photometric="MONOCHROME2", rows=8, cols=8
    )
    import pydicom

    ds = pydicom.dcmread(dicom)
    del ds.PixelData
    ds.save_as(dicom)
    return SimpleNamespace(
        root=root,
        data=data,
        run=root / "run",
        finetuned=root / "ft",
        bad=bad,
        photos=photos,
        bad_photos=bad_photos,
        csv_set=csv_set,
        dicom=dicom,
    )


def _argv(command: str, w: SimpleNamespace, tmp: Path, data: Path, photos: Path) -> list[str]:
    return {
        "prepare": ["prepare", "--data", str(data), "--out", str(tmp / "c"), "--size", "32"],
        "train": ["train", "--data", str(data), "--out", str(tmp / "r"), *tiny_flags()]
        + ["--strategy", "linear-probe", "--cache-dir", str(tmp / "cache")],
        "evaluate": ["evaluate", "--run", str(w.run), "--data", str(data), "--no-gradcam"],
        "predict": ["predict", str(photos), "--run", str(w.run), "--out", str(tmp / "p.csv")],
        "adapt": ["adapt", "--run", str(w.finetuned), "--data", str(photos)]
        + ["--out", str(tmp / "a")],
        "advise": ["advise", "--data", str(data), "--backbones", "efficientnet_lite0"]
        + ["--image-size", "32", "--fundus", "none", "--cache-dir", str(tmp / "cache")],
        "export": ["export", "--run", str(w.run), "--out", str(tmp / "e")],
    }[command]


class _FullDisk:
    """``os`` for :mod:`medtune.io` whose ``replace`` (publishing a written file) finds the
    disk full, as a real full disk does for the first output a command writes."""

    def __getattr__(self, name: str):
        return getattr(os, name)

    @staticmethod
    def replace(src, dst):
        raise OSError(errno.ENOSPC, "No space left on device", str(dst))


@pytest.mark.parametrize(
    "command", ["prepare", "train", "evaluate", "predict", "adapt", "advise", "export"]
)
def test_full_disk_advice_names_only_the_commands_options(command, world, tmp_path, capsys):
    mp = pytest.MonkeyPatch()
    mp.setattr(mio, "os", _FullDisk())
    try:
        line = _error(_argv(command, world, tmp_path, world.data, world.photos), capsys)
    finally:
        mp.undo()
    assert "No space left on device" in line and "free some space" in line
    _fits(command, line, capsys)
    if command == "predict":  # predict has both: they are offered
        assert "--out" in line and "--resume" in line and "--cache-dir" not in line
    if command == "evaluate":
        assert "--out" not in line and "--resume" not in line


@pytest.mark.parametrize("command", ["prepare", "train", "evaluate", "predict", "adapt", "advise"])
def test_unreadable_image_advice_names_only_the_commands_options(command, world, tmp_path, capsys):
    line = _error(_argv(command, world, tmp_path, world.bad, world.bad_photos), capsys)
    assert "broken.png" in line
    _fits(command, line, capsys)
    has_skip_bad = "--skip-bad" in _help_options(command, capsys)
    assert ("--skip-bad" in line) == has_skip_bad  # offered exactly where it exists


@pytest.mark.parametrize("command", ["prepare", "train", "evaluate", "advise"])
def test_csv_naming_the_wrong_extension_points_at_the_file(command, world, tmp_path, capsys):
    line = _error(_argv(command, world, tmp_path, world.csv_set, world.photos), capsys)
    assert "'eye0.png' not found" in line and "there is 'eye0.jpg'" in line
    _fits(command, line, capsys)


@pytest.mark.parametrize("command", ["predict", "adapt"])
def test_dicom_without_pixel_data_is_one_line(command, world, tmp_path, capsys):
    folder = tmp_path / "dicoms"
    folder.mkdir()
    shutil.copy(world.dicom, folder / "nopix.dcm")
    line = _error(_argv(command, world, tmp_path, world.data, folder), capsys)
    assert "nopix.dcm" in line and "without pixel data" in line
    _fits(command, line, capsys)


def test_offered_advice_renders_for_the_api_and_for_each_command():
    err = MedtuneError(
        "x: full; free space" + offer(" or choose another {}", "--out", "--cache-dir")
    )
    assert str(err) == "x: full; free space or choose another --out / --cache-dir"  # the API
    assert render(err.args[0], ["--out"]) == "x: full; free space or choose another --out"
    assert render(err.args[0], ["--run"]) == "x: full; free space"
    assert "\ue000" not in str(err)
