"""Upgrading an installation from schema version 1 to 2, on SQLite, PostgreSQL and MariaDB.

A version-1 database is made by the example app's released revision 0001 and filled with version-1 records
(written without the new columns, the way version 1 wrote them). It is then upgraded, by the example's
Alembic revision 0002 (apps with Flask-Migrate) or by ``flask idempotency upgrade-schema`` (apps without), and
served by the test app: old records replay, stay stuck and take operator actions; new requests work.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import flask_migrate
import pytest
import sqlalchemy as sa
from flask import Flask, request
from helpers import ext, post, problem_code, record
from test_migrations import autogenerate_diff, reset_database
from testapp import Controls, build_app

import example_app
from example_app import create_app
from flask_idempotent import SchemaVersionError
from flask_idempotent import operations as ops
from flask_idempotent.fingerprint import hash_command, request_fingerprint
from flask_idempotent.models import RECORDS_TABLE, v2_columns
from flask_idempotent.testing import LeaseClock

V2_COLUMNS = {column.name for column in v2_columns()}


def command_hash(app: Flask, amount: int) -> str:
    """The request hash the layer computes for ``POST /payments {"amount": amount}`` (as version 1 did)."""
    with app.test_request_context("/payments", method="POST", json={"amount": amount}):
        return hash_command(request_fingerprint(request, headers=(), max_body_bytes=1 << 20))


def example(database_url: str) -> Flask:
    return create_app({"TESTING": True, "DATABASE_URL": database_url, "SECRET_KEY": "test"})


def served(database_url: str, clock: LeaseClock) -> Flask:
    """The test app on the upgraded database: its own table is created, the extension's are the upgraded ones."""
    app = build_app(database_url, clock=clock, controls=Controls())
    with app.app_context():
        db = ext(app)["db"]
        db.metadata.tables["charges"].create(db.engine, checkfirst=True)
    return app


@pytest.fixture
def version_1(database_url: str, clock: LeaseClock) -> Iterator[dict[str, int]]:
    """A database at revision 0001 (schema version 1) holding one COMPLETED, one stuck and one FAILED record.

    The stuck record's times were written by hand, without fractional seconds (another tool, an operator's
    UPDATE): on SQLite such text never equals a time the layer writes, which is why nothing compares times.
    """
    reset_database(database_url)
    app = example(database_url)
    scratch = build_app(database_url, clock=clock, controls=Controls())
    now = clock.now
    with app.app_context():
        flask_migrate.upgrade(revision="0001")
        engine = example_app.db.engine
        # MariaDB's JSON is LONGTEXT with a check: reflected, it would take the list as a row, not as JSON.
        json_columns = [sa.Column(name, sa.JSON()) for name in ("recovery_data", "response_headers", "resource_ref")]
        table = sa.Table(RECORDS_TABLE, sa.MetaData(), *json_columns, autoload_with=engine)
        assert V2_COLUMNS.isdisjoint(table.c.keys())  # really version 1
        common: dict[str, Any] = {
            "scope": "",
            "method": "POST",
            "path": "/payments",
            "endpoint": "create_payment",
            "event_count": 0,
            "created_at": now - timedelta(minutes=20),
            "updated_at": now - timedelta(minutes=20),
            "expires_at": now + timedelta(hours=23),
        }
        rows = {
            "done": {
                "key": "done",
                "request_hash": command_hash(scratch, 5),
                "state": "COMPLETED",
                "retryable": False,
                "attempts": 1,
                "response_status": 201,
                "response_headers": [["Content-Type", "application/json"]],
                "response_body": b'{"id": 1, "amount": 5}',
            },
            "stuck": {
                "key": "stuck",
                "request_hash": command_hash(scratch, 7),
                "state": "IN_PROGRESS",
                "retryable": False,
                "attempts": 1,
                "lease_token": "dead-worker",
            },
            "final": {
                "key": "final",
                "request_hash": command_hash(scratch, 9),
                "state": "FAILED",
                "retryable": False,
                "attempts": 1,
                "response_status": 500,
                "response_headers": [["Content-Type", "application/json"]],
                "response_body": b'{"error": "boom"}',
            },
        }
        ids = {}
        with engine.begin() as conn:
            for name, row in rows.items():
                ids[name] = int(conn.execute(sa.insert(table).values(**common, **row)).inserted_primary_key[0])
            conn.execute(
                sa.text(
                    f"UPDATE {RECORDS_TABLE} SET locked_until = '2000-01-01 00:00:00',"
                    " updated_at = '2000-01-01 00:00:00' WHERE id = :id"  # (key is a reserved word in MySQL)
                ),
                {"id": ids["stuck"]},
            )
        engine.dispose()
    yield ids
    reset_database(database_url)


