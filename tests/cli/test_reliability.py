"""Issue 8: bad inputs, untrusted files and a hostile environment end with one clear line.

The decoding and data-source cases are unit-tested in test_images.py / test_data_sources.py; here
they go through the real command line (`medtune prepare` / `medtune train`): exit status 2, one
``medtune: error:`` line naming the file, no traceback. docs/reliability.md maps every case.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import tiny_flags, write_graded_images
from PIL import Image

from medtune import io as mio
from medtune.cli.main import main
from medtune.config import TrainConfig
from medtune.errors import MedtuneError

TINY = tiny_flags()
CLI = [sys.executable, "-m", "medtune.cli.main"]


def _cli_error(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    """Run the CLI in-process; assert exit 2 and ONE error line without traceback; return it."""
    code = main(argv)
    err = capsys.readouterr().err
    return _one_error_line(code, err)


def _one_error_line(code: int, err: str) -> str:
    assert code == 2, err
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if line.startswith("medtune: error: ")]
    assert len(errors) == 1, err
    assert err.strip().splitlines()[-1] == errors[0], err  # nothing after it
    return errors[0]


def _save(path: Path, arr: np.ndarray, mode: str | None = None, **kwargs: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr, mode=mode).save(path, **kwargs)
    return path


def _noise(seed: int, size: int = 24) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8)


def _class_folders(root: Path, ext: str = "png", n: int = 3) -> Path:
    for c in range(2):
        for i in range(n):
            _save(root / str(c) / f"img{i}.{ext}", _noise(10 * c + i))
    return root


def _labels_csv(root: Path, rows: list[tuple[str, str]], text: str | None = None) -> Path:
    for name, _ in rows:
        if not (root / name).exists():
            _save(root / name, _noise(len(name)))
    body = text or "image,label\n" + "".join(f"{n},{lab}\n" for n, lab in rows)
    (root / "labels.csv").write_text(body, encoding="utf-8")
    return root / "labels.csv"


# --------------------------------------------------------------------------- bad inputs (CLI)


def _truncated(ext: str) -> Callable[[Path], Path]:
    def make(root: Path) -> Path:
        _class_folders(root, ext)
        victim = root / "1" / f"img1.{ext}"
        data = victim.read_bytes()
        victim.write_bytes(data[: len(data) // 2])
        return victim

    return make


def _zero_byte(root: Path) -> Path:
    _class_folders(root)
    (root / "0" / "img2.png").write_bytes(b"")
    return root / "0" / "img2.png"


def _text_as_png(root: Path) -> Path:
    _class_folders(root)
    (root / "1" / "img0.png").write_text("patient notes, not an image\n")
    return root / "1" / "img0.png"


def _duplicate_rows(root: Path) -> Path:
    return _labels_csv(root, [("a.png", "0"), ("b.png", "0"), ("c.png", "1"), ("a.png", "1")])


def _single_class(root: Path) -> Path:
    for i in range(3):
        _save(root / "only" / f"{i}.png", _noise(i))
    return root


def _escaping_path(root: Path) -> Path:
    _save(root.parent / "secret.png", _noise(9))
    rows = [("a.png", "0"), ("b.png", "0"), ("c.png", "1"), ("d.png", "1")]
    csv = _labels_csv(root, rows)
    with open(csv, "a", encoding="utf-8") as fh:
        fh.write("../secret.png,1\n")
    return csv


def _latin1_csv(root: Path) -> Path:
    csv = _labels_csv(root, [("a.png", "0"), ("b.png", "0"), ("c.png", "1"), ("d.png", "1")])
    csv.write_bytes("image,label\nä.png,0\n".encode("latin-1"))
    return csv


BAD_INPUTS = {
    "truncated-jpeg": (_truncated("jpg"), "cannot read image"),
    "truncated-png": (_truncated("png"), "cannot read image"),
    "zero-byte": (_zero_byte, "empty file"),
    "text-named-png": (_text_as_png, "not a recognised image format"),
    "duplicate-csv-rows": (_duplicate_rows, "rows 2 and 5"),
    "single-class": (_single_class, "only one class"),
    "path-escapes-data-folder": (_escaping_path, "outside the data folder"),
    "csv-not-utf8": (_latin1_csv, "not UTF-8"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_prepare_bad_input_is_one_line_naming_the_file(case: str, tmp_path: Path, capsys):
    make, reason = BAD_INPUTS[case]
    named = make(tmp_path / "data")
    out = tmp_path / "cache"
    line = _cli_error(
        capsys,
        ["prepare", "--data", str(tmp_path / "data"), "--out", str(out), "--image-size", "16"],
    )
    assert str(named) in line and reason in line
    if out.is_dir():  # nothing half-built is left where the cache would be
        assert [p.name for p in out.iterdir()] == []


def test_prepare_bad_image_in_a_real_process(tmp_path: Path):
    """The installed entry point: exit status 2 and a last stderr line naming the file."""
    named = _truncated("jpg")(tmp_path / "data")
    proc = subprocess.run(
        [
            *CLI,
            "prepare",
            "--data",
            str(tmp_path / "data"),
            "--out",
            str(tmp_path / "cache"),
            "--image-size",
            "16",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    line = _one_error_line(proc.returncode, proc.stderr)
    assert str(named) in line and "--skip-bad" in line


def test_train_bad_image_is_one_line_error(tmp_path: Path, capsys):
    named = _text_as_png(tmp_path / "data")
    line = _cli_error(
        capsys, ["train", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "run"), *TINY]
    )
    assert str(named) in line


def test_tiny_class_counts_split_or_fail_in_one_line(tmp_path: Path, capsys):
    data = _class_folders(tmp_path / "data", n=3)
    code = main(
        ["train", "--data", str(data), "--out", str(tmp_path / "run"), "--epochs", "1", *TINY]
    )
    err = capsys.readouterr().err
    assert code == 0 or (code == 2 and "Traceback" not in err), err


def test_train_val_labels_outside_the_training_classes(tmp_path: Path, capsys):
    train = _class_folders(tmp_path / "train", n=6)
    val = _class_folders(tmp_path / "val")
    for i in range(2):
        _save(val / "7" / f"x{i}.png", _noise(50 + i))
    line = _cli_error(
        capsys,
        [
            "train",
            "--data",
            str(train),
            "--val-data",
            str(val),
            "--out",
            str(tmp_path / "run"),
            *TINY,
        ],
    )
    assert str(val) in line and "'7'" in line and "not one of the classes ['0', '1']" in line


def test_awkward_but_valid_images_are_prepared(tmp_path: Path, capsys):
    """CMYK, 16-bit TIFF, a 10000 x 10000 JPEG, non-ASCII names, a BOM + ';' labels.csv."""
    tifffile = pytest.importorskip("tifffile")
    root = tmp_path / "data"
    root.mkdir()
    cmyk = np.zeros((32, 32, 4), np.uint8)
    cmyk[..., 0] = 255  # pure cyan
    _save(root / "cmyk.jpg", cmyk, mode="CMYK", quality=100)
    rgb16 = np.full((32, 32, 3), (65535, 32896, 0), np.uint16)
    tifffile.imwrite(root / "rgb16.tif", rgb16, photometric="rgb")
    _save(root / "äöü_眼底.png", np.full((32, 32, 3), 200, np.uint8))
    _save(root / "ñandú.png", np.full((32, 32, 3), 40, np.uint8))
    Image.new("L", (10000, 10000), 90).save(root / "huge.jpg", quality=50)
    names = ["cmyk.jpg", "rgb16.tif", "äöü_眼底.png", "ñandú.png", "huge.jpg"]
    labels = ["0", "1", "0", "1", "1"]
    rows = "".join(f"{n};{lab}\n" for n, lab in zip(names, labels, strict=True))
    text = "\ufeff Image ; Label \n" + rows
    (root / "labels.csv").write_bytes(text.encode("utf-8"))
    out = tmp_path / "cache"
    assert (
        main(
            [
                "prepare",
                "--data",
                str(root),
                "--out",
                str(out),
                "--image-size",
                "16",
                "--fundus",
                "none",
            ]
        )
        == 0
    )
    assert "prepared 5 images (0 skipped)" in capsys.readouterr().out
    from medtune.data import open_cache

    (folder,) = [p for p in out.iterdir() if p.is_dir()]
    cache = open_cache(folder)
    pixel = {k: cache.images[i, 8, 8].astype(int) for i, k in enumerate(cache.keys)}
    assert sorted(pixel) == sorted(names)
    assert np.abs(pixel["cmyk.jpg"] - [0, 255, 255]).max() <= 8
    assert np.abs(pixel["rgb16.tif"] - [255, 128, 0]).max() <= 1  # scaled, not clipped
    assert np.abs(pixel["huge.jpg"] - 90).max() <= 3
    assert pixel["äöü_眼底.png"].tolist() == [200, 200, 200]


# --------------------------------------------------------------------------- untrusted files


class _Payload:
    """Unpickling this creates ``marker`` (a stand-in for arbitrary code)."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def _poisoned(path: Path, marker: Path, **extra: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({**extra, "payload": _Payload(marker)}, path)
    return path


