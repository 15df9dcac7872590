"""What an operator reads at 3 a.m.: the CLI's and the dashboard's words, and nothing a client sent reaching the
terminal raw. Each test asserts the output and the database rows behind it."""

from __future__ import annotations

import json
import logging
import re
from datetime import timedelta
from typing import Any

import pytest
from click.testing import Result
from concurrency import Background, finish, make_stuck
from flask import Flask, jsonify, request
from flask.testing import FlaskClient
from helpers import events, ext, post, record, records
from test_dashboard import allow, get, insert, insert_stuck
from test_dashboard_operator_views import insert_event

from flask_idempotent import current_record, idempotent
from flask_idempotent.display import visible
from flask_idempotent.machine import lease_holder

#: What a hostile client can put in a path (``%1B`` decodes to ESC) or a summary: retitle the terminal (OSC 0 ...
#: BEL), clear it (CSI 2J), go back to the line's start (CR), reorder the line (RIGHT-TO-LEFT OVERRIDE).
HOSTILE = "x\x1b]0;pwned\x07\x1b[2J\rfake\u202e"
RAW = ("\x1b", "\x07", "\r", "\u202e")


def cli(app: Flask, *args: str, input: str | None = None) -> Result:
    return app.test_cli_runner().invoke(args=["idempotency", *args], input=input)


def raw_in(text: str) -> list[str]:
    return [char for char in RAW if char in text]


def labels(app: Flask) -> None:
    ext(app)["idempotency"].scope_label(lambda scope: {"1": "alice", "2": "bob"}.get(scope))


def test_visible_escapes_controls_and_keeps_text() -> None:
    assert visible("payment 1500 EUR (minor units)") == "payment 1500 EUR (minor units)"
    assert visible(HOSTILE) == "x\\x1b]0;pwned\\x07\\x1b[2J\\rfake\\u202e"
    assert visible("a\nb\tc\r", lines=True) == "a\nb\tc\\r"
    assert visible("\x9b31m") == "\\x9b31m"  # C1 CSI: some terminals take it alone
    assert visible(None) == ""


# 23.3: nothing a client sent reaches the operator's terminal raw -------------------------------------------


def test_cli_text_output_escapes_control_characters_a_client_sent(app: Flask, clock: Any) -> None:
    failed = insert(app, clock, "k\x1b[2J", scope="s\x07", path="/payments/" + HOSTILE, summary=HOSTILE)
    stuck = insert_stuck(app, clock, "stuck\r", path="/p/" + HOSTILE, summary=HOSTILE, recovery_point="at\x1b[1A")
    insert_event(
        app,
        clock,
        failed,
        "conflict",
        scope="s\x07",
        key="k\x1b[2J",
        detail={"method": "POST", "path": "/payments/" + HOSTILE, "summary": HOSTILE},
    )
    outputs = {
        "failed": cli(app, "failed"),
        "stuck": cli(app, "stuck"),
        "search": cli(app, "search", "s\x07"),
        "conflicts": cli(app, "conflicts"),
        "show": cli(app, "show", str(failed)),
        "show stuck": cli(app, "show", str(stuck)),
    }
    for name, result in outputs.items():
        assert result.exit_code == 0, (name, result.stdout, result.stderr)
        assert raw_in(result.stdout) == [], (name, result.stdout)
        assert "\\x1b]0;pwned\\x07" in result.stdout, (name, result.stdout)  # visible, not dropped
    assert 'key "k\\x1b[2J"' in outputs["failed"].stdout and 'scope "s\\x07"' in outputs["failed"].stdout
    assert "status 500  error: RuntimeError: boom" in outputs["failed"].stdout
    assert "recovery point at\\x1b[1A" in outputs["stuck"].stdout
    # Stored faithfully: the escaping is the display's, the rows keep what the client sent.
    assert {r["key"]: r["path"] for r in records(app)} == {
        "k\x1b[2J": "/payments/" + HOSTILE,
        "stuck\r": "/p/" + HOSTILE,
    }
    assert events(app, "conflict")[0]["detail"]["summary"] == HOSTILE
    # --json was already safe (JSON escapes C0 controls); it keeps the exact text.
    shown = cli(app, "show", str(failed), "--json")
    assert json.loads(shown.stdout)["summary"] == HOSTILE and "\x1b" not in shown.stdout


def test_a_cli_error_naming_hostile_text_is_escaped(app: Flask) -> None:
    result = cli(app, "show", "s\x07", "k\x1b[2J")
    assert result.exit_code == 1 and raw_in(result.stderr) == [] and "no idempotency record" in result.stderr


