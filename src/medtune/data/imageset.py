"""The labelled image set every reader returns (:class:`ImageSet`) and its MedMNIST array store.

Standard library, numpy and PIL only; the readers that build an :class:`ImageSet` are in
:mod:`medtune.data.readers`, the entry points in :mod:`medtune.data.sources`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from medtune.data.preprocess import decode_source

__all__ = ["ImageSet", "NpzStore", "SPLIT_NAMES", "file_sha256"]

#: The split names of ``ImageSet.predefined_split`` (and of a run's splits).
SPLIT_NAMES = ("train", "val", "test")


@dataclass
class ImageSet:
    """A labelled image set; see ``docs/architecture.md`` (data contract)."""

    keys: list[str]
    labels: np.ndarray
    class_names: list[str]
    groups: list[str] | None
    predefined_split: list[str] | None
    root: Path
    source: str
    paths: list[Path] | None = field(default=None, repr=False)
    skipped: list[tuple[str, str]] = field(default_factory=list, repr=False)
    npz: NpzStore | None = field(default=None, repr=False)
    sites: list[str] | None = None

    def __post_init__(self) -> None:
        self.labels = np.asarray(self.labels, dtype=np.int64)
        n = len(self.keys)
        for name in ("labels", "groups", "predefined_split", "paths", "sites"):
            value = getattr(self, name)
            if value is not None and len(value) != n:
                raise ValueError(f"ImageSet.{name} has {len(value)} entries for {n} keys")
        if self.paths is None and self.npz is None:
            raise ValueError("ImageSet needs file paths or an npz store")

    def __len__(self) -> int:
        return len(self.keys)

    def load(self, i: int, max_side: int | None = None) -> Image.Image:
        """Decode image ``i`` as 8-bit RGB (JPEG draft mode when ``max_side`` is given)."""
        return decode_source(self.source_of(i), max_side)

    def source_of(self, i: int) -> str | np.ndarray:
        """What to decode for image ``i``: a file path, or the array itself for npz sets."""
        if self.paths is not None:
            return str(self.paths[i])
        assert self.npz is not None
        return self.npz.image(self.keys[i])

    def display_path(self, i: int) -> str:
        """A human-readable location of image ``i`` for error messages and logs."""
        if self.paths is not None:
            return str(self.paths[i])
        return f"{self.source}[{self.keys[i]}]"

    def identity(self, i: int) -> str:
        """Changes when image ``i`` changes: ``size:mtime_ns`` of the file, or npz hash + key."""
        if self.paths is not None:
            try:
                st = os.stat(self.paths[i])
            except OSError:
                return "missing"
            return f"{st.st_size}:{st.st_mtime_ns}"
        assert self.npz is not None
        return f"{self.npz.digest()}:{self.keys[i]}"

    def subset(self, indices: Sequence[int] | np.ndarray) -> ImageSet:
        """A new ImageSet with the given items (class names unchanged)."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)

        def pick(values: list[Any] | None) -> list[Any] | None:
            return None if values is None else [values[int(i)] for i in idx]

        return dataclasses.replace(
            self,
            keys=pick(self.keys),
            labels=self.labels[idx],
            groups=pick(self.groups),
            predefined_split=pick(self.predefined_split),
            paths=pick(self.paths),
            sites=pick(self.sites),
        )


class NpzStore:
    """Lazily loaded arrays of a MedMNIST-style ``.npz`` (pickles as just its path)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._arrays: dict[str, np.ndarray] = {}
        self._digest: str | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path, "_arrays": {}, "_digest": self._digest}

    def image(self, key: str) -> np.ndarray:
        split, _, index = key.rpartition("/")
        name = f"{split}_images" if split else "images"
        if name not in self._arrays:
            with np.load(self.path, allow_pickle=False) as z:
                self._arrays[name] = z[name]
        return self._arrays[name][int(index)]

    def digest(self) -> str:
        """sha256 of the file contents (computed once)."""
        if self._digest is None:
            self._digest = file_sha256(self.path)[:16]
        return self._digest


# --------------------------------------------------------------------------- entry point


def file_sha256(path: str | os.PathLike[str]) -> str:
    """The sha256 of a file's bytes, read in 1 MiB chunks.

    ``hashlib.file_digest`` does this from Python 3.11; medtune still supports 3.10.

    Parameters
    ----------
    path : str or path-like
        The file.

    Returns
    -------
    str
        64 hexadecimal digits.

    Raises
    ------
    OSError
        When the file cannot be read.
    """
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