def _assert_really_malicious(path: Path, marker: Path) -> None:
    """The file does run its payload when loaded without weights_only (so the test means it)."""
    torch.load(path, weights_only=False)
    assert marker.exists()


def test_weights_pickle_with_code_is_refused_by_the_cli(tmp_path: Path, capsys):
    marker = tmp_path / "pwned"
    evil = _poisoned(tmp_path / "evil.pth", marker, state_dict={"x": torch.zeros(1)})
    data = _class_folders(tmp_path / "data")
    argv = ["train", "--data", str(data), "--out", str(tmp_path / "run"), *TINY]
    argv[argv.index("--weights") + 1] = str(evil)
    line = _cli_error(capsys, argv)
    assert str(evil) in line and "refused to load" in line
    assert not marker.exists()
    _assert_really_malicious(evil, marker)


def _run_folder(tmp_path: Path) -> Path:
    """A run folder as `medtune train` leaves it (config.yaml), without training."""
    data = write_graded_images(tmp_path / "data", n_per_class=4, size=32)
    run = tmp_path / "run"
    config = TrainConfig(
        data=str(data),
        out=str(run),
        backbone="test_efficientnet",
        weights=None,
        image_size=32,
        epochs=1,
        batch_size=4,
        progress=False,
        fundus={"crop": False},
        precision="32-true",
        val_fraction=0.25,
        test_fraction=0.25,
    )
    mio.write_yaml(run / "config.yaml", config.to_dict())
    return run


