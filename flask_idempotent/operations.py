"""The operations API: what the CLI and the dashboard do to records. Needs an app context.

Listing functions return a :class:`Page`; every query is served by an index of ``models.py``. Actions go
through the state machine's transition checks, are compare-and-set updates (an action on a record that changed
since it was read fails with :class:`RecordChanged`), and write an event with the actor in the same
transaction.
"""

from __future__ import annotations

import base64
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from flask import current_app

from . import signals
from .constants import EventKind, State
from .extension import AppState, Idempotency
from .machine import TransitionError, check_mark_failed, check_mark_retryable, is_stale

__all__ = [
    "Page",
    "RecordChanged",
    "RecordNotFound",
    "TransitionError",
    "get",
    "list_conflicts",
    "list_failed",
    "list_stuck",
    "mark_failed",
    "mark_retryable",
    "purge",
    "release",
    "search",
    "show",
    "stats",
]

MAX_PER_PAGE = 200
#: Above this many rows (the planner's estimate) PostgreSQL's COMPLETED count is estimated, not counted.
EXACT_COUNT_LIMIT = 100_000
DEFAULT_PER_PAGE = 50


class RecordNotFound(LookupError):
    """No record with that id (or scope and key)."""


class RecordChanged(RuntimeError):
    """The record changed between reading it and acting on it; reload and decide again."""


#: Counts shown on the dashboard and by the CLI stop here ("10000+"): counting is linear in what matches, and a
#: hostile client can make conflicts numerous (measured: 1M conflict events took stats to 51 ms).
COUNT_LIMIT = 10_000


