"""IN_PROGRESS records: live leases, waiting, stale leases (hold or takeover) and fencing."""

from __future__ import annotations

import threading
from datetime import timedelta
from typing import Any

import pytest
from concurrency import Background, observe_polling
from flask import Flask
from flask.testing import FlaskClient
from helpers import charges, events, ext, in_app, post, problem_code, reads, record

from flask_idempotent import operations as ops
from flask_idempotent import signals

#: Also on the distributed-SQL emulations of ``IDEMPOTENCY_TEST_PG_VARIANTS`` (conftest).
PG_VARIANTS = True


def test_duplicate_while_in_progress_gets_409_with_retry_after(app: Flask, client: FlaskClient) -> None:
    controls = ext(app)["controls"]
    held = controls.hold("payments")
    first = Background(app, "/payments", json={"amount": 5})
    assert held.entered.wait(10)
    duplicate = post(client, "/payments", json={"amount": 5})
    assert duplicate.status_code == 409
    assert problem_code(duplicate) == "in-progress"
    assert duplicate.headers["Retry-After"] == "1"
    row = record(app, "k-1")
    assert row["state"] == "IN_PROGRESS" and row["locked_until"] is not None
    assert [e["kind"] for e in events(app)] == ["in_progress_hit"]
    held.release.set()
    assert first.result().status_code == 201
    assert post(client, "/payments", json={"amount": 5}).headers["Idempotent-Replayed"] == "true"
    assert controls.runs["payments"] == 1 and charges(app) == 1


@pytest.mark.parametrize("app_config", [{"IDEMPOTENCY_IN_PROGRESS_STATUS": 202}])
def test_in_progress_status_202_when_configured(app: Flask, client: FlaskClient) -> None:
    controls = ext(app)["controls"]
    held = controls.hold("payments")
    first = Background(app, "/payments", json={})
    assert held.entered.wait(10)
    duplicate = post(client, "/payments", json={})
    assert duplicate.status_code == 202
    assert duplicate.headers["Retry-After"] == "1"
    held.release.set()
    first.result()
    assert controls.runs["payments"] == 1