def test_dashboard_pages_show_control_characters_visibly(app: Flask, client: FlaskClient, clock: Any) -> None:
    allow(app)
    failed = insert(app, clock, "k\x1b[2J", scope="s\x07", path="/payments/" + HOSTILE, summary=HOSTILE)
    insert_stuck(app, clock, "stuck\r", path="/p/" + HOSTILE, summary=HOSTILE, error="boom\x1b[31m")
    insert_event(app, clock, failed, "conflict", detail={"method": "POST", "path": "/x" + HOSTILE, "summary": HOSTILE})
    for path in ["/", "/stuck", "/failed", "/conflicts", "/search?q=s%07", f"/records/{failed}"]:
        page = get(client, path)
        assert raw_in(page) == [], path
        assert "\\x1b]0;pwned\\x07" in page, path
    assert records(app)[0]["summary"] == HOSTILE  # stored as sent


# 28.6: the stuck list names the user and the recovery point ------------------------------------------------


def test_cli_stuck_shows_the_scope_label_and_the_recovery_point(app: Flask, clock: Any) -> None:
    labels(app)
    stuck = insert_stuck(app, clock, "pay-1", scope="1", summary="4200 EUR (minor units)", recovery_point="charged")
    text = cli(app, "stuck")
    assert text.exit_code == 0, text.stdout
    line = text.stdout.strip()
    assert line.startswith(f"{stuck}  stuck for 11m00s  POST /payments"), line
    assert 'scope "1" (alice)' in line and "recovery point charged" in line
    assert "summary: 4200 EUR (minor units)" in line and "((" not in line and "))" not in line
    listed = json.loads(cli(app, "stuck", "--json").stdout)
    [item] = listed["items"]
    assert (item["id"], item["scope"], item["scope_label"], item["recovery_point"]) == (stuck, "1", "alice", "charged")
    assert records(app)[0]["state"] == "IN_PROGRESS"  # looking changes nothing


# 28.8: the CLI's words -------------------------------------------------------------------------------------


def test_cli_show_prints_no_python_reprs_and_times_with_their_zone(app: Flask, clock: Any) -> None:
    record_id = insert_stuck(app, clock, "k", recovery_data={"charge_id": "ch_1"}, resource_ref=None)
    text = cli(app, "show", str(record_id))
    assert text.exit_code == 0, text.stdout
    assert "None" not in text.stdout and "{'" not in text.stdout and "False" not in text.stdout
    assert re.search(r"^recovery_data\s+\{\"charge_id\": \"ch_1\"\}$", text.stdout, re.M), text.stdout
    assert re.search(r"^created_at\s+\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z$", text.stdout, re.M), text.stdout
    assert "client_events         0 (conflicts and hits clients caused" in text.stdout
    as_json = json.loads(cli(app, "show", str(record_id), "--json").stdout)
    assert as_json["created_at"].endswith("Z") and as_json["locked_until"].endswith("Z")
    stats = json.loads(cli(app, "stats", "--json").stdout)
    assert stats["now"].endswith("Z")


def test_cli_show_explains_why_event_count_differs_from_the_events_listed(
    app: Flask, client: FlaskClient, clock: Any
) -> None:
    owner = make_stuck(app, clock)
    try:
        assert post(client, "/payments", key="stuck-1", json={"amount": 1}).status_code == 409  # a stale hit
        record_id = record(app, "stuck-1")["id"]
        assert cli(app, "mark-retryable", str(record_id), "--actor", "oncall").exit_code == 0
    finally:
        finish(owner)
    row = record(app, "stuck-1")
    shown = json.loads(cli(app, "show", str(record_id), "--json").stdout)
    assert row["event_count"] == shown["event_count"] == 1 and len(shown["events"]) == 2  # hit + operator action
    text = cli(app, "show", str(record_id)).stdout
    assert "client_events         1 (conflicts and hits clients caused" in text
    assert "operator actions and takeovers are listed below, not counted" in text
    assert "events (2, newest first):" in text
    assert "marked retryable by oncall" in text and "retried while stuck (answered 409 stuck)" in text


def test_cli_actions_say_what_happened_in_words(app: Flask, clock: Any) -> None:
    record_id = insert_stuck(app, clock, "k")
    done = cli(app, "mark-retryable", str(record_id), "--actor", "oncall")
    assert done.exit_code == 0, done.stderr
    assert done.stdout.strip() == (
        f'Record {record_id} (key "k") is now retryable: the next retry runs it again. (now at version 2)'
    )
    assert "done (state" not in done.stdout
    row = records(app)[0]
    assert (row["state"], row["retryable"], row["version"]) == ("FAILED", True, 2)
    acknowledged = cli(app, "mark-failed", str(record_id))
    assert "is now failed for good: retries get the failure." in acknowledged.stdout


