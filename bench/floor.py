"""The floor: what the layer's database work alone costs, with raw psycopg2 and no Flask or SQLAlchemy.

One connection, one request at a time, the same tables the app uses. Each "request" runs the statements a
request of that variant sends, with the same commits:

- bare: INSERT the payment, COMMIT (one synchronous commit);
- leased: the read and the claim (autocommit statements), the payment and its COMMIT, the outcome
  (autocommit): three synchronous commits, since the claim must be durable before the effect and the
  outcome after it;
- atomic: BEGIN, the read with the key's advisory lock, the claim, the payment, the outcome, COMMIT: one
  commit.

Rounds are interleaved. The difference variant - bare is the database time the layer adds to a request
when its Python side costs nothing; the report sets it against the bare route's time per request.
"""

from __future__ import annotations

import statistics
import time
import uuid
from datetime import datetime, timedelta, timezone
from typing import Any

from infra import pg_connect

PAYMENT = (
    "INSERT INTO bench_payments (route, idem_key, amount, currency, creditor, reference, created_at)"
    " VALUES (%s, %s, 1250, 'EUR', 'ACME', 'floor', now()) RETURNING id"
)
FIND = "SELECT * FROM idempotency_records WHERE scope = %(scope)s AND key = %(key)s"
FIND_AND_LOCK = (
    "SELECT pg_try_advisory_xact_lock(%(lock)s) AS _locked, r.* FROM (SELECT 1) one"
    " LEFT JOIN idempotency_records r ON r.scope = %(scope)s AND r.key = %(key)s"
)
INSERT = """
INSERT INTO idempotency_records (scope, key, request_hash, method, path, endpoint, state, retryable, attempts,
    event_count, lease_token, locked_until, updated_at, created_at, expires_at)
VALUES (%(scope)s, %(key)s, %(hash)s, 'POST', '/floor', 'floor', 'IN_PROGRESS', false, 1, 0, %(token)s,
    %(until)s, %(now)s, %(now)s, %(expires)s)
ON CONFLICT (scope, key) DO NOTHING RETURNING id
"""
SETTLE = (
    "UPDATE idempotency_records SET state = 'COMPLETED', retryable = false, locked_until = NULL, updated_at = %s,"
    " response_status = 201, response_headers = %s, response_body = %s, resource_ref = NULL, error = NULL"
    " WHERE id = %s AND lease_token = %s AND state = 'IN_PROGRESS'"
)
HEADERS = '[["Content-Type", "application/json"], ["Location", "/payments/1"]]'
BODY = b'{"amount":1250,"currency":"EUR","id":1,"status":"created"}\n'


def _claim_params(run_id: str, n: int) -> dict[str, Any]:
    now = datetime.now(timezone.utc).replace(tzinfo=None)
    return {
        "scope": "floor",
        "key": f"{run_id}-{n}-{uuid.uuid4().hex}",
        "hash": "v1:" + uuid.uuid4().hex * 2,
        "token": uuid.uuid4().hex,
        "until": now + timedelta(seconds=60),
        "now": now,
        "expires": now + timedelta(hours=24),
        "lock": n,
    }


def measure(db: str, run_id: str, rounds: int = 5, requests: int = 1000) -> dict[str, Any]:
    auto, tx = pg_connect(db), pg_connect(db)
    auto.autocommit = True
    a, t = auto.cursor(), tx.cursor()
    counter = 0

    def claim(cur: Any, read: str, p: dict[str, Any]) -> int:
        """The layer's read, then its claim; the new record's id."""
        cur.execute(read, p)
        cur.fetchall()
        cur.execute(INSERT, p)
        return int(cur.fetchone()[0])

    def bare() -> None:
        t.execute(PAYMENT, ("floor-bare", None))
        tx.commit()

    def leased() -> None:
        nonlocal counter
        counter += 1
        p = _claim_params(run_id, counter)
        record_id = claim(a, FIND, p)
        t.execute(PAYMENT, ("floor-leased", p["key"]))
        tx.commit()
        a.execute(SETTLE, (p["now"], HEADERS, BODY, record_id, p["token"]))

    def atomic() -> None:
        nonlocal counter
        counter += 1
        p = _claim_params(run_id, counter)
        record_id = claim(t, FIND_AND_LOCK, p)
        t.execute(PAYMENT, ("floor-atomic", p["key"]))
        t.execute(SETTLE, (p["now"], HEADERS, BODY, record_id, p["token"]))
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
