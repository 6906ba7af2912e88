"""User-facing errors.

Every problem a user can fix (bad path, corrupt image, wrong CSV columns, ...) is raised as a
:class:`MedtuneError` whose message is ONE line naming the file and the fix. The CLI prints it
without a traceback (unless ``--debug``) and exits with status 2.
"""

from __future__ import annotations

import re


class MedtuneError(Exception):
    """An error the user can fix; ``str(err)`` is a single line naming the file and the fix."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(message.split()))


class BadImageError(MedtuneError):
    """An image file that cannot be decoded (corrupt, truncated, empty, not an image)."""

    def __init__(self, path: object, reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(
            f"{path}: cannot read image ({reason}); replace or delete the file, "
            "or pass --skip-bad to skip unreadable images"
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
