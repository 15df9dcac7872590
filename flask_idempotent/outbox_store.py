"""Every SQL statement of the outbox table (docs: "The outbox"), as :mod:`.store` holds the records'.

The rules are the records': every change is a compare-and-set on ``(id, version)``, a delivery's writes are
also fenced by its lease token, and every time that decides something (a job's lease, its backoff,
``countdown``) is the database's clock read in the deciding statement (:class:`~.store.db_time`, plus the
test-controlled ``offset``).

Taking jobs. A drainer reads the ids of due jobs with ``FOR UPDATE SKIP LOCKED`` on PostgreSQL and MariaDB
(jobs another drainer's take holds are skipped, never waited for), then leases them with one UPDATE that checks
again that each is still PENDING and unleased, and reads back the jobs its token holds. On SQLite (one writer)
the re-check in the UPDATE is what keeps two drainers from taking one job.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Row

from .store import MYSQL_DIALECTS, db_time, dialect_of


class JobState(str, enum.Enum):
    """The state of an outbox job. Stored as its name."""

    PENDING = "PENDING"
    DELIVERED = "DELIVERED"
    DEAD = "DEAD"


#: Seconds a job waits after its n-th failed delivery: 2**n, at most an hour.
BACKOFF_CAP = 3600.0


def backoff_seconds(failures: int) -> float:
    """The wait before the next delivery of a job that has failed ``failures`` times (1 → 2 s, 2 → 4 s...)."""
    return min(2.0 ** min(failures, 32), BACKOFF_CAP)


def _at(name: str) -> db_time:
    return db_time(sa.bindparam(name, type_=sa.Float))


class OutboxStore:
    """SQL for ``idempotency_outbox``. ``offset()`` is added to the database's clock (tests move it)."""

    def __init__(self, table: sa.Table, offset: Callable[[], float]) -> None:
        self.table = o = table
        self.offset = offset
        now = _at("_now_s")
        self.now = now
        self.lease_live = sa.and_(o.c.locked_until.is_not(None), o.c.locked_until > now)
        earlier = o.alias("earlier")
        # An ordered job waits while an earlier ordered job of its scope is PENDING (leased or not).
        self.waits_for_earlier = sa.and_(
            o.c.ordered,
            sa.exists().where(
                earlier.c.scope == o.c.scope,
                earlier.c.ordered,
                earlier.c.state == JobState.PENDING.value,
                earlier.c.id < o.c.id,
            ),
        )
        self.due = sa.and_(
            o.c.state == JobState.PENDING.value,
            o.c.available_at <= now,
            sa.not_(self.lease_live),
        )
        self.columns = (*o.c, now.label("db_now"), self.lease_live.label("is_leased"))

    def times(self, **seconds: float) -> dict[str, float]:
        """The bound parameters of the database-clock times: ``_now_s`` and each ``_<name>_s`` given."""
        offset = float(self.offset())
        return {"_now_s": offset, **{f"_{name}_s": offset + value for name, value in seconds.items()}}

    # Staging --------------------------------------------------------------------------------------------

    def insert(
        self,
        conn: sa.orm.Session | sa.orm.scoped_session[Any],
        values: dict[str, Any],
        *,
        delay: float,
        eta: Any,
        lease: tuple[str, float] | None,
    ) -> None:
        """Stage one job through ``conn`` (the caller's ``db.session``: it commits with its transaction);
        ``lease``: ``(token, seconds)`` it is leased to from the start (the staging process's hand-off)."""
        now = self.now
        leased = {} if lease is None else {"lease_token": lease[0], "locked_until": _at("_lease_s")}
        statement = sa.insert(self.table).values(
            **values,
            **leased,
            state=JobState.PENDING.value,
            attempts=0,
            version=1,
            available_at=_at("_delay_s") if eta is None else sa.bindparam("_eta", eta, type_=sa.DateTime()),
            created_at=now,
            updated_at=now,
        )
        conn.execute(statement, self.times(delay=delay, lease=0.0 if lease is None else lease[1]))

    # Taking and settling ----------------------------------------------------------------------------------

    def take(
        self, conn: sa.Connection, token: str, lease: float, *, limit: int, keys: Sequence[str] = ()
    ) -> list[Row[Any]]:
        """Lease up to ``limit`` due jobs (or the due jobs among ``keys``) to ``token``; return them, in id order.

        ``conn`` is in a transaction the caller commits: on PostgreSQL and MariaDB the ids are read with
        ``FOR UPDATE SKIP LOCKED``, so a concurrent take never waits for these rows nor gets them.
        """
        o = self.table
        params = self.times(lease=lease)
        ids = sa.select(o.c.id).where(self.due, sa.not_(self.waits_for_earlier))
        if keys:
            ids = ids.where(o.c.key.in_(list(keys)))
        ids = ids.order_by(o.c.id).limit(limit)
        if dialect_of(conn) != "sqlite":
            ids = ids.with_for_update(skip_locked=True)
        chosen = list(conn.execute(ids, params).scalars())
        if not chosen:
            return []
        conn.execute(
            sa.update(o)
            .where(o.c.id.in_(chosen), self.due)
            .values(
                lease_token=token,
                locked_until=_at("_lease_s"),
                version=o.c.version + 1,
                updated_at=self.now,
            ),
            params,
        )
        return self.leased_to(conn, token)

    def leased_to(self, conn: sa.Connection, token: str) -> list[Row[Any]]:
        """The jobs ``token`` holds, in id order."""
        o = self.table
        return list(
            conn.execute(sa.select(*self.columns).where(o.c.lease_token == token).order_by(o.c.id), self.times())
        )

    def delivered(self, conn: sa.Connection, key: str, token: str, ttl: float) -> bool:
        """The lease holder's delivery of the job ``key`` returned: DELIVERED, purged after ``ttl``. False: it
        lost the lease (fenced by the lease token; keys are unique)."""
        o = self.table
        statement = (
            sa.update(o)
            .where(o.c.key == key, o.c.lease_token == token)
            .values(
                state=JobState.DELIVERED.value,
                attempts=o.c.attempts + 1,
                lease_token=None,
                locked_until=None,
                delivered_at=self.now,
                expires_at=_at("_ttl_s"),
                updated_at=self.now,
                version=o.c.version + 1,
            )
        )
        return bool(conn.execute(statement, self.times(ttl=ttl)).rowcount == 1)

    def failed(self, conn: sa.Connection, key: str, token: str, error: str, *, max_attempts: int) -> bool:
        """The lease holder's delivery failed: attempts + 1 and backoff, or DEAD after ``max_attempts``."""
        o = self.table
        row = conn.execute(
            sa.select(o.c.attempts).where(o.c.key == key, o.c.lease_token == token), self.times()
        ).first()
        if row is None:
            return False
        failures = int(row.attempts) + 1
        state = JobState.DEAD if failures >= max_attempts else JobState.PENDING
        statement = (
            sa.update(o)
            .where(o.c.key == key, o.c.lease_token == token)
            .values(
                state=state.value,
                attempts=failures,
                last_error=error,
                lease_token=None,
                locked_until=None,
                available_at=_at("_backoff_s"),
                updated_at=self.now,
                version=o.c.version + 1,
            )
        )
        return bool(conn.execute(statement, self.times(backoff=backoff_seconds(failures))).rowcount == 1)

    # Operators ----------------------------------------------------------------------------------------------

    def get(self, conn: sa.Connection, job_id: int) -> Row[Any] | None:
        row: Row[Any] | None = conn.execute(
            sa.select(*self.columns).where(self.table.c.id == job_id), self.times()
        ).first()
        return row

    def listing(self, conn: sa.Connection, state: JobState, limit: int) -> list[Row[Any]]:
        """Jobs in ``state``, oldest first."""
        o = self.table
        statement = sa.select(*self.columns).where(o.c.state == state.value).order_by(o.c.id).limit(limit)
        return list(conn.execute(statement, self.times()))

    def counts(self, conn: sa.Connection) -> Row[Any]:
        """``pending``, ``dead`` and ``oldest`` (the created_at of the oldest PENDING job) with ``db_now``."""
        o = self.table
        pending = o.c.state == JobState.PENDING.value
        statement = sa.select(
            sa.func.coalesce(sa.func.sum(sa.case((pending, 1), else_=0)), 0).label("pending"),
            sa.func.coalesce(sa.func.sum(sa.case((o.c.state == JobState.DEAD.value, 1), else_=0)), 0).label("dead"),
            sa.func.min(sa.case((pending, o.c.created_at))).label("oldest"),  # MariaDB has no FILTER
            self.now.label("db_now"),
        ).where(o.c.state != JobState.DELIVERED.value)
        row: Row[Any] = conn.execute(statement, self.times()).one()
        return row

    def redeliver(self, conn: sa.Connection, job_id: int, version: int) -> bool:
        """PENDING, due now, attempts from 0 again; a compare-and-set on ``(id, version)``."""
        o = self.table
        statement = (
            sa.update(o)
            .where(o.c.id == job_id, o.c.version == version, sa.not_(self.lease_live))
            .values(
                state=JobState.PENDING.value,
                attempts=0,
                available_at=self.now,
                lease_token=None,
                locked_until=None,
                delivered_at=None,
                expires_at=None,
                updated_at=self.now,
                version=o.c.version + 1,
            )
        )
        return bool(conn.execute(statement, self.times()).rowcount == 1)

    def discard(self, conn: sa.Connection, job_id: int, version: int) -> bool:
        o = self.table
        statement = sa.delete(o).where(o.c.id == job_id, o.c.version == version, sa.not_(self.lease_live))
        return bool(conn.execute(statement, self.times()).rowcount == 1)

    def purge_batch(self, conn: sa.Connection, batch_size: int) -> int:
        """Delete up to ``batch_size`` DELIVERED jobs past their ``expires_at``; return how many."""
        o = self.table
        expired = sa.and_(o.c.state == JobState.DELIVERED.value, o.c.expires_at <= self.now)
        victims = sa.select(o.c.id).where(expired).order_by(o.c.expires_at).limit(batch_size)
        if dialect_of(conn) in MYSQL_DIALECTS:  # no LIMIT in a subquery of the table deleted from
            victims = sa.select(victims.subquery("victims").c.id)
        statement = sa.delete(o).where(expired, o.c.id.in_(victims.scalar_subquery()))
        return int(conn.execute(statement, self.times()).rowcount)