def test_resume_from_a_poisoned_checkpoint_is_refused_unexecuted(tmp_path: Path, capsys):
    """Lightning loads RUN/checkpoints/last.ckpt with weights_only=True: the payload never runs."""
    run = _run_folder(tmp_path)
    marker = tmp_path / "pwned"
    last = _poisoned(
        run / "checkpoints" / "last.ckpt", marker, epoch=0, global_step=1, state_dict={}
    )
    line = _cli_error(capsys, ["train", "--resume", str(run)])
    assert "refused to load" in line and "Unsupported global: GLOBAL io.open" in line
    assert not marker.exists()
    assert not (run / "model.safetensors").exists()
    _assert_really_malicious(last, marker)


def test_resume_from_a_corrupt_checkpoint_is_one_line_naming_it(tmp_path: Path, capsys):
    run = _run_folder(tmp_path)
    last = run / "checkpoints" / "last.ckpt"
    last.parent.mkdir()
    last.write_bytes(b"PK\x03\x04" + bytes(300))  # copied halfway, or a damaged disk
    line = _cli_error(capsys, ["train", "--resume", str(run)])
    assert str(last) in line


EVIL_YAML = "data: !!python/object/apply:os.system ['touch {marker}']\nepochs: 1\n"


@pytest.mark.parametrize("how", ["config", "resume"])
def test_config_with_python_tags_is_refused_unexecuted(how: str, tmp_path: Path, capsys):
    marker = tmp_path / "pwned"
    run = tmp_path / "run"
    run.mkdir()
    evil = run / "config.yaml"
    evil.write_text(EVIL_YAML.format(marker=marker))
    argv = ["train", "--config", str(evil)] if how == "config" else ["train", "--resume", str(run)]
    line = _cli_error(capsys, argv)
    assert str(evil) in line and "refused" in line and "python/object/apply:os.system" in line
    assert not marker.exists()
    yaml.load(evil.read_text(), Loader=yaml.UnsafeLoader)  # the payload is real
    assert marker.exists()


