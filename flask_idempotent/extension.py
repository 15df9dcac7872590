"""The ``Idempotency`` extension and the request hooks that enforce SPEC's HTTP and outcome tables."""

from __future__ import annotations

import logging
import secrets
import time
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from flask import Flask, Response, current_app, has_request_context, request
from flask.typing import ResponseReturnValue
from sqlalchemy.engine import Engine, Row
from werkzeug.exceptions import HTTPException, InternalServerError
from werkzeug.wrappers import Response as BaseResponse

from . import signals
from .constants import BASE_REPLAY_HEADERS, DEFAULTS, REPLAYED_HEADER, UNSAFE_METHODS, ConfigKey, EventKind, State
from .context import UNSET, ClaimedRecord, get_current, set_current
from .decorator import RouteOptions, TransientError, options_of, seconds, view_exception
from .errors import (
    AtomicViewCommitted,
    BodyTooLargeToFingerprint,
    InvalidKey,
    KeyReused,
    MissingKey,
    RecordStuck,
    RequestFailed,
    RequestInProgress,
    ResponseNotStored,
    StoreUnavailable,
)
from .fingerprint import BodyTooLarge, custom_command, hash_command, request_fingerprint
from .keys import KeyFormatError, parse_key
from .machine import CLAIMING, Decision, classify_exception, classify_status, decide
from .models import Tables, define_tables
from .store import Executor, RecordStore

if TYPE_CHECKING:
    from flask_sqlalchemy import SQLAlchemy

logger = logging.getLogger("flask_idempotent")

#: Client-caused events (conflicts, in-progress and stale hits) stored per record; later ones are only counted.
MAX_CLIENT_EVENTS_PER_RECORD = 20
_CLAIM_ATTEMPTS = 5


def utcnow() -> datetime:
    """The default clock: naive UTC, the form every stored time has."""
    return datetime.now(timezone.utc).replace(tzinfo=None)


@dataclass(frozen=True)
class Resolved:
    """A view's options with the config defaults filled in."""

    required: bool
    atomic: bool
    ttl: float
    lease: float
    wait: float
    in_progress_status: int
    on_stale: str
    fingerprint: Callable[[], Any] | None
    replay: Callable[[Any], Any] | None
    transient: tuple[type[BaseException], ...]


class AppState:
    """Per-app state: the config read once in ``init_app``, the tables and the store."""

    def __init__(self, app: Flask, db: SQLAlchemy, clock: Callable[[], datetime]) -> None:
        config = app.config
        self.db = db
        self.clock = clock
        self.tables: Tables = define_tables(db.metadata)
        self.store = RecordStore(self.tables)
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
            on_stale=str(config[ConfigKey.ON_STALE]),
        )  # RouteOptions validates the values
        self.engine_options: dict[str, Any] = dict(config.get("SQLALCHEMY_ENGINE_OPTIONS") or {})
        self._resolved: dict[RouteOptions, Resolved] = {}
        self._autocommit: Engine | None = None

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
            )
            self._resolved[route] = resolved
        return resolved

    @property
    def engine(self) -> Engine:
        """The engine for leased-mode statements, in autocommit mode: each statement is its own transaction.

        On SQLite it is the app's engine with an execution option (an in-memory database lives in the app's
        pool). Elsewhere it is a pool of its own on the same URL and ``SQLALCHEMY_ENGINE_OPTIONS``, whose
        connections stay in autocommit instead of switching isolation level on every checkout (measured:
        about 75 us per checkout on PostgreSQL). It is disposed with the app's engine.
        """
        if self._autocommit is None:
            engine = self.db.engine
            if engine.dialect.name == "sqlite":
                self._autocommit = engine.execution_options(isolation_level="AUTOCOMMIT")
            else:
                own = sa.create_engine(engine.url, **{**self.engine_options, "isolation_level": "AUTOCOMMIT"})
                sa.event.listen(engine, "engine_disposed", lambda _: own.dispose())
                weakref.finalize(self, own.dispose)
                self._autocommit = own
        return self._autocommit

    def write_fenced(self, record: ClaimedRecord, values: Mapping[str, Any]) -> bool:
        """Update ``record`` only while this request still holds its lease."""
        assert record.record_id is not None and record.lease_token is not None
        if record.atomic:
            return self.store.settle(self.db.session.connection(), record.record_id, record.lease_token, values)
        with self.engine.connect() as conn:
            return self.store.settle(conn, record.record_id, record.lease_token, values)


