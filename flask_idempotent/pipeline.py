"""The request pipeline: claim or answer before the view, store the outcome after it (the docs' "Behaviour"
tables). ``Idempotency.init_app`` registers :func:`before_request`, :func:`after_request` and
:func:`teardown_request`; every rule they follow comes from ``machine.py`` and every statement from ``store.py``.
"""

from __future__ import annotations

import logging
import time
import uuid
import weakref
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from flask import Response, current_app, has_request_context, request
from flask.typing import ResponseReturnValue
from sqlalchemy.engine import Row
from werkzeug.exceptions import HTTPException, InternalServerError, NotFound
from werkzeug.wrappers import Response as BaseResponse

from . import binds, dberrors, signals
from .constants import REPLAYED_HEADER, UNSAFE_METHODS, ConfigKey, EventKind, State
from .context import UNSET, RecordView, RequestContext, get_current, set_current
from .dberrors import LOST_RACE_ATTEMPTS, STORE_ERRORS, is_lock_wait, lost_race, pause_after_lost_race, retry_lost_race
from .decorator import (
    RouteOptions,
    hidden,
    is_watched,
    marked_twice,
    misplaced,
    route_options,
    watch,
)
from .errors import (
    AtomicViewCommitted,
    BodyTooLargeToFingerprint,
    CommitConflict,
    CommitFailed,
    IdempotencyError,
    InvalidKey,
    KeyReused,
    MissingKey,
    RecordStuck,
    RequestFailed,
    RequestInProgress,
    ResourceGone,
    ResponseNotStored,
    ScopeError,
    StoreUnavailable,
    problem_class,
)
from .fingerprint import BodyTooLarge, custom_command, hash_command, limit_body, request_fingerprint
from .keys import KeyFormatError, parse_key
from .machine import (
    ANSWERS,
    Claim,
    Command,
    Decision,
    classify_exception,
    classify_response,
    decide,
    existing_claim,
    keeps_view_writes,
    lease_holder,
    new_claim,
    new_lease_token,
    outcome,
)
from .models import storable_text
from .state import AppState, Resolved, app_state
from .store import dialect_of

logger = logging.getLogger("flask_idempotent")

#: Client-caused events (conflicts, in-progress and stale hits) stored per record; later ones are only counted.
MAX_CLIENT_EVENTS_PER_RECORD = 20
_CLAIM_ATTEMPTS = 5
#: Fresh connections tried to re-read a claim whose reply was lost, before answering 503.
_REREAD_ATTEMPTS = 3


@dataclass(frozen=True)
class Claimed:
    """What :func:`claim` came to when the request took its key: its context holds the claim; the view runs."""


CLAIMED = Claimed()


@dataclass(frozen=True)
class Answered:
    """What :func:`claim` came to when the request may not take its key: the decision that answers it
    (``machine.ANSWERS``) and the record as read (``None`` for an in-progress answer that read nothing)."""

    decision: Decision
    row: Row[Any] | None


ClaimResult = Claimed | Answered


def _app() -> Any:
    return current_app._get_current_object()  # type: ignore[attr-defined]


# before_request: claim or answer ----------------------------------------------------------------------------


def _check_views(state: AppState) -> None:
    """Once per app, on its first request: refuse to serve with a view ``@idempotent`` cannot protect."""
    if state.views_checked:
        return
    wrong = misplaced(current_app.view_functions)
    if wrong:
        raise RuntimeError(
            f"@idempotent is placed above the route decorator on {', '.join(wrong)}: the route registered the"
            " unprotected function. Put @idempotent below @app.route/@app.post (closest to the function)."
        )
    twice = marked_twice(current_app.view_functions)
    if twice:
        raise RuntimeError(
            f"@idempotent is on the class-based view of {', '.join(twice)} (View.decorators) and on one of its"
            " methods too: keep one of them."
        )
    unreached = hidden(current_app.view_functions)
    if unreached:
        raise RuntimeError(
            f"@idempotent functions that no registered endpoint reaches: {'; '.join(unreached)}. A decorator"
            " placed on top of @idempotent hides it unless it uses functools.wraps: the route would run the view"
            " unprotected. Decorate the wrapper with @functools.wraps(view), or move @idempotent above that decorator."
        )
    state.views_checked = True


def _route_options(state: AppState) -> RouteOptions | None:
    if request.method not in UNSAFE_METHODS or request.endpoint is None:
        return None
    view = current_app.view_functions.get(request.endpoint)
    route = route_options(view, request.method)
    if route is None and state.protect_all and view is not None:
        route = RouteOptions()
        if not is_watched(view):  # so that only what the view body produced becomes an outcome
            current_app.view_functions[request.endpoint] = watch(view)
    if route is None or route.exempt:
        return None
    return route


def _request_key(state: AppState, options: Resolved) -> str | None:
    """The request's key: the route's ``key=`` callable's, else the key header's. ``None``: unprotected."""
    if options.key is not None:
        found = current_app.ensure_sync(options.key)()
        if found is not None and not isinstance(found, str):
            # Checked like the header: the value often comes from the client's body (``{"id": 12345}``).
            raise InvalidKey(f"The request's idempotency key is a {type(found).__name__}, not a string.")
        lines, where = ([] if found is None else [found]), "The request's idempotency key"
    else:
        lines, where = request.headers.getlist(state.header), state.header
    if not lines:
        if options.required:
            raise MissingKey(
                f"This request needs an {state.header} header: a unique value per operation."
                if options.key is None
                else "This request carries no idempotency key where the route expects one."
            )
        return None
    try:
        return parse_key(lines, header=options.key is None)
    except KeyFormatError as exc:
        raise InvalidKey(f"{where}: {exc}.") from None


