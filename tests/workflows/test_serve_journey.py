"""Issue 22, done when: a clinic's day on ``medtune serve`` in headless Chromium. Log in, screen a
patient's four photographs (two per eye, one ungradable), read the patient-level referral,
correct one eye's grade, restart the server, find the screening in the worklist with the
correction, export it, log out; without a session a request gets 401, and a grader gets 403 on
the admin routes."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import httpx
import pytest
from conftest import patient_photographs
from test_serve import CHROMIUM, LiveServer, launch_chromium, playwright_api

from medtune.workflows.serve import create_app
from medtune.worklist.db import open_database
from medtune.worklist.users import Users

PASSWORD = "correct horse battery"


def start(served_run: Path, folder: Path, port: int | None = None) -> LiveServer:
    model = served_run.parent / "export" / "model.onnx"
    return LiveServer(create_app(model_path=model, folder=folder, keep_images=True), port)


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (.ci/run does)")
def test_a_clinic_day_log_in_screen_review_restart_find_export_log_out(
    served_run: Path, tmp_path: Path
) -> None:
    sync_api = playwright_api()
    folder = tmp_path / "data"
    db = open_database(folder=folder)
    Users(db).add("ann", PASSWORD, "grader")
    Users(db).add("root", PASSWORD, "admin")
    db.close()
    photos = patient_photographs(tmp_path / "photos")
    remote: list[str] = []
    with sync_api.sync_playwright() as pw:
        browser = launch_chromium(pw)
        page = browser.new_page(accept_downloads=True)
        page.on("request", lambda r: remote.append(r.url) if "127.0.0.1" not in r.url else None)
        with start(served_run, folder) as server:
            port = server.port
            page.goto(server.url)
            page.wait_for_selector("#login:not([hidden])")
            page.fill("#username", "ann")
            page.fill("#password", PASSWORD)
            page.click("#login-button")
            page.wait_for_selector("#app:not([hidden])")
            assert page.inner_text("#who") == "ann (grader)"
            assert page.is_hidden("#tab-admin")

            page.fill("#patient", "P-0173")
            page.set_input_files("#files", [str(p) for p in photos.values()])
            sides = [page.locator(f'select[data-file="{i}"]').input_value() for i in range(4)]
            assert sides == ["right", "right", "left", "left"]  # read from the file names
            page.click("#screen")
            page.wait_for_selector("#patient-result:not([hidden])", timeout=60_000)

            # the patient first, then the eyes, then the photographs
            order = page.evaluate(
                "() => ['#patient-result', '#eyes', '#results'].map(s => "
                "document.querySelector(s).getBoundingClientRect().top)"
            )
            assert order == sorted(order)
            verdict = page.locator("[data-role=patient-referral]")
            referral = verdict.get_attribute("data-referral")
            eyes = page.locator("article.eye-summary")
            assert eyes.count() == 2
            eye_flags = [eyes.nth(i).locator("[data-role=eye-refer]").get_attribute("data-refer")
                         for i in range(2)]  # fmt: skip
            assert referral == ("refer" if "yes" in eye_flags else "no_refer")
            assert "P-0173" in page.inner_text("#patient-result")

            blurred = page.locator('article.photo[data-image="p17_left_2.jpg"]')
            assert blurred.locator(".badge").get_attribute("data-verdict") == "ungradable"
            assert "underexposed" in blurred.locator(".reason").inner_text().lower()
            assert blurred.locator(".grade").count() == 0  # no grade in large type
            guess = blurred.locator("[data-role=grade]")
            assert not guess.is_visible()  # the model's guess only on demand
            blurred.locator("summary").click()
            assert guess.is_visible()

            left = page.locator('article.eye-summary[data-side="left"]')
            model_grade = left.locator("[data-role=review-grade]").input_value()
            corrected = str((int(model_grade) + 2) % 5)
            left.locator("[data-role=review-grade]").select_option(corrected)
            left.locator("[data-role=review-save]").click()
            saved = f'[data-role=review][data-grade="{corrected}"]'
            page.wait_for_selector(f'article.eye-summary[data-side="left"] {saved}')
            page.screenshot(path=str(tmp_path / "patient.png"), full_page=True)

        with start(served_run, folder, port) as server:  # a restarted server, same worklist
            page.reload()
            page.wait_for_selector("#app:not([hidden])")  # the login survived the restart
            page.click("#tab-worklist")
            row = page.locator("#worklist-table tr[data-id]")
            row.first.wait_for()
            assert row.count() == 1 and "P-0173" in row.first.inner_text()
            assert "left: " in row.first.inner_text()
            row.first.locator("button").click()
            page.wait_for_selector("#patient-result:not([hidden])")
            review = page.locator('article.eye-summary[data-side="left"] [data-role=review]')
            assert review.get_attribute("data-grade") == corrected
            assert "by ann" in review.inner_text()

            page.click("#tab-worklist")
            with page.expect_download() as download:
                page.click("#export-csv")
            lines = list(csv.DictReader(io.StringIO(Path(download.value.path()).read_text())))
            by_eye = {line["eye"]: line for line in lines}
            assert by_eye["left"]["reviewed_grade"] == corrected
            assert by_eye["left"]["model_grade"] == model_grade
            assert by_eye["left"]["reviewed_by"] == "ann" and by_eye["left"]["patient"] == "P-0173"

            page.click("#logout")
            page.wait_for_selector("#login:not([hidden])")
            after = page.request.get(server.url + "/api/screenings")
            assert after.status == 401
            assert httpx.get(server.url + "/api/screenings").status_code == 401
            admin_page = httpx.Client(base_url=server.url)
            login = admin_page.post("/api/login", json={"username": "ann", "password": PASSWORD})
            assert login.status_code == 200
            assert admin_page.get("/api/admin/users").status_code == 403
            assert admin_page.get("/api/admin/audit").status_code == 403
        browser.close()
    assert remote == [], f"the page asked for remote assets: {remote}"
