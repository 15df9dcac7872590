"""``current_record`` and the read-only record view that it and every signal give.

One private :class:`RequestContext` per protected request (in the request's WSGI environ) carries what the
request pipeline needs from the claim to the outcome; users see only :class:`RecordView` (signals) and
:class:`CurrentRecord` (``current_record`` inside a protected view).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa
from flask import has_request_context, request
from werkzeug.local import LocalProxy

from .constants import REQUEST_CONTEXT_KEY, EventKind
from .dberrors import retry_lost_race
from .errors import LeaseLost
from .machine import Claim, Command
from .state import AppState, Resolved, app_state

logger = logging.getLogger("flask_idempotent")

#: Checkpoint events stored per attempt (the timeline's recovery points); later ones only move the record's
#: recovery point, so a view that checkpoints in a loop writes a bounded number of events.
MAX_CHECKPOINT_EVENTS = 20

UNSET: Any = object()


@dataclass(frozen=True)
class RecordView:
    """A record as signal receivers and ``current_record`` see it: read-only, without the lease token.

    ``attempt`` is the record's ``attempts``; ``id`` and ``version`` are ``None`` before a record exists.
    """

    id: int | None
    scope: str
    key: str
    kind: str
    state: str | None
    retryable: bool
    attempt: int
    version: int | None
    method: str
    path: str
    endpoint: str | None
    summary: str | None = None
    recovery_point: str | None = None
    recovery_data: Any = None
    response_status: int | None = None

    @classmethod
    def of(cls, row: Mapping[Any, Any]) -> RecordView:
        """The view of a stored row (or an operations-API record dict)."""
        return cls(
            id=row["id"],
            scope=row["scope"],
            key=row["key"],
            kind=row.get("kind") or "http",
            state=row["state"],
            retryable=bool(row["retryable"]),
            attempt=int(row["attempts"]),
            version=row.get("version"),
            method=row["method"],
            path=row["path"],
            endpoint=row["endpoint"],
            summary=row.get("summary"),
            recovery_point=row.get("recovery_point"),
            recovery_data=row.get("recovery_data"),
            response_status=row.get("response_status"),
        )


@dataclass(eq=False)
class RequestContext:
    """The record of one protected request, from its claim to its outcome (private to the pipeline).

    Its methods are the only writers of its fields: the claim (:meth:`claimed_by`, :meth:`unclaim`), the view
    (:meth:`view_began`, :meth:`view_raised`), its writes (:meth:`bump_version`, :meth:`stored_at`,
    :meth:`note_checkpoint`) and the outcome (:meth:`settle`, :meth:`note_store_failed`).
    """

    state: AppState
    options: Resolved
    command: Command
    record_id: int | None = None
    lease_token: str | None = None
    #: The record's version as this request last wrote it: its own writes compare (id, version, lease token).
    version: int = 0
    attempt: int = 0
    recovery_point: str | None = None
    recovery_data: Any = None
    #: The row this request took over (retry, takeover, expiry), ``None`` for a fresh insert.
    previous: Mapping[Any, Any] | None = None
    #: The claim's values (atomic mode writes them again with a failure after a rollback).
    claim: Any = None
    resource_ref: Any = field(default=UNSET)
    settled: bool = False
    #: The outcome could not be written (the database went away after the view ran).
    store_failed: bool = False
    #: How long the claim (or the answer without one) took, for metrics.
    claim_seconds: float | None = None
    #: Recovery points this attempt wrote (``CurrentRecord.checkpoint``).
    checkpoints: int = 0
    #: The protected view's body started (``decorator.watch``): only what it produced is an outcome.
    view_started: bool = False
    #: The exception the view body raised, if any (error handlers may turn it into a response).
    view_exception: BaseException | None = None

    def claimed_by(self, record_id: int, version: int, claim: Claim, previous: Mapping[Any, Any] | None) -> None:
        """This request holds record ``record_id`` at ``version`` under ``claim``; ``previous``: the row it took
        over (``None`` for a new record), whose recovery point carries over when the claim resumes."""
        self.record_id = record_id
        self.lease_token = claim.values["lease_token"]
        self.version = version
        self.attempt = claim.attempt
        self.previous = previous
        self.claim = claim
        if previous is not None and claim.resumes:
            self.recovery_point = previous["recovery_point"]
            self.recovery_data = previous["recovery_data"]

    def unclaim(self) -> None:
        """Forget a claim that was rolled back (atomic mode) or never committed."""
        self.record_id = self.lease_token = self.previous = self.claim = None
        self.version = self.attempt = 0
        self.recovery_point, self.recovery_data = None, None

    def note_claim_time(self, seconds: float) -> None:
        self.claim_seconds = seconds

    def view_began(self) -> None:
        self.view_started = True

    def view_raised(self, exc: BaseException) -> None:
        self.view_exception = exc

    def bump_version(self) -> None:
        """This request's compare-and-set write went in: the record is one version on."""
        self.version += 1

    def stored_at(self, record_id: int | None, version: int) -> None:
        """The claim was made again (after a rollback) and settled: the record is ``record_id`` at ``version``."""
        self.record_id, self.version = record_id, version

    def note_checkpoint(self, name: str, data: Any) -> bool:
        """Recovery point ``name`` was written (one version on); whether its timeline event is still due."""
        self.bump_version()
        self.recovery_point, self.recovery_data = name, data
        self.checkpoints += 1
        return self.checkpoints <= MAX_CHECKPOINT_EVENTS

    def keep_resource(self, ref: Any) -> None:
        self.resource_ref = ref

    def settle(self) -> None:
        """The outcome is this request's to write now (or none is, for a killed worker): the request hooks
        leave the record alone from here."""
        self.settled = True

    def note_store_failed(self) -> None:
        """The outcome could not be written: teardown closes the view's session quietly."""
        self.store_failed = True

    @property
    def claimed(self) -> bool:
        return self.lease_token is not None

    @property
    def atomic(self) -> bool:
        return self.options.atomic

    def record_view(
        self, state: str | None = "IN_PROGRESS", retryable: bool = False, status: int | None = None
    ) -> RecordView:
        c = self.command
        return RecordView(
            id=self.record_id,
            scope=c.scope,
            key=c.key,
            kind=c.kind,
            state=state,
            retryable=retryable,
            attempt=self.attempt,
            version=self.version or None,
            method=c.method,
            path=c.path,
            endpoint=c.endpoint,
            summary=c.summary,
            recovery_point=self.recovery_point,
            recovery_data=self.recovery_data,
            response_status=status,
        )


