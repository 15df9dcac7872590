"""The operators' reporting queries: the listings, searches, counts and charts behind the dashboard and the
CLI (through ``operations.py``), built per call from the filters an operator chose.

The request path's statements stay in ``store.py``, prebuilt once; these read the same tables with the same
predicates (``machine.stuck`` and the others, evaluated with the database's clock through the store's
:meth:`~flask_idempotent.store.RecordStore.clock_params`). Each takes the app's
:class:`~flask_idempotent.store.RecordStore` and, when it runs SQL, a ``Connection``.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any, NamedTuple

import sqlalchemy as sa
from sqlalchemy.engine import Row

from . import machine
from .constants import EventKind, State
from .store import RecordStore, now_at

#: Counts shown on the dashboard and by the CLI stop here ("10000+"): counting is linear in what matches, and a
#: hostile client can make conflicts numerous (measured: 1M conflict events took stats to 51 ms).
COUNT_LIMIT = 10_000
#: Above this many rows (the planner's estimate) PostgreSQL's COMPLETED count is estimated, not counted.
EXACT_COUNT_LIMIT = 100_000


class Listing(NamedTuple):
    """A listing of records: the query (its columns those of the store's deciding read, in the listing's
    order) and its filter, which :func:`bounded_count` counts."""

    query: sa.Select[Any]
    where: Any


def bounded_count(store: RecordStore, conn: sa.Connection, table: sa.Table, where: Any) -> tuple[int, bool]:
    """How many rows of ``table`` match ``where``, counting at most :data:`COUNT_LIMIT`; and whether it stopped."""
    matching = sa.select(sa.literal(1)).select_from(table).where(where).limit(COUNT_LIMIT + 1).subquery()
    now = store.clock_params()
    params = {**now, "_day_ago_s": now["_now_s"] - 86400}
    n = int(conn.execute(sa.select(sa.func.count()).select_from(matching), params).scalar_one())
    return min(n, COUNT_LIMIT), n > COUNT_LIMIT


def page(store: RecordStore, conn: sa.Connection, query: sa.Select[Any], limit: int, offset: int) -> Sequence[Row[Any]]:
    return conn.execute(query.limit(limit).offset(offset), store.clock_params()).all()


def stuck(store: RecordStore, kind: str | None = None) -> Listing:
    """IN_PROGRESS records whose lease ended (``machine.stuck``), longest stuck first.

    ``kind`` (``http`` or ``task``) keeps only records of that kind.
    """
    r = store.records
    where = machine.stuck(r, now_at())
    if kind is not None:
        where = sa.and_(where, r.c.kind == kind)
    query = sa.select(*store.seen_columns).where(where).order_by(r.c.locked_until, r.c.id)
    return Listing(query, where)


def failed(store: RecordStore, retryable: bool | None, awaiting: bool = False, kind: str | None = None) -> Listing:
    """FAILED records, newest first; ``awaiting``: final failures nobody acknowledged yet; ``kind`` as above."""
    r = store.records
    where: Any = machine.awaiting_decision(r) if awaiting else r.c.state == State.FAILED.value
    if kind is not None:
        where = sa.and_(where, r.c.kind == kind)
    if retryable is not None and not awaiting:
        where = sa.and_(where, r.c.retryable == retryable)
    query = sa.select(*store.seen_columns).where(where).order_by(r.c.updated_at.desc(), r.c.id.desc())
    return Listing(query, where)


def narrow(
    store: RecordStore,
    query: sa.Select[Any],
    *,
    endpoint: str | None = None,
    recovery_point: str | None = None,
    changed_before: datetime | None = None,
) -> sa.Select[Any]:
    """A listing's ``query`` keeping only the records of ``endpoint``, at ``recovery_point``, or last changed
    (``updated_at``) before ``changed_before``: what a bulk action selects."""
    r = store.records
    if endpoint is not None:
        query = query.where(r.c.endpoint == endpoint)
    if recovery_point is not None:
        query = query.where(r.c.recovery_point == recovery_point)
    if changed_before is not None:
        query = query.where(r.c.updated_at < changed_before)
    return query


def search(store: RecordStore, text: str, page: int, size: int, scopes: Sequence[str] = ()) -> Listing:
    """Records whose key or scope equals ``text`` exactly, newest first (bound parameters; index-served).

    One branch per column, each walking its (column, id) index newest first and cut to the rows this page
    can need, then merged: with a single "key = q OR scope = q ORDER BY id DESC" PostgreSQL walks the
    primary key backwards and, for a rare or missing value, reads the whole table (160 ms at 1M records).
    ``scopes`` (the app's ``scope_search`` answer for ``text``, a few) adds the records of those scopes, on
    the same (scope, id) index.
    """
    r = store.records
    branches = [r.c.key == text, sa.and_(r.c.scope == text, r.c.key != text)]
    extra = sorted({scope for scope in scopes if scope != text})
    if extra:
        branches.append(sa.and_(r.c.scope.in_(extra), r.c.key != text))
    newest = [
        sa.select(*store.seen_columns).where(where).order_by(r.c.id.desc()).limit(page * size).subquery()
        for where in branches
    ]
    merged = sa.union_all(*(sa.select(branch) for branch in newest)).subquery()
    return Listing(sa.select(merged).order_by(merged.c.id.desc()), sa.or_(*branches))


def conflicts(
    store: RecordStore, conn: sa.Connection, since: datetime | None, limit: int, offset: int
) -> tuple[int, bool, Sequence[Row[Any]], dict[int, Row[Any]]]:
    """Conflict events, newest first, with the records they were about (by id; missing once released)."""
    r, e = store.records, store.events
    where: Any = e.c.kind == EventKind.CONFLICT.value
    if since is not None:
        where = sa.and_(where, e.c.created_at >= since)
    total, capped = bounded_count(store, conn, e, where)
    events = conn.execute(
        sa.select(e).where(where).order_by(e.c.created_at.desc(), e.c.id.desc()).limit(limit).offset(offset)
    ).all()
    ids = {ev.record_id for ev in events if ev.record_id is not None}
    originals: dict[int, Row[Any]] = {}
    if ids:
        query = sa.select(*store.seen_columns).where(r.c.id.in_(ids))
        originals = {row.id: row for row in conn.execute(query, store.clock_params())}
    return total, capped, events, originals


def activity(
    store: RecordStore, conn: sa.Connection, since: datetime, limit: int
) -> dict[str, tuple[list[datetime], bool]]:
    """Times of the last day's activity for the overview's charts: each list holds at most ``limit``
    times (newest first) and says whether it stopped there (the chart then shows "at least").

    - ``created``: records' ``created_at``, read newest first along the primary key (ids grow with time;
      ``created_at`` has no index of its own), so at most ``limit`` rows are read; a record whose claim
      was restarted keeps its old id and is missed here;
    - ``conflicts``: conflict events on the (kind, created_at) index;
    - ``failed``: ``updated_at`` of FAILED records on the (state, updated_at) index: when each became
      FAILED, or was last changed since (a later operator action moves it).
    """
    r, e = store.records, store.events
    queries = {
        "created": sa.select(r.c.created_at).order_by(r.c.id.desc()),
        "conflicts": sa.select(e.c.created_at)
        .where(e.c.kind == EventKind.CONFLICT.value, e.c.created_at >= since)
        .order_by(e.c.created_at.desc()),
        "failed": sa.select(r.c.updated_at)
        .where(r.c.state == State.FAILED.value, r.c.updated_at >= since)
        .order_by(r.c.updated_at.desc()),
    }
    result: dict[str, tuple[list[datetime], bool]] = {}
    for name, query in queries.items():
        times = [t for t in conn.execute(query.limit(limit + 1)).scalars() if t is not None]
        capped = len(times) > limit
        times = times[:limit]
        if name == "created":
            capped = capped and times[-1] >= since
            times = [t for t in times if t >= since]
        result[name] = (times, capped)
    return result


def stats(store: RecordStore, conn: sa.Connection, postgresql_estimate: bool) -> dict[str, Any]:
    """Counts by state, stuck records and the oldest one's lease end, failures, conflicts in the last 24 h."""
    r, e = store.records, store.events
    now = now_at()

    def count(where: Any) -> int:
        return int(conn.execute(sa.select(sa.func.count()).select_from(r).where(where)).scalar_one())

    # Per-state counts on the (state, ...) indexes: a GROUP BY would scan the whole table. COMPLETED is
    # the bulk of a large table, so PostgreSQL reports it from the planner's row estimate.
    by_state = {
        State.IN_PROGRESS.value: count(r.c.state == State.IN_PROGRESS.value),
        State.FAILED.value: count(r.c.state == State.FAILED.value),
    }
    estimate = -1.0
    if postgresql_estimate:
        estimate = float(
            conn.execute(sa.text("SELECT reltuples FROM pg_class WHERE oid = to_regclass(:t)"), {"t": r.name}).scalar()
            or -1
        )
    completed_estimated = estimate >= EXACT_COUNT_LIMIT
    if completed_estimated:
        by_state[State.COMPLETED.value] = max(0, int(estimate) - sum(by_state.values()))
    else:  # small, never analyzed, or SQLite: counting exactly is cheap enough
        by_state[State.COMPLETED.value] = count(r.c.state == State.COMPLETED.value)
    stuck_n, oldest, db_now = conn.execute(
        sa.select(sa.func.count(), sa.func.min(r.c.locked_until), sa.func.max(now)).where(machine.stuck(r, now)),
        store.clock_params(),
    ).one()
    if db_now is None:
        db_now = store.now(conn)
    failed = {
        bool(row.retryable): int(row.n)
        for row in conn.execute(
            sa.select(r.c.retryable, sa.func.count().label("n"))
            .where(r.c.state == State.FAILED.value)
            .group_by(r.c.retryable)
        )
    }
    awaiting = count(machine.awaiting_decision(r))
    conflicts, conflicts_capped = bounded_count(
        store, conn, e, sa.and_(e.c.kind == EventKind.CONFLICT.value, e.c.created_at >= now_at("_day_ago_s"))
    )
    return {
        "by_state": by_state,
        "completed_estimated": completed_estimated,
        "stuck": int(stuck_n),
        "oldest_stuck_lease_end": oldest,
        "failed_final": failed.get(False, 0),
        "failed_retryable": failed.get(True, 0),
        "awaiting_decision": awaiting,
        "conflicts_24h": conflicts,
        "conflicts_24h_capped": conflicts_capped,
        "db_now": db_now,
    }