# 28.9: conflicts show both requests' summaries ---------------------------------------------------------------


def add_described_route(app: Flask) -> None:
    @app.post("/described")
    @idempotent(describe=lambda: f"{request.get_json()['amount']} EUR")
    def described_transfer() -> Any:
        return jsonify(ok=True), 201


def test_a_conflict_stores_and_shows_both_requests_summaries(app: Flask, client: FlaskClient) -> None:
    add_described_route(app)
    allow(app)
    assert post(client, "/described", key="t-1", json={"amount": 1500}).status_code == 201
    assert post(client, "/described", key="t-1", json={"amount": 1600}).status_code == 422
    [event] = events(app, "conflict")
    assert event["detail"]["summary"] == "1600 EUR" and record(app, "t-1")["summary"] == "1500 EUR"
    text = cli(app, "conflicts").stdout
    assert "summary: 1500 EUR" in text and "then: POST /described summary: 1600 EUR" in text
    listed = json.loads(cli(app, "conflicts", "--json").stdout)["items"][0]
    assert (listed["record"]["summary"], listed["detail"]["summary"]) == ("1500 EUR", "1600 EUR")
    page = get(client, "/conflicts")
    assert 'data-fi-field="summary">1500 EUR<' in page and 'data-fi-field="conflict-summary">1600 EUR<' in page
    shown = get(client, f"/records/{record(app, 't-1')['id']}")
    assert "POST /described · 1600 EUR" in shown


# 28.10: the record page ----------------------------------------------------------------------------------------


def test_the_record_page_names_the_lease_holder_and_tells_the_story(
    app: Flask, client: FlaskClient, clock: Any
) -> None:
    allow(app)
    owner = make_stuck(app, clock)
    try:
        row = record(app, "stuck-1")
        holder = lease_holder(row["lease_token"])
        assert holder is not None and re.fullmatch(r".+:\d+", holder)  # host:pid of this test process
        page = get(client, f"/records/{row['id']}")
        assert f'data-fi-field="lease_holder"><code class="fi-code">{holder}</code>' in page
        kinds = re.findall(r'data-fi-event="([a-z_]+)"', page)
        assert kinds == ["claim", "lease_expired", "now"]
        assert "No events" not in page and "Stale Hit" not in page
        assert "No runbook for this route." in page  # the generic advice, not silence
        assert cli(app, "mark-retryable", str(row["id"]), "--actor", "oncall").exit_code == 0
    finally:
        finish(owner)
    [event] = events(app, "mark_retryable")
    assert event["detail"]["lease_holder"] == holder  # the action ends the lease; its event keeps the holder
    after = get(client, f"/records/{row['id']}")
    assert "retry allowed" in after and "fi-badge-final" not in after and "fi-badge-retryable" not in after
    assert f"lease held by {holder}" in after and "Marked retryable" in after
    assert post(client, "/payments", key="stuck-1", json={"amount": 1}).status_code == 201  # the retry: attempt 2
    story = get(client, f"/records/{row['id']}")
    kinds = re.findall(r'data-fi-event="([a-z_]+)"', story)
    assert kinds == ["claim", "mark_retryable", "retry", "now"]  # no longer stuck: the expiry is the action's
    assert "Attempt 2: the client&#39;s retry ran it again" in story and record(app, "stuck-1")["attempts"] == 2


def test_a_final_failure_has_acknowledge_as_its_primary_button(app: Flask, client: FlaskClient, clock: Any) -> None:
    allow(app)
    record_id = insert(app, clock, "f")
    page = get(client, f"/records/{record_id}")
    buttons = re.findall(r'<button class="([^"]*)" type="submit" data-fi-button="([a-z_]+)"', page)
    assert [name for classes, name in buttons if "fi-button-primary" in classes] == ["acknowledge"], buttons
    assert "No events" not in page and re.findall(r'data-fi-event="([a-z_]+)"', page) == ["claim", "now"]
    assert "Now: failed, final, awaiting a decision" in page
    assert records(app)[0]["acknowledged_at"] is None


def test_recovery_data_is_shown_without_show_bodies(app: Flask, client: FlaskClient, clock: Any) -> None:
    allow(app)
    record_id = insert_stuck(app, clock, "k", recovery_data={"charge_id": "ch_42"}, response_body=None)
    assert app.config["IDEMPOTENCY_DASHBOARD_SHOW_BODIES"] is False
    page = get(client, f"/records/{record_id}")
    assert 'data-fi-field="recovery_data">{\n  &#34;charge_id&#34;: &#34;ch_42&#34;\n}</pre>' in page
    assert "hidden (set IDEMPOTENCY_DASHBOARD_SHOW_BODIES to show it)" not in page


