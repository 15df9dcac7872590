"""The state machine: every rule about records, in one place.

For every transition of a record (a request's claim, reclaim, replacement or takeover; its outcome; an
operator's mark retryable, mark failed, acknowledge and release) this module says whether it is allowed and
which values it writes. It also defines the predicates "stuck" and "expired" once, as SQL: the request path's
deciding read computes them with the database's clock (see ``store.py``), and the dashboard's and CLI's
listings filter with the very same expressions, so a NULL lease means the same thing everywhere.

Times are never computed here: every time a transition writes is the database's clock (plus the lease or the
time to live), filled in by the store. The request hooks (``pipeline.py``) and the operations API
(``operations.py``, used by the CLI and the dashboard) ask this module; neither decides on its own.
"""

from __future__ import annotations

import enum
import os
import secrets
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa

from .constants import EventKind, State

#: Statuses that say "try again later": the record is FAILED and retryable.
RETRYABLE_STATUSES = frozenset({408, 409, 425, 429, 502, 503, 504})


# Predicates, as SQL over the records table and a "now" (the database's clock) ------------------------------


def stuck(records: sa.Table, now: Any) -> sa.ColumnElement[bool]:
    """IN_PROGRESS whose lease has ended (or never had one): its owner is presumed dead; an operator decides.

    ``now`` is the database's clock as a SQL expression (``store.db_time``) or a bound value.
    """
    r = records.c
    return sa.and_(r.state == State.IN_PROGRESS.value, sa.or_(r.locked_until.is_(None), r.locked_until <= now))


def expired(records: sa.Table, now: Any) -> sa.ColumnElement[bool]:
    """A record past ``expires_at`` that counts as absent (a request replaces it, ``purge`` deletes it).

    Never one that awaits a decision (:func:`undecided`): it may be the only trace of an effect whose outcome
    nobody knows yet, and the clock must never undo what a decision left. Every outcome and operator action
    sets ``expires_at`` afresh (now + the ttl), so the ttl counts from the last thing that happened.
    """
    r = records.c
    return sa.and_(r.expires_at <= now, sa.not_(undecided(records)))


def awaiting_decision(records: sa.Table) -> sa.ColumnElement[bool]:
    """A final failure nobody has acknowledged yet: the outcome may be ambiguous, an operator should look."""
    r = records.c
    return sa.and_(r.state == State.FAILED.value, r.retryable.is_(False), r.acknowledged_at.is_(None))


def undecided(records: sa.Table) -> sa.ColumnElement[bool]:
    """A record awaiting a decision, which never expires: IN_PROGRESS (its owner decides, or, once stuck, an
    operator or a takeover), or a final failure nobody acknowledged (:func:`awaiting_decision`).

    Acknowledging a final failure, or any outcome other than a final failure, starts its ttl.
    """
    return sa.or_(records.c.state == State.IN_PROGRESS.value, awaiting_decision(records))


# Requests ---------------------------------------------------------------------------------------------------


class Decision(enum.Enum):
    """What to do with a request whose (scope, key) already has a record."""

    #: The record counts as absent (expired): this request replaces it and runs the view.
    REPLACE = "replace"
    #: FAILED and retryable: this request runs the view again (attempts + 1).
    RETRY = "retry"
    #: IN_PROGRESS with an expired lease and ``on_stale="takeover"``: take the lease and resume.
    TAKEOVER = "takeover"
    #: COMPLETED, or FAILED and final: answer with the stored outcome.
    REPLAY = "replay"
    #: Another command under the same key: 422, record untouched.
    CONFLICT = "conflict"
    #: IN_PROGRESS with a live lease: wait, then 409 (or 202).
    IN_PROGRESS = "in_progress"
    #: IN_PROGRESS with an expired lease and ``on_stale="hold"``: 409 ``stuck``, an operator decides.
    STUCK = "stuck"

    @property
    def claims(self) -> bool:
        """Whether the request takes the record under this decision and its view runs."""
        return self in _CLAIMING


_CLAIMING = frozenset({Decision.REPLACE, Decision.RETRY, Decision.TAKEOVER})


