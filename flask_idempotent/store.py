"""The record store: every SQL statement the extension runs.

Functions take a ``conn``: a SQLAlchemy ``Connection`` (leased mode, autocommit: each statement is its own
short transaction) or the app's ``db.session`` (atomic mode: the view's own transaction). Correctness rests
on the unique constraint on ``(scope, key)`` and on compare-and-set updates, never on process-local locks.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any, Protocol

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Row

from .constants import EventKind, State
from .models import Tables


class Executor(Protocol):
    """Anything with ``execute``: a ``Connection`` or a ``Session``."""

    def execute(self, statement: Any, params: Any = ..., /) -> Any: ...


def advisory_key(scope: str, key: str) -> int:
    """A signed 64-bit lock id for ``(scope, key)``; a collision only makes a request wait, never run twice."""
    digest = hashlib.blake2b(f"{len(scope)}:{scope}{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


def _dialect(conn: Any) -> str:
    if isinstance(conn, sa.engine.Connection):
        return conn.dialect.name
    return str(conn.get_bind().dialect.name)


class RecordStore:
    """SQL for the extension's two tables."""

    def __init__(self, tables: Tables) -> None:
        self.tables = tables
        self.records = tables.records
        self.events = tables.events
        # The request path's statements are built once with bound parameters: per request only the values
        # change, so SQLAlchemy finds them in its compiled cache without rebuilding or re-keying them.
        r, bind = self.records, sa.bindparam
        self._find = sa.select(r).where(r.c.scope == bind("_scope"), r.c.key == bind("_key"))
        one = sa.select(sa.literal(1).label("one")).subquery()
        unique = ["scope", "key"]
        self._insert = {
            "postgresql": postgresql.insert(r).on_conflict_do_nothing(index_elements=unique).returning(r.c.id),
            "sqlite": sqlite.insert(r).on_conflict_do_nothing(index_elements=unique).returning(r.c.id),
        }
        self._find_and_lock = sa.select(
            sa.func.pg_try_advisory_xact_lock(bind("_lock", type_=sa.BigInteger)).label("_locked"), *r.c
        ).select_from(one.outerjoin(r, sa.and_(r.c.scope == bind("_scope"), r.c.key == bind("_key"))))
        unchanged = (
            r.c.id == bind("_id"),
            r.c.state == bind("_state"),
            r.c.attempts == bind("_attempts"),
            r.c.retryable == bind("_retryable"),
            r.c.expires_at == bind("_expires_at"),
        )
        self._reclaim = {
            False: sa.update(r).where(*unchanged, r.c.lease_token == bind("_lease_token")),
            True: sa.update(r).where(*unchanged, r.c.lease_token.is_(None)),
        }
        e = self.events
        counted = (
            sa.update(r)
            .where(r.c.id == bind("_id"))
            .values(event_count=r.c.event_count + sa.literal_column("1", sa.Integer))
            .returning(r.c.event_count)
            .cte("counted")
        )
        # Parameters named like a record column would become SET clauses of the UPDATE: prefix them all.
        event_columns = ("record_id", "scope", "key", "kind", "detail", "created_at")
        self._add_client_event = sa.insert(e).from_select(
            event_columns,
            sa.select(*(bind(f"_{name}", type_=e.c[name].type) for name in event_columns)).where(
                sa.exists(sa.select(counted.c.event_count).where(counted.c.event_count <= bind("_cap")))
            ),
        )
        self._settle = sa.update(r).where(
            r.c.id == bind("_id"), r.c.lease_token == bind("_lease_token"), r.c.state == State.IN_PROGRESS.value
        )

    # Reads ------------------------------------------------------------------------------------------------

    def find(self, conn: Executor, scope: str, key: str) -> Row[Any] | None:
        return conn.execute(self._find, {"_scope": scope, "_key": key}).first()  # type: ignore[no-any-return]

    def get(self, conn: Executor, record_id: int) -> Row[Any] | None:
        r = self.records
        return conn.execute(sa.select(r).where(r.c.id == record_id)).first()  # type: ignore[no-any-return]

    # Claims -----------------------------------------------------------------------------------------------

    def find_and_lock(self, conn: Executor, scope: str, key: str) -> tuple[bool, Row[Any] | None]:
        """Read the record and, on PostgreSQL, try a transaction-scoped advisory lock on ``(scope, key)``.

        One statement. ``locked`` is ``False`` when another transaction holds the key (an atomic request in
        flight); the row is still returned as last committed, so a replay never waits for a lock. Other
        databases serialize writers themselves (SQLite's write lock), so they always "lock".
        """
        if _dialect(conn) != "postgresql":
            return True, self.find(conn, scope, key)
        row = conn.execute(self._find_and_lock, {"_lock": advisory_key(scope, key), "_scope": scope, "_key": key}).one()
        return bool(row._locked), (None if row.id is None else row)

    def claim_or_find(
        self, conn: Executor, values: Mapping[str, Any], *, lock: bool = False
    ) -> tuple[bool, int | None, Row[Any] | None]:
        """Read the record holding the key of ``values``; if there is none, claim the key by inserting them.

        Returns ``(locked, id, row)``: ``id`` when inserted; else ``row``, the record holding the key, or
        ``None`` when another request inserted it between the read and the insert (read it again). With
        ``lock`` (atomic mode) the read is :meth:`find_and_lock`; ``locked`` is ``False`` when another
        transaction holds the key, and then nothing is inserted.

        A read first, not an insert first: measured on PostgreSQL, a replay costs one plain SELECT (about
        100 us) instead of a no-op INSERT and a SELECT, while a first request costs the same within noise
        (folding both into one INSERT ... ON CONFLICT CTE saved the round trip but cost as much in planning).
        """
        scope, key = values["scope"], values["key"]
        locked, row = self.find_and_lock(conn, scope, key) if lock else (True, self.find(conn, scope, key))
        if row is not None or not locked:
            return locked, None, row
        return True, self.insert(conn, values), None

    def insert(self, conn: Executor, values: Mapping[str, Any]) -> int | None:
        """Insert a new record; return its id, or ``None`` if ``(scope, key)`` is already taken."""
        stmt = self._insert.get(_dialect(conn))
        if stmt is None:  # not a supported store, but the unique constraint still decides
            try:
                result = conn.execute(sa.insert(self.records).values(**values))
            except sa.exc.IntegrityError:
                return None
            return int(result.inserted_primary_key[0])
        row = conn.execute(stmt, dict(values)).first()
        return None if row is None else int(row[0])

    def reclaim(self, conn: Executor, seen: Row[Any], values: Mapping[str, Any]) -> bool:
        """Take over the record ``seen`` if nobody changed it since it was read (compare and set)."""
        params = {
            **values,
            "_id": seen.id,
            "_state": seen.state,
            "_attempts": seen.attempts,
            "_retryable": seen.retryable,
            "_expires_at": seen.expires_at,
        }
        if seen.lease_token is not None:
            params["_lease_token"] = seen.lease_token
        return bool(conn.execute(self._reclaim[seen.lease_token is None], params).rowcount == 1)

    # Fenced writes of the lease owner ----------------------------------------------------------------------

    def settle(self, conn: Executor, record_id: int, lease_token: str, values: Mapping[str, Any]) -> bool:
        """Write the outcome; ``False`` if the lease was lost (taken over, released or marked by an operator)."""
        params = {**values, "_id": record_id, "_lease_token": lease_token}
        return bool(conn.execute(self._settle, params).rowcount == 1)

    # Operator transitions ---------------------------------------------------------------------------------

    def update_if_unchanged(self, conn: Executor, seen: Row[Any], values: Mapping[str, Any]) -> bool:
        """Operator update of ``seen``; ``False`` if the record changed since it was read."""
        r = self.records
        result = conn.execute(
            sa.update(r)
            .where(
                r.c.id == seen.id,
                r.c.updated_at == seen.updated_at,
                r.c.state == seen.state,
                r.c.attempts == seen.attempts,
            )
            .values(**values)
        )
        return bool(result.rowcount == 1)

    def delete(self, conn: Executor, record_id: int) -> bool:
        r = self.records
        return bool(conn.execute(sa.delete(r).where(r.c.id == record_id)).rowcount == 1)

    # Events -----------------------------------------------------------------------------------------------

    def add_event(
        self,
        conn: Executor,
        *,
        record: Row[Any] | None,
        scope: str,
        key: str,
        kind: EventKind,
        now: datetime,
        actor: str | None = None,
        detail: Mapping[str, Any] | None = None,
    ) -> None:
        conn.execute(
            sa.insert(self.events).values(
                record_id=None if record is None else record.id,
                scope=scope,
                key=key,
                kind=kind.value,
                actor=actor,
                detail=dict(detail) if detail else None,
                created_at=now,
            )
        )

    def add_client_event(
        self,
        conn: Executor,
        *,
        record: Row[Any],
        kind: EventKind,
        now: datetime,
        detail: Mapping[str, Any],
        cap: int,
    ) -> None:
        """Count an event a client caused on ``record`` and store it while the record's count is within ``cap``.

        The count is ``event_count``, the only column this touches. One statement on PostgreSQL (the
        counting UPDATE in a CTE feeds the INSERT); elsewhere two.
        """
        if _dialect(conn) != "postgresql":
            if self.count_client_event(conn, record.id) <= cap:
                self.add_event(
                    conn, record=record, scope=record.scope, key=record.key, kind=kind, now=now, detail=detail
                )
            return
        params = {
            "_id": record.id,
            "_cap": cap,
            "_record_id": record.id,
            "_scope": record.scope,
            "_key": record.key,
            "_kind": kind.value,
            "_detail": dict(detail),
            "_created_at": now,
        }
        conn.execute(self._add_client_event, params)

    def count_client_event(self, conn: Executor, record_id: int) -> int:
        """Count an event a client caused on ``record_id``; return the new count (0 if the record is gone)."""
        r = self.records
        row = conn.execute(
            sa.update(r).where(r.c.id == record_id).values(event_count=r.c.event_count + 1).returning(r.c.event_count)
        ).first()
        return 0 if row is None else int(row[0])

    def events_of(self, conn: Executor, record_id: int, limit: int = 200) -> Sequence[Row[Any]]:
        e = self.events
        return conn.execute(  # type: ignore[no-any-return]
            sa.select(e).where(e.c.record_id == record_id).order_by(e.c.id.desc()).limit(limit)
        ).all()
