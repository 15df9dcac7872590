"""Scale: a 1,000,000-record table. Bulk seeding, every dashboard/CLI/store query timed and EXPLAIN ANALYZEd."""

from __future__ import annotations

import inspect
import json
import os
import statistics
import time
from collections.abc import Callable
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from typing import Any

import sqlalchemy as sa
from infra import bench_env, log, pg_connect

# Record mix: 0.1 % stuck IN_PROGRESS (lease long expired; none in the expired set the purge test deletes),
# 1 % FAILED (half of them retryable), the rest COMPLETED; 1,000 tenants; created over the last 23 hours.
# 1 % of records have a conflict event, the stuck ones a stale-hit event.
SEED_RECORDS_SQL = """
INSERT INTO idempotency_records (
    scope, key, request_hash, method, path, endpoint, state, retryable, attempts, lease_token, locked_until,
    response_status, response_headers, response_body, error, event_count, created_at, updated_at, expires_at)
SELECT
    'tenant-' || (g %% 1000),
    'seed-' || g,
    'v1:' || md5(g::text) || md5((g + 7)::text),
    'POST', '/leased', 'leased',
    CASE WHEN STUCK THEN 'IN_PROGRESS' WHEN g %% 100 = 1 THEN 'FAILED' ELSE 'COMPLETED' END,
    (g %% 100 = 1 AND g %% 200 = 1),
    1,
    CASE WHEN STUCK THEN md5(g::text) END,
    CASE WHEN STUCK THEN t.created + interval '60 seconds' END,
    CASE WHEN STUCK THEN NULL WHEN g %% 100 = 1 THEN 500 ELSE 201 END,
    CASE WHEN STUCK THEN NULL
         ELSE '[["Content-Type", "application/json"], ["Location", "/payments/1"]]'::json END,
    CASE WHEN STUCK THEN NULL
         ELSE convert_to('{"amount":1250,"currency":"EUR","id":' || g || ',"status":"created"}', 'UTF8') END,
    CASE WHEN g %% 100 = 1 THEN 'DownstreamError: the ledger call after the payment failed' END,
    CASE WHEN g %% 100 = 5 OR STUCK THEN 1 ELSE 0 END,
    t.created,
    t.created + interval '1 second',
    t.created + %(ttl)s::interval
FROM generate_series(1, %(n)s) AS g,
     LATERAL (SELECT (now() AT TIME ZONE 'utc') - %(age)s::interval
                     - ((g::bigint * 7919) %% 82800) * interval '1 second' AS created) AS t
"""

SEED_EVENTS_SQL = """
INSERT INTO idempotency_events (record_id, scope, key, kind, actor, detail, created_at)
SELECT r.id, r.scope, r.key,
       CASE WHEN r.state = 'IN_PROGRESS' THEN 'stale_hit' ELSE 'conflict' END,
       NULL,
       json_build_object('method', 'POST', 'path', '/leased', 'endpoint', 'leased',
                         'request_hash', 'v1:' || md5(r.key)),
       r.created_at + interval '5 seconds'
FROM idempotency_records r
WHERE r.event_count = 1
"""


def seed(db: str, n: int, *, expired: bool) -> dict[str, Any]:
    """Fill ``idempotency_records`` with ``n`` records (TRUNCATE first); expired ones for the purge test."""
    conn = pg_connect(db)
    conn.autocommit = True
    t0 = time.perf_counter()
    with conn.cursor() as cur:
        cur.execute("TRUNCATE idempotency_records, idempotency_events RESTART IDENTITY")
        cur.execute("SET synchronous_commit = off")
        cur.execute("SET maintenance_work_mem = '256MB'")
        params = {"n": n, "ttl": "-1 hour" if expired else "24 hours", "age": "2 days" if expired else "0 seconds"}
        cur.execute(SEED_RECORDS_SQL.replace("STUCK", "FALSE" if expired else "(g %% 1000 = 0)"), params)
        t_records = time.perf_counter() - t0
        cur.execute(SEED_EVENTS_SQL)
        events = cur.rowcount
        cur.execute("VACUUM (ANALYZE) idempotency_records")
        cur.execute("VACUUM (ANALYZE) idempotency_events")
        cur.execute(
            "SELECT pg_total_relation_size('idempotency_records'), pg_total_relation_size('idempotency_events')"
        )
        size_r, size_e = cur.fetchone()
    conn.close()
    took = time.perf_counter() - t0
    log(f"seeded {n:,} {'expired ' if expired else ''}records + {events:,} events in {took:.1f}s")
    return {
        "records": n,
        "events": events,
        "expired": expired,
        "insert_seconds": round(t_records, 2),
        "total_seconds_with_vacuum_analyze": round(took, 2),
        "records_table_bytes": int(size_r),
        "events_table_bytes": int(size_e),
    }


