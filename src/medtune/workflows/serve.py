"""``medtune serve``: a web page and a JSON endpoint for screening photographs with a model.

The page is a thin skin over :func:`medtune.workflows.predict.predict`, the function behind
``medtune predict``: every upload is written to a private temporary folder, predicted there with
the same call, and the rows come back with the uploaded file names in the ``image`` column (the
CSV is the same :func:`~medtune.workflows.predict.to_csv`). Whatever columns the rows carry are
shown: the page renders the known ones (quality verdict, grade name, class probabilities,
``p_referable``, the referral flag, a site-shift warning) prominently and the rest in the batch
table.

Built on FastAPI (https://fastapi.tiangolo.com) and uvicorn; uploads are parsed by Starlette's
multipart parser (``python-multipart``). Why this and not Gradio: ``docs/screening.md``.

Safety (all defaults):

* binds to ``127.0.0.1``; a loopback server only answers requests whose ``Host`` is a loopback
  name (no DNS rebinding from a web page);
* uploads are limited in count, size per file, size per request and type (JPEG, PNG, TIFF or
  DICOM, recognised by their first bytes, not by name); a refused request gets a 4xx JSON
  ``{"error": "..."}`` naming the file and the limit, never a traceback;
* each request works in its own folder under one private temporary folder (mode 0700), deleted
  when the request ends; the temporary folder is removed when the server stops;
* the page and its script and style are served by the server itself, and a
  ``Content-Security-Policy`` of ``'self'`` stops the browser from loading anything else (no CDN,
  no remote font): it works offline;
* logs carry counts and timings only: no file name, no DICOM element (patient ids never leave
  :mod:`medtune.data.dicom`);
* predictions run in a bounded thread pool (``workers``), so several users are served at once
  while the model is loaded once per process.
"""

from __future__ import annotations

import base64
import csv
import ipaddress
import json
import logging
import os
import re
import shutil
import tempfile
import threading
import time
import weakref
from collections.abc import Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.middleware.trustedhost import TrustedHostMiddleware

from medtune.errors import MedtuneError
from medtune.evaluation.referral import DEFAULT_OPERATING_POINT
from medtune.runs import RunFolder
from medtune.workflows import serve_page
from medtune.workflows.predict import load_predictor, predict, prediction_meta, to_csv

log = logging.getLogger("medtune.serve")

DISCLAIMER = "Research use only. Not a medical device: not for diagnosis or treatment decisions."
INTENDED_USE = (
    "Research on grading diabetic retinopathy in colour fundus photographs. A clinician reviews "
    "every result; a result never replaces an examination."
)
#: Content types accepted, by their magic bytes (Pillow/pydicom decode them afterwards).
ACCEPTED_TYPES = ("JPEG", "PNG", "TIFF", "DICOM")
LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1", "[::1]")


# ---------------------------------------------------------------------------------- limits
@dataclass(frozen=True)
class UploadLimits:
    """What one request may send.

    Attributes
    ----------
    max_files : int, default 50
        Photographs per request.
    max_file_mb : float, default 25
        Size of one photograph, in MiB.
    max_request_mb : float, default 200
        Size of the whole request body, in MiB (checked before and while it is read).
    max_pending : int, default 64
        Requests waiting for a worker before new ones get ``503`` (retry later).
    """

    max_files: int = 50
    max_file_mb: float = 25.0
    max_request_mb: float = 200.0
    max_pending: int = 64

    @property
    def max_file_bytes(self) -> int:
        return int(self.max_file_mb * 2**20)

    @property
    def max_request_bytes(self) -> int:
        return int(self.max_request_mb * 2**20)


