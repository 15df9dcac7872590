"""The request pipeline: claim or answer before the view, store the outcome after it (the README's "Behaviour"
tables). ``Idempotency.init_app`` registers :func:`before_request`, :func:`after_request` and
:func:`teardown_request`; every rule they follow comes from ``machine.py`` and every statement from ``store.py``.
"""

from __future__ import annotations

import logging
import secrets
import time
import weakref
from collections.abc import Mapping
from typing import Any

import sqlalchemy as sa
from flask import Response, current_app, has_request_context, request
from flask.typing import ResponseReturnValue
from sqlalchemy.engine import Row
from werkzeug.exceptions import HTTPException, InternalServerError
from werkzeug.wrappers import Response as BaseResponse

from . import signals
from .constants import REPLAYED_HEADER, UNSAFE_METHODS, ConfigKey, EventKind, State
from .context import UNSET, RecordView, RequestContext, get_current, set_current
from .decorator import RouteOptions, options_of, view_exception
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
from .machine import (
    CLAIMING,
    Claim,
    Command,
    Decision,
    claim_existing,
    claim_new,
    classify_exception,
    classify_status,
    decide,
    outcome,
)
from .state import AppState, app_state
from .store import Executor

logger = logging.getLogger("flask_idempotent")

#: Client-caused events (conflicts, in-progress and stale hits) stored per record; later ones are only counted.
MAX_CLIENT_EVENTS_PER_RECORD = 20
_CLAIM_ATTEMPTS = 5
#: Fresh connections tried to re-read a claim whose reply was lost, before answering 503.
_REREAD_ATTEMPTS = 3

_Answer = tuple[Decision | None, Row[Any] | None]


def _app() -> Any:
    return current_app._get_current_object()  # type: ignore[attr-defined]


# before_request: claim or answer ----------------------------------------------------------------------------


def _route_options(state: AppState) -> RouteOptions | None:
    if request.method not in UNSAFE_METHODS or request.endpoint is None:
        return None
    view = current_app.view_functions.get(request.endpoint)
    route = options_of(view)
    if route is None and state.protect_all and view is not None:
        route = RouteOptions()
    if route is None or route.exempt:
        return None
    return route


def _load_scope(state: AppState) -> str:
    loader = state.callbacks.scope_loader
    owner = loader() if loader is not None else None
    scope = "" if owner is None else str(owner)
    if len(scope) > 255:
        raise ValueError("the scope_loader returned a scope longer than 255 characters")
    return scope


def before_request() -> ResponseReturnValue | None:
    state = app_state()
    route = _route_options(state)
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
    scope = _load_scope(state)
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
    ctx = RequestContext(
        state=state,
        options=options,
        command=Command(
            scope=scope,
            key=key,
            request_hash=hash_command(command),
            method=request.method,
            path=request.path,
            endpoint=request.endpoint,
        ),
    )
    set_current(ctx)
    state.check_schema()
    return _claim(ctx)


def _claim(ctx: RequestContext) -> ResponseReturnValue | None:
    state, options = ctx.state, ctx.options
    deadline = time.monotonic() + options.wait
    delay = 0.02
    while True:
        decision, row = _claim_once(ctx)
        if decision is None:
            signals.record_claimed.send(_app(), record=ctx.view())
            return None
        if decision is Decision.REPLAY:
            assert row is not None
            return _replay(ctx, row)
        if decision is Decision.CONFLICT:
            assert row is not None
            _client_event(ctx, row, EventKind.CONFLICT)
            signals.key_conflict.send(_app(), record=RecordView.of(row._mapping))
            raise KeyReused(
                f"This {state.header} was first used for {row.method} {row.path} with a different request."
                " Use a new key for a new request."
            )
        if decision is Decision.STUCK:
            assert row is not None
            _client_event(ctx, row, EventKind.STALE_HIT)
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
            _client_event(ctx, row, EventKind.IN_PROGRESS_HIT)
        raise RequestInProgress(
            "A request with this key is still being processed. Retry after the time in Retry-After.",
            retry_after=state.retry_after,
            status=options.in_progress_status,
        )


