"""Per-app state: the config read once in ``init_app``, the tables, the store and the layer's own engine.

Looked up with :func:`app_state` by every module that needs it (request pipeline, operations, CLI,
dashboard), so none of them imports the extension class.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Literal

import sqlalchemy as sa
from flask import Flask, current_app
from sqlalchemy.engine import Engine

from .constants import BASE_REPLAY_HEADERS, ConfigKey
from .decorator import RouteOptions, seconds
from .errors import ConfigurationError, SchemaVersionError, TransientError
from .models import SCHEMA_VERSION, Tables, define_tables
from .store import SUPPORTED_DIALECTS, RecordStore

if TYPE_CHECKING:
    from flask_sqlalchemy import SQLAlchemy

logger = logging.getLogger("flask_idempotent")

#: Where an app keeps its state: in ``app.extensions``, so that the state goes with its app in the same garbage
#: collection (a module-level mapping keyed by a weak reference would hold it until that reference's callback
#: runs, one collection too late when the app is in a reference cycle, as any app with a Jinja environment is).
_STATE_KEY = "idempotency_state"


@dataclass(frozen=True)
class Resolved:
    """A view's options with the config defaults filled in."""

    required: bool
    atomic: bool
    ttl: float
    lease: float
    wait: float
    in_progress_status: int
    on_stale: Literal["hold", "takeover"]
    fingerprint: Callable[[], Any] | None
    replay: Callable[[Any], Any] | None
    transient: tuple[type[BaseException], ...]
    key: Callable[[], str | None] | None = None
    scope: str | None = None
    describe: Callable[[], str | None] | None = None
    runbook: str | None = None
    #: Atomic mode: a 4xx outcome commits the view's writes too (else they are rolled back).
    commit_4xx: bool = False


@dataclass
class Callbacks:
    """The app's callbacks, registered on the extension with its decorator methods (shared by its apps)."""

    scope_loader: Callable[[], str | None] | None = None
    dashboard_access: Callable[[], Any] | None = None
    #: Scope → a label for people ("alice" for "1"), shown next to the scope on the dashboard.
    scope_label: Callable[[str], Any] | None = None
    #: Text typed into the dashboard's search → the scopes it names (the reverse of ``scope_label``).
    scope_search: Callable[[str], Any] | None = None
    #: A record's resource reference (``resource_ref``) → a URL the record page links to.
    resource_url: Callable[[Any], Any] | None = None


class ReplayTally:
    """Replays this process answered, written to the events table at most once per ``interval`` seconds.

    A replay is one read and writes nothing; the overview's replays-per-hour chart still needs them counted
    across processes. So each process counts them here and writes the count as one ``replays`` event when the
    next protected request comes ``interval`` seconds or more after the first uncounted replay, dated at that
    first replay (so the chart's hour is right within ``interval``). ``interval`` 0 writes every replay at once.
    A process that serves nothing more keeps its count until it does; one that is killed loses at most one
    interval's replays. This is a statistic for people: nothing the layer decides reads it.
    """

    def __init__(self, write: Callable[[int, float], None], interval: float) -> None:
        self._write = write
        self.interval = interval
        self.clock: Callable[[], float] = time.monotonic
        self._lock = threading.Lock()  # gthread workers: requests of one process count into one tally
        self._pending = 0
        self._first = 0.0
        self._not_before = 0.0  # after a failed write: the next try waits one interval (at least 1 s)

    def add(self) -> None:
        """Count one replay (after writing the count that was due, if any)."""
        self.write_due()
        with self._lock:
            if not self._pending:
                self._first = self.clock()
            self._pending += 1
        if self.interval == 0:
            self.write_due()

    @property
    def pending(self) -> int:
        """Replays this process counted and has not written yet."""
        return self._pending

    def write_due(self, *, now_or_never: bool = False) -> None:
        """Write the count if its first replay is ``interval`` seconds old or more (``now_or_never``: whatever
        its age, as the overview does, so that the page shows the replays of the process serving it)."""
        now = self.clock()
        due = now_or_never or (now - self._first >= self.interval and now >= self._not_before)
        if not self._pending or not due:
            return  # unlocked peek: the common case costs a few comparisons
        with self._lock:
            count, first = self._pending, self._first
            self._pending = 0
        if not count:
            return
        try:
            self._write(count, now - first)
        except sa.exc.SQLAlchemyError as exc:
            with self._lock:  # kept for the next try, dated at the older first replay
                self._first = first if not self._pending else min(first, self._first)
                self._pending += count
                self._not_before = now + max(self.interval, 1.0)
            logger.warning("could not write the count of %s replays: %s", count, type(exc).__name__)