def _describe_command(options: Resolved) -> str | None:
    """The route's ``describe=`` summary for operators; a failing one is logged, never fails the request."""
    if options.describe is None:
        return None
    try:
        summary = current_app.ensure_sync(options.describe)()
    except Exception:
        logger.exception("idempotent(describe=...) raised; the record is stored without a summary")
        return None
    return None if summary is None else storable_text(str(summary), 255)


def _load_scope(state: AppState) -> str:
    """The scope the app's loader names: ``str``, ``int`` or ``UUID`` (``None``: the global scope ``""``)."""
    loader = state.callbacks.scope_loader
    if loader is None:
        return ""
    try:
        owner = current_app.ensure_sync(loader)()
    except HTTPException:
        raise  # the loader answered itself (abort(401)): the app's decision
    except Exception as exc:
        logger.exception("the scope_loader raised; the request was not run")
        raise ScopeError(f"The scope_loader raised {type(exc).__name__}; the request was not run.") from exc
    if owner is None:
        return ""
    if isinstance(owner, bool) or not isinstance(owner, (str, int, uuid.UUID)):
        # str() of an arbitrary object (a user row) would make a new scope per request: never guess.
        message = f"the scope_loader returned a {type(owner).__name__}; return an id (str, int or UUID) or None"
        logger.error(message)
        raise ScopeError(f"The app's idempotency set-up is wrong: {message}.")
    scope = str(owner)
    if len(scope) > 255:
        logger.error("the scope_loader returned a scope longer than 255 characters")
        raise ScopeError("The app's idempotency set-up is wrong: the scope is longer than 255 characters.")
    if storable_text(scope) != scope:  # scopes compare byte for byte: an escaped one could meet another's
        logger.error("the scope_loader returned a scope with a NUL or a lone surrogate, which no store can hold")
        raise ScopeError("The app's idempotency set-up is wrong: the scope holds a NUL or a lone surrogate.")
    return scope


def before_request() -> ResponseReturnValue | None:
    """A protected request claims its key (``None``: the view runs), or is answered: a replay or a problem."""
    state = app_state()
    if not state.enabled:
        return None  # IDEMPOTENCY_ENABLED = False: no claim, so after_request and teardown do nothing either
    _check_views(state)
    route = _route_options(state)
    if route is None:
        return None
    options = state.resolve(route)
    key = _request_key(state, options)
    if key is None:
        return None
    ctx = RequestContext(state=state, options=options, command=_command(state, options, key))
    set_current(ctx)
    state.check_schema()
    state.replays.write_due()
    return _claim_and_report(ctx)


def _command(state: AppState, options: Resolved, key: str) -> Command:
    """What this request's claim stands for: its scope and key, the fingerprint of its command, where it went."""
    scope = options.scope if options.scope is not None else _load_scope(state)
    try:
        if options.fingerprint is not None:
            limit_body(request, max_body_bytes=state.max_body_bytes)  # the callable may read the body
            command = custom_command(request, current_app.ensure_sync(options.fingerprint)())
        else:
            command = request_fingerprint(
                request, headers=state.fingerprint_headers, max_body_bytes=state.max_body_bytes
            )
    except BodyTooLarge:
        raise BodyTooLargeToFingerprint(
            f"The body is larger than {state.max_body_bytes} bytes, the most an idempotent request may carry."
        ) from None
    return Command(
        scope=scope,
        key=key,
        request_hash=hash_command(command),
        method=request.method,
        path=storable_text(request.path),  # ``%00`` in a path variable is NUL: see storable_text
        endpoint=request.endpoint,
        summary=_describe_command(options),
    )


def claim_key(state: AppState, options: Resolved, command: Command) -> tuple[RequestContext, Answered | None]:
    """Claim ``command``'s key for code that is not a request (``tasks.run_once``), without waiting.

    Returns the context that holds the claim and ``None``, or the context and the answer (its client event,
    if the answer has one, already stored). The caller stores the outcome with :func:`store_outcome`.
    """
    ctx = RequestContext(state=state, options=options, command=command)
    state.check_schema()
    result = claim(ctx)
    if isinstance(result, Claimed):
        return ctx, None
    _note_answer(ctx, result)
    return ctx, result


#: What a protected request's claim came to, by the exception that answered it (metrics' ``outcome``).
_OUTCOMES: tuple[tuple[type[BaseException], str], ...] = (
    (KeyReused, "key_reused"),
    (RecordStuck, "stuck"),
    (RequestInProgress, "in_progress"),
    (StoreUnavailable, "store_unavailable"),
    (RequestFailed, "replayed"),
    (ResponseNotStored, "replayed"),
    (ResourceGone, "replayed"),
)


