"""Where messages go: medtune's own results always, library chatter only when asked for.

Lightning attaches its own console handler to the ``lightning`` logger when imported *and* lets
records propagate to the root logger, so with any root handler (the CLI's) every INFO line is
printed twice, and at INFO even without ``-v``. :func:`route_library_logs` removes those
handlers and makes the library loggers follow the level of the ``medtune`` logger, so a record
is printed once, by the application's handler. :func:`configure` is the CLI's set-up: one
stderr handler, INFO with ``-v`` (else WARNING), and library warnings (Lightning's hints, torch
deprecations) shown only with ``-v``. Standard library only, so any layer may import it.
"""

from __future__ import annotations

import logging
import sys
import warnings
from pathlib import Path
from typing import TextIO

__all__ = ["LIBRARY_LOGGERS", "configure", "is_library_file", "route_library_logs"]

LIBRARY_LOGGERS = (
    "lightning",
    "lightning.pytorch",
    "lightning.fabric",
    "lightning_fabric",
    "pytorch_lightning",
)
_MEDTUNE_DIR = Path(__file__).resolve().parent


def route_library_logs() -> None:
    """Print library log records once, through the application's handlers, at medtune's level.

    Removes the console handlers Lightning installs on its own loggers (``LIBRARY_LOGGERS``),
    lets their records propagate to the root logger, and sets their level to the effective
    level of the ``medtune`` logger (INFO under ``medtune -v``, else WARNING). Idempotent; call
    it after Lightning is imported (its import re-adds the handler), e.g. before building a
    Trainer.
    """
    level = logging.getLogger("medtune").getEffectiveLevel()
    for name in LIBRARY_LOGGERS:
        logger = logging.getLogger(name)
        for handler in list(logger.handlers):
            if type(handler) is logging.StreamHandler:  # console handlers, not files
                logger.removeHandler(handler)
        logger.propagate = True
        logger.setLevel(level)


def is_library_file(filename: str) -> bool:
    """True when ``filename`` (where a warning was raised) is not medtune's own code."""
    try:
        Path(filename).resolve().relative_to(_MEDTUNE_DIR)
    except (ValueError, OSError):
        return True
    return False


class _QuietShowWarning:
    """``warnings.showwarning`` that drops warnings raised in library code (they are shown with
    ``-v``); medtune's own warnings still go through the original function."""

    def __init__(self, original: object) -> None:
        self.original = original

    def __call__(
        self,
        message: Warning | str,
        category: type[Warning],
        filename: str,
        lineno: int,
        file: TextIO | None = None,
        line: str | None = None,
    ) -> None:
        if is_library_file(filename):
            return
        self.original(message, category, filename, lineno, file, line)  # type: ignore[operator]


class _StderrHandler(logging.StreamHandler):
    """A handler on whatever ``sys.stderr`` is when a record is written (tests swap it)."""

    @property  # type: ignore[override]
    def stream(self) -> TextIO:
        return sys.stderr

    @stream.setter
    def stream(self, value: TextIO) -> None:
        pass


_HANDLER: logging.Handler | None = None


def configure(verbose: bool, stream: TextIO | None = None) -> None:
    """Set up logging for the command line.

    Parameters
    ----------
    verbose : bool
        ``-v``: medtune's progress messages, Lightning's INFO lines and library warnings are
        shown (each once). Otherwise only warnings and errors, and no library warnings.
    stream : file, optional
        Where log records go (default: ``sys.stderr`` at the time of each record).

    Notes
    -----
    Adds one ``%(message)s`` handler to the root logger (replacing the one an earlier call
    added; handlers others installed are kept) and sets the root level.
    """
    global _HANDLER
    root = logging.getLogger()
    if _HANDLER is not None:
        root.removeHandler(_HANDLER)
    _HANDLER = _StderrHandler() if stream is None else logging.StreamHandler(stream)
    _HANDLER.setFormatter(logging.Formatter("%(message)s"))
    root.addHandler(_HANDLER)
    root.setLevel(logging.INFO if verbose else logging.WARNING)
    logging.getLogger("medtune").setLevel(logging.NOTSET)  # follow the root level
    route_library_logs()
    current = warnings.showwarning
    if isinstance(current, _QuietShowWarning):
        current = current.original
    warnings.showwarning = current if verbose else _QuietShowWarning(current)  # type: ignore[assignment]
