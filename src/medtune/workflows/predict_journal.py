"""The journal that lets a killed ``medtune predict`` continue where it stopped (``--resume``).

``predict --out OUT`` (or ``--json PATH``) appends one line per finished batch to
``OUT.journal.jsonl``: the batch's number, its rows (the same values the CSV is written from,
floats in full precision) and its skipped images. The first line fingerprints the request (the
model and its files, the settings, the list of images and the batch size). The output itself is
still written once, atomically, at the end, and the journal is then deleted.

``predict --resume`` reads the journal, keeps the batches it holds and predicts only the others,
in the same batches as a full run (batch composition can change the last bits of a network's
output), so the finished file has exactly the rows of an uninterrupted run, in the same order.
A line torn by the kill is ignored (its batch is predicted again); a journal made for other
images, another model or other settings is refused in one line.

Appending one fsynced JSON line per batch is written here because no library keeps a resumable,
crash-tolerant log of results keyed by batch (``jsonlines`` reads and writes lines but neither
fsyncs nor tolerates a torn last line).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from medtune.errors import MedtuneError
from medtune.io import storage_error, write_text

__all__ = ["PredictJournal", "journal_path"]

log = logging.getLogger("medtune")

JOURNAL_FORMAT = "medtune-predict-journal/1"


def journal_path(output: str | os.PathLike[str]) -> Path:
    """Where the journal of a predictions file lives: ``OUT.csv`` -> ``OUT.journal.jsonl``."""
    return Path(output).with_suffix(".journal.jsonl")


def _stamp(path: str) -> list[Any]:
    """Size and modification time of a model file, or of the ``model.*`` files of a run folder:
    a retrained or re-exported model no longer matches an old journal."""
    p = Path(path)
    files = sorted(p.glob("model.*")) if p.is_dir() else [p]
    return [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in files if f.is_file()]


def fingerprint(
    request: Mapping[str, Any], images: Sequence[str], batch: int, model_files: Sequence[str]
) -> str:
    """A sha256 over what determines the rows of a predict call.

    Parameters
    ----------
    request : mapping
        The model's meaning and the settings (class names, decoding, thresholds, TTA, operating
        point, ...), JSON-serialisable (others are written with ``str``).
    images : sequence of str
        Every input image, in order.
    batch : int
        Images per batch.
    model_files : sequence of str
        Model files or run folders whose size and time are included.

    Returns
    -------
    str
        Hex digest.
    """
    blob = json.dumps(
        {
            "request": request,
            "images": list(images),
            "batch": batch,
            "files": [_stamp(f) for f in model_files],
        },
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(blob.encode()).hexdigest()


class PredictJournal:
    """Finished batches of one predict call, kept on disk as they finish.

    Make one with :meth:`start`; pass the batches through :meth:`pending`, :meth:`record` each
    finished one, read everything back in order with :meth:`results`, and :meth:`close` once the
    output is written. With no output path nothing is written (the calls still work).
    """

    def __init__(self, path: Path | None, key: str) -> None:
        self.path = path
        self.key = key
        self.done: dict[int, tuple[list[Any], list[tuple[str, str]]]] = {}
        self.extra: dict[int, Any] = {}  # each batch's batch-shift evidence (or None)
        self._queue: list[tuple[int, list[Path]]] = []

    @classmethod
    def start(
        cls, output: str | os.PathLike[str] | None, key: str, *, resume: bool
    ) -> PredictJournal:
        """Open the journal beside ``output``: read it back with ``resume``, else start afresh.

        Parameters
        ----------
        output : path-like or None
            The predictions file (CSV or JSON); ``None``: keep nothing on disk.
        key : str
            :func:`fingerprint` of this call.
        resume : bool
            Keep the batches of an earlier, interrupted call with the same fingerprint.

        Returns
        -------
        PredictJournal

        Raises
        ------
        MedtuneError
            With ``resume``, when the journal was made for other images, another model or other
            settings.
        """
        journal = cls(None if output is None else journal_path(output), key)
        if journal.path is None:
            return journal
        if resume and journal.path.is_file():
            journal._read()
            log.info("%s: %d finished batch(es) kept", journal.path, len(journal.done))
            journal._rewrite()  # drops a line torn by the kill before appending after it
        elif resume:
            log.warning("%s: no journal of an interrupted predict; predicting every image", output)
        elif journal.path.is_file():
            log.warning(
                "%s: an interrupted predict left this journal; starting over (--resume continues "
                "it)",
                journal.path,
            )
        if not journal.done:
            journal._write_line({"format": JOURNAL_FORMAT, "fingerprint": key}, mode="w")
        return journal

    def _read(self) -> None:
        assert self.path is not None
        lines = self.path.read_text(encoding="utf-8").split("\n")
        head = _parse(lines[0])
        if head is None or head.get("format") != JOURNAL_FORMAT:
            raise MedtuneError(
                f"{self.path}: not a medtune predict journal; delete it, or run without --resume"
            )
        if head.get("fingerprint") != self.key:
            raise MedtuneError(
                f"{self.path}: made for other images, another model or other settings; rerun "
                "the interrupted command unchanged, or run without --resume to start over"
            )
        for line in lines[1:]:
            entry = _parse(line)  # None: a line torn by the kill; that batch runs again
            if entry is not None:
                skipped = [(str(a), str(b)) for a, b in entry["skipped"]]
                self.done[int(entry["batch"])] = (list(entry["rows"]), skipped)
                self.extra[int(entry["batch"])] = entry.get("evidence")

    def _rewrite(self) -> None:
        assert self.path is not None
        lines = [{"format": JOURNAL_FORMAT, "fingerprint": self.key}]
        for index in sorted(self.done):
            rows, skipped = self.done[index]
            entry = {"batch": index, "rows": rows, "skipped": skipped}
            lines.append({**entry, "evidence": self.extra.get(index)})
        write_text(self.path, "".join(json.dumps(line) + "\n" for line in lines))

    def pending(self, batches: Iterable[list[Path]]) -> Iterator[list[Path]]:
        """The batches not in the journal (numbered in the order given), in order."""
        for index, chunk in enumerate(batches):
            if index not in self.done:
                self._queue.append((index, chunk))
                yield chunk

    def record(
        self,
        rows: Sequence[Any],
        skipped: Sequence[tuple[str, str]],
        evidence: Mapping[str, Any] | None = None,
    ) -> None:
        """Keep the next pending batch's rows (:class:`PredictionRow` or dicts), the skipped
        images among ``skipped`` (all skipped so far may be given) and what the batch shift
        test reads of its images (``evidence``: arrays, kept as JSON lists in full precision so
        a resumed call reaches the verdict of an uninterrupted one)."""
        index, chunk = self._queue.pop(0)
        names = {str(p) for p in chunk}
        mine = [(str(a), str(b)) for a, b in skipped if str(a) in names]
        self.done[index] = (list(rows), mine)
        kept = None if evidence is None else {k: _as_list(v) for k, v in evidence.items()}
        self.extra[index] = kept
        if self.path is not None:
            as_dicts = [r.as_dict() if hasattr(r, "as_dict") else dict(r) for r in rows]
            line = {"batch": index, "rows": as_dicts, "skipped": mine, "evidence": kept}
            self._write_line(line, mode="a")

    def results(self) -> tuple[list[Any], list[tuple[str, str]]]:
        """Every batch's rows and skipped images, in batch order."""
        rows: list[Any] = []
        skipped: list[tuple[str, str]] = []
        for index in sorted(self.done):
            rows += self.done[index][0]
            skipped += self.done[index][1]
        return rows, skipped

    def evidence(self) -> list[Any]:
        """Each batch's evidence (:meth:`record`), in batch order, ``None`` for a batch without
        any (no test, no readable image, or a journal written before the test); batches whose
        images were all skipped are left out."""
        return [self.extra.get(i) for i in sorted(self.done) if self.done[i][0]]

    def close(self) -> None:
        """Delete the journal (the output is written)."""
        if self.path is not None:
            self.path.unlink(missing_ok=True)

    def _write_line(self, obj: Mapping[str, Any], mode: str) -> None:
        assert self.path is not None
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, mode, encoding="utf-8") as fh:
                fh.write(json.dumps(obj) + "\n")
                fh.flush()
                os.fsync(fh.fileno())
        except OSError as err:  # a full disk or an unwritable folder: one line, not a traceback
            translated = storage_error(self.path, err)
            if translated is None:
                raise
            raise translated from None


def _as_list(value: Any) -> Any:
    return value.tolist() if hasattr(value, "tolist") else value


def _parse(line: str) -> dict[str, Any] | None:
    try:
        value = json.loads(line)
    except json.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None
