"""``medtune serve``: the screening page, its JSON API, logins and the worklist.

:mod:`~medtune.workflows.serve.app` (the app and :func:`serve`),
:mod:`~medtune.workflows.serve.api` (the routes), :mod:`~medtune.workflows.serve.auth` (who may
do what), :mod:`~medtune.workflows.serve.screening` (the service: rows in memory, then eyes and
the patient by :mod:`medtune.evaluation.patients`), :mod:`~medtune.workflows.serve.card` (the
model card) and :mod:`~medtune.workflows.serve.page` (the static page).
"""

from medtune.workflows.serve.app import create_app, is_loopback, serve
from medtune.workflows.serve.screening import (
    Screener,
    ScreeningResult,
    UploadLimits,
    UploadRefused,
    display_name,
    sniff_type,
)

__all__ = [
    "ScreeningResult",
    "Screener",
    "UploadLimits",
    "UploadRefused",
    "create_app",
    "display_name",
    "is_loopback",
    "serve",
    "sniff_type",
]
