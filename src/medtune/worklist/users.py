"""Users, passwords, login sessions and API tokens of the worklist.

Passwords are hashed with Argon2id (``argon2-cffi``, RFC 9106); an account is locked for
:data:`LOCK_MINUTES` after :data:`MAX_FAILURES` failed logins in a row (OWASP Authentication
Cheat Sheet, "Account lockout"). Sessions and tokens are random 256-bit values
(:func:`secrets.token_urlsafe`); a token is stored only as its SHA-256, so a copy of the database
does not hand out working tokens. A deleted user keeps their row (the worklist and the audit
name them), loses their sessions and tokens at once, and can no longer log in.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import re
import secrets
from dataclasses import dataclass

from sqlalchemy import delete, select

from medtune.config import ROLES
from medtune.errors import MedtuneError
from medtune.worklist.db import Database
from medtune.worklist.models import ApiToken, AuditEntry, LoginSession, User, utcnow

MAX_FAILURES = 5
LOCK_MINUTES = 15
SESSION_HOURS = 12
MIN_PASSWORD = 10
TOKEN_PREFIX = "mt_"
_USERNAME = re.compile(r"^[A-Za-z0-9_.@-]{1,64}$")


@dataclass(frozen=True)
class Identity:
    """Who a request is from."""

    username: str
    role: str
    session_id: str | None = None
    csrf: str | None = None

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"


class LoginRefused(MedtuneError):
    """A refused login (wrong name or password, or a locked account); one message for both
    unknown names and wrong passwords, so the answer does not tell which names exist."""


def _hasher():  # noqa: ANN202
    from argon2 import PasswordHasher

    return PasswordHasher()  # argon2-cffi's defaults: RFC 9106's low-memory profile


def _sha(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()


def _aware(value: dt.datetime | None) -> dt.datetime | None:
    if value is not None and value.tzinfo is None:  # SQLite: stored as UTC, read back naive
        return value.replace(tzinfo=dt.timezone.utc)
    return value


class Users:
    """User accounts, sessions and tokens in a worklist :class:`Database`."""

    def __init__(self, db: Database) -> None:
        self.db = db

    # ------------------------------------------------------------------ accounts
    def add(self, username: str, password: str, role: str = "grader", *, by: str = "cli") -> None:
        """Create a user.

        Raises
        ------
        MedtuneError
            For a malformed or taken name, an unknown role, or a password under
            :data:`MIN_PASSWORD` characters.
        """
        if not _USERNAME.match(username or ""):
            raise MedtuneError(
                f"user name {username!r}: use 1-64 letters, digits or _ . @ - characters"
            )
        if role not in ROLES:
            raise MedtuneError(f"role {role!r} is unknown; use one of {', '.join(ROLES)}")
        if len(password or "") < MIN_PASSWORD:
            raise MedtuneError(f"the password needs at least {MIN_PASSWORD} characters")
        digest = _hasher().hash(password)
        with self.db.session.begin() as s:
            if s.scalar(select(User).where(User.username == username)) is not None:
                raise MedtuneError(f"user {username!r} exists; choose another name")
            s.add(User(username=username, password_hash=digest, role=role, failed_logins=0))
            s.add(_entry(by, "user_add", username, role))

    def delete(self, username: str, *, by: str = "cli") -> None:
        """Delete a user: their sessions and tokens stop working at once.

        Raises
        ------
        MedtuneError
            When no such (undeleted) user exists.
        """
        with self.db.session.begin() as s:
            user = self._active(s, username)
            if user is None:
                raise MedtuneError(f"no user {username!r}; `medtune users list` shows them")
            user.deleted_at = utcnow()
            s.execute(delete(ApiToken).where(ApiToken.user_id == user.id))
            s.execute(delete(LoginSession).where(LoginSession.user_id == user.id))
            s.add(_entry(by, "user_delete", username, ""))

    def list(self) -> list[dict[str, str]]:
        """``[{"username", "role", "created"}]`` of the users not deleted."""
        with self.db.session() as s:
            users = s.scalars(select(User).where(User.deleted_at.is_(None)).order_by(User.id))
            return [
                {"username": u.username, "role": u.role, "created": u.created_at.isoformat()}
                for u in users
            ]

    def count(self) -> int:
        """How many users can log in."""
        return len(self.list())

    @staticmethod
    def _active(s, username: str) -> User | None:  # noqa: ANN001
        query = select(User).where(User.username == username, User.deleted_at.is_(None))
        return s.scalar(query)

    # ------------------------------------------------------------------ logins
    def login(self, username: str, password: str) -> Identity:
        """Check a password and open a session.

        Returns
        -------
        Identity
            With a new ``session_id`` and ``csrf`` token.

        Raises
        ------
        LoginRefused
            For an unknown user, a wrong password or a locked account.
        """
        now = utcnow()
        with self.db.session.begin() as s:  # the failure is recorded, then refused
            user = self._active(s, username)
            refusal = self._refusal(s, user, username, password, now)
            if refusal is None:
                user.failed_logins, user.locked_until = 0, None
                sid, csrf = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
                expires = now + dt.timedelta(hours=SESSION_HOURS)
                s.add(LoginSession(id=_sha(sid), user_id=user.id, csrf=csrf, expires_at=expires))
                s.add(_entry(username, "login", "", ""))
                identity = Identity(user.username, user.role, sid, csrf)
        if refusal is not None:
            raise LoginRefused(refusal)
        return identity

    def _refusal(self, s, user: User | None, username: str, password: str, now) -> str | None:  # noqa: ANN001
        """Why a login is refused (the failure counted and audited), or None."""
        if user is None:
            _hasher().hash(password or "x")  # same time as a real check: names stay secret
            s.add(_entry(username[:64], "login_failed", "", "unknown user"))
            return "wrong user name or password"
        locked = _aware(user.locked_until)
        if locked is not None and locked > now:
            s.add(_entry(username, "login_refused", "", "locked"))
            return (
                f"account locked after {MAX_FAILURES} failed logins; try again after "
                f"{locked:%H:%M} UTC or ask an admin"
            )
        if not self._verify(user, password):
            user.failed_logins += 1
            if user.failed_logins >= MAX_FAILURES:
                user.locked_until = now + dt.timedelta(minutes=LOCK_MINUTES)
                user.failed_logins = 0
            s.add(_entry(username, "login_failed", "", "wrong password"))
            return "wrong user name or password"
        return None

    @staticmethod
    def _verify(user: User, password: str) -> bool:
        from argon2.exceptions import VerificationError

        try:
            return _hasher().verify(user.password_hash, password or "")
        except VerificationError:
            return False

    def session(self, sid: str) -> Identity | None:
        """The identity of a live session id (None: unknown, expired or logged out)."""
        with self.db.session() as s:
            row = s.get(LoginSession, _sha(sid))
            if row is None or _aware(row.expires_at) <= utcnow():
                return None
            user = s.get(User, row.user_id)
            if user is None or user.deleted_at is not None:
                return None
            return Identity(user.username, user.role, sid, row.csrf)

    def logout(self, sid: str) -> None:
        """End a session (its cookie stops working, its CSRF token too)."""
        with self.db.session.begin() as s:
            row = s.get(LoginSession, _sha(sid))
            if row is not None:
                user = s.get(User, row.user_id)
                s.delete(row)
                s.add(_entry(user.username if user else "?", "logout", "", ""))

    # ------------------------------------------------------------------ tokens
    def new_token(self, username: str, label: str = "", *, by: str = "cli") -> str:
        """A new API token for ``username`` (shown once; only its hash is kept).

        Raises
        ------
        MedtuneError
            When no such user exists.
        """
        token = TOKEN_PREFIX + secrets.token_urlsafe(32)
        with self.db.session.begin() as s:
            user = self._active(s, username)
            if user is None:
                raise MedtuneError(f"no user {username!r}; add one with `medtune users add`")
            s.add(ApiToken(user_id=user.id, token_hash=_sha(token), label=label[:64]))
            s.add(_entry(by, "token_new", username, label[:64]))
        return token

    def token(self, token: str) -> Identity | None:
        """The identity a bearer token stands for (None: unknown, revoked, or its user deleted)."""
        with self.db.session() as s:
            row = s.scalar(select(ApiToken).where(ApiToken.token_hash == _sha(token)))
            if row is None:
                return None
            user = s.get(User, row.user_id)
            if user is None or user.deleted_at is not None:
                return None
            return Identity(user.username, user.role)


def _entry(username: str, action: str, target: str, detail: str) -> AuditEntry:
    return AuditEntry(at=utcnow(), username=username, action=action, target=target, detail=detail)