@dataclass
class Page:
    """One page of a listing. ``page`` and ``per_page`` are clamped to 1.. and 1..200.

    ``total`` is exact up to :data:`COUNT_LIMIT`; beyond it ``total_capped`` is true and ``total`` is the limit.
    """

    items: list[dict[str, Any]]
    total: int
    page: int
    per_page: int
    extra: dict[str, Any] = field(default_factory=dict)
    total_capped: bool = False

    @property
    def pages(self) -> int:
        pages = max(1, -(-self.total // self.per_page))
        return max(pages, self.page) if self.total_capped else pages

    @property
    def has_next(self) -> bool:
        if self.total_capped:
            return len(self.items) == self.per_page
        return self.page < self.pages

    @property
    def has_prev(self) -> bool:
        return self.page > 1


def _state() -> AppState:
    extension: Idempotency = current_app.extensions["idempotency"]
    return extension.state()


def bounds(page: Any = 1, per_page: Any = DEFAULT_PER_PAGE) -> tuple[int, int]:
    """Clamp user-supplied paging values; anything unparsable becomes the default."""

    def as_int(value: Any, default: int) -> int:
        try:
            return int(value)
        except (TypeError, ValueError):
            return default

    return max(1, as_int(page, 1)), min(MAX_PER_PAGE, max(1, as_int(per_page, DEFAULT_PER_PAGE)))


def record_dict(row: Any, *, now: datetime | None = None, body_limit: int | None = 0) -> dict[str, Any]:
    """A record as plain data. The body is left out unless ``body_limit`` is ``None`` (all) or positive."""
    data = dict(row._mapping)
    body = data.pop("response_body", None)
    data.pop("lease_token", None)  # a capability of the owning request; never shown
    data["response_body_size"] = None if body is None else len(body)
    if body is not None and body_limit != 0:
        shown = body if body_limit is None else body[:body_limit]
        try:
            data["response_body"] = shown.decode("utf-8")
        except UnicodeDecodeError:
            data["response_body_base64"] = base64.b64encode(shown).decode("ascii")
        data["response_body_truncated"] = len(shown) < len(body)
    if now is not None:
        data["stuck"] = is_stale(data, now)
        data["stuck_for_seconds"] = (
            (now - data["locked_until"]).total_seconds() if data["stuck"] and data["locked_until"] else None
        )
    return data


def bounded_count(conn: sa.Connection, table: sa.Table, where: Any) -> tuple[int, bool]:
    """How many rows of ``table`` match ``where``, counting at most :data:`COUNT_LIMIT`; and whether it stopped."""
    matching = sa.select(sa.literal(1)).select_from(table).where(where).limit(COUNT_LIMIT + 1).subquery()
    n = int(conn.execute(sa.select(sa.func.count()).select_from(matching)).scalar_one())
    return min(n, COUNT_LIMIT), n > COUNT_LIMIT


def _page(query: sa.Select[Any], table: sa.Table, where: Any, page: Any, per_page: Any, now: datetime) -> Page:
    state = _state()
    page_n, size = bounds(page, per_page)
    with state.db.engine.connect() as conn:
        total, capped = bounded_count(conn, table, where)
        rows = conn.execute(query.limit(size).offset((page_n - 1) * size)).all()
    return Page([record_dict(r, now=now) for r in rows], total, page_n, size, total_capped=capped)


# Reading ----------------------------------------------------------------------------------------------------


def stats(now: datetime | None = None) -> dict[str, Any]:
    """Counts by state, stuck records and the oldest one's age, conflicts in the last 24 h, failures by kind."""
    state = _state()
    now = now or state.clock()
    r, e = state.tables.records, state.tables.events
    stuck_where = sa.and_(r.c.state == State.IN_PROGRESS.value, r.c.locked_until <= now)
    with state.db.engine.connect() as conn:
        # Per-state counts on the (state, ...) indexes: a GROUP BY would scan the whole table. COMPLETED is
        # the bulk of a large table, so PostgreSQL reports it from the planner's row estimate.
        def count(where: Any) -> int:
            return int(conn.execute(sa.select(sa.func.count()).select_from(r).where(where)).scalar_one())

        by_state = {
            State.IN_PROGRESS.value: count(r.c.state == State.IN_PROGRESS.value),
            State.FAILED.value: count(r.c.state == State.FAILED.value),
        }
        completed_estimated = False
        estimate = -1.0
        if state.db.engine.dialect.name == "postgresql":
            estimate = float(
                conn.execute(
                    sa.text("SELECT reltuples FROM pg_class WHERE oid = to_regclass(:t)"), {"t": r.name}
                ).scalar()
                or -1
            )
        if estimate >= EXACT_COUNT_LIMIT:
            by_state[State.COMPLETED.value] = max(0, int(estimate) - sum(by_state.values()))
            completed_estimated = True
        else:  # small, never analyzed, or SQLite: counting exactly is cheap enough
            by_state[State.COMPLETED.value] = count(r.c.state == State.COMPLETED.value)
        stuck, oldest = conn.execute(sa.select(sa.func.count(), sa.func.min(r.c.locked_until)).where(stuck_where)).one()
        failed = {
            bool(row.retryable): int(row.n)
            for row in conn.execute(
                sa.select(r.c.retryable, sa.func.count().label("n"))
                .where(r.c.state == State.FAILED.value)
                .group_by(r.c.retryable)
            )
        }
        conflicts, conflicts_capped = bounded_count(
            conn, e, sa.and_(e.c.kind == EventKind.CONFLICT.value, e.c.created_at >= now - timedelta(hours=24))
        )
    return {
        "by_state": {name: by_state[name] for name in State.__members__},
        "completed_estimated": completed_estimated,
        "total": sum(by_state.values()),
        "stuck": int(stuck),
        "oldest_stuck_seconds": None if oldest is None else (now - oldest).total_seconds(),
        "failed_final": failed.get(False, 0),
        "failed_retryable": failed.get(True, 0),
        "conflicts_24h": conflicts,
        "conflicts_24h_capped": conflicts_capped,
    }


def list_stuck(page: Any = 1, per_page: Any = DEFAULT_PER_PAGE, now: datetime | None = None) -> Page:
    """IN_PROGRESS records whose lease expired, longest stuck first."""
    state = _state()
    now = now or state.clock()
    r = state.tables.records
    where = sa.and_(r.c.state == State.IN_PROGRESS.value, r.c.locked_until <= now)
    return _page(
        sa.select(r).where(where).order_by(r.c.locked_until, r.c.id),
        r,
        where,
        page,
        per_page,
        now,
    )


def list_failed(
    retryable: bool | None = None, page: Any = 1, per_page: Any = DEFAULT_PER_PAGE, now: datetime | None = None
) -> Page:
    """FAILED records, newest first; ``retryable`` filters retryable (True) or final (False) ones."""
    state = _state()
    now = now or state.clock()
    r = state.tables.records
    where = r.c.state == State.FAILED.value
    if retryable is not None:
        where = sa.and_(where, r.c.retryable == retryable)
    return _page(
        sa.select(r).where(where).order_by(r.c.updated_at.desc(), r.c.id.desc()),
        r,
        where,
        page,
        per_page,
        now,
    )


def list_conflicts(
    since: datetime | None = None, page: Any = 1, per_page: Any = DEFAULT_PER_PAGE, now: datetime | None = None
) -> Page:
    """Key reuse with another command, newest first: each item has the event and the original record's
    method, path and fingerprint (``record`` is ``None`` once the record was released or purged)."""
    state = _state()
    now = now or state.clock()
    r, e = state.tables.records, state.tables.events
    where = e.c.kind == EventKind.CONFLICT.value
    if since is not None:
        where = sa.and_(where, e.c.created_at >= since)
    page_n, size = bounds(page, per_page)
    with state.db.engine.connect() as conn:
        total, capped = bounded_count(conn, e, where)
        events = conn.execute(
            sa.select(e)
            .where(where)
            .order_by(e.c.created_at.desc(), e.c.id.desc())
            .limit(size)
            .offset((page_n - 1) * size)
        ).all()
        ids = {ev.record_id for ev in events if ev.record_id is not None}
        originals = {row.id: row for row in conn.execute(sa.select(r).where(r.c.id.in_(ids)))} if ids else {}
    items = []
    for ev in events:
        original = originals.get(ev.record_id)
        items.append({**dict(ev._mapping), "record": None if original is None else record_dict(original, now=now)})
    return Page(items, total, page_n, size, total_capped=capped)


def search(query: str, page: Any = 1, per_page: Any = DEFAULT_PER_PAGE, now: datetime | None = None) -> Page:
    """Records whose key or scope equals ``query`` exactly (bound parameters; index-served)."""
    state = _state()
    now = now or state.clock()
    r = state.tables.records
    page_n, size = bounds(page, per_page)
    # One branch per column, each walking its (column, id) index newest first and cut to the rows this page
    # can need, then merged: with a single "key = q OR scope = q ORDER BY id DESC" PostgreSQL walks the
    # primary key backwards and, for a rare or missing value, reads the whole table (160 ms at 1M records).
    branches = [r.c.key == query, sa.and_(r.c.scope == query, r.c.key != query)]
    newest = [sa.select(r).where(where).order_by(r.c.id.desc()).limit(page_n * size).subquery() for where in branches]
    merged = sa.union_all(*(sa.select(branch) for branch in newest)).subquery()
    return _page(
        sa.select(merged).order_by(merged.c.id.desc()),
        r,
        sa.or_(*branches),
        page,
        per_page,
        now,
    )


def _with_events(
    conn: sa.Connection, state: AppState, row: Any, now: datetime, body_limit: int | None
) -> dict[str, Any]:
    data = record_dict(row, now=now, body_limit=body_limit)
    data["events"] = [dict(ev._mapping) for ev in state.store.events_of(conn, row.id)]
    return data


def get(record_id: int, *, body_limit: int | None = 0, now: datetime | None = None) -> dict[str, Any]:
    """One record with its events (newest first). Raises :class:`RecordNotFound`."""
    state = _state()
    now = now or state.clock()
    with state.db.engine.connect() as conn:
        row = state.store.get(conn, record_id)
        if row is None:
            raise RecordNotFound(f"no idempotency record with id {record_id}")
        return _with_events(conn, state, row, now, body_limit)


def show(scope: str, key: str, *, body_limit: int | None = 0, now: datetime | None = None) -> dict[str, Any]:
    """The record of ``(scope, key)`` with its events. Raises :class:`RecordNotFound`."""
    state = _state()
    now = now or state.clock()
    with state.db.engine.connect() as conn:
        row = state.store.find(conn, scope, key)
        if row is None:
            raise RecordNotFound(f"no idempotency record for scope {scope!r} and key {key!r}")
        return _with_events(conn, state, row, now, body_limit)


# Actions ----------------------------------------------------------------------------------------------------


def _act(record_id: int, actor: str, kind: EventKind, values: Mapping[str, Any] | None, check: Any) -> dict[str, Any]:
    state = _state()
    now = state.clock()
    if not actor:
        raise ValueError("an operator action needs the actor's name")
    with state.db.engine.begin() as conn:
        row = state.store.get(conn, record_id)
        if row is None:
            raise RecordNotFound(f"no idempotency record with id {record_id}")
        check(row._mapping, now)
        if values is None:
            done = state.store.delete(conn, record_id)
        else:
            done = state.store.update_if_unchanged(conn, row, {**values, "updated_at": now})
        if not done:
            raise RecordChanged(f"record {record_id} changed while acting on it; reload it and decide again")
        state.store.add_event(
            conn,
            record=row,
            scope=row.scope,
            key=row.key,
            kind=kind,
            now=now,
            actor=actor,
            detail={"from_state": row.state, "retryable": row.retryable, "attempts": row.attempts},
        )
        after = None if values is None else state.store.get(conn, record_id)
    result = record_dict(after if after is not None else row, now=now)
    signals.operator_action.send(
        current_app._get_current_object(),  # type: ignore[attr-defined]
        record=result,
        action=kind.value,
        actor=actor,
    )
    return result


def mark_retryable(record_id: int, *, actor: str) -> dict[str, Any]:
    """FAILED or stuck IN_PROGRESS → FAILED retryable: the next retry runs the view again (attempts + 1).

    The old lease token is invalidated, so a late completion of a presumed-dead owner is refused.
    """
    values = {"state": State.FAILED.value, "retryable": True, "lease_token": None, "locked_until": None}
    return _act(record_id, actor, EventKind.MARK_RETRYABLE, values, check_mark_retryable)


def mark_failed(record_id: int, *, actor: str) -> dict[str, Any]:
    """FAILED or stuck IN_PROGRESS → FAILED final: retries get the stored failure (or 500 ``failed``)."""
    values = {"state": State.FAILED.value, "retryable": False, "lease_token": None, "locked_until": None}
    return _act(record_id, actor, EventKind.MARK_FAILED, values, check_mark_failed)


def release(record_id: int, *, actor: str) -> dict[str, Any]:
    """Delete the record: the key is free, and the next request with it runs as new. The event stays."""
    return _act(record_id, actor, EventKind.RELEASE, None, lambda row, now: None)


#: Seconds :func:`purge` rests between batches by default, leaving the database to the request path.
PURGE_PAUSE = 0.05


def purge(
    *,
    batch_size: int = 1000,
    max_batches: int | None = None,
    pause: float = PURGE_PAUSE,
    now: datetime | None = None,
) -> int:
    """Delete expired COMPLETED and FAILED records in batches of ``batch_size``; return how many.

    Each batch is its own short transaction. On PostgreSQL rows locked by a running request are skipped
    (``FOR UPDATE SKIP LOCKED``) instead of waited for. IN_PROGRESS records are never purged (see
    ``machine.is_expired``). Between batches it sleeps ``pause`` seconds: back to back, batches of 1000
    more than doubled the p99 of concurrent requests in the benchmark (see the README's Performance).
    """
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    if pause < 0:
        raise ValueError("pause must not be negative")
    state = _state()
    now = now or state.clock()
    r = state.tables.records
    engine = state.db.engine
    total = batches = 0
    while max_batches is None or batches < max_batches:
        victims = (
            sa.select(r.c.id)
            .where(r.c.expires_at <= now, r.c.state != State.IN_PROGRESS.value)
            .order_by(r.c.expires_at)
            .limit(batch_size)
        )
        if engine.dialect.name == "postgresql":
            victims = victims.with_for_update(skip_locked=True)
        with engine.begin() as conn:
            deleted = conn.execute(sa.delete(r).where(r.c.id.in_(victims.scalar_subquery()))).rowcount
        total += deleted
        batches += 1
        if deleted < batch_size or batches == max_batches:
            break
        if pause:
            time.sleep(pause)
    return total