class Idempotency:
    """The Flask extension: protects views marked with :func:`idempotent`.

    ``init_app(app, db)`` registers the request hooks, the ``flask idempotency`` CLI group and the dashboard
    blueprint, and adds the extension's tables to ``db.metadata``. ``clock`` (naive UTC ``datetime``) is for
    tests that move time.
    """

    def __init__(
        self, app: Flask | None = None, db: SQLAlchemy | None = None, *, clock: Callable[[], datetime] = utcnow
    ) -> None:
        self.clock = clock
        self._scope_loader: Callable[[], str | None] | None = None
        self._dashboard_access: Callable[[], Any] | None = None
        self._states: weakref.WeakKeyDictionary[Flask, AppState] = weakref.WeakKeyDictionary()
        if app is not None:
            if db is None:
                raise TypeError("Idempotency(app, db) needs the app's Flask-SQLAlchemy instance")
            self.init_app(app, db)

    def init_app(self, app: Flask, db: SQLAlchemy) -> None:
        """Register the extension on ``app``, storing records through ``db`` (a ``SQLAlchemy`` instance)."""
        if "idempotency" in app.extensions:
            raise RuntimeError("flask_idempotent is already registered on this app")
        for name, value in DEFAULTS.items():
            app.config.setdefault(name, value)
        state = AppState(app, db, lambda: self.clock())
        self._states[app] = state
        app.extensions["idempotency"] = self
        _GUARD.install(db)
        from .cli import cli
        from .dashboard import init_dashboard

        app.cli.add_command(cli)
        init_dashboard(app, self)
        app.before_request(self._before_request)
        app.after_request(self._after_request)
        app.teardown_request(self._teardown_request)

    # Registration hooks ---------------------------------------------------------------------------------

    def scope_loader(self, loader: Callable[[], str | None]) -> Callable[[], str | None]:
        """Register the function that names who owns a key (user, API key, tenant).

        Keys are independent per scope. Without a loader, or when it returns ``None``, all requests share the
        global scope ``""``: register one whenever more than one client can send keys.
        """
        self._scope_loader = loader
        return loader

    def dashboard_access(self, check: Callable[[], Any]) -> Callable[[], Any]:
        """Register the dashboard's access check; it returns the actor's name, or something falsy for 403."""
        self._dashboard_access = check
        return check

    def _load_scope(self) -> str:
        owner = self._scope_loader() if self._scope_loader is not None else None
        scope = "" if owner is None else str(owner)
        if len(scope) > 255:
            raise ValueError("the scope_loader returned a scope longer than 255 characters")
        return scope

    # Tables ---------------------------------------------------------------------------------------------

    def state(self, app: Flask | None = None) -> AppState:
        """The per-app state of ``app`` (default: the current app)."""
        app = app or current_app._get_current_object()  # type: ignore[attr-defined]
        try:
            return self._states[app]
        except KeyError:
            raise RuntimeError("flask_idempotent is not registered on this app; call init_app(app, db)") from None

    def create_all(self) -> None:
        """Create the extension's tables if missing (apps without migrations; needs an app context)."""
        state = self.state()
        state.db.metadata.create_all(state.db.engine, tables=[state.tables.records, state.tables.events])

    # Request hooks --------------------------------------------------------------------------------------

    def _route_options(self, state: AppState) -> RouteOptions | None:
        if request.method not in UNSAFE_METHODS or request.endpoint is None:
            return None
        view = current_app.view_functions.get(request.endpoint)
        route = options_of(view)
        if route is None and state.protect_all and view is not None:
            route = RouteOptions()
        if route is None or route.exempt:
            return None
        return route

    def _before_request(self) -> ResponseReturnValue | None:
        state = self.state()
        route = self._route_options(state)
        if route is None:
            return None
        options = state.resolve(route)
        lines = request.headers.getlist(state.header)
        if not lines:
            if options.required:
                raise MissingKey(f"This request needs an {state.header} header: a unique value per operation.")
            return None
        try:
            key = parse_key(lines)
        except KeyFormatError as exc:
            raise InvalidKey(f"{state.header}: {exc}.") from None
        scope = self._load_scope()
        try:
            if options.fingerprint is not None:
                command = custom_command(request, current_app.ensure_sync(options.fingerprint)())
            else:
                command = request_fingerprint(
                    request, headers=state.fingerprint_headers, max_body_bytes=state.max_body_bytes
                )
        except BodyTooLarge:
            raise BodyTooLargeToFingerprint(
                f"The body is larger than {state.max_body_bytes} bytes, the most an idempotent request may carry."
            ) from None
        record = ClaimedRecord(
            state=state,
            options=options,
            scope=scope,
            key=key,
            request_hash=hash_command(command),
            method=request.method,
            path=request.path,
            endpoint=request.endpoint,
        )
        set_current(record)
        return self._claim(state, record)

    def _claim(self, state: AppState, record: ClaimedRecord) -> ResponseReturnValue | None:
        options = record.options
        deadline = time.monotonic() + options.wait
        delay = 0.02
        while True:
            decision, row = self._claim_once(state, record)
            if decision is None:
                signals.record_claimed.send(current_app._get_current_object(), record=record)  # type: ignore[attr-defined]
                return None
            if decision is Decision.REPLAY:
                assert row is not None
                return self._replay(state, record, row)
            if decision is Decision.CONFLICT:
                assert row is not None
                self._client_event(state, record, row, EventKind.CONFLICT)
                signals.key_conflict.send(current_app._get_current_object(), record=row._mapping)  # type: ignore[attr-defined]
                raise KeyReused(
                    f"This {state.header} was first used for {row.method} {row.path} with a different request."
                    " Use a new key for a new request."
                )
            if decision is Decision.STUCK:
                assert row is not None
                self._client_event(state, record, row, EventKind.STALE_HIT)
                raise RecordStuck(
                    "The first request with this key stopped without recording an outcome. It may have had an"
                    " effect, so it is not run again until an operator decides."
                )
            # IN_PROGRESS: poll until the owner finishes or the wait runs out.
            remaining = deadline - time.monotonic()
            if remaining > 0:
                time.sleep(min(delay, remaining))
                delay = min(delay * 2, 0.25)
                continue
            if row is not None:
                self._client_event(state, record, row, EventKind.IN_PROGRESS_HIT)
            raise RequestInProgress(
                "A request with this key is still being processed. Retry after the time in Retry-After.",
                retry_after=state.retry_after,
                status=options.in_progress_status,
            )

    def _claim_once(self, state: AppState, record: ClaimedRecord) -> tuple[Decision | None, Row[Any] | None]:
        try:
            if record.atomic:
                # Core statements on the session's connection: the view's transaction, without ORM execution.
                decision, row = self._decide_and_claim(state, state.db.session.connection(), record)
                if decision is not None:
                    _rollback_quietly(state)  # hold no transaction while answering or polling
                return decision, row
            with state.engine.connect() as conn:
                return self._decide_and_claim(state, conn, record)
        except (sa.exc.DBAPIError, sa.exc.TimeoutError) as exc:
            if record.atomic:
                _rollback_quietly(state)
            if _is_lock_wait(exc):
                return Decision.IN_PROGRESS, None
            logger.error("idempotency store unavailable while claiming %r: %s", record.key, _db_error(exc))
            raise StoreUnavailable(
                "The idempotency store cannot be reached, so the request was not run. Retry later.",
                retry_after=state.retry_after,
            ) from exc

    def _decide_and_claim(
        self, state: AppState, conn: Executor, record: ClaimedRecord
    ) -> tuple[Decision | None, Row[Any] | None]:
        store, options = state.store, record.options
        # Read the record and claim the key if nobody holds it. An atomic owner's claim stays uncommitted until
        # its view returns; duplicates must neither run nor block on its row, so in atomic mode the read also
        # takes a transaction-scoped lock on the key (PostgreSQL).
        values = _new_record(record, _lease(state, options.lease))
        locked, record_id, row = store.claim_or_find(conn, values, lock=record.atomic)
        if record_id is not None:
            self._claimed(record, record_id, values["lease_token"], None, values)
            return None, None
        if not locked:
            # Another transaction holds the key: answer from the committed row when that needs no claim
            # (replay, conflict); anything that would claim must wait for the holder.
            # (No in-progress event then: the holder may have the row locked.)
            decision = (
                None if row is None else decide(row._mapping, record.request_hash, state.clock(), options.on_stale)
            )
            if decision is None or decision in CLAIMING:
                return Decision.IN_PROGRESS, None
            return decision, row
        if row is None:  # committed by another request while the claim ran
            row = store.find(conn, record.scope, record.key)
        for _ in range(_CLAIM_ATTEMPTS):
            lease = _lease(state, options.lease)
            now = lease["updated_at"]
            token = lease["lease_token"]
            if row is None:
                values = _new_record(record, lease)
                record_id = store.insert(conn, values)
                if record_id is not None:
                    self._claimed(record, record_id, token, None, values)
                    return None, None
                row = store.find(conn, record.scope, record.key)
                continue
            decision = decide(row._mapping, record.request_hash, now, options.on_stale)
            if decision not in CLAIMING:
                return decision, row
            values = {
                **lease,
                "state": State.IN_PROGRESS.value,
                "retryable": False,
                "expires_at": now + timedelta(seconds=options.ttl),
                # A previous attempt's outcome must never be replayed for this one.
                "response_status": None,
                "response_headers": None,
                "response_body": None,
                "resource_ref": None,
                "error": None,
            }
            if decision is Decision.REPLACE:
                # An expired record counts as absent: start afresh under the new command.
                values.update(
                    request_hash=record.request_hash,
                    method=record.method,
                    path=record.path,
                    endpoint=record.endpoint,
                    attempts=1,
                    recovery_point=None,
                    recovery_data=None,
                    event_count=0,
                    created_at=now,
                )
            else:
                values["attempts"] = row.attempts + 1
            if store.reclaim(conn, row, values):
                self._claimed(record, row.id, token, row, values)
                if decision is Decision.TAKEOVER:
                    store.add_event(
                        conn,
                        record=row,
                        scope=row.scope,
                        key=row.key,
                        kind=EventKind.TAKEOVER,
                        now=now,
                        detail={"attempt": values["attempts"]},
                    )
                return None, None
            row = store.find(conn, record.scope, record.key)
        return Decision.IN_PROGRESS, row  # heavy contention on one key: answer as in progress

    @staticmethod
    def _claimed(
        record: ClaimedRecord, record_id: int, token: str, previous: Row[Any] | None, values: dict[str, Any]
    ) -> None:
        record.record_id = record_id
        record.lease_token = token
        record.attempt = values["attempts"]
        record.previous = previous
        record.claim_values = values
        if previous is not None and "recovery_point" not in values:  # a retry or takeover resumes; a replacement not
            record.recovery_point = previous.recovery_point
            record.recovery_data = previous.recovery_data

    def _client_event(self, state: AppState, record: ClaimedRecord, row: Row[Any], kind: EventKind) -> None:
        """Store an event a client caused, up to the per-record cap; past it the event is only counted."""
        now = state.clock()
        detail = {
            "method": record.method,
            "path": record.path,
            "endpoint": record.endpoint,
            "request_hash": record.request_hash,
        }
        try:
            with state.engine.connect() as conn:
                state.store.add_client_event(
                    conn, record=row, kind=kind, now=now, detail=detail, cap=MAX_CLIENT_EVENTS_PER_RECORD
                )
        except sa.exc.SQLAlchemyError as exc:  # the answer matters more than its audit trail
            logger.warning("could not store %s event for record %s: %s", kind.value, row.id, _db_error(exc))

    def _replay(self, state: AppState, record: ClaimedRecord, row: Row[Any]) -> Response:
        if row.response_status is None:
            # Marked failed by an operator before any response was stored.
            raise RequestFailed("An operator marked the request with this key as failed; it will not run again.")
        headers = [(name, value) for name, value in (row.response_headers or [])]
        replay = record.options.replay
        if row.response_body is None and (row.resource_ref is None or replay is None):
            not_stored = ResponseNotStored(
                f"The request with this key completed with status {row.response_status}, but its response was"
                " too large to store, so it cannot be replayed. Its headers (e.g. Location) are included."
            )
            response = not_stored.get_response()
            response.headers.extend((n, v) for n, v in headers if n.lower() != "content-type")
            response.headers[REPLAYED_HEADER] = "true"
            return response  # type: ignore[return-value]
        if row.resource_ref is not None and replay is not None:
            response = current_app.make_response(current_app.ensure_sync(replay)(row.resource_ref))
            response.status_code = row.response_status
            for name, value in headers:
                if name not in response.headers:
                    response.headers[name] = value
        else:
            response = current_app.response_class(row.response_body or b"", status=row.response_status)
            response.headers.remove("Content-Type")
            response.headers.extend(headers)
        response.headers[REPLAYED_HEADER] = "true"
        signals.response_replayed.send(current_app._get_current_object(), record=row._mapping)  # type: ignore[attr-defined]
        return response

    def _after_request(self, response: BaseResponse) -> BaseResponse:
        record = get_current()
        if record is None or not record.claimed or record.settled:
            return response
        exc = view_exception()
        if exc is not None and isinstance(exc, record.options.transient):
            outcome, retryable = State.FAILED, True
        else:
            outcome, retryable = classify_status(response.status_code, atomic=record.atomic)
        return self._settle(record, response, outcome, retryable, error=_describe(exc))

    def _teardown_request(self, exc: BaseException | None) -> None:
        record = get_current()
        if record is None or not record.claimed or record.settled:
            return
        # The request ended in an exception that skipped after_request (e.g. PROPAGATE_EXCEPTIONS).
        exc = exc or view_exception() or InternalServerError()
        retryable = classify_exception(exc, record.options.transient, atomic=record.atomic)
        status = exc.code if isinstance(exc, HTTPException) and exc.code else 500
        fallback = InternalServerError().get_response() if not isinstance(exc, HTTPException) else exc.get_response()
        try:
            self._settle(record, fallback, State.FAILED, retryable, error=_describe(exc), status=status)
        except Exception as error:  # teardown must not raise
            logger.error("could not settle idempotency record %s: %s", record.record_id, _db_error(error))

    def _settle(
        self,
        record: ClaimedRecord,
        response: BaseResponse,
        outcome: State,
        retryable: bool,
        *,
        error: str | None,
        status: int | None = None,
    ) -> BaseResponse:
        state = record.state
        record.settled = True
        now = state.clock()
        has_resource = record.resource_ref is not UNSET
        if response.direct_passthrough:
            response.direct_passthrough = False  # buffer it: the body is stored
        body: bytes | None = None
        if not (has_resource and record.options.replay is not None):
            body = response.get_data()
            if len(body) > state.max_response_bytes:
                # Never store a truncated body: replays answer 500 response-not-stored instead (see _replay).
                error = error or f"response body of {len(body)} bytes exceeds {ConfigKey.MAX_RESPONSE_BYTES}"
                body = None
        values = {
            "state": outcome.value,
            "retryable": retryable,
            "locked_until": None,
            "updated_at": now,
            "response_status": status or response.status_code,
            "response_headers": [[n, v] for n, v in response.headers.items() if n.lower() in state.replay_headers],
            "response_body": body,
            "resource_ref": record.resource_ref if has_resource else None,
            "error": error,
        }
        if record.atomic:
            return self._settle_atomic(record, response, values)
        try:
            stored = state.write_fenced(record, values)
        except sa.exc.SQLAlchemyError as exc:
            # The view ran; the record stays IN_PROGRESS and shows up as stuck once its lease ends.
            logger.error("could not store the outcome of record %s: %s", record.record_id, _db_error(exc))
            return response
        self._after_settle(record, stored, values)
        return response

    def _settle_atomic(self, record: ClaimedRecord, response: BaseResponse, values: dict[str, Any]) -> BaseResponse:
        state = record.state
        session = state.db.session
        if values["state"] == State.COMPLETED.value:
            try:
                if not state.write_fenced(record, values):
                    raise AtomicViewCommitted("the view rolled back db.session, losing the idempotency claim")
                session.commit()
            except AtomicViewCommitted as exc:
                logger.error("atomic view %s: %s", record.endpoint, exc)
                _rollback_quietly(state)
                values.update(
                    state=State.FAILED.value,
                    retryable=True,
                    error=_describe(exc),
                    response_body=None,
                    response_status=500,
                )
                self._store_atomic_failure(record, values)
                return InternalServerError().get_response()
            except sa.exc.SQLAlchemyError as exc:
                logger.error("could not commit atomic request %s: %s", record.record_id, _db_error(exc))
                _rollback_quietly(state)
                return StoreUnavailable(  # type: ignore[return-value]
                    "The request could not be committed. Retrying with the same key is safe: its writes and its"
                    " outcome are committed together or not at all.",
                    retry_after=state.retry_after,
                ).get_response()
            self._after_settle(record, True, values)
            return response
        # Any FAILED outcome: the view's writes are rolled back, so a retry can never apply them twice.
        _rollback_quietly(state)
        values["retryable"] = True
        self._store_atomic_failure(record, values)
        return response

    def _store_atomic_failure(self, record: ClaimedRecord, values: dict[str, Any]) -> None:
        """After the rollback, record the FAILED (retryable) outcome in a transaction of its own.

        The rollback undid the claim too, so the claim's own values (new command, attempts, lease token) are
        written again with the outcome, against the row as it was before the claim (compare and set).
        """
        state = record.state
        row = {**record.claim_values, **values}
        try:
            with state.engine.connect() as conn:
                if record.previous is None:
                    stored = state.store.insert(conn, row) is not None
                else:
                    stored = state.store.reclaim(conn, record.previous, row)
        except sa.exc.SQLAlchemyError as exc:
            logger.warning("could not store the failure of atomic record %s: %s", record.key, _db_error(exc))
            return
        self._after_settle(record, stored, values)

    @staticmethod
    def _after_settle(record: ClaimedRecord, stored: bool, values: Mapping[str, Any]) -> None:
        app = current_app._get_current_object()  # type: ignore[attr-defined]
        if not stored:
            logger.warning(
                "record %s (%s) lost its lease before its outcome was stored; the newer owner's outcome stands",
                record.record_id,
                record.key,
            )
            signals.lease_lost.send(app, record=record)
        elif values["state"] == State.COMPLETED.value:
            signals.record_completed.send(app, record=record)
        else:
            signals.record_failed.send(app, record=record, retryable=values["retryable"])