def _claim_once(ctx: RequestContext) -> _Answer:
    state = ctx.state
    # One lease token per claim: whatever row carries it was written by this call, which is how a claim
    # whose reply was lost finds out that it did commit.
    token = secrets.token_hex(16)
    try:
        if ctx.atomic:
            # Core statements on the session's connection: the view's transaction, without ORM execution.
            decision, row = _decide_and_claim(ctx, state.db.session.connection(), token)
            if decision is not None:
                _rollback_quietly(state)  # hold no transaction while answering or polling
            return decision, row
        with state.engine.connect() as conn:
            return _decide_and_claim(ctx, conn, token)
    except (sa.exc.DBAPIError, sa.exc.TimeoutError) as exc:
        if ctx.atomic:
            _rollback_quietly(state)  # the claim was in the rolled-back transaction: nothing was written
        if _is_lock_wait(exc):
            return Decision.IN_PROGRESS, None
        if not ctx.atomic and _recover_lost_claim(ctx, token):
            return None, None
        logger.error("idempotency store unavailable while claiming %r: %s", ctx.command.key, _db_error(exc))
        raise StoreUnavailable(
            "The idempotency store cannot be reached, so the request was not run. Retry later.",
            retry_after=state.retry_after,
        ) from exc


def _recover_lost_claim(ctx: RequestContext, token: str) -> bool:
    """After an error during a leased claim, find out whether the claim committed anyway (its reply was lost).

    The record carries this claim's lease token only if the claim's write reached the database: then this
    request owns the key and goes on. Otherwise the key was never taken by it, and the answer is 503.
    """
    state, command = ctx.state, ctx.command
    for _ in range(_REREAD_ATTEMPTS):
        try:
            with state.engine.connect() as conn:
                row = state.store.find(conn, command.scope, command.key)
        except (sa.exc.DBAPIError, sa.exc.TimeoutError):
            continue
        if row is None or row.lease_token != token:
            return False
        logger.warning("the reply to the claim of record %s (%r) was lost; it had committed", row.id, command.key)
        resumes = row.attempts > 1
        ctx.record_id, ctx.lease_token, ctx.version, ctx.attempt = row.id, token, row.version, row.attempts
        if resumes:
            ctx.recovery_point, ctx.recovery_data = row.recovery_point, row.recovery_data
        return True
    logger.error("could not re-read the claim of %r: if it committed, it shows as stuck", command.key)
    return False


def _decide_and_claim(ctx: RequestContext, conn: Executor, token: str) -> _Answer:
    store, options, command = ctx.state.store, ctx.options, ctx.command
    # An atomic owner's claim stays uncommitted until its view returns; duplicates must neither run nor block
    # on its row, so in atomic mode the read also takes a transaction-scoped lock on the key (PostgreSQL).
    if ctx.atomic:
        locked, row = store.find_and_lock(conn, command.scope, command.key)
    else:
        locked, row = True, store.find(conn, command.scope, command.key)
    if not locked:
        # Another transaction holds the key: answer from the committed row when that needs no claim
        # (replay, conflict); anything that would claim must wait for the holder.
        # (No in-progress event then: the holder may have the row locked.)
        decision = None if row is None else decide(row._mapping, command.request_hash, options.on_stale)
        if decision is None or decision in CLAIMING:
            return Decision.IN_PROGRESS, None
        return decision, row
    for _ in range(_CLAIM_ATTEMPTS):
        if row is None:
            claim = claim_new(command, token)
            record_id = store.insert(conn, claim, lease=options.lease, ttl=options.ttl)
            if record_id is not None:
                _claimed(ctx, record_id, 1, claim, None)
                return None, None
            row = store.find(conn, command.scope, command.key)  # another request inserted it meanwhile
            continue
        decision = decide(row._mapping, command.request_hash, options.on_stale)
        if decision not in CLAIMING:
            return decision, row
        claim = claim_existing(decision, row._mapping, command, token)
        if store.reclaim(conn, row.id, row.version, claim, lease=options.lease, ttl=options.ttl):
            _claimed(ctx, row.id, row.version + 1, claim, row._mapping)
            if decision is Decision.TAKEOVER:
                store.add_event(
                    conn,
                    record_id=row.id,
                    scope=row.scope,
                    key=row.key,
                    kind=EventKind.TAKEOVER,
                    detail={"attempt": claim.attempt},
                )
            return None, None
        row = store.find(conn, command.scope, command.key)
    return Decision.IN_PROGRESS, row  # heavy contention on one key: answer as in progress