def _claim_and_report(ctx: RequestContext) -> ResponseReturnValue | None:
    """Claim or answer, then send ``request_outcome`` (what metrics count) with the claim's duration."""
    started = time.perf_counter()
    outcome_name: str | None = "error"
    try:
        answer = _claim_or_answer(ctx)
        # Claimed: "executed" is reported once the view body ran (or "rejected" if a hook answered first).
        outcome_name = None if answer is None else "replayed"
        return answer
    except BaseException as exc:
        outcome_name = next((name for kind, name in _OUTCOMES if isinstance(exc, kind)), "error")
        raise
    finally:
        ctx.note_claim_time(time.perf_counter() - started)
        if outcome_name is not None:
            if outcome_name == "replayed":
                ctx.state.replays.add()  # the overview's chart (metrics count it from the signal below)
            _report(ctx, outcome_name)


def _report(ctx: RequestContext, outcome_name: str) -> None:
    signals.request_outcome.send(
        _app(),
        outcome=outcome_name,
        endpoint=ctx.command.endpoint,
        kind=ctx.command.kind,
        claim_seconds=ctx.claim_seconds,
    )


def _claim_or_answer(ctx: RequestContext) -> ResponseReturnValue | None:
    """Claim the key (``None``: the view runs), polling while another request holds it, up to the route's
    ``wait``; else the answer."""
    deadline = time.monotonic() + ctx.options.wait
    delay = 0.02
    while True:
        result = claim(ctx)
        if isinstance(result, Claimed):
            signals.record_claimed.send(_app(), record=ctx.record_view())
            return None
        remaining = deadline - time.monotonic()
        if result.decision is Decision.IN_PROGRESS and remaining > 0:
            # Poll until the owner finishes or the wait runs out.
            time.sleep(min(delay, remaining))
            delay = min(delay * 2, 0.25)
            continue
        return _answer(ctx, result)


def _note_answer(ctx: RequestContext, answered: Answered) -> None:
    """Store the client-caused event of an answer (``machine.ANSWERS``), if it has one and read a record."""
    event = ANSWERS[answered.decision].event
    if answered.row is not None and event is not None:
        client_event(ctx, answered.row, event)


def _answer(ctx: RequestContext, answered: Answered) -> Response:
    """The answer to a request that may not claim its key (``machine.ANSWERS``): the replay, or its problem."""
    decision, row = answered.decision, answered.row
    state, rule = ctx.state, ANSWERS[decision]
    if rule.problem is None:
        assert row is not None
        return _replay(ctx, row)
    _note_answer(ctx, answered)
    if decision is Decision.CONFLICT:
        assert row is not None
        signals.key_conflict.send(_app(), record=RecordView.of(row._mapping))
        detail = (
            f"This {state.header} was first used for {row.method} {row.path} with a different request."
            " Use a new key for a new request."
        )
    elif decision is Decision.STUCK:
        assert row is not None
        logger.warning(
            "record %s (key %r, scope %r) is stuck: its lease (held by %s) expired without an outcome;"
            " answered 409 stuck until an operator decides",
            row.id,
            row.key,
            row.scope,
            lease_holder(row.lease_token) or "an unnamed process",
        )
        detail = (
            "The first request with this key stopped without recording an outcome. It may have had an"
            " effect, so it is not run again until an operator decides."
        )
    else:
        detail = "A request with this key is still being processed. Retry after the time in Retry-After."
    later = rule.retry_later  # an in-progress answer: when to retry, in the route's status (409 or 202)
    raise problem_class(rule.problem)(
        detail,
        retry_after=state.retry_after if later else None,
        status=ctx.options.in_progress_status if later else None,
    )


def claim(ctx: RequestContext) -> ClaimResult:
    """Try once to claim the context's key: :data:`CLAIMED`, or the :class:`Answered` that says why not.

    A statement that lost a race is decided again (a few times); a claim whose reply was lost is found again by
    its lease token; any other database error is 503 :class:`StoreUnavailable`.
    """
    state = ctx.state
    # One lease token per claim: whatever row carries it was written by this call, which is how a claim
    # whose reply was lost finds out that it did commit.
    write = _ClaimWrite(new_lease_token())
    for attempt in range(LOST_RACE_ATTEMPTS):
        try:
            if ctx.atomic:
                # Core statements on the session's connection: the view's transaction, without ORM execution.
                result = _claim_on(ctx, state.session_connection(), write)
                if isinstance(result, Answered):
                    _rollback_quietly(state)  # hold no transaction while answering or polling
                return result
            with state.engine.connect() as conn:
                return _claim_on(ctx, conn, write)
        except STORE_ERRORS as exc:
            if ctx.atomic:
                _rollback_quietly(state)  # the claim was in the rolled-back transaction: nothing was written
            if not lost_race(exc):
                return _claim_failed(ctx, write, exc)
            # The database aborted a statement that lost a race with another request's (SERIALIZABLE, a
            # deadlock, a Galera certification failure): it wrote nothing, so deciding again is safe.
            if ctx.claimed and not ctx.atomic:
                return CLAIMED  # the claim had committed; what lost came after it (the takeover's event)
            ctx.unclaim()
            logger.info("the claim of %r lost a race (%s); deciding again", ctx.command.key, _db_error(exc))
            if attempt + 1 < LOST_RACE_ATTEMPTS:
                pause_after_lost_race(attempt)
    logger.warning("the claim of %r kept losing races; answering as a duplicate", ctx.command.key)
    return _as_duplicate(ctx)


def _as_duplicate(ctx: RequestContext) -> Answered:
    """What a request that could not claim its key is told: what the record says, read now, else in progress."""
    state, command = ctx.state, ctx.command
    try:
        with state.engine.connect() as conn:
            row = state.store.find(conn, command.scope, command.key)
    except STORE_ERRORS:
        return Answered(Decision.IN_PROGRESS, None)
    return _answered_without_claim(ctx, row)