class CurrentRecord:
    """``current_record``: the record the current protected request owns.

    ``key``, ``scope``, ``attempt``, ``recovery_point``, ``recovery_data``, :meth:`checkpoint` and
    :meth:`set_resource` (docs: "Inside a view").
    """

    def __init__(self, context: RequestContext) -> None:
        self._context = context

    @property
    def key(self) -> str:
        return self._context.command.key

    @property
    def scope(self) -> str:
        return self._context.command.scope

    @property
    def id(self) -> int | None:
        return self._context.record_id

    @property
    def attempt(self) -> int:
        return self._context.attempt

    @property
    def recovery_point(self) -> str | None:
        return self._context.recovery_point

    @property
    def recovery_data(self) -> Any:
        return self._context.recovery_data

    def checkpoint(self, name: str, data: Any = None) -> None:
        """Durably record recovery point ``name`` (with JSON ``data``) and extend the lease.

        In leased mode it commits at once, so an attempt that takes over after a crash resumes from it. In atomic
        mode it is written in the view's transaction (all or nothing anyway). Raises :class:`LeaseLost` if this
        request no longer owns the record; the view should stop.
        """
        ctx = self._context
        assert ctx.record_id is not None and ctx.lease_token is not None
        record_id, lease_token = ctx.record_id, ctx.lease_token
        values = {"recovery_point": name, "recovery_data": data}

        def write() -> bool:
            with ctx.state.connection(ctx.atomic) as conn:
                store, options = ctx.state.store, ctx.options
                return store.checkpoint(
                    conn, record_id, ctx.version, lease_token, values, options.lease, ttl=options.ttl
                )

        # Leased: a write that lost a race (SERIALIZABLE) wrote nothing and is written again. Atomic: it is part
        # of the view's transaction, which the database aborted; the view's error says so.
        written = write() if ctx.atomic else retry_lost_race(write)
        if not written:
            raise LeaseLost(f"record {ctx.record_id} is no longer owned by this request")
        if ctx.note_checkpoint(name, data):
            self._add_checkpoint_event(name)

    def _add_checkpoint_event(self, name: str) -> None:
        """The timeline's trace of a recovery point: an event naming it and the attempt (not its data, which
        stays on the record). Leased mode: written after the checkpoint committed, and a failure only logged
        (the answer matters more than its audit trail). Atomic mode: part of the view's transaction."""
        ctx = self._context
        command = ctx.command

        def write() -> None:
            with ctx.state.connection(ctx.atomic) as conn:
                ctx.state.store.add_event(
                    conn,
                    record_id=ctx.record_id,
                    scope=command.scope,
                    key=command.key,
                    kind=EventKind.CHECKPOINT,
                    detail={"point": name, "attempt": ctx.attempt},
                )

        if ctx.atomic:
            write()
            return
        try:
            retry_lost_race(write)
        except sa.exc.SQLAlchemyError as exc:
            logger.warning("could not store the checkpoint event of record %s: %s", ctx.record_id, type(exc).__name__)

    def set_resource(self, ref: Any) -> None:
        """Store ``ref`` (JSON) as the outcome's resource reference.

        With the route's ``replay=`` callable, replays call ``replay(ref)`` to rebuild the response from the
        resource's current state, and the response body is not stored. A value that is not JSON-serialisable
        is a ``TypeError`` here, never a record left in progress.
        """
        json.dumps(ref)  # raises TypeError now rather than when the outcome is stored
        self._context.keep_resource(ref)


