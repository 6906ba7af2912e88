"""The worklist behind ``medtune serve``: patients and eyes, every screening stored once, graders'
reviews kept beside the model's answers, exports that training reads, and the logins, roles,
tokens, CSRF tokens and audit log that guard it (security tests: SQL injection strings, forged
cookies, replayed CSRF tokens, path traversal in upload names, a deleted user's token)."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import pytest
from conftest import patient_photographs
from sqlalchemy import func, select, text

from medtune.cli.main import main
from medtune.errors import MedtuneError

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from medtune.workflows.serve import create_app, serve  # noqa: E402
from medtune.worklist.db import open_database  # noqa: E402
from medtune.worklist.models import AuditEntry, ImageRecord, Review, Screening  # noqa: E402
from medtune.worklist.users import MAX_FAILURES, Users  # noqa: E402

BASE = "http://127.0.0.1"
ADMIN, GRADER, PASSWORD = "ann", "gus", "correct horse battery"
INJECTIONS = [
    "'; DROP TABLE screenings; --",
    "x' OR '1'='1",
    'Robert"); DELETE FROM users; --',
    "1; UPDATE users SET role='admin'",
]


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """A data folder with an admin and a grader."""
    data = tmp_path / "data"
    db = open_database(folder=data)
    users = Users(db)
    users.add(ADMIN, PASSWORD, "admin")
    users.add(GRADER, PASSWORD, "grader")
    db.close()
    return data


@pytest.fixture
def photos(tmp_path: Path) -> dict[str, Path]:
    return patient_photographs(tmp_path / "photos")


def app_for(served_run: Path, folder: Path, **kw):  # noqa: ANN201
    return create_app(model_path=served_run.parent / "export" / "model.onnx", folder=folder, **kw)


def log_in(client: TestClient, user: str = ADMIN, password: str = PASSWORD) -> str:
    res = client.post("/api/login", json={"username": user, "password": password})
    assert res.status_code == 200, res.text
    return res.json()["csrf"]


def patient_upload(photos: dict[str, Path], patient: str = "P-17") -> dict:
    files = [("files", (n, p.read_bytes(), "image/jpeg")) for n, p in photos.items()]
    return {"files": files, "data": {"patient": patient}}


def rows_in(folder: Path, table) -> int:  # noqa: ANN001
    db = open_database(folder=folder)
    try:
        with db.session() as s:
            return int(s.scalar(select(func.count()).select_from(table)))
    finally:
        db.close()


# ------------------------------------------------------------------------------ patients
def test_a_patient_screened_per_eye_and_per_patient_stored_reviewed_and_exported(
    served_run: Path, folder: Path, photos: dict[str, Path], tmp_path: Path
) -> None:
    with TestClient(app_for(served_run, folder, keep_images=True), base_url=BASE) as client:
        csrf = log_in(client, GRADER)
        res = client.post("/api/predict", headers={"X-CSRF-Token": csrf}, **patient_upload(photos))
        assert res.status_code == 200, res.text
        body = res.json()
        shot = body["screening"]
        assert shot["sides"] == ["right", "right", "left", "left"]  # from the file names
        quality = {r["image"]: r["quality"] for r in body["rows"]}
        assert quality["p17_left_2.jpg"] == "ungradable"
        assert quality["p17_left_1.jpg"] == quality["p17_right_1.jpg"] == "gradable"
        eyes = {e["side"]: e for e in shot["eyes"]}
        rows = {r["image"]: r for r in body["rows"]}
        # per eye: the highest grade of its GRADABLE photographs only
        assert eyes["left"]["grade"] == rows["p17_left_1.jpg"]["grade"]
        right = max(rows["p17_right_1.jpg"]["grade"], rows["p17_right_2.jpg"]["grade"])
        assert eyes["right"]["grade"] == right
        flags = {e["refer"] for e in shot["eyes"]}
        expected = "refer" if "yes" in flags else "no_refer"
        assert shot["referral"] == expected and shot["quality"] == "gradable"

        stored = client.get(f"/api/screenings/{shot['id']}").json()
        assert stored["patient"] == "P-17" and len(stored["images"]) == 4
        assert all(len(i["sha256"]) == 64 and i["stored"] for i in stored["images"])
        new_grade = (eyes["left"]["grade"] + 1) % 5
        reviewed = client.post(
            f"/api/screenings/{shot['id']}/review",
            json={"eye": "left", "grade": new_grade},
            headers={"X-CSRF-Token": csrf},
        ).json()
        left = {e["side"]: e for e in reviewed["eyes"]}["left"]
        assert left["grade"] == eyes["left"]["grade"]  # the model's answer is kept
        assert left["review"]["grade"] == new_grade and left["review"]["by"] == GRADER
        export = client.get("/api/screenings.csv").text
    lines = {r["eye"]: r for r in csv.DictReader(io.StringIO(export))}
    assert lines["left"]["reviewed_grade"] == str(new_grade)
    assert lines["left"]["model_grade"] == str(eyes["left"]["grade"])
    assert lines["right"]["reviewed_grade"] == ""

    out = tmp_path / "labelled"
    argv = ["worklist", "export", "--reviewed", "--out", str(out), "--data-dir", str(folder)]
    assert main(argv) == 0
    from medtune.data import load_imageset

    labelled = load_imageset(out, classes=["0", "1", "2", "3", "4"])  # as adapt --labels does
    assert len(labelled.keys) == 1  # the left eye's gradable photograph, not the blurred one
    assert labelled.class_names[int(labelled.labels[0])] == str(new_grade)
    assert not any(Path(out).rglob("*left_2*"))


def test_one_bad_file_does_not_refuse_the_batch_on_the_api_and_the_csv(
    served_run: Path, folder: Path, photos: dict[str, Path]
) -> None:
    """Issue 23, item 8: the readable photographs are screened, the others listed with why."""
    good = photos["p17_right_1.jpg"].read_bytes()
    files = [
        ("files", ("notes.txt", b"patient notes", "text/plain")),
        ("files", ("broken.png", b"\x89PNG\r\n\x1a\n" + b"\0" * 64, "image/png")),
        ("files", ("good_right.jpg", good, "image/jpeg")),
    ]
    with TestClient(app_for(served_run, folder), base_url=BASE) as client:
        csrf = {"X-CSRF-Token": log_in(client)}
        res = client.post("/api/predict", files=files, headers=csrf)
        csv_res = client.post("/api/predict.csv", files=files, headers=csrf)
        none_readable = client.post("/api/predict", files=files[:2], headers=csrf)
    assert res.status_code == 200, res.text
    body = res.json()
    assert [r["image"] for r in body["rows"]] == ["good_right.jpg"]
    reasons = {s["image"]: s["reason"] for s in body["skipped"]}
    assert set(reasons) == {"notes.txt", "broken.png"}
    assert "not a JPEG, PNG, TIFF or DICOM" in reasons["notes.txt"]
    assert (
        "cannot read image" in reasons["broken.png"] and "--skip-bad" not in reasons["broken.png"]
    )
    assert body["screening"]["eyes"][0]["side"] == "right"
    assert csv_res.status_code == 200 and csv_res.text.count("\n") == 2
    assert none_readable.status_code == 415
    assert "notes.txt" in none_readable.json()["error"]
    assert "broken.png" in none_readable.json()["error"]


def test_screenings_survive_a_restart_and_filter_by_referral_quality_and_date(
    served_run: Path, folder: Path, photos: dict[str, Path]
) -> None:
    with TestClient(app_for(served_run, folder), base_url=BASE) as client:
        csrf = {"X-CSRF-Token": log_in(client)}
        for patient in ("A-1", "A-2"):
            upload = patient_upload(photos, patient)
            assert client.post("/api/predict", headers=csrf, **upload).status_code == 200
        blurred = {"p17_left_2.jpg": photos["p17_left_2.jpg"]}
        assert client.post("/api/predict", headers=csrf, **patient_upload(blurred, "B-1"))
    with TestClient(app_for(served_run, folder), base_url=BASE) as client:  # a new server
        log_in(client)
        listed = client.get("/api/screenings").json()["screenings"]
        insufficient = client.get("/api/screenings?referral=insufficient_quality").json()
        ungradable = client.get("/api/screenings?quality=ungradable").json()
        today = listed[0]["time"][:10]
        dated = client.get(f"/api/screenings?since={today}&until={today}").json()
        earlier = client.get("/api/screenings?until=2000-01-01").json()
        bad_date = client.get("/api/screenings?since=yesterday")
    assert [s["patient"] for s in listed] == ["B-1", "A-2", "A-1"]  # newest first
    assert [s["patient"] for s in insufficient["screenings"]] == ["B-1"]
    assert [s["patient"] for s in ungradable["screenings"]] == ["B-1"]
    assert len(dated["screenings"]) == 3 and earlier["screenings"] == []
    assert bad_date.status_code == 400
    assert rows_in(folder, Screening) == 3 and rows_in(folder, ImageRecord) == 9


# ------------------------------------------------------------------------------ access
def test_no_session_or_token_gets_401_and_a_grader_403_on_admin_routes(
    served_run: Path, folder: Path
) -> None:
    with TestClient(app_for(served_run, folder), base_url=BASE) as client:
        anonymous = {
            "model": client.get("/api/model"),
            "list": client.get("/api/screenings"),
            "export": client.get("/api/screenings.csv"),
            "predict": client.post("/api/predict", files=[("files", ("a.png", b"x", "x/y"))]),
            "admin": client.get("/api/admin/users"),
        }
        page = client.get("/")
        session = client.get("/api/session").json()
        csrf = {"X-CSRF-Token": log_in(client, GRADER)}
        grader = {
            "users": client.get("/api/admin/users"),
            "audit": client.get("/api/admin/audit"),
            "add": client.post(
                "/api/admin/users",
                json={"username": "eve", "password": PASSWORD, "role": "admin"},
                headers=csrf,
            ),
        }
        allowed = client.get("/api/screenings")
    assert {k: r.status_code for k, r in anonymous.items()} == dict.fromkeys(anonymous, 401)
    assert page.status_code == 200 and session["login_required"] is True
    assert {k: r.status_code for k, r in grader.items()} == dict.fromkeys(grader, 403)
    assert allowed.status_code == 200
    assert [u["username"] for u in Users(open_database(folder=folder)).list()] == [ADMIN, GRADER]


def test_account_locked_after_repeated_failures_and_each_failure_audited(
    served_run: Path, folder: Path
) -> None:
    with TestClient(app_for(served_run, folder), base_url=BASE) as client:
        wrong = [
            client.post("/api/login", json={"username": GRADER, "password": "guess-guess"})
            for _ in range(MAX_FAILURES)
        ]
        locked = client.post("/api/login", json={"username": GRADER, "password": PASSWORD})
        other = client.post("/api/login", json={"username": ADMIN, "password": PASSWORD})
        audit = client.get("/api/admin/audit").json()["audit"]
    assert all(r.status_code == 401 for r in wrong)
    assert wrong[0].json()["error"] == "wrong user name or password"
    assert locked.status_code == 401 and "locked" in locked.json()["error"]
    assert other.status_code == 200  # only the attacked account is locked
    actions = [a["action"] for a in audit if a["user"] == GRADER]
    assert actions.count("login_failed") == MAX_FAILURES and "login_refused" in actions


def test_serve_refuses_a_network_address_without_a_user(served_run: Path, tmp_path: Path) -> None:
    model = served_run.parent / "export" / "model.onnx"
    with pytest.raises(MedtuneError, match="medtune users add"):
        serve(model_path=model, host="0.0.0.0", folder=tmp_path / "empty")
    argv = ["serve", "--model", str(model), "--host", "0.0.0.0", "--data-dir", str(tmp_path)]
    assert main(argv) == 2


def test_users_and_tokens_from_the_command_line(
    served_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    folder = ["--data-dir", str(tmp_path / "data")]
    monkeypatch.setattr("sys.stdin", io.StringIO(PASSWORD + "\n"))
    assert main(["users", "add", "zoe", "--role", "admin", "--password-stdin", *folder]) == 0
    monkeypatch.setattr("sys.stdin", io.StringIO("short\n"))
    assert main(["users", "add", "max", "--password-stdin", *folder]) == 2
    capsys.readouterr()
    assert main(["users", "token", "zoe", "--label", "nightly", *folder]) == 0
    token = capsys.readouterr().out.strip()
    assert main(["users", "list", *folder]) == 0
    assert capsys.readouterr().out.split("\t")[:2] == ["zoe", "admin"]
    with TestClient(app_for(served_run, tmp_path / "data"), base_url=BASE) as client:
        ok = client.get("/api/screenings", headers={"Authorization": f"Bearer {token}"})
        bad = client.get("/api/screenings", headers={"Authorization": f"Bearer {token}x"})
    assert ok.status_code == 200 and bad.status_code == 401


# ------------------------------------------------------------------------------ security
def test_sql_injection_strings_in_every_free_text_field_are_data_not_sql(
    served_run: Path, folder: Path, photos: dict[str, Path]
) -> None:
    one = {"p17_right_1.jpg": photos["p17_right_1.jpg"]}
    with TestClient(app_for(served_run, folder), base_url=BASE) as client:
        for attack in INJECTIONS:  # as a user name and a password
            res = client.post("/api/login", json={"username": attack, "password": attack})
            assert res.status_code == 401
        csrf = {"X-CSRF-Token": log_in(client)}
        ids = []
        for attack in INJECTIONS:  # as a patient pseudonym, an eye, and every filter
            res = client.post("/api/predict", headers=csrf, **patient_upload(one, attack))
            assert res.status_code == 200, res.text
            ids.append(res.json()["screening"]["id"])
            bad_eye = client.post(
                f"/api/screenings/{ids[-1]}/review", json={"eye": attack, "grade": 1}, headers=csrf
            )
            assert bad_eye.status_code in (400, 422)  # too long for an eye, or no such eye
            for key in ("referral", "quality", "patient", "since"):
                res = client.get("/api/screenings", params={key: attack})
                assert res.status_code in (200, 400)
                if key == "patient":
                    assert [s["patient"] for s in res.json()["screenings"]] == [attack]
                elif res.status_code == 200:
                    assert res.json()["screenings"] == []
            assert client.get(f"/api/screenings/{attack}").status_code == 404
            added = client.post(
                "/api/admin/users",
                json={"username": attack, "password": PASSWORD, "role": "grader"},
                headers=csrf,
            )
            assert added.status_code == 422  # not a valid user name
        listed = client.get("/api/screenings").json()["screenings"]
    assert sorted(s["patient"] for s in listed) == sorted(INJECTIONS)
    assert rows_in(folder, Screening) == len(INJECTIONS)
    assert rows_in(folder, Review) == 0
    assert [u["role"] for u in Users(open_database(folder=folder)).list()] == ["admin", "grader"]


def test_forged_or_altered_session_cookie_is_no_session(served_run: Path, folder: Path) -> None:
    import base64
    import json

    from itsdangerous import TimestampSigner

    with TestClient(app_for(served_run, folder), base_url=BASE) as client:
        log_in(client)
        real = client.cookies.get("medtune_session")
        assert client.get("/api/screenings").status_code == 200
        payload = base64.b64encode(json.dumps({"sid": "made-up"}).encode())
        forged = {
            "wrong key": TimestampSigner("not-the-key").sign(payload).decode(),
            "unsigned": payload.decode(),
            "altered": real[:-3] + ("AAA" if not real.endswith("AAA") else "BBB"),
        }
        answers = {}
        for name, cookie in forged.items():
            client.cookies.clear()
            client.cookies.set("medtune_session", cookie)
            answers[name] = client.get("/api/screenings").status_code
    assert answers == dict.fromkeys(forged, 401)


def test_csrf_token_required_and_a_replayed_one_refused(
    served_run: Path, folder: Path, photos: dict[str, Path]
) -> None:
    one = patient_upload({"p17_right_1.jpg": photos["p17_right_1.jpg"]})
    with TestClient(app_for(served_run, folder), base_url=BASE) as client:
        old = log_in(client)
        missing = client.post("/api/predict", **one)
        cross_site = client.post(
            "/api/predict", headers={"X-CSRF-Token": old, "Origin": "https://evil.example"}, **one
        )
        assert client.post("/api/logout", headers={"X-CSRF-Token": old}).status_code == 200
        new = log_in(client)
        replayed = client.post("/api/predict", headers={"X-CSRF-Token": old}, **one)
        fresh = client.post("/api/predict", headers={"X-CSRF-Token": new}, **one)
    assert new != old
    assert missing.status_code == cross_site.status_code == replayed.status_code == 403
    assert fresh.status_code == 200
    assert rows_in(folder, Screening) == 1  # nothing written by the refused ones


def test_path_traversal_in_upload_names_writes_nothing_outside(
    served_run: Path, folder: Path, photos: dict[str, Path], tmp_path: Path
) -> None:
    data = photos["p17_right_1.jpg"].read_bytes()
    names = ["../../escape.jpg", "..\\..\\escape2.jpg", "/etc/passwd", "a/../../b_right.jpg"]
    before = {p for p in tmp_path.rglob("*") if "data" not in p.parts}
    with TestClient(app_for(served_run, folder, keep_images=True), base_url=BASE) as client:
        csrf = {"X-CSRF-Token": log_in(client)}
        files = [("files", (n, data, "image/jpeg")) for n in names]
        res = client.post("/api/predict", files=files, headers=csrf)
    assert res.status_code == 200, res.text
    assert [r["image"] for r in res.json()["rows"]] == [
        "escape.jpg",
        "escape2.jpg",
        "passwd",
        "b_right.jpg",
    ]
    assert {p for p in tmp_path.rglob("*") if "data" not in p.parts} == before
    kept = [p for p in (folder / "images").rglob("*") if p.is_file()]
    assert len(kept) == 1 and kept[0].parent.parent == folder / "images"  # content-addressed


def test_token_of_a_deleted_user_is_refused_and_writes_nothing(
    served_run: Path, folder: Path, photos: dict[str, Path]
) -> None:
    db = open_database(folder=folder)
    token = Users(db).new_token(GRADER, "script")
    db.close()
    one = patient_upload({"p17_right_1.jpg": photos["p17_right_1.jpg"]})
    bearer = {"Authorization": f"Bearer {token}"}
    with TestClient(app_for(served_run, folder), base_url=BASE) as client:
        assert client.post("/api/predict", headers=bearer, **one).status_code == 200
        grader = TestClient(client.app, base_url=BASE)
        log_in(grader, GRADER)
        csrf = {"X-CSRF-Token": log_in(client)}
        deleted = client.delete(f"/api/admin/users/{GRADER}", headers=csrf)
        after = client.post("/api/predict", headers=bearer, **one)
        session_after = grader.get("/api/screenings")
        relogin = grader.post("/api/login", json={"username": GRADER, "password": PASSWORD})
    assert deleted.status_code == 200
    assert after.status_code == 401 and session_after.status_code == 401
    assert relogin.status_code == 401
    assert rows_in(folder, Screening) == 1


def test_audit_log_and_reviews_are_append_only(folder: Path) -> None:
    from medtune.worklist.store import NewImage, NewScreening, Worklist

    db = open_database(folder=folder)
    worklist = Worklist(db)
    row = {"image": "a.jpg", "quality": "gradable", "grade": 2, "grade_name": "2", "p_0": 1.0}
    eye = {"side": "left", "quality": "gradable", "grade": 2, "grade_name": "2", "refer": ""}
    new = NewScreening("P", [NewImage("left", "a.jpg", b"x", "JPEG", row)], [eye], "", "gradable",
                       "sens90", None, "m", "v", ["0", "1", "2"], ["0", "1", "2"])  # fmt: skip
    worklist.review(worklist.add_screening(new, ADMIN), "left", 1, GRADER)
    try:
        for statement in (
            "DELETE FROM audit_log",
            "UPDATE audit_log SET username = 'x'",
            "DELETE FROM reviews",
            "UPDATE reviews SET grade = 0",
        ):
            with pytest.raises(Exception, match="append-only"), db.engine.begin() as conn:
                conn.execute(text(statement))
        with db.session() as s:
            assert s.scalar(select(func.count()).select_from(AuditEntry)) >= 4
            assert s.scalar(select(Review.grade)) == 1
    finally:
        db.close()


def test_export_csv_cells_cannot_run_as_spreadsheet_formulas(
    served_run: Path, folder: Path, photos: dict[str, Path]
) -> None:
    formula = '=HYPERLINK("http://evil.example","open")'
    one = patient_upload({"p17_right_1.jpg": photos["p17_right_1.jpg"]}, formula)
    with TestClient(app_for(served_run, folder), base_url=BASE) as client:
        csrf = {"X-CSRF-Token": log_in(client)}
        assert client.post("/api/predict", headers=csrf, **one).status_code == 200
        export = client.get("/api/screenings.csv").text
        listed = client.get("/api/screenings").json()["screenings"]
    assert [line["patient"] for line in csv.DictReader(io.StringIO(export))] == ["'" + formula]
    assert listed[0]["patient"] == formula  # stored as typed; escaped only in the CSV


def test_access_log_lines_carry_no_query_string() -> None:
    """A worklist filter puts the patient's pseudonym in the query string: uvicorn's access log
    line (client, method, path, HTTP version, status) keeps the path only."""
    import logging

    from medtune.workflows.serve.app import drop_query

    record = logging.LogRecord(
        "uvicorn.access", logging.INFO, __file__, 1, '%s - "%s %s HTTP/%s" %d',
        ("127.0.0.1:5000", "GET", "/api/screenings?patient=P-0173", "1.1", 200), None,
    )  # fmt: skip
    assert drop_query(record) is True
    assert "P-0173" not in record.getMessage() and "/api/screenings" in record.getMessage()


def test_a_worklist_of_the_first_schema_is_upgraded_and_keeps_its_screenings(
    tmp_path: Path,
) -> None:
    """Migration 0002 adds the running batch's columns; screenings made before it read as
    untested and never enter a running batch."""
    from alembic import command
    from alembic.config import Config
    from sqlalchemy import create_engine

    from medtune.worklist.db import MIGRATIONS
    from medtune.worklist.store import NewImage, NewScreening, Worklist

    url = f"sqlite:///{tmp_path / 'old.sqlite'}"
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    engine = create_engine(url)
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, "0001")
        connection.execute(text(
            "INSERT INTO screenings VALUES ('s1', '2026-12-01 10:00:00', 'ann', 'P', 'refer', "
            "'gradable', 'sens90', 0.3, 'm', 'v', '{\"classes\": [\"0\", \"1\"], \"grades\": "
            "[\"0\", \"1\"]}', 0)"
        ))  # fmt: skip
    engine.dispose()
    db = open_database(url)
    try:
        with db.engine.connect() as conn:
            assert conn.execute(text("SELECT version_num FROM alembic_version")).scalar() == "0002"
        worklist = Worklist(db)
        assert worklist.get("s1")["batch_shift"] is None
        row = {"image": "a.jpg", "quality": "gradable", "grade": 1, "grade_name": "1",
               "p_0": 0.2, "p_1": 0.8, "p_referable": 0.8, "refer": "yes"}  # fmt: skip
        evidence = {"features": [0.5, -1.0], "probs": [0.2, 0.8]}
        eye = {"side": "left", "quality": "gradable", "grade": 1, "grade_name": "1", "refer": "yes"}
        batch = {"n_images": 1, "verdict": None,
                 "validation": {"validated": "unknown", "status": "not tested"}}  # fmt: skip
        new = NewScreening("P", [NewImage("left", "a.jpg", b"x", "JPEG", row, evidence)], [eye],
                           "refer", "gradable", "sens90", 0.3, "m", "v", ["0", "1"], ["0", "1"],
                           batch_shift=batch)  # fmt: skip
        sid = worklist.add_screening(new, ADMIN)
        assert worklist.recent_evidence("m", "v", 100) == [{**evidence, "patient": sid}]
        assert worklist.recent_evidence("m", "other version", 100) == []
        image = worklist.get(sid)["images"][0]
        assert image["operating_point_validated"] == "unknown"
    finally:
        db.close()
