"""The worklist on a real PostgreSQL server (``--db postgresql://...``), started by this test in a
temporary folder when Debian's ``postgresql`` is installed (``.ci/run`` installs it), skipped
with the reason otherwise."""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import patient_photographs
from sqlalchemy import text

pytest.importorskip("psycopg", reason="psycopg is not installed (the dev extras install it)")


def _pg_bin() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).resolve().parent if initdb else None


PG_BIN = _pg_bin()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _as_postgres(args: list[str]) -> list[str]:
    """initdb refuses to run as root: run the server as Debian's ``postgres`` user then."""
    if os.geteuid() != 0:
        return args
    if shutil.which("runuser") is None:
        pytest.skip("running as root without runuser: cannot start PostgreSQL as postgres")
    return ["runuser", "-u", "postgres", "--", *args]


@pytest.fixture(scope="module")
def postgres_url() -> Iterator[str]:
    """A throw-away PostgreSQL server on 127.0.0.1 (trust authentication), stopped afterwards."""
    if PG_BIN is None:
        pytest.skip("Debian's postgresql is not installed (.ci/run installs it)")
    work = Path(tempfile.mkdtemp(prefix="medtune-pg-"))
    if os.geteuid() == 0:
        shutil.chown(work, "postgres", "postgres")
    data, port = work / "data", _free_port()
    run = {"check": True, "capture_output": True, "timeout": 120}
    subprocess.run(
        _as_postgres([str(PG_BIN / "initdb"), "-D", str(data), "-U", "postgres", "-A", "trust"]),
        **run,
    )
    options = f"-p {port} -k {work} -c listen_addresses=127.0.0.1 -c fsync=off"
    start = [str(PG_BIN / "pg_ctl"), "-D", str(data), "-o", options, "-w", "-l", str(work / "log")]
    subprocess.run(_as_postgres([*start, "start"]), **run)
    try:
        yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
    finally:
        stop = [str(PG_BIN / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"]
        subprocess.run(_as_postgres(stop), capture_output=True, timeout=120)
        shutil.rmtree(work, ignore_errors=True)


def test_worklist_on_postgresql_migrates_stores_reviews_and_stays_append_only(
    postgres_url: str, served_run: Path, tmp_path: Path
) -> None:
    from fastapi.testclient import TestClient

    from medtune.workflows.serve import create_app
    from medtune.worklist.db import open_database
    from medtune.worklist.users import Users

    db = open_database(postgres_url)
    assert db.dialect == "postgresql" and "postgres@" in db.url
    Users(db).add("ann", "correct horse battery", "admin")
    photos = patient_photographs(tmp_path / "photos")
    files = [("files", (n, p.read_bytes(), "image/jpeg")) for n, p in photos.items()]
    app = create_app(model_path=served_run.parent / "export" / "model.onnx", db=db, folder=tmp_path)
    with TestClient(app, base_url="http://127.0.0.1") as client:
        login = client.post(
            "/api/login", json={"username": "ann", "password": "correct horse battery"}
        )
        csrf = {"X-CSRF-Token": login.json()["csrf"]}
        shot = client.post("/api/predict", files=files, data={"patient": "PG-1"}, headers=csrf)
        assert shot.status_code == 200, shot.text
        sid = shot.json()["screening"]["id"]
        review = client.post(
            f"/api/screenings/{sid}/review", json={"eye": "right", "grade": 3}, headers=csrf
        )
        listed = client.get("/api/screenings", params={"patient": "PG-1"}).json()
    assert review.status_code == 200
    assert [s["id"] for s in listed["screenings"]] == [sid]
    assert {e["side"]: e["review"] for e in listed["screenings"][0]["eyes"]}["right"]["grade"] == 3
    db.close()
    again = open_database(postgres_url)  # migrating twice is a no-op; data kept
    try:
        with again.engine.connect() as conn:
            assert conn.execute(text("SELECT count(*) FROM images")).scalar() == 4
            assert conn.execute(text("SELECT version_num FROM alembic_version")).scalar() == "0002"
        for statement in ("DELETE FROM audit_log", "UPDATE reviews SET grade = 0"):
            with pytest.raises(Exception, match="append-only"), again.engine.begin() as conn:
                conn.execute(text(statement))
    finally:
        again.close()
