"""The operations API: what the CLI and the dashboard do to records. Needs an app context.

Listing functions return a :class:`Page`; every query is the store's (``store.py``) and served by an index of
``models.py``; "stuck" and "awaiting a decision" are the state machine's predicates, evaluated with the database's
clock. Actions follow the operator table (docs: "Operating it") as ``machine.operator_transition`` states it: a
refused action raises :class:`TransitionError` naming the rule and changes nothing; an action is a compare-and-set
on the record's ``version`` (the one the operator saw, when given), so an action on a record that changed since
fails with :class:`RecordChanged`; and it writes an event with the actor in the same transaction.
"""

from __future__ import annotations

import base64
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from flask import current_app

from . import reports, signals
from .context import RecordView
from .dberrors import LOST_RACE_ATTEMPTS, lost_race, retry_lost_race
from .decorator import RouteOptions, route_options
from .display import visible
from .machine import Action, TransitionError, lease_holder, operator_transition, record_ttl
from .models import storable_text
from .outbox_store import OutboxStore
from .reports import COUNT_LIMIT
from .state import AppState, app_state

logger = logging.getLogger("flask_idempotent")

__all__ = [
    "COUNT_LIMIT",
    "Action",
    "KINDS",
    "Page",
    "RecordChanged",
    "RecordNotFound",
    "TransitionError",
    "acknowledge",
    "act",
    "act_many",
    "activity",
    "get",
    "list_conflicts",
    "list_failed",
    "list_stuck",
    "mark_failed",
    "mark_retryable",
    "done_message",
    "now",
    "purge",
    "refusal",
    "release",
    "scope_label",
    "search",
    "select_records",
    "show",
    "stats",
]

MAX_PER_PAGE = 200
DEFAULT_PER_PAGE = 50
#: Pages beyond this are clamped to it: the row offset (``(page - 1) * per_page``) must fit the database's
#: 64-bit integer (PostgreSQL answers "bigint out of range", SQLite's driver raises ``OverflowError``).
MAX_PAGE = 1_000_000_000
#: Record ids are 64-bit integers: an id outside ``-MAX_ID - 1 .. MAX_ID`` is never looked up, it does not exist.
MAX_ID = 2**63 - 1


class RecordNotFound(LookupError):
    """No record with that id (or scope and key)."""


class RecordChanged(RuntimeError):
    """The record changed between reading it and acting on it; reload and decide again."""


