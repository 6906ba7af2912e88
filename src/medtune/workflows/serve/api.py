"""The routes of ``medtune serve`` (a FastAPI ``APIRouter``; the app is made in
:mod:`medtune.workflows.serve.app`).

Public: ``GET /`` with ``/page.js`` and ``/page.css`` (the page), ``GET /healthz``,
``GET /api/session``, ``POST /api/login``. Everything else needs a login or a token
(:mod:`medtune.workflows.serve.auth`); ``/api/admin/*`` needs an admin.
"""

from __future__ import annotations

import datetime as dt
import logging
from typing import Annotated, Any

import anyio
from fastapi import APIRouter, Depends, Request
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from pydantic import BaseModel, Field
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException

from medtune.config import ROLES
from medtune.errors import MedtuneError
from medtune.workflows.serve import page
from medtune.workflows.serve.auth import check_origin, require_admin, require_user
from medtune.workflows.serve.screening import (
    ACCEPTED_TYPES,
    ScreeningResult,
    UploadLimits,
    UploadRefused,
    display_name,
    patient_screening,
)
from medtune.worklist.store import Filters
from medtune.worklist.users import Identity, LoginRefused

log = logging.getLogger("medtune.serve")
router = APIRouter()
#: The caller (401 without a session or token; CSRF checked on unsafe methods).
UserDep = Annotated[Identity, Depends(require_user)]
#: The caller, an admin (403 for a grader).
AdminDep = Annotated[Identity, Depends(require_admin)]
NO_STORE = {"Cache-Control": "no-store"}


def error(message: str, status: int) -> JSONResponse:
    """The one error answer: ``{"error": one line}``."""
    return JSONResponse({"error": message}, status_code=status, headers=NO_STORE)


# ------------------------------------------------------------------------------ page
@router.get("/", response_class=HTMLResponse)
async def index() -> HTMLResponse:
    return HTMLResponse(page.HTML)


@router.get("/page.js")
async def script() -> Response:
    return Response(page.JS, media_type="text/javascript")


@router.get("/page.css")
async def style() -> Response:
    return Response(page.CSS, media_type="text/css")


@router.get("/healthz")
async def health() -> dict[str, str]:
    return {"status": "ok"}


# ------------------------------------------------------------------------------ logins
class Login(BaseModel):
    username: str = Field(max_length=64)
    password: str = Field(max_length=1024)


@router.get("/api/session")
def session_info(request: Request) -> JSONResponse:
    """``{"user", "role", "csrf", "login_required"}`` (user null when not logged in)."""
    from medtune.workflows.serve.auth import identify

    who = identify(request)
    body = {
        "user": None if who is None else who.username,
        "role": None if who is None else who.role,
        "csrf": None if who is None else who.csrf,
        "login_required": who is None,
    }
    return JSONResponse(body, headers=NO_STORE)


@router.post("/api/login")
def login(request: Request, body: Login) -> JSONResponse:
    """Log in with JSON ``{"username", "password"}`` (JSON only: a cross-site form cannot send
    it without a CORS preflight, which this server never grants)."""
    check_origin(request)
    users = request.app.state.serve.users
    try:
        who = users.login(body.username, body.password)
    except LoginRefused as exc:
        return error(str(exc), 401)
    request.session.clear()
    request.session["sid"] = who.session_id
    return JSONResponse(
        {"user": who.username, "role": who.role, "csrf": who.csrf}, headers=NO_STORE
    )


@router.post("/api/logout")
def logout(request: Request, who: UserDep) -> JSONResponse:
    if who.session_id is not None:
        request.app.state.serve.users.logout(who.session_id)
    request.session.clear()
    return JSONResponse({"user": None}, headers=NO_STORE)


# ------------------------------------------------------------------------------ model
@router.get("/api/model")
def model_card(request: Request, who: UserDep) -> JSONResponse:
    state = request.app.state.serve
    card = {**state.screener.model_card(), "limits": limits_json(state.limits)}
    card["keep_images"] = state.worklist.images_dir is not None
    return JSONResponse(card, headers=NO_STORE)


def limits_json(limits: UploadLimits) -> dict[str, Any]:
    return {
        "max_files": limits.max_files,
        "max_file_mb": limits.max_file_mb,
        "max_request_mb": limits.max_request_mb,
        "types": list(ACCEPTED_TYPES),
    }


# ------------------------------------------------------------------------------ screening
@router.post("/api/predict")
async def predict_json(request: Request, who: UserDep) -> Response:
    """Screen a patient's photographs (multipart ``files``; optional ``patient``, one ``eye``
    per file, ``explain=true``); the answer carries the rows, the unreadable files, the eyes,
    the patient-level referral and the stored screening's id. A refused upload answers its
    status (:class:`UploadRefused`), the model's own complaint 422 (handlers in ``app``)."""
    result, summary = await _screen(request, who)
    return JSONResponse({**result.to_json(), "screening": summary}, headers=NO_STORE)


@router.post("/api/predict.csv")
async def predict_csv(request: Request, who: UserDep) -> Response:
    """As ``/api/predict``, answered with ``medtune predict``'s CSV."""
    result, _ = await _screen(request, who)
    return PlainTextResponse(result.csv, media_type="text/csv", headers=NO_STORE)


async def _screen(request: Request, who: Identity) -> tuple[ScreeningResult, dict[str, Any]]:
    state = request.app.state.serve
    form = await read_upload(request, state.limits)
    if state.pending >= state.limits.max_pending:
        raise UploadRefused("the server is busy; try again in a minute", 503)
    state.pending += 1
    try:
        return await anyio.to_thread.run_sync(
            lambda: _screen_and_store(state, form, who), limiter=state.limiter
        )
    finally:
        state.pending -= 1