@pytest.fixture(scope="module")
def probe_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("predict")
    data = write_graded_images(root / "data", n_per_class=4, size=32)
    run = root / "run"
    assert (
        main(
            [
                "train",
                "--data",
                str(data),
                "--out",
                str(run),
                "--strategy",
                "linear-probe",
                "--cache-dir",
                str(root / "cache"),
                *TINY,
            ]
        )
        == 0
    )
    return run


def _files(root: Path, skip: Path) -> dict[str, bytes]:
    return {
        str(p): p.read_bytes()
        for p in root.rglob("*")
        if p.is_file() and not p.is_symlink() and skip not in p.parents
    }


def test_predict_writes_only_inside_its_output_folder(probe_run: Path, tmp_path: Path, capsys):
    """Hostile image names and a symlink planted in --explain DIR never lead outside it."""
    images = tmp_path / "in"
    for name in ("..png", "a;b c.png", "ünï $(x).png", "trap.png"):
        _save(images / name, _noise(len(name), 32), format="PNG")
    explain = tmp_path / "explain"
    explain.mkdir()
    victim = tmp_path / "victim.png"
    victim.write_bytes(b"precious")
    (explain / "trap_gradcam.png").symlink_to(victim)
    before = _files(tmp_path, explain)
    out = tmp_path / "pred.csv"
    code = main(
        [
            "predict",
            str(images),
            "--run",
            str(probe_run),
            "--out",
            str(out),
            "--explain",
            str(explain),
        ]
    )
    err = capsys.readouterr().err
    if code == 2:  # refusing is fine, as long as it says so in one line
        assert "refusing to write outside" in _one_error_line(code, err)
    else:
        assert code == 0, err
        assert len(list(explain.glob("*.png"))) == 4
    after = _files(tmp_path, explain)
    assert victim.read_bytes() == b"precious"
    changed = {p for p in after if before.get(p) != after[p]}
    # the outputs beside --out: the CSV, its sidecar, and the journal a refused run leaves for
    # --resume (issue 23.7)
    beside = {str(out.with_suffix(s)) for s in (".csv", ".meta.json", ".journal.jsonl")}
    assert changed <= beside, changed
    assert all(
        p.resolve().parent == explain.resolve() for p in explain.iterdir() if not p.is_symlink()
    )


def test_predict_explain_keeps_one_overlay_per_image(probe_run: Path, tmp_path: Path):
    images = tmp_path / "in"
    for i, name in enumerate(("a/x.png", "b/x.png", "x.jpg")):
        _save(images / name, _noise(i, 32))
    explain = tmp_path / "explain"
    assert (
        main(
            [
                "predict",
                str(images),
                "--run",
                str(probe_run),
                "--out",
                str(tmp_path / "pred.csv"),
                "--explain",
                str(explain),
            ]
        )
        == 0
    )
    assert len(list(explain.glob("*.png"))) == 3


# --------------------------------------------------------------------------- environment


def test_offline_default_weights_cli_tells_how_to_pass_weights(tmp_path, monkeypatch, capsys):
    """No network at all (DNS and connect fail): one line pointing at --weights PATH."""

    def no_network(*_args: object, **_kwargs: object):
        raise OSError(errno.ENETUNREACH, "Network is unreachable")

    def no_dns(*_args: object, **_kwargs: object):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))  # nothing cached there
    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    monkeypatch.setattr(socket.socket, "connect", no_network)
    data = _class_folders(tmp_path / "data")
    argv = [
        "train",
        "--data",
        str(data),
        "--out",
        str(tmp_path / "run"),
        *TINY,
        "--backbone",
        "googlenet",
    ]
    argv[argv.index("--weights") + 1] = "default"
    line = _cli_error(capsys, argv)
    assert "offline?" in line and "--weights PATH" in line and "googlenet" in line
    assert not (tmp_path / "run" / "splits.csv").exists()