class Capture:
    """Collects the SQL statements (with their parameters) an engine runs."""

    def __init__(self, engine: sa.Engine) -> None:
        self.engine = engine
        self.statements: list[tuple[str, Any]] = []
        self.on = False
        sa.event.listen(engine, "before_cursor_execute", self._hook)

    def _hook(self, conn: Any, cursor: Any, statement: str, parameters: Any, context: Any, executemany: bool) -> None:
        if self.on and not statement.lstrip().upper().startswith(("SAVEPOINT", "RELEASE", "ROLLBACK")):
            self.statements.append((statement, parameters))

    @contextmanager
    def recording(self) -> Any:
        self.statements = []
        self.on = True
        try:
            yield self.statements
        finally:
            self.on = False


def _plan_summary(plan: dict[str, Any]) -> dict[str, Any]:
    nodes: list[str] = []

    def walk(node: dict[str, Any]) -> None:
        label = node["Node Type"]
        if "Index Name" in node:
            label += f" using {node['Index Name']}"
        elif "Relation Name" in node:
            label += f" on {node['Relation Name']}"
        nodes.append(label)
        for child in node.get("Plans", []):
            walk(child)

    walk(plan["Plan"])
    return {
        "execution_ms": round(plan["Execution Time"], 3),
        "planning_ms": round(plan["Planning Time"], 3),
        "nodes": nodes,
        "seq_scan": any(n.startswith("Seq Scan") for n in nodes),
        "rows": plan["Plan"].get("Actual Rows"),
    }


def explain(db: str, statement: str, params: Any) -> dict[str, Any]:
    """EXPLAIN ANALYZE ``statement`` in a transaction that is rolled back (DML changes nothing)."""
    conn = pg_connect(db)
    try:
        with conn.cursor() as cur:
            cur.execute("EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) " + statement, params)
            plan = cur.fetchone()[0]
            if isinstance(plan, str):
                plan = json.loads(plan)
        conn.rollback()
        return _plan_summary(plan[0])
    except Exception as exc:  # a statement EXPLAIN cannot take: report it instead of failing the run
        conn.rollback()
        return {"error": f"{type(exc).__name__}: {exc}".splitlines()[0]}
    finally:
        conn.close()


def _timed(fn: Callable[[], Any], repeat: int) -> tuple[list[float], Any]:
    times = []
    result = None
    for _ in range(repeat):
        t0 = time.perf_counter()
        result = fn()
        times.append((time.perf_counter() - t0) * 1000)
    return times, result