def _offset_seconds(offset: Callable[[], float | timedelta] | None) -> Callable[[], float]:
    if offset is None:
        return lambda: 0.0

    def read() -> float:
        value = offset()
        return value.total_seconds() if isinstance(value, timedelta) else float(value)

    return read


class AppState:
    """Per-app state: the config read once in ``init_app``, the tables and the store."""

    def __init__(
        self,
        app: Flask,
        db: SQLAlchemy,
        callbacks: Callbacks,
        clock_offset: Callable[[], float | timedelta] | None = None,
    ) -> None:
        config = app.config
        #: The Flask-SQLAlchemy bind that holds the records (``None``: the default engine).
        self.bind_key: str | None = _bind_key(config[ConfigKey.BIND_KEY])
        with app.app_context():  # Flask-SQLAlchemy made the app's engines in its init_app; nothing connects yet
            engines = db.engines
            if self.bind_key not in engines:
                known = ", ".join(repr(key) for key in engines if key is not None) or "none"
                raise ConfigurationError(
                    f"{ConfigKey.BIND_KEY} = {self.bind_key!r} names no bind of SQLALCHEMY_BINDS (its binds: {known});"
                    " add it to SQLALCHEMY_BINDS, or set it to one of them (None: the default engine)"
                )
            dialect = engines[self.bind_key].dialect.name
        if dialect not in SUPPORTED_DIALECTS:
            where = "SQLALCHEMY_DATABASE_URI" if self.bind_key is None else f"SQLALCHEMY_BINDS[{self.bind_key!r}]"
            raise ConfigurationError(
                f"flask_idempotent cannot keep its records in a {dialect!r} database ({where}):"
                f" supported are {', '.join(SUPPORTED_DIALECTS)}"
            )
        #: ``IDEMPOTENCY_ENABLED = False``: the hooks do nothing (unit tests of view logic only, never production).
        self.enabled = bool(config[ConfigKey.ENABLED])
        if not self.enabled and not (app.debug or app.testing):
            raise ConfigurationError(
                f"{ConfigKey.ENABLED} = False switches the idempotency layer off: every request runs unprotected."
                " It is for unit tests of view logic and is refused unless app.testing (TESTING) or app.debug is"
                f" set; remove {ConfigKey.ENABLED} from this deployment's configuration."
            )
        self.db = db
        self.callbacks = callbacks
        # On the bind's own metadata (Flask-SQLAlchemy made one per bind): create_all and migrations follow it.
        self.tables: Tables = define_tables(db.metadatas[self.bind_key], self.bind_key)
        advisory_locks = config[ConfigKey.ADVISORY_LOCKS]
        if not isinstance(advisory_locks, bool):  # "off" from an environment variable would read as True
            raise ValueError(f"{ConfigKey.ADVISORY_LOCKS} must be True or False, not {advisory_locks!r}")
        commit_4xx = config[ConfigKey.ATOMIC_COMMIT_4XX]
        if not isinstance(commit_4xx, bool):
            raise ValueError(f"{ConfigKey.ATOMIC_COMMIT_4XX} must be True or False, not {commit_4xx!r}")
        synchronous = config[ConfigKey.OUTCOME_SYNCHRONOUS_COMMIT]
        if not isinstance(synchronous, bool):
            raise ValueError(f"{ConfigKey.OUTCOME_SYNCHRONOUS_COMMIT} must be True or False, not {synchronous!r}")
        self.store = RecordStore(
            self.tables,
            _offset_seconds(clock_offset),
            advisory_locks=advisory_locks,
            synchronous_outcomes=synchronous,
        )
        self.header: str = config[ConfigKey.HEADER]
        self.protect_all = bool(config[ConfigKey.PROTECT_ALL])
        self.fingerprint_headers = tuple(config[ConfigKey.FINGERPRINT_HEADERS])
        replay_headers = tuple(BASE_REPLAY_HEADERS) + tuple(config[ConfigKey.REPLAY_HEADERS])
        if any(name.lower() == "set-cookie" for name in replay_headers):
            raise ValueError(f"{ConfigKey.REPLAY_HEADERS} must not contain Set-Cookie: cookies are never replayed")
        self.replay_headers = frozenset(name.lower() for name in replay_headers)
        self.retry_after = int(config[ConfigKey.RETRY_AFTER])
        self.max_body_bytes = int(config[ConfigKey.MAX_BODY_BYTES])
        self.max_response_bytes = int(config[ConfigKey.MAX_RESPONSE_BYTES])
        self.defaults = RouteOptions(
            required=bool(config[ConfigKey.REQUIRED]),
            atomic=bool(config[ConfigKey.ATOMIC]),
            ttl=seconds(ConfigKey.TTL, config[ConfigKey.TTL]),
            lease=seconds(ConfigKey.LEASE, config[ConfigKey.LEASE]),
            wait=seconds(ConfigKey.WAIT, config[ConfigKey.WAIT]),
            in_progress_status=int(config[ConfigKey.IN_PROGRESS_STATUS]),
            on_stale=str(config[ConfigKey.ON_STALE]),  # type: ignore[arg-type]
            commit_4xx=commit_4xx,
        )  # RouteOptions validates the values
        self.engine_options: dict[str, Any] = _engine_options(config, self.bind_key)
        self._resolved: dict[RouteOptions, Resolved] = {}
        self._autocommit: Engine | None = None
        tally = seconds(ConfigKey.REPLAY_TALLY_SECONDS, config[ConfigKey.REPLAY_TALLY_SECONDS])
        self.replays = ReplayTally(self._write_replays, 60.0 if tally is None else tally)
        self._schema_checked = False
        self.views_checked = False

    def resolve(self, route: RouteOptions) -> Resolved:
        resolved = self._resolved.get(route)
        if resolved is None:
            d = self.defaults

            def pick(name: str) -> Any:
                value = getattr(route, name)
                return getattr(d, name) if value is None else value

            resolved = Resolved(
                required=pick("required"),
                atomic=pick("atomic"),
                ttl=pick("ttl"),
                lease=pick("lease"),
                wait=pick("wait"),
                in_progress_status=pick("in_progress_status"),
                on_stale=pick("on_stale"),
                fingerprint=route.fingerprint,
                replay=route.replay,
                transient=(TransientError, *route.transient),
                key=route.key,
                scope=route.scope,
                describe=route.describe,
                runbook=route.runbook,
                commit_4xx=pick("commit_4xx"),
            )
            self._resolved[route] = resolved
        return resolved

    @property
    def records_engine(self) -> Engine:
        """The Flask-SQLAlchemy engine that holds the records: the one place that says which (needs an app
        context). Every transaction on the records (operations, purge, the schema, a record stored alone)
        runs on it; leased statements on :attr:`engine`, atomic ones on :meth:`session_connection`."""
        return self.db.engines[self.bind_key]

    def session_connection(self) -> sa.Connection:
        """``db.session``'s connection to :attr:`records_engine`: where an atomic request's record is written."""
        return self.db.session.connection(bind_arguments={"bind": self.records_engine})

    @property
    def engine(self) -> Engine:
        """The engine for leased-mode statements, in autocommit mode: each statement is its own transaction.

        On SQLite it is the records' engine with an execution option (an in-memory database lives in the app's
        pool). Elsewhere it is a pool of its own on the same URL and engine options (``SQLALCHEMY_ENGINE_OPTIONS``,
        or the bind's in ``SQLALCHEMY_BINDS``), whose connections stay in autocommit instead of switching
        isolation level on every checkout (measured: about 75 us per checkout on PostgreSQL). It is disposed with
        the records' engine.
        """
        if self._autocommit is None:
            engine = self.records_engine
            if engine.dialect.name == "sqlite":
                self._autocommit = engine.execution_options(isolation_level="AUTOCOMMIT")
            else:
                options = {**self.engine_options, "isolation_level": "AUTOCOMMIT"}
                if engine.dialect.driver == "psycopg":
                    # psycopg 3 prepares a statement after 5 runs; PostgreSQL then keeps a generic plan made
                    # while the table was small (the (scope, id) index, key as a filter) until the next ANALYZE,
                    # and the deciding read scans a whole scope. Measured: 1.8 -> 13.9 ms per replay after 50k
                    # inserts. Unprepared, every statement is planned for its values, as on psycopg2.
                    options["connect_args"] = {"prepare_threshold": None, **options.get("connect_args", {})}
                own = sa.create_engine(engine.url, **options)
                sa.event.listen(engine, "engine_disposed", lambda _: own.dispose())
                weakref.finalize(self, own.dispose)
                self._autocommit = own
        return self._autocommit

    def _write_replays(self, count: int, age: float) -> None:
        with self.engine.connect() as conn:
            self.store.add_replays(conn, count, age)

    @contextlib.contextmanager
    def connection(self, atomic: bool) -> Iterator[sa.Connection]:
        """Where a request's statements run: the view's transaction (atomic) or an autocommit connection."""
        if atomic:
            yield self.session_connection()
            return
        with self.engine.connect() as conn:
            yield conn

    def check_schema(self) -> None:
        """Once per process: refuse to serve with tables of an older schema version, naming the migration.

        A database that cannot be reached is not checked now (requests fail closed; the check runs again).
        """
        if self._schema_checked:
            return
        try:
            with self.records_engine.connect() as conn:
                missing = self.store.missing_columns(conn)
        except sa.exc.SQLAlchemyError:
            return
        if missing:
            raise SchemaVersionError(
                f"the {self.tables.records.name} table lacks the columns {', '.join(sorted(missing))}: it is at"
                f" an older schema version than this flask_idempotent needs ({SCHEMA_VERSION}). Run"
                " `flask idempotency upgrade-schema`, or a migration that calls"
                " flask_idempotent.migrations.upgrade_1_to_2() (docs: Upgrading from schema version 1 to 2)."
            )
        self._schema_checked = True