def _old_file(folder: Path) -> Path:
    target = folder / "metrics.json"
    mio.write_json(target, {"old": True})
    return target


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


def test_disk_full_at_fsync_keeps_the_old_file(tmp_path: Path, monkeypatch):
    target = _old_file(tmp_path)

    def full(_fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(MedtuneError) as err:
        mio.write_json(target, {"new": True})
    message = str(err.value)
    assert message.startswith(f"{target}: No space left on device") and "\n" not in message
    assert "MiB free" in message and "rerun" in message
    monkeypatch.undo()
    assert json.loads(target.read_text()) == {"old": True}
    assert _leftovers(tmp_path) == []


def test_disk_full_mid_write_keeps_the_old_file(tmp_path: Path):
    target = _old_file(tmp_path)
    with pytest.raises(MedtuneError, match="No space left"), mio.atomic_path(target) as tmp:
        tmp.write_bytes(b'{"half": ')
        raise OSError(errno.ENOSPC, "No space left on device")  # what write() raises
    assert json.loads(target.read_text()) == {"old": True}
    assert _leftovers(tmp_path) == []


def test_writer_failure_on_a_nearly_full_disk_is_reported_as_such(tmp_path, monkeypatch):
    """torch.save reports a full disk as RuntimeError("... file write failed"), not OSError."""
    target = _old_file(tmp_path)

    def fail() -> None:
        with mio.atomic_path(target) as tmp:
            tmp.write_bytes(b"PK\x03\x04")
            raise RuntimeError("[enforce fail at inline_container.cc:672] . file write failed")

    with pytest.raises(RuntimeError, match="file write failed"):  # plenty of space: not masked
        fail()
    monkeypatch.setattr(mio, "_free_bytes", lambda _folder: 12_288)
    with pytest.raises(MedtuneError, match="disk nearly full .0.0 MiB free; RuntimeError"):
        fail()
    assert json.loads(target.read_text()) == {"old": True}
    assert _leftovers(tmp_path) == []


def test_unrelated_errors_inside_a_write_are_not_masked(tmp_path: Path):
    other = tmp_path / "input.csv"
    with pytest.raises(PermissionError) as err, mio.atomic_path(tmp_path / "out.json"):
        raise PermissionError(errno.EACCES, "Permission denied", str(other))
    assert err.value.filename == str(other)  # an input's error stays the input's
    assert _leftovers(tmp_path) == []


def test_outputs_get_normal_permissions_even_from_replacing_writers(tmp_path: Path):
    """safetensors replaces the file it writes with a 0600 one; outputs must stay readable."""
    from safetensors.torch import save_file

    with mio.atomic_path(tmp_path / "model.safetensors") as tmp:
        save_file({"w": torch.zeros(2)}, str(tmp))
    mode = (tmp_path / "model.safetensors").stat().st_mode & 0o777
    umask = os.umask(0)
    os.umask(umask)
    assert mode == 0o666 & ~umask


def test_temp_files_of_killed_writers_are_removed(tmp_path: Path):
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    pid = int(dead.stdout)
    host = mio.host_name()
    stale = tmp_path / f".last.ckpt.abc123de.{pid}@{host}.tmp"
    live = tmp_path / f".best.ckpt.abc123de.{os.getppid()}@{host}.tmp"
    foreign = tmp_path / f".last.ckpt.abc123de.{pid}@another-node.tmp"
    user = tmp_path / ".notes.tmp"
    for path in (stale, live, foreign, user):
        path.write_bytes(b"x")
    mio.write_text(tmp_path / "last.ckpt", "new")
    assert not stale.exists()
    assert live.exists() and foreign.exists() and user.exists()


# A real read-only file system: a read-only bind mount in a private mount namespace when root
# (root ignores permission bits), or a 0555 folder otherwise.
_RO_MOUNT = 'mount --bind "$0" "$0" && mount -o remount,bind,ro "$0" && exec "$@"'


def _readonly_prefix(folder: Path) -> list[str]:
    if os.geteuid() != 0:
        folder.chmod(0o555)
        return []
    if shutil.which("unshare") is None:
        pytest.skip("root without unshare: cannot make a read-only folder")
    probe = subprocess.run(
        [
            "unshare",
            "-m",
            "sh",
            "-c",
            _RO_MOUNT,
            str(folder),
            "sh",
            "-c",
            f"! touch {folder}/probe 2>/dev/null",
        ],
        capture_output=True,
    )
    if probe.returncode != 0:
        pytest.skip(f"cannot mount read-only here: {probe.stderr.decode().strip()}")
    return ["unshare", "-m", "sh", "-c", _RO_MOUNT, str(folder)]


def _run_readonly(folder: Path, argv: list[str]) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(
            [*_readonly_prefix(folder), *CLI, *argv], capture_output=True, text=True, timeout=300
        )
    finally:
        folder.chmod(0o755)


def test_prepare_into_a_read_only_folder(tmp_path: Path):
    data = _class_folders(tmp_path / "data")
    ro = tmp_path / "ro"
    ro.mkdir()
    proc = _run_readonly(
        ro, ["prepare", "--data", str(data), "--out", str(ro / "cache"), "--image-size", "16"]
    )
    line = _one_error_line(proc.returncode, proc.stderr)
    assert f"{ro / 'cache'}: " in line
    assert "Read-only file system" in line or "Permission denied" in line
    assert not (ro / "cache").exists()


def _simulate_read_only(monkeypatch: pytest.MonkeyPatch, folder: Path) -> None:
    """Make every creation under ``folder`` fail with EROFS, as a read-only mount does."""
    import builtins

    inside = str(folder) + os.sep
    real_mkdir, real_os_open, real_open = os.mkdir, os.open, builtins.open

    def erofs(path: object) -> OSError:
        return OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))

    def mkdir(path, *args, **kwargs):
        if str(path).startswith(inside) and not os.path.exists(path):
            raise erofs(path)
        return real_mkdir(path, *args, **kwargs)

    def os_open(path, flags, *args, **kwargs):
        if str(path).startswith(inside) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            raise erofs(path)
        return real_os_open(path, flags, *args, **kwargs)

    def open_(file, mode="r", *args, **kwargs):
        if (
            isinstance(file, (str, os.PathLike))
            and str(file).startswith(inside)
            and (set(mode) & set("wax+"))
        ):
            raise erofs(file)
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(os, "mkdir", mkdir)
    monkeypatch.setattr(os, "open", os_open)
    monkeypatch.setattr(builtins, "open", open_)


