"""Database errors, in one place: what kind an error is, what the log may say of it, and how work that is safe
to repeat is run again.

Three kinds matter to the layer: a transaction the database aborted because it lost a race with a concurrent
one (:func:`lost_race`: nothing was written, running it again is safe); SQLite's busy timeout running out
(:func:`is_lock_wait`: another connection holds the write lock); and a database that cannot be used at all
(:func:`unreachable`). The request path, the operations API, the CLI and the dashboard all ask here.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from typing import Any, TypeVar

import sqlalchemy as sa

#: SQLSTATEs of a transaction the database aborted because it lost a race with a concurrent one: serialization
#: failure (PostgreSQL under SERIALIZABLE or REPEATABLE READ; CockroachDB and YugabyteDB send it for any
#: conflict) and deadlock. Nothing of that transaction was committed.
LOST_RACE_SQLSTATES = frozenset({"40001", "40P01"})
#: MySQL and MariaDB error numbers of the same: 1213, a deadlock, which is also how a MariaDB Galera node fails
#: the COMMIT of a transaction that lost certification to another node's.
LOST_RACE_MYSQL_ERRNOS = frozenset({1213})
#: Runs of a statement (or transaction) that lost such a race before the caller gives up and answers as a
#: duplicate would. Each loser retries after a random pause of up to ``LOST_RACE_PAUSE * 2**attempt`` seconds.
LOST_RACE_ATTEMPTS = 5
LOST_RACE_PAUSE = 0.005
#: The first and the longest pause while waiting out SQLite's write lock (doubling in between).
LOCK_WAIT_PAUSE = 0.05
LOCK_WAIT_PAUSE_MAX = 1.0

#: What the database (or the pool in front of it) raises: the errors the request path answers with 503.
STORE_ERRORS: tuple[type[Exception], ...] = (sa.exc.DBAPIError, sa.exc.TimeoutError)
#: Of those, the ones that say the database cannot be reached (refused, gone, or no connection free in time).
UNREACHABLE_ERRORS: tuple[type[Exception], ...] = (sa.exc.OperationalError, sa.exc.InterfaceError, sa.exc.TimeoutError)

T = TypeVar("T")


def lost_race(exc: BaseException) -> bool:
    """Whether ``exc`` is the database aborting a transaction that lost a race at commit or in a statement.

    PostgreSQL's SQLSTATE (psycopg 3 ``sqlstate``, psycopg2 ``pgcode``) in :data:`LOST_RACE_SQLSTATES`, or a
    MySQL/MariaDB error number (the DB-API exception's first argument, as PyMySQL and mysqlclient raise it) in
    :data:`LOST_RACE_MYSQL_ERRNOS`. Nothing of the aborted transaction was written: running it again is safe
    whenever it holds only the layer's statements.
    """
    if not isinstance(exc, sa.exc.DBAPIError) or exc.orig is None:
        return False
    orig = exc.orig
    sqlstate = getattr(orig, "sqlstate", None) or getattr(orig, "pgcode", None)
    if sqlstate is not None:
        return sqlstate in LOST_RACE_SQLSTATES
    args: tuple[Any, ...] = getattr(orig, "args", ())
    return bool(args) and isinstance(args[0], int) and args[0] in LOST_RACE_MYSQL_ERRNOS


def is_lock_wait(exc: BaseException) -> bool:
    """SQLite's busy timeout ran out: another connection holds the write lock (an atomic owner)."""
    return "database is locked" in str(getattr(exc, "orig", ""))


def unreachable(exc: BaseException) -> bool:
    """The database cannot be reached: the connection was refused or lost, or the pool had none free in time."""
    return isinstance(exc, UNREACHABLE_ERRORS)


def message(exc: BaseException, *, named: bool = False) -> str:
    """The driver's own words, first line only, for a log or an operator: without SQLAlchemy's ``[SQL: ...]
    [parameters: ...]`` (parameters carry request bodies) or its "Background on this error" link.

    ``named``: prefixed with the driver exception's type and cut to 500 characters (the request path's logs).
    """
    orig = getattr(exc, "orig", None)
    source = orig if orig is not None else exc
    text = str(source).strip()
    first = text.splitlines()[0] if text else ""
    if named:
        return f"{type(source).__name__}: {first}"[:500]
    return first or type(exc).__name__


def pause_after_lost_race(attempt: int) -> None:
    """A random pause before the ``attempt``-th rerun (from 0), so that two losers do not collide again."""
    time.sleep(random.uniform(0, LOST_RACE_PAUSE * 2**attempt))


def retry_lost_race(
    run: Callable[[], T],
    attempts: int = LOST_RACE_ATTEMPTS,
    *,
    lock_wait_until: float | None = None,
    on_lock_wait: Callable[[], None] | None = None,
) -> T:
    """``run()``, run again (up to ``attempts`` runs in all) while it raises an error :func:`lost_race` names.

    With ``lock_wait_until`` (a ``time.monotonic()`` deadline), SQLite's lock waits (:func:`is_lock_wait`) are
    waited out too, until then (``on_lock_wait`` is called before each pause). Only for work that is safe to
    repeat: each run must be a whole transaction of the layer's own statements. The last error is raised as it is.
    """
    races = 0
    delay = LOCK_WAIT_PAUSE
    while True:
        try:
            return run()
        except sa.exc.DBAPIError as exc:
            if lost_race(exc) and races + 1 < attempts:
                pause_after_lost_race(races)
                races += 1
                continue
            if lock_wait_until is None or not is_lock_wait(exc) or time.monotonic() + delay > lock_wait_until:
                raise
            if on_lock_wait is not None:
                on_lock_wait()
            time.sleep(delay)
            delay = min(delay * 2, LOCK_WAIT_PAUSE_MAX)
