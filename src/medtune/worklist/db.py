"""Opening the worklist database: SQLite in the user's data folder by default, PostgreSQL (or any
SQLAlchemy URL) when given, always migrated to the newest schema by Alembic first.

SQLite runs in WAL mode with ``synchronous=FULL``: a committed screening survives a killed server
(and a power cut), and readers never wait for the writer.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from medtune.errors import MedtuneError

MIGRATIONS = Path(__file__).resolve().parent / "migrations"
DB_FILE = "worklist.sqlite"


def data_dir(folder: str | os.PathLike[str] | None = None) -> Path:
    """The folder for the worklist database, the session key and the kept images.

    Parameters
    ----------
    folder : path, optional
        An explicit folder; else ``$MEDTUNE_DATA``; else the user's data folder
        (``platformdirs.user_data_dir("medtune")``: ``~/.local/share/medtune`` on Linux).

    Returns
    -------
    pathlib.Path
        The folder (created, mode 0700).
    """
    if folder is None:
        folder = os.environ.get("MEDTUNE_DATA")
    if folder is None:
        import platformdirs

        folder = platformdirs.user_data_dir("medtune", appauthor=False)
    path = Path(folder).expanduser()
    try:
        path.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as err:
        raise MedtuneError(
            f"{path}: cannot create the data folder ({err.strerror}); give --data-dir"
        ) from None
    return path


def default_url(folder: str | os.PathLike[str] | None = None) -> str:
    """``sqlite:///<data folder>/worklist.sqlite`` (:func:`data_dir`)."""
    return f"sqlite:///{data_dir(folder) / DB_FILE}"


@dataclass
class Database:
    """An open, migrated worklist database.

    Attributes
    ----------
    url : str
        The SQLAlchemy URL, password hidden (for messages).
    engine : sqlalchemy.Engine
    session : sqlalchemy.orm.sessionmaker
        ``with db.session.begin() as s: ...`` commits or rolls back as one transaction.
    """

    url: str
    engine: Engine
    session: sessionmaker[Session]

    @property
    def dialect(self) -> str:
        """``sqlite`` or ``postgresql``."""
        return self.engine.dialect.name

    def close(self) -> None:
        """Close every pooled connection."""
        self.engine.dispose()


def open_database(
    url: str | None = None, *, folder: str | os.PathLike[str] | None = None
) -> Database:
    """Open the worklist database and upgrade its schema to the newest migration.

    Parameters
    ----------
    url : str, optional
        A SQLAlchemy URL (``postgresql://user:pw@host/db``, ``sqlite:///path``); default
        :func:`default_url` of ``folder``.
    folder : path, optional
        The data folder for the default SQLite file (:func:`data_dir`).

    Returns
    -------
    Database

    Raises
    ------
    MedtuneError
        When the URL is malformed, its driver is missing, or the server cannot be reached.
    """
    url = url or default_url(folder)
    try:
        engine = _engine(url)
        shown = engine.url.render_as_string(hide_password=True)
        _upgrade(engine)
    except (SQLAlchemyError, ImportError, ValueError) as err:
        shown = url.split("@")[-1] if "@" in url else url
        raise MedtuneError(
            f"worklist database {shown}: {type(err).__name__}: {_first_line(err)}; check --db "
            "(postgresql://user:password@host/name needs the server up and psycopg installed)"
        ) from None
    return Database(shown, engine, sessionmaker(engine, expire_on_commit=False))


def _engine(url: str) -> Engine:
    if url.startswith("postgresql://"):  # psycopg 3 (the maintained driver), not psycopg2
        url = "postgresql+psycopg://" + url[len("postgresql://") :]
    engine = create_engine(url, pool_pre_ping=True)
    if engine.dialect.name == "sqlite":
        event.listen(engine, "connect", _sqlite_pragmas)
    return engine


def _sqlite_pragmas(dbapi_connection, _record) -> None:  # noqa: ANN001
    cursor = dbapi_connection.cursor()
    for pragma in (
        "journal_mode=WAL",
        "synchronous=FULL",
        "foreign_keys=ON",
        "busy_timeout=30000",
    ):
        cursor.execute(f"PRAGMA {pragma}")
    cursor.close()


def _upgrade(engine: Engine) -> None:
    """``alembic upgrade head`` on ``engine`` (Alembic's command API)."""
    from alembic import command
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    with engine.begin() as connection:
        if engine.dialect.name == "postgresql":  # one migrator at a time across processes
            connection.execute(text("SELECT pg_advisory_xact_lock(727100)"))
        config.attributes["connection"] = connection
        command.upgrade(config, "head")


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [""])[0][:200]