def _answered_without_claim(ctx: RequestContext, row: Row[Any] | None) -> Answered:
    """The answer from the committed ``row`` when this request may not claim now: a key nobody holds (no
    record, or one a claim could take) is "in progress" too: a retry after ``Retry-After`` decides again."""
    decision = None if row is None else decide(row._mapping, ctx.command.request_hash, ctx.options.on_stale)
    if decision is None or decision.claims:
        return Answered(Decision.IN_PROGRESS, None)
    return Answered(decision, row)


@dataclass
class _ClaimWrite:
    """The claim a request is writing, kept in case the write's reply is lost (see :func:`_recover_lost_claim`).

    ``token`` is the claim's lease token; ``claim`` and ``previous`` (the row as read before it, ``None`` for a
    new record) are those of its latest claiming statement.
    """

    token: str
    claim: Claim | None = None
    previous: Mapping[Any, Any] | None = None


def _claim_failed(ctx: RequestContext, write: _ClaimWrite, exc: Exception) -> ClaimResult:
    """The claim met a database error other than a lost race: 503, unless a leased claim did commit."""
    state = ctx.state
    if is_lock_wait(exc):
        # SQLite: another connection held the write lock past the busy timeout. Nothing was claimed, and
        # nothing says the key is in progress (it may be brand new): the store is busy, retry later.
        logger.warning("idempotency store busy (locked) while claiming %r", ctx.command.key)
        raise StoreUnavailable(
            "The idempotency store is busy, so the request was not run. Retry after the time in Retry-After.",
            retry_after=state.retry_after,
        ) from exc
    if not ctx.atomic and _recover_lost_claim(ctx, write):
        return CLAIMED
    logger.error("idempotency store unavailable while claiming %r: %s", ctx.command.key, _db_error(exc))
    raise StoreUnavailable(
        "The idempotency store cannot be reached, so the request was not run. Retry later.",
        retry_after=state.retry_after,
    ) from exc


def _recover_lost_claim(ctx: RequestContext, write: _ClaimWrite) -> bool:
    """After an error during a leased claim, find out whether the claim committed anyway (its reply was lost).

    The record carries this claim's lease token only if the claim's write reached the database: then this
    request owns the key and goes on, its claim filled in as if the reply had come (so a hook that answers
    before the view withdraws it like any other). Otherwise the key was never taken by it, and the answer is 503.
    """
    state, command = ctx.state, ctx.command
    for _ in range(_REREAD_ATTEMPTS):
        try:
            with state.engine.connect() as conn:
                row = state.store.find(conn, command.scope, command.key)
        except STORE_ERRORS:
            continue
        if row is None or row.lease_token != write.token or write.claim is None:
            return False
        logger.warning("the reply to the claim of record %s (%r) was lost; it had committed", row.id, command.key)
        ctx.claimed_by(row.id, row.version, write.claim, write.previous)
        return True
    logger.error("could not re-read the claim of %r: if it committed, it shows as stuck", command.key)
    return False


def _claim_on(ctx: RequestContext, conn: sa.Connection, write: _ClaimWrite) -> ClaimResult:
    """One claim on ``conn``: insert the key's record, or decide on the record found and take it (compare and
    set on its version) when the decision claims."""
    store, options, command = ctx.state.store, ctx.options, ctx.command
    # An atomic owner's claim stays uncommitted until its view returns; duplicates must neither run nor block
    # on its row, so in atomic mode the read also takes a transaction-scoped lock on the key (PostgreSQL).
    claim = new_claim(command, write.token)
    if dialect_of(conn) == "postgresql":
        # A first request is the common case: claim with one INSERT, read the record only if the key is taken.
        write.claim, write.previous = claim, None
        record_id = store.insert_claim(conn, claim, lease=options.lease, ttl=options.ttl, lock=ctx.atomic)
        if record_id is not None:
            ctx.claimed_by(record_id, 1, claim, None)
            return CLAIMED
    if ctx.atomic:
        locked, row = store.find_and_lock(conn, command.scope, command.key)
    else:
        locked, row = True, store.find(conn, command.scope, command.key)
    if not locked:
        # Another transaction holds the key: answer from the committed row when that needs no claim
        # (replay, conflict); anything that would claim must wait for the holder.
        # (No in-progress event then: the holder may have the row locked.)
        return _answered_without_claim(ctx, row)
    for _ in range(_CLAIM_ATTEMPTS):
        if row is None:
            write.claim, write.previous = claim, None
            record_id = store.insert(conn, claim, lease=options.lease, ttl=options.ttl)
            if record_id is not None:
                ctx.claimed_by(record_id, 1, claim, None)
                return CLAIMED
            # Another request inserted it meanwhile.
            row = store.find(conn, command.scope, command.key, current=ctx.atomic)
            continue
        decision = decide(row._mapping, command.request_hash, options.on_stale)
        if not decision.claims:
            return Answered(decision, row)
        claim = existing_claim(decision, row._mapping, command, write.token)
        write.claim, write.previous = claim, row._mapping
        if store.reclaim(conn, row.id, row.version, claim, lease=options.lease, ttl=options.ttl):
            ctx.claimed_by(row.id, row.version + 1, claim, row._mapping)
            holder, previous = lease_holder(write.token), lease_holder(row.lease_token)
            if decision is Decision.TAKEOVER:
                store.add_event(
                    conn,
                    record_id=row.id,
                    scope=row.scope,
                    key=row.key,
                    kind=EventKind.TAKEOVER,
                    detail={"attempt": claim.attempt, "holder": holder, "previous_holder": previous},
                )
                logger.warning(
                    "record %s (key %r, scope %r): attempt %s takes over the expired lease of %s",
                    row.id,
                    row.key,
                    row.scope,
                    claim.attempt,
                    previous or "an unnamed process",
                )
            elif decision is Decision.RETRY:
                logger.info(
                    "record %s (key %r, scope %r): attempt %s runs (a retry of a retryable failure)",
                    row.id,
                    row.key,
                    row.scope,
                    claim.attempt,
                )
            return CLAIMED
        row = store.find(conn, command.scope, command.key, current=ctx.atomic)
    return Answered(Decision.IN_PROGRESS, row)  # heavy contention on one key: answer as in progress


