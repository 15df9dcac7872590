"""MariaDB (and MySQL) as the record store: what differs from PostgreSQL and SQLite, on a real MariaDB server.

The rest of the suite runs on MariaDB too (the ``mariadb`` param of ``database_url``); these tests cover what
only MySQL-family servers can get wrong: column types (microsecond times, binary collation, large bodies), the
REPEATABLE READ snapshot of the app's transactions, and the errors of an unreachable or unready server.
"""

from __future__ import annotations

import io
import threading
from collections.abc import Iterator
from typing import Any

import pymysql
import pytest
import sqlalchemy as sa
from concurrency import Background
from flask import Flask
from flask.testing import FlaskClient
from helpers import charges, events, ext, in_app, post, problem_code, record, records
from procs import TcpProxy, poll
from testapp import Controls, build_app

from flask_idempotent import operations as ops
from flask_idempotent.store import RecordStore

pytestmark = pytest.mark.parametrize("database_url", ["mariadb"], indirect=True)


def test_keys_differing_only_in_case_are_two_keys(app: Flask, client: FlaskClient) -> None:
    # The server's default collation (utf8mb4_general_ci) would make them one key and 422 the second.
    assert post(client, "/payments", key="Order-1", json={"amount": 5}).status_code == 201
    second = post(client, "/payments", key="order-1", json={"amount": 7})
    assert second.status_code == 201 and "Idempotent-Replayed" not in second.headers
    assert sorted(r["key"] for r in records(app)) == ["Order-1", "order-1"]
    assert charges(app) == 2


def name_collations(app: Flask) -> dict[str, str]:
    """``table.column`` -> collation of the scope and key columns of both tables."""
    with app.app_context(), ext(app)["db"].engine.connect() as conn:
        rows = conn.execute(
            sa.text(
                "SELECT table_name, column_name, collation_name FROM information_schema.columns"
                " WHERE table_schema = DATABASE() AND table_name LIKE 'idempotency%'"
                " AND column_name IN ('scope', 'key')"
            )
        ).all()
    return {f"{table}.{column}": collation for table, column, collation in rows}


def make_names_pad_space(app: Flask) -> None:
    """Scopes and keys in ``utf8mb4_bin``, as every release before the NO PAD collation created them."""
    with app.app_context(), ext(app)["db"].engine.begin() as conn:
        for table in ("idempotency_records", "idempotency_events"):
            for column in ("scope", "key"):
                conn.execute(
                    sa.text(f"ALTER TABLE {table} MODIFY `{column}` VARCHAR(255) NOT NULL COLLATE utf8mb4_bin")
                )


def test_scopes_differing_only_by_trailing_spaces_are_two_scopes(app: Flask, client: FlaskClient) -> None:
    # utf8mb4_bin is PAD SPACE: "tenant-7 " would get tenant-7's stored response, marked replayed.
    assert post(client, "/payments", user="tenant-7", json={"amount": 5}).status_code == 201
    padded = post(client, "/payments", user="tenant-7 ", json={"amount": 5})
    assert padded.status_code == 201 and "Idempotent-Replayed" not in padded.headers
    reused = post(client, "/payments", user="tenant-7 ", json={"amount": 6})
    assert reused.status_code == 422 and problem_code(reused) == "key-reused"
    assert sorted((r["scope"], r["key"]) for r in records(app)) == [("tenant-7", "k-1"), ("tenant-7 ", "k-1")]
    assert [e["scope"] for e in events(app, "conflict")] == ["tenant-7 "]
    assert charges(app) == 2
    assert set(name_collations(app).values()) == {"utf8mb4_nopad_bin"}


