"""The prepared image cache: every image decoded, fundus-preprocessed and resized exactly once.

``prepare`` writes ``out_dir/<key>/images.npy`` (uint8 ``N x S x S x 3``, read later as a
read-only memmap), ``fov.npy`` (each image's field-of-view mask,
:func:`medtune.data.fundus.field_of_view_mask`, bit-packed along rows: uint8
``N x S x ceil(S / 8)``; site augmentation reads it instead of detecting the FOV every epoch),
``index.json`` (keys, labels, classes, groups, split, parameters, source
identities, skipped images) and, when images were skipped, ``skipped.csv``. ``<key>`` hashes the
source identities (file size + mtime, or npz content hash), labels, the size, the fundus options
and :data:`FORMAT_VERSION`; any change gives a new key and a rebuild.

Crash and concurrency safety: a build happens in ``out_dir/.tmp-<key>-<host>-<pid>`` with
``index.json`` written last, then the folder is renamed to ``out_dir/<key>`` in one step. A killed
build leaves only a ``.tmp-*`` folder (removed by the next ``prepare`` once its process is dead);
when two processes build the same key the first rename wins and the other discards its copy. A
renamed cache is never modified, so any number of readers may use it at once (others add feature
caches inside it).
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
import contextlib
import datetime as _dt
import errno
import hashlib
import json
import logging
import multiprocessing
import os
import re
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from medtune import io as mio
from medtune.data.imageset import ImageSet
from medtune.data.preprocess import prepare_image
from medtune.errors import BadImageError, MedtuneError, offer

if TYPE_CHECKING:
    from medtune.data.fundus import FundusOptions

__all__ = [
    "FORMAT_VERSION",
    "Part",
    "PreparedCache",
    "cache_key",
    "open_cache",
    "pack_mask",
    "prepare",
    "unpack_mask",
]

log = logging.getLogger(__name__)

FORMAT_VERSION = 2  # 2: fov.npy; JPEGs decoded only as large as the image size needs
_FOREIGN_TMP_AGE_S = 24 * 3600  # other hosts' temp folders are removed only when this old
_REASON = re.compile(r"cannot read image \((.*)\); replace or delete")


# --------------------------------------------------------------------------- PreparedCache


@dataclass
class PreparedCache:
    """A built cache folder; ``images`` is opened lazily as a read-only memmap."""

    dir: Path
    key: str
    image_size: int
    keys: list[str]
    labels: np.ndarray
    class_names: list[str]
    groups: list[str] | None
    predefined_split: list[str] | None
    skipped: list[dict[str, str]] = field(default_factory=list)
    source_indices: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    params: dict[str, Any] = field(default_factory=dict)
    sites: list[str] | None = None
    _images: np.ndarray | None = field(default=None, repr=False, compare=False)
    _fov: np.ndarray | None = field(default=None, repr=False, compare=False)

    @property
    def images(self) -> np.ndarray:
        """``N x S x S x 3`` uint8, memory-mapped read-only (opened on first use per process)."""
        if self._images is None:
            self._images = np.load(self.dir / "images.npy", mmap_mode="r")
        return self._images

    @property
    def fov(self) -> np.ndarray:
        """``N x S x ceil(S / 8)`` uint8: each image's FOV mask, bit-packed along rows (memmap).

        Unpack one with :meth:`fov_mask`.
        """
        if self._fov is None:
            self._fov = np.load(self.dir / "fov.npy", mmap_mode="r")
        return self._fov

    def fov_mask(self, row: int) -> np.ndarray:
        """The field-of-view mask of image ``row`` (bool ``S x S``), as computed once by
        :func:`prepare` with :func:`medtune.data.fundus.field_of_view_mask`."""
        return unpack_mask(self.fov[row], self.image_size)

    def __len__(self) -> int:
        return len(self.keys)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_images"] = None  # each process (e.g. DataLoader worker) maps the file itself
        state["_fov"] = None
        return state


def pack_mask(mask: np.ndarray) -> np.ndarray:
    """A bool ``S x S`` mask as uint8 ``S x ceil(S / 8)`` (``numpy.packbits`` along rows)."""
    return np.packbits(mask, axis=-1)


def unpack_mask(packed: np.ndarray, image_size: int) -> np.ndarray:
    """Inverse of :func:`pack_mask`: bool ``S x S``."""
    return np.unpackbits(np.asarray(packed), axis=-1, count=image_size).astype(bool)


def open_cache(path: str | os.PathLike[str]) -> PreparedCache:
    """Open a complete cache folder (``out_dir/<key>``) written by :func:`prepare`."""
    path = Path(path)
    index_path = path / "index.json"
    if not index_path.is_file():
        raise MedtuneError(
            f"{path}: not a complete medtune cache (no index.json); delete the folder and run "
            "prepare again"
        )
    meta = json.loads(index_path.read_text(encoding="utf-8"))
    if meta.get("format") != FORMAT_VERSION:
        raise MedtuneError(
            f"{path}: cache format {meta.get('format')} is not {FORMAT_VERSION} (another medtune "
            "version); delete the folder and run prepare again"
        )
    cache = PreparedCache(
        dir=path,
        key=meta["key"],
        image_size=int(meta["size"]),
        keys=list(meta["keys"]),
        labels=np.asarray(meta["labels"], dtype=np.int64),
        class_names=list(meta["class_names"]),
        groups=meta["groups"],
        predefined_split=meta["predefined_split"],
        skipped=list(meta["skipped"]),
        source_indices=np.asarray(meta["source_indices"], dtype=np.int64),
        params=dict(meta["params"]),
        sites=meta.get("sites"),
    )
    n, image_size = len(cache.keys), cache.image_size
    _check_array(path, "images.npy", lambda: cache.images.shape, (n, image_size, image_size, 3))
    _check_array(path, "fov.npy", lambda: cache.fov.shape, (n, image_size, (image_size + 7) // 8))
    return cache


def _check_array(path: Path, name: str, shape_of: Any, expected: tuple[int, ...]) -> None:
    """A one-line error naming the cache folder when one of its arrays is unreadable or wrong."""
    try:
        shape = shape_of()
    except (OSError, ValueError) as err:
        raise MedtuneError(f"{path}: cannot open {name} ({err}); delete the folder") from None
    if shape != expected:
        raise MedtuneError(
            f"{path}: {name} has shape {shape}, index.json says {expected}; delete the folder"
        )


# --------------------------------------------------------------------------- prepare


def prepare(
    imageset: ImageSet,
    image_size: int,
    fundus_opts: FundusOptions | dict[str, Any] | None = None,
    out_dir: str | os.PathLike[str] = "cache",
    *,
    skip_bad: bool = False,
    num_workers: int = 0,
    progress: bool = True,
) -> PreparedCache:
    """Decode + preprocess + resize every image once into ``out_dir/<key>``; reuse when current.

    ``fundus_opts``: :class:`~medtune.data.fundus.FundusOptions` or its dict (``None``: defaults).
    ``skip_bad``: drop undecodable images (listed in ``skipped.csv`` and ``cache.skipped``)
    instead of raising :class:`BadImageError`. ``num_workers > 0``: decode in that many ``spawn``
    processes (a script calling this needs the usual ``if __name__ == "__main__":`` guard);
    ``0``: in threads of this process, one per core (at most 4).
    """
    from medtune.data import fundus

    if int(image_size) < 1:
        raise MedtuneError(f"image size must be a positive number of pixels, got {image_size}")
    image_size = int(image_size)
    if fundus_opts is None or isinstance(fundus_opts, dict):
        opts = fundus.FundusOptions.from_dict(fundus_opts)
    else:
        opts = fundus_opts
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    params = _params(image_size, opts, fundus)
    identities = [imageset.identity(i) for i in range(len(imageset))]
    key = cache_key(imageset, identities, params)
    final = out / key
    _cleanup_tmp(out)
    if not (final / "index.json").is_file():
        _discard_incomplete(final)
        _build(imageset, final, key, params, identities, skip_bad, num_workers, progress)
    else:
        log.info("reusing prepared cache %s", final)
    cache = open_cache(final)
    if cache.skipped and not skip_bad:
        first = cache.skipped[0]
        raise BadImageError(first["path"], first["reason"])
    return cache


def _params(image_size: int, opts: Any, fundus: Any) -> dict[str, Any]:
    return {
        "format": FORMAT_VERSION,
        "size": image_size,
        "fundus": opts.to_dict(),
        "fundus_version": getattr(fundus, "VERSION", None),
        "decode": "min_side",  # decoded only as large as ``image_size`` needs (prepare_image)
    }


def cache_key(imageset: ImageSet, identities: Sequence[str], params: dict[str, Any]) -> str:
    """Short sha256 of the keys + identities (in order), labels, classes, groups and params."""
    payload = {
        "params": params,
        "items": [[k, ident] for k, ident in zip(imageset.keys, identities, strict=True)],
        "labels": imageset.labels.tolist(),
        "class_names": imageset.class_names,
        "groups": imageset.groups,
        "predefined_split": imageset.predefined_split,
    }
    if imageset.sites is not None:  # added only when set: existing caches keep their keys
        payload["sites"] = imageset.sites
    blob = json.dumps(payload, sort_keys=True, ensure_ascii=False).encode("utf-8")
    return hashlib.sha256(blob).hexdigest()[:16]


# --------------------------------------------------------------------------- temp folders


def _tmp_name(key: str) -> str:
    return f".tmp-{key}-{mio.host_name()}-{os.getpid()}"


def _cleanup_tmp(out: Path) -> None:
    """Remove ``.tmp-*`` folders of dead processes (other hosts': only when a day old)."""
    host = mio.host_name()
    for entry in out.iterdir():
        match = re.fullmatch(r"\.tmp-[0-9a-f]+-(.+)-(\d+)", entry.name)
        if match is None or not entry.is_dir():
            continue
        owner, pid = match.group(1), int(match.group(2))
        dead = False
        if owner == host:
            dead = pid != os.getpid() and not mio.pid_alive(pid)
        else:
            with contextlib.suppress(OSError):
                dead = time.time() - entry.stat().st_mtime > _FOREIGN_TMP_AGE_S
        if dead:
            log.info("removing leftover temp folder %s", entry)
            shutil.rmtree(entry, ignore_errors=True)


def _discard_incomplete(final: Path) -> None:
    """A ``<key>`` folder without index.json was not made by prepare's rename: move it away."""
    if not final.exists():
        return
    trash = final.parent / _tmp_name(final.name + "0")
    with contextlib.suppress(OSError):
        os.rename(final, trash)
        shutil.rmtree(trash, ignore_errors=True)


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --------------------------------------------------------------------------- building


def _build(
    imageset: ImageSet,
    final: Path,
    key: str,
    params: dict[str, Any],
    identities: list[str],
    skip_bad: bool,
    num_workers: int,
    progress: bool,
) -> None:
    tmp = final.parent / _tmp_name(key)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        start = time.perf_counter()
        npy = tmp / "images.npy"
        size = params["size"]
        mm = np.lib.format.open_memmap(
            npy, mode="w+", dtype=np.uint8, shape=(len(imageset), size, size, 3)
        )
        fov = np.lib.format.open_memmap(
            tmp / "fov.npy", mode="w+", dtype=np.uint8, shape=(len(imageset), size, (size + 7) // 8)
        )
        del mm, fov
        _reserve_space(npy)
        failures = _fill(imageset, npy, params, skip_bad, num_workers, progress, key)
        good = [i for i in range(len(imageset)) if i not in failures]
        if not good:
            raise MedtuneError(
                f"{imageset.source}: none of the {len(imageset)} images could be decoded "
                f"(first: {imageset.display_path(min(failures))}: {failures[min(failures)]}); "
                "check the data folder"
            )
        if failures:
            _compact(npy, good)
            _compact(tmp / "fov.npy", good)
        _fsync_path(npy)
        _fsync_path(tmp / "fov.npy")
        skipped = [
            {"key": imageset.keys[i], "path": imageset.display_path(i), "reason": failures[i]}
            for i in sorted(failures)
        ]
        if skipped:
            with mio.atomic_path(tmp / "skipped.csv") as f:
                pd.DataFrame(skipped, columns=["key", "path", "reason"]).to_csv(f, index=False)
        mio.write_json(tmp / "index.json", _index(imageset, key, params, identities, good, skipped))
        _fsync_path(tmp)
        _publish(tmp, final)
        seconds = time.perf_counter() - start
        log.info("prepared %d images in %.1f s -> %s", len(good), seconds, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _reserve_space(npy: Path) -> None:
    """Allocate the whole array on disk now: a sparse memmap on a full disk dies of SIGBUS
    mid-build, a reservation fails at once with a message."""
    with open(npy, "r+b") as fh:
        try:
            os.posix_fallocate(fh.fileno(), 0, os.fstat(fh.fileno()).st_size)
        except OSError as err:
            if err.errno in (errno.ENOSPC, errno.EDQUOT):
                raise MedtuneError(
                    f"{npy.parent.parent}: not enough disk space for the prepared images "
                    f"({os.fstat(fh.fileno()).st_size / 2**20:.0f} MiB); free space"
                    + offer(" or pass {} on a larger disk", "--cache-dir")
                ) from None
            if err.errno not in (errno.EOPNOTSUPP, errno.EINVAL):  # fs without fallocate: go on
                raise


def _publish(tmp: Path, final: Path) -> None:
    """Rename the finished temp folder into place; if another process won the race, keep theirs."""
    try:
        os.rename(tmp, final)
    except OSError:
        if not (final / "index.json").is_file():
            raise
        log.info("another process prepared %s first; using it", final)
        return
    _fsync_path(final.parent)


def _index(
    imageset: ImageSet,
    key: str,
    params: dict[str, Any],
    identities: list[str],
    good: list[int],
    skipped: list[dict[str, str]],
) -> dict[str, Any]:
    def pick(values: list[Any] | None) -> list[Any] | None:
        return None if values is None else [values[i] for i in good]

    return {
        "format": FORMAT_VERSION,
        "key": key,
        "size": params["size"],
        "params": params,
        "source": imageset.source,
        "root": str(imageset.root),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "keys": pick(imageset.keys),
        "labels": imageset.labels[good].tolist(),
        "class_names": list(imageset.class_names),
        "groups": pick(imageset.groups),
        "predefined_split": pick(imageset.predefined_split),
        "sites": pick(imageset.sites),
        "source_indices": good,
        "identities": pick(identities),
        "skipped": skipped,
    }


def _chunks(n: int, num_workers: int) -> list[range]:
    """In-process: 16 images per progress update; workers: ~8 chunks each, at most 64 images."""
    step = 16 if num_workers <= 0 else max(1, min(64, n // (8 * num_workers)))
    return [range(i, min(n, i + step)) for i in range(0, n, step)]


def _fill(
    imageset: ImageSet,
    npy: Path,
    params: dict[str, Any],
    skip_bad: bool,
    num_workers: int,
    progress: bool,
    key: str,
) -> dict[int, str]:
    """Write every row of ``npy``; returns ``{row: reason}`` for undecodable images."""
    from tqdm.auto import tqdm

    failures: dict[int, str] = {}
    chunks = _chunks(len(imageset), num_workers)
    bar = tqdm(total=len(imageset), desc=f"prepare {key}", unit="img", disable=not progress)

    def take(rows: range, result: list[tuple[int, str]]) -> None:
        failures.update(result)
        bar.update(len(rows))
        if result and not skip_bad:
            row, reason = min(result)
            raise BadImageError(imageset.display_path(row), reason)

    def task(rows: range) -> tuple[Any, ...]:
        items = [(i, imageset.source_of(i)) for i in rows]
        return (str(npy), items, params["size"], params["fundus"])

    if num_workers <= 0:  # in this process: threads (Pillow, NumPy and OpenCV release the GIL)
        workers = _decode_threads()
        pool: cf.Executor = cf.ThreadPoolExecutor(max_workers=workers)
        window = 2 * workers
    else:
        ctx = multiprocessing.get_context("spawn")
        pool = cf.ProcessPoolExecutor(max_workers=num_workers, mp_context=ctx)
        window = 4 * num_workers
    with bar, pool:
        try:
            _run_pool(pool, chunks, task, take, window=window)
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)
            raise
    return failures


def _decode_threads() -> int:
    """Threads preparing images in this process: one per usable core, at most 4 (600 APTOS
    PNGs: 1.32 -> 0.91 s on 2 cores, identical arrays; ``docs/performance.md``)."""
    return max(1, min(4, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                      else os.cpu_count() or 1))  # fmt: skip


def _run_pool(pool: cf.Executor, chunks: list[range], task: Any, take: Any, window: int) -> None:
    """Submit chunks with at most ``window`` in flight (bounds memory for in-memory npz arrays),
    taking their results in chunk order, so the first bad image reported is the one a single
    worker would report."""
    pending: collections.deque[tuple[range, cf.Future[list[tuple[int, str]]]]] = collections.deque()
    for rows in chunks:
        pending.append((rows, pool.submit(_process_chunk, *task(rows))))
        if len(pending) >= window:
            done, fut = pending.popleft()
            take(done, fut.result())
    while pending:
        done, fut = pending.popleft()
        take(done, fut.result())


def _process_chunk(
    npy: str,
    items: list[tuple[int, str | np.ndarray]],
    image_size: int,
    fundus_opts: dict[str, Any],
) -> list[tuple[int, str]]:
    """Prepare ``items`` into their rows of ``npy`` and their FOV masks into ``fov.npy`` beside
    it (runs in workers too)."""
    from medtune.data import fundus

    opts = fundus.FundusOptions.from_dict(fundus_opts)
    mm = np.load(npy, mmap_mode="r+")
    fov = np.load(Path(npy).with_name("fov.npy"), mmap_mode="r+")
    failures: list[tuple[int, str]] = []
    try:
        for row, src in items:
            try:
                arr = prepare_image(src, image_size, opts)
            except BadImageError as err:
                match = _REASON.search(str(err))
                failures.append((row, match.group(1) if match else str(err)))
                continue
            if arr.shape != (image_size, image_size, 3) or arr.dtype != np.uint8:
                raise RuntimeError(f"preprocess returned {arr.shape} {arr.dtype} for row {row}")
            mm[row] = arr
            fov[row] = pack_mask(fundus.field_of_view_mask(arr))
        mm.flush()
        fov.flush()
    finally:
        del mm, fov
    return failures


def _compact(npy: Path, good: list[int], block: int = 256) -> None:
    """Rewrite ``npy`` keeping only the rows in ``good`` (after skipping bad images)."""
    src = np.load(npy, mmap_mode="r")
    tmp = npy.with_name(npy.stem + ".compact.npy")
    shape = (len(good), *src.shape[1:])
    dst = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=shape)
    for start in range(0, len(good), block):
        dst[start : start + block] = src[good[start : start + block]]
    dst.flush()
    del dst, src
    os.replace(tmp, npy)


@dataclass
class Part:
    """Some rows of a prepared cache, e.g. one split of a run.

    Attributes
    ----------
    cache : PreparedCache
        The cache that holds the images.
    indices : numpy.ndarray
        int64 row numbers into ``cache`` (N,).
    """

    cache: PreparedCache
    indices: np.ndarray

    @property
    def labels(self) -> np.ndarray:
        return np.asarray(self.cache.labels)[self.indices]

    def __len__(self) -> int:
        return len(self.indices)

    @property
    def images(self) -> PartImages:
        """The part's prepared images, read when sliced (``part.images[a:b]``)."""
        return PartImages(self.cache, self.indices)

    @property
    def groups(self) -> list[str] | None:
        """Patient/group id of each row, or ``None`` when the data has none."""
        groups = self.cache.groups
        return None if groups is None else [groups[i] for i in self.indices]

    @property
    def sites(self) -> list[str] | None:
        """Site of each row (several ``data`` sources or a ``site`` column), else ``None``."""
        sites = self.cache.sites
        return None if sites is None else [sites[i] for i in self.indices]


@dataclass(frozen=True)
class PartImages:
    """Some rows of a prepared cache as a sliceable sequence of images: ``view[a:b]`` reads rows
    ``a..b`` into a uint8 (b - a, S, S, 3) array, so a scorer
    (:class:`medtune.evaluation.scoring.Scorer`) reads a whole split batch by batch."""

    cache: PreparedCache
    indices: np.ndarray

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, rows: slice) -> np.ndarray:
        return np.array(self.cache.images[self.indices[rows]])
