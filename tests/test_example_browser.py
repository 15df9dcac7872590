"""The example app's dashboard in real headless Chromium, on SQLite and PostgreSQL: an on-call operator resolves a
stuck payment.

A payment "crashes" after the provider charged (the request blocks where SIGKILL would have stopped the process,
as in ``test_example_app.py``), the database clock moves past the lease, and the operator logs in, follows the
"Stuck in progress" card to the record, reads the route's runbook and marks it retryable, with JavaScript turned
off. The client's retry then books the existing charge: no second charge. Screenshots go to ``test-artifacts/``.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from flask import Flask
from test_dashboard_browser import ARTIFACTS, browser  # noqa: F401 - the module-scoped Chromium fixture
from test_example_app import OPERATOR_PASSWORD, InThread, pay, record, reset_database, rows
from werkzeug.serving import make_server

import example_app
from example_app import create_app

KEY = "order-2001"


class ProcessDied(BaseException):
    """Raised in the "dead" request once the test is done: nothing it does afterwards may count."""


@pytest.fixture
def stuck_example(
    database_url: str, clock: Any, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> Iterator[tuple[Flask, str, threading.Event, threading.Event]]:
    """The example app on a fresh PostgreSQL schema, served by werkzeug on 127.0.0.1 in a thread.

    Yields (app, base URL, died, buried): a request whose provider ``crash`` is hit sets ``died`` and blocks until
    ``buried`` is set; teardown sets ``buried`` before the schema is dropped (the blocked request holds a
    connection).
    """
    reset_database(database_url)
    monkeypatch.setattr(example_app.idempotency, "clock_offset", clock)  # before create_app, as the fixture does
    app = create_app(
        {
            "TESTING": True,
            "DATABASE_URL": database_url,
            "SECRET_KEY": "test-secret",
            "OPERATOR_PASSWORD": OPERATOR_PASSWORD,
            "PROVIDER_HANG_DIR": str(tmp_path / "provider-hang"),
        }
    )
    result = app.test_cli_runner().invoke(args=["init-db", "--demo"])
    assert result.exit_code == 0, result.output

    died, buried = threading.Event(), threading.Event()

    def crash() -> None:
        died.set()
        buried.wait(30)
        raise ProcessDied

    monkeypatch.setattr(app.extensions["payment_provider"], "crash", crash)
    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield app, f"http://127.0.0.1:{server.server_port}", died, buried
    finally:
        buried.set()
        server.shutdown()
        thread.join(10)
        with app.app_context():
            example_app.db.engine.dispose()
        reset_database(database_url)


def provider_charge_count(app: Flask) -> int:
    with app.app_context(), example_app.db.engine.connect() as conn:
        return int(conn.execute(sa.text("SELECT count(*) FROM provider_charges")).scalar_one())


@pytest.mark.parametrize("database_url", ["sqlite", "postgresql"], indirect=True)
def test_operator_marks_a_stuck_payment_retryable_and_the_retry_charges_once(
    browser: Any,  # noqa: F811
    stuck_example: tuple[Flask, str, threading.Event, threading.Event],
    clock: Any,
) -> None:
    app, base, died, buried = stuck_example

    # 1. The payment is charged, then the process "dies": the record stays IN_PROGRESS after the charge.
    dead = InThread(lambda: pay(app.test_client(), KEY, 1000, simulate="crash"))
    assert died.wait(10), "the request never reached the crash point"
    rec = record(app, KEY)
    assert (rec["state"], rec["recovery_point"], rec["attempts"]) == ("IN_PROGRESS", "provider-charged", 1)
    (charge,) = rows(app, "provider_charges")
    assert provider_charge_count(app) == 1 and rows(app, "payments") == []
    clock.advance(seconds=60 + 5 * 60 + 12)  # past the 60 s lease, and the 5 min the stuck alert waits to page

    # 2. The operator, in Chromium without JavaScript.
    ARTIFACTS.mkdir(exist_ok=True)
    context = browser.new_context(viewport={"width": 1366, "height": 768}, java_script_enabled=False)
    context.set_default_timeout(15_000)
    try:
        page = context.new_page()
        response = page.goto(f"{base}/idempotency/")
        assert response is not None and response.status == 200
        assert "/login" in page.url  # the dashboard asks for the operator login first
        page.get_by_label("Username").fill("operator")
        page.get_by_label("Password").fill(OPERATOR_PASSWORD)
        page.get_by_role("button", name="Log in").click()
        page.wait_for_url(f"{base}/idempotency/")

        card = page.locator("a.fi-card", has_text="Stuck in progress")
        assert card.locator('[data-fi-count="stuck"]').inner_text() == "1"
        assert "oldest stuck for" in card.inner_text()
        assert page.locator("svg.fi-chart-svg").count() >= 1  # the 24 h charts
        assert "Last 24 hours" in page.locator("#fi-activity").inner_text()
        replays = page.locator('[data-fi-note="replays"]').inner_text()
        assert replays.startswith("Replays cover what the worker processes have written.")
        page.screenshot(path=str(ARTIFACTS / "example-overview.png"), full_page=True)

        card.click()
        page.wait_for_url(f"{base}/idempotency/stuck")
        row = page.locator("tr", has_text=KEY)
        assert row.count() == 1
        assert row.locator('[data-fi-field="summary"]').inner_text() == "1000 EUR (minor units)"
        assert row.locator(".fi-scope-label").inner_text() == "alice"
        assert "provider-charged" in row.inner_text()
        page.screenshot(path=str(ARTIFACTS / "example-stuck-list.png"), full_page=True)

        row.get_by_role("link", name=KEY).click()
        page.wait_for_url(f"{base}/idempotency/records/{rec['id']}")
        assert page.locator('[data-fi-field="state"]').inner_text() == "IN_PROGRESS"
        assert page.locator('[data-fi-field="summary"]').inner_text() == "1000 EUR (minor units)"
        assert page.locator(".fi-lead .fi-scope-label").inner_text() == "alice"
        runbook = page.locator('[data-fi-field="runbook"]').inner_text()
        assert "the provider charged (see recovery data: charge_id)" in runbook
        assert "The provider deduplicates by scope:key, so Mark retryable is safe" in runbook
        # What the operator decides on: the charge the provider made, who held the lease, the story so far.
        assert f'"charge_id": "{charge["id"]}"' in page.locator('[data-fi-field="recovery_data"]').inner_text()
        holder = page.locator('[data-fi-field="lease_holder"]').inner_text()
        assert re.fullmatch(r"\S+:\d+ \(host:pid of the process that made the latest claim\)", holder), holder
        assert [e.inner_text() for e in page.locator(".fi-timeline .fi-event-kind").all()] == [
            "First request claimed the key (attempt 1)",
            "Reached a recovery point",
            "The lease ran out without an outcome: stuck",
            "Now: stuck",
        ]
        assert "provider-charged, attempt 1" in page.locator(".fi-timeline").inner_text()
        assert "last recovery point provider-charged" in page.locator('[data-fi-note="now"]').inner_text()
        # The route's runbook decides between the buttons: none is drawn as the one to press, Release not in red.
        assert page.locator(".fi-button-primary").count() == 0
        release = page.locator('[data-fi-button="release"]')
        assert release.evaluate("e => getComputedStyle(e).backgroundColor") == "rgb(255, 255, 255)"
        form = page.locator("form", has=page.get_by_role("button", name="Mark retryable"))
        assert form.get_attribute("method") == "post"
        assert form.locator('input[name="csrf_token"]').count() == 1
        assert form.locator('input[name="version"]').get_attribute("value") == str(rec["version"])
        page.screenshot(path=str(ARTIFACTS / "example-record.png"), full_page=True)

        page.get_by_role("button", name="Mark retryable").click()
        page.wait_for_url(f"{base}/idempotency/records/{rec['id']}")
        assert page.locator(".fi-flash-ok").inner_text().endswith("is now retryable: the next retry runs it again.")
        assert page.locator('[data-fi-field="state"]').inner_text() == "FAILED"
        assert page.locator('[data-fi-field="retryable"]').inner_text() == "retryable"
        assert "by operator" in page.locator(".fi-timeline").inner_text()
        marked = page.locator('.fi-timeline [data-fi-event="mark_retryable"]').inner_text()
        assert marked.startswith("Marked retryable by operator") and f"lease held by {holder.split()[0]}" in marked
        badge = page.locator(".fi-title .fi-badge")
        assert badge.inner_text() == "retry allowed"  # the charge is safe: not in alarm colours
        assert badge.evaluate("e => getComputedStyle(e).color") == "rgb(55, 48, 163)"
        page.screenshot(path=str(ARTIFACTS / "example-record-after.png"), full_page=True)
    finally:
        context.close()

    rec = record(app, KEY)
    assert (rec["state"], rec["retryable"]) == ("FAILED", True)

    # 3. The client retries with the same key: the provider answers the reference with the charge it made.
    retry = pay(app.test_client(), KEY, 1000)
    assert retry.status_code == 201, retry.data
    assert retry.get_json()["charge_id"] == charge["id"]
    assert provider_charge_count(app) == 1  # no second charge
    assert len(rows(app, "payments")) == 1
    rec = record(app, KEY)
    assert (rec["state"], rec["attempts"]) == ("COMPLETED", 2)

    buried.set()  # the "dead" request wakes up: its late outcome is fenced off by the newer lease
    with pytest.raises(ProcessDied):
        dead.result()
    rec = record(app, KEY)
    assert (rec["state"], rec["attempts"], rec["response_status"]) == ("COMPLETED", 2, 201)
