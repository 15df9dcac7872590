"""The outbox: effects handed on after the commit (docs: "The outbox").

``idempotency.stage(target, *args, **kwargs)`` writes one ``idempotency_outbox`` row through ``db.session``, so
the job commits with the transaction it is in and a rollback stages nothing. Right after the commit the staging
process hands its own jobs on (:meth:`Outbox.hand_off`, at most ``IDEMPOTENCY_OUTBOX_HANDOFF_SECONDS``); a
drainer (:meth:`Outbox.drain`, ``flask idempotency drain``) delivers every job whose hand-off was not confirmed.

Delivery is at least once, and every job carries its key (``outbox:<uuid>``) into its delivery: a Celery task
gets it as its task id (:func:`outbox_key` reads it back, for ``idempotency.task(key=outbox_key)``), a handler
runs under ``idempotency.once(scope, key)``. So a job delivered twice runs its effect once.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import math
import select
import sys
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, TypeVar

import sqlalchemy as sa
from flask import Flask, current_app, has_app_context
from sqlalchemy.engine import Row

from .constants import ConfigKey, EventKind
from .context import get_current
from .errors import SchemaVersionError
from .models import storable_text
from .operations import RecordChanged, RecordNotFound, TransitionError
from .outbox_store import JobState, OutboxStore
from .state import AppState, app_state
from .tasks import command_of, run_once

logger = logging.getLogger("flask_idempotent")

Handler = TypeVar("Handler", bound=Callable[..., Any])

#: ``db.session.info`` key: the jobs this session's transaction staged, handed off after its commit.
_STAGED = "flask_idempotent.outbox.staged"
#: The key of the job a handler is being delivered for (read by :func:`outbox_key`).
_JOB_KEY: contextvars.ContextVar[str | None] = contextvars.ContextVar("flask_idempotent_outbox_key", default=None)
#: Characters of a delivery's error kept in ``last_error``.
ERROR_MAX = 2000
KINDS = ("celery", "handler")
#: PostgreSQL: the channel a commit that staged a job for the drainer NOTIFYs, and a following drainer LISTENs on.
CHANNEL = "idempotency_outbox"


def outbox_key(*_args: Any, **_kwargs: Any) -> str:
    """The key of the job being delivered: for ``idempotency.task(key=outbox_key)`` and inside a handler.

    Under Celery it is the running task's id, which the outbox sets to the job's key (``apply_async(...,
    task_id=key)``): a redelivered job has the same id, so the task's record replays instead of running again.
    A task called some other way (``.delay()``) gets Celery's own fresh id: each call is its own command.
    Outside a delivery and a Celery task it raises ``RuntimeError``.
    """
    key = _JOB_KEY.get()
    if key is not None:
        return key
    celery = sys.modules.get("celery")
    task = None if celery is None else celery.current_task
    task_id = getattr(getattr(task, "request", None), "id", None) if task else None
    if not isinstance(task_id, str):
        raise RuntimeError("outbox_key() is for a job's delivery: no outbox handler or Celery task is running")
    return task_id


def _json_argument(where: str, value: Any) -> None:
    def refuse(obj: Any) -> Any:
        raise TypeError(f"{where} holds a {type(obj).__name__}, which is not JSON-serialisable: staged jobs are JSON")

    try:
        json.dumps(value, default=refuse, allow_nan=False)
    except ValueError:
        raise TypeError(f"{where} holds NaN or an infinity, which JSON cannot store") from None


@dataclass
class _Staged:
    """The jobs one transaction staged for one app: those leased to its hand-off at staging (``token``) and the
    others (ordered or delayed), which the hand-off takes like a drainer."""

    state: AppState
    app: Flask
    token: str = field(default_factory=lambda: uuid.uuid4().hex)
    leased: int = 0
    keys: list[str] = field(default_factory=list)


class Outbox:
    """The outbox of one :class:`~flask_idempotent.Idempotency` (its handlers and Celery tasks by name)."""

    def __init__(self) -> None:
        self.handlers: dict[str, Callable[..., Any]] = {}
        self.tasks: dict[str, Any] = {}
        self._stores: weakref.WeakKeyDictionary[AppState, OutboxStore] = weakref.WeakKeyDictionary()
        self._sessions: weakref.WeakSet[Any] = weakref.WeakSet()
        self._tables_seen: weakref.WeakSet[AppState] = weakref.WeakSet()

    def store(self, state: AppState) -> OutboxStore:
        store = self._stores.get(state)
        if store is None:
            store = self._stores[state] = OutboxStore(state.tables.outbox, state.store.offset)
        return store

    def check_table(self, state: AppState) -> None:
        """Once per process: a database without the outbox table is a :class:`SchemaVersionError` naming the fix,
        at the first ``stage()``, instead of a failed INSERT in the middle of the caller's transaction."""
        if state in self._tables_seen:
            return
        with state.engine.connect() as conn:
            present = sa.inspect(conn).has_table(state.tables.outbox.name)
        if not present:
            raise SchemaVersionError(
                f"there is no {state.tables.outbox.name} table: create it with `flask idempotency upgrade-schema`,"
                " or a migration that calls flask_idempotent.migrations.create_outbox(op) (docs: The outbox)"
            )
        self._tables_seen.add(state)

    @staticmethod
    def check_config(config: Mapping[str, Any]) -> None:
        """Refuse, at ``init_app``, outbox settings that would only fail at the first commit or drain."""
        attempts = config[ConfigKey.OUTBOX_MAX_ATTEMPTS]
        if isinstance(attempts, bool) or not isinstance(attempts, int) or attempts < 1:
            raise ValueError(f"{ConfigKey.OUTBOX_MAX_ATTEMPTS} must be an int of at least 1, not {attempts!r}")
        bound = config[ConfigKey.OUTBOX_HANDOFF_SECONDS]
        if isinstance(bound, bool) or not isinstance(bound, (int, float)) or not 0 <= bound <= 3600:
            raise ValueError(
                f"{ConfigKey.OUTBOX_HANDOFF_SECONDS} must be a number of seconds (0 to 3600), not {bound!r}"
            )

    def install(self, db: Any) -> None:
        """Listen to ``db.session``: hand off after each commit, forget a rolled-back transaction's jobs."""
        if db in self._sessions:
            return
        self._sessions.add(db)
        sa.event.listen(db.session, "after_commit", self._after_commit)
        sa.event.listen(db.session, "after_transaction_end", self._after_transaction_end)

    # Staging ------------------------------------------------------------------------------------------------

    def handler(self, name: str) -> Callable[[Handler], Handler]:
        """Register a handler under ``name`` (see :meth:`Idempotency.handler`)."""
        if not isinstance(name, str) or not name or len(name) > 255:
            raise TypeError("a handler's name is a str of 1 to 255 characters")

        def register(func: Handler) -> Handler:
            if name in self.handlers and self.handlers[name] is not func:
                raise ValueError(f"an outbox handler named {name!r} is already registered")
            self.handlers[name] = func
            func.outbox_name = name  # type: ignore[attr-defined]
            return func

        return register

    def target_of(self, target: Any) -> tuple[str, str]:
        """``(kind, name)`` of a Celery task, a registered handler or a handler's name; else ``TypeError``."""
        if isinstance(target, str):
            if target in self.handlers:
                return "handler", target
            raise TypeError(f"no outbox handler is registered under the name {target!r}")
        name = getattr(target, "outbox_name", None)
        if isinstance(name, str) and self.handlers.get(name) is target:
            return "handler", name
        name = getattr(target, "name", None)
        if isinstance(name, str) and name and callable(getattr(target, "apply_async", None)):
            if len(name) > 255:
                raise TypeError("a Celery task's name must be at most 255 characters to be staged")
            self.tasks[name] = target
            return "celery", name
        raise TypeError(
            f"stage() takes a Celery task, a handler registered with @idempotency.handler or its name,"
            f" not a {type(target).__name__}"
        )

    def stage(
        self,
        target: Any,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        *,
        countdown: float | None = None,
        eta: datetime | None = None,
        ordered: bool = False,
    ) -> str:
        """Write one job through ``db.session``; return its key (see :meth:`Idempotency.stage`)."""
        kind, name = self.target_of(target)
        for position, value in enumerate(args):
            _json_argument(f"argument {position} of the job {name}", value)
        for keyword, value in kwargs.items():
            _json_argument(f"argument {keyword!r} of the job {name}", value)
        if countdown is not None and eta is not None:
            raise TypeError("stage() takes countdown= or eta=, not both")
        delay = 0.0
        if countdown is not None:
            if isinstance(countdown, bool) or not isinstance(countdown, (int, float)) or not math.isfinite(countdown):
                raise TypeError(f"countdown= is a number of seconds, not {countdown!r}")
            delay = max(float(countdown), 0.0)
        when = None
        if eta is not None:
            if not isinstance(eta, datetime):
                raise TypeError(f"eta= is a datetime, not a {type(eta).__name__}")
            # Stored times are naive UTC; a naive eta is taken as UTC.
            when = eta.astimezone(timezone.utc).replace(tzinfo=None) if eta.tzinfo else eta
        if not isinstance(ordered, bool):
            raise TypeError("ordered= is True or False")
        if not has_app_context():
            raise RuntimeError("stage() needs an app context: it writes through the app's db.session")
        state = app_state()
        self.check_table(state)
        ctx = get_current()
        scope = ctx.command.scope if ctx is not None and ctx.claimed else ""
        key = f"outbox:{uuid.uuid4().hex}"
        values = {
            "scope": scope,
            "key": key,
            "target": name,
            "kind": kind,
            "args": list(args),
            "kwargs": dict(kwargs),
            "ordered": ordered,
        }
        session = state.db.session
        staged: list[_Staged] = session.info.setdefault(_STAGED, [])
        if not staged or staged[-1].state is not state:
            staged.append(_Staged(state, current_app._get_current_object()))  # type: ignore[attr-defined]
        batch = staged[-1]
        lease = None
        if (
            float(current_app.config[ConfigKey.OUTBOX_HANDOFF_SECONDS]) > 0
            and not delay
            and when is None
            and not ordered
        ):
            # Leased to this transaction's hand-off from the start: after the commit it delivers without taking
            # the job first (one commit less per request), and a drainer waits for the lease as for any other.
            lease = (batch.token, self._lease(state))
            batch.leased += 1
        else:
            batch.keys.append(key)
        self.store(state).insert(session, values, delay=delay, eta=when, lease=lease)
        if lease is None and not delay and when is None and _engine(state).dialect.name == "postgresql":
            # A job for the drainer now: wake a following drainer when this transaction commits (PostgreSQL
            # delivers a NOTIFY only then, and once per transaction for the same payload).
            session.execute(
                sa.text("SELECT pg_notify(:channel, '')"),
                {"channel": CHANNEL},
                bind_arguments={"bind": _engine(state)},  # the records' database, where drainers listen
            )
        return key

    def _after_commit(self, session: Any) -> None:
        for staged in session.info.pop(_STAGED, ()):
            self.hand_off(staged)

    @staticmethod
    def _after_transaction_end(session: Any, transaction: Any) -> None:
        if transaction.parent is None:  # the outermost transaction ended without a commit: nothing was staged
            session.info.pop(_STAGED, None)

    # Delivery -------------------------------------------------------------------------------------------------

    def hand_off(self, staged: _Staged) -> None:
        """Deliver the jobs just committed, waiting at most ``IDEMPOTENCY_OUTBOX_HANDOFF_SECONDS``.

        The deliveries run in a thread of their own: a broker that hangs holds that thread, never the response.
        A job not confirmed by then stays PENDING under its lease; when the lease ends the drainer delivers it.
        """
        budget = float(staged.app.config[ConfigKey.OUTBOX_HANDOFF_SECONDS])
        if budget <= 0 or not (staged.leased or staged.keys):
            return
        deadline = time.monotonic() + budget
        thread = threading.Thread(
            target=self._hand_off_now,
            args=(staged, deadline),
            name="flask_idempotent-outbox-hand-off",
            daemon=True,
        )
        thread.start()
        thread.join(budget)

    def _hand_off_now(self, staged: _Staged, deadline: float) -> None:
        state = staged.state
        try:
            with staged.app.app_context():
                if staged.leased:
                    # Read back, not remembered: a savepoint rolled back (begin_nested) took its jobs with it.
                    with state.engine.connect() as conn:
                        jobs = self.store(state).leased_to(conn, staged.token)
                    self._deliver_taken(state, (staged.token, jobs), deadline=deadline)
                for key in staged.keys:  # one at a time, in staging order: an ordered job waits for the one before
                    if time.monotonic() >= deadline:
                        return
                    self._deliver_taken(state, self._take(state, limit=1, keys=[key]))
        except Exception as exc:  # the drainer delivers what is left; the response is not the place for it
            logger.warning("outbox hand-off stopped, the drainer delivers the rest: %s", _error_line(exc))

    @staticmethod
    def _lease(state: AppState) -> float:
        return state.defaults.lease or 60.0

    def _take(self, state: AppState, *, limit: int, keys: list[str] | None = None) -> tuple[str, list[Row[Any]]]:
        token = uuid.uuid4().hex
        with _take_connection(state) as conn, conn.begin():
            jobs = self.store(state).take(conn, token, self._lease(state), limit=limit, keys=keys or ())
        return token, jobs

    def _deliver_taken(
        self, state: AppState, taken: tuple[str, Sequence[Any]], *, deadline: float | None = None
    ) -> dict[str, int]:
        token, jobs = taken
        tally = {"delivered": 0, "failed": 0, "dead": 0}
        max_attempts = int(current_app.config[ConfigKey.OUTBOX_MAX_ATTEMPTS])
        ttl = state.defaults.ttl or 86400.0
        store = self.store(state)
        for job in jobs:
            if deadline is not None and time.monotonic() >= deadline:
                break  # the rest keep their lease: the drainer delivers them when it ends
            try:
                self.deliver(state, job)
            except Exception as exc:
                error = storable_text(_error_line(exc), ERROR_MAX)
                with _mark_connection(state) as conn:
                    store.failed(conn, job.key, token, error, max_attempts=max_attempts)
                dead = job.attempts + 1 >= max_attempts
                tally["dead" if dead else "failed"] += 1
                logger.warning(
                    "outbox job %s (key %s) failed delivery %s%s: %s",
                    job.target,
                    job.key,
                    job.attempts + 1,
                    ", now dead" if dead else "",
                    error,
                )
                continue
            with _mark_connection(state) as conn:
                store.delivered(conn, job.key, token, ttl)
            tally["delivered"] += 1
        return tally

    def deliver(self, state: AppState, job: Any) -> None:
        """Hand one job on, carrying its key: Celery's ``apply_async(task_id=key)``, or the handler under
        ``once(scope, key)``. Raises whatever the delivery raised (a failed delivery)."""
        args, kwargs = list(job.args or ()), dict(job.kwargs or {})
        if job.kind == "celery":
            self._task(job.target).apply_async(args=args, kwargs=kwargs, task_id=job.key)
            return
        func = self.handlers.get(job.target)
        if func is None:
            raise LookupError(f"no outbox handler is registered under the name {job.target!r} in this process")
        name = f"outbox:{job.target}"
        command = command_of(name, {"args": args, "kwargs": kwargs})
        with run_once(state, scope=job.scope, key=job.key, command=command, name=name, transient=(Exception,)) as op:
            if op.done:
                return  # delivered before: its effect ran once
            reset = _JOB_KEY.set(job.key)
            try:
                func(*args, **kwargs)
            finally:
                _JOB_KEY.reset(reset)
            op.complete(None)

    def _task(self, name: str) -> Any:
        task = self.tasks.get(name)
        if task is None:
            celery = sys.modules.get("celery")
            registry = getattr(getattr(celery, "current_app", None), "tasks", None) if celery else None
            task = registry.get(name) if registry is not None else None
        if task is None:
            raise LookupError(f"no Celery task named {name!r} is known in this process (import the tasks module)")
        return task

    def drain(self, *, limit: int = 100, max_batches: int | None = None) -> dict[str, int]:
        """Deliver the due jobs, ``limit`` per batch, until a batch comes back short (see
        :meth:`Idempotency.drain`); return how many were ``delivered``, ``failed`` and became ``dead``."""
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise ValueError("limit must be a positive int")
        state = app_state()
        totals = {"delivered": 0, "failed": 0, "dead": 0}
        batches = 0
        while max_batches is None or batches < max_batches:
            token, jobs = self._take(state, limit=limit)
            for name, count in self._deliver_taken(state, (token, jobs)).items():
                totals[name] += count
            batches += 1
            if len(jobs) < limit:
                break
        return totals

    def follow(
        self,
        *,
        interval: float,
        limit: int = 100,
        stop: Callable[[], bool] = lambda: False,
        wait: Callable[[float], Any] | None = None,
    ) -> None:
        """Drain every ``interval`` seconds until ``stop()``; a database that cannot be reached is one log line
        per interval, never the end of the loop. On PostgreSQL the drainer LISTENs on :data:`CHANNEL` between
        rounds and drains at once when a commit staged a job for it (``wait``: how to wait instead)."""
        state = app_state()
        listener = _Listener(state) if wait is None and _engine(state).dialect.name == "postgresql" else None
        if listener is not None:
            listener.listen()  # before the first round: a job committed after it wakes the next wait
        try:
            while not stop():
                try:
                    self.drain(limit=limit)
                except sa.exc.SQLAlchemyError as exc:
                    logger.warning(
                        "outbox drainer: the database cannot be reached, retrying in %ss: %s",
                        interval,
                        _error_line(exc),
                    )
                (wait or (listener.wait if listener else time.sleep))(interval)
        finally:
            if listener is not None:
                listener.close()

    # Operators --------------------------------------------------------------------------------------------

    def jobs(self, which: str = "pending", *, limit: int = 100) -> list[dict[str, Any]]:
        """Jobs ``pending`` or ``dead``, oldest first, each as :func:`job_data`."""
        state = app_state()
        with state.engine.connect() as conn:
            rows = self.store(state).listing(conn, JobState(which.upper()), limit)
        return [job_data(row) for row in rows]

    def show(self, job_id: int) -> dict[str, Any]:
        state = app_state()
        with state.engine.connect() as conn:
            row = self.store(state).get(conn, job_id)
        if row is None:
            raise RecordNotFound(f"no outbox job {job_id}")
        return job_data(row)

    def stats(self) -> dict[str, Any]:
        """``pending``, ``dead`` and ``oldest_seconds`` (the age of the oldest PENDING job, 0 without one)."""
        state = app_state()
        with state.engine.connect() as conn:
            row = self.store(state).counts(conn)
        oldest = 0.0 if row.oldest is None else max((_time(row.db_now) - _time(row.oldest)).total_seconds(), 0.0)
        return {"pending": int(row.pending), "dead": int(row.dead), "oldest_seconds": oldest}

    def act(self, action: str, job_id: int, *, actor: str, expected_version: int | None = None) -> dict[str, Any]:
        """``redeliver`` or ``discard`` a job under :func:`refusal`'s rules, versioned and audited."""
        state = app_state()
        store = self.store(state)
        with _engine(state).begin() as conn:
            row = store.get(conn, job_id)
            if row is None:
                raise RecordNotFound(f"no outbox job {job_id}")
            if expected_version is not None and row.version != expected_version:
                raise RecordChanged(
                    f"outbox job {job_id} changed since you saw it (version {expected_version}, now {row.version});"
                    " look again and decide"
                )
            refused = refusal(action, job_data(row))
            if refused:
                raise TransitionError(refused)
            done = (store.redeliver if action == "redeliver" else store.discard)(conn, job_id, row.version)
            if not done:
                raise RecordChanged(f"outbox job {job_id} changed while you acted on it; look again and decide")
            kind = EventKind.OUTBOX_REDELIVER if action == "redeliver" else EventKind.OUTBOX_DISCARD
            detail = {"job": job_id, "target": row.target, "from": row.state, "attempts": row.attempts}
            if action == "discard":
                detail.update(args=row.args, kwargs=row.kwargs, last_error=row.last_error)
            state.store.add_event(
                conn, record_id=None, scope=row.scope, key=row.key, kind=kind, actor=actor, detail=detail
            )
        logger.info("outbox job %s (%s, key %s): %s by %s", job_id, row.target, row.key, action, actor)
        return {"job": job_id, "action": action, "from": row.state}


