"""The floor: what the layer's database work alone costs, with raw psycopg2 and no Flask or SQLAlchemy.

One connection, one request at a time, the same tables the app uses. Each "request" runs the statements a
request of that variant sends, with the same commits:

- bare: INSERT the payment, COMMIT (one synchronous commit);
- leased: the claim (``INSERT … ON CONFLICT DO NOTHING``; the layer reads the record only when the key is
  taken, which a first request's is not), the payment and its COMMIT, the outcome (autocommit statements):
  three synchronous commits, since the claim must be durable before the effect and the outcome after it;
- atomic: BEGIN, the claim (an ``INSERT … SELECT`` that also takes the key's advisory lock), the payment, the
  outcome, COMMIT: one commit.

Rounds are interleaved. The difference variant - bare is the database time the layer adds to a request
when its Python side costs nothing; the report sets it against the bare route's time per request.
"""

from __future__ import annotations

import hashlib
import statistics
import time
import uuid
from typing import Any

from infra import pg_connect

PAYMENT = (
    "INSERT INTO bench_payments (route, idem_key, amount, currency, creditor, reference, created_at)"
    " VALUES (%s, %s, 1250, 'EUR', 'ACME', 'floor', now()) RETURNING id"
)

# The layer's statements as it sends them on PostgreSQL: flask_idempotent/store.py's prebuilt ``_insert_claim``
# (with the lock, its ``INSERT … SELECT``) and ``_settle``, compiled with SQLAlchemy's postgresql dialect and
# filled with the values a request's claim (machine.new_claim) and outcome (machine.outcome) bind. Every
# time is the database's clock plus the store's offset (0 outside tests), computed in the statement itself;
# constants the layer binds as parameters (1, 'IN_PROGRESS', the JSON nulls) are written inline: psycopg2
# interpolates parameters on the client, so the server receives the same text. Re-derive these after a change
# to store.py by capturing the statements a request sends (bench/profiling.py's app, an engine event).
DB_NOW = "(timezone('UTC', statement_timestamp()) + make_interval(secs => %(now_s)s))"
DB_LEASE_END = "(timezone('UTC', statement_timestamp()) + make_interval(secs => %(lease_s)s))"
DB_EXPIRES = "(timezone('UTC', statement_timestamp()) + make_interval(secs => %(ttl_s)s))"
INSERT = f"""
INSERT INTO idempotency_records (scope, key, request_hash, method, path, endpoint, version, kind, summary,
    acknowledged_at, acknowledged_by, state, retryable, attempts, lease_token, locked_until, recovery_point,
    recovery_data, response_status, response_headers, response_body, resource_ref, error, event_count, created_at,
    updated_at, expires_at)
VALUES (%(scope)s, %(key)s, %(hash)s, 'POST', '/floor', 'floor', 1, 'http', NULL, NULL, NULL, 'IN_PROGRESS', false, 1,
    %(token)s, {DB_LEASE_END}, NULL, 'null'::JSON, NULL, 'null'::JSON, NULL, 'null'::JSON, NULL, 0, {DB_NOW},
    {DB_NOW}, {DB_EXPIRES})
ON CONFLICT (scope, key) DO NOTHING RETURNING idempotency_records.id
"""
# Atomic mode's claim: the same row, inserted only if the key's advisory lock was granted.
INSERT_LOCKED = INSERT.replace("VALUES (", "SELECT ", 1).replace(
    f"{DB_EXPIRES})\nON CONFLICT",
    f"{DB_EXPIRES}\nWHERE pg_try_advisory_xact_lock(%(lock)s)\nON CONFLICT",
    1,
)
SETTLE = (
    "UPDATE idempotency_records SET version = (idempotency_records.version + 1), state = 'COMPLETED',"
    " retryable = false, locked_until = NULL, response_status = 201, response_headers = %(headers)s::JSON,"
    f" response_body = %(body)s, resource_ref = 'null'::JSON, error = NULL, updated_at = {DB_NOW}"
    " WHERE idempotency_records.id = %(id)s AND idempotency_records.version = %(version)s"
    " AND idempotency_records.lease_token = %(token)s AND idempotency_records.state = 'IN_PROGRESS'"
)
HEADERS = '[["Content-Type", "application/json"], ["Location", "/payments/1"]]'
BODY = b'{"amount":1250,"currency":"EUR","id":1,"status":"created"}\n'


def _advisory_key(scope: str, key: str) -> int:
    """flask_idempotent.store.advisory_key, without importing SQLAlchemy."""
    digest = hashlib.blake2b(f"{len(scope)}:{scope}{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


def _claim_params(run_id: str, n: int) -> dict[str, Any]:
    key = f"{run_id}-{n}-{uuid.uuid4().hex}"
    return {
        "scope": "floor",
        "key": key,
        "hash": "v1:" + uuid.uuid4().hex * 2,
        "token": uuid.uuid4().hex,
        "now_s": 0.0,
        "lease_s": 60.0,
        "ttl_s": 86400.0,
        "lock": _advisory_key("floor", key),
    }


def _settle_params(p: dict[str, Any], record_id: int) -> dict[str, Any]:
    return {**p, "headers": HEADERS, "body": BODY, "id": record_id, "version": 1}


def measure(db: str, run_id: str, rounds: int = 5, requests: int = 1000) -> dict[str, Any]:
    auto, tx = pg_connect(db), pg_connect(db)
    auto.autocommit = True
    a, t = auto.cursor(), tx.cursor()
    counter = 0

    def claim(cur: Any, insert: str, p: dict[str, Any]) -> int:
        """The layer's claim of a new key (no read: the key is not taken); the new record's id."""
        cur.execute(insert, p)
        return int(cur.fetchone()[0])

    def bare() -> None:
        t.execute(PAYMENT, ("floor-bare", None))
        tx.commit()

    def leased() -> None:
        nonlocal counter
        counter += 1
        p = _claim_params(run_id, counter)
        record_id = claim(a, INSERT, p)
        t.execute(PAYMENT, ("floor-leased", p["key"]))
        tx.commit()
        a.execute(SETTLE, _settle_params(p, record_id))

    def atomic() -> None:
        nonlocal counter
        counter += 1
        p = _claim_params(run_id, counter)
        record_id = claim(t, INSERT_LOCKED, p)
        t.execute(PAYMENT, ("floor-atomic", p["key"]))
        t.execute(SETTLE, _settle_params(p, record_id))
        tx.commit()

    variants = {"bare": bare, "leased": leased, "atomic": atomic}
    times: dict[str, list[float]] = {name: [] for name in variants}
    try:
        for fn in variants.values():  # warm-up
            for _ in range(100):
                fn()
        for _ in range(rounds):
            for name, fn in variants.items():
                t0 = time.perf_counter()
                for _ in range(requests):
                    fn()
                times[name].append((time.perf_counter() - t0) / requests * 1e6)
    finally:
        auto.close()
        tx.close()
    per_request = {name: round(statistics.median(us), 1) for name, us in times.items()}
    return {
        "how": f"raw psycopg2, one connection per role, {rounds} interleaved rounds of {requests} requests",
        "us_per_request": per_request,
        "us_added": {
            name: round(statistics.median([v - b for b, v in zip(times["bare"], times[name], strict=True)]), 1)
            for name in ("leased", "atomic")
        },
    }