class UploadRefused(MedtuneError):
    """A request the server will not process; ``status`` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


def sniff_type(head: bytes) -> str | None:
    """The image type from a file's first 132 bytes, or ``None`` if it is none of the accepted.

    Written by hand because the accepted set is four fixed signatures (JPEG SOI marker, PNG
    signature, TIFF byte-order header, DICOM Part 10 ``DICM`` after the 128-byte preamble);
    decoding the file to learn its type would parse untrusted data before it is even accepted.

    Parameters
    ----------
    head : bytes
        At least the first 132 bytes of the file (fewer for a short file).

    Returns
    -------
    str or None
        One of :data:`ACCEPTED_TYPES`.
    """
    if head[:3] == b"\xff\xd8\xff":
        return "JPEG"
    if head[:8] == b"\x89PNG\r\n\x1a\n":
        return "PNG"
    if head[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):  # TIFF, BigTIFF
        return "TIFF"
    if head[128:132] == b"DICM":
        return "DICOM"
    return None


def display_name(name: str | None, index: int) -> str:
    """The file name a browser sent, without any folder part (``C:\\a\\b.jpg`` -> ``b.jpg``)."""
    base = re.split(r"[\\/]", name or "")[-1].strip()
    return base[:200] or f"image_{index + 1}"


# ---------------------------------------------------------------------------------- results
@dataclass
class ScreeningResult:
    """What one batch of photographs gave.

    Attributes
    ----------
    rows : list of dict
        :func:`~medtune.workflows.predict.predict`'s rows, in upload order, with ``image`` set
        to the uploaded file's name.
    skipped : list of dict
        ``{"image": name, "reason": one line}`` for each photograph that could not be read.
    gradcam : dict of int to bytes
        PNG Grad-CAM figures by row index (``run`` models with ``explain`` only).
    meta : dict
        What the columns mean, as ``medtune predict --out`` writes it to ``<out>.meta.json``
        (grades, decoding, the referral rule with its validated sensitivity and specificity).
    seconds : float
        Wall time of the prediction.
    """

    rows: list[dict[str, Any]]
    skipped: list[dict[str, str]] = field(default_factory=list)
    gradcam: dict[int, bytes] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def csv(self) -> str:
        """The rows as ``medtune predict --out`` writes them (same function)."""
        return to_csv(self.rows)

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready mapping: ``rows``, ``columns``, ``skipped``, ``csv``, ``meta``,
        ``gradcam`` (PNG data URLs keyed by row index as a string) and ``seconds``."""
        return {
            "rows": self.rows,
            "columns": list(self.rows[0]) if self.rows else [],
            "skipped": self.skipped,
            "csv": self.csv,
            "meta": self.meta,
            "gradcam": {
                str(i): "data:image/png;base64," + base64.b64encode(png).decode("ascii")
                for i, png in self.gradcam.items()
            },
            "seconds": round(self.seconds, 4),
        }