def measure_queries(db: str, run_id: str, repeat: int = 5) -> dict[str, Any]:
    """Time every operations.py function and store.py method on the seeded table; EXPLAIN ANALYZE their SQL."""
    os.environ.update(bench_env(db, run_id))
    from app import create_app
    from app import db as flask_db

    from flask_idempotent import operations as ops
    from flask_idempotent.constants import EventKind, State
    from flask_idempotent.decorator import RouteOptions
    from flask_idempotent.machine import (
        Action,
        Command,
        Decision,
        existing_claim,
        new_claim,
        operator_transition,
        outcome,
    )
    from flask_idempotent.state import app_state

    app = create_app()
    with app.app_context():
        state = app_state()
        store = state.store
        r = state.tables.records
        options = state.resolve(RouteOptions())  # the config's lease and ttl, as a request gets them
        engine = flask_db.engine
        capture = Capture(engine)
        now = ops.now()  # the database's clock
        with engine.connect() as conn:

            def one(where: Any) -> Any:
                return conn.execute(sa.select(r).where(where).order_by(r.c.id).limit(1)).first()

            stuck = one(r.c.state == "IN_PROGRESS")
            failed = one(sa.and_(r.c.state == "FAILED", r.c.retryable.is_(False)))
            retryable = one(sa.and_(r.c.state == "FAILED", r.c.retryable.is_(True)))
            # mark_failed needs a retryable failure: a final one is refused ("already failed for good").
            failed2 = conn.execute(
                sa.select(r).where(r.c.state == "FAILED", r.c.retryable.is_(True)).order_by(r.c.id.desc()).limit(1)
            ).first()
            completed = one(r.c.state == "COMPLETED")
            completed2 = conn.execute(
                sa.select(r).where(r.c.state == "COMPLETED").order_by(r.c.id.desc()).limit(1)
            ).first()
            conn.rollback()

        def store_call(method: Callable[..., Any], *args: Any, **kwargs: Any) -> Callable[[], Any]:
            """``method(conn, *args, **kwargs)`` in a transaction that is rolled back (DML changes nothing)."""

            def run() -> Any:
                with engine.connect() as conn:
                    trans = conn.begin()
                    try:
                        return method(conn, *args, **kwargs)
                    finally:
                        trans.rollback()

            return run

        # Claims and outcomes are built by the state machine, as the request path builds them.
        token = "x" * 32
        fresh = Command(
            scope="tenant-1",
            key=f"{run_id}-new",
            request_hash="v1:" + "0" * 64,
            method="POST",
            path="/leased",
            endpoint="leased",
        )
        fresh_claim = new_claim(fresh, token)
        retry_claim = existing_claim(
            Decision.RETRY,
            retryable._mapping,
            Command(
                scope=retryable.scope,
                key=retryable.key,
                request_hash=retryable.request_hash,
                method=retryable.method,
                path=retryable.path,
                endpoint=retryable.endpoint,
            ),
            token,
        )
        completed_outcome = outcome(
            State.COMPLETED,
            False,
            status=201,
            headers=[["Content-Type", "application/json"], ["Location", "/payments/1"]],
            body=b'{"amount":1250,"currency":"EUR","id":1,"status":"created"}\n',
            resource_ref=None,
            error=None,
        )
        seen_failed = {**failed._mapping, "is_stuck": False}
        mark_retryable_values = operator_transition(Action.MARK_RETRYABLE, seen_failed).values

        def first_leased(conn: Any) -> int | None:
            """A leased first request's claim: the read (no record), then the insert."""
            assert store.find(conn, fresh.scope, fresh.key) is None
            return store.insert(conn, fresh_claim, lease=options.lease, ttl=options.ttl)

        def first_atomic(conn: Any) -> int | None:
            """An atomic first request's claim: the read with the key's advisory lock, then the insert."""
            locked, row = store.find_and_lock(conn, fresh.scope, fresh.key)
            assert locked and row is None
            return store.insert(conn, fresh_claim, lease=options.lease, ttl=options.ttl)

        cases: list[tuple[str, str, Callable[[], Any], bool]] = [
            # (name, where it is used, call, read-only)
            ("operations.stats", "dashboard overview, CLI stats", lambda: ops.stats(), True),
            ("operations.list_stuck", "dashboard stuck list, CLI stuck", lambda: ops.list_stuck(), True),
            ("operations.list_stuck page 10", "dashboard pagination", lambda: ops.list_stuck(page=10), True),
            ("operations.list_failed", "dashboard failed list", lambda: ops.list_failed(), True),
            ("operations.list_failed final", "dashboard failed list", lambda: ops.list_failed(retryable=False), True),
            ("operations.list_failed page 100", "dashboard pagination", lambda: ops.list_failed(page=100), True),
            ("operations.list_conflicts", "dashboard conflicts", lambda: ops.list_conflicts(), True),
            (
                "operations.list_conflicts since 1h",
                "dashboard conflicts",
                lambda: ops.list_conflicts(since=now - timedelta(hours=1)),
                True,
            ),
            ("operations.search by key", "dashboard search", lambda: ops.search("seed-424242"), True),
            ("operations.search by scope", "dashboard search", lambda: ops.search("tenant-42"), True),
            ("operations.search miss", "dashboard search", lambda: ops.search("no-such-key"), True),
            ("operations.get", "dashboard record detail", lambda: ops.get(completed.id), True),
            ("operations.show", "CLI show", lambda: ops.show(completed.scope, completed.key), True),
            ("operations.now", "dashboard and CLI ages (the database's clock)", lambda: ops.now(), True),
            (
                "operations.purge (1 batch, nothing expired)",
                "CLI purge",
                lambda: ops.purge(max_batches=1),
                True,
            ),
            (
                "store.find",
                "every protected request; replay, conflict, in progress (the read only)",
                store_call(store.find, completed.scope, completed.key),
                True,
            ),
            ("store.get", "operations", store_call(store.get, completed.id), True),
            (
                "store.find + store.insert (fresh key)",
                "first request, leased (claim)",
                store_call(first_leased),
                True,
            ),
            (
                "store.find_and_lock + store.insert (fresh key)",
                "first request, atomic (claim)",
                store_call(first_atomic),
                True,
            ),
            (
                "store.reclaim",
                "retry of a retryable failure",
                store_call(
                    store.reclaim, retryable.id, retryable.version, retry_claim, lease=options.lease, ttl=options.ttl
                ),
                True,
            ),
            (
                "store.settle",
                "outcome of every request",
                store_call(
                    store.settle, stuck.id, stuck.version, stuck.lease_token, completed_outcome, ttl=options.ttl
                ),
                True,
            ),
            (
                "store.update_at_version",
                "operator actions",
                store_call(store.update_at_version, failed.id, failed.version, mark_retryable_values, ttl=options.ttl),
                True,
            ),
            (
                "store.delete_at_version",
                "release",
                store_call(store.delete_at_version, completed.id, completed.version),
                True,
            ),
            (
                "store.add_event",
                "conflicts, operator actions",
                store_call(
                    store.add_event,
                    record_id=completed.id,
                    scope=completed.scope,
                    key=completed.key,
                    kind=EventKind.CONFLICT,
                ),
                True,
            ),
            ("store.count_client_event", "conflicts", store_call(store.count_client_event, completed.id), True),
            ("store.events_of", "record detail", store_call(store.events_of, stuck.id), True),
            # Operator actions change one record each: run once.
            (
                "operations.mark_retryable",
                "dashboard/CLI action",
                lambda: ops.mark_retryable(stuck.id, actor="bench"),
                False,
            ),
            (
                "operations.mark_failed",
                "dashboard/CLI action",
                lambda: ops.mark_failed(failed2.id, actor="bench"),
                False,
            ),
            (
                "operations.acknowledge",
                "dashboard/CLI action",
                lambda: ops.acknowledge(failed.id, actor="bench"),
                False,
            ),
            ("operations.release", "dashboard/CLI action", lambda: ops.release(completed2.id, actor="bench"), False),
        ]
        known = {name.split(" ")[0].split(".", 1)[1] for name, *_ in cases if name.startswith("operations.")}
        public = [
            name
            for name, obj in inspect.getmembers(ops, inspect.isfunction)
            if obj.__module__ == ops.__name__ and not name.startswith("_") and name in getattr(ops, "__all__", [name])
        ]
        # act: what the four actions call (measured through them); refusal: the state machine only, no SQL.
        not_measured = sorted(set(public) - known - {"bounds", "record_dict", "act", "refusal"})
        results = _measure(cases, capture, db, repeat)
        sa.event.remove(engine, "before_cursor_execute", capture._hook)
    return {
        "queries": results,
        "not_measured": not_measured,
        "at": datetime.now(timezone.utc).isoformat(),
    }


