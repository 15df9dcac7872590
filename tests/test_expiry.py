"""Expiry never undoes a decision: the ttl counts from the last thing that happened to a record, and a record
awaiting a decision (IN_PROGRESS, or a final failure nobody acknowledged) never expires and is never purged.

Time moves with the test clock (the offset the layer adds to the database's clock), never by waiting.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
from concurrency import Background, finish
from flask import Flask, jsonify
from flask.testing import FlaskClient
from helpers import charges, ext, in_app, post, problem_code, reads, record, records
from werkzeug.test import TestResponse

from flask_idempotent import idempotent
from flask_idempotent import operations as ops

TTL = timedelta(hours=24)  # IDEMPOTENCY_TTL's default
WEEK = timedelta(days=7)


@pytest.fixture
def late(app: Flask, clock: Any) -> Flask:
    """Routes whose view (or streamed body) finishes a day after its claim, and one with a week's ttl."""
    db, charge_model, controls = ext(app)["db"], ext(app)["Charge"], ext(app)["controls"]

    def pay(route: str) -> Any:
        controls.ran(route)
        row = charge_model(amount=1, route=route)
        db.session.add(row)
        return row

    @app.post("/late/leased")
    @idempotent
    def late_leased() -> Any:
        row = pay("late-leased")
        db.session.commit()
        clock.advance(hours=25)  # the view finishes past its ttl (counted from the claim)
        return jsonify(id=row.id), 201

    @app.post("/late/atomic")
    @idempotent(atomic=True)
    def late_atomic() -> Any:
        row = pay("late-atomic")
        db.session.flush()
        clock.advance(hours=25)
        return jsonify(id=row.id), 201

    @app.post("/late/stream")
    @idempotent
    def late_stream() -> Any:
        row = pay("late-stream")
        db.session.commit()
        charge_id = row.id

        def body() -> Iterator[bytes]:
            yield b'{"id": '
            clock.advance(hours=25)  # the stream ends, and its outcome is stored, past the ttl
            yield str(charge_id).encode() + b"}"

        return app.response_class(body(), status=201, mimetype="application/json")

    @app.post("/weekly")
    @idempotent(ttl=WEEK)
    def weekly() -> Any:
        pay("weekly")
        db.session.commit()
        return jsonify(ok=False), controls.status or 201

    return app


def test_a_payment_marked_failed_after_its_ttl_gets_the_failure_and_never_runs_again(
    app: Flask, client: FlaskClient, clock: Any
) -> None:
    controls = ext(app)["controls"]
    held = controls.hold("payments")
    owner = Background(app, "/payments", key="pay-1", json={"amount": 500}, held=held)
    assert held.entered.wait(10)
    try:
        clock.advance(hours=26)  # stuck for 26 h: past its lease and past the ttl its claim set
        stuck = post(client, "/payments", "pay-1", json={"amount": 500})
        assert stuck.status_code == 409 and problem_code(stuck) == "stuck"
        # The operator confirmed with the provider that the charge happened: the request must not run again.
        decided = in_app(app, ops.mark_failed, record(app, "pay-1")["id"], actor="oncall")
        assert decided["never_expires"] is True  # a final failure nobody acknowledged awaits a decision
    finally:
        finish(owner)  # the presumed-dead owner wakes up: its outcome is refused, the decision stands
    row = record(app, "pay-1")
    assert (row["state"], row["retryable"], row["attempts"], row["lease_token"]) == ("FAILED", False, 1, None)
    assert reads(clock, row["updated_at"])
    assert row["expires_at"] - row["updated_at"] == TTL  # the decision starts the record's ttl afresh

    for later in (timedelta(0), timedelta(hours=30), timedelta(days=7)):
        clock.advance(seconds=later.total_seconds())
        retry = post(client, "/payments", "pay-1", json={"amount": 500})
        assert retry.status_code == 500 and problem_code(retry) == "failed"
    assert controls.runs["payments"] == 1 and charges(app, "payments") == 1
    assert in_app(app, ops.purge) == 0
    assert record(app, "pay-1")["state"] == "FAILED" and record(app, "pay-1")["version"] == row["version"]


@pytest.mark.parametrize("path", ["/late/leased", "/late/atomic", "/late/stream"])
def test_a_view_finishing_after_its_ttl_stores_an_outcome_that_replays(
    late: Flask, client: FlaskClient, clock: Any, path: str
) -> None:
    route = path.removeprefix("/").replace("/", "-")
    first = post(client, path, "late-1", json={})
    first.get_data()  # a streamed outcome is stored when its body has been sent
    assert first.status_code == 201 and "Idempotent-Replayed" not in first.headers
    row = record(late, "late-1")
    assert (row["state"], row["attempts"]) == ("COMPLETED", 1)
    assert row["expires_at"] - row["created_at"] > TTL  # the ttl counts from the outcome, not the claim
    assert reads(clock, row["updated_at"]) and row["expires_at"] - row["updated_at"] == TTL

    retry = post(client, path, "late-1", json={})
    assert retry.status_code == 201 and retry.headers.get("Idempotent-Replayed") == "true"
    assert retry.get_json() == first.get_json()
    assert ext(late)["controls"].runs[route] == 1 and charges(late, route) == 1
    assert record(late, "late-1")["version"] == row["version"]