def client_event(ctx: RequestContext, row: Row[Any], kind: EventKind) -> None:
    """Store an event a client caused, up to the per-record cap; past it the event is only counted."""
    state, command = ctx.state, ctx.command
    detail = {
        "method": command.method,
        "path": command.path,
        "endpoint": command.endpoint,
        "request_hash": command.request_hash,
    }
    if kind is EventKind.CONFLICT and command.summary is not None:
        detail["summary"] = command.summary  # the operator compares it with the record's ("1500 EUR" vs "1600 EUR")

    def write() -> None:
        with state.engine.connect() as conn:
            state.store.add_client_event(conn, record=row, kind=kind, detail=detail, cap=MAX_CLIENT_EVENTS_PER_RECORD)

    try:
        retry_lost_race(write)  # many duplicates of one key count on its row at once: under SERIALIZABLE they race
    except sa.exc.SQLAlchemyError as exc:  # the answer matters more than its audit trail
        logger.warning("could not store %s event for record %s: %s", kind.value, row.id, _db_error(exc))


def _replay(ctx: RequestContext, row: Row[Any]) -> Response:
    if row.response_status is None:
        # Marked failed by an operator before any response was stored.
        raise RequestFailed("An operator marked the request with this key as failed; it will not run again.")
    if row.state == State.FAILED and row.response_body is None and row.resource_ref is None:
        # A final failure without a response to give back (a stream that broke midway): say so.
        raise RequestFailed(
            "The request with this key failed for good before its whole response was sent; it will not run again."
        )
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
        try:
            rebuilt = current_app.ensure_sync(replay)(row.resource_ref)
        except (LookupError, NotFound):
            rebuilt = None
        if rebuilt is None:
            gone = ResourceGone(
                f"The request with this key completed with status {row.response_status}, but the resource it"
                " created is gone, so its response cannot be rebuilt. It is not run again."
            ).get_response()
            gone.headers.extend((n, v) for n, v in headers if n.lower() != "content-type")
            gone.headers[REPLAYED_HEADER] = "true"
            return gone  # type: ignore[return-value]
        response = current_app.make_response(rebuilt)
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
    if not ctx.view_started:
        _withdraw(ctx)  # a hook answered before the view (auth, CSRF): not an outcome
        return response
    exc = ctx.view_exception
    if ctx.atomic and exc is not None and lost_race(exc):
        # A statement of the view lost a race (under SERIALIZABLE, often against the claim's own read in the
        # same transaction): the database aborted the transaction, claim included; nothing was written.
        ctx.settle()
        _report(ctx, "executed")
        _rollback_quietly(ctx.state)
        return _atomic_lost_race(ctx, exc)
    ended, retryable = classify_response(response.status_code, exc, ctx.options.transient, atomic=ctx.atomic)
    return _settle(ctx, response, ended, retryable, error=describe_error(exc))


def teardown_request(exc: BaseException | None) -> None:
    ctx = get_current()
    if ctx is not None and ctx.store_failed:
        # The database went away after the view ran. Flask-SQLAlchemy's own teardown would roll the view's
        # session back on a dead connection and raise, turning the view's real response into a bare 500.
        _remove_session_quietly(ctx.state)
    if ctx is None or not ctx.claimed or ctx.settled:
        return
    if not ctx.view_started:
        try:
            _withdraw(ctx)
        except Exception as error:  # teardown must not raise
            logger.error("could not withdraw the claim of record %s: %s", ctx.record_id, _db_error(error))
        return
    # The request ended in an exception that skipped after_request (e.g. PROPAGATE_EXCEPTIONS).
    exc = exc or ctx.view_exception or InternalServerError()
    retryable = classify_exception(exc, ctx.options.transient, atomic=ctx.atomic)
    status = exc.code if isinstance(exc, HTTPException) and exc.code else 500
    fallback = InternalServerError().get_response() if not isinstance(exc, HTTPException) else exc.get_response()
    try:
        _settle(ctx, fallback, State.FAILED, retryable, error=describe_error(exc), status=status)
    except Exception as error:  # teardown must not raise
        logger.error("could not settle idempotency record %s: %s", ctx.record_id, _db_error(error))