# ---------------------------------------------------------------------------------- screener
class Screener:
    """The prediction workflow behind the page, as a Python API.

    The model is loaded once (:func:`~medtune.workflows.predict.load_predictor`); each batch is
    written to a private temporary folder and screened by
    :func:`~medtune.workflows.predict.predict` with that model, so the rows, the CSV and the
    Grad-CAM figures are ``medtune predict``'s.

    Parameters
    ----------
    run : str or pathlib.Path, optional
        A run folder (PyTorch; Grad-CAM available).
    model_path : str or pathlib.Path, optional
        An exported ``model.onnx`` with its ``model.json`` (ONNX Runtime). Exactly one of
        ``run`` and ``model_path``.
    tta : {"none", "rot90"}, default "none"
        Test-time augmentation, as for :func:`~medtune.workflows.predict.predict`.
    operating_point : {"sens90", "sens97.5", "youden"}, default "sens90"
        The validated threshold that sets ``refer`` (as ``medtune predict --operating-point``).
    temp_dir : str or pathlib.Path, optional
        Where the private temporary folder is made (default: the system's).
    num_threads : int, optional
        ONNX Runtime threads per batch (:func:`create_app` gives each worker its share of the
        cores; the default, one per core, suits one batch at a time).

    Raises
    ------
    MedtuneError
        For no or both model sources, an unknown ``tta`` or operating point, or a model that
        cannot be loaded.

    Examples
    --------
    >>> screener = Screener(model_path="runs/dr/export/model.onnx")  # doctest: +SKIP
    >>> result = screener.screen([("eye.jpg", open("eye.jpg", "rb").read())])  # doctest: +SKIP
    >>> result.rows[0]["grade_name"], result.rows[0]["refer"]  # doctest: +SKIP
    """

    def __init__(
        self,
        *,
        run: str | Path | None = None,
        model_path: str | Path | None = None,
        tta: str = "none",
        operating_point: str = DEFAULT_OPERATING_POINT,
        temp_dir: str | Path | None = None,
        num_threads: int | None = None,
    ) -> None:
        self.run = Path(run) if run is not None else None
        self.model_path = Path(model_path) if model_path is not None else None
        self.predictor = load_predictor(
            run=run, model_path=model_path, tta=tta, num_threads=num_threads
        )
        self.predictor.referral(operating_point)  # an unknown point fails now, not per upload
        self.operating_point = operating_point
        self.temp_root = Path(tempfile.mkdtemp(prefix="medtune-serve-", dir=temp_dir))
        self._cleanup = weakref.finalize(self, shutil.rmtree, self.temp_root, True)
        # Grad-CAM hooks the shared PyTorch model: one batch at a time on a run.
        self._lock = threading.Lock() if self.can_explain else None

    @property
    def can_explain(self) -> bool:
        """Grad-CAM needs the PyTorch model (``run``), not ``model.onnx``."""
        return self.predictor.torch_model is not None

    def close(self) -> None:
        """Remove the temporary folder."""
        self._cleanup()

    def screen(
        self, files: Sequence[tuple[str, bytes]], *, explain: bool = False
    ) -> ScreeningResult:
        """Screen uploaded photographs with the same call as ``medtune predict``.

        Parameters
        ----------
        files : sequence of (str, bytes)
            ``(file name as uploaded, content)`` pairs. Names are shown back; on disk each file
            gets a cleaned copy of its name inside its own temporary folder.
        explain : bool, default False
            Also make the captioned Grad-CAM figure of each photograph (``run`` only; ignored
            otherwise).

        Returns
        -------
        ScreeningResult

        Raises
        ------
        UploadRefused
            When no file is given or a file is not a JPEG, PNG, TIFF or DICOM image.
        MedtuneError
            From the prediction itself (for example a model whose files went away).
        """
        if not files:
            raise UploadRefused("no photograph received; send one or more images", 400)
        names = [display_name(name, i) for i, (name, _) in enumerate(files)]
        for name, (_, data) in zip(names, files, strict=True):
            _check_type(name, data)
        work = Path(tempfile.mkdtemp(dir=self.temp_root))
        try:
            paths = _write_uploads(work / "in", names, [data for _, data in files])
            return self._predict(paths, names, work, explain and self.can_explain)
        finally:
            shutil.rmtree(work, ignore_errors=True)

    def _predict(
        self, paths: list[Path], names: list[str], work: Path, explain: bool
    ) -> ScreeningResult:
        out = work / "predictions.csv"
        cams = work / "gradcam"
        started = time.perf_counter()
        if self._lock is not None:
            with self._lock:
                rows = self._call_predict(paths, out, cams if explain else None)
        else:
            rows = self._call_predict(paths, out, None)
        seconds = time.perf_counter() - started
        by_path = {str(p): n for p, n in zip(paths, names, strict=True)}
        gradcam = _read_gradcam(rows, cams) if explain else {}
        for row in rows:
            row["image"] = by_path.get(str(row["image"]), row["image"])
        skipped = _read_skipped(out.with_suffix(".skipped.csv"), by_path)
        meta_path = out.with_suffix(".meta.json")
        meta = json.loads(meta_path.read_text(encoding="utf-8")) if meta_path.is_file() else {}
        meta.pop("model", None)  # a server path; the model card says what the model is
        log.info("screened %d image(s), %d unreadable, in %.2f s", len(rows), len(skipped), seconds)
        return ScreeningResult(rows, skipped, gradcam, meta, seconds)

    def _call_predict(self, paths: list[Path], out: Path, explain: Path | None) -> list[dict]:
        return predict(
            paths,
            predictor=self.predictor,
            out=out,
            explain=explain,
            operating_point=self.operating_point,
            skip_bad=True,
            progress=False,
        )

    def model_card(self) -> dict[str, Any]:
        """What the page's model-card panel shows.

        Returns
        -------
        dict
            ``model`` (backbone, grade names, input size, decoding), ``training`` (data,
            strategy, synthetic), ``metrics`` (the split or evaluation they come from and each
            metric with its 95% CI where the run stored one), ``referral`` (the rule ``refer``
            uses, with its validated sensitivity and specificity), ``intended_use``,
            ``disclaimer``, ``backend`` and ``explain``.
        """
        p = self.predictor
        meta = prediction_meta(p, self.operating_point)
        card: dict[str, Any] = {
            "intended_use": INTENDED_USE,
            "disclaimer": DISCLAIMER,
            "backend": "PyTorch (run folder)" if self.run is not None else "ONNX Runtime",
            "explain": self.can_explain,
            "model": {
                "backbone": p.backbone,
                "grades": p.grade_names,
                "image_size": p.image_size,
                "decoding": p.decoding.get("method"),
                "tta": p.tta,
            },
            "training": {},
            "referral": meta.get("referral"),
            "quality": meta.get("quality"),
        }
        if self.run is not None:
            card.update(_run_card(RunFolder(self.run)))
        else:
            card.update(_sidecar_card(self.model_path))
        return card