@pytest.mark.parametrize("app_config", [{"IDEMPOTENCY_WAIT": 10}])
def test_duplicate_waits_for_the_first_and_replays_its_outcome(
    app: Flask, client: FlaskClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    waiting = observe_polling(monkeypatch)
    controls = ext(app)["controls"]
    held = controls.hold("payments")
    first = Background(app, "/payments", json={"amount": 5})
    assert held.entered.wait(10)
    duplicate = Background(app, "/payments", json={"amount": 5})
    assert waiting.wait(10)
    held.release.set()
    original, replay = first.result(), duplicate.result()
    assert replay.status_code == 201 and replay.headers["Idempotent-Replayed"] == "true"
    assert replay.data == original.data
    assert controls.runs["payments"] == 1 and charges(app) == 1


def test_stale_lease_is_held_as_stuck_and_never_re_executed(app: Flask, client: FlaskClient, clock) -> None:
    controls = ext(app)["controls"]
    held = controls.hold("payments")
    first = Background(app, "/payments", json={"amount": 5})
    assert held.entered.wait(10)
    clock.advance(seconds=61)  # the lease (60 s) ran out: the owner is presumed dead
    stuck = post(client, "/payments", json={"amount": 5})
    assert stuck.status_code == 409
    assert problem_code(stuck) == "stuck"
    assert record(app, "k-1")["state"] == "IN_PROGRESS"
    assert [e["kind"] for e in events(app)] == ["stale_hit"]
    stuck_list = in_app(app, ops.list_stuck)
    assert [r["key"] for r in stuck_list.items] == ["k-1"]
    held.release.set()
    first.result()
    assert controls.runs["payments"] == 1


def test_operator_marks_stuck_record_retryable_and_the_retry_runs_once(app: Flask, client: FlaskClient, clock) -> None:
    controls = ext(app)["controls"]
    held = controls.hold("payments")
    lost: list[Any] = []
    first = Background(app, "/payments", json={"amount": 5})
    assert held.entered.wait(10)
    clock.advance(minutes=5)
    assert post(client, "/payments", json={"amount": 5}).status_code == 409
    row = record(app, "k-1")
    marked = in_app(app, ops.mark_retryable, row["id"], actor="alice")
    assert (marked["state"], marked["retryable"]) == ("FAILED", True)
    retry = post(client, "/payments", json={"amount": 5})
    assert retry.status_code == 201 and retry.get_json()["attempt"] == 2
    after = record(app, "k-1")
    assert (after["state"], after["attempts"]) == ("COMPLETED", 2)
    assert [(e["kind"], e["actor"]) for e in events(app) if e["kind"] == "mark_retryable"] == [
        ("mark_retryable", "alice")
    ]
    # The presumed-dead owner wakes up: its late completion is fenced out.
    with signals.lease_lost.connected_to(lambda sender, **kw: lost.append(kw["record"]), app):
        held.release.set()
        first.result()
    assert len(lost) == 1
    assert record(app, "k-1")["attempts"] == 2
    assert record(app, "k-1")["response_body"] == after["response_body"]
    assert controls.runs["payments"] == 2


def test_takeover_resumes_from_the_recovery_point_and_fences_the_old_owner(
    app: Flask, client: FlaskClient, clock
) -> None:
    controls = ext(app)["controls"]
    held = controls.hold("phases-after-charge")
    old_owner = Background(app, "/phases", json={"order": 1})
    assert held.entered.wait(10)  # charged and checkpointed, then "crashed"
    row = record(app, "k-1")
    assert row["recovery_point"] == "charged"
    assert reads(clock, row["locked_until"], timedelta(seconds=30))
    clock.advance(seconds=31)
    takeover = post(client, "/phases", json={"order": 1})
    assert takeover.status_code == 201
    assert takeover.get_json() == {"charge": row["recovery_data"]["charge"], "attempt": 2}
    assert controls.seen[-1] == {"point": "charged", "data": row["recovery_data"], "attempt": 2}
    assert charges(app, "phases") == 1  # resumed after the charge, not charged twice
    final = record(app, "k-1")
    assert (final["state"], final["attempts"]) == ("COMPLETED", 2)
    assert [e["kind"] for e in events(app)] == ["checkpoint", "takeover"]  # the first owner reached "charged"
    held.release.set()
    assert old_owner.result().status_code == 201
    assert record(app, "k-1") == final  # the old owner's late completion changed nothing


def test_checkpoint_after_losing_the_lease_raises_lease_lost(app: Flask, clock) -> None:
    from flask_idempotent import LeaseLost, current_record, idempotent

    results: list[str] = []
    gate, resume = threading.Event(), threading.Event()

    @app.post("/two-phase")
    @idempotent
    def two_phase() -> Any:
        gate.set()
        assert resume.wait(10)
        try:
            current_record.checkpoint("late")
        except LeaseLost:
            results.append("lease-lost")
            raise
        return {}, 201

    app.config["PROPAGATE_EXCEPTIONS"] = False
    owner = Background(app, "/two-phase", json={})
    assert gate.wait(10)
    clock.advance(seconds=61)
    in_app(app, ops.mark_failed, record(app, "k-1")["id"], actor="bob")
    resume.set()
    assert owner.result().status_code == 500
    assert results == ["lease-lost"]
    row = record(app, "k-1")
    assert (row["state"], row["retryable"], row["recovery_point"]) == ("FAILED", False, None)


def test_a_retry_never_replays_an_earlier_attempts_response(app: Flask, client: FlaskClient, clock) -> None:
    controls = ext(app)["controls"]
    controls.status = 503
    assert post(client, "/payments", json={"amount": 5}).status_code == 503
    controls.status = None
    held = controls.hold("payments")
    crashed = Background(app, "/payments", json={"amount": 5})  # attempt 2 claims, then "dies"
    assert held.entered.wait(10)
    row = record(app, "k-1")
    assert (row["state"], row["attempts"], row["response_status"]) == ("IN_PROGRESS", 2, None)
    clock.advance(seconds=61)
    in_app(app, ops.mark_failed, row["id"], actor="dave")
    answer = post(client, "/payments", json={"amount": 5})
    assert answer.status_code == 500 and problem_code(answer) == "failed"  # not attempt 1's 503
    held.release.set()
    crashed.result()