def _withdraw(ctx: RequestContext) -> None:
    """Undo the claim of a request whose view never ran: the key is as free (or as stuck) as before it.

    A fresh claim is deleted; a retry, takeover or replacement puts the record back as it was (compare and set
    on this claim's version and lease token). Atomic mode: the claim was only in the rolled-back transaction.
    """
    state = ctx.state
    ctx.settle()
    _report(ctx, "rejected")
    if ctx.atomic:
        _rollback_quietly(state)
        return
    try:
        retry_lost_race(lambda: _withdraw_once(ctx))
    except sa.exc.SQLAlchemyError as exc:
        # The view did not run; the record stays IN_PROGRESS and shows as stuck once its lease ends.
        logger.error("could not withdraw the claim of record %s: %s", ctx.record_id, _db_error(exc))


def _withdraw_once(ctx: RequestContext) -> None:
    state = ctx.state
    assert ctx.record_id is not None and ctx.lease_token is not None
    with state.engine.connect() as conn:
        if ctx.previous is None:
            state.store.withdraw(conn, ctx.record_id, ctx.lease_token)
        else:
            state.store.restore(conn, ctx.record_id, ctx.version, ctx.lease_token, ctx.previous)


def _settle(
    ctx: RequestContext,
    response: BaseResponse,
    ended: State,
    retryable: bool,
    *,
    error: str | None,
    status: int | None = None,
) -> BaseResponse:
    state = ctx.state
    ctx.settle()
    _report(ctx, "executed")
    has_resource = ctx.resource_ref is not UNSET
    keeps_body = not (has_resource and ctx.options.replay is not None)
    values = outcome(
        ended,
        retryable,
        status=status or response.status_code,
        headers=[[n, v] for n, v in response.headers.items() if n.lower() in state.replay_headers],
        body=None,
        resource_ref=ctx.resource_ref if has_resource else None,
        error=error,
    )
    if response.is_streamed and ctx.atomic:
        return _settle_atomic_stream(ctx, response, values, keeps_body)
    declared = response.content_length
    if response.is_streamed and (declared is None or declared > state.max_response_bytes):
        # Stored while it is sent, never buffered whole: the outcome is written when the stream ends. (A stream
        # that declares a length within the limit, like an error page or a small file, is simply read.)
        source, chunks = response.response, response.iter_encoded()  # taken now: response.response is replaced
        response.response = _stored_while_sent(ctx, _app(), source, chunks, values, keeps_body)
        return response
    if keeps_body:
        if response.direct_passthrough:
            response.direct_passthrough = False  # buffer it: it declared a length within the limit
        body = response.get_data()
        if len(body) <= state.max_response_bytes:
            values["response_body"] = body
        else:  # never a truncated body: replays answer 500 response-not-stored instead (see _replay)
            values["error"] = error or _too_large(len(body))
    if ctx.atomic:
        return _settle_atomic(ctx, response, values)
    store_outcome(ctx, values)
    return response


def _too_large(size: int) -> str:
    return f"response body of {size} bytes or more exceeds {ConfigKey.MAX_RESPONSE_BYTES}"


def store_outcome(ctx: RequestContext, values: dict[str, Any]) -> None:
    """The lease owner's outcome write (leased mode), fenced by its version and lease token."""
    state = ctx.state
    assert ctx.record_id is not None and ctx.lease_token is not None

    # The view ran: its outcome is worth waiting for. SQLite's write lock held past the busy timeout (an
    # atomic request in flight) is waited out, within the lease, before the record is left to be stuck.
    # A write that lost a race (SERIALIZABLE: an operator or a takeover changed the row meanwhile) wrote
    # nothing; written again, the compare-and-set finds out whether this request still owns the record.
    def write() -> bool:
        assert ctx.record_id is not None and ctx.lease_token is not None
        with state.engine.connect() as conn:
            return state.store.settle(
                conn, ctx.record_id, ctx.version, ctx.lease_token, values, ttl=ctx.options.ttl, leased=True
            )

    def waits() -> None:
        logger.warning("outcome of record %s waits for the store's write lock", ctx.record_id)

    try:
        stored = retry_lost_race(write, lock_wait_until=time.monotonic() + ctx.options.lease, on_lock_wait=waits)
    except sa.exc.SQLAlchemyError as exc:
        # The view ran; the record stays IN_PROGRESS and shows up as stuck once its lease ends. The client still
        # gets the view's response: the view's own session is closed quietly at teardown (see teardown_request).
        logger.error(
            "could not store the outcome of record %s (key %r): %s",
            ctx.record_id,
            ctx.command.key,
            _db_error(exc),
        )
        ctx.note_store_failed()
        return
    if stored:
        ctx.bump_version()
    _after_settle(ctx, stored, values)


def _stored_while_sent(
    ctx: RequestContext,
    app: Any,
    source: Any,
    chunks: Iterator[bytes],
    values: dict[str, Any],
    keeps_body: bool,
) -> Iterator[bytes]:
    """Send the streamed body chunk by chunk, keeping at most ``IDEMPOTENCY_MAX_RESPONSE_BYTES`` of it; when the
    stream ends, store the outcome (with the body if it fit). A stream that breaks midway, or that the client
    leaves, is a FAILED outcome: the view's effect may have happened, but the response was never whole."""
    limit = ctx.state.max_response_bytes
    kept: bytearray | None = bytearray() if keeps_body else None
    size = 0
    broken: BaseException | None = None
    try:
        for chunk in chunks:
            size += len(chunk)
            if kept is not None:
                if len(kept) + len(chunk) <= limit:
                    kept += chunk
                else:
                    kept = None  # over the limit: stop keeping (and free) it
                    values["error"] = values["error"] or _too_large(size)
            yield chunk
    except BaseException as exc:  # GeneratorExit when the client went away
        broken = exc
        raise
    finally:
        _close_stream(source)
        if broken is not None:
            values.update(
                state=State.FAILED.value,
                retryable=classify_exception(broken, (), atomic=ctx.atomic),  # the view's effect may have happened
                response_status=500,
                error=describe_error(broken) if not isinstance(broken, GeneratorExit) else "the client left mid-stream",
            )
        elif kept is not None:
            values["response_body"] = bytes(kept)
        with app.app_context():
            store_outcome(ctx, values)