@dataclass(frozen=True)
class Answer:
    """How a request (or task call) that may not claim its key is answered."""

    #: The client-caused event stored on the record (capped per record), if any.
    event: EventKind | None
    #: The problem raised, by its code (``errors.problem_class`` gives the class); ``None``: replay the outcome.
    problem: str | None
    #: The answer says when to try again (``Retry-After``): the key's holder may still finish.
    retry_later: bool = False


#: The answer to each decision that does not claim (the docs' "Behaviour" table).
ANSWERS: Mapping[Decision, Answer] = {
    Decision.REPLAY: Answer(None, None),
    Decision.CONFLICT: Answer(EventKind.CONFLICT, "key-reused"),
    Decision.STUCK: Answer(EventKind.STALE_HIT, "stuck"),
    Decision.IN_PROGRESS: Answer(EventKind.IN_PROGRESS_HIT, "in-progress", retry_later=True),
}


def decide(seen: Mapping[Any, Any], request_hash: str, on_stale: str) -> Decision:
    """Decide what a request with ``request_hash`` does to the record ``seen`` (the docs' "Behaviour" table).

    ``seen`` is a row of the store's deciding read: the record's columns plus ``is_stuck`` and ``is_expired``,
    both evaluated by the database against its own clock in that same statement.
    """
    if seen["is_expired"]:
        return Decision.REPLACE
    if seen["request_hash"] != request_hash:
        return Decision.CONFLICT
    state = seen["state"]
    if state == State.COMPLETED:
        return Decision.REPLAY
    if state == State.FAILED:
        return Decision.RETRY if seen["retryable"] else Decision.REPLAY
    if not seen["is_stuck"]:
        return Decision.IN_PROGRESS
    return Decision.TAKEOVER if on_stale == "takeover" else Decision.STUCK


@dataclass(frozen=True)
class Command:
    """What a claim writes about the request: who owns the key and what the command was."""

    scope: str
    key: str
    request_hash: str
    method: str
    path: str
    endpoint: str | None
    kind: str = "http"
    summary: str | None = None


#: A claim clears the previous attempt's outcome: an earlier attempt's response must never be replayed for
#: this one. It also clears an operator's acknowledgement, which was about that outcome.
_FRESH_OUTCOME: dict[str, Any] = {
    "state": State.IN_PROGRESS.value,
    "retryable": False,
    "response_status": None,
    "response_headers": None,
    "response_body": None,
    "resource_ref": None,
    "error": None,
    "acknowledged_at": None,
    "acknowledged_by": None,
}


@dataclass(frozen=True)
class Claim:
    """The values a claim writes. The store adds the times: ``locked_until`` (now + lease), ``updated_at`` and
    ``expires_at`` (now + ttl) always, ``created_at`` when :attr:`restart` is set; and ``version``."""

    values: dict[str, Any]
    attempt: int
    #: A new record (insert) or an expired one replaced: ``created_at`` starts afresh.
    restart: bool
    #: The record's recovery point carries over to this attempt (retry, takeover); not on a restart.
    resumes: bool


#: A lease token is at most this long (``idempotency_records.lease_token``).
LEASE_TOKEN_MAX = 64


def new_lease_token() -> str:
    """A claim's lease token: 22 random URL-safe characters (128 bits, what fences the owner's writes), then
    ``@host:pid`` of the process that claims, so that an operator can tell which process held a stuck lease.

    A lock that names its holder, as lock files do; cut to :data:`LEASE_TOKEN_MAX` characters (the host first).
    """
    owner = f":{os.getpid()}"
    room = LEASE_TOKEN_MAX - 23 - len(owner)
    return f"{secrets.token_urlsafe(16)}@{socket.gethostname()[:room]}{owner}"


def lease_holder(lease_token: str | None) -> str | None:
    """``host:pid`` of the process a lease token was made by (:func:`new_lease_token`); ``None`` for no token
    or one that names nobody (written before the holder was recorded, or by hand)."""
    if not lease_token or "@" not in lease_token:
        return None
    return lease_token.partition("@")[2] or None