def _check_type(name: str, data: bytes) -> str:
    kind = sniff_type(data[:132])
    if kind is None:
        raise UploadRefused(
            f"{name}: not a JPEG, PNG, TIFF or DICOM image; upload fundus photographs only", 415
        )
    return kind


def _write_uploads(folder: Path, names: list[str], contents: list[bytes]) -> list[Path]:
    """Each upload under a cleaned, unique version of its name (the Grad-CAM figure's title
    and file name come from it), one flat folder."""
    folder.mkdir()
    paths, used = [], set()
    for name, data in zip(names, contents, strict=True):
        clean = re.sub(r"[^A-Za-z0-9_.-]+", "_", name).lstrip(".") or "image"
        stem, suffix = Path(clean).stem or "image", Path(clean).suffix
        candidate, n = clean, 1
        while candidate.lower() in used:
            n += 1
            candidate = f"{stem}_{n}{suffix}"
        used.add(candidate.lower())
        path = folder / candidate
        path.write_bytes(data)
        paths.append(path)
    return paths


def _read_gradcam(rows: list[dict], folder: Path) -> dict[int, bytes]:
    """The PNG ``predict(explain=...)`` wrote for each row (``<image stem>_gradcam.png``)."""
    found: dict[int, bytes] = {}
    for i, row in enumerate(rows):
        path = folder / f"{Path(str(row['image'])).stem}_gradcam.png"
        if path.is_file():
            found[i] = path.read_bytes()
    return found


_CLI_ADVICE = re.compile(r";\s*replace or delete the file.*$")


def _read_skipped(path: Path, by_path: dict[str, str]) -> list[dict[str, str]]:
    """predict's ``<out>.skipped.csv`` with the temporary paths replaced by the upload names."""
    if not path.is_file():
        return []
    skipped = []
    with path.open(newline="", encoding="utf-8") as fh:
        for record in csv.DictReader(fh):
            where = record.get("image", "")
            reason = record.get("reason", "")
            for temp, name in by_path.items():
                reason = reason.replace(temp, name)
            name = by_path.get(where, Path(where).name)
            skipped.append({"image": name, "reason": _CLI_ADVICE.sub("", reason)})
    return skipped


def _headline(metrics: dict[str, Any]) -> dict[str, Any]:
    """Scalar metrics with their CIs (``<name>_ci`` or ``ci`` mappings as the run stored them)."""
    out: dict[str, Any] = {}
    for key, value in metrics.items():
        if isinstance(value, bool) or key.endswith("_ci"):
            continue
        if isinstance(value, float) or key == "n":
            ci = metrics.get(f"{key}_ci")
            if ci is None and isinstance(metrics.get("ci"), dict):
                ci = metrics["ci"].get(key)
            out[key] = {"value": value, "ci95": ci}
    return out


def _run_card(folder: RunFolder) -> dict[str, Any]:
    training: dict[str, Any] = {"synthetic": folder.read_card().synthetic}
    if folder.has_config():
        config = folder.read_config()
        data = Path(str(config.data)).name if config.data else None
        training.update({"data": data, "strategy": config.strategy})
    card: dict[str, Any] = {"training": training}
    source, metrics = _best_metrics(folder)
    if metrics:
        card["metrics"] = {"source": source, "values": _headline(metrics)}
    return card


def _best_metrics(folder: RunFolder) -> tuple[str | None, dict[str, Any]]:
    """The newest ``medtune evaluate`` result (bootstrap CIs) or else the run's test metrics."""
    evals = sorted(
        (folder.dir / RunFolder.EVAL).glob("*/metrics.json"), key=lambda p: p.stat().st_mtime
    )
    if evals:
        try:
            return f"evaluation {evals[-1].parent.name}", json.loads(evals[-1].read_text())
        except (OSError, ValueError):
            pass
    try:
        metrics = folder.read_metrics()
    except (MedtuneError, OSError, ValueError):
        return None, {}
    for split in ("test", "val"):
        if isinstance(metrics.get(split), dict):
            return f"{split} split", metrics[split]
    return None, {}


def _sidecar_card(model_path: Path) -> dict[str, Any]:
    """An export's card (``model.json``) says whether the model is synthetic."""
    from medtune.deploy.onnx_predictor import SIDECAR_NAME
    from medtune.evaluation.card import read_card

    folder = model_path if model_path.is_dir() else model_path.parent
    try:
        synthetic = read_card(folder / SIDECAR_NAME).synthetic
    except MedtuneError:
        synthetic = False
    return {"training": {"synthetic": synthetic}}