def refusal(action: str, job: dict[str, Any]) -> str | None:
    """Why an operator's ``action`` on ``job`` (:func:`job_data`) is refused, in the rule's words; ``None``: allowed.

    - redeliver: a DEAD or DELIVERED job (its consumer's key makes a second delivery harmless), or a PENDING one
      waiting for its backoff; it is PENDING and due now, attempts from 0.
    - discard: a DEAD or PENDING job; it is deleted (the audit event keeps its target and arguments).
    - neither while a delivery holds the job's lease.
    """
    if action not in ("redeliver", "discard"):
        return f"unknown action {action!r}: redeliver or discard"
    if job["leased"]:
        return f"refused: job {job['id']} is being delivered right now (its lease is live); try again after it"
    if action == "discard" and job["state"] == JobState.DELIVERED.value:
        return f"refused: job {job['id']} was delivered; only pending and dead jobs are discarded (purge removes it)"
    return None


def job_data(row: Any) -> dict[str, Any]:
    """A job as the CLI's ``--json`` and the Python API give it, with ``age_seconds`` by the database's clock."""
    data = {name: row._mapping[name] for name in row._mapping if name not in ("db_now", "is_leased")}
    data["leased"] = bool(row.is_leased)
    data["age_seconds"] = max((_time(row.db_now) - _time(row.created_at)).total_seconds(), 0.0)
    data.pop("lease_token", None)
    return data


