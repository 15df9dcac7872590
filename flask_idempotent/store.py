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

    # Reads ------------------------------------------------------------------------------------------------

    def find(self, conn: Executor, scope: str, key: str) -> Row[Any] | None:
        r = self.records
        return conn.execute(sa.select(r).where(r.c.scope == scope, r.c.key == key)).first()  # type: ignore[no-any-return]

    def get(self, conn: Executor, record_id: int) -> Row[Any] | None:
        r = self.records
        return conn.execute(sa.select(r).where(r.c.id == record_id)).first()  # type: ignore[no-any-return]

    def find_and_lock(self, conn: Executor, scope: str, key: str) -> tuple[bool, Row[Any] | None]:
        """Read the record and, on PostgreSQL, try a transaction-scoped advisory lock on ``(scope, key)``.

        One statement. ``locked`` is ``False`` when another transaction holds the key (an atomic request in
        flight); the row is still returned as last committed, so a replay never waits for a lock. Other
        databases serialize writers themselves (SQLite's write lock), so they always "lock".
        """
        if _dialect(conn) != "postgresql":
            return True, self.find(conn, scope, key)
        r = self.records
        lock = sa.func.pg_try_advisory_xact_lock(advisory_key(scope, key)).label("_locked")
        one = sa.select(sa.literal(1).label("one")).subquery()
        joined = one.outerjoin(r, sa.and_(r.c.scope == scope, r.c.key == key))
        row = conn.execute(sa.select(lock, *r.c).select_from(joined)).one()
        return bool(row._locked), (None if row.id is None else row)

    # Claims -----------------------------------------------------------------------------------------------

    def insert(self, conn: Executor, values: Mapping[str, Any]) -> int | None:
        """Insert a new record; return its id, or ``None`` if ``(scope, key)`` is already taken."""
        dialect = _dialect(conn)
        if dialect == "postgresql":
            stmt: Any = postgresql.insert(self.records).on_conflict_do_nothing(index_elements=["scope", "key"])
        elif dialect == "sqlite":
            stmt = sqlite.insert(self.records).on_conflict_do_nothing(index_elements=["scope", "key"])
        else:  # not a supported store, but the unique constraint still decides
            try:
                result = conn.execute(sa.insert(self.records).values(**values))
            except sa.exc.IntegrityError:
                return None
            return int(result.inserted_primary_key[0])
        row = conn.execute(stmt.values(**values).returning(self.records.c.id)).first()
        return None if row is None else int(row[0])

    def reclaim(self, conn: Executor, seen: Row[Any], values: Mapping[str, Any]) -> bool:
        """Take over the record ``seen`` if nobody changed it since it was read (compare and set)."""
        r = self.records
        result = conn.execute(
            sa.update(r)
            .where(
                r.c.id == seen.id,
                r.c.state == seen.state,
                r.c.attempts == seen.attempts,
                r.c.retryable == seen.retryable,
                r.c.expires_at == seen.expires_at,
                r.c.lease_token.is_(None) if seen.lease_token is None else r.c.lease_token == seen.lease_token,
            )
            .values(**values)
        )
        return bool(result.rowcount == 1)

    # Fenced writes of the lease owner ----------------------------------------------------------------------

    def settle(self, conn: Executor, record_id: int, lease_token: str, values: Mapping[str, Any]) -> bool:
        """Write the outcome; ``False`` if the lease was lost (taken over, released or marked by an operator)."""
        r = self.records
        result = conn.execute(
            sa.update(r)
            .where(r.c.id == record_id, r.c.lease_token == lease_token, r.c.state == State.IN_PROGRESS.value)
            .values(**values)
        )
        return bool(result.rowcount == 1)

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
