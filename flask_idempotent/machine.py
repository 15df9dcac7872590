"""The state machine: every rule about records and outcomes, in one place.

The request hooks and the operations API (CLI, dashboard) both ask this module what a record in a given state
means and which transitions are allowed; neither decides on its own.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from datetime import datetime
from typing import Any

from .constants import State

#: Statuses that say "try again later": the record is FAILED and retryable.
RETRYABLE_STATUSES = frozenset({408, 409, 425, 429, 502, 503, 504})


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


#: Decisions under which the request claims the record and the view runs.
CLAIMING = frozenset({Decision.REPLACE, Decision.RETRY, Decision.TAKEOVER})


def is_expired(record: Mapping[Any, Any], now: datetime) -> bool:
    """Whether ``record`` counts as absent.

    An IN_PROGRESS record never expires by itself: it may be the only trace of a crash after an outside
    effect, so only an operator (or a takeover) may end it.
    """
    return bool(record["state"] != State.IN_PROGRESS and record["expires_at"] <= now)


def is_stale(record: Mapping[Any, Any], now: datetime) -> bool:
    """Whether ``record`` is IN_PROGRESS with an expired lease: its owner is presumed dead."""
    locked_until = record["locked_until"]
    return record["state"] == State.IN_PROGRESS and (locked_until is None or locked_until <= now)


def decide(record: Mapping[Any, Any], request_hash: str, now: datetime, on_stale: str) -> Decision:
    """Decide what a request with ``request_hash`` does to an existing ``record`` (SPEC's HTTP table)."""
    if is_expired(record, now):
        return Decision.REPLACE
    if record["request_hash"] != request_hash:
        return Decision.CONFLICT
    state = record["state"]
    if state == State.COMPLETED:
        return Decision.REPLAY
    if state == State.FAILED:
        return Decision.RETRY if record["retryable"] else Decision.REPLAY
    if not is_stale(record, now):
        return Decision.IN_PROGRESS
    return Decision.TAKEOVER if on_stale == "takeover" else Decision.STUCK


def classify_status(status: int, *, atomic: bool) -> tuple[State, bool]:
    """Return ``(state, retryable)`` for a response the view produced (SPEC's outcome table)."""
    if status in RETRYABLE_STATUSES:
        return State.FAILED, True
    if status >= 500:
        # Leased mode: the view's writes (and any outside call) may have happened; an operator decides.
        # Atomic mode: the transaction is rolled back, so nothing happened and a retry is safe.
        return State.FAILED, atomic
    return State.COMPLETED, False


def classify_exception(exc: BaseException, transient: tuple[type[BaseException], ...], *, atomic: bool) -> bool:
    """Return whether an exception that ended the view leaves the record retryable (it is FAILED either way)."""
    return atomic or isinstance(exc, transient)


# Operator transitions -------------------------------------------------------------------------------------


class TransitionError(ValueError):
    """An operator action that the record's state does not allow; the message says why."""


def check_mark_retryable(record: Mapping[Any, Any], now: datetime) -> None:
    """Allow "mark retryable" on a FAILED record or a stuck IN_PROGRESS one (lease expired)."""
    if record["state"] == State.COMPLETED:
        raise TransitionError("a COMPLETED record is replayed; release it to run the command again")
    if record["state"] == State.IN_PROGRESS and not is_stale(record, now):
        raise TransitionError("the record's lease is still live: its owner may still be running")


def check_mark_failed(record: Mapping[Any, Any], now: datetime) -> None:
    """Allow "mark failed (final)" on a FAILED record or a stuck IN_PROGRESS one (lease expired)."""
    if record["state"] == State.COMPLETED:
        raise TransitionError("a COMPLETED record cannot be marked failed")
    if record["state"] == State.IN_PROGRESS and not is_stale(record, now):
        raise TransitionError("the record's lease is still live: its owner may still be running")