def _time(value: Any) -> datetime:
    """A time read back from the database (SQLite may give text for a computed one)."""
    return datetime.fromisoformat(value) if isinstance(value, str) else value


def _error_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def _engine(state: AppState) -> sa.Engine:
    """The engine of the database that holds the outbox table: the records' (the outbox is staged in the same
    transaction as an atomic view's record, so it lives where the records live: ``IDEMPOTENCY_BIND_KEY``)."""
    return state.records_engine


@contextlib.contextmanager
def _take_connection(state: AppState) -> Iterator[sa.Connection]:
    """A connection of the app's engine for a take's transaction: READ COMMITTED on PostgreSQL and MariaDB (no
    gap locks that would hold a staging INSERT while a take is open); SQLite as it is."""
    with _engine(state).connect() as conn:
        yield conn if conn.dialect.name == "sqlite" else conn.execution_options(isolation_level="READ COMMITTED")


@contextlib.contextmanager
def _mark_connection(state: AppState) -> Iterator[sa.Connection]:
    """A transaction for marking a job delivered or failed: on PostgreSQL committed without waiting for its WAL
    flush. A database crash can lose the mark of the last moments: the job is then delivered again, which its
    keyed consumer makes harmless (at least once), and never lost."""
    with _engine(state).begin() as conn:
        if conn.dialect.name == "postgresql":
            conn.execute(sa.text("SET LOCAL synchronous_commit = off"))
        yield conn


