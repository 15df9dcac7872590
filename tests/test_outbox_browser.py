"""The dashboard's Outbox page in real headless Chromium, JavaScript off (as ``test_dashboard_browser.py``): an
operator sees the pending job's age and the dead job's error, redelivers the dead job and sees it pending again.
The screenshot goes to ``test-artifacts/outbox.png`` (the docs' ``docs/screenshots/outbox.png`` is a copy)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import sqlalchemy as sa
from flask import Flask
from helpers import ext
from test_dashboard_browser import ARTIFACTS, browser, served  # noqa: F401 - the fixtures

DOCS_SCREENSHOT = Path(__file__).resolve().parent.parent / "docs" / "screenshots" / "outbox.png"


def test_operator_redelivers_a_dead_outbox_job_without_javascript(browser: Any, served: tuple[Flask, str]) -> None:  # noqa: F811
    app, base = served
    idempotency = ext(app)["idempotency"]
    app.config.update(IDEMPOTENCY_OUTBOX_HANDOFF_SECONDS=0, IDEMPOTENCY_OUTBOX_MAX_ATTEMPTS=1)
    runs: list[int] = []

    @idempotency.handler("send-receipt")
    def send_receipt(payment_id: int) -> None:
        if payment_id == 7 and not runs:
            runs.append(-1)
            raise ConnectionError("mail relay refused the connection")
        runs.append(payment_id)

    with app.app_context():
        idempotency.stage("send-receipt", 7)
        ext(app)["db"].session.commit()
        idempotency.drain()  # job 1 dies at once (max 1 attempt)
        idempotency.stage("send-receipt", 8)
        ext(app)["db"].session.commit()

    ARTIFACTS.mkdir(exist_ok=True)
    context = browser.new_context(viewport={"width": 1366, "height": 768}, java_script_enabled=False)
    context.set_default_timeout(15_000)
    try:
        page = context.new_page()
        response = page.goto(f"{base}/idempotency/")
        assert response is not None and response.status == 200
        assert page.locator('[data-fi-count="outbox_pending"]').inner_text() == "1"
        page.get_by_role("link", name="Outbox").first.click()
        page.wait_for_url("**/idempotency/outbox")
        assert "1 pending" in page.locator('[data-fi-field="outbox-stats"]').inner_text()
        dead = page.locator('[data-fi-job="1"]')
        assert "ConnectionError: mail relay refused the connection" in dead.inner_text()
        page.screenshot(path=str(ARTIFACTS / "outbox.png"), full_page=True)

        dead.get_by_role("button", name="Redeliver").click()
        page.wait_for_load_state()
        assert page.locator(".fi-flash-ok").inner_text() == "Job 1: redelivered (due now)."
        assert "2 pending" in page.locator('[data-fi-field="outbox-stats"]').inner_text()
        assert "No dead jobs." in page.content()
    finally:
        context.close()

    with app.app_context(), ext(app)["db"].engine.connect() as conn:
        kinds = conn.execute(sa.text("SELECT kind, actor FROM idempotency_events")).all()
    assert [tuple(k) for k in kinds] == [("outbox_redeliver", "oncall")]