# ---------------------------------------------------------------------------------- web app
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
) -> FastAPI:
    """The FastAPI application: the page, its JSON endpoints, the limits and the clean-up.

    Parameters
    ----------
    screener : Screener, optional
        The workflow to serve; made from ``run`` / ``model_path`` / ``tta`` when not given.
    run, model_path, tta, operating_point
        As for :class:`Screener`.
    limits : UploadLimits, optional
        Upload limits (defaults of :class:`UploadLimits`).
    workers : int, optional
        Batches predicted at once (default 1 for a run, whose Grad-CAM serialises anyway, and
        2 for ONNX), each with ONNX Runtime threads for its share of the cores: on 2 cores, 2
        single-threaded batches ran at 19.5 ms per 224 px image against 29 ms for 2 batches
        with ONNX Runtime's default thread pool, whose spinning threads compete (measured on
        the 2-core development machine under load, efficientnet_lite0).
    host : str, default "127.0.0.1"
        The address the server binds to; on a loopback address only loopback ``Host`` headers
        are answered.

    Returns
    -------
    fastapi.FastAPI
        Routes: ``GET /`` (page), ``GET /api/model`` (model card), ``POST /api/predict``
        (multipart ``files``; optional form field ``explain=true``; JSON answer), ``POST
        /api/predict.csv`` (the CSV), ``GET /healthz``.
    """
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
    limits = limits or UploadLimits()
    workers = workers or (1 if screener.can_explain else 2)
    state = {"pending": 0}

    @asynccontextmanager
    async def lifespan(app):  # noqa: ANN001, ANN202
        app.state.limiter = anyio.CapacityLimiter(workers)
        try:
            yield
        finally:
            if owned:
                screener.close()

    app = FastAPI(
        title="medtune serve",
        version=_version(),
        docs_url=None,  # FastAPI's docs page loads Swagger UI from a CDN
        redoc_url=None,
        openapi_url=None,
        lifespan=lifespan,
    )
    app.state.screener = screener
    app.state.limits = limits
    app.state.limiter = None
    if is_loopback(host):
        app.add_middleware(TrustedHostMiddleware, allowed_hosts=list(LOOPBACK_NAMES))
    app.add_middleware(_BodyLimit, max_bytes=limits.max_request_bytes)

    def error(message: str, status: int) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=status, headers=_NO_STORE)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:  # noqa: ARG001
        detail = exc.detail if isinstance(exc.detail, str) else "request refused"
        return error(detail, exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def bad_request(request: Request, exc: RequestValidationError) -> JSONResponse:  # noqa: ARG001
        return error("malformed request; POST images as multipart form field 'files'", 400)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:  # noqa: ARG001
        log.error("internal error: %s", type(exc).__name__)  # no message: it may name files
        return error("internal error; the server log has its type", 500)

    @app.middleware("http")
    async def headers(request: Request, call_next):  # noqa: ANN001, ANN202
        response = await call_next(request)
        for key, value in _SECURITY_HEADERS.items():
            response.headers.setdefault(key, value)
        return response

    @app.get("/", response_class=HTMLResponse)
    async def page() -> HTMLResponse:
        return HTMLResponse(serve_page.HTML)

    @app.get("/page.js")
    async def script() -> Response:
        return Response(serve_page.JS, media_type="text/javascript")

    @app.get("/page.css")
    async def style() -> Response:
        return Response(serve_page.CSS, media_type="text/css")

    @app.get("/healthz")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/api/model")
    async def model_card() -> JSONResponse:
        card = {**screener.model_card(), "limits": _limits_json(limits)}
        return JSONResponse(card, headers=_NO_STORE)

    async def run_upload(request: Request) -> ScreeningResult:
        files, explain = await _read_upload(request, limits)
        if state["pending"] >= limits.max_pending:
            raise UploadRefused("the server is busy; try again in a minute", 503)
        state["pending"] += 1
        try:
            return await anyio.to_thread.run_sync(
                lambda: screener.screen(files, explain=explain), limiter=app.state.limiter
            )
        finally:
            state["pending"] -= 1

    @app.post("/api/predict")
    async def predict_json(request: Request) -> JSONResponse:
        try:
            result = await run_upload(request)
        except UploadRefused as exc:
            return error(str(exc), exc.status)
        except MedtuneError as exc:  # the model's own complaint, without server paths
            return error(str(exc).replace(str(screener.temp_root), "upload"), 422)
        return JSONResponse(result.to_json(), headers=_NO_STORE)

    @app.post("/api/predict.csv")
    async def predict_csv(request: Request) -> Response:
        try:
            result = await run_upload(request)
        except UploadRefused as exc:
            return error(str(exc), exc.status)
        except MedtuneError as exc:  # the model's own complaint, without server paths
            return error(str(exc).replace(str(screener.temp_root), "upload"), 422)
        return PlainTextResponse(result.csv, media_type="text/csv", headers=_NO_STORE)

    return app


def _threads_per_worker(workers: int) -> int:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, (cores or 1) // max(1, workers))


_NO_STORE = {"Cache-Control": "no-store"}
_SECURITY_HEADERS = {
    # Only this server's own page, script, style and data: URLs (Grad-CAM PNGs): nothing remote.
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data: blob:; "
    "object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'self'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}


def _limits_json(limits: UploadLimits) -> dict[str, Any]:
    return {
        "max_files": limits.max_files,
        "max_file_mb": limits.max_file_mb,
        "max_request_mb": limits.max_request_mb,
        "types": list(ACCEPTED_TYPES),
    }


def _version() -> str:
    from medtune.version import __version__

    return __version__


async def _read_upload(
    request: Request, limits: UploadLimits
) -> tuple[list[tuple[str, bytes]], bool]:
    """The uploaded ``files`` and the ``explain`` flag, with the count and size limits applied."""
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise UploadRefused("send the images as multipart/form-data in the field 'files'", 415)
    try:
        form = await request.form(max_files=limits.max_files, max_fields=20)
    except HTTPException as exc:
        if "files" in str(exc.detail).lower():
            raise UploadRefused(
                f"too many files: at most {limits.max_files} per request; send them in batches",
                413,
            ) from None
        raise UploadRefused(f"malformed upload ({exc.detail})", 400) from None
    try:
        uploads = [f for f in form.getlist("files") if isinstance(f, UploadFile)]
        files = []
        for i, upload in enumerate(uploads):
            name = display_name(upload.filename, i)
            if upload.size is not None and upload.size > limits.max_file_bytes:
                raise UploadRefused(
                    f"{name}: {upload.size / 2**20:.1f} MiB is over the limit of "
                    f"{limits.max_file_mb:g} MiB per image",
                    413,
                )
            files.append((upload.filename or name, await upload.read()))
        explain = str(form.get("explain", "false")).lower() in ("1", "true", "yes", "on")
    finally:
        await form.close()
    return files, explain


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


# ---------------------------------------------------------------------------------- serve
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
    log_level: str = "info",
) -> None:
    """Serve the screening page and its JSON endpoint until interrupted (Ctrl+C).

    Parameters
    ----------
    run : str or pathlib.Path, optional
        A run folder (PyTorch; the page shows Grad-CAM).
    model_path : str or pathlib.Path, optional
        An exported ``model.onnx`` (ONNX Runtime; faster, no Grad-CAM).
    host : str, default "127.0.0.1"
        Address to bind to. Loopback by default: only this computer can connect. Any other
        address exposes the page, which has no authentication, to the network.
    port : int, default 8000
    tta : {"none", "rot90"}, default "none"
    operating_point : {"sens90", "sens97.5", "youden"}, default "sens90"
        The validated threshold that sets ``refer`` (:func:`~medtune.workflows.predict.predict`).
    limits : UploadLimits, optional
    workers : int, optional
        Batches predicted at once (:func:`create_app`).
    log_level : str, default "info"
        uvicorn's log level; the access log holds method, path and status, never file names.

    Raises
    ------
    MedtuneError
        For no or both model sources, or a model that cannot be loaded.
    """
    import uvicorn

    if not is_loopback(host):
        log.warning(
            "serving on %s: anyone who can reach this address can use the page (there is no "
            "login); use 127.0.0.1 unless a reverse proxy with authentication is in front",
            host,
        )
    app = create_app(
        run=run,
        model_path=model_path,
        tta=tta,
        operating_point=operating_point,
        limits=limits,
        workers=workers,
        host=host,
    )
    shown = f"[{host}]" if ":" in host else host
    print(f"medtune serve: http://{shown}:{port}/  (Ctrl+C to stop)", flush=True)
    uvicorn.run(app, host=host, port=port, log_level=log_level, server_header=False)