def _settle_atomic(ctx: RequestContext, response: BaseResponse, values: dict[str, Any]) -> BaseResponse:
    state = ctx.state
    session = state.db.session
    if keeps_view_writes(State(values["state"]), values["response_status"], commit_4xx=ctx.options.commit_4xx):
        if apart := binds.refusal(state, session):  # before anything is committed, on any bind
            logger.error("atomic view %s: %s", ctx.command.endpoint, apart)
            _rollback_quietly(state)  # the claim too: nothing of this request is stored
            return CommitFailed(apart).get_response()  # type: ignore[return-value]
        try:
            assert ctx.record_id is not None and ctx.lease_token is not None
            if not state.store.settle(
                state.session_connection(), ctx.record_id, ctx.version, ctx.lease_token, values, ttl=ctx.options.ttl
            ):
                raise AtomicViewCommitted("the view rolled back db.session, losing the idempotency claim")
            session.commit()
            ctx.bump_version()
        except AtomicViewCommitted as exc:
            logger.error("atomic view %s: %s", ctx.command.endpoint, exc)
            _rollback_quietly(state)
            values.update(
                state=State.FAILED.value,
                retryable=True,
                error=describe_error(exc),
                response_body=None,
                response_status=500,
            )
            _store_record_alone(ctx, values)
            return InternalServerError().get_response()
        except sa.exc.SQLAlchemyError as exc:
            _rollback_quietly(state)
            if lost_race(exc):
                return _atomic_lost_race(ctx, exc)
            logger.error("could not commit atomic request %s: %s", ctx.record_id, _db_error(exc))
            if isinstance(exc, (sa.exc.IntegrityError, sa.exc.DataError)):
                # The database refused the view's writes (a constraint): nothing was written. Say so, and
                # record a retryable failure in a transaction of its own, for the dashboard.
                values.update(state=State.FAILED.value, retryable=True, response_body=None, response_status=500)
                values["error"] = f"the commit was refused: {_db_error(exc)}"
                _store_record_alone(ctx, values)
                return CommitFailed(  # type: ignore[return-value]
                    "The database refused to commit this request's changes (for example a uniqueness rule), so"
                    " nothing of it was saved. Retrying the same request will fail the same way."
                ).get_response()
            return StoreUnavailable(  # type: ignore[return-value]
                "The request could not be committed. Retrying with the same key is safe: its writes and its"
                " outcome are committed together or not at all.",
                retry_after=state.retry_after,
            ).get_response()
        _after_settle(ctx, True, values)
        return response
    # Any FAILED outcome: the view's writes are rolled back, so a retry can never apply them twice. A 4xx
    # (COMPLETED, without commit_4xx): rolled back too, as without the layer; its record is stored alone.
    _rollback_quietly(state)
    if values["state"] == State.FAILED.value:
        values["retryable"] = True
    _store_record_alone(ctx, values)
    return response


def _settle_atomic_stream(
    ctx: RequestContext, response: BaseResponse, values: dict[str, Any], keeps_body: bool
) -> BaseResponse:
    """Atomic mode, a streamed body: hold it only up to ``IDEMPOTENCY_MAX_RESPONSE_BYTES``, then commit.

    A stream that ends within the limit commits with its body (a replay gives it back); a longer one commits as
    not stored (replays answer 500 ``response-not-stored``) and is sent as the held part, then the rest as it
    comes: never buffered whole. A stream that breaks before the commit is a FAILED (retryable) outcome: nothing
    was sent and nothing is kept, and its exception propagates. Once committed, the outcome stands: a stream
    that breaks later (or a client that leaves) cannot undo writes already committed, so the record stays
    COMPLETED (see :func:`_sent_after_commit`).
    """
    limit = ctx.state.max_response_bytes
    source, chunks = response.response, response.iter_encoded()  # taken now: response.response is replaced
    held: list[bytes] = []
    size = 0
    ended = False
    try:
        for chunk in chunks:
            held.append(chunk)
            size += len(chunk)
            if size > limit:
                break
        else:
            ended = True
    except Exception as exc:
        # Nothing was sent yet. The failure is stored, then the exception goes on to Flask's own handling (the
        # app's 500 handler, got_request_exception), as a view's exception would.
        _close_stream(source)
        _rollback_quietly(ctx.state)
        values.update(
            state=State.FAILED.value, retryable=True, response_status=500, response_body=None, error=describe_error(exc)
        )
        _store_record_alone(ctx, values)
        raise
    if not ended:
        values["error"] = values["error"] or _too_large(size)
    elif keeps_body:
        values["response_body"] = b"".join(held)
    answer = _settle_atomic(ctx, response, values)
    if ended or answer is not response:
        _close_stream(source)  # read to its end, or not sent at all (the commit failed: the answer says so)
        response.response = held
        return answer
    response.response = _sent_after_commit(ctx, source, held, chunks)
    return response


