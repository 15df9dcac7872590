"""The security pass: isolation between scopes, no leaks in logs, no code execution on stored data, bounded
growth under a hostile client, and an injection-proof search."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest
from flask import Flask
from flask.testing import FlaskClient
from helpers import charges, events, ext, post, record, records

import flask_idempotent
from flask_idempotent import operations as ops
from flask_idempotent.pipeline import MAX_CLIENT_EVENTS_PER_RECORD

SECRET = "4242-4242-4242-4242"


def test_a_client_can_never_read_another_scopes_stored_response(app: Flask, client: FlaskClient) -> None:
    alice = post(client, "/payments", key="shared", user="alice", json={"amount": 10, "card": SECRET})
    mallory = post(client, "/payments", key="shared", user="mallory", json={"amount": 10, "card": SECRET})
    # Mallory's identical request under Alice's key is a fresh execution in her own scope, not a replay.
    assert "Idempotent-Replayed" not in mallory.headers
    assert mallory.get_json()["id"] != alice.get_json()["id"]
    assert charges(app) == 2
    assert {(r["scope"], r["key"]) for r in records(app)} == {("alice", "shared"), ("mallory", "shared")}


def test_logs_never_carry_bodies_or_secrets(app: Flask, client: FlaskClient, caplog: pytest.LogCaptureFixture) -> None:
    controls = ext(app)["controls"]
    with caplog.at_level(logging.DEBUG, logger="flask_idempotent"):
        post(client, "/payments", json={"amount": 1, "card": SECRET})
        post(client, "/payments", json={"amount": 2, "card": SECRET})  # conflict
        controls.status = 500
        post(client, "/payments", key="k-2", json={"card": SECRET})
        with app.app_context():
            db = ext(app)["db"]
            db.metadata.tables["idempotency_records"].drop(db.engine)
        post(client, "/payments", key="k-3", json={"card": SECRET})  # store unavailable, logged
        with app.app_context():
            db.metadata.tables["idempotency_records"].create(db.engine)
    assert caplog.records, "expected the outage to be logged"
    assert all(SECRET not in r.getMessage() for r in caplog.records)


def test_problem_details_do_not_echo_stored_data(app: Flask, client: FlaskClient) -> None:
    post(client, "/payments", json={"amount": 1, "card": SECRET})
    conflict = post(client, "/payments", json={"amount": 2, "card": SECRET})
    assert conflict.status_code == 422 and SECRET not in conflict.get_data(as_text=True)


def test_no_pickle_or_eval_in_the_package() -> None:
    package = Path(flask_idempotent.__file__).parent
    for source in package.glob("*.py"):
        text = source.read_text()
        assert not re.search(r"\bimport pickle\b|\bpickle\.|\beval\(|\bexec\(|marshal\.loads", text), source


def test_a_hostile_client_cannot_grow_the_events_table_without_bound(app: Flask, client: FlaskClient) -> None:
    post(client, "/payments", json={"amount": 0})
    for amount in range(1, MAX_CLIENT_EVENTS_PER_RECORD + 30):
        assert post(client, "/payments", json={"amount": amount}).status_code == 422
    assert len(events(app)) == MAX_CLIENT_EVENTS_PER_RECORD
    assert record(app, "k-1")["event_count"] == MAX_CLIENT_EVENTS_PER_RECORD + 29  # counted, not stored


@pytest.mark.parametrize("query", ["' OR '1'='1", "k-1' --", "%", "_", "k-1; DROP TABLE idempotency_records"])
def test_search_is_injection_proof(app: Flask, client: FlaskClient, query: str) -> None:
    post(client, "/payments", json={})
    with app.app_context():
        assert ops.search(query).total == 0
    assert len(records(app)) == 1


def test_keys_with_markup_are_stored_verbatim_and_only_ever_compared(app: Flask, client: FlaskClient) -> None:
    key = "<script>alert(1)</script>"
    assert post(client, "/payments", key=key, json={}).status_code == 201
    assert record(app, key) is not None
    assert post(client, "/payments", key=key, json={}).headers["Idempotent-Replayed"] == "true"


def test_a_failed_outcome_write_logs_no_statement_parameters(
    app: Flask, client: FlaskClient, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    import sqlalchemy as sa

    from flask_idempotent.store import RecordStore

    def settle(*args: object, **kwargs: object) -> bool:
        raise sa.exc.OperationalError("UPDATE idempotency_records ...", {"response_body": SECRET}, Exception("gone"))

    monkeypatch.setattr(RecordStore, "settle", settle)
    with caplog.at_level(logging.DEBUG, logger="flask_idempotent"):
        response = post(client, "/payments", json={"card": SECRET})
    assert response.status_code == 201  # the view ran: the client gets its real answer
    assert record(app, "k-1")["state"] == "IN_PROGRESS"  # stuck once the lease ends, for an operator
    assert any("could not store the outcome" in r.getMessage() for r in caplog.records)
    assert all(SECRET not in r.getMessage() for r in caplog.records)