def _claimed(
    ctx: RequestContext, record_id: int, version: int, claim: Claim, previous: Mapping[Any, Any] | None
) -> None:
    ctx.record_id = record_id
    ctx.lease_token = claim.values["lease_token"]
    ctx.version = version
    ctx.attempt = claim.attempt
    ctx.previous = previous
    ctx.claim = claim
    if previous is not None and claim.resumes:
        ctx.recovery_point = previous["recovery_point"]
        ctx.recovery_data = previous["recovery_data"]


def _client_event(ctx: RequestContext, row: Row[Any], kind: EventKind) -> None:
    """Store an event a client caused, up to the per-record cap; past it the event is only counted."""
    state, command = ctx.state, ctx.command
    detail = {
        "method": command.method,
        "path": command.path,
        "endpoint": command.endpoint,
        "request_hash": command.request_hash,
    }
    try:
        with state.engine.connect() as conn:
            state.store.add_client_event(conn, record=row, kind=kind, detail=detail, cap=MAX_CLIENT_EVENTS_PER_RECORD)
    except sa.exc.SQLAlchemyError as exc:  # the answer matters more than its audit trail
        logger.warning("could not store %s event for record %s: %s", kind.value, row.id, _db_error(exc))


def _replay(ctx: RequestContext, row: Row[Any]) -> Response:
    if row.response_status is None:
        # Marked failed by an operator before any response was stored.
        raise RequestFailed("An operator marked the request with this key as failed; it will not run again.")
    headers = [(name, value) for name, value in (row.response_headers or [])]
    replay = ctx.options.replay
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
    signals.response_replayed.send(_app(), record=RecordView.of(row._mapping))
    return response


# after_request and teardown_request: the outcome ------------------------------------------------------------


def after_request(response: BaseResponse) -> BaseResponse:
    ctx = get_current()
    if ctx is None or not ctx.claimed or ctx.settled:
        return response
    exc = view_exception()
    if exc is not None and isinstance(exc, ctx.options.transient):
        state, retryable = State.FAILED, True
    else:
        state, retryable = classify_status(response.status_code, atomic=ctx.atomic)
    return _settle(ctx, response, state, retryable, error=_describe(exc))


def teardown_request(exc: BaseException | None) -> None:
    ctx = get_current()
    if ctx is None or not ctx.claimed or ctx.settled:
        return
    # The request ended in an exception that skipped after_request (e.g. PROPAGATE_EXCEPTIONS).
    exc = exc or view_exception() or InternalServerError()
    retryable = classify_exception(exc, ctx.options.transient, atomic=ctx.atomic)
    status = exc.code if isinstance(exc, HTTPException) and exc.code else 500
    fallback = InternalServerError().get_response() if not isinstance(exc, HTTPException) else exc.get_response()
    try:
        _settle(ctx, fallback, State.FAILED, retryable, error=_describe(exc), status=status)
    except Exception as error:  # teardown must not raise
        logger.error("could not settle idempotency record %s: %s", ctx.record_id, _db_error(error))


def _settle(
    ctx: RequestContext,
    response: BaseResponse,
    state: State,
    retryable: bool,
    *,
    error: str | None,
    status: int | None = None,
) -> BaseResponse:
    app = ctx.state
    ctx.settled = True
    has_resource = ctx.resource_ref is not UNSET
    if response.direct_passthrough:
        response.direct_passthrough = False  # buffer it: the body is stored
    body: bytes | None = None
    if not (has_resource and ctx.options.replay is not None):
        body = response.get_data()
        if len(body) > app.max_response_bytes:
            # Never store a truncated body: replays answer 500 response-not-stored instead (see _replay).
            error = error or f"response body of {len(body)} bytes exceeds {ConfigKey.MAX_RESPONSE_BYTES}"
            body = None
    values = outcome(
        state,
        retryable,
        status=status or response.status_code,
        headers=[[n, v] for n, v in response.headers.items() if n.lower() in app.replay_headers],
        body=body,
        resource_ref=ctx.resource_ref if has_resource else None,
        error=error,
    )
    if ctx.atomic:
        return _settle_atomic(ctx, response, values)
    assert ctx.record_id is not None and ctx.lease_token is not None
    try:
        with app.engine.connect() as conn:
            stored = app.store.settle(conn, ctx.record_id, ctx.version, ctx.lease_token, values)
    except sa.exc.SQLAlchemyError as exc:
        # The view ran; the record stays IN_PROGRESS and shows up as stuck once its lease ends.
        logger.error("could not store the outcome of record %s: %s", ctx.record_id, _db_error(exc))
        return response
    if stored:
        ctx.version += 1
    _after_settle(ctx, stored, values)
    return response