class SwitchedOffRecord:
    """``current_record`` while ``IDEMPOTENCY_ENABLED`` is False (unit tests of view logic): no record behind it.

    ``key`` is the key header as sent (``""`` without one), ``scope`` is ``""``, ``attempt`` is 1;
    :meth:`checkpoint` stores nothing and :meth:`set_resource` only checks that its value is JSON.
    """

    id: int | None = None
    scope = ""
    attempt = 1
    recovery_point: str | None = None
    recovery_data: Any = None

    def __init__(self, key: str) -> None:
        self.key = key

    def checkpoint(self, name: str, data: Any = None) -> None:
        json.dumps(data)

    def set_resource(self, ref: Any) -> None:
        json.dumps(ref)


def _current() -> CurrentRecord | SwitchedOffRecord:
    ctx = get_current()
    if ctx is None and has_request_context():
        state = app_state()
        if not state.enabled:
            return SwitchedOffRecord(request.headers.get(state.header, ""))
    if ctx is None or not ctx.claimed:
        raise RuntimeError("current_record is only available inside a view protected by @idempotent")
    return CurrentRecord(ctx)


def set_current(context: RequestContext) -> None:
    request.environ[REQUEST_CONTEXT_KEY] = context


def get_current() -> RequestContext | None:
    """The protected request's context; kept in the WSGI environ, since an app context can outlive a request."""
    if not has_request_context():
        return None
    context: RequestContext | None = request.environ.get(REQUEST_CONTEXT_KEY)
    return context


current_record: CurrentRecord = LocalProxy(_current)  # type: ignore[assignment]
