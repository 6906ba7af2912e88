"""Atomic writes: a temp file in the same folder, flushed and fsynced, then ``os.replace``.

A killed run therefore leaves either the old file or the new one, never a torn one. Used for every
output medtune writes (caches, features, checkpoints, reports, CSV/JSON/YAML).

Temp files are named ``.<name>.<random>.<pid>@<host>.tmp``; those of dead processes of this host
(a run killed mid-write) are removed by the next write into the same folder. A full disk or a
read-only / unwritable folder raises a one-line :class:`~medtune.errors.MedtuneError` naming the
file, and the previous file (if any) is left untouched.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from medtune.errors import MedtuneError, offer

NO_SPACE = frozenset({errno.ENOSPC, errno.EDQUOT})
NOT_WRITABLE = frozenset({errno.EROFS, errno.EACCES, errno.EPERM})
LOW_SPACE_BYTES = 64 << 20  # a failed write with less free space than this is reported as disk full
_TEMP = re.compile(r"^\..+\.(\d+)@([A-Za-z0-9._-]+)\.tmp$")
# Advice for a full or unwritable disk; every command shows only the options it has
# (:func:`medtune.errors.offer`): predict has --out and --resume, evaluate neither.
_WHERE = offer("{}", "--out", "--cache-dir", otherwise="output folder") + offer(
    " (or MEDTUNE_CACHE)", "--cache-dir"
)
_RERUN_ADVICE = (
    "free some space"
    + offer(" or choose another {}", "--out", "--cache-dir")
    + ", then rerun the same command"
    + offer(" (with {})", "--resume")
    + " to continue"
)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temp path next to ``path``; on success it is fsynced and renamed onto ``path``."""
    target = Path(path)
    with _storage_errors(target):
        target.parent.mkdir(parents=True, exist_ok=True)
        remove_dead_temps(target.parent)
        fd, tmp_name = tempfile.mkstemp(
            prefix=f".{target.name}.", suffix=f".{os.getpid()}@{host_name()}.tmp", dir=target.parent
        )
        os.close(fd)
    tmp = Path(tmp_name)
    try:
        try:
            yield tmp
        except Exception as err:
            translated = _write_error(target, tmp, err)
            if translated is None:
                raise
            raise translated from err
        with _storage_errors(target):
            # after the write: some writers (safetensors) replace the file with a 0600 one
            os.chmod(tmp, 0o666 & ~_umask())
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
            os.replace(tmp, target)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


@contextlib.contextmanager
def _storage_errors(target: Path) -> Iterator[None]:
    """Turn a full disk / read-only folder error while creating or publishing ``target``."""
    try:
        yield
    except OSError as err:
        translated = storage_error(target, err)
        if translated is None:
            raise
        raise translated from err


def storage_error(path: str | os.PathLike[str], err: OSError) -> MedtuneError | None:
    """A one-line error for a full disk or an unwritable location, or ``None`` for other errors."""
    reason = err.strerror or errno.errorcode.get(err.errno or 0, type(err).__name__)
    if err.errno in NO_SPACE:
        return MedtuneError(f"{path}: {reason} ({_free_text(path)}); {_RERUN_ADVICE}")
    if err.errno == errno.EROFS:
        return MedtuneError(f"{path}: {reason}; choose a writable {_WHERE}")
    if err.errno in NOT_WRITABLE:  # EACCES/EPERM: reading an input can fail like this too
        return MedtuneError(
            f"{path}: {reason}; give this user access to it, or write the outputs elsewhere"
            + offer(" with {}", "--out", "--cache-dir")
            + offer(" (or MEDTUNE_CACHE)", "--cache-dir")
        )
    return None


def _write_error(target: Path, tmp: Path, err: Exception) -> MedtuneError | None:
    """The error to raise when writing ``tmp`` failed, or ``None`` to re-raise ``err`` as is."""
    if isinstance(err, MedtuneError):
        return None
    if isinstance(err, OSError):
        mine = err.filename is None or str(err.filename) in (str(tmp), str(target))
        return storage_error(target, err) if mine else None
    free = _free_bytes(tmp.parent)
    if free is not None and free < LOW_SPACE_BYTES:  # e.g. torch.save's "file write failed"
        detail = " ".join(str(err).split())[:160] or type(err).__name__
        return MedtuneError(
            f"{target}: writing failed with the disk nearly full ({_free_text(target)}; "
            f"{type(err).__name__}: {detail}); {_RERUN_ADVICE}"
        )
    return None


def _free_bytes(folder: str | os.PathLike[str]) -> int | None:
    try:
        st = os.statvfs(folder)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


def _free_text(path: str | os.PathLike[str]) -> str:
    free = _free_bytes(Path(path).parent)
    return "free space unknown" if free is None else f"{free / 2**20:.1f} MiB free"


def host_name() -> str:
    """This machine's name, safe in a file name (temp files record their writer)."""
    return re.sub(r"[^A-Za-z0-9.-]", "_", socket.gethostname()) or "host"


def pid_alive(pid: int) -> bool:
    """Whether a process of this host with this id still runs."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_dead_temps(folder: str | os.PathLike[str]) -> list[Path]:
    """Delete the temp files that killed writers of this host left in ``folder``; return them."""
    removed: list[Path] = []
    with contextlib.suppress(OSError):
        for entry in os.scandir(folder):
            match = _TEMP.match(entry.name)
            if match is None or match.group(2) != host_name() or not entry.is_file():
                continue
            pid = int(match.group(1))
            if pid != os.getpid() and not pid_alive(pid):
                with contextlib.suppress(OSError):
                    os.unlink(entry.path)
                    removed.append(Path(entry.path))
    return removed


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text(path: str | os.PathLike[str], text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike[str], obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def write_yaml(path: str | os.PathLike[str], obj: Any) -> None:
    write_text(path, yaml.safe_dump(obj, sort_keys=False))


def read_yaml(path: str | os.PathLike[str]) -> Any:
    """Parse YAML with the safe loader: Python object tags are refused, never executed."""
    try:
        with open(path, encoding="utf-8") as fh:
            return yaml.safe_load(fh)
    except yaml.constructor.ConstructorError as err:
        problem = " ".join(str(err.problem or err).split())
        raise MedtuneError(
            f"{path}: refused: {problem} {_yaml_where(err)}; a medtune config holds plain "
            "values only (no !!python tags); fix the file or regenerate it with medtune train"
        ) from None
    except yaml.YAMLError as err:
        problem = " ".join(str(getattr(err, "problem", None) or err).split())
        raise MedtuneError(
            f"{path}: not valid YAML ({problem} {_yaml_where(err)}); fix or regenerate it"
        ) from None
    except UnicodeDecodeError as err:
        raise MedtuneError(f"{path}: not UTF-8 text (byte {err.start}); save it as UTF-8") from None


def _yaml_where(err: yaml.YAMLError) -> str:
    mark = getattr(err, "problem_mark", None)
    return f"at line {mark.line + 1}" if mark is not None else ""


def _json_default(obj: Any) -> Any:
    """Serialise numpy scalars/arrays and paths that end up in metrics dictionaries."""
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")