def _settle_atomic(ctx: RequestContext, response: BaseResponse, values: dict[str, Any]) -> BaseResponse:
    state = ctx.state
    session = state.db.session
    if values["state"] == State.COMPLETED.value:
        try:
            assert ctx.record_id is not None and ctx.lease_token is not None
            if not state.store.settle(session.connection(), ctx.record_id, ctx.version, ctx.lease_token, values):
                raise AtomicViewCommitted("the view rolled back db.session, losing the idempotency claim")
            session.commit()
            ctx.version += 1
        except AtomicViewCommitted as exc:
            logger.error("atomic view %s: %s", ctx.command.endpoint, exc)
            _rollback_quietly(state)
            values.update(
                state=State.FAILED.value,
                retryable=True,
                error=_describe(exc),
                response_body=None,
                response_status=500,
            )
            _store_atomic_failure(ctx, values)
            return InternalServerError().get_response()
        except sa.exc.SQLAlchemyError as exc:
            logger.error("could not commit atomic request %s: %s", ctx.record_id, _db_error(exc))
            _rollback_quietly(state)
            return StoreUnavailable(  # type: ignore[return-value]
                "The request could not be committed. Retrying with the same key is safe: its writes and its"
                " outcome are committed together or not at all.",
                retry_after=state.retry_after,
            ).get_response()
        _after_settle(ctx, True, values)
        return response
    # Any FAILED outcome: the view's writes are rolled back, so a retry can never apply them twice.
    _rollback_quietly(state)
    values["retryable"] = True
    _store_atomic_failure(ctx, values)
    return response


def _store_atomic_failure(ctx: RequestContext, values: dict[str, Any]) -> None:
    """After the rollback, record the FAILED (retryable) outcome in a transaction of its own.

    The rollback undid the claim too, so the claim is made again (against the row as it was before it, by its
    version) and settled with the outcome, both in one transaction.
    """
    state, store, claim, options = ctx.state, ctx.state.store, ctx.claim, ctx.options
    assert isinstance(claim, Claim) and ctx.lease_token is not None
    try:
        with state.db.engine.begin() as conn:
            if ctx.previous is None:
                record_id = store.insert(conn, claim, lease=options.lease, ttl=options.ttl)
                version = 1
            else:
                record_id, version = int(ctx.previous["id"]), int(ctx.previous["version"])
                if not store.reclaim(conn, record_id, version, claim, lease=options.lease, ttl=options.ttl):
                    record_id = None
                version += 1
            stored = record_id is not None and store.settle(conn, record_id, version, ctx.lease_token, values)
    except sa.exc.SQLAlchemyError as exc:
        logger.warning("could not store the failure of atomic record %s: %s", ctx.command.key, _db_error(exc))
        return
    if stored:
        ctx.record_id, ctx.version = record_id, version + 1
    _after_settle(ctx, stored, values)


def _after_settle(ctx: RequestContext, stored: bool, values: Mapping[str, Any]) -> None:
    app = _app()
    view = ctx.view(values["state"], bool(values["retryable"]), values["response_status"])
    if not stored:
        logger.warning(
            "record %s (%s) lost its lease before its outcome was stored; the newer owner's outcome stands",
            ctx.record_id,
            ctx.command.key,
        )
        signals.lease_lost.send(app, record=view)
    elif values["state"] == State.COMPLETED.value:
        signals.record_completed.send(app, record=view)
    else:
        signals.record_failed.send(app, record=view, retryable=values["retryable"])


# Helpers ----------------------------------------------------------------------------------------------------


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


class CommitGuard:
    """Refuses ``db.session.commit()`` inside an atomic view: the layer commits once, with the outcome."""

    def __init__(self) -> None:
        self._installed: weakref.WeakSet[Any] = weakref.WeakSet()

    def install(self, db: Any) -> None:
        if db not in self._installed:
            self._installed.add(db)
            sa.event.listen(db.session, "before_commit", self._before_commit)

    @staticmethod
    def _before_commit(session: Any) -> None:
        if not has_request_context():
            return
        ctx = get_current()
        # The layer's own commit happens after it marked the record settled.
        if ctx is not None and ctx.claimed and ctx.atomic and not ctx.settled:
            raise AtomicViewCommitted(
                "an atomic=True view must not commit db.session: the layer commits its writes with the outcome"
            )


COMMIT_GUARD = CommitGuard()
