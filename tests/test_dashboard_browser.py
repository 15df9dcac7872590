"""The dashboard in real headless Chromium (Debian's ``chromium``, driven by Playwright for Python).

An on-call operator opens the overview, follows a stuck record, marks it retryable and sees the new state, with
JavaScript turned off. Screenshots go to ``test-artifacts/``. Without Chromium these tests skip with the reason;
with ``IDEMPOTENCY_REQUIRE_BROWSER=1`` (CI) that is a failure instead. Playwright never downloads a browser here.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from conftest import with_driver
from flask import Flask
from helpers import events, ext, post, record
from testapp import Controls, build_app
from werkzeug.serving import make_server

CHROMIUM = os.environ.get("IDEMPOTENCY_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]
REQUIRE_BROWSER = os.environ.get("IDEMPOTENCY_REQUIRE_BROWSER") == "1"
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"


def _unavailable(reason: str) -> None:
    if REQUIRE_BROWSER:
        pytest.fail(f"IDEMPOTENCY_REQUIRE_BROWSER=1 but {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not os.access(CHROMIUM, os.X_OK):
        _unavailable(
            f"Chromium not found at {CHROMIUM}: install Debian's package (apt-get install chromium, as .ci/run does)"
            " or set IDEMPOTENCY_CHROMIUM"
        )
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _unavailable("the playwright package is not installed (pip install -e '.[test]')")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


#: This module's tests run on SQLite and PostgreSQL (psycopg2); a test elsewhere that takes ``served`` gets SQLite.
pytestmark = pytest.mark.parametrize("served", ["sqlite", "postgresql"], indirect=True)
#: What the record page's buttons look like: the primary one filled blue, the others white.
PRIMARY, PLAIN = "rgb(29, 78, 216)", "rgb(255, 255, 255)"


@pytest.fixture
def served(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[Flask, str]]:
    """The test app on a SQLite file, or on PostgreSQL when parametrized ``"postgresql"``, served by werkzeug on
    127.0.0.1 in a thread; yields (app, base URL)."""
    if getattr(request, "param", "sqlite") == "postgresql":
        url = with_driver(str(request.getfixturevalue("postgres_url")), "psycopg2")
    else:
        url = f"sqlite:///{tmp_path / 'browser.db'}"
    app = build_app(url, clock=lambda: 0.0, controls=Controls())
    with app.app_context():
        ext(app)["db"].drop_all()
        ext(app)["db"].create_all()
    ext(app)["idempotency"].dashboard_access(lambda: "oncall")
    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield app, f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        thread.join(10)
        with app.app_context():
            ext(app)["db"].drop_all()
            ext(app)["db"].engine.dispose()


def seed(app: Flask) -> None:
    """What the pager was about: a stuck payment, a final failure, a conflict, some completed payments."""
    client, controls = app.test_client(), ext(app)["controls"]
    for i in range(3):
        post(client, "/payments", key=f"pay-{i}", user="merchant-42", json={"amount": 100 + i})
    post(client, "/payments", key="pay-0", user="merchant-42", json={"amount": 999})  # key reused: conflict
    controls.status = 500
    post(client, "/payments", key="pay-final", user="merchant-7", json={"amount": 5})
    controls.status = None
    now = datetime.now(timezone.utc).replace(tzinfo=None)
    with app.app_context():
        db = ext(app)["db"]
        table = db.metadata.tables["idempotency_records"]
        with db.engine.begin() as conn:
            conn.execute(
                sa.insert(table).values(
                    scope="merchant-42",
                    key="pay-stuck",
                    request_hash="v1:" + "ab" * 32,
                    method="POST",
                    path="/payments",
                    endpoint="create_payment",
                    state="IN_PROGRESS",
                    retryable=False,
                    attempts=1,
                    event_count=0,
                    lease_token="t" * 32,
                    locked_until=now - timedelta(minutes=12),
                    recovery_point="charged",
                    created_at=now - timedelta(minutes=13),
                    updated_at=now - timedelta(minutes=13),
                    expires_at=now + timedelta(hours=24),
                )
            )


def test_operator_resolves_a_stuck_payment_without_javascript(browser: Any, served: tuple[Flask, str]) -> None:
    app, base = served
    seed(app)
    ARTIFACTS.mkdir(exist_ok=True)
    context = browser.new_context(viewport={"width": 1366, "height": 768}, java_script_enabled=False)
    context.set_default_timeout(15_000)
    try:
        page = context.new_page()
        response = page.goto(f"{base}/idempotency/")
        assert response is not None and response.status == 200
        assert page.locator('[data-fi-count="stuck"]').inner_text() == "1"
        assert "oldest stuck for 12 min" in page.locator(".fi-card").first.inner_text()
        assert page.locator('[data-fi-count="conflicts_24h"]').inner_text() == "1"
        assert page.locator('[data-fi-count="awaiting_decision"]').inner_text() == "1"
        # The stylesheet loaded and applied: the header is the dashboard's dark bar.
        assert page.locator(".fi-header").evaluate("e => getComputedStyle(e).backgroundColor") == "rgb(31, 42, 60)"
        # What the replays count covers, where a restart can make it incomplete.
        replays = page.locator('[data-fi-note="replays"]').inner_text()
        assert replays.startswith("Replays cover what the worker processes have written.")
        page.screenshot(path=str(ARTIFACTS / "dashboard-overview.png"), full_page=True)

        page.get_by_role("link", name="pay-stuck").click()
        page.wait_for_url("**/idempotency/records/*")
        assert page.locator('[data-fi-field="state"]').inner_text() == "IN_PROGRESS"
        assert "stuck for 12 min" in page.locator(".fi-fields").first.inner_text()
        assert page.locator('[data-fi-field="lease_holder"]').inner_text() == "not recorded"  # a pre-holder row
        # The timeline in words, oldest first, ending where the record stands now.
        assert [e.inner_text() for e in page.locator(".fi-timeline .fi-event-kind").all()] == [
            "First request claimed the key (attempt 1)",
            "The lease ran out without an outcome: stuck",
            "Now: stuck",
        ]
        # No runbook on this route: the generic advice, and no button is pushed on the operator.
        assert page.locator('[data-fi-field="generic-advice"]').inner_text().startswith("No runbook for this route.")
        assert page.locator(".fi-button-primary").count() == 0
        release = page.locator('[data-fi-button="release"]')
        assert release.evaluate("e => getComputedStyle(e).backgroundColor") == PLAIN  # outlined, not a red block
        page.screenshot(path=str(ARTIFACTS / "dashboard-record.png"), full_page=True)

        page.get_by_role("button", name="Mark retryable").click()
        page.wait_for_load_state()
        assert page.locator(".fi-flash-ok").inner_text().endswith("is now retryable: the next retry runs it again.")
        assert page.locator('[data-fi-field="state"]').inner_text() == "FAILED"
        assert page.locator('[data-fi-field="retryable"]').inner_text() == "retryable"
        assert "by oncall" in page.locator(".fi-timeline").inner_text()
        marked = page.locator('.fi-timeline [data-fi-event="mark_retryable"]').inner_text()
        assert marked.startswith("Marked retryable by oncall")
        assert "it was IN_PROGRESS, attempt 1, version 1, at recovery point charged" in marked
        assert page.locator(".fi-title .fi-badge").inner_text() == "retry allowed"
        page.screenshot(path=str(ARTIFACTS / "dashboard-record-after.png"), full_page=True)
    finally:
        context.close()

    stored = record(app, "pay-stuck", "merchant-42")
    assert stored is not None and (stored["state"], stored["retryable"]) == ("FAILED", True)
    assert [(e["kind"], e["actor"]) for e in events(app, "mark_retryable")] == [("mark_retryable", "oncall")]


def test_operator_acknowledges_a_final_failure_with_the_primary_button(browser: Any, served: tuple[Flask, str]) -> None:
    """A final failure awaiting a decision: Acknowledge is the one filled button (Mark retryable is not), the
    error shows as text, and acknowledging takes it off the overview's "awaiting a decision"."""
    app, base = served
    seed(app)
    context = browser.new_context(viewport={"width": 1366, "height": 768}, java_script_enabled=False)
    context.set_default_timeout(15_000)
    try:
        page = context.new_page()
        page.goto(f"{base}/idempotency/")
        assert page.locator('[data-fi-count="awaiting_decision"]').inner_text() == "1"
        page.get_by_role("link", name="pay-final").click()
        page.wait_for_url("**/idempotency/records/*")
        assert page.locator(".fi-title .fi-badge").inner_text() == "failed · final"
        colours = {
            name: page.locator(f'[data-fi-button="{name}"]').evaluate("e => getComputedStyle(e).backgroundColor")
            for name in ("mark_retryable", "mark_failed", "acknowledge")
        }
        assert colours == {"mark_retryable": PLAIN, "mark_failed": PLAIN, "acknowledge": PRIMARY}, colours
        assert page.locator('[data-fi-button="mark_failed"]').is_disabled()
        kinds = [e.inner_text() for e in page.locator(".fi-timeline .fi-event-kind").all()]
        assert kinds[0] == "First request claimed the key (attempt 1)" and kinds[-1].startswith("Now: failed, final")
        assert "No events" not in page.locator(".fi-timeline").inner_text()
        page.screenshot(path=str(ARTIFACTS / "dashboard-record-final.png"), full_page=True)

        page.get_by_role("button", name="Acknowledge").click()
        page.wait_for_load_state()
        assert page.locator('[data-fi-field="acknowledged"]').inner_text().endswith("by oncall")
        assert page.locator('[data-fi-button="acknowledge"]').is_disabled()
        page.goto(f"{base}/idempotency/")
        assert page.locator('[data-fi-count="awaiting_decision"]').inner_text() == "0"
    finally:
        context.close()

    stored = record(app, "pay-final", "merchant-7")
    assert stored is not None and (stored["state"], stored["retryable"]) == ("FAILED", False)
    assert stored["acknowledged_at"] is not None and stored["acknowledged_by"] == "oncall"
    assert [(e["kind"], e["actor"]) for e in events(app, "acknowledge")] == [("acknowledge", "oncall")]