# 28.11: log lines --------------------------------------------------------------------------------------------


def test_stuck_hits_retries_takeovers_and_operator_actions_are_logged(
    app: Flask, client: FlaskClient, clock: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="flask_idempotent")
    owner = make_stuck(app, clock)
    try:
        assert post(client, "/payments", key="stuck-1", json={"amount": 1}).status_code == 409
        row = record(app, "stuck-1")
        assert cli(app, "mark-retryable", str(row["id"]), "--actor", "oncall").exit_code == 0
    finally:
        finish(owner)
    assert post(client, "/payments", key="stuck-1", json={"amount": 1}).status_code == 201  # attempt 2
    assert record(app, "stuck-1")["attempts"] == 2
    lines = [(r.levelname, r.getMessage()) for r in caplog.records if r.name == "flask_idempotent"]
    rid = row["id"]
    assert (
        "WARNING",
        f"record {rid} (key 'stuck-1', scope '') is stuck: its lease (held by {lease_holder(row['lease_token'])})"
        " expired without an outcome; answered 409 stuck until an operator decides",
    ) in lines
    assert (
        "INFO",
        f"record {rid} (key 'stuck-1', scope ''): mark-retryable by oncall (it was IN_PROGRESS, version 1)",
    ) in lines
    assert ("INFO", f"record {rid} (key 'stuck-1', scope ''): attempt 2 runs (a retry of a retryable failure)") in lines


def test_a_takeover_is_logged_and_its_event_names_both_holders(
    app: Flask, client: FlaskClient, clock: Any, caplog: pytest.LogCaptureFixture
) -> None:
    controls = ext(app)["controls"]

    @app.post("/resumable")
    @idempotent(on_stale="takeover")
    def resumable() -> Any:
        controls.ran("resumable")
        return jsonify(ok=True), 201

    held = controls.hold("resumable")
    owner = Background(app, "/resumable", key="r-1", json={})
    assert held.entered.wait(10)
    clock.advance(minutes=2)
    first = record(app, "r-1")
    caplog.set_level(logging.INFO, logger="flask_idempotent")
    try:
        assert post(client, "/resumable", key="r-1", json={}).status_code == 201
    finally:
        held.release.set()
        owner.result()
    [event] = events(app, "takeover")
    holder = lease_holder(first["lease_token"])
    assert event["detail"]["attempt"] == 2 and event["detail"]["previous_holder"] == holder
    assert event["detail"]["holder"] is not None
    assert (
        "WARNING",
        f"record {first['id']} (key 'r-1', scope ''): attempt 2 takes over the expired lease of {holder}",
    ) in [(r.levelname, r.getMessage()) for r in caplog.records]


# 28.8: bulk actions by filter --------------------------------------------------------------------------------


def test_a_bulk_action_selects_by_endpoint_recovery_point_and_age_and_dry_run_changes_nothing(
    app: Flask, clock: Any
) -> None:
    a = insert_stuck(app, clock, "a", recovery_point="provider-charged")
    b = insert_stuck(app, clock, "b", recovery_point="provider-charged")
    other_point = insert_stuck(app, clock, "c", recovery_point="started")
    other_endpoint = insert_stuck(app, clock, "d", recovery_point="provider-charged", endpoint="refund")
    before = records(app)
    args = ["--where", "stuck", "--endpoint", "create_payment", "--recovery-point", "provider-charged"]
    dry = cli(app, "mark-retryable", *args, "--older-than", "10m", "--dry-run")
    assert dry.exit_code == 0, dry.stdout + dry.stderr
    assert dry.stdout.splitlines() == [
        f'Record {a} (key "a") would be marked retryable',
        f'Record {b} (key "b") would be marked retryable',
        "dry run: 2 would change, 0 refused (of 2 matched)",
    ]
    assert records(app) == before and events(app) == []  # a dry run changes nothing
    too_young = json.loads(cli(app, "mark-retryable", *args, "--older-than", "1h", "--json").stdout)
    assert (too_young["matched"], too_young["results"]) == (0, [])  # changed 12 min ago: not older than 1 h
    done = cli(app, "mark-retryable", *args, "--actor", "oncall", "--json")
    assert done.exit_code == 0, done.stdout
    assert [(r["id"], r["outcome"]) for r in json.loads(done.stdout)["results"]] == [(a, "done"), (b, "done")]
    after = {r["id"]: (r["state"], r["retryable"]) for r in records(app)}
    assert after == {
        a: ("FAILED", True),
        b: ("FAILED", True),
        other_point: ("IN_PROGRESS", False),
        other_endpoint: ("IN_PROGRESS", False),
    }
    assert [(e["record_id"], e["actor"]) for e in events(app, "mark_retryable")] == [(a, "oncall"), (b, "oncall")]


