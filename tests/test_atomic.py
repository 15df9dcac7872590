"""Atomic mode: the claim, the view's writes and the outcome commit together, or not at all."""

from __future__ import annotations

import pytest
from concurrency import Background, observe_polling
from flask import Flask
from flask.testing import FlaskClient
from helpers import charges, ext, post, problem_code, record

#: Also on the distributed-SQL emulations of ``IDEMPOTENCY_TEST_PG_VARIANTS`` (conftest).
PG_VARIANTS = True


def test_atomic_success_commits_writes_and_outcome_together(app: Flask, client: FlaskClient) -> None:
    first = post(client, "/transfers", json={"amount": 30})
    assert first.status_code == 201
    assert charges(app, "transfers") == 1
    row = record(app, "k-1")
    assert (row["state"], row["attempts"], row["response_status"]) == ("COMPLETED", 1, 201)
    again = post(client, "/transfers", json={"amount": 30})
    assert again.headers["Idempotent-Replayed"] == "true" and again.data == first.data
    assert charges(app, "transfers") == 1


@pytest.mark.parametrize("status", [500, 409, 503])
def test_atomic_failed_status_rolls_back_the_view_and_stays_retryable(
    app: Flask, client: FlaskClient, status: int
) -> None:
    controls = ext(app)["controls"]
    controls.status = status
    assert post(client, "/transfers", json={"amount": 30}).status_code == status
    assert charges(app, "transfers") == 0
    row = record(app, "k-1")
    assert (row["state"], row["retryable"], row["attempts"]) == ("FAILED", True, 1)
    controls.status = None
    retry = post(client, "/transfers", json={"amount": 30})
    assert retry.status_code == 201 and retry.get_json()["attempt"] == 2
    assert charges(app, "transfers") == 1
    assert record(app, "k-1")["state"] == "COMPLETED"


@pytest.mark.parametrize("app_config", [{"PROPAGATE_EXCEPTIONS": False}])
def test_atomic_exception_rolls_back_everything_and_stays_retryable(app: Flask, client: FlaskClient) -> None:
    controls = ext(app)["controls"]
    controls.exception = RuntimeError("ledger invariant violated")
    assert post(client, "/transfers", json={"amount": 30}).status_code == 500
    assert charges(app) == 0
    row = record(app, "k-1")
    assert (row["state"], row["retryable"]) == ("FAILED", True)
    assert "RuntimeError" in row["error"]
    controls.exception = None
    assert post(client, "/transfers", json={"amount": 30}).status_code == 201
    assert charges(app) == 1


def test_atomic_exception_propagating_is_rolled_back_in_teardown(app: Flask, client: FlaskClient) -> None:
    ext(app)["controls"].exception = RuntimeError("boom")
    with pytest.raises(RuntimeError):
        post(client, "/transfers", json={"amount": 30})
    assert charges(app) == 0
    assert (record(app, "k-1")["state"], record(app, "k-1")["retryable"]) == ("FAILED", True)


@pytest.mark.parametrize("app_config", [{"PROPAGATE_EXCEPTIONS": False}])
def test_atomic_view_that_commits_gets_a_clear_error_and_nothing_is_persisted(app: Flask, client: FlaskClient) -> None:
    ext(app)["controls"].commit_in_view = True
    assert post(client, "/transfers", json={"amount": 30}).status_code == 500
    assert charges(app) == 0
    row = record(app, "k-1")
    assert (row["state"], row["retryable"]) == ("FAILED", True)
    assert "AtomicViewCommitted" in row["error"]


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_atomic_duplicate_in_flight_gets_409_without_running(app: Flask, client: FlaskClient) -> None:
    controls = ext(app)["controls"]
    controls.hold_at = "transfers"
    first = Background(app, "/transfers", json={"amount": 30})
    assert controls.entered.wait(10)
    duplicate = post(client, "/transfers", json={"amount": 30})
    assert duplicate.status_code == 409 and problem_code(duplicate) == "in-progress"
    assert duplicate.headers["Retry-After"] == "1"
    controls.release.set()
    assert first.result().status_code == 201
    assert controls.runs["transfers"] == 1 and charges(app) == 1


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
@pytest.mark.parametrize("app_config", [{"IDEMPOTENCY_WAIT": 10}])
def test_atomic_duplicate_waits_for_the_first_commit_and_replays(app: Flask, monkeypatch: pytest.MonkeyPatch) -> None:
    waiting = observe_polling(monkeypatch)
    controls = ext(app)["controls"]
    controls.hold_at = "transfers"
    first = Background(app, "/transfers", json={"amount": 30})
    assert controls.entered.wait(10)
    duplicate = Background(app, "/transfers", json={"amount": 30})
    assert waiting.wait(10)
    controls.release.set()
    original, replay = first.result(), duplicate.result()
    assert replay.status_code == 201 and replay.headers["Idempotent-Replayed"] == "true"
    assert replay.data == original.data
    assert controls.runs["transfers"] == 1 and charges(app) == 1


def test_atomic_failure_after_replacing_an_expired_record_keeps_the_new_command(
    app: Flask, client: FlaskClient, clock
) -> None:
    post(client, "/transfers", json={"amount": 30})
    old = record(app, "k-1")
    clock.advance(hours=25)
    controls = ext(app)["controls"]
    controls.status = 409
    assert post(client, "/transfers", json={"amount": 99}).status_code == 409
    failed = record(app, "k-1")
    assert (failed["state"], failed["retryable"], failed["attempts"]) == ("FAILED", True, 1)
    assert failed["request_hash"] != old["request_hash"]
    assert clock.reads(failed["created_at"])
    controls.status = None
    assert post(client, "/transfers", json={"amount": 99}).status_code == 201  # the same command, not a conflict
    assert charges(app, "transfers") == 2


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_replay_never_waits_for_a_concurrent_reader_of_the_same_key(app: Flask, client: FlaskClient) -> None:
    import sqlalchemy as sa

    from flask_idempotent.store import advisory_key

    first = post(client, "/transfers", json={"amount": 30})
    with app.app_context():
        engine = ext(app)["db"].engine
    # What another request for this key holds for an instant while it reads the record.
    with engine.connect() as conn, conn.begin():
        conn.execute(sa.text("SELECT pg_advisory_xact_lock(:k)"), {"k": advisory_key("", "k-1")})
        replay = post(client, "/transfers", json={"amount": 30})
        conflict = post(client, "/transfers", json={"amount": 31})
    assert replay.status_code == 201 and replay.headers["Idempotent-Replayed"] == "true"
    assert replay.data == first.data
    assert conflict.status_code == 422
    assert charges(app, "transfers") == 1