def test_upgrade_schema_gives_pad_space_scopes_and_keys_the_no_pad_collation(app: Flask, client: FlaskClient) -> None:
    make_names_pad_space(app)
    assert post(client, "/payments", user="tenant-7", json={"amount": 5}).status_code == 201
    before = post(client, "/payments", user="tenant-7 ", json={"amount": 5})
    assert before.headers["Idempotent-Replayed"] == "true"  # the old collation: another tenant's response

    result = app.test_cli_runner().invoke(args=["idempotency", "upgrade-schema"])
    assert result.exit_code == 0, result.output
    assert "idempotency_records.scope COLLATE utf8mb4_nopad_bin" in result.output
    assert set(name_collations(app).values()) == {"utf8mb4_nopad_bin"}
    again = app.test_cli_runner().invoke(args=["idempotency", "upgrade-schema", "--json"])
    assert again.exit_code == 0 and '"added": []' in again.output

    after = post(client, "/payments", user="tenant-7 ", json={"amount": 5})
    assert after.status_code == 201 and "Idempotent-Replayed" not in after.headers
    assert post(client, "/payments", user="tenant-7", json={"amount": 5}).headers["Idempotent-Replayed"] == "true"
    assert sorted(r["scope"] for r in records(app)) == ["tenant-7", "tenant-7 "]
    assert charges(app) == 2


def test_times_keep_microseconds(app: Flask, client: FlaskClient) -> None:
    # DATETIME without fsp=6 keeps whole seconds: leases would end up to a second early and orders would tie.
    for n in range(3):
        post(client, "/payments", key=f"k-{n}", json={"amount": n})
    rows = records(app)
    assert any(r["created_at"].microsecond for r in rows)
    assert all(r["locked_until"] is None for r in rows)
    assert all(r["expires_at"].microsecond == r["updated_at"].microsecond for r in rows)


@pytest.mark.parametrize("app_config", [{"IDEMPOTENCY_MAX_RESPONSE_BYTES": 1024 * 1024}])
def test_a_response_larger_than_a_blob_is_stored_and_replayed_whole(app: Flask, client: FlaskClient) -> None:
    big = "x" * 200_000  # a BLOB column holds 64 KiB
    first = post(client, "/upload", data={"f": (io.BytesIO(big.encode()), "f.txt")}, content_type="multipart/form-data")
    assert first.status_code == 201 and len(first.data) > 200_000
    assert record(app, "k-1")["response_body"] == first.data
    again = post(client, "/upload", data={"f": (io.BytesIO(big.encode()), "f.txt")}, content_type="multipart/form-data")
    assert again.headers["Idempotent-Replayed"] == "true" and again.data == first.data
    assert ext(app)["controls"].runs["upload"] == 1


def wait_for_a_lock_wait(app: Flask) -> None:
    """Return once a transaction waits for a row lock (InnoDB's own view: the duplicate blocked on the owner)."""
    query = sa.text("SELECT count(*) FROM information_schema.INNODB_TRX WHERE trx_state = 'LOCK WAIT'")

    def waiting() -> bool:
        with app.app_context(), ext(app)["db"].engine.connect() as conn:
            return int(conn.execute(query).scalar_one()) == 1

    # INNODB_TRX is a cache that InnoDB refreshes only when it was not read for 0.1 s: poll slower than that.
    poll(waiting, timeout=10, what="a transaction waiting for a row lock", interval=0.25)


def test_atomic_duplicate_waits_for_the_owners_commit_then_replays(app: Flask) -> None:
    # MariaDB has no transaction-scoped advisory lock: the duplicate's INSERT waits on the owner's uncommitted
    # row. When it is refused, the duplicate's re-read must see the committed record although its REPEATABLE
    # READ snapshot (taken before the owner committed) has no row at all.
    controls = ext(app)["controls"]
    held = controls.hold("transfers")
    first = Background(app, "/transfers", json={"amount": 30})
    assert held.entered.wait(10)
    duplicate = Background(app, "/transfers", json={"amount": 30})
    wait_for_a_lock_wait(app)
    held.release.set()
    original, replay = first.result(), duplicate.result()
    assert original.status_code == 201
    assert replay.status_code == 201 and replay.headers["Idempotent-Replayed"] == "true"
    assert replay.data == original.data
    assert controls.runs["transfers"] == 1 and charges(app) == 1
    assert record(app, "k-1")["state"] == "COMPLETED"