@dataclass
class Page:
    """One page of a listing. ``page`` and ``per_page`` are clamped to 1..:data:`MAX_PAGE` and 1..200.

    ``total`` is exact up to :data:`COUNT_LIMIT`; beyond it ``total_capped`` is true and ``total`` is the limit.
    """

    items: list[dict[str, Any]]
    total: int
    page: int
    per_page: int
    extra: dict[str, Any] = field(default_factory=dict)
    total_capped: bool = False

    @property
    def pages(self) -> int:
        pages = max(1, -(-self.total // self.per_page))
        return max(pages, self.page) if self.total_capped else pages

    @property
    def has_next(self) -> bool:
        if self.total_capped:
            return len(self.items) == self.per_page
        return self.page < self.pages

    @property
    def has_prev(self) -> bool:
        return self.page > 1


def _state() -> AppState:
    state = app_state()
    state.check_schema()
    return state


def bounds(page: Any = 1, per_page: Any = DEFAULT_PER_PAGE) -> tuple[int, int]:
    """Clamp user-supplied paging values; anything unparsable becomes the default."""

    def as_int(value: Any, default: int) -> int:
        try:
            return int(value)
        except (TypeError, ValueError):
            return default

    page_n = min(MAX_PAGE, max(1, as_int(page, 1)))
    return page_n, min(MAX_PER_PAGE, max(1, as_int(per_page, DEFAULT_PER_PAGE)))


def _check_id(record_id: int) -> None:
    """An id no 64-bit column can hold is not found (and never reaches the driver, which would overflow)."""
    if not -MAX_ID - 1 <= record_id <= MAX_ID:
        raise RecordNotFound(f"no idempotency record with id {record_id}")


def record_dict(row: Any, *, body_limit: int | None = 0) -> dict[str, Any]:
    """A record as plain data (a row of the store's record reads, with ``is_stuck`` and ``db_now``).

    The body is left out unless ``body_limit`` is ``None`` (all) or positive. ``stuck`` and
    ``stuck_for_seconds`` are judged by the database's clock; ``never_expires`` is true while the record awaits
    a decision (IN_PROGRESS, or a final failure nobody acknowledged): it is kept past ``expires_at``.
    """
    data = dict(row._mapping)
    body = data.pop("response_body", None)
    # The token is a capability of the owning request, never shown; the process it names is.
    data["lease_holder"] = lease_holder(data.pop("lease_token", None))
    data.pop("is_expired", None)
    # Awaiting a decision (``machine.undecided``): ``expires_at`` does not apply until it is decided.
    data["never_expires"] = bool(data.pop("is_undecided", False))
    now = data.pop("db_now", None)
    data["response_body_size"] = None if body is None else len(body)
    if body is not None and body_limit != 0:
        shown = body if body_limit is None else body[:body_limit]
        try:
            data["response_body"] = shown.decode("utf-8")
        except UnicodeDecodeError:
            data["response_body_base64"] = base64.b64encode(shown).decode("ascii")
        data["response_body_truncated"] = len(shown) < len(body)
    data["stuck"] = bool(data.pop("is_stuck", False))
    data["stuck_for_seconds"] = (
        (now - data["locked_until"]).total_seconds() if data["stuck"] and now and data["locked_until"] else None
    )
    return data


def _page(query: Any, where: Any, page: Any, per_page: Any) -> Page:
    state = _state()
    store = state.store
    page_n, size = bounds(page, per_page)
    with state.records_engine.connect() as conn:
        total, capped = reports.bounded_count(store, conn, store.records, where)
        rows = reports.page(store, conn, query, size, (page_n - 1) * size)
    return Page([record_dict(r) for r in rows], total, page_n, size, total_capped=capped)


# Reading ----------------------------------------------------------------------------------------------------

#: Problems with the app's callbacks already logged (each is logged once per process, not on every page).
_WARNED: set[str] = set()


def warn_once(what: str, message: str, *args: Any, exc_info: bool = False) -> None:
    """Log a warning about the app's callbacks once per process (``what`` names the problem)."""
    if what not in _WARNED:
        _WARNED.add(what)
        logger.warning(message, *args, exc_info=exc_info)


def scope_label(scope: str, cache: dict[str, str | None] | None = None) -> str | None:
    """The app's ``scope_label`` for ``scope`` ("alice" for "1"), or ``None``: no callback, no label, the label
    is the scope itself, or a callback that raised or returned something other than a ``str`` (logged once;
    the dashboard and the CLI show the scope). ``cache`` keeps the answers of one page or command."""
    label_of = app_state().callbacks.scope_label
    if label_of is None or scope == "":
        return None
    if cache is not None and scope in cache:
        return cache[scope]
    label: str | None = None
    try:
        value = label_of(scope)
    except Exception:
        warn_once("scope_label raised", "scope_label(%r) raised; operators see raw scopes", scope, exc_info=True)
    else:
        if isinstance(value, str):
            label = value.strip() or None
        elif value is not None:
            warn_once(
                "scope_label type",
                "scope_label(%r) returned %s, not a str; operators see raw scopes",
                scope,
                type(value).__name__,
            )
    if label == scope:
        label = None  # nothing to add
    if cache is not None:
        cache[scope] = label
    return label


def stats() -> dict[str, Any]:
    """Counts by state, stuck records and the oldest one's age, failures (final ones awaiting a decision),
    conflicts in the last 24 h. Ages are measured with the database's clock."""
    state = _state()
    engine = state.records_engine
    with engine.connect() as conn:
        raw = reports.stats(state.store, conn, postgresql_estimate=engine.dialect.name == "postgresql")
    by_state = raw.pop("by_state")
    oldest = raw.pop("oldest_stuck_lease_end")
    now = raw.pop("db_now")
    return {
        "by_state": {name: by_state[name] for name in ("IN_PROGRESS", "COMPLETED", "FAILED")},
        "total": sum(by_state.values()),
        "oldest_stuck_seconds": None if oldest is None else (now - oldest).total_seconds(),
        "now": now,
        **raw,
    }


#: Record kinds: requests (``http``) and tasks and other code paths (``task``); lists filter by them.
KINDS = ("http", "task")


def _kind(kind: str | None) -> str | None:
    if kind is not None and kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
    return kind


def list_stuck(page: Any = 1, per_page: Any = DEFAULT_PER_PAGE, *, kind: str | None = None) -> Page:
    """IN_PROGRESS records whose lease expired (by the database's clock), longest stuck first; ``kind``
    (``http`` or ``task``) keeps only records of that kind."""
    query, where = reports.stuck(_state().store, _kind(kind))
    return _page(query, where, page, per_page)


def list_failed(
    retryable: bool | None = None,
    page: Any = 1,
    per_page: Any = DEFAULT_PER_PAGE,
    *,
    awaiting: bool = False,
    kind: str | None = None,
) -> Page:
    """FAILED records, newest first; ``retryable`` filters retryable (True) or final (False) ones; ``awaiting``
    lists only final failures nobody acknowledged yet ("awaiting a decision"); ``kind`` as for stuck."""
    query, where = reports.failed(_state().store, retryable, awaiting, _kind(kind))
    return _page(query, where, page, per_page)


def list_conflicts(since: datetime | None = None, page: Any = 1, per_page: Any = DEFAULT_PER_PAGE) -> Page:
    """Key reuse with another command, newest first: each item has the event and the original record's
    method, path and fingerprint (``record`` is ``None`` once the record was released or purged)."""
    state = _state()
    page_n, size = bounds(page, per_page)
    with state.records_engine.connect() as conn:
        total, capped, events, originals = reports.conflicts(state.store, conn, since, size, (page_n - 1) * size)
    items = []
    for ev in events:
        original = originals.get(ev.record_id)
        items.append({**dict(ev._mapping), "record": None if original is None else record_dict(original)})
    return Page(items, total, page_n, size, total_capped=capped)


#: At most this many scopes from the app's ``scope_search`` are searched.
MAX_SEARCH_SCOPES = 50


def search(query: str, page: Any = 1, per_page: Any = DEFAULT_PER_PAGE, *, scopes: Sequence[str] = ()) -> Page:
    """Records whose key or scope equals ``query`` exactly (bound parameters; index-served), and those of
    ``scopes`` (the scopes a label names: ``scope_search``; the first :data:`MAX_SEARCH_SCOPES` are used)."""
    page_n, size = bounds(page, per_page)
    select, where = reports.search(_state().store, query, page_n, size, list(scopes)[:MAX_SEARCH_SCOPES])
    return _page(select, where, page, per_page)


#: The overview's charts read at most this many times per series (the last 24 h); beyond it a chart says
#: "at least" (``capped``).
ACTIVITY_LIMIT = 20_000

#: How long the processes' replay counts are kept (``purge`` deletes older ones): the chart shows 24 hours.
REPLAY_COUNTS_KEPT = timedelta(hours=48)


def activity(hours: int = 24, limit: int = ACTIVITY_LIMIT) -> dict[str, Any]:
    """Per-hour counts of the last ``hours`` clock hours (the current one included), by the database's clock:
    ``created`` (first requests: records created), ``replays`` (the counts each process writes, see
    :class:`~flask_idempotent.state.ReplayTally`), ``conflicts`` (conflict events) and ``failed`` (records that
    are FAILED, by their ``updated_at``: when they failed or were last changed). Each series is
    ``{"counts": [...], "capped": bool}`` oldest hour first; ``hours`` lists the hours' starts.

    Bounded: each series reads at most ``limit`` timestamps (newest first) and buckets them here, which works
    the same on every database; a series that hit the limit is ``capped`` (its oldest bars are too low).
    """
    state = _state()
    state.replays.write_due(now_or_never=True)  # this process's own replays first (others write within a minute)
    with state.records_engine.connect() as conn:
        now = state.store.now(conn)
        start = now.replace(minute=0, second=0, microsecond=0) - timedelta(hours=hours - 1)
        raw = {
            name: ([(t, 1) for t in times], capped)
            for name, (times, capped) in reports.activity(state.store, conn, start, limit).items()
        }
        raw["replays"] = state.store.replays_since(conn, start, limit)
    starts = [start + timedelta(hours=i) for i in range(hours)]
    series: dict[str, Any] = {}
    for name, (weighted, capped) in raw.items():
        counts = [0] * hours
        for t, n in weighted:
            index = int((t - start).total_seconds() // 3600)
            if 0 <= index < hours:
                counts[index] += n
        series[name] = {"counts": counts, "capped": capped}
    return {"hours": starts, "now": now, **series}


def replay_tally_seconds() -> float:
    """How often each process writes its count of replays (``IDEMPOTENCY_REPLAY_TALLY_SECONDS``)."""
    return _state().replays.interval


def runbook_of(endpoint: str | None, method: str) -> str | None:
    """The ``runbook=`` of the route that wrote a record (``None`` for tasks and routes without one)."""
    view = current_app.view_functions.get(endpoint) if endpoint else None
    options = route_options(view, method)
    return None if options is None else options.runbook


def _with_events(conn: Any, state: AppState, row: Any, body_limit: int | None) -> dict[str, Any]:
    data = record_dict(row, body_limit=body_limit)
    data["runbook"] = runbook_of(data.get("endpoint"), str(data.get("method") or ""))
    data["events"] = [dict(ev._mapping) for ev in state.store.events_of(conn, row.id)]
    return data


def get(record_id: int, *, body_limit: int | None = 0) -> dict[str, Any]:
    """One record with its events (newest first). Raises :class:`RecordNotFound`."""
    _check_id(record_id)
    state = _state()
    with state.records_engine.connect() as conn:
        row = state.store.get(conn, record_id)
        if row is None:
            raise RecordNotFound(f"no idempotency record with id {record_id}")
        return _with_events(conn, state, row, body_limit)


def show(scope: str, key: str, *, body_limit: int | None = 0) -> dict[str, Any]:
    """The record of ``(scope, key)`` with its events. Raises :class:`RecordNotFound`."""
    state = _state()
    with state.records_engine.connect() as conn:
        row = state.store.find(conn, scope, key)
        if row is None:
            raise RecordNotFound(f"no idempotency record for scope {scope!r} and key {key!r}")
        return _with_events(conn, state, row, body_limit)


def now() -> datetime:
    """The database's clock: what "stuck" and every age on the dashboard and in the CLI are measured with."""
    state = _state()
    with state.records_engine.connect() as conn:
        return state.store.now(conn)


def refusal(action: Action | str, record: dict[str, Any]) -> str | None:
    """Why the state machine refuses ``action`` on ``record`` (a record dict), or ``None`` if it allows it."""
    try:
        operator_transition(Action(action), {**record, "is_stuck": record["stuck"]})
    except TransitionError as exc:
        return str(exc)
    return None


# Actions ----------------------------------------------------------------------------------------------------

#: What an applied action did, in words: the dashboard's message and the CLI's line.
DONE = {
    Action.MARK_RETRYABLE: "is now retryable: the next retry runs it again",
    Action.MARK_FAILED: "is now failed for good: retries get the failure",
    Action.ACKNOWLEDGE: "is acknowledged: it stays failed, decided",
    Action.RELEASE: "was released: the key is free again",
}


def done_message(action: Action | str, record: dict[str, Any]) -> str:
    """``Record 11 (key "k") is now retryable: ...`` for an applied ``action`` (control characters escaped)."""
    return f'Record {record["id"]} (key "{visible(record["key"])}") {DONE[Action(action)]}.'


def act(action: Action | str, record_id: int, *, actor: str, version: int | None = None) -> dict[str, Any]:
    """Apply an operator ``action`` to record ``record_id`` as ``actor`` (docs: "Operating it", the operator table).

    ``version`` is the version of the record the operator looked at; without it, the version read here.
    Raises :class:`RecordNotFound`, :class:`TransitionError` (the rule that refused it; nothing changed) or
    :class:`RecordChanged` (the record is at another version: look again, then decide).
    """
    action = Action(action)
    if not actor:
        raise ValueError("an operator action needs the actor's name")
    _check_id(record_id)
    try:
        # An action that lost a race (SERIALIZABLE, a deadlock) changed nothing; run again, it reads the record
        # afresh and still compares the version the operator saw.
        stored = storable_text(actor, 255)  # acknowledged_by and the event's actor hold any name (docs: The record)
        result = retry_lost_race(lambda: _act_once(action, record_id, stored, version))
    except sa.exc.DBAPIError as exc:
        if not lost_race(exc):
            raise
        raise RecordChanged(
            f"record {record_id} is being changed by others right now (the database refused the action"
            f" {LOST_RACE_ATTEMPTS} times); look at it again, then decide"
        ) from exc
    signals.operator_action.send(
        current_app._get_current_object(),  # type: ignore[attr-defined]
        record=RecordView.of(result),
        action=action.value,
        actor=actor,
    )
    return result


def _act_once(action: Action, record_id: int, actor: str, version: int | None) -> dict[str, Any]:
    """One transaction of :func:`act`: read, check, compare-and-set, event; the record as it is after."""
    state = _state()
    store = state.store
    with state.records_engine.begin() as conn:
        row = store.get(conn, record_id)
        if row is None:
            raise RecordNotFound(f"no idempotency record with id {record_id}")
        if version is not None and row.version != version:
            raise RecordChanged(
                f"record {record_id} changed since you looked at it (version {version}, now {row.version});"
                " look at it again, then decide"
            )
        transition = operator_transition(action, row._mapping)
        if transition.delete:
            done = store.delete_at_version(conn, record_id, row.version)
        else:
            values = dict(transition.values)
            if transition.acknowledge:
                values["acknowledged_by"] = actor
            # The decision starts the record's ttl afresh: the clock never undoes it (docs: "The record").
            ttl = record_ttl(row._mapping, state.resolve(RouteOptions()).ttl)
            done = store.update_at_version(
                conn, record_id, row.version, values, ttl=ttl, acknowledge=transition.acknowledge
            )
        if not done:
            raise RecordChanged(f"record {record_id} changed while acting on it; look at it again, then decide")
        store.add_event(
            conn,
            record_id=row.id,
            scope=row.scope,
            key=row.key,
            kind=action.event,
            actor=actor,
            detail={
                "from_state": row.state,
                "retryable": row.retryable,
                "attempts": row.attempts,
                "version": row.version,
                "recovery_point": row.recovery_point,
                "lease_holder": lease_holder(row.lease_token),
            },
        )
        after = None if transition.delete else store.get(conn, record_id)
    logger.info(
        "record %s (key %r, scope %r): %s by %s (it was %s%s, version %s)",
        row.id,
        row.key,
        row.scope,
        action.value,
        actor,
        row.state,
        " retryable" if row.state == "FAILED" and row.retryable else "",
        row.version,
    )
    return record_dict(after if after is not None else row)


def mark_retryable(record_id: int, *, actor: str, version: int | None = None) -> dict[str, Any]:
    """FAILED or stuck IN_PROGRESS → FAILED retryable: the next retry runs the view again (attempts + 1).

    The old lease token is invalidated, so a late completion of a presumed-dead owner is refused.
    """
    return act(Action.MARK_RETRYABLE, record_id, actor=actor, version=version)


def mark_failed(record_id: int, *, actor: str, version: int | None = None) -> dict[str, Any]:
    """FAILED retryable or stuck IN_PROGRESS → FAILED final: retries get the stored failure (or 500 ``failed``)."""
    return act(Action.MARK_FAILED, record_id, actor=actor, version=version)


def acknowledge(record_id: int, *, actor: str, version: int | None = None) -> dict[str, Any]:
    """A final failure stays as it is, and leaves the "awaiting a decision" list (it was looked at)."""
    return act(Action.ACKNOWLEDGE, record_id, actor=actor, version=version)


def release(record_id: int, *, actor: str, version: int | None = None) -> dict[str, Any]:
    """Delete the record: the key is free, and the next request with it runs as new. The event stays.

    Refused while the record is IN_PROGRESS with a live lease: its owner may still be running.
    """
    return act(Action.RELEASE, record_id, actor=actor, version=version)


# Bulk actions -----------------------------------------------------------------------------------------------

#: The lists a bulk action selects from (``which``): stuck records, and FAILED ones as :func:`list_failed` has them.
BULK_LISTS = ("stuck", "failed", "awaiting", "final", "retryable")
#: A bulk action acts on at most this many records per call (the CLI's ``--limit``).
MAX_BULK = 1000


def select_records(
    which: str,
    *,
    endpoint: str | None = None,
    recovery_point: str | None = None,
    older_than: timedelta | None = None,
    kind: str | None = None,
    limit: int = 100,
) -> list[dict[str, Any]]:
    """The records a bulk action would act on: those of the list ``which`` (:data:`BULK_LISTS`, in that list's
    order) of ``endpoint``, at ``recovery_point``, last changed more than ``older_than`` ago by the database's
    clock; at most ``limit`` (1..:data:`MAX_BULK`)."""
    if which not in BULK_LISTS:
        raise ValueError(f"which must be one of {', '.join(BULK_LISTS)}, got {which!r}")
    if not 1 <= limit <= MAX_BULK:
        raise ValueError(f"limit must be 1..{MAX_BULK}")
    if older_than is not None and older_than < timedelta(0):
        raise ValueError("older_than must not be negative")
    state = _state()
    store = state.store
    if which == "stuck":
        query, _ = reports.stuck(store, _kind(kind))
    else:
        retryable = {"failed": None, "awaiting": False, "final": False, "retryable": True}[which]
        query, _ = reports.failed(store, retryable, which == "awaiting", _kind(kind))
    with state.records_engine.connect() as conn:
        cutoff = None if older_than is None else store.now(conn) - older_than
        query = reports.narrow(store, query, endpoint=endpoint, recovery_point=recovery_point, changed_before=cutoff)
        rows = reports.page(store, conn, query, limit, 0)
    return [record_dict(row) for row in rows]


#: What a dry run says an allowed action would do.
WOULD = {
    Action.MARK_RETRYABLE: "would be marked retryable",
    Action.MARK_FAILED: "would be marked failed (final)",
    Action.ACKNOWLEDGE: "would be acknowledged",
    Action.RELEASE: "would be released",
}


def act_many(
    action: Action | str, records: Sequence[dict[str, Any]], *, actor: str, dry_run: bool = False
) -> list[dict[str, Any]]:
    """Apply ``action`` to each of ``records`` (as :func:`select_records` read them) under the operator rules,
    one record at a time, each a compare-and-set on the version read: a record that changed since is not acted
    on. Returns one result per record: ``id``, ``key``, ``outcome`` (``done``; ``refused`` with the rule;
    ``changed``; ``not-found``; with ``dry_run`` ``would`` or ``refused``, and nothing changes) and ``message``.
    """
    action = Action(action)
    results = []
    for seen in records:
        result: dict[str, Any] = {"id": seen["id"], "key": seen["key"], "version": seen["version"]}
        refused = refusal(action, seen)
        if refused:
            result.update(outcome="refused", message=refused)
        elif dry_run:
            result.update(outcome="would", message=WOULD[action])
        else:
            try:
                after = act(action, seen["id"], actor=actor, version=seen["version"])
            except TransitionError as exc:
                result.update(outcome="refused", message=str(exc))
            except RecordChanged as exc:
                result.update(outcome="changed", message=str(exc))
            except RecordNotFound as exc:
                result.update(outcome="not-found", message=str(exc))
            else:
                result.update(outcome="done", message=done_message(action, after), version=after["version"])
        results.append(result)
    return results


#: Seconds :func:`purge` rests between batches by default, leaving the database to the request path.
PURGE_PAUSE = 0.05


def purge(*, batch_size: int = 1000, max_batches: int | None = None, pause: float = PURGE_PAUSE) -> int:
    """Delete expired COMPLETED and FAILED records (``machine.expired``) in batches; return how many.

    Each batch is its own short transaction. On PostgreSQL rows locked by a running request are skipped
    (``FOR UPDATE SKIP LOCKED``) instead of waited for. A record awaiting a decision (IN_PROGRESS, or a final
    failure nobody acknowledged) is never purged; acknowledging it starts its ttl. Between batches
    it sleeps ``pause`` seconds: back to back, batches of 1000 more than doubled the p99 of concurrent
    requests in the benchmark (see the docs' "Performance").
    """
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    if pause < 0:
        raise ValueError("pause must not be negative")
    state = _state()
    total = _in_batches(
        lambda: retry_lost_race(lambda: _purge_batch(state, batch_size)), batch_size, max_batches, pause
    )
    with state.records_engine.begin() as conn:  # the replay counts behind the overview's last-24-hours chart
        state.store.purge_replays(conn, REPLAY_COUNTS_KEPT.total_seconds())
    return total


def purge_outbox(*, batch_size: int = 1000, max_batches: int | None = None, pause: float = PURGE_PAUSE) -> int:
    """Delete DELIVERED outbox jobs past their ttl (docs: "The outbox") in batches, as :func:`purge` does
    records; return how many. PENDING and DEAD jobs are never purged. Without an outbox table: 0."""
    state = _state()
    with state.records_engine.connect() as conn:
        if not sa.inspect(conn).has_table(state.tables.outbox.name):
            return 0
    store = OutboxStore(state.tables.outbox, state.store.offset)

    def batch() -> int:
        with state.records_engine.begin() as conn:
            return store.purge_batch(conn, batch_size)

    return _in_batches(batch, batch_size, max_batches, pause)


def _in_batches(batch: Callable[[], int], batch_size: int, max_batches: int | None, pause: float) -> int:
    """Run ``batch()`` (deleting up to ``batch_size``) until one comes back short or after ``max_batches``,
    resting ``pause`` seconds between batches; return the total deleted."""
    total = batches = 0
    while max_batches is None or batches < max_batches:
        deleted = batch()
        total += deleted
        batches += 1
        if deleted < batch_size or batches == max_batches:
            break
        if pause:
            time.sleep(pause)
    return total


def _purge_batch(state: AppState, batch_size: int) -> int:
    with state.records_engine.begin() as conn:
        return state.store.purge_batch(conn, batch_size)