def test_mark_retryable_after_the_ttl_resumes_from_the_recovery_point_at_attempt_2(
    app: Flask, client: FlaskClient, clock: Any
) -> None:
    controls = ext(app)["controls"]
    hang = controls.hold("phases-after-charge")
    owner = Background(app, "/phases", key="ph-1", json={"amount": 7})
    assert hang.entered.wait(10)  # charged and checkpointed "charged", then the worker hangs
    try:
        clock.advance(hours=26)
        stuck = record(app, "ph-1")
        assert (stuck["state"], stuck["recovery_point"]) == ("IN_PROGRESS", "charged")
        charge_id = stuck["recovery_data"]["charge"]
        in_app(app, ops.mark_retryable, stuck["id"], actor="oncall")
        marked = record(app, "ph-1")
        assert (marked["state"], marked["retryable"]) == ("FAILED", True)
        assert marked["expires_at"] - marked["updated_at"] == TTL and reads(clock, marked["updated_at"])

        retry = post(client, "/phases", "ph-1", json={"amount": 7})
        assert retry.status_code == 201 and "Idempotent-Replayed" not in retry.headers
        assert retry.get_json() == {"charge": charge_id, "attempt": 2}
        assert controls.seen[-1] == {"point": "charged", "data": {"charge": charge_id}, "attempt": 2}
        done = record(app, "ph-1")
        assert (done["state"], done["attempts"], done["recovery_point"]) == ("COMPLETED", 2, "charged")
        assert done["created_at"] == stuck["created_at"]  # the same record, resumed; not a new one
        assert charges(app, "phases") == 1
    finally:
        hang.release.set()
    assert owner.result().status_code == 201  # the first owner's late outcome is refused
    assert (record(app, "ph-1")["state"], record(app, "ph-1")["attempts"]) == ("COMPLETED", 2)
    assert charges(app, "phases") == 1


def final_failure(app: Flask, client: FlaskClient, path: str = "/payments", key: str = "p500") -> TestResponse:
    """A leased view that answered 500: FAILED final, awaiting a decision (its effect may have happened)."""
    controls = ext(app)["controls"]
    controls.status = 500
    first = post(client, path, key, json={"amount": 9})
    controls.status = None
    assert first.status_code == 500
    return first


def test_a_leased_500_awaiting_a_decision_is_replayed_after_its_ttl_and_purge_keeps_it(
    app: Flask, client: FlaskClient, clock: Any
) -> None:
    controls = ext(app)["controls"]
    first = final_failure(app, client)
    clock.advance(hours=25)

    retry = post(client, "/payments", "p500", json={"amount": 9})
    assert retry.status_code == 500 and retry.headers.get("Idempotent-Replayed") == "true"
    assert retry.data == first.data
    assert in_app(app, ops.purge) == 0
    row = record(app, "p500")
    assert (row["state"], row["retryable"], row["acknowledged_at"]) == ("FAILED", False, None)
    assert row["expires_at"] < clock.now  # past it, and kept: the outcome may be ambiguous
    assert [r["key"] for r in in_app(app, ops.list_failed, awaiting=True).items] == ["p500"]
    assert in_app(app, ops.get, row["id"])["never_expires"] is True
    assert controls.runs["payments"] == 1 and charges(app, "payments") == 1


def test_purge_takes_a_final_failure_a_ttl_after_it_was_acknowledged(
    app: Flask, client: FlaskClient, clock: Any
) -> None:
    controls = ext(app)["controls"]
    first = final_failure(app, client)
    clock.advance(hours=25)
    ext(app)["idempotency"].dashboard_access(lambda: "oncall")
    page = f"/idempotency/records/{record(app, 'p500')['id']}"
    assert "never expires while it awaits a decision" in client.get(page).get_data(as_text=True)
    acked = in_app(app, ops.acknowledge, record(app, "p500")["id"], actor="oncall")
    assert acked["never_expires"] is False
    assert "never expires" not in client.get(page).get_data(as_text=True)
    row = record(app, "p500")
    assert row["acknowledged_by"] == "oncall" and reads(clock, row["acknowledged_at"])
    assert row["expires_at"] - row["updated_at"] == TTL and reads(clock, row["updated_at"])

    assert in_app(app, ops.purge) == 0  # acknowledging started its ttl: it is kept a day from now
    retry = post(client, "/payments", "p500", json={"amount": 9})
    assert retry.status_code == 500 and retry.headers.get("Idempotent-Replayed") == "true"
    assert retry.data == first.data
    clock.advance(hours=23, minutes=59)
    assert in_app(app, ops.purge) == 0 and record(app, "p500") is not None
    clock.advance(minutes=2)
    assert in_app(app, ops.purge) == 1 and records(app) == []
    assert controls.runs["payments"] == 1 and charges(app, "payments") == 1


def test_an_operator_decision_keeps_the_routes_own_ttl(late: Flask, client: FlaskClient, clock: Any) -> None:
    controls = ext(late)["controls"]
    final_failure(late, client, "/weekly", "w-1")
    clock.advance(days=8)
    in_app(late, ops.acknowledge, record(late, "w-1")["id"], actor="oncall")
    row = record(late, "w-1")
    assert row["expires_at"] - row["updated_at"] == WEEK and reads(clock, row["updated_at"])
    clock.advance(days=6)
    assert in_app(late, ops.purge) == 0
    replay = post(client, "/weekly", "w-1", json={"amount": 9})
    assert replay.status_code == 500 and replay.headers.get("Idempotent-Replayed") == "true"
    clock.advance(days=1, seconds=1)
    assert in_app(late, ops.purge) == 1 and records(late) == []
    assert controls.runs["weekly"] == 1
