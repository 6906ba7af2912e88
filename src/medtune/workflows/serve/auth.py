"""Who a request is from, and whether it may do what it asks.

* A browser logs in with a password (:class:`medtune.worklist.users.Users`: Argon2id, lock-out)
  and gets a session cookie signed by Starlette's ``SessionMiddleware`` (``itsdangerous``) that
  carries only a random session id; the session itself lives in the database, so logging out or
  deleting the user ends it for every copy of the cookie. A forged or altered cookie fails the
  signature and counts as no cookie.
* A script sends ``Authorization: Bearer <token>`` (``medtune users token NAME``).
* State-changing requests from a browser session need the session's CSRF token in the
  ``X-CSRF-Token`` header (OWASP's synchroniser-token pattern; written here rather than taken
  from ``starlette-csrf``, whose double-submit cookie is not tied to a login session and so
  keeps working after logout), and any request whose ``Origin`` is another site is refused.
* With no user at all, a LOOPBACK server answers as the built-in ``local`` admin (the page works
  with no set-up on one's own computer); ``medtune serve`` refuses a non-loopback address until a
  user exists, and as soon as one exists every request needs a login or a token.

Answers: 401 without a valid session or token, 403 for a missing or stale CSRF token, a foreign
``Origin``, or a grader on an admin route.
"""

from __future__ import annotations

import hmac
import os
import secrets
from pathlib import Path
from urllib.parse import urlsplit

from fastapi import Request
from starlette.exceptions import HTTPException

from medtune.worklist.users import Identity, Users

LOCAL = Identity("local", "admin")
UNSAFE = ("POST", "PUT", "PATCH", "DELETE")


def session_key(folder: Path) -> str:
    """The key that signs session cookies: ``FOLDER/session.key`` (made once, mode 0600), so
    logins survive a restart."""
    path = folder / "session.key"
    if not path.is_file():
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(secrets.token_urlsafe(48))
    return path.read_text().strip()


def identify(request: Request) -> Identity | None:
    """The identity behind ``request``: a bearer token, else a live session, else ``local``
    when the server has no user at all (loopback only), else None."""
    users: Users = request.app.state.serve.users
    header = request.headers.get("authorization", "")
    if header.lower().startswith("bearer "):
        return users.token(header[7:].strip())
    sid = request.session.get("sid") if "session" in request.scope else None
    if isinstance(sid, str):
        found = users.session(sid)
        if found is not None:
            return found
    if request.app.state.serve.open_without_users and users.count() == 0:
        return LOCAL
    return None


def require_user(request: Request) -> Identity:
    """FastAPI dependency: the identity, with the CSRF and ``Origin`` checks of unsafe methods.

    Raises
    ------
    starlette.exceptions.HTTPException
        401 without a valid session or token; 403 for a cross-site ``Origin`` or a session
        request without its CSRF token.
    """
    check_origin(request)
    who = identify(request)
    if who is None:
        raise HTTPException(401, "log in first (or send Authorization: Bearer <token>)")
    if request.method in UNSAFE and who.session_id is not None:
        sent = request.headers.get("x-csrf-token", "")
        if not (sent and who.csrf and hmac.compare_digest(sent, who.csrf)):
            raise HTTPException(403, "missing or stale CSRF token; reload the page")
    request.state.identity = who
    return who


def require_admin(request: Request) -> Identity:
    """FastAPI dependency: as :func:`require_user`, and the user is an admin (else 403)."""
    who = require_user(request)
    if not who.is_admin:
        raise HTTPException(403, "admins only")
    return who


def check_origin(request: Request) -> None:
    """Refuse an unsafe request a browser sent from another site (its ``Origin`` header names
    another host than the one asked), session or not."""
    origin = request.headers.get("origin")
    if request.method not in UNSAFE or not origin:
        return
    host = request.headers.get("host", "")
    if origin == "null" or urlsplit(origin).netloc != host:
        raise HTTPException(403, "cross-site request refused")