class _Listener:
    """A following drainer's LISTEN on PostgreSQL (psycopg2 or psycopg 3): :meth:`wait` returns early when a
    notification arrives. Any trouble with its connection falls back to sleeping, and it listens again on the
    next wait: the poll interval still bounds how long a job waits."""

    def __init__(self, state: AppState) -> None:
        self.state = state
        self.conn: sa.Connection | None = None

    def listen(self) -> Any:
        """The raw driver connection, LISTENing (connected on first use)."""
        if self.conn is None:
            conn = self.state.engine.connect()  # autocommit: LISTEN takes effect at once
            try:
                conn.exec_driver_sql(f"LISTEN {CHANNEL}")
            except Exception:
                conn.close()
                raise
            self.conn = conn
        return self.conn.connection.dbapi_connection

    def wait(self, timeout: float) -> None:
        try:
            raw = self.listen()
            if hasattr(raw, "poll"):  # psycopg2
                if select.select([raw], [], [], timeout)[0]:
                    raw.poll()
                    raw.notifies.clear()
            else:  # psycopg 3
                for _ in raw.notifies(timeout=timeout, stop_after=1):
                    pass
        except Exception as exc:  # a lost connection: sleep this round, listen again on the next
            logger.warning("outbox drainer: LISTEN failed, polling this round: %s", _error_line(exc))
            self.close()
            time.sleep(timeout)

    def close(self) -> None:
        if self.conn is not None:
            conn, self.conn = self.conn, None
            with contextlib.suppress(Exception):
                conn.close()