def test_train_into_a_read_only_run_folder(tmp_path: Path, monkeypatch, capsys):
    """The run folder exists but cannot be written (simulated EROFS): one line naming a file."""
    data = _class_folders(tmp_path / "data", n=6)
    run = tmp_path / "ro" / "run"
    run.mkdir(parents=True)
    _simulate_read_only(monkeypatch, tmp_path / "ro")
    line = _cli_error(capsys, ["train", "--data", str(data), "--out", str(run), *TINY])
    monkeypatch.undo()
    assert f"{run}{os.sep}" in line and "Read-only file system" in line and "--out" in line
    assert list(run.iterdir()) == []


def test_atomic_write_into_a_read_only_folder_is_one_line(tmp_path: Path, monkeypatch):
    target = _old_file(tmp_path / "ro")
    _simulate_read_only(monkeypatch, tmp_path / "ro")
    with pytest.raises(MedtuneError) as err:
        mio.write_json(target, {"new": True})
    monkeypatch.undo()
    assert str(err.value).startswith(f"{target}: Read-only file system; choose a writable --out")
    assert json.loads(target.read_text()) == {"old": True}
    assert _leftovers(tmp_path / "ro") == []


_FULL_DISK = 'mount -t tmpfs -o size=1m tmpfs "$0" && exec "$@"'

