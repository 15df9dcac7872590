"""A leased claim whose reply is lost: the claim statement committed, but the layer saw a DBAPI error.

The layer then re-reads the record on a fresh connection. If the row carries this claim's lease token the
claim did commit and the request goes on as the owner (its view runs once); otherwise it answers 503
``store-unavailable`` and the key stays free (never wedged in progress by a claim that did not happen).

In process, a SQLAlchemy event listener on the layer's autocommit engine raises once, right after (reply lost)
or right before (statement never sent) the claim statement. Over the network, :class:`ReplyDroppingProxy`
lets the claim's INSERT reach PostgreSQL and commit, then drops the reply and closes the connection.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from concurrency import Background
from flask import Flask, abort, request
from flask.testing import FlaskClient
from helpers import charges, events, ext, post, problem_code, record
from procs import ReplyDroppingProxy
from testapp import Controls, build_app

from flask_idempotent import TransientError
from flask_idempotent.machine import lease_holder

INSERT_CLAIM = "INSERT INTO idempotency_records"
UPDATE_CLAIM = "UPDATE idempotency_records"


@contextlib.contextmanager
def fail_once(app: Flask, event: str, prefix: str) -> Iterator[list[str]]:
    """Raise a DBAPI error once, at ``event`` of the first statement that contains ``prefix``.

    Listens on the layer's autocommit engine (on SQLite a view of the app's engine with its own listeners),
    so the app's own statements (the view's, the test's reads) are never touched. Yields the statements it
    failed: a test asserts the fault did fire.
    """
    with app.app_context():
        engine = app.extensions["idempotency"].state(app).engine
    failed: list[str] = []

    def listener(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if not failed and prefix in statement:
            failed.append(statement)
            raise sa.exc.OperationalError(statement, None, Exception("reply lost"))

    sa.event.listen(engine, event, listener)
    try:
        yield failed
    finally:
        sa.event.remove(engine, event, listener)


def assert_replays(client: FlaskClient, key: str, first: Any) -> None:
    replay = post(client, "/payments", key, json={"amount": 7})
    assert replay.status_code == first.status_code
    assert replay.headers["Idempotent-Replayed"] == "true"
    assert replay.get_json() == first.get_json()


def test_lost_reply_to_the_insert_claim_goes_on_as_the_owner(app: Flask, client: FlaskClient) -> None:
    controls: Controls = ext(app)["controls"]
    with fail_once(app, "after_cursor_execute", INSERT_CLAIM) as failed:
        response = post(client, "/payments", "lost-insert", json={"amount": 7})
    assert len(failed) == 1  # the INSERT ran (autocommit: it committed) and then "lost" its reply

    assert response.status_code == 201, response.data
    assert "Idempotent-Replayed" not in response.headers
    assert response.get_json()["attempt"] == 1
    assert controls.runs["payments"] == 1 and charges(app) == 1
    row = record(app, "lost-insert")
    assert row is not None
    assert (row["state"], row["attempts"], row["version"]) == ("COMPLETED", 1, 2)  # inserted at 1, settled: 2
    assert row["response_status"] == 201
    assert row["lease_token"] is not None and lease_holder(row["lease_token"]) is not None  # this claim's token, kept

    assert_replays(client, "lost-insert", response)
    assert controls.runs["payments"] == 1 and charges(app) == 1


def test_insert_claim_that_never_ran_answers_503_and_leaves_the_key_free(app: Flask, client: FlaskClient) -> None:
    controls: Controls = ext(app)["controls"]
    with fail_once(app, "before_cursor_execute", INSERT_CLAIM) as failed:
        response = post(client, "/payments", "never-inserted", json={"amount": 7})
    assert len(failed) == 1

    assert response.status_code == 503, response.data
    assert problem_code(response) == "store-unavailable"
    assert response.headers["Retry-After"] == "1"
    assert controls.runs["payments"] == 0 and charges(app) == 0
    assert record(app, "never-inserted") is None

    retry = post(client, "/payments", "never-inserted", json={"amount": 7})  # not wedged: runs normally
    assert retry.status_code == 201, retry.data
    assert "Idempotent-Replayed" not in retry.headers
    assert controls.runs["payments"] == 1 and charges(app) == 1
    row = record(app, "never-inserted")
    assert row is not None
    assert (row["state"], row["attempts"], row["version"]) == ("COMPLETED", 1, 2)
    assert_replays(client, "never-inserted", retry)


def fail_first_attempt(app: Flask, client: FlaskClient, key: str) -> dict[str, Any]:
    """A first attempt that answers 503: the record is FAILED and retryable, at version 2."""
    controls: Controls = ext(app)["controls"]
    controls.status = 503
    first = post(client, "/payments", key, json={"amount": 7})
    controls.status = None
    assert first.status_code == 503
    row = record(app, key)
    assert row is not None
    assert (row["state"], row["retryable"], row["attempts"], row["version"]) == ("FAILED", True, 1, 2)
    return row


def test_lost_reply_to_the_retry_claim_goes_on_as_the_owner(app: Flask, client: FlaskClient) -> None:
    controls: Controls = ext(app)["controls"]
    failed_row = fail_first_attempt(app, client, "lost-update")

    with fail_once(app, "after_cursor_execute", UPDATE_CLAIM) as failed:
        response = post(client, "/payments", "lost-update", json={"amount": 7})
    assert len(failed) == 1
    assert "lease_token" in failed[0]  # the claim's UPDATE (it sets the new token), not the outcome's

    assert response.status_code == 201, response.data
    assert "Idempotent-Replayed" not in response.headers
    assert response.get_json()["attempt"] == 2
    assert controls.runs["payments"] == 2 and charges(app) == 2  # the failed attempt, then this one: once
    row = record(app, "lost-update")
    assert row is not None
    assert row["id"] == failed_row["id"]
    # 1 inserted, 2 failed, 3 claimed again (the lost reply), 4 completed.
    assert (row["state"], row["attempts"], row["version"]) == ("COMPLETED", 2, 4)
    assert row["response_status"] == 201
    assert row["lease_token"] != failed_row["lease_token"]

    assert_replays(client, "lost-update", response)
    assert controls.runs["payments"] == 2 and charges(app) == 2


def test_retry_claim_that_never_ran_answers_503_and_leaves_the_record_as_it_was(
    app: Flask, client: FlaskClient
) -> None:
    """The re-read finds the record, but with the previous attempt's token: not this claim's, so no owner."""
    controls: Controls = ext(app)["controls"]
    failed_row = fail_first_attempt(app, client, "never-updated")

    with fail_once(app, "before_cursor_execute", UPDATE_CLAIM) as failed:
        response = post(client, "/payments", "never-updated", json={"amount": 7})
    assert len(failed) == 1

    assert response.status_code == 503, response.data
    assert problem_code(response) == "store-unavailable"
    assert controls.runs["payments"] == 1 and charges(app) == 1  # only the first attempt ran
    assert record(app, "never-updated") == failed_row

    retry = post(client, "/payments", "never-updated", json={"amount": 7})
    assert retry.status_code == 201, retry.data
    assert retry.get_json()["attempt"] == 2
    assert controls.runs["payments"] == 2 and charges(app) == 2
    row = record(app, "never-updated")
    assert row is not None
    assert (row["state"], row["attempts"], row["version"]) == ("COMPLETED", 2, 4)
    assert_replays(client, "never-updated", retry)


# A recovered claim is withdrawn like any other ---------------------------------------------------------------


def reject_when_asked(app: Flask) -> None:
    """An app hook registered after ``init_app`` (so it runs after the claim): ``X-Reject`` answers 401."""

    @app.before_request
    def authenticate() -> None:
        if request.headers.get("X-Reject"):
            abort(401)


def test_a_recovered_retry_claim_that_a_hook_rejects_puts_the_failed_record_back(
    app: Flask, client: FlaskClient
) -> None:
    """The retry's claim committed but its reply was lost; then a hook answers 401 before the view runs. The
    record goes back to FAILED retryable with its recovery point: the next retry resumes after the charge."""
    controls: Controls = ext(app)["controls"]
    reject_when_asked(app)
    held = controls.hold("phases-after-charge")
    first = Background(app, "/phases", json={"order": 1})
    assert held.entered.wait(10)  # charged and checkpointed "charged"; now the provider call times out
    controls.exception = TransientError("provider timed out")
    held.release.set()
    assert first.result().status_code == 503
    controls.exception = None
    failed_row = record(app, "k-1")
    assert failed_row is not None
    assert (failed_row["state"], failed_row["retryable"], failed_row["attempts"]) == ("FAILED", True, 1)
    assert failed_row["recovery_point"] == "charged"

    with fail_once(app, "after_cursor_execute", UPDATE_CLAIM) as failed:
        rejected = post(client, "/phases", json={"order": 1}, headers={"X-Reject": "1"})
    assert len(failed) == 1 and "lease_token" in failed[0]  # the retry's claim, which committed
    assert rejected.status_code == 401, rejected.data
    assert record(app, "k-1") == failed_row  # exactly as it was, attempts and version included

    retry = post(client, "/phases", json={"order": 1})
    assert retry.status_code == 201, retry.data
    assert retry.get_json() == {"charge": failed_row["recovery_data"]["charge"], "attempt": 2}
    assert controls.seen[-1]["point"] == "charged"
    assert charges(app, "phases") == 1  # resumed after the charge: charged once
    final = record(app, "k-1")
    assert final is not None and (final["state"], final["attempts"]) == ("COMPLETED", 2)


def test_a_recovered_takeover_that_a_hook_rejects_leaves_the_stuck_record(
    app: Flask, client: FlaskClient, clock: Any
) -> None:
    """``on_stale="takeover"``: the takeover's claim committed, its reply was lost, a hook answered 401. The
    stuck record stays as it was (its owner's lease token and recovery point), and that owner can still finish."""
    controls: Controls = ext(app)["controls"]
    reject_when_asked(app)
    held = controls.hold("phases-after-charge")
    owner = Background(app, "/phases", json={"order": 1})
    try:
        assert held.entered.wait(10)
        clock.advance(seconds=31)  # the owner's 30 s lease is over: the record is stuck
        stuck = record(app, "k-1")
        assert stuck is not None and (stuck["state"], stuck["recovery_point"]) == ("IN_PROGRESS", "charged")

        with fail_once(app, "after_cursor_execute", UPDATE_CLAIM) as failed:
            rejected = post(client, "/phases", json={"order": 1}, headers={"X-Reject": "1"})
        assert len(failed) == 1 and "lease_token" in failed[0]
        assert rejected.status_code == 401, rejected.data
        assert record(app, "k-1") == stuck  # the stuck record, its owner's token and recovery point, as it was
        assert controls.runs["phases-resumed"] == 0
    finally:
        held.release.set()  # also when an assertion failed: a parked owner would block dropping the tables
    assert owner.result().status_code == 201  # the first owner still holds its lease token: it completes
    final = record(app, "k-1")
    assert final is not None and (final["state"], final["attempts"]) == ("COMPLETED", 1)
    assert charges(app, "phases") == 1


# Over the network ---------------------------------------------------------------------------------------------


@pytest.fixture
def proxied(postgres_url: str, clock: Any) -> Iterator[tuple[Flask, ReplyDroppingProxy]]:
    """An in-process app reaching PostgreSQL through a :class:`ReplyDroppingProxy`, tables made around it."""
    real = sa.make_url(postgres_url)
    proxy = ReplyDroppingProxy(real.host or "127.0.0.1", real.port or 5432)
    direct = sa.create_engine(real)
    try:
        # sslmode=disable: the proxy reads the statements as plain text (psycopg2: simple query protocol).
        through = real.set(port=proxy.port).update_query_dict({"sslmode": "disable", "connect_timeout": "5"})
        app = build_app(through.render_as_string(hide_password=False), clock=clock, controls=Controls())
        metadata = ext(app)["db"].metadata
        metadata.drop_all(direct)
        metadata.create_all(direct)
        try:
            yield app, proxy
        finally:
            with app.app_context():
                ext(app)["db"].engine.dispose()  # also disposes the layer's autocommit engine
            metadata.drop_all(direct)
    finally:
        proxy.close()
        direct.dispose()


@pytest.mark.postgresql_only
def test_insert_claim_whose_reply_the_network_lost_goes_on_as_the_owner(
    proxied: tuple[Flask, ReplyDroppingProxy],
) -> None:
    app, proxy = proxied
    controls: Controls = ext(app)["controls"]
    client = app.test_client()
    # Warm both pools (the app's and the layer's own) so the armed connection is one already in use.
    warm = post(client, "/payments", "warm-up", json={"amount": 1})
    assert warm.status_code == 201, warm.data
    connections = proxy.accepted

    proxy.arm(INSERT_CLAIM.encode())
    response = post(client, "/payments", "lost-on-the-wire", json={"amount": 7})
    assert proxy.dropped.wait(10), "the proxy never dropped the claim's reply"
    assert b"lost-on-the-wire" in proxy.statement  # it was this request's claim
    assert b"INSERT 0 1" in proxy.dropped_reply  # its CommandComplete: it committed
    assert response.status_code == 201, response.data
    assert proxy.accepted > connections  # the re-read (and what followed) needed a fresh connection
    assert "Idempotent-Replayed" not in response.headers
    assert response.get_json()["attempt"] == 1
    assert controls.runs["payments"] == 2 and charges(app, "payments") == 2  # warm-up + this request, once
    row = record(app, "lost-on-the-wire")
    assert row is not None
    assert (row["state"], row["attempts"], row["version"]) == ("COMPLETED", 1, 2)
    assert row["response_status"] == 201
    assert [e["kind"] for e in events(app) if e["key"] == "lost-on-the-wire"] == []

    replay = post(client, "/payments", "lost-on-the-wire", json={"amount": 7})
    assert (replay.status_code, replay.headers["Idempotent-Replayed"]) == (201, "true")
    assert replay.get_json() == response.get_json()
    assert controls.runs["payments"] == 2 and charges(app, "payments") == 2