def test_atomic_duplicate_runs_when_the_owner_rolled_back(app: Flask) -> None:
    controls = ext(app)["controls"]
    held = controls.hold("transfers")
    controls.status = 503  # a failure: the view's transaction, its claim included, is rolled back
    first = Background(app, "/transfers", json={"amount": 30})
    assert held.entered.wait(10)
    duplicate = Background(app, "/transfers", json={"amount": 30})
    wait_for_a_lock_wait(app)
    held.release.set()
    # The waiting INSERT goes through once the owner's claim is gone: the duplicate runs (and fails the same
    # way) instead of replaying an outcome that was never committed.
    assert [first.result().status_code, duplicate.result().status_code] == [503, 503]
    assert controls.runs["transfers"] == 2 and charges(app) == 0
    row = record(app, "k-1")
    assert (row["state"], row["retryable"]) == ("FAILED", True)


@pytest.mark.parametrize(
    "app_config",
    [
        {
            "SQLALCHEMY_ENGINE_OPTIONS": {
                "pool_size": 20,
                "connect_args": {"init_command": "SET innodb_lock_wait_timeout=1"},
            }
        }
    ],
)
def test_atomic_duplicate_that_waits_past_the_lock_wait_timeout_answers_503(app: Flask) -> None:
    controls = ext(app)["controls"]
    held = controls.hold("transfers")
    first = Background(app, "/transfers", json={"amount": 30})
    assert held.entered.wait(10)
    duplicate = post(app.test_client(), "/transfers", json={"amount": 30})  # waits 1 s for the owner's row
    assert duplicate.status_code == 503 and problem_code(duplicate) == "store-unavailable"
    assert duplicate.headers["Retry-After"] == "1"
    held.release.set()
    assert first.result().status_code == 201
    assert controls.runs["transfers"] == 1 and charges(app) == 1
    assert record(app, "k-1")["state"] == "COMPLETED"


def wsrep_not_ready(*args: Any, **kwargs: Any) -> Any:
    orig = pymysql.err.OperationalError(1047, "WSREP has not yet prepared node for application use")
    raise sa.exc.OperationalError("SELECT ...", {}, orig)


@pytest.mark.parametrize("atomic", [False, True])
def test_a_cluster_node_not_ready_answers_503_and_nothing_runs(
    app: Flask, client: FlaskClient, monkeypatch: pytest.MonkeyPatch, atomic: bool
) -> None:
    # A Galera node that is not synced refuses every statement with 1047: like an unreachable store.
    monkeypatch.setattr(RecordStore, "find", wsrep_not_ready)
    monkeypatch.setattr(RecordStore, "find_and_lock", wsrep_not_ready)
    path = "/transfers" if atomic else "/payments"
    response = post(client, path, json={"amount": 5})
    assert response.status_code == 503 and problem_code(response) == "store-unavailable"
    assert response.headers["Retry-After"] == "1"
    assert sum(ext(app)["controls"].runs.values()) == 0
    assert records(app) == []
    monkeypatch.undo()
    assert post(client, path, json={"amount": 5}).status_code == 201


@pytest.fixture
def proxied(database_url: str, clock: Any) -> Iterator[tuple[Flask, TcpProxy]]:
    real = sa.make_url(database_url)
    proxy = TcpProxy(real.host or "127.0.0.1", real.port or 3306)
    url = real.set(port=proxy.port, query={"connect_timeout": "2"}).render_as_string(hide_password=False)
    app = build_app(url, clock=clock, controls=Controls())
    with app.app_context():
        ext(app)["db"].create_all()
    try:
        yield app, proxy
    finally:
        proxy.restore()
        with app.app_context():
            ext(app)["db"].drop_all()
            ext(app)["db"].engine.dispose()
        proxy.close()


def test_a_cut_connection_answers_503_and_recovers_without_a_restart(proxied: tuple[Flask, TcpProxy]) -> None:
    app, proxy = proxied
    client = app.test_client()
    assert post(client, "/payments", key="before", json={"amount": 1}).status_code == 201  # pooled connections
    assert post(client, "/transfers", key="before-atomic", json={"amount": 1}).status_code == 201
    proxy.cut()  # server gone (2013) on the pooled connections, refused (2003) on new ones
    for path in ("/payments", "/transfers"):
        response = post(client, path, key="during", json={"amount": 1})
        assert response.status_code == 503 and problem_code(response) == "store-unavailable", response.data
    assert ext(app)["controls"].runs["payments"] == 1 and ext(app)["controls"].runs["transfers"] == 1
    proxy.restore()
    assert post(client, "/payments", key="during", json={"amount": 1}).status_code == 201
    assert post(client, "/transfers", key="during-atomic", json={"amount": 1}).status_code == 201
    assert {r["key"] for r in records(app)} == {"before", "before-atomic", "during", "during-atomic"}