def _sent_after_commit(ctx: RequestContext, source: Any, held: list[bytes], rest: Iterator[bytes]) -> Iterator[bytes]:
    """An atomic stream past the limit, after its commit: the held part, then the remaining chunks.

    Its outcome is already committed, COMPLETED without a body: if the stream breaks now (or the client leaves),
    the view's writes stay committed, so the record is not made FAILED (a retry must not run it again); the client
    saw a cut response, and its retry is answered 500 ``response-not-stored`` with the original's headers.
    """
    try:
        yield b"".join(held)
        held.clear()
        yield from rest
    except Exception as exc:
        logger.warning(
            "the stream of atomic record %s (%r) broke after its commit (%s); it stays COMPLETED, not stored",
            ctx.record_id,
            ctx.command.key,
            describe_error(exc),
        )
        raise
    finally:
        _close_stream(source)


def _close_stream(source: Any) -> None:
    close = getattr(source, "close", None)
    if close is not None:
        close()


def _atomic_lost_race(ctx: RequestContext, exc: BaseException) -> BaseResponse:
    """An atomic request's transaction lost a race, in the view or at its commit: nothing of it was written.

    The view is not run again here: a second run in the same request could repeat whatever it did outside the
    database. The answer is what a duplicate arriving now would get, read from the committed record: a replay,
    409 ``in-progress``, ``stuck`` or 422 ``key-reused`` when another request holds the key; when nobody does,
    503 ``commit-conflict`` with ``Retry-After`` (the retry runs it, once). Never 500, never ``store-unavailable``.
    """
    logger.warning("atomic request %r lost a race (%s); nothing was written", ctx.command.key, _db_error(exc))
    answered = _as_duplicate(ctx)
    if answered.row is None:
        return CommitConflict(
            "This request's changes conflicted with a concurrent transaction, so nothing of it was saved."
            " Retrying it with the same key is safe.",
            retry_after=ctx.state.retry_after,
        ).get_response()  # type: ignore[return-value]
    try:
        return _answer(ctx, answered)
    except IdempotencyError as problem:
        return problem.get_response()  # type: ignore[return-value]


def _store_record_alone(ctx: RequestContext, values: dict[str, Any]) -> None:
    """After the rollback, record the outcome (a FAILED retryable one, or a 4xx) in a transaction of its own.

    The rollback undid the claim too, so the claim is made again (against the row as it was before it, by its
    version) and settled with the outcome, both in one transaction.
    """
    state, store, claim, options = ctx.state, ctx.state.store, ctx.claim, ctx.options
    assert isinstance(claim, Claim) and ctx.lease_token is not None
    lease_token = ctx.lease_token

    def write() -> tuple[int | None, int, bool]:
        with state.records_engine.begin() as conn:
            if ctx.previous is None:
                record_id = store.insert(conn, claim, lease=options.lease, ttl=options.ttl)
                version = 1
            else:
                record_id, version = int(ctx.previous["id"]), int(ctx.previous["version"])
                if not store.reclaim(conn, record_id, version, claim, lease=options.lease, ttl=options.ttl):
                    record_id = None
                version += 1
            stored = record_id is not None and store.settle(
                conn, record_id, version, lease_token, values, ttl=options.ttl
            )
        return record_id, version, stored

    try:
        record_id, version, stored = retry_lost_race(write)
    except sa.exc.SQLAlchemyError as exc:
        logger.warning("could not store the outcome of atomic record %s: %s", ctx.command.key, _db_error(exc))
        return
    if stored:
        ctx.stored_at(record_id, version + 1)
    _after_settle(ctx, stored, values)


def _after_settle(ctx: RequestContext, stored: bool, values: Mapping[str, Any]) -> None:
    app = _app()
    view = ctx.record_view(values["state"], bool(values["retryable"]), values["response_status"])
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


def describe_error(exc: BaseException | None) -> str | None:
    if exc is None:
        return None
    if isinstance(exc, SystemExit):
        # What gunicorn's worker timeout (and other servers' aborts) raise inside the request.
        return f"the worker was stopped mid-request by its server (e.g. a worker timeout): SystemExit({exc})"
    return storable_text(f"{type(exc).__name__}: {exc}", 2000)  # a message may quote what a client sent


def _db_error(exc: BaseException) -> str:
    """The error for the log (``dberrors.message``, named): parameters carry bodies, so no SQL and no parameters."""
    return dberrors.message(exc, named=True)


def _remove_session_quietly(state: AppState) -> None:
    try:
        state.db.session.remove()
    except sa.exc.SQLAlchemyError as exc:
        logger.warning("closing the view's session failed: %s", _db_error(exc))
        state.db.session.registry.clear()  # drop it: a later remove() must not touch the dead connection


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
        if session.in_nested_transaction():
            return  # releasing a savepoint (begin_nested) is the view's own business; only the outer commit counts
        ctx = get_current()
        # The layer's own commit happens after it marked the record settled.
        if ctx is not None and ctx.claimed and ctx.atomic and not ctx.settled:
            raise AtomicViewCommitted(
                "an atomic=True view must not commit db.session: the layer commits its writes with the outcome"
            )


COMMIT_GUARD = CommitGuard()
