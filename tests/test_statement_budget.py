"""The layer's cost in SQL statements: deterministic, so asserted exactly."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import sqlalchemy as sa
from flask import Flask
from flask.testing import FlaskClient
from helpers import ext, post


@contextmanager
def layer_statements(app: Flask) -> Iterator[list[str]]:
    """Collect the statements that touch the extension's tables."""
    seen: list[str] = []
    with app.app_context():
        engine = ext(app)["db"].engine

    def listener(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if "idempotency_" in statement:
            seen.append(statement.split(None, 1)[0].upper())

    sa.event.listen(engine, "before_cursor_execute", listener)
    try:
        yield seen
    finally:
        sa.event.remove(engine, "before_cursor_execute", listener)


def test_first_request_costs_one_read_one_claim_one_completion(app: Flask, client: FlaskClient) -> None:
    with layer_statements(app) as seen:
        assert post(client, "/payments", json={"amount": 1}).status_code == 201
    assert seen == ["SELECT", "INSERT", "UPDATE"]


def test_replay_reads_once_and_writes_nothing(app: Flask, client: FlaskClient) -> None:
    post(client, "/payments", json={"amount": 1})
    with layer_statements(app) as seen:
        assert post(client, "/payments", json={"amount": 1}).headers["Idempotent-Replayed"] == "true"
    assert seen == ["SELECT"]


def test_atomic_first_request_costs_the_same(app: Flask, client: FlaskClient) -> None:
    with layer_statements(app) as seen:
        assert post(client, "/transfers", json={"amount": 1}).status_code == 201
    assert seen == ["SELECT", "INSERT", "UPDATE"]


def test_unprotected_and_keyless_requests_cost_nothing(app: Flask, client: FlaskClient) -> None:
    with layer_statements(app) as seen:
        client.get("/payments")
        post(client, "/optional", key=None, json={})
        post(client, "/payments", key=None, json={})  # 400 missing-key
    assert seen == []