def _measure(
    cases: list[tuple[str, str, Callable[[], Any], bool]], capture: Capture, db: str, repeat: int
) -> list[dict[str, Any]]:
    """Time each case (read-only ones ``repeat`` times after a warm-up) and EXPLAIN ANALYZE its statements."""
    results: list[dict[str, Any]] = []
    for name, used_by, call, read_only in cases:
        try:
            if read_only:
                call()  # warm-up (plans cached, pages in shared buffers)
                with capture.recording() as statements:
                    times, _ = _timed(call, 1)
                more, _ = _timed(call, repeat - 1)
                times += more
            else:
                with capture.recording() as statements:
                    times, _ = _timed(call, 1)
        except Exception as exc:
            results.append({"name": name, "used_by": used_by, "error": f"{type(exc).__name__}: {exc}"})
            continue
        plans = []
        for statement, params in list(statements):
            if statement.strip().upper().startswith(("BEGIN", "COMMIT", "SET ")):
                continue
            plan = explain(db, statement, params) if read_only else {"note": "action ran once; not replayed"}
            plans.append({"sql": " ".join(statement.split())[:300], **plan})
        slowest = max((p.get("execution_ms", 0.0) for p in plans), default=0.0)
        results.append(
            {
                "name": name,
                "used_by": used_by,
                "wall_ms_median": round(statistics.median(times), 3),
                "wall_ms_max": round(max(times), 3),
                "statements": len(plans),
                "slowest_statement_ms": round(slowest, 3),
                "seq_scan": any(p.get("seq_scan") for p in plans),
                "plans": plans,
            }
        )
    return results


