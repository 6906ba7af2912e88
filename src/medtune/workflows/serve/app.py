"""``medtune serve``: the screening page, its JSON API and the worklist, as one FastAPI app.

The package is split by job: :mod:`~medtune.workflows.serve.screening` (the service: uploads to
rows, eyes and a patient-level answer, in memory), :mod:`~medtune.workflows.serve.api` (the
routes, an ``APIRouter``), :mod:`~medtune.workflows.serve.auth` (logins, tokens, CSRF),
:mod:`~medtune.workflows.serve.page` (the static page) and this module (the app, its limits and
headers, and :func:`serve`). Screenings, users and the audit log live in the worklist database
(:mod:`medtune.worklist`). Built on FastAPI (https://fastapi.tiangolo.com) and uvicorn; uploads
are parsed by Starlette's multipart parser (``python-multipart``). Why this and not Gradio:
``docs/screening.md``.

Safety (all defaults):

* binds to ``127.0.0.1``; a loopback server only answers requests whose ``Host`` is a loopback
  name (no DNS rebinding from a web page); any other address needs at least one user
  (``medtune users add``), and once a user exists every request needs a login or a token;
* uploads are limited in count, size per file, size per request and type (JPEG, PNG, TIFF or
  DICOM, recognised by their first bytes, not by name); a refused request gets a 4xx JSON
  ``{"error": "..."}`` naming the file and the limit, never a traceback;
* uploads are decoded from a private temporary folder (mode 0700) and deleted at once;
  photographs are kept only with ``keep_images`` (content-addressed, never in the database);
* the page and its script and style are served by the server itself, and a
  ``Content-Security-Policy`` of ``'self'`` stops the browser from loading anything else (no CDN,
  no remote font): it works offline;
* logs carry counts and timings only: no file name, no patient pseudonym, no DICOM element;
* predictions run in a bounded thread pool (``workers``), so several users are served at once
  while the model is loaded once per process.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException
from starlette.middleware.sessions import SessionMiddleware
from starlette.middleware.trustedhost import TrustedHostMiddleware

from medtune.errors import MedtuneError
from medtune.evaluation.referral import DEFAULT_OPERATING_POINT
from medtune.workflows.serve.api import error, router
from medtune.workflows.serve.auth import session_key
from medtune.workflows.serve.screening import Screener, UploadLimits, UploadRefused
from medtune.worklist.db import Database, data_dir, open_database
from medtune.worklist.store import Worklist
from medtune.worklist.users import SESSION_HOURS, Users

log = logging.getLogger("medtune.serve")
LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1", "[::1]")
SESSION_COOKIE = "medtune_session"
SECURITY_HEADERS = {
    # Only this server's own page, script, style and data: URLs (Grad-CAM PNGs): nothing remote.
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data: blob:; "
    "object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'self'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}


@dataclass
class ServeState:
    """What the routes share: the model, the worklist, the users, the limits and the queue."""

    screener: Screener
    worklist: Worklist
    users: Users
    limits: UploadLimits
    open_without_users: bool
    limiter: Any = None
    pending: int = 0


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback addresses (``127.0.0.0/8``, ``::1``)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def create_app(
    screener: Screener | None = None,
    *,
    run: str | Path | None = None,
    model_path: str | Path | None = None,
    tta: str = "none",
    operating_point: str = DEFAULT_OPERATING_POINT,
    limits: UploadLimits | None = None,
    workers: int | None = None,
    host: str = "127.0.0.1",
    db: str | Database | None = None,
    folder: str | Path | None = None,
    keep_images: bool = False,
) -> FastAPI:
    """The FastAPI application: the page, its JSON API, the worklist, logins and limits.

    Parameters
    ----------
    screener : Screener, optional
        The model to serve; made from ``run`` / ``model_path`` / ``tta`` when not given.
    run, model_path, tta, operating_point
        As for :class:`~medtune.workflows.serve.screening.Screener`.
    limits : UploadLimits, optional
        Upload limits (defaults of :class:`~medtune.workflows.serve.screening.UploadLimits`).
    workers : int, optional
        Batches predicted at once (default 1 for a run, whose Grad-CAM serialises anyway, and
        2 for ONNX), each with ONNX Runtime threads for its share of the cores: on 2 cores, 2
        single-threaded batches ran at 19.5 ms per 224 px image against 29 ms for 2 batches
        with ONNX Runtime's default thread pool, whose spinning threads compete (measured on
        the 2-core development machine under load, efficientnet_lite0).
    host : str, default "127.0.0.1"
        The address the server binds to; on a loopback address only loopback ``Host`` headers
        are answered, and with no user at all requests act as the built-in ``local`` admin.
    db : str or Database, optional
        The worklist database: a SQLAlchemy URL (``postgresql://user:pw@host/name``) or an open
        :class:`~medtune.worklist.db.Database`; default SQLite in ``folder``.
    folder : str or pathlib.Path, optional
        The data folder (:func:`medtune.worklist.db.data_dir`: ``$MEDTUNE_DATA`` or the user's
        data folder): the default database, the session key and the kept photographs.
    keep_images : bool, default False
        Keep every screened photograph in ``FOLDER/images`` (content-addressed by SHA-256) so
        reviewed ones can be exported for training (``medtune worklist export``).

    Returns
    -------
    fastapi.FastAPI
        Routes: :mod:`medtune.workflows.serve.api`.

    Raises
    ------
    MedtuneError
        For a model that cannot be loaded or a database that cannot be opened.
    """
    folder = data_dir(folder)
    database = db if isinstance(db, Database) else open_database(db, folder=folder)
    owned = screener is None
    if screener is None:
        workers = workers or (1 if run is not None else 2)
        screener = Screener(
            run=run,
            model_path=model_path,
            tta=tta,
            operating_point=operating_point,
            num_threads=_threads_per_worker(workers),
        )
    workers = workers or (1 if screener.can_explain else 2)
    state = ServeState(
        screener=screener,
        worklist=Worklist(database, folder / "images" if keep_images else None),
        users=Users(database),
        limits=limits or UploadLimits(),
        open_without_users=is_loopback(host),
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI):  # noqa: ANN202
        state.limiter = anyio.CapacityLimiter(workers)
        try:
            yield
        finally:
            if owned:
                screener.close()
            if not isinstance(db, Database):
                database.close()

    app = FastAPI(
        title="medtune serve",
        version=_version(),
        docs_url=None,  # FastAPI's docs page loads Swagger UI from a CDN
        redoc_url=None,
        openapi_url=None,
        lifespan=lifespan,
    )
    app.state.serve = state
    app.state.screener = screener
    app.include_router(router)
    _add_middleware(app, host, folder, state.limits)
    _add_handlers(app)
    return app


def _add_middleware(app: FastAPI, host: str, folder: Path, limits: UploadLimits) -> None:
    app.add_middleware(
        SessionMiddleware,
        secret_key=session_key(folder),
        session_cookie=SESSION_COOKIE,
        max_age=SESSION_HOURS * 3600,
        same_site="strict",
        https_only=not is_loopback(host),  # off loopback, serve behind TLS
    )
    if is_loopback(host):
        app.add_middleware(TrustedHostMiddleware, allowed_hosts=list(LOOPBACK_NAMES))
    app.add_middleware(_BodyLimit, max_bytes=limits.max_request_bytes)

    @app.middleware("http")
    async def headers(request: Request, call_next):  # noqa: ANN001, ANN202
        response = await call_next(request)
        for key, value in SECURITY_HEADERS.items():
            response.headers.setdefault(key, value)
        return response


def _add_handlers(app: FastAPI) -> None:
    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:  # noqa: ARG001
        detail = exc.detail if isinstance(exc.detail, str) else "request refused"
        return error(detail, exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def bad_request(request: Request, exc: RequestValidationError) -> JSONResponse:  # noqa: ARG001
        if request.url.path.startswith("/api/predict"):
            return error("malformed request; POST images as multipart form field 'files'", 400)
        return error("malformed request; see the fields this endpoint takes", 400)

    @app.exception_handler(UploadRefused)
    async def refused(request: Request, exc: UploadRefused) -> JSONResponse:  # noqa: ARG001
        return error(str(exc), exc.status)

    @app.exception_handler(MedtuneError)
    async def unprocessable(request: Request, exc: MedtuneError) -> JSONResponse:  # noqa: ARG001
        return error(str(exc), 422)  # one line naming the problem (e.g. the model's complaint)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:  # noqa: ARG001
        log.error("internal error: %s", type(exc).__name__)  # no message: it may name files
        return error("internal error; the server log has its type", 500)


def _threads_per_worker(workers: int) -> int:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, (cores or 1) // max(1, workers))


def _version() -> str:
    from medtune.version import __version__

    return __version__


class _BodyLimit:
    """ASGI middleware: refuse a request body over ``max_bytes`` (413), from its
    ``Content-Length`` before reading, or while reading a body sent without one."""

    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await _send_json(send, 413, self._message())
            return
        seen = 0

        async def counted() -> dict:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                raise UploadRefused(self._message(), 413)
            return message

        await self.app(scope, counted, send)

    def _message(self) -> str:
        return (
            f"request too large: at most {self.max_bytes / 2**20:.3g} MiB per request; "
            "send fewer or smaller images"
        )


async def _send_json(send: Any, status: int, message: str) -> None:
    body = json.dumps({"error": message}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"connection", b"close")],
        }
    )
    await send({"type": "http.response.body", "body": body})


def serve(
    *,
    run: str | Path | None = None,
    model_path: str | Path | None = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    tta: str = "none",
    operating_point: str = DEFAULT_OPERATING_POINT,
    limits: UploadLimits | None = None,
    workers: int | None = None,
    db: str | None = None,
    folder: str | Path | None = None,
    keep_images: bool = False,
    log_level: str = "info",
) -> None:
    """Serve the screening page, its JSON API and the worklist until interrupted (Ctrl+C).

    Parameters
    ----------
    run : str or pathlib.Path, optional
        A run folder (PyTorch; the page shows Grad-CAM).
    model_path : str or pathlib.Path, optional
        An exported ``model.onnx`` (ONNX Runtime; faster, no Grad-CAM).
    host : str, default "127.0.0.1"
        Address to bind to. Loopback by default: only this computer can connect. Any other
        address needs at least one user (``medtune users add``) and TLS in front (session
        cookies are then sent over HTTPS only).
    port : int, default 8000
    tta : {"none", "rot90"}, default "none"
    operating_point : {"sens90", "sens97.5", "youden"}, default "sens90"
        The validated threshold that sets ``refer``.
    limits : UploadLimits, optional
    workers : int, optional
        Batches predicted at once (:func:`create_app`).
    db : str, optional
        The worklist database URL (default SQLite in the data folder; ``postgresql://...``).
    folder : str or pathlib.Path, optional
        The data folder (default ``$MEDTUNE_DATA`` or the user's data folder).
    keep_images : bool, default False
        Keep screened photographs (content-addressed) for ``medtune worklist export``.
    log_level : str, default "info"
        uvicorn's log level; the access log holds method, path and status, never file names.

    Raises
    ------
    MedtuneError
        For no or both model sources, a model that cannot be loaded, a database that cannot be
        opened, or a non-loopback address while the worklist has no user.
    """
    import uvicorn

    folder = data_dir(folder)
    database = open_database(db, folder=folder)
    if not is_loopback(host) and Users(database).count() == 0:
        database.close()
        raise MedtuneError(
            f"serving on {host} needs a login: add a user first (medtune users add NAME --role "
            "admin), or serve on 127.0.0.1"
        )
    app = create_app(
        run=run,
        model_path=model_path,
        tta=tta,
        operating_point=operating_point,
        limits=limits,
        workers=workers,
        host=host,
        db=database,
        folder=folder,
        keep_images=keep_images,
    )
    shown = f"[{host}]" if ":" in host else host
    print(f"medtune serve: http://{shown}:{port}/  (Ctrl+C to stop)", flush=True)
    print(f"worklist: {database.url}", flush=True)
    logging.getLogger("uvicorn.access").addFilter(drop_query)
    try:
        uvicorn.run(app, host=host, port=port, log_level=log_level, server_header=False)
    finally:
        database.close()


def drop_query(record: logging.LogRecord) -> bool:
    """A logging filter for uvicorn's access log: the path without its query string, where a
    worklist filter would carry a patient pseudonym (``/api/screenings?patient=...``)."""
    args = record.args
    if isinstance(args, tuple) and len(args) >= 3 and isinstance(args[2], str):
        record.args = (*args[:2], args[2].split("?", 1)[0], *args[3:])
    return True