def test_concurrent_claims_of_one_new_key_run_the_view_once(app: Flask) -> None:
    # The unique index decides between simultaneous INSERTs (no ON CONFLICT on MariaDB): one 201, the rest
    # answer in progress or replay; none runs the view again.
    controls = ext(app)["controls"]
    start = threading.Barrier(8)
    results: list[int] = []

    def send() -> None:
        start.wait(10)
        results.append(post(app.test_client(), "/payments", json={"amount": 5}).status_code)

    threads = [threading.Thread(target=send) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(results) == 8 and results.count(201) >= 1 and set(results) <= {201, 409}
    assert controls.runs["payments"] == 1 and charges(app) == 1


def test_a_mariadb_url_gets_the_same_column_types_and_behaviour(database_url: str, clock: Any) -> None:
    # mariadb+pymysql:// names the dialect "mariadb" (mysql:// reaching MariaDB says "mysql"): both get the
    # MySQL variants of the models and the same SQL.
    url = sa.make_url(database_url).set(drivername="mariadb+pymysql").render_as_string(hide_password=False)
    controls = Controls()
    app = build_app(url, clock=clock, controls=controls)
    db = ext(app)["db"]
    with app.app_context():
        assert db.engine.dialect.name == "mariadb"
        db.create_all()
    try:
        client = app.test_client()
        first = post(client, "/payments", key="K", json={"amount": 5})
        again = post(client, "/payments", key="K", json={"amount": 5})
        assert first.status_code == 201 and again.headers["Idempotent-Replayed"] == "true"
        assert post(client, "/payments", key="k", json={"amount": 6}).status_code == 201  # another key
        assert controls.runs["payments"] == 2
        with app.app_context(), db.engine.connect() as conn:
            types = dict(
                conn.execute(
                    sa.text(
                        "SELECT column_name, column_type FROM information_schema.columns"
                        " WHERE table_schema = DATABASE() AND table_name = 'idempotency_records'"
                    )
                ).all()
            )
            collation = conn.execute(
                sa.text(
                    "SELECT collation_name FROM information_schema.columns WHERE table_schema = DATABASE()"
                    " AND table_name = 'idempotency_records' AND column_name = 'key'"
                )
            ).scalar_one()
        assert types["created_at"] == "datetime(6)" and types["response_body"] == "longblob"
        assert collation == "utf8mb4_nopad_bin"
    finally:
        with app.app_context():
            db.drop_all()
            db.engine.dispose()


@pytest.mark.parametrize(
    "app_config",
    [{}, {"SQLALCHEMY_ENGINE_OPTIONS": {"pool_size": 20, "isolation_level": "READ COMMITTED"}}],
    ids=["repeatable-read", "read-committed"],
)
def test_purge_keeps_a_record_an_atomic_request_replaced_while_the_batch_ran(app: Flask, clock: Any) -> None:
    client = app.test_client()
    assert post(client, "/transfers", json={"amount": 30}).status_code == 201
    clock.advance(hours=25)  # the record expired: purge may delete it, a new request may replace it
    controls = ext(app)["controls"]
    held = controls.hold("transfers")
    replacing = Background(app, "/transfers", json={"amount": 99})
    assert held.entered.wait(10)  # the replacement is written, uncommitted, in the view's transaction
    purged: list[int] = []
    purging = threading.Thread(target=lambda: purged.append(in_app(app, ops.purge, batch_size=10)))
    purging.start()
    wait_for_a_lock_wait(app)  # the purge batch reached the locked row
    held.release.set()
    assert replacing.result().status_code == 201
    purging.join(30)
    assert purged == [0]
    row = record(app, "k-1")
    assert row is not None and row["state"] == "COMPLETED" and row["response_body"] is not None
    assert charges(app, "transfers") == 2