def _lease(state: AppState, seconds: float) -> dict[str, Any]:
    """A new lease: a fresh fencing token, valid for ``seconds`` from now."""
    now = state.clock()
    return {"lease_token": secrets.token_hex(16), "locked_until": now + timedelta(seconds=seconds), "updated_at": now}


def _new_record(record: ClaimedRecord, lease: dict[str, Any]) -> dict[str, Any]:
    """The row that claims a key nobody holds: IN_PROGRESS under ``lease``, first attempt."""
    now = lease["updated_at"]
    return {
        **lease,
        "scope": record.scope,
        "key": record.key,
        "request_hash": record.request_hash,
        "method": record.method,
        "path": record.path,
        "endpoint": record.endpoint,
        "state": State.IN_PROGRESS.value,
        "retryable": False,
        "attempts": 1,
        "event_count": 0,
        "created_at": now,
        "expires_at": now + timedelta(seconds=record.options.ttl),
    }


def _describe(exc: BaseException | None) -> str | None:
    if exc is None:
        return None
    return f"{type(exc).__name__}: {exc}"[:2000]


def _db_error(exc: BaseException) -> str:
    """An error for the log without SQLAlchemy's ``[SQL: ...] [parameters: ...]``: parameters carry bodies."""
    orig = getattr(exc, "orig", None) or exc
    lines = str(orig).strip().splitlines()
    return f"{type(orig).__name__}: {lines[0] if lines else ''}"[:500]


def _is_lock_wait(exc: BaseException) -> bool:
    """SQLite's busy timeout ran out: another connection holds the write lock (an atomic owner)."""
    return "database is locked" in str(getattr(exc, "orig", ""))


def _rollback_quietly(state: AppState) -> None:
    try:
        state.db.session.rollback()
    except sa.exc.SQLAlchemyError as exc:
        logger.warning("rollback failed: %s", _db_error(exc))


class _CommitGuard:
    """Refuses ``db.session.commit()`` inside an atomic view: the layer commits once, with the outcome."""

    def __init__(self) -> None:
        self._installed: weakref.WeakSet[Any] = weakref.WeakSet()

    def install(self, db: SQLAlchemy) -> None:
        if db not in self._installed:
            self._installed.add(db)
            sa.event.listen(db.session, "before_commit", self._before_commit)

    @staticmethod
    def _before_commit(session: Any) -> None:
        if not has_request_context():
            return
        record = get_current()
        # The layer's own commit happens after it marked the record settled.
        if record is not None and record.claimed and record.atomic and not record.settled:
            raise AtomicViewCommitted(
                "an atomic=True view must not commit db.session: the layer commits its writes with the outcome"
            )


_GUARD = _CommitGuard()
