"""``IDEMPOTENCY_OUTCOME_SYNCHRONOUS_COMMIT = False``: a leased outcome commits without waiting for its WAL flush
on PostgreSQL, in the outcome's own statement; the claim, the atomic outcome and every later transaction of the
connection stay synchronous. On SQLite and MySQL the setting changes nothing."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import sqlalchemy as sa
from flask import Flask
from flask.testing import FlaskClient
from helpers import charges, ext, post, record
from test_statement_budget import is_postgresql, recorded_statements
from testapp import Controls, build_app

from flask_idempotent.state import app_state


@pytest.fixture
def app_config() -> dict[str, object]:
    return {"IDEMPOTENCY_OUTCOME_SYNCHRONOUS_COMMIT": False}


@contextmanager
def writes_to_records(app: Flask) -> Iterator[list[tuple[str, Any]]]:
    """(statement, parameters) of every INSERT or UPDATE of the records table, filled in when the block ends."""
    writes: list[tuple[str, Any]] = []
    with recorded_statements(app) as recorded:
        yield writes
    for statement, parameters in recorded:
        verb, target = statement.split(None, 1)[0].upper(), statement.split("(", 1)[0]
        if verb in ("INSERT", "UPDATE") and "idempotency_records" in target:
            writes.append((statement, parameters))


def asynchronous(statement: str, parameters: Any) -> bool:
    return "set_config(" in statement and "synchronous_commit" in str(parameters)


def test_the_leased_outcome_alone_commits_asynchronously(app: Flask, client: FlaskClient) -> None:
    with writes_to_records(app) as writes:
        first = post(client, "/payments", key="k-1", json={"amount": 5})
    assert first.status_code == 201
    claim, outcome = writes[0], writes[-1]
    assert claim[0].startswith("INSERT") and not asynchronous(*claim)
    assert outcome[0].startswith("UPDATE")
    assert asynchronous(*outcome) is is_postgresql(app)  # SQLite: the setting changes nothing
    stored = record(app, "k-1")
    assert stored is not None and stored["state"] == "COMPLETED" and stored["response_status"] == 201
    again = post(client, "/payments", key="k-1", json={"amount": 5})
    assert again.headers["Idempotent-Replayed"] == "true" and again.data == first.data
    assert charges(app) == 1


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_every_later_transaction_of_the_connection_is_synchronous(app: Flask, client: FlaskClient) -> None:
    assert post(client, "/payments", key="k-1", json={"amount": 5}).status_code == 201
    with app.app_context():
        engine = app_state(app).engine
        checked_in = engine.pool.checkedin()
        # The pool holds the connection the outcome ran on: the setting was the outcome transaction's own.
        assert checked_in >= 1
        settings = []
        held = [engine.connect() for _ in range(checked_in)]
        try:
            for conn in held:
                settings.append(conn.exec_driver_sql("SHOW synchronous_commit").scalar())
        finally:
            for conn in held:
                conn.close()
    assert settings == ["on"] * checked_in


def test_an_atomic_outcome_commits_with_the_view_synchronously(app: Flask, client: FlaskClient) -> None:
    with writes_to_records(app) as writes:
        assert post(client, "/transfers", key="t-1", json={"amount": 5}).status_code == 201
    assert writes and not any(asynchronous(*w) for w in writes)
    stored = record(app, "t-1")
    assert stored is not None and stored["state"] == "COMPLETED"


def test_a_lost_lease_is_still_fenced(app: Flask, controls: Controls) -> None:
    # The asynchronous outcome is the same compare-and-set: a record an operator changed meanwhile is not
    # overwritten by the request that lost its lease.
    held = controls.hold("payments")
    answer: list[Any] = []
    other = app.test_client()  # its own request context, in the worker thread
    worker = threading.Thread(target=lambda: answer.append(post(other, "/payments", key="k-2", json={"amount": 5})))
    worker.start()
    assert held.entered.wait(10)
    with app.app_context():
        db = ext(app)["db"]
        db.session.execute(sa.text("UPDATE idempotency_records SET lease_token = 'operator', version = version + 1"))
        db.session.commit()
    held.release.set()
    worker.join(10)
    assert answer and answer[0].status_code == 201
    stored = record(app, "k-2")
    assert stored is not None and stored["state"] == "IN_PROGRESS" and stored["lease_token"] == "operator"


@pytest.mark.parametrize("value", ["off", 0, None])
def test_only_a_boolean_is_accepted(database_url: str, clock: Any, controls: Controls, value: Any) -> None:
    with pytest.raises(ValueError, match="IDEMPOTENCY_OUTCOME_SYNCHRONOUS_COMMIT must be True or False"):
        build_app(database_url, clock=clock, controls=controls, IDEMPOTENCY_OUTCOME_SYNCHRONOUS_COMMIT=value)
