"""The record store: the SQL statements of the request path and the operator actions.

Functions take a ``conn``: a SQLAlchemy ``Connection``: the layer's own autocommit engine's (leased mode: each
statement is its own short transaction) or ``db.session.connection()`` (atomic mode: the view's own
transaction). Correctness rests on the unique constraint on ``(scope, key)``, on compare-and-set updates of
``(id, version)`` (the lease owner's also on its lease token) and on the database's clock, never on
process-local locks or a host's clock. The operators' listings, counts and charts, built per call from their
filters, are in ``reports.py``.

Time. Every time that decides something or is written comes from the database, inside the statement that uses
it (:func:`db_time`). The store adds ``offset()`` seconds to it: zero in production, moved by tests that need a
lease to run out (``Idempotency(clock_offset=...)``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Row
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.compiler import SQLCompiler

from . import machine
from .constants import EventKind, State
from .machine import Claim
from .models import Tables

#: The dialects the store has statements for (``init_app`` refuses any other).
SUPPORTED_DIALECTS = ("postgresql", "sqlite", "mysql", "mariadb")
#: SQLAlchemy's names for a MySQL or MariaDB server (``mysql://`` also reaches MariaDB).
MYSQL_DIALECTS = frozenset({"mysql", "mariadb"})
#: MySQL's ER_DUP_ENTRY: an INSERT refused by a unique index.
MYSQL_DUPLICATE_KEY = 1062


class db_time(sa.sql.functions.FunctionElement[datetime]):  # noqa: N801 - reads like the SQL function it is
    """The database's current time (naive UTC, like every stored time) plus ``seconds``, as SQL.

    PostgreSQL: ``statement_timestamp()``, the same for every use within one statement. SQLite: ``'now'``,
    also fixed for the duration of a statement. MySQL and MariaDB: ``UTC_TIMESTAMP(6)``.
    """

    type = sa.DateTime()
    inherit_cache = True
    name = "db_time"


@compiles(db_time, "postgresql")
def _db_time_postgresql(element: db_time, compiler: SQLCompiler, **kw: Any) -> str:
    seconds = compiler.process(element.clauses, **kw)
    return f"(timezone('UTC', statement_timestamp()) + make_interval(secs => {seconds}))"


@compiles(db_time, "sqlite")
def _db_time_sqlite(element: db_time, compiler: SQLCompiler, **kw: Any) -> str:
    seconds = compiler.process(element.clauses, **kw)
    return f"strftime('%Y-%m-%d %H:%M:%f', 'now', ({seconds}) || ' seconds')"


@compiles(db_time, "mysql")
@compiles(db_time, "mariadb")
def _db_time_mysql(element: db_time, compiler: SQLCompiler, **kw: Any) -> str:
    seconds = compiler.process(element.clauses, **kw)
    return f"TIMESTAMPADD(MICROSECOND, ROUND(({seconds}) * 1000000), UTC_TIMESTAMP(6))"


def advisory_key(scope: str, key: str) -> int:
    """A signed 64-bit lock id for ``(scope, key)``; a collision only makes a request wait, never run twice."""
    digest = hashlib.blake2b(f"{len(scope)}:{scope}{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


def dialect_of(conn: sa.Connection) -> str:
    return conn.dialect.name


def _now(name: str = "_now_s") -> db_time:
    return db_time(sa.bindparam(name, type_=sa.Float))


def now_at(name: str = "_now_s") -> db_time:
    """The database's clock plus the seconds bound as ``name`` (one of :meth:`RecordStore.clock_params`), as SQL."""
    return _now(name)