SEED_CONFLICTS_SQL = """
INSERT INTO idempotency_events (record_id, scope, key, kind, actor, detail, created_at)
SELECT r.id, r.scope, r.key, 'conflict', NULL,
       json_build_object('method', 'POST', 'path', '/leased', 'endpoint', 'leased',
                         'request_hash', 'v1:' || md5(r.key || 'other')),
       r.created_at + interval '7 seconds'
FROM idempotency_records r
"""


def measure_event_queries(db: str, run_id: str, repeat: int = 5) -> dict[str, Any]:
    """Add one conflict event per record (1M in the last 23 hours: a day of hostile clients), then time the
    queries that read events: the dashboard overview's counts, the conflicts list, a record's timeline."""
    conn = pg_connect(db)
    conn.autocommit = True
    t0 = time.perf_counter()
    with conn.cursor() as cur:
        cur.execute("SET synchronous_commit = off")
        cur.execute(SEED_CONFLICTS_SQL)
        added = cur.rowcount
        cur.execute("VACUUM (ANALYZE) idempotency_events")
        cur.execute("SELECT count(*) FROM idempotency_events")
        total = cur.fetchone()[0]
        cur.execute("SELECT min(id) FROM idempotency_records WHERE id >= (SELECT max(id) / 2 FROM idempotency_records)")
        middle = cur.fetchone()[0]
    conn.close()
    log(f"added {added:,} conflict events ({total:,} in all) in {time.perf_counter() - t0:.1f}s")
    os.environ.update(bench_env(db, run_id))
    from app import create_app
    from app import db as flask_db

    from flask_idempotent import operations as ops

    app = create_app()
    with app.app_context():
        now = ops.now()  # the database's clock
        capture = Capture(flask_db.engine)
        cases: list[tuple[str, str, Callable[[], Any], bool]] = [
            ("operations.stats", "dashboard overview, CLI stats", lambda: ops.stats(), True),
            ("operations.list_conflicts", "dashboard conflicts", lambda: ops.list_conflicts(), True),
            ("operations.list_conflicts page 100", "dashboard pagination", lambda: ops.list_conflicts(page=100), True),
            (
                "operations.list_conflicts since 1h",
                "dashboard conflicts",
                lambda: ops.list_conflicts(since=now - timedelta(hours=1)),
                True,
            ),
            ("operations.get", "dashboard record detail", lambda: ops.get(middle), True),
        ]
        results = _measure(cases, capture, db, repeat)
        sa.event.remove(flask_db.engine, "before_cursor_execute", capture._hook)
    return {"events_added": added, "events_total": total, "queries": results}