def assert_served_after_upgrade(database_url: str, clock: LeaseClock, ids: dict[str, int]) -> None:
    app = served(database_url, clock)
    client = app.test_client()
    controls = ext(app)["controls"]
    # Existing records: version 1 from the column's default, kind http.
    for name in ids:
        row = record(app, name)
        assert row is not None and (row["version"], row["kind"]) == (1, "http"), row

    replay = post(client, "/payments", key="done", json={"amount": 5})
    assert replay.status_code == 201 and replay.headers["Idempotent-Replayed"] == "true"
    assert replay.data == b'{"id": 1, "amount": 5}'
    assert post(client, "/payments", key="done", json={"amount": 6}).status_code == 422

    stuck = post(client, "/payments", key="stuck", json={"amount": 7})
    assert stuck.status_code == 409 and problem_code(stuck) == "stuck"
    with app.app_context():
        marked = ops.mark_retryable(ids["stuck"], actor="oncall", version=1)
        acked = ops.acknowledge(ids["final"], actor="oncall", version=1)
        assert [r["key"] for r in ops.list_failed(awaiting=True).items] == []
    assert (marked["state"], marked["retryable"], marked["version"]) == ("FAILED", True, 2)
    assert (acked["acknowledged_by"], acked["version"]) == ("oncall", 2)
    retry = post(client, "/payments", key="stuck", json={"amount": 7})
    assert retry.status_code == 201 and retry.get_json()["attempt"] == 2
    after = record(app, "stuck")
    assert (after["state"], after["attempts"], after["version"]) == ("COMPLETED", 2, 4)  # claim +1, outcome +1

    fresh = post(client, "/payments", key="new", json={"amount": 1})
    assert fresh.status_code == 201
    new = record(app, "new")
    assert (new["state"], new["version"], new["kind"]) == ("COMPLETED", 2, "http")
    assert controls.runs["payments"] == 2
    with app.app_context():
        ext(app)["db"].engine.dispose()


def test_alembic_revision_upgrades_a_version_1_database_that_then_serves(
    database_url: str, clock: LeaseClock, version_1: dict[str, int]
) -> None:
    app = example(database_url)
    with app.app_context():
        flask_migrate.upgrade()
    assert autogenerate_diff(app) == []  # the upgraded tables are exactly the model's
    with app.app_context():
        example_app.db.engine.dispose()  # after the diff, which connects again
    assert_served_after_upgrade(database_url, clock, version_1)


def test_a_version_1_table_is_refused_with_the_migration_to_run_then_upgrade_schema_fixes_it(
    database_url: str, clock: LeaseClock, version_1: dict[str, int]
) -> None:
    app = served(database_url, clock)
    client = app.test_client()
    with pytest.raises(SchemaVersionError, match="flask idempotency upgrade-schema") as refused:
        post(client, "/payments", key="new", json={"amount": 1})
    assert "version" in str(refused.value) and "docs: Upgrading from schema version 1 to 2" in str(refused.value)
    assert ext(app)["controls"].runs["payments"] == 0  # refused before any claim: nothing ran

    result = app.test_cli_runner().invoke(args=["idempotency", "upgrade-schema"])
    assert result.exit_code == 0, result.output
    assert "added version, kind, summary, acknowledged_at, acknowledged_by" in result.output
    again = app.test_cli_runner().invoke(args=["idempotency", "upgrade-schema", "--json"])
    assert again.exit_code == 0 and '"added": []' in again.output
    with app.app_context():
        ext(app)["db"].engine.dispose()
    assert_served_after_upgrade(database_url, clock, version_1)