def test_hostile_keys_do_not_run_script_in_the_browser(browser: Any, served: tuple[Flask, str]) -> None:
    app, base = served
    hostile = "<img/src=x/onerror=alert(document.domain)>"
    ext(app)["controls"].status = 500
    post(app.test_client(), "/payments", key=hostile, user="<script>alert(1)</script>", json={"amount": 1})
    context = browser.new_context(viewport={"width": 1366, "height": 768})
    dialogs: list[str] = []
    try:
        page = context.new_page()
        page.on("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.dismiss()))
        page.goto(f"{base}/idempotency/")
        page.get_by_role("link", name=hostile).click()
        page.wait_for_url("**/idempotency/records/*")
        assert page.locator(".fi-fields .fi-key").first.inner_text() == hostile
    finally:
        context.close()
    assert dialogs == []


def test_overview_charts_labels_and_one_line_keys_in_the_browser(browser: Any, served: tuple[Flask, str]) -> None:
    """The charts draw without JavaScript and without CSP violations; keys stay on one line; labels show."""
    app, base = served
    idempotency = ext(app)["idempotency"]
    idempotency.scope_label({"merchant-42": "Acme Ltd", "merchant-7": "Bob's Bikes"}.get)
    idempotency.scope_search(lambda text: ["merchant-42"] if text.lower() == "acme ltd" else [])
    seed(app)
    ext(app)["controls"].status = 500
    post(app.test_client(), "/payments", key="5f0c6a52-8d1e-4c1b-9f3e-2a7d9b6c4e10", user="merchant-7", json={})
    ARTIFACTS.mkdir(exist_ok=True)
    context = browser.new_context(viewport={"width": 1366, "height": 768}, java_script_enabled=False)
    context.set_default_timeout(15_000)
    violations: list[str] = []
    try:
        page = context.new_page()
        page.on("console", lambda msg: violations.append(msg.text) if "Content Security Policy" in msg.text else None)
        page.goto(f"{base}/idempotency/")
        created = page.locator('[data-fi-chart="created"] rect[data-fi-value]')
        assert created.count() == 24
        last = created.last.bounding_box()
        assert last is not None and last["height"] > 10  # this hour's first requests, drawn
        assert page.locator('[data-fi-total="stuck"]').inner_text() == "1"
        # The four charts and the "Stuck now" card share one row on a 1366 px screen.
        tops = {round(box["y"]) for box in (c.bounding_box() for c in page.locator(".fi-charts > *").all()) if box}
        assert page.locator(".fi-charts > *").count() == 5 and len(tops) == 1, tops
        bar_fill = created.last.evaluate("e => getComputedStyle(e).fill")
        assert bar_fill == "rgb(31, 42, 60)"  # styled by dashboard.css, not inline
        page.locator('[data-fi-chart="created"]').screenshot(path=str(ARTIFACTS / "dashboard-chart-created.png"))
        page.screenshot(path=str(ARTIFACTS / "dashboard-overview-charts.png"), full_page=True)

        page.goto(f"{base}/idempotency/failed")
        link = page.get_by_role("link", name="5f0c6a52-8d1e-4c1b-9f3e-2a7d9b6c4e10")
        box = link.bounding_box()
        assert box is not None and box["height"] < 30  # one line, not two
        assert "Bob's Bikes" in page.locator(".fi-table").inner_text()
        page.screenshot(path=str(ARTIFACTS / "dashboard-failed-list.png"), full_page=True)

        page.goto(f"{base}/idempotency/search?q=Acme+Ltd")
        assert page.get_by_role("link", name="pay-stuck").count() == 1
    finally:
        context.close()
    assert violations == []