def test_a_bulk_action_applies_the_operator_rules_per_record_and_reports_the_refused(app: Flask, clock: Any) -> None:
    final = insert(app, clock, "final")
    retryable = insert(app, clock, "retryable", retryable=True, updated_at=clock.now - timedelta(minutes=1))
    result = cli(app, "mark-failed", "--where", "failed", "--actor", "oncall")
    assert result.exit_code == 1  # not everything was applied
    lines = result.stdout.splitlines()
    assert f'Record {retryable} (key "retryable") is now failed for good: retries get the failure.' in lines
    assert any(
        line.startswith(f'Record {final} (key "final"): mark-failed refused: it is already failed for good')
        for line in lines
    ), lines
    assert lines[-1] == "1 done, 1 refused, 0 changed or gone since listed (of 2 matched)"
    rows = {r["id"]: (r["retryable"], r["version"]) for r in records(app)}
    assert rows == {final: (False, 1), retryable: (False, 2)}  # the refused one untouched
    assert [e["record_id"] for e in events(app)] == [retryable]


def test_a_bulk_release_asks_once_and_needs_a_list(app: Flask, clock: Any) -> None:
    insert(app, clock, "f1")
    insert(app, clock, "f2")
    declined = cli(app, "release", "--where", "final", input="n\n")
    assert declined.exit_code == 1 and "Release 2 record(s)?" in declined.stderr and len(records(app)) == 2
    accepted = cli(app, "release", "--where", "final", input="y\n")
    assert accepted.exit_code == 0 and records(app) == [] and len(events(app, "release")) == 2
    usage = cli(app, "release")
    assert usage.exit_code == 2 and "give a RECORD_ID, or --where LIST" in usage.stderr
    both = cli(app, "release", "1", "--where", "final")
    assert both.exit_code == 2 and "not both" in both.stderr
    bad_age = cli(app, "mark-retryable", "--where", "stuck", "--older-than", "soon")
    assert bad_age.exit_code == 2 and "is not a duration" in bad_age.stderr


def test_a_lease_token_names_its_holder_within_the_column(monkeypatch: pytest.MonkeyPatch) -> None:
    from flask_idempotent import machine

    monkeypatch.setattr(machine.socket, "gethostname", lambda: "payments-api-" + "x" * 80)
    token = machine.new_lease_token()
    assert len(token) == machine.LEASE_TOKEN_MAX  # idempotency_records.lease_token is VARCHAR(64)
    secret, _, holder = token.partition("@")
    assert len(secret) == 22 and holder.startswith("payments-api-x") and holder.endswith(f":{machine.os.getpid()}")
    assert machine.lease_holder(token) == holder
    assert machine.lease_holder("a" * 32) is None and machine.lease_holder(None) is None  # older tokens name nobody


def test_each_recovery_point_is_in_the_timeline_with_its_attempt(app: Flask, client: FlaskClient) -> None:
    allow(app)

    @app.post("/steps")
    @idempotent
    def steps() -> Any:
        for step in range(25):  # a view that checkpoints in a loop writes a bounded number of events
            current_record.checkpoint(f"step-{step}", {"step": step})
        return {"done": True}, 201

    assert post(client, "/phases", key="ph-1", json={}).status_code == 201
    row = record(app, "ph-1")
    [event] = events(app, "checkpoint")
    assert (event["record_id"], event["detail"]) == (row["id"], {"point": "charged", "attempt": 1})
    page = get(client, f"/records/{row['id']}")
    assert re.findall(r'data-fi-event="([a-z_]+)"', page) == ["claim", "checkpoint", "now"]
    assert "Reached a recovery point" in page and "charged, attempt 1" in page
    assert post(client, "/steps", key="st-1").status_code == 201
    steps_row = record(app, "st-1")
    points = [e["detail"]["point"] for e in events(app, "checkpoint") if e["record_id"] == steps_row["id"]]
    assert points == [f"step-{n}" for n in range(20)] and steps_row["recovery_point"] == "step-24"
    assert steps_row["event_count"] == 0  # not client events: they do not count towards the per-record cap