class RecordStore:
    """SQL for the extension's two tables.

    The request path's statements are built once with bound parameters: per request only the values change,
    so SQLAlchemy finds them in its compiled cache without rebuilding or re-keying them.
    """

    def __init__(
        self,
        tables: Tables,
        offset: Callable[[], float] = lambda: 0.0,
        *,
        advisory_locks: bool = True,
        synchronous_outcomes: bool = True,
    ) -> None:
        self.tables = tables
        #: Whether the deciding read of an atomic claim takes an advisory lock on PostgreSQL (see ``find_and_lock``).
        self.advisory_locks = advisory_locks
        #: ``False``: a leased outcome (``settle(..., leased=True)``) commits asynchronously on PostgreSQL.
        self.synchronous_outcomes = synchronous_outcomes
        self.records = r = tables.records
        self.events = e = tables.events
        self.offset = offset
        bind = sa.bindparam
        now = _now()
        #: The record's columns plus the predicates of ``machine`` evaluated with the database's clock.
        self.seen_columns = (
            *r.c,
            machine.stuck(r, now).label("is_stuck"),
            machine.expired(r, now).label("is_expired"),
            machine.undecided(r).label("is_undecided"),
            now.label("db_now"),
        )
        # The deciding read: the record by its key (no row: nobody holds it). Measured on PostgreSQL, about 50 us
        # of server CPU less per read than joining a one-row table to it.
        on_key = sa.and_(r.c.scope == bind("_scope"), r.c.key == bind("_key"))
        self._find = sa.select(*self.seen_columns).where(on_key)
        # With the advisory lock: one row whether or not the record exists (its columns are NULL when it does
        # not), so the lock is tried, and its answer returned, either way.
        one = sa.select(sa.literal(1).label("one")).subquery()
        self._find_and_lock = sa.select(
            sa.func.pg_try_advisory_xact_lock(bind("_lock", type_=sa.BigInteger)).label("_locked"),
            *self.seen_columns,
        ).select_from(one.outerjoin(r, on_key))
        # MySQL and MariaDB run the app's transactions at REPEATABLE READ: a plain read repeats the snapshot of
        # the transaction's first read, so a re-read after a lost race must be a locking read to see the winner.
        self._find_current = self._find.with_for_update(read=True)
        self._get = sa.select(*self.seen_columns).where(r.c.id == bind("_id"))

        claim_times = {"updated_at": now, "locked_until": _now("_lease_s"), "expires_at": _now("_ttl_s")}
        unique = ["scope", "key"]
        new = {**claim_times, "created_at": now, "version": 1}
        self._insert = {
            "postgresql": postgresql.insert(r)
            .values(**new)
            .on_conflict_do_nothing(index_elements=unique)
            .returning(r.c.id),
            "sqlite": sqlite.insert(r).values(**new).on_conflict_do_nothing(index_elements=unique).returning(r.c.id),
        }
        self._insert_plain = sa.insert(r).values(**new)
        # PostgreSQL: a first request is the common case, so a claim starts with the INSERT and reads the record
        # only when the key is taken (measured, server + client CPU per claim: 1.5 ms for the read and the
        # insert, 0.8 ms for the insert alone; a replay then costs an INSERT that does nothing before its read).
        # In atomic mode the INSERT also takes the key's advisory lock and inserts only if it was granted: an
        # INSERT of a key whose claim another open transaction holds would wait for that whole view.
        claim_values: list[Any] = [
            new[c.name] if c.name in new else bind(c.name, type_=c.type) for c in r.c if c.name != "id"
        ]
        claim_names = [c.name for c in r.c if c.name != "id"]
        lock = sa.func.pg_try_advisory_xact_lock(bind("_lock", type_=sa.BigInteger))
        self._insert_claim = {
            False: self._insert["postgresql"],
            True: postgresql.insert(r)
            .from_select(claim_names, sa.select(*claim_values).where(lock))
            .on_conflict_do_nothing(index_elements=unique)
            .returning(r.c.id),
        }
        next_version = r.c.version + sa.literal_column("1", sa.Integer)
        at_version = (r.c.id == bind("_id"), r.c.version == bind("_version"))
        self._reclaim = {
            restart: sa.update(r)
            .where(*at_version)
            .values(**claim_times, version=next_version, **({"created_at": now} if restart else {}))
            for restart in (False, True)
        }
        owner = (*at_version, r.c.lease_token == bind("_lease_token"), r.c.state == State.IN_PROGRESS.value)
        # Every write that moves updated_at sets expires_at to the same now + ttl (``machine.record_ttl``).
        self._settle = (
            sa.update(r).where(*owner).values(updated_at=now, expires_at=_now("_ttl_s"), version=next_version)
        )
        # PostgreSQL reads synchronous_commit when the transaction commits: set for this transaction only (the
        # statement's own, on the layer's autocommit connection), it spares the outcome the wait for its WAL
        # flush in the same round trip and leaves every other transaction of the connection synchronous.
        self._settle_async = self._settle.where(sa.func.set_config("synchronous_commit", "off", True) == "off")
        self._checkpoint = (
            sa.update(r)
            .where(*owner)
            .values(updated_at=now, locked_until=_now("_lease_s"), expires_at=_now("_ttl_s"), version=next_version)
        )
        self._operator_update = {
            ack: sa.update(r)
            .where(*at_version)
            .values(
                updated_at=now,
                expires_at=_now("_ttl_s"),
                version=next_version,
                **({"acknowledged_at": now} if ack else {}),
            )
            for ack in (False, True)
        }
        self._operator_delete = sa.delete(r).where(*at_version)
        self._withdraw = sa.delete(r).where(r.c.id == bind("_id"), r.c.lease_token == bind("_lease_token"))
        self._restorable = [c.name for c in r.c if c.name not in ("id", "event_count")]
        self._restore = sa.update(r).where(
            r.c.id == bind("_id"), r.c.version == bind("_claim_version"), r.c.lease_token == bind("_lease_token")
        )

        # Parameters named like a record column would become SET clauses of the UPDATE: prefix them all.
        event_values = {
            "record_id": bind("_record_id", type_=e.c.record_id.type),
            "scope": bind("_scope", type_=e.c.scope.type),
            "key": bind("_key", type_=e.c.key.type),
            "kind": bind("_kind", type_=e.c.kind.type),
            "actor": bind("_actor", type_=e.c.actor.type),
            "detail": bind("_detail", type_=e.c.detail.type),
            "created_at": now,
        }
        self._add_event = sa.insert(e).values(**event_values)
        counted = (
            sa.update(r)
            .where(r.c.id == bind("_id"))
            .values(event_count=r.c.event_count + sa.literal_column("1", sa.Integer))
            .returning(r.c.event_count)
            .cte("counted")
        )
        self._add_client_event = sa.insert(e).from_select(
            list(event_values),
            sa.select(*event_values.values()).where(
                sa.exists(sa.select(counted.c.event_count).where(counted.c.event_count <= bind("_cap")))
            ),
        )
        # Counting a client's event is not a change of the record: it leaves ``version`` alone, so a flood of
        # conflicting requests can never make an operator's action fail as "changed since you looked".
        self._count_client_event = (
            sa.update(r).where(r.c.id == bind("_id")).values(event_count=r.c.event_count + 1).returning(r.c.event_count)
        )
        # MySQL and MariaDB have no UPDATE ... RETURNING: LAST_INSERT_ID(expr) hands the new count back to this
        # connection, atomically with the increment.
        self._count_client_event_mysql = (
            sa.update(r).where(r.c.id == bind("_id")).values(event_count=sa.func.last_insert_id(r.c.event_count + 1))
        )

    def clock_params(self) -> dict[str, float]:
        """The parameters a statement using :func:`now_at` binds (the store's clock offset)."""
        return self._times()

    def _times(self, lease: float = 0.0, ttl: float = 0.0) -> dict[str, float]:
        offset = float(self.offset())
        return {"_now_s": offset, "_lease_s": offset + lease, "_ttl_s": offset + ttl}

    # Reads ------------------------------------------------------------------------------------------------

    def find(self, conn: sa.Connection, scope: str, key: str, *, current: bool = False) -> Row[Any] | None:
        """The record of ``(scope, key)`` with the predicates ``is_stuck``, ``is_expired``, ``is_undecided`` and
        ``db_now``, or ``None``.

        ``current``: the row as last committed even inside a transaction that has read before (an atomic
        claim's re-read after losing a race). PostgreSQL (READ COMMITTED), SQLite and autocommit statements
        always read that; on MySQL and MariaDB (REPEATABLE READ) it is a locking read (``LOCK IN SHARE MODE``),
        held until the transaction ends.
        """
        stmt = self._find_current if current and dialect_of(conn) in MYSQL_DIALECTS else self._find
        return conn.execute(stmt, {"_scope": scope, "_key": key, **self._times()}).first()

    def get(self, conn: sa.Connection, record_id: int) -> Row[Any] | None:
        """The record ``record_id`` with the predicates and ``db_now`` (as :meth:`find`), or ``None``."""
        return conn.execute(self._get, {"_id": record_id, **self._times()}).first()

    def now(self, conn: sa.Connection) -> datetime:
        """The database's clock (plus the offset)."""
        value: datetime = conn.execute(sa.select(_now()), self._times()).scalar_one()
        return value

    # Claims -----------------------------------------------------------------------------------------------

    def find_and_lock(self, conn: sa.Connection, scope: str, key: str) -> tuple[bool, Row[Any] | None]:
        """Read the record and, on PostgreSQL, try a transaction-scoped advisory lock on ``(scope, key)``.

        One statement. ``locked`` is ``False`` when another transaction holds the key (an atomic request in
        flight); the row is still returned as last committed, so a replay never waits for a lock. Other
        databases serialize writers themselves (SQLite's write lock), so they always "lock"; so does PostgreSQL
        with ``advisory_locks`` off. The lock only spares a duplicate the wait on the owner's uncommitted row:
        without it (or with a lock that always grants) the duplicate's INSERT waits for the owner's commit, then
        finds the key taken. Correctness rests on the unique constraint, never on the lock.
        """
        if not self.advisory_locks or dialect_of(conn) != "postgresql":
            return True, self.find(conn, scope, key)
        params = {"_lock": advisory_key(scope, key), "_scope": scope, "_key": key, **self._times()}
        row = conn.execute(self._find_and_lock, params).one()
        return bool(row._locked), (None if row.id is None else row)

    def insert_claim(self, conn: sa.Connection, claim: Claim, *, lease: float, ttl: float, lock: bool) -> int | None:
        """PostgreSQL: insert the claim of a new key in one statement; its id, or ``None`` if the key is taken
        (or, with ``lock``, its advisory lock is held elsewhere): read it then (:meth:`find`/:meth:`find_and_lock`).
        ``lock`` is ignored with ``advisory_locks`` off: the INSERT then waits for an open claim's transaction.
        """
        params = {**claim.values, **self._times(lease, ttl)}
        lock = lock and self.advisory_locks
        if lock:
            params["_lock"] = advisory_key(claim.values["scope"], claim.values["key"])
        row = conn.execute(self._insert_claim[lock], params).first()
        return None if row is None else int(row[0])

    def insert(self, conn: sa.Connection, claim: Claim, *, lease: float, ttl: float) -> int | None:
        """Insert the record ``claim`` creates; return its id, or ``None`` if ``(scope, key)`` is already taken."""
        params = {**claim.values, **self._times(lease, ttl)}
        stmt = self._insert.get(dialect_of(conn))
        if stmt is None:
            # MySQL and MariaDB: no ON CONFLICT (INSERT IGNORE would also turn bad data into warnings), so the
            # unique constraint refuses the duplicate; InnoDB undoes only that statement, not the transaction.
            try:
                result = conn.execute(self._insert_plain, params)
            except sa.exc.IntegrityError as exc:
                if getattr(exc.orig, "args", (None,))[0] != MYSQL_DUPLICATE_KEY:
                    raise
                return None
            inserted = result.inserted_primary_key
            assert inserted is not None
            return int(inserted[0])
        row = conn.execute(stmt, params).first()
        return None if row is None else int(row[0])

    def reclaim(
        self, conn: sa.Connection, record_id: int, version: int, claim: Claim, *, lease: float, ttl: float
    ) -> bool:
        """Take the record ``record_id`` with ``claim`` if it is still at ``version`` (nobody changed it since)."""
        params = {**claim.values, "_id": record_id, "_version": version, **self._times(lease, ttl)}
        return bool(conn.execute(self._reclaim[claim.restart], params).rowcount == 1)

    def withdraw(self, conn: sa.Connection, record_id: int, lease_token: str) -> bool:
        """Delete a fresh claim that never ran its view (only while ``lease_token`` still owns it)."""
        return bool(conn.execute(self._withdraw, {"_id": record_id, "_lease_token": lease_token}).rowcount == 1)

    def restore(
        self, conn: sa.Connection, record_id: int, version: int, lease_token: str, previous: Mapping[str, Any]
    ) -> bool:
        """Put back the record a claim took (``previous``, as read) when that claim's view never ran.

        Compare and set on the claim's version and lease token. The record becomes exactly what it was, its
        version included, as if the claim never happened: an owner it had taken over (still running) can then
        store its outcome, and an operator who looked at it before can still act on it.
        """
        values = {name: previous[name] for name in self._restorable}
        params = {**values, "_id": record_id, "_claim_version": version, "_lease_token": lease_token}
        return bool(conn.execute(self._restore, params).rowcount == 1)

    # Fenced writes of the lease owner ----------------------------------------------------------------------

    def settle(
        self,
        conn: sa.Connection,
        record_id: int,
        version: int,
        lease_token: str,
        values: Mapping[str, Any],
        *,
        ttl: float,
        leased: bool = False,
    ) -> bool:
        """Write the outcome, which expires ``ttl`` seconds from now (the database's); ``False`` if the lease
        was lost (taken over, released or marked by an operator).

        ``leased``: the outcome commits on its own (never with the view's writes), so with
        ``synchronous_outcomes`` off it may commit asynchronously on PostgreSQL.
        """
        params = {**values, "_id": record_id, "_version": version, "_lease_token": lease_token}
        params.update(self._times(ttl=ttl))
        asynchronous = leased and not self.synchronous_outcomes and dialect_of(conn) == "postgresql"
        return bool(conn.execute(self._settle_async if asynchronous else self._settle, params).rowcount == 1)

    def checkpoint(
        self,
        conn: sa.Connection,
        record_id: int,
        version: int,
        lease_token: str,
        values: Mapping[str, Any],
        lease: float,
        *,
        ttl: float,
    ) -> bool:
        """Write a recovery point and extend the lease by ``lease`` seconds (and ``expires_at`` to now + ``ttl``,
        which keeps the record's ttl readable); ``False`` if the lease was lost."""
        params = {**values, "_id": record_id, "_version": version, "_lease_token": lease_token}
        return bool(conn.execute(self._checkpoint, {**params, **self._times(lease, ttl)}).rowcount == 1)

    # Operator transitions ---------------------------------------------------------------------------------

    def update_at_version(
        self,
        conn: sa.Connection,
        record_id: int,
        version: int,
        values: Mapping[str, Any],
        *,
        ttl: float,
        acknowledge: bool = False,
    ) -> bool:
        """Operator update, after which the record expires ``ttl`` seconds from now (``machine.record_ttl``);
        ``False`` if the record is no longer at ``version``."""
        params = {**values, "_id": record_id, "_version": version, **self._times(ttl=ttl)}
        return bool(conn.execute(self._operator_update[acknowledge], params).rowcount == 1)

    def delete_at_version(self, conn: sa.Connection, record_id: int, version: int) -> bool:
        return bool(conn.execute(self._operator_delete, {"_id": record_id, "_version": version}).rowcount == 1)

    # Events -----------------------------------------------------------------------------------------------

    def add_event(
        self,
        conn: sa.Connection,
        *,
        record_id: int | None,
        scope: str,
        key: str,
        kind: EventKind,
        actor: str | None = None,
        detail: Mapping[str, Any] | None = None,
    ) -> None:
        conn.execute(
            self._add_event,
            {
                "_record_id": record_id,
                "_scope": scope,
                "_key": key,
                "_kind": kind.value,
                "_actor": actor,
                "_detail": dict(detail) if detail else None,
                **self._times(),
            },
        )

    def add_replays(self, conn: sa.Connection, count: int, age: float) -> None:
        """Store a process's count of ``count`` replays, dated ``age`` seconds ago by the database's clock."""
        times = self._times()
        times["_now_s"] -= age
        params = {
            "_record_id": None,
            "_scope": "",
            "_key": "",
            "_kind": EventKind.REPLAYS.value,
            "_actor": None,
            "_detail": {"count": count},
            **times,
        }
        conn.execute(self._add_event, params)

    def replays_since(
        self, conn: sa.Connection, since: datetime, limit: int
    ) -> tuple[list[tuple[datetime, int]], bool]:
        """The replay counts written since ``since`` (newest first, at most ``limit``; ``True`` if capped)."""
        e = self.events
        query = (
            sa.select(e.c.created_at, e.c.detail)
            .where(e.c.kind == EventKind.REPLAYS.value, e.c.created_at >= since)
            .order_by(e.c.created_at.desc())
            .limit(limit + 1)
        )
        rows = conn.execute(query).all()
        counts = [(row.created_at, int((row.detail or {}).get("count", 0))) for row in rows[:limit]]
        return counts, len(rows) > limit

    def purge_replays(self, conn: sa.Connection, older_than: float) -> int:
        """Delete replay counts older than ``older_than`` seconds (the chart shows the last 24 hours)."""
        e = self.events
        where = sa.and_(e.c.kind == EventKind.REPLAYS.value, e.c.created_at < _now())
        times = self._times()
        times["_now_s"] -= older_than
        return int(conn.execute(sa.delete(e).where(where), times).rowcount)

    def add_client_event(
        self, conn: sa.Connection, *, record: Row[Any], kind: EventKind, detail: Mapping[str, Any], cap: int
    ) -> None:
        """Count an event a client caused on ``record`` and store it while the record's count is within ``cap``.

        The count is ``event_count``, the only column this touches. One statement on PostgreSQL (the
        counting UPDATE in a CTE feeds the INSERT); elsewhere two.
        """
        if dialect_of(conn) != "postgresql":
            if self.count_client_event(conn, record.id) <= cap:
                self.add_event(conn, record_id=record.id, scope=record.scope, key=record.key, kind=kind, detail=detail)
            return
        params = {
            "_id": record.id,
            "_cap": cap,
            "_record_id": record.id,
            "_scope": record.scope,
            "_key": record.key,
            "_kind": kind.value,
            "_actor": None,
            "_detail": dict(detail),
            **self._times(),
        }
        conn.execute(self._add_client_event, params)

    def count_client_event(self, conn: sa.Connection, record_id: int) -> int:
        """Count an event a client caused on ``record_id``; return the new count (0 if the record is gone)."""
        if dialect_of(conn) in MYSQL_DIALECTS:
            result = conn.execute(self._count_client_event_mysql, {"_id": record_id})
            return int(result.lastrowid) if result.rowcount == 1 else 0
        row = conn.execute(self._count_client_event, {"_id": record_id}).first()
        return 0 if row is None else int(row[0])

    def events_of(self, conn: sa.Connection, record_id: int, limit: int = 200) -> Sequence[Row[Any]]:
        e = self.events
        return conn.execute(sa.select(e).where(e.c.record_id == record_id).order_by(e.c.id.desc()).limit(limit)).all()

    def purge_batch(self, conn: sa.Connection, batch_size: int) -> int:
        """Delete up to ``batch_size`` expired records (``machine.expired``: never one awaiting a decision); return
        how many.

        On PostgreSQL rows locked by a running request are skipped (``FOR UPDATE SKIP LOCKED``). MySQL and
        MariaDB refuse a subquery with LIMIT on the table being deleted from: the ids go through a derived table,
        and the DELETE checks expiry again on the row it locks, so a record that a request replaced meanwhile
        (an atomic claim in flight when the ids were read) stays.
        """
        r = self.records
        expired = machine.expired(r, _now())
        victims = sa.select(r.c.id).where(expired).order_by(r.c.expires_at).limit(batch_size)
        delete = sa.delete(r)
        dialect = dialect_of(conn)
        if dialect == "postgresql":
            victims = victims.with_for_update(skip_locked=True)
        elif dialect in MYSQL_DIALECTS:
            derived = victims.subquery("victims")
            victims = sa.select(derived.c.id)
            delete = delete.where(expired)
        deleted = conn.execute(delete.where(r.c.id.in_(victims.scalar_subquery())), self._times()).rowcount
        return int(deleted)

    # Schema -----------------------------------------------------------------------------------------------

    def missing_columns(self, conn: sa.Connection) -> set[str] | None:
        """Columns of the model that the records table lacks; ``None`` when the table does not exist."""
        inspector = sa.inspect(conn)
        if not inspector.has_table(self.records.name):
            return None
        present = {column["name"] for column in inspector.get_columns(self.records.name)}
        return {column.name for column in self.records.c} - present
