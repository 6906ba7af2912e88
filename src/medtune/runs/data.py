"""The prepared data of a run: from its config to prepared caches and the train/val/test parts
(the split of every image is written once to ``RUN/splits.csv`` and reused)."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import IO

import numpy as np

from medtune.config import TrainConfig
from medtune.data import (
    Part,
    PreparedCache,
    load_imageset,
    make_splits,
    prepare,
    read_splits,
    write_splits,
)
from medtune.data.fundus import FundusOptions
from medtune.data.laterality import ImageEye, imageset_eyes
from medtune.errors import MedtuneError, offer
from medtune.runs.folder import RunFolder

log = logging.getLogger("medtune")


def default_cache_dir() -> Path:
    """``$MEDTUNE_CACHE`` or ``~/.cache/medtune/prepared``: prepared images are shared between
    runs. ``medtune prepare --out CACHE`` and ``train --cache-dir CACHE`` use the same layout
    (``CACHE/<key>/``), so a cache prepared once is found by every later command."""
    env = os.environ.get("MEDTUNE_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "medtune" / "prepared"


@contextlib.contextmanager
def prepare_lock(run_dir: Path) -> Iterator[None]:
    """Let one process at a time prepare a run (``RUN/.prepare.lock``, an ``flock``).

    Under torchrun or SLURM every rank starts at once: the first to take the lock builds the
    prepared cache, the splits and any cached features; the others wait, then reuse them. Where
    ``flock`` is unavailable the processes go ahead together (building a cache is atomic anyway).
    """
    try:
        import fcntl
    except ImportError:  # not a POSIX system
        yield
        return
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    with open(RunFolder(run_dir).path(RunFolder.PREPARE_LOCK), "a") as fh:
        locked = _flock(fh, fcntl)
        try:
            yield
        finally:
            if locked:
                fcntl.flock(fh, fcntl.LOCK_UN)


def _flock(fh: IO[str], fcntl: ModuleType) -> bool:
    """Take the lock, saying when another process holds it; False where locks are unsupported."""
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        log.info("another process is preparing %s; waiting for it", Path(fh.name).parent)
    except OSError:  # e.g. Lustre mounted without flock
        return False
    try:
        fcntl.flock(fh, fcntl.LOCK_EX)
    except OSError:
        return False
    return True


@dataclass
class RunData:
    """The prepared data of a run.

    Attributes
    ----------
    class_names : list of str
        Class names in label order.
    train, val : Part
        The training and validation images.
    test : Part or None
        The test images, when the run has a test split or ``test_data``.
    """

    class_names: list[str]
    train: Part
    val: Part
    test: Part | None

    def parts(self) -> dict[str, Part]:
        named = {"train": self.train, "val": self.val}
        if self.test is not None:
            named["test"] = self.test
        return named


def prepare_source(
    source: str | list[str],
    config: TrainConfig,
    run_dir: Path,
    *,
    classes: list[str] | None = None,
    progress: bool = True,
) -> PreparedCache:
    """Load a data source and build (or reuse) its prepared cache at ``config.image_size``.

    Parameters
    ----------
    source : str or list of str
        A labelled image set (:func:`medtune.data.load_imageset`), or several, one per site
        (:func:`medtune.data.sources.load_sites`: keys, groups and sites named by the site).
    config : TrainConfig
        Its ``image_size`` (resolved), ``fundus``, ``cache_dir``, ``skip_bad`` and
        ``num_workers`` are used.
    run_dir : pathlib.Path
        The run folder (receives ``skipped_images.csv`` with ``skip_bad``).
    classes : list of str, optional
        The class list to label with (a model's): the data may lack some of these classes,
        and a label outside them is an error. Default: the data's own classes.
    progress : bool, default True
        Show a progress bar while preparing.

    Returns
    -------
    PreparedCache

    Raises
    ------
    MedtuneError
        For unreadable data (one line naming the file and the fix).
    """
    skipped_log = RunFolder(run_dir).path(RunFolder.SKIPPED) if config.skip_bad else None
    if isinstance(source, list) and len(source) > 1:
        from medtune.data.sources import load_sites

        imageset = load_sites(
            source, skip_bad=config.skip_bad, skipped_log=skipped_log, classes=classes
        )
    else:
        one = source[0] if isinstance(source, list) else source
        imageset = load_imageset(
            one, skip_bad=config.skip_bad, skipped_log=skipped_log, classes=classes
        )
    cache_dir = Path(config.cache_dir) if config.cache_dir else default_cache_dir()
    return prepare(
        imageset,
        config.image_size,
        FundusOptions.from_dict(config.fundus),
        cache_dir,
        skip_bad=config.skip_bad,
        num_workers=config.num_workers,
        progress=progress,
    )


def prepare_run_data(config: TrainConfig, run_dir: Path) -> RunData:
    """Prepared caches of a run's data and the train/val/test part of each image.

    Parameters
    ----------
    config : TrainConfig
        ``data`` (one set or a list of sites; optional ``val_data``/``test_data``), the split
        fractions and seed, and the resolved ``image_size``.
    run_dir : pathlib.Path
        The run folder: ``splits.csv`` is read when present, else made (stratified,
        group-aware, per site when there are several) and written.

    Returns
    -------
    RunData

    Raises
    ------
    MedtuneError
        When there are no validation images, or the data cannot be read.
    """
    main = prepare_source(config.data, config, run_dir, progress=config.progress)
    splits = _splits_for(main, config, run_dir)
    parts = {name: Part(main, np.flatnonzero(splits == name)) for name in ("train", "val", "test")}
    for name, source in (("val", config.val_data), ("test", config.test_data)):
        if source:
            other = prepare_source(
                source, config, run_dir, classes=list(main.class_names), progress=config.progress
            )
            _note_absent_classes(other, source)
            parts[name] = Part(other, np.arange(len(other)))
    if len(parts["val"]) == 0:
        raise MedtuneError(
            f"{config.data}: no validation images; give more images" + offer(" or {}", "--val-data")
        )
    test = parts["test"] if len(parts["test"]) else None
    return RunData(list(main.class_names), parts["train"], parts["val"], test)


def _splits_for(cache: PreparedCache, config: TrainConfig, run_dir: Path) -> np.ndarray:
    path = RunFolder(run_dir).splits_path
    if path.is_file():
        return read_splits(path, cache.keys)
    splits = make_splits(
        cache,
        val=0.0 if config.val_data else config.val_fraction,
        test=0.0 if config.test_data else config.test_fraction,
        seed=config.seed,
    )
    write_splits(path, cache.keys, splits)
    return splits


def _note_absent_classes(cache: PreparedCache, source: str) -> None:
    """A validation or test set may lack a class of the training data; say which."""
    present = set(np.unique(np.asarray(cache.labels)).tolist())
    absent = [c for i, c in enumerate(cache.class_names) if i not in present]
    if absent:
        log.warning("%s has no images of class(es) %s; their figures are left out", source, absent)


def part_eyes(
    source: str | list[str], config: TrainConfig, part: Part, classes: list[str]
) -> list[ImageEye | None]:
    """The patient and eye of each image of ``part`` (:func:`medtune.data.laterality.
    imageset_eyes`), read again from the data source the part was prepared from.

    Parameters
    ----------
    source : str or list of str
        The data source(s) of ``part``'s cache (several: one per site; patients are then named
        ``<site>/<patient>``, as the cache names keys).
    config : TrainConfig
        Its ``skip_bad`` is used.
    part : Part
        Rows of the prepared cache.
    classes : list of str
        The model's classes (as the cache was labelled).

    Returns
    -------
    list of ImageEye or None
        One per row of ``part``; ``None`` for an image the source no longer lists.
    """
    from medtune.data.sources import site_name

    sources = source if isinstance(source, list) else [source]
    found: dict[str, ImageEye] = {}
    for src in sources:
        imageset = load_imageset(src, skip_bad=config.skip_bad, classes=classes, duplicates=False)
        prefix = f"{site_name(src)}/" if len(sources) > 1 else ""
        for key, eye in zip(imageset.keys, imageset_eyes(imageset), strict=True):
            patient = None if eye.patient_id is None else prefix + eye.patient_id
            found[prefix + key] = ImageEye(patient, eye.eye, eye.patient_source, eye.eye_source)
    return [found.get(part.cache.keys[int(i)]) for i in part.indices]
