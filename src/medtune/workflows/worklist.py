"""``medtune users`` and ``medtune worklist``: the accounts of ``medtune serve`` and what its
worklist holds, from the command line or Python.

Each function opens the worklist database (default SQLite in the data folder,
:func:`medtune.worklist.db.open_database`), does one thing in one transaction, and closes it.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

from medtune.io import write_text
from medtune.worklist.db import data_dir, open_database
from medtune.worklist.store import Filters, Worklist
from medtune.worklist.users import Users

IMAGES = "images"


def add_user(
    username: str,
    password: str,
    role: str = "grader",
    *,
    db: str | None = None,
    folder: str | Path | None = None,
) -> None:
    """Create a user of ``medtune serve``.

    Parameters
    ----------
    username : str
        1-64 letters, digits or ``_ . @ -``.
    password : str
        At least 10 characters (hashed with Argon2id; never stored).
    role : {"grader", "admin"}, default "grader"
        Graders screen, review and export; admins also manage users and read the audit log.
    db : str, optional
        The worklist database URL (default SQLite in ``folder``).
    folder : path, optional
        The data folder (default ``$MEDTUNE_DATA`` or the user's data folder).

    Raises
    ------
    MedtuneError
        For a taken or malformed name, an unknown role, a short password, or a database that
        cannot be opened.
    """
    database = open_database(db, folder=folder)
    try:
        Users(database).add(username, password, role)
    finally:
        database.close()


def delete_user(username: str, *, db: str | None = None, folder: str | Path | None = None) -> None:
    """Delete a user: their sessions and API tokens stop working at once (the worklist and the
    audit log keep their name). Parameters and errors as :func:`add_user`."""
    database = open_database(db, folder=folder)
    try:
        Users(database).delete(username)
    finally:
        database.close()


def list_users(*, db: str | None = None, folder: str | Path | None = None) -> list[dict[str, str]]:
    """The users who can log in: ``[{"username", "role", "created"}]``."""
    database = open_database(db, folder=folder)
    try:
        return Users(database).list()
    finally:
        database.close()


def new_token(
    username: str, label: str = "", *, db: str | None = None, folder: str | Path | None = None
) -> str:
    """A new API token for scripts calling ``/api/predict`` as ``username``
    (``Authorization: Bearer <token>``); shown once, only its SHA-256 is kept."""
    database = open_database(db, folder=folder)
    try:
        return Users(database).new_token(username, label)
    finally:
        database.close()


def export_worklist(
    out: str | Path,
    *,
    reviewed: bool = False,
    since: dt.date | None = None,
    until: dt.date | None = None,
    db: str | None = None,
    folder: str | Path | None = None,
) -> dict[str, Any]:
    """Export the worklist.

    Parameters
    ----------
    out : path
        The output folder.
    reviewed : bool, default False
        Write the reviewed photographs with the graders' grades as a labelled set
        (``OUT/labels.csv`` + ``OUT/images/``) that ``medtune train --data OUT`` and
        ``medtune adapt --labels OUT`` read; needs photographs kept (``serve --keep-images``).
        Without it: ``OUT/worklist.csv``, one line per eye of the screenings in the dates.
    since, until : datetime.date, optional
        The UTC days (inclusive) of the CSV export.
    db, folder
        As :func:`add_user`.

    Returns
    -------
    dict
        ``{"path": what was written, "count": photographs or screenings' eyes}``.

    Raises
    ------
    MedtuneError
        When no photograph was kept or none was reviewed (``reviewed``), or the database cannot
        be opened.
    """
    base = data_dir(folder)
    database = open_database(db, folder=base)
    try:
        images = base / IMAGES
        worklist = Worklist(database, images if images.is_dir() else None)
        if reviewed:
            count = worklist.export_reviewed(out)
            worklist.audit("cli", "export_reviewed", "", f"{count} image(s)")
            return {"path": str(Path(out) / "labels.csv"), "count": count}
        text = worklist.export_csv(Filters(since=since, until=until, limit=10**9))
        write_text(Path(out) / "worklist.csv", text)
        worklist.audit("cli", "export", "", f"{since} to {until}")
        return {"path": str(Path(out) / "worklist.csv"), "count": text.count("\n") - 1}
    finally:
        database.close()