def _bind_key(value: Any) -> str | None:
    if value is not None and (not isinstance(value, str) or not value):
        raise ConfigurationError(
            f"{ConfigKey.BIND_KEY} must be a key of SQLALCHEMY_BINDS (a str) or None, not {value!r}"
        )
    return value


def _engine_options(config: Any, bind_key: str | None) -> dict[str, Any]:
    """The engine options Flask-SQLAlchemy gave the records' engine: ``SQLALCHEMY_ENGINE_OPTIONS`` for the
    default one, the bind's own dict (without its ``url``) for a bind."""
    if bind_key is None:
        return dict(config.get("SQLALCHEMY_ENGINE_OPTIONS") or {})
    bind = (config.get("SQLALCHEMY_BINDS") or {}).get(bind_key)
    return {name: value for name, value in bind.items() if name != "url"} if isinstance(bind, dict) else {}


def register(app: Flask, state: AppState) -> None:
    app.extensions[_STATE_KEY] = state


def app_state(app: Flask | None = None) -> AppState:
    """The per-app state of ``app`` (default: the current app)."""
    app = app or current_app._get_current_object()  # type: ignore[attr-defined]
    try:
        return app.extensions[_STATE_KEY]  # type: ignore[no-any-return]
    except KeyError:
        raise RuntimeError("flask_idempotent is not registered on this app; call init_app(app, db)") from None