def _screen_and_store(state: Any, form: dict[str, Any], who: Identity) -> tuple:
    result = state.screener.screen(form["files"], explain=form["explain"])
    new, summary = patient_screening(
        state.screener, result, form["files"], form["patient"], form["eyes"]
    )
    summary["id"] = state.worklist.add_screening(new, who.username)
    return result, summary


async def read_upload(request: Request, limits: UploadLimits) -> dict[str, Any]:
    """``files`` (name, bytes), ``eyes`` (one per file, may be empty), ``patient`` and
    ``explain`` from a multipart request, with the count and size limits applied."""
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise UploadRefused("send the images as multipart/form-data in the field 'files'", 415)
    try:
        form = await request.form(max_files=limits.max_files, max_fields=limits.max_files + 20)
    except HTTPException as exc:
        if "files" in str(exc.detail).lower():
            raise UploadRefused(
                f"too many files: at most {limits.max_files} per request; send them in batches",
                413,
            ) from None
        raise UploadRefused(f"malformed upload ({exc.detail})", 400) from None
    try:
        files = []
        for i, upload in enumerate(f for f in form.getlist("files") if isinstance(f, UploadFile)):
            name = display_name(upload.filename, i)
            if upload.size is not None and upload.size > limits.max_file_bytes:
                raise UploadRefused(
                    f"{name}: {upload.size / 2**20:.1f} MiB is over the limit of "
                    f"{limits.max_file_mb:g} MiB per image",
                    413,
                )
            files.append((upload.filename or name, await upload.read()))
        return {
            "files": files,
            "eyes": [str(e) for e in form.getlist("eye")],
            "patient": str(form.get("patient") or ""),
            "explain": str(form.get("explain", "false")).lower() in ("1", "true", "yes", "on"),
        }
    finally:
        await form.close()


# ------------------------------------------------------------------------------ worklist
def _filters(request: Request) -> Filters:
    q = request.query_params
    try:
        since = dt.date.fromisoformat(q["since"]) if q.get("since") else None
        until = dt.date.fromisoformat(q["until"]) if q.get("until") else None
    except ValueError:
        raise HTTPException(400, "dates are YYYY-MM-DD") from None
    return Filters(
        referral=q.get("referral") or None,
        quality=q.get("quality") or None,
        patient=q.get("patient") or None,
        since=since,
        until=until,
    )


@router.get("/api/screenings")
def list_screenings(request: Request, who: UserDep) -> JSONResponse:
    """Past screenings, newest first; filters ``referral``, ``quality``, ``patient``,
    ``since``/``until`` (UTC dates, inclusive)."""
    worklist = request.app.state.serve.worklist
    rows = worklist.list(_filters(request))
    worklist.audit(who.username, "list", "", f"{len(rows)} screening(s)")
    return JSONResponse({"screenings": rows}, headers=NO_STORE)


@router.get("/api/screenings.csv")
def export_screenings(request: Request, who: UserDep) -> Response:
    """One CSV line per eye of the screenings in the filters' date range."""
    worklist = request.app.state.serve.worklist
    filters = _filters(request)
    text = worklist.export_csv(filters)
    worklist.audit(who.username, "export", "", f"{filters.since} to {filters.until}")
    headers = {**NO_STORE, "Content-Disposition": 'attachment; filename="worklist.csv"'}
    return PlainTextResponse(text, media_type="text/csv", headers=headers)


@router.get("/api/screenings/{screening_id}")
def open_screening(screening_id: str, request: Request, who: UserDep) -> JSONResponse:
    worklist = request.app.state.serve.worklist
    try:
        found = worklist.get(screening_id)
    except LookupError:
        return error("no such screening", 404)
    worklist.audit(who.username, "view", screening_id, "")
    return JSONResponse(found, headers=NO_STORE)


class ReviewIn(BaseModel):
    eye: str = Field(max_length=16)
    grade: int


@router.post("/api/screenings/{screening_id}/review")
def review(screening_id: str, body: ReviewIn, request: Request, who: UserDep) -> JSONResponse:
    """A grader's grade for one eye (``{"eye": "left", "grade": 1}``); the model's stays."""
    try:
        found = request.app.state.serve.worklist.review(
            screening_id, body.eye, body.grade, who.username
        )
    except LookupError:
        return error("no such screening", 404)
    except MedtuneError as exc:
        return error(str(exc), 422)
    return JSONResponse(found, headers=NO_STORE)


# ------------------------------------------------------------------------------ admin
class UserIn(BaseModel):
    username: str = Field(max_length=64)
    password: str = Field(max_length=1024)
    role: str = Field(default="grader", max_length=16)


@router.get("/api/admin/users")
def list_users(request: Request, who: AdminDep) -> JSONResponse:
    return JSONResponse({"users": request.app.state.serve.users.list(), "roles": list(ROLES)})


@router.post("/api/admin/users")
def add_user(body: UserIn, request: Request, who: AdminDep) -> Response:
    try:
        request.app.state.serve.users.add(body.username, body.password, body.role, by=who.username)
    except MedtuneError as exc:
        return error(str(exc), 422)
    return JSONResponse({"users": request.app.state.serve.users.list()}, headers=NO_STORE)


@router.delete("/api/admin/users/{username}")
def delete_user(username: str, request: Request, who: AdminDep) -> Response:
    try:
        request.app.state.serve.users.delete(username, by=who.username)
    except MedtuneError as exc:
        return error(str(exc), 404)
    return JSONResponse({"users": request.app.state.serve.users.list()}, headers=NO_STORE)


@router.get("/api/admin/audit")
def audit_log(request: Request, who: AdminDep) -> JSONResponse:
    return JSONResponse(
        {"audit": request.app.state.serve.worklist.audit_entries()}, headers=NO_STORE
    )
