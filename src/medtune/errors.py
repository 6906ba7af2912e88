"""User-facing errors.

Every problem a user can fix (bad path, corrupt image, wrong CSV columns, ...) is raised as a
:class:`MedtuneError` whose message is ONE line naming the file and the fix. The CLI prints it
without a traceback (unless ``--debug``) and exits with status 2.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

# Advice that names an option (``--skip-bad``, ``--out / --cache-dir``, ``--resume``) is shared by
# commands that do not all have that option. It is written with :func:`offer` and rendered when
# the message is read (``str(err)``), keeping only the options of the command that runs
# (:func:`set_command_options`, called by the CLI). Rendering at read time, in the process that
# prints, works for errors raised in worker threads and processes too. No library does this.
_BEGIN, _SEP, _END = "\ue000", "\ue001", "\ue002"  # Unicode private use: never in user text
_OFFER = re.compile(f"{_BEGIN}([^{_BEGIN}{_SEP}{_END}]*){_SEP}([^{_BEGIN}{_END}]*){_END}")
_command_options: frozenset[str] | None = None


def set_command_options(options: Iterable[str] | None) -> None:
    """Say which options the running command has (``None``: the Python API, all of them).

    Parameters
    ----------
    options : iterable of str or None
        Option strings such as ``"--out"``, as in the command's ``--help``.
    """
    global _command_options
    _command_options = None if options is None else frozenset(options)


def offer(template: str, *options: str, otherwise: str = "") -> str:
    """Advice text kept only where the running command has the options it names.

    Parameters
    ----------
    template : str
        The advice, e.g. ``", or pass {} to skip unreadable images"``; ``{}`` is replaced by the
        available options joined with ``" / "`` (a template without ``{}`` is kept whole when
        all its options are available).
    *options : str
        The options the advice names, e.g. ``"--out", "--cache-dir"``.
    otherwise : str, default ""
        What to say instead where the command has none of them.

    Returns
    -------
    str
        A marked fragment to put into a :class:`MedtuneError` message; it renders as the advice
        with the available options, or as nothing when the command has none of them.
    """
    return f"{_BEGIN}{template}{_SEP}{_SEP.join(options)}{_SEP}{otherwise}{_END}"


def render(text: str, options: Iterable[str] | None = None) -> str:
    """``text`` with every :func:`offer` fragment rendered for ``options`` (default: the running
    command's, :func:`set_command_options`; ``None`` there: every option is available)."""
    have = _command_options if options is None else frozenset(options)

    def one(match: re.Match[str]) -> str:
        template, *named, otherwise = [match.group(1), *match.group(2).split(_SEP)]
        kept = [o for o in named if have is None or o in have]
        if not kept or ("{}" not in template and len(kept) < len(named)):
            return otherwise
        return template.replace("{}", " / ".join(kept))

    return _OFFER.sub(one, text)


class MedtuneError(Exception):
    """An error the user can fix; ``str(err)`` is a single line naming the file and the fix.

    Advice naming an option some commands lack is written with :func:`offer`: ``str(err)`` shows
    it only where the running command has that option.
    """

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))

    def __str__(self) -> str:
        return " ".join(render(" ".join(str(a) for a in self.args)).split())


class BadImageError(MedtuneError):
    """An image file that cannot be decoded (corrupt, truncated, empty, not an image)."""

    def __init__(self, path: object, reason: str | None = None) -> None:
        if reason is None:  # unpickled in the parent process: ``path`` is the whole message
            super().__init__(str(path))
            self.path = str(path).split(": cannot read image", 1)[0]
            return
        self.path = str(path)
        self.reason = reason
        super().__init__(
            f"{path}: cannot read image ({reason}); replace or delete the file"
            + offer(", or pass {} to skip unreadable images", "--skip-bad")
        )


def unpickling_detail(err: BaseException) -> str:
    """The telling part of a ``weights_only`` refusal (``Unsupported global: ...``), or its
    first line: torch's message spans many lines of advice."""
    text = " ".join(str(err).split())
    found = re.search(r"(Unsupported global: (GLOBAL )?[\w.]+)", text)
    if found:
        return found.group(1)
    lines = str(err).strip().splitlines()
    return lines[0][:200] if lines else type(err).__name__