_WRITE_WHEN_FULL = """
import json, sys, torch
from pathlib import Path
from medtune import io as mio
from medtune.errors import MedtuneError

folder = Path(sys.argv[1])
mio.write_text(folder / "last.ckpt", "old")
result = {}
for name, write in {
    "torch.save": lambda tmp: torch.save({"w": torch.zeros(400_000)}, tmp),
    "write_bytes": lambda tmp: tmp.write_bytes(bytes(2_000_000)),
}.items():
    try:
        with mio.atomic_path(folder / "last.ckpt") as tmp:
            write(tmp)
        result[name] = "written"
    except MedtuneError as err:
        result[name] = str(err)
result["old"] = (folder / "last.ckpt").read_text()
result["files"] = sorted(p.name for p in folder.iterdir())
print(json.dumps(result))
"""


def _full_disk_prefix(folder: Path) -> list[str]:
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("a small tmpfs needs root and unshare")
    probe = subprocess.run(
        ["unshare", "-m", "sh", "-c", _FULL_DISK, str(folder), "true"], capture_output=True
    )
    if probe.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {probe.stderr.decode().strip()}")
    return ["unshare", "-m", "sh", "-c", _FULL_DISK, str(folder)]


def test_real_full_disk_keeps_the_old_checkpoint(tmp_path: Path):
    """A 1 MiB tmpfs: torch.save and plain writes fail with one line; the old file survives."""
    folder = tmp_path / "small"
    folder.mkdir()
    script = tmp_path / "write.py"
    script.write_text(textwrap.dedent(_WRITE_WHEN_FULL))
    proc = subprocess.run(
        [*_full_disk_prefix(folder), sys.executable, str(script), str(folder)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    for name in ("torch.save", "write_bytes"):
        assert result[name].startswith(f"{folder / 'last.ckpt'}: "), result
        assert "free some space" in result[name] and "\n" not in result[name]
    assert result["old"] == "old" and result["files"] == ["last.ckpt"]


def test_prepare_on_a_full_disk_is_one_line(tmp_path: Path):
    folder = tmp_path / "small"
    folder.mkdir()
    data = write_graded_images(tmp_path / "data", n_per_class=8, size=64)
    proc = subprocess.run(
        [
            *_full_disk_prefix(folder),
            *CLI,
            "prepare",
            "--data",
            str(data),
            "--out",
            str(folder / "cache"),
            "--image-size",
            "128",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    line = _one_error_line(proc.returncode, proc.stderr)
    assert str(folder / "cache") in line


def test_predict_over_several_batches_keeps_order_and_names_a_bad_file(probe_run: Path, tmp_path):
    """Decoding runs a batch ahead of the model: rows stay in input order, a corrupt image in a
    later batch is skipped with --skip-bad and otherwise stops the run with its name."""
    from medtune.workflows.predict import BATCH, predict

    images = tmp_path / "in"
    paths = [_save(images / f"{i:03d}.png", _noise(i, 32)) for i in range(BATCH + 5)]
    bad = images / f"{BATCH + 2:03d}.png"
    bad.write_text("not an image")
    rows = predict(
        [str(images)], run=probe_run, out=tmp_path / "p.csv", skip_bad=True, progress=False
    )
    assert [r["image"] for r in rows] == [str(p) for p in paths if p != bad]
    assert str(bad) in (tmp_path / "p.skipped.csv").read_text()
    one = predict([str(paths[BATCH + 4])], run=probe_run, progress=False)[0]
    last = rows[-1]  # the same image gives the same prediction alone or in a batch
    assert last["image"] == one["image"] and last["grade"] == one["grade"]
    assert all(last[k] == pytest.approx(v, abs=1e-3) for k, v in one.items() if k[:2] == "p_")
    with pytest.raises(MedtuneError, match=re.escape(str(bad))):
        predict([str(images)], run=probe_run, progress=False)