def new_claim(command: Command, lease_token: str) -> Claim:
    """The row that claims a key nobody holds: IN_PROGRESS under a new lease, first attempt."""
    values = {
        **_FRESH_OUTCOME,
        "scope": command.scope,
        "key": command.key,
        "request_hash": command.request_hash,
        "method": command.method,
        "path": command.path,
        "endpoint": command.endpoint,
        "kind": command.kind,
        "summary": command.summary,
        "lease_token": lease_token,
        "attempts": 1,
        "event_count": 0,
        "recovery_point": None,
        "recovery_data": None,
    }
    return Claim(values, attempt=1, restart=True, resumes=False)


def existing_claim(decision: Decision, seen: Mapping[Any, Any], command: Command, lease_token: str) -> Claim:
    """The values with which a claiming ``decision`` takes the record ``seen`` (compare-and-set on its version)."""
    if not decision.claims:
        raise ValueError(f"{decision} does not claim the record")
    if decision is Decision.REPLACE:
        # An expired record counts as absent: start afresh under the new command.
        fresh = new_claim(command, lease_token)
        values = {name: value for name, value in fresh.values.items() if name not in ("scope", "key")}
        return Claim(values, attempt=1, restart=True, resumes=False)
    attempt = int(seen["attempts"]) + 1
    values = {**_FRESH_OUTCOME, "lease_token": lease_token, "attempts": attempt}
    return Claim(values, attempt=attempt, restart=False, resumes=True)


def classify_status(status: int, *, atomic: bool) -> tuple[State, bool]:
    """Return ``(state, retryable)`` for a response the view produced (docs: "Behaviour")."""
    if status in RETRYABLE_STATUSES:
        return State.FAILED, True
    if status >= 500:
        # Leased mode: the view's writes (and any outside call) may have happened; an operator decides.
        # Atomic mode: the transaction is rolled back, so nothing happened and a retry is safe.
        return State.FAILED, atomic
    return State.COMPLETED, False


def classify_exception(
    exc: BaseException,
    transient: tuple[type[BaseException], ...],
    *,
    atomic: bool,
    runs_again: Callable[[BaseException], bool] | None = None,
) -> bool:
    """Return whether an exception that ended the view (or a task) leaves the record retryable (it is FAILED
    either way): in atomic mode always (nothing was committed), else for the ``transient`` types and, for a
    task, whatever ``runs_again`` says its runner will run again (Celery's retries, ``tasks.celery_retries``)."""
    return atomic or isinstance(exc, transient) or (runs_again is not None and runs_again(exc))


def classify_response(
    status: int, exc: BaseException | None, transient: tuple[type[BaseException], ...], *, atomic: bool
) -> tuple[State, bool]:
    """``(state, retryable)`` for the response a view gave, with the exception it raised (``None``: it returned
    one): a transient exception is a retryable failure whatever its status, else the status decides."""
    if exc is not None and isinstance(exc, transient):
        return State.FAILED, True
    return classify_status(status, atomic=atomic)


def keeps_view_writes(state: State, status: int, *, commit_4xx: bool) -> bool:
    """Atomic mode: whether the view's ``db.session`` writes commit with this outcome (docs: "Modes").

    A 2xx or 3xx keeps them. Every FAILED outcome rolls them back, so a retry never applies them twice. A 4xx is
    COMPLETED (replayed) yet rolls them back too: the same view without the layer would have left nothing behind
    (Flask-SQLAlchemy never commits for it), so a debit followed by 422 must not stay. ``commit_4xx`` (a declined
    payment recorded with its 402) keeps them.
    """
    return state is State.COMPLETED and (status < 400 or commit_4xx)


def outcome(
    state: State,
    retryable: bool,
    *,
    status: int,
    headers: list[list[str]],
    body: bytes | None,
    resource_ref: Any,
    error: str | None,
) -> dict[str, Any]:
    """What the lease owner's outcome writes (fenced by its lease token). The store adds ``updated_at`` and
    ``expires_at`` (now + the route's ttl: a view that finishes late is kept as long as one that finishes early)."""
    return {
        "state": state.value,
        "retryable": retryable if state is State.FAILED else False,
        "locked_until": None,
        "response_status": status,
        "response_headers": headers,
        "response_body": body,
        "resource_ref": resource_ref,
        "error": error,
    }


