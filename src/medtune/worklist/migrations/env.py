"""Alembic's environment for the worklist (https://alembic.sqlalchemy.org).

:func:`medtune.worklist.db.open_database` runs the migrations on its own connection (passed as
``config.attributes["connection"]``); ``alembic -x url=...`` from this folder works too.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine

from medtune.worklist.models import Base

config = context.config


def run_migrations() -> None:
    """Upgrade the connection Alembic was given (or one opened from ``-x url=...``)."""
    connection = config.attributes.get("connection")
    if connection is None:
        url = context.get_x_argument(as_dictionary=True)["url"]
        with create_engine(url).begin() as conn:
            _run(conn)
    else:
        _run(connection)


def _run(connection) -> None:  # noqa: ANN001
    context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()


run_migrations()
