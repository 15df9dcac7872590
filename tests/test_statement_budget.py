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
def recorded_statements(app: Flask) -> Iterator[list[tuple[str, Any]]]:
    """Collect ``(statement, parameters)`` of what touches the extension's tables, on both of its engines."""
    seen: list[tuple[str, Any]] = []
    with app.app_context():
        # The app's engine (atomic mode, operations) and the one leased mode's autocommit statements use.
        state = app.extensions["idempotency"].state(app)
        engines = {ext(app)["db"].engine, state.engine}
        state.check_schema()  # once per process, before the first claim: not a per-request cost

    cursors: list[Any] = []  # on SQLite the second engine is a view of the first: events arrive twice

    def listener(conn: Any, cursor: Any, statement: str, parameters: Any, *args: Any) -> None:
        if "idempotency_" in statement and not any(seen_cursor is cursor for seen_cursor in cursors):
            cursors.append(cursor)  # kept alive, so no later cursor reuses its identity
            seen.append((statement, parameters))

    for engine in engines:
        sa.event.listen(engine, "before_cursor_execute", listener)
    try:
        yield seen
    finally:
        for engine in engines:
            sa.event.remove(engine, "before_cursor_execute", listener)


@contextmanager
def layer_statements(app: Flask) -> Iterator[list[str]]:
    """The verbs of :func:`recorded_statements`, filled in when the block ends."""
    verbs: list[str] = []
    with recorded_statements(app) as recorded:
        yield verbs
    verbs.extend(statement.split(None, 1)[0].upper() for statement, _ in recorded)


def is_postgresql(app: Flask) -> bool:
    with app.app_context():
        return bool(ext(app)["db"].engine.dialect.name == "postgresql")


def record_version(app: Flask) -> Any:
    """The stored row's physical version on PostgreSQL (``xmin``: changes with any write), else the row."""
    with app.app_context():
        db = ext(app)["db"]
        column = "xmin::text" if is_postgresql(app) else "*"
        return db.session.execute(sa.text(f"SELECT {column} FROM idempotency_records")).all()


#: The claim of a request. PostgreSQL: a first request is the common case, so the claim starts with the
#: INSERT (ON CONFLICT DO NOTHING; in atomic mode also taking the key's advisory lock) and reads the record only
#: when the key is taken. SQLite: the read, then the insert for a new key (an INSERT there takes the database's
#: write lock, which replays must not queue for).
def claim_statements(app: Flask, *, new: bool) -> list[str]:
    if is_postgresql(app):
        return ["INSERT"] if new else ["INSERT", "SELECT"]
    return ["SELECT", "INSERT"] if new else ["SELECT"]


def test_first_request_costs_one_claim_one_completion(app: Flask, client: FlaskClient) -> None:
    with layer_statements(app) as seen:
        assert post(client, "/payments", json={"amount": 1}).status_code == 201
    assert seen == [*claim_statements(app, new=True), "UPDATE"]


def test_replay_reads_once_and_writes_nothing(app: Flask, client: FlaskClient) -> None:
    post(client, "/payments", json={"amount": 1})
    before = record_version(app)
    with layer_statements(app) as seen:
        assert post(client, "/payments", json={"amount": 1}).headers["Idempotent-Replayed"] == "true"
    assert seen == claim_statements(app, new=False)
    assert record_version(app) == before  # the record's row was not written (PostgreSQL: same xmin)
    with app.app_context():
        assert ext(app)["db"].session.execute(sa.text("SELECT count(*) FROM idempotency_records")).scalar() == 1


def test_atomic_costs_the_same(app: Flask, client: FlaskClient) -> None:
    with layer_statements(app) as seen:
        assert post(client, "/transfers", json={"amount": 1}).status_code == 201
    # PostgreSQL: the claim also takes the key's advisory lock, in the same statement.
    assert seen == [*claim_statements(app, new=True), "UPDATE"]
    before = record_version(app)
    with layer_statements(app) as seen:
        assert post(client, "/transfers", json={"amount": 1}).headers["Idempotent-Replayed"] == "true"
    assert seen == claim_statements(app, new=False)
    assert record_version(app) == before


def test_unprotected_and_keyless_requests_cost_nothing(app: Flask, client: FlaskClient) -> None:
    with layer_statements(app) as seen:
        client.get("/payments")
        post(client, "/optional", key=None, json={})
        post(client, "/payments", key=None, json={})  # 400 missing-key
    assert seen == []


def test_key_reuse_costs_one_read_and_one_counted_event(app: Flask, client: FlaskClient) -> None:
    post(client, "/payments", json={"amount": 1})
    with layer_statements(app) as seen:
        assert post(client, "/payments", json={"amount": 2}).status_code == 422
    # PostgreSQL: the claim's insert and read, then one statement that counts the event on the record and stores
    # it under the cap (an UPDATE in a CTE feeding the INSERT: one commit); SQLite: the read, the count, the event.
    assert seen == (["INSERT", "SELECT", "WITH"] if is_postgresql(app) else ["SELECT", "UPDATE", "INSERT"])