# Operators --------------------------------------------------------------------------------------------------


class TransitionError(ValueError):
    """An operator action that the record's state does not allow; the message says which rule refused it."""


class Action(str, enum.Enum):
    """The operator actions of the operator table (docs: "Operating it")."""

    MARK_RETRYABLE = "mark-retryable"
    MARK_FAILED = "mark-failed"
    ACKNOWLEDGE = "acknowledge"
    RELEASE = "release"

    @property
    def event(self) -> EventKind:
        return _EVENTS[self]


_EVENTS = {
    Action.MARK_RETRYABLE: EventKind.MARK_RETRYABLE,
    Action.MARK_FAILED: EventKind.MARK_FAILED,
    Action.ACKNOWLEDGE: EventKind.ACKNOWLEDGE,
    Action.RELEASE: EventKind.RELEASE,
}

_LIVE = "its lease is still live: the request that owns it may still be running"


def record_ttl(seen: Mapping[Any, Any], default: float) -> float:
    """The ttl (seconds) of the record ``seen``: what an operator's action on it adds to the database's now.

    The record keeps its route's ttl as the distance from ``updated_at`` to ``expires_at``: every write that
    moves ``updated_at`` (claim, checkpoint, outcome, operator action) sets ``expires_at`` to the same now +
    ttl. A record whose times do not give a positive distance (written by hand, or changed by an operator
    before operator actions moved ``expires_at``) gets ``default``, the app's ``IDEMPOTENCY_TTL``.
    """
    span = (seen["expires_at"] - seen["updated_at"]).total_seconds()
    return span if span > 0 else default


@dataclass(frozen=True)
class OperatorTransition:
    """What an allowed operator action writes. ``delete`` (release) removes the record instead."""

    values: dict[str, Any] = field(default_factory=dict)
    delete: bool = False
    #: Write ``acknowledged_at`` with the database's clock (and ``acknowledged_by`` = the actor).
    acknowledge: bool = False


def operator_transition(action: Action, seen: Mapping[Any, Any]) -> OperatorTransition:
    """The rule for ``action`` on the record ``seen`` (a row with ``is_stuck`` from the database's clock).

    Raises :class:`TransitionError` naming the rule when the action is not allowed (the operator table, docs:
    "Operating it").
    """
    state, retryable = seen["state"], bool(seen["retryable"])
    live = state == State.IN_PROGRESS and not seen["is_stuck"]
    # Taking the record from its owner: the lease token goes, so a late outcome of that owner is refused.
    end_lease = {"lease_token": None, "locked_until": None}
    if action is Action.RELEASE:
        if live:
            raise TransitionError(f"release refused: {_LIVE}")
        return OperatorTransition(delete=True)
    if state == State.COMPLETED:
        raise TransitionError(
            f"{action.value} refused: a COMPLETED record is replayed; release it to run the command again"
        )
    if live:
        raise TransitionError(f"{action.value} refused: {_LIVE}")
    if action is Action.MARK_RETRYABLE:
        if state == State.FAILED and retryable:
            raise TransitionError("mark-retryable refused: it is already retryable; the next retry runs it again")
        values = {**end_lease, "state": State.FAILED.value, "retryable": True}
        return OperatorTransition({**values, "acknowledged_at": None, "acknowledged_by": None})
    if action is Action.MARK_FAILED:
        if state == State.FAILED and not retryable:
            raise TransitionError("mark-failed refused: it is already failed for good; retries get the failure")
        return OperatorTransition({**end_lease, "state": State.FAILED.value, "retryable": False})
    # Acknowledge: only a final failure can be left as it is.
    if state != State.FAILED or retryable:
        raise TransitionError(
            "acknowledge refused: only a final failure (FAILED, not retryable) can be acknowledged;"
            " mark it failed first"
        )
    if seen["acknowledged_at"] is not None:
        raise TransitionError(f"acknowledge refused: already acknowledged by {seen['acknowledged_by']}")
    return OperatorTransition(acknowledge=True)
