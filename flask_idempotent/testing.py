"""Prove your own routes idempotent: the test helpers of the testing kit (docs/testing.md).

The layer's guarantees hold only where a route is set up right: ``@idempotent`` below the route decorator, a
``scope_loader`` when more than one client sends keys, ``atomic=True`` views that never commit. Each helper
drives a route through the situation it names and asserts what docs/behaviour.md's HTTP table promises, on the response
*and* on the stored record; when it fails, the ``AssertionError`` names the set-up mistake it found.

- :func:`assert_idempotent`: a retry is a byte-identical replay, another body is 422, no key is 400, the view
  ran once (optionally: the same key from another client is a separate operation);
- :func:`duplicate_burst`: N concurrent requests with one key against a served app: one execution;
- :func:`crash_after_effect`: the worker dies after the view's effect; the retry answers as docs/behaviour.md says;
- :func:`store_outage`: the database is cut off for the app; protected requests answer 503, no view runs;
- :class:`LeaseClock` (fixture ``lease_clock``): moves the database's clock as the layer sees it.

The ``lease_clock`` fixture comes from the pytest plugin ``flask_idempotent_pytest``, which the package's
``pytest11`` entry point loads. This module does not import pytest, and nothing else in ``flask_idempotent``
imports it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import http.client
import json as jsonlib
import threading
import urllib.parse
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

import sqlalchemy as sa
from flask import Flask, current_app, request_finished
from flask import request as current_request
from flask.testing import FlaskClient
from werkzeug.datastructures import Headers
from werkzeug.exceptions import HTTPException
from werkzeug.test import TestResponse
from werkzeug.wrappers import Response as BaseResponse

from . import operations, signals
from .constants import REPLAYED_HEADER, UNSAFE_METHODS, ConfigKey
from .context import RecordView, get_current
from .decorator import RouteOptions, misplaced, route_options
from .errors import AtomicViewCommitted
from .state import AppState, Resolved, app_state

__all__ = [
    "BurstResult",
    "CrashResult",
    "IdempotencyCheck",
    "LeaseClock",
    "Outage",
    "Reply",
    "assert_idempotent",
    "crash_after_effect",
    "duplicate_burst",
    "store_outage",
    "view_runs",
]

_EXTENSION_KEY = "idempotency_testing"
_COUNTED_ATTRIBUTE = "_flask_idempotent_counted"
_KEY_PREFIX = "kit-"


# View-run counting ------------------------------------------------------------------------------------------


class _WorkerKilled(BaseException):
    """Raised by a view :func:`crash_after_effect` kills: like SIGKILL, nothing after the view runs."""


class _Kit:
    """Per app: how often each view body ran, and a one-shot crash; installed by every helper."""

    def __init__(self) -> None:
        self.runs: Counter[str] = Counter()
        self.crash_next: str | None = None
        #: The exception the last counted view raised (an atomic view's commit, say).
        self.raised: BaseException | None = None
        self._lock = threading.Lock()

    def counted(self, endpoint: str, view: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(view)  # keeps @idempotent's options on the wrapper
        def run(*args: Any, **kwargs: Any) -> Any:
            with self._lock:
                self.runs[endpoint] += 1
                crash = self.crash_next == endpoint
                if crash:
                    self.crash_next = None
            try:
                result = current_app.ensure_sync(view)(*args, **kwargs)
            except BaseException as exc:
                self.raised = exc
                raise
            if crash:
                _kill_request()
            return result

        setattr(run, _COUNTED_ATTRIBUTE, True)
        return run


def _kill_request() -> None:
    """End the request the way a killed worker does: no outcome is stored, no transaction commits."""
    ctx = get_current()
    if ctx is not None:
        ctx.settle()  # after_request and teardown_request then leave the record as the view left it
    raise _WorkerKilled


def _install(app: Flask) -> _Kit:
    """Count view runs on ``app`` (once); fail at once if ``@idempotent`` sits above a route decorator."""
    wrong = misplaced(app.view_functions)
    if wrong:
        raise AssertionError(
            f"@idempotent is placed above the route decorator on {', '.join(wrong)}: the route registered the"
            " unprotected function, so nothing of it is idempotent. Put @idempotent below @app.route/@app.post"
            " (closest to the function)."
        )
    kit: _Kit | None = app.extensions.get(_EXTENSION_KEY)
    if kit is None:
        kit = app.extensions[_EXTENSION_KEY] = _Kit()
    for endpoint, view in list(app.view_functions.items()):
        if not getattr(view, _COUNTED_ATTRIBUTE, False):
            app.view_functions[endpoint] = kit.counted(endpoint, view)
    return kit


def view_runs(app: Flask, endpoint: str | None = None) -> int:
    """How often the kit saw view bodies of ``app`` run (``endpoint``'s, or all) since a helper installed it.

    Counting starts with the first helper called on the app; call ``view_runs`` itself first to start it.
    """
    kit = _install(app)
    return kit.runs[endpoint] if endpoint is not None else sum(kit.runs.values())


# Reading the layer ------------------------------------------------------------------------------------------


def _endpoint(app: Flask, method: str, url: str) -> str:
    path = urllib.parse.urlsplit(url).path
    try:
        endpoint, _ = app.url_map.bind("localhost").match(path, method=method)
    except HTTPException as exc:
        raise AssertionError(f"{method} {path} matches no route of the app ({exc.code})") from None
    return str(endpoint)


def _protection(app: Flask, endpoint: str, method: str) -> Resolved:
    """The route's resolved options; fails when the layer cannot protect it (names why)."""
    state = app_state(app)
    if not state.enabled:
        raise AssertionError(
            f"{ConfigKey.ENABLED} is False on this app: the layer is switched off and protects nothing. The kit"
            " proves routes with the layer on; keep the switch for unit tests of view logic only."
        )
    route = route_options(app.view_functions[endpoint], method)
    if route is None and state.protect_all:
        route = RouteOptions()
    if route is None:
        raise AssertionError(f"the view of {endpoint!r} has no @idempotent: requests to it are not protected")
    if route.exempt:
        raise AssertionError(f"the view of {endpoint!r} is @idempotent(exempt=True): requests to it are not protected")
    return state.resolve(route)


@contextlib.contextmanager
def _claims(app: Flask) -> Iterator[list[RecordView]]:
    """The records claimed on ``app`` while the block runs (``record_claimed`` signals)."""
    seen: list[RecordView] = []

    def claimed(sender: Any, record: RecordView, **_: Any) -> None:
        seen.append(record)

    with signals.record_claimed.connected_to(claimed, sender=app):
        yield seen


def _record(app: Flask, scope: str, key: str) -> dict[str, Any] | None:
    with app.app_context():
        try:
            return operations.show(scope, key)
        except operations.RecordNotFound:
            return None


def _records_with_key(app: Flask, key: str) -> list[dict[str, Any]]:
    with app.app_context():
        found = operations.search(key, per_page=operations.MAX_PER_PAGE).items
    return [r for r in found if r["key"] == key]


def _problem(response: Any) -> str | None:
    """The problem code (``missing-key``...) of a problem+json response, else ``None``."""
    if not response.headers.get("Content-Type", "").startswith("application/problem+json"):
        return None
    try:
        kind = str(jsonlib.loads(response.get_data())["type"])
    except (ValueError, KeyError, TypeError):
        return None
    return kind.rstrip("/").rsplit("/", 1)[-1].rsplit(":", 1)[-1]


def _show(response: TestResponse | Reply) -> str:
    body = response.get_data()[:300].decode("utf-8", "replace")
    replayed = " (replayed)" if response.headers.get(REPLAYED_HEADER) == "true" else ""
    return f"{response.status_code}{replayed} {body!r}"


def _atomic_commit_error(kit: _Kit, record: Mapping[str, Any] | None) -> str | None:
    stored_error = str((record or {}).get("error") or "")
    if isinstance(kit.raised, AtomicViewCommitted) or stored_error.startswith(AtomicViewCommitted.__name__):
        return (
            "the view commits db.session in atomic mode: an @idempotent(atomic=True) view must not call"
            " db.session.commit() (the layer commits its writes together with the outcome, so nothing of this"
            " request was saved). Remove the commit, or use leased mode if the view has an outside effect."
        )
    return None


def _open(client: FlaskClient, kit: _Kit, url: str, method: str, **kwargs: Any) -> TestResponse:
    """``client.open``; an exception it propagates (``TESTING`` propagates them) that names a known mistake fails."""
    kit.raised = None
    try:
        return client.open(url, method=method, **kwargs)
    except Exception as exc:
        commit_error = _atomic_commit_error(kit, None)
        if commit_error:
            raise AssertionError(commit_error) from exc
        raise


def _shared_scope(app: Flask, scope: str) -> str:
    if app_state(app).callbacks.scope_loader is None:
        return (
            f"two clients share one record (scope {scope!r}) because no scope_loader is set: every client's keys"
            " live in one global scope, so a client can receive another client's stored response. Register"
            " @idempotency.scope_loader returning the user, API-key or tenant id."
        )
    return (
        f"two clients share one record: the scope_loader returned the same scope {scope!r} for both; it must"
        " name who owns the key (the user, API-key or tenant id)."
    )


# assert_idempotent ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class IdempotencyCheck:
    """What :func:`assert_idempotent` sent and saw, for further assertions of your own."""

    key: str
    first: TestResponse
    replay: TestResponse
    conflict: TestResponse
    missing_key: TestResponse | None
    other_client: TestResponse | None
    #: The first client's record at the end (``operations.show``'s dict: state, attempts, response_status...).
    record: dict[str, Any]


def _different(json: Any, data: Any) -> dict[str, Any]:
    if isinstance(json, dict):
        return {"json": {**json, "flask_idempotent_probe": uuid.uuid4().hex}}
    if json is not None:
        return {"json": {"flask_idempotent_probe": json}}
    if isinstance(data, dict):
        return {"data": {**data, "flask_idempotent_probe": uuid.uuid4().hex}}
    if isinstance(data, (str, bytes)):
        extra = b"\n" if isinstance(data, bytes) else "\n"
        return {"data": data + extra}  # type: ignore[operator]
    return {"json": {"flask_idempotent_probe": uuid.uuid4().hex}}


def assert_idempotent(
    client: FlaskClient,
    method: str,
    url: str,
    *,
    json: Any = None,
    data: Any = None,
    headers: Mapping[str, str] | None = None,
    other_json: Any = None,
    other_data: Any = None,
    other_client: FlaskClient | None = None,
    other_headers: Mapping[str, str] | None = None,
    key: str | None = None,
) -> IdempotencyCheck:
    """Prove that ``method url`` with this body is idempotent; raise ``AssertionError`` naming what is wrong.

    Sends, with a fresh key (or ``key``) in the app's key header:

    1. the request: the view runs once, the record is COMPLETED with ``attempts`` 1;
    2. the same request again: the same status and byte-identical body, ``Idempotent-Replayed: true``, the view
       not run, the record unchanged;
    3. the same key with another body (``other_json``/``other_data``, by default the body plus a probe field):
       422 ``key-reused``, the view not run, the record unchanged;
    4. no key (routes that require one and read it from the header): 400 ``missing-key``, the view not run;
    5. with ``other_headers`` and/or ``other_client`` (another client's credentials): the same key and body
       from that client is an operation of its own: the view runs again and a record of another scope is
       stored. Without a ``scope_loader`` that fails, saying two clients share one record.

    ``client`` is a Flask test client (pytest-flask's ``client`` fixture works). Returns the responses and the
    record as an :class:`IdempotencyCheck`.
    """
    app: Flask = client.application
    method = method.upper()
    if method not in UNSAFE_METHODS:
        raise ValueError(f"assert_idempotent needs an unsafe method ({', '.join(sorted(UNSAFE_METHODS))})")
    kit = _install(app)
    endpoint = _endpoint(app, method, url)
    options = _protection(app, endpoint, method)
    state = app_state(app)
    key = key or f"{_KEY_PREFIX}{uuid.uuid4().hex}"
    base = dict(headers or {})
    keyed = {**base, state.header: key} if options.key is None else base
    body = {"json": json} if json is not None else {"data": data}

    def send(
        extra: Mapping[str, str], payload: Mapping[str, Any], by: FlaskClient = client
    ) -> tuple[TestResponse, int, list[RecordView]]:
        before = kit.runs[endpoint]
        with _claims(app) as claimed:
            response = _open(by, kit, url, method, headers=dict(extra), **payload)
        return response, kit.runs[endpoint] - before, claimed

    first, ran, claimed = send(keyed, body)
    owner = claimed[0] if claimed else None
    record = None if owner is None else _record(app, owner.scope, owner.key)
    commit_error = _atomic_commit_error(kit, record)
    if commit_error:
        raise AssertionError(commit_error)
    if ran != 1 or owner is None or record is None:
        raise AssertionError(
            f"the first {method} {url} ran the view {ran} time(s) and claimed {len(claimed)} record(s); expected"
            f" one run and one record. Response: {_show(first)}"
        )
    if record["state"] != "COMPLETED" or record["attempts"] != 1:
        raise AssertionError(
            f"the first request left its record {record['state']} (attempts {record['attempts']}, error"
            f" {record['error']!r}); assert_idempotent needs a request that completes. Response: {_show(first)}"
        )

    replay, ran, claimed = send(keyed, body)
    if ran or claimed:
        scopes = [c.scope for c in claimed]
        hint = (
            f" The retry was given another scope ({owner.scope!r}, then {scopes[0]!r}): the scope_loader must"
            " return the same value for the same client."
            if scopes and scopes[0] != owner.scope
            else ""
        )
        raise AssertionError(
            f"the retry with the same key ran the view again ({ran} run(s)).{hint} Response: {_show(replay)}"
        )
    if replay.headers.get(REPLAYED_HEADER) != "true":
        raise AssertionError(f"the retry is not marked {REPLAYED_HEADER}: true. Response: {_show(replay)}")
    if replay.status_code != first.status_code or replay.get_data() != first.get_data():
        raise AssertionError(f"the replay differs from the first response: {_show(first)} then {_show(replay)}")
    _unchanged(app, record, "the replay")

    other = {"json": other_json} if other_json is not None else {"data": other_data} if other_data else {}
    conflict, ran, _ = send(keyed, other or _different(json, data))
    if conflict.status_code != 422 or _problem(conflict) != "key-reused" or ran:
        raise AssertionError(
            "the same key with another body must be refused with 422 key-reused without running the view; got"
            f" {_show(conflict)} (view runs: {ran}). A fingerprint= callable that ignores the changed field"
            " makes this pass the other body as the same command: pass other_json= with a change it sees."
        )
    _unchanged(app, record, "the 422")

    missing = None
    if options.required and options.key is None:
        missing, ran, _ = send(base, body)
        if missing.status_code != 400 or _problem(missing) != "missing-key" or ran:
            raise AssertionError(f"a request without {state.header} must be 400 missing-key; got {_show(missing)}")

    crossed = None
    if other_client is not None or other_headers is not None:
        crossed, ran, claimed = send(
            {**(other_headers or base), state.header: key} if options.key is None else dict(other_headers or base),
            body,
            other_client or client,
        )
        if not ran or not claimed or claimed[0].scope == owner.scope:
            raise AssertionError(_shared_scope(app, owner.scope) + f" The other client got {_show(crossed)}")
    final = _record(app, owner.scope, owner.key)
    assert final is not None
    return IdempotencyCheck(key, first, replay, conflict, missing, crossed, final)


def _unchanged(app: Flask, before: Mapping[str, Any], after_what: str) -> None:
    now = _record(app, before["scope"], before["key"])
    fields = ("state", "attempts", "version", "response_status")
    if now is None or any(now[f] != before[f] for f in fields):
        seen = None if now is None else {f: now[f] for f in fields}
        raise AssertionError(f"{after_what} changed the record: { ({f: before[f] for f in fields}) } became {seen}")


# duplicate_burst --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Reply:
    """One response of :func:`duplicate_burst`, read off the wire."""

    status_code: int
    headers: Headers
    body: bytes
    #: Which of ``clients`` sent it (0 without ``clients``).
    client: int = 0

    def get_data(self) -> bytes:
        return self.body

    @property
    def replayed(self) -> bool:
        return self.headers.get(REPLAYED_HEADER) == "true"


@dataclass(frozen=True)
class BurstResult:
    """What :func:`duplicate_burst` sent and saw: the key, every reply, and the original per client."""

    key: str
    replies: list[Reply]
    originals: dict[int, Reply] = field(default_factory=dict)


def _send(url: str, method: str, headers: Mapping[str, str], body: bytes | None, timeout: float) -> Reply:
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"duplicate_burst needs an http(s) URL of a served app, got {url!r}")
    kind = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    conn = kind(parts.hostname, parts.port, timeout=timeout)
    try:
        conn.request(method, urllib.parse.urlunsplit(("", "", parts.path or "/", parts.query, "")), body, dict(headers))
        response = conn.getresponse()
        return Reply(response.status, Headers(response.getheaders()), response.read())
    finally:
        conn.close()


def duplicate_burst(
    url: str,
    *,
    method: str = "POST",
    json: Any = None,
    data: bytes | str | None = None,
    headers: Mapping[str, str] | None = None,
    clients: Sequence[Mapping[str, str]] | None = None,
    n: int = 8,
    key: str | None = None,
    key_header: str | None = None,
    app: Flask | None = None,
    timeout: float = 30.0,
) -> BurstResult:
    """Send ``n`` requests with one key at once (threads released by a barrier) to a served app's ``url``.

    Asserts one execution: exactly one original response (neither a replay nor a refusal); every other reply
    is 409 ``in-progress`` (or 202, as configured), 503 ``store-unavailable`` (not run) or a replay of the
    original, byte for byte. With ``clients`` (one header mapping per client, e.g. each one's Authorization),
    ``n`` requests go out per client and each client must get one original of its own: the key is per client.
    With ``app`` (the served app's object, for a server in this process or on the same database), the record
    of each client is read too: COMPLETED with ``attempts`` 1; an in-process app also counts view runs.
    ``key_header`` defaults to ``app``'s ``IDEMPOTENCY_HEADER``, else ``Idempotency-Key``.
    """
    if n < 2:
        raise ValueError("duplicate_burst needs n >= 2 requests")
    key = key or f"{_KEY_PREFIX}{uuid.uuid4().hex}"
    payload: bytes | None = None
    if key_header is None:
        key_header = app_state(app).header if app is not None else "Idempotency-Key"
    sent = {key_header: key, **(headers or {})}
    if json is not None:
        payload = jsonlib.dumps(json).encode()
        sent.setdefault("Content-Type", "application/json")
    elif data is not None:
        payload = data.encode() if isinstance(data, str) else data
    who = [dict(c) for c in clients] if clients else [{}]
    kit = _install(app) if app is not None else None
    runs_before = sum(kit.runs.values()) if kit is not None else 0
    jobs = [(i, {**sent, **c}) for i, c in enumerate(who) for _ in range(n)]
    barrier = threading.Barrier(len(jobs))
    replies: list[Reply | BaseException] = [RuntimeError("no reply")] * len(jobs)

    def run(slot: int, client: int, request_headers: dict[str, str]) -> None:
        try:
            barrier.wait(timeout)
            reply = _send(url, method.upper(), request_headers, payload, timeout)
            replies[slot] = dataclasses.replace(reply, client=client)
        except BaseException as exc:  # reported below
            replies[slot] = exc

    threads = [threading.Thread(target=run, args=(s, c, h), daemon=True) for s, (c, h) in enumerate(jobs)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout + 5)
    errors = [r for r in replies if isinstance(r, BaseException)]
    if errors:
        raise AssertionError(f"{len(errors)} of {len(jobs)} requests got no response: {errors[0]!r}")
    done = [r for r in replies if isinstance(r, Reply)]
    result = BurstResult(key, done)
    for client in range(len(who)):
        mine = [r for r in done if r.client == client]
        originals = [r for r in mine if not r.replayed and _problem(r) not in ("in-progress", "store-unavailable")]
        label = f"client {client}: " if clients else ""
        if len(originals) != 1:
            detail = "; ".join(_show(r) for r in originals[:3]) or "; ".join(_show(r) for r in mine[:3])
            hint = _burst_hint(app, kit, key, len(who))
            raise AssertionError(
                f"{label}{len(originals)} of {len(mine)} requests were executed, expected 1.{hint} {detail}"
            )
        original = result.originals[client] = originals[0]
        for reply in mine:
            if reply.replayed and (reply.status_code, reply.body) != (original.status_code, original.body):
                raise AssertionError(
                    f"{label}a replay differs from the original: {_show(original)} then {_show(reply)}"
                )
    if app is not None:
        assert kit is not None
        _check_burst_records(app, kit, key, len(who))
        ran = sum(kit.runs.values()) - runs_before
        if ran and ran != len(who):  # 0: the app object is not the one serving (another process)
            raise AssertionError(f"the view ran {ran} times for {len(who)} client(s)")
    return result


def _burst_hint(app: Flask | None, kit: _Kit | None, key: str, clients: int) -> str:
    if app is None:
        if clients > 1:
            return (
                " Two clients share one record (one scope): the app has no scope_loader, or it returns the same"
                " scope for both."
            )
        return " Is the route @idempotent (below the route decorator), and is the key header the app reads?"
    found = _records_with_key(app, key)
    commit_error = _atomic_commit_error(kit, found[0] if found else None) if kit is not None else None
    if commit_error:
        return f" {commit_error}"
    if clients > 1 and len(found) < clients:
        return " " + _shared_scope(app, found[0]["scope"] if found else "")
    if not found:
        return " No record was stored for the key: is the route @idempotent, and the key header the app reads?"
    return ""


def _check_burst_records(app: Flask, kit: _Kit, key: str, clients: int) -> None:
    found = _records_with_key(app, key)
    if len(found) != clients:
        scope = found[0]["scope"] if found else ""
        hint = _shared_scope(app, scope) if len(found) < clients else "the scope changed between requests"
        raise AssertionError(f"{len(found)} record(s) for the key from {clients} client(s): {hint}")
    for rec in found:
        if rec["state"] != "COMPLETED" or rec["attempts"] != 1:
            commit_error = _atomic_commit_error(kit, rec)
            if commit_error:
                raise AssertionError(commit_error)
            raise AssertionError(
                f"the record of scope {rec['scope']!r} is {rec['state']} with attempts {rec['attempts']}"
            )


# crash_after_effect -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CrashResult:
    """What :func:`crash_after_effect` saw: the record the crash left, and the retries' responses."""

    key: str
    #: The record right after the crash (``None`` in atomic mode: nothing was committed).
    left: dict[str, Any] | None
    #: Leased mode: the retry while the lease is live (409 in-progress); atomic mode: ``None``.
    while_live: TestResponse | None
    #: The retry after the lease ran out (leased: 409 stuck, or the takeover's response); atomic: the re-run.
    after_expiry: TestResponse
    #: With ``other_headers``: the other client's request with the same key, right after the crash.
    other_client: TestResponse | None = None


def crash_after_effect(
    client: FlaskClient,
    method: str,
    url: str,
    *,
    clock: LeaseClock,
    json: Any = None,
    data: Any = None,
    headers: Mapping[str, str] | None = None,
    other_headers: Mapping[str, str] | None = None,
    key: str | None = None,
) -> CrashResult:
    """Kill the request right after its view ran (its effect is done, its outcome never stored) and retry.

    The view returns, then the request dies like a worker killed by SIGKILL: no outcome is written and no
    transaction commits. Asserts what docs/behaviour.md's HTTP table says for the route's mode:

    - leased mode: the record is left IN_PROGRESS (attempts 1); a retry while the lease is live is 409
      ``in-progress`` (or 202) and does not run the view; ``clock`` is then moved past the lease and the retry
      is 409 ``stuck`` with the record untouched (``on_stale="hold"``), or runs the view again as a takeover
      (attempts 2, COMPLETED; ``on_stale="takeover"``);
    - atomic mode: nothing was committed (no record); the retry runs the view again and completes.

    With ``other_headers`` (another client's credentials), that client's request with the same key, sent right
    after the crash, must run as an operation of its own (a record of another scope), not meet the crashed one.
    ``clock`` is the ``lease_clock`` fixture (installed on the app here).
    """
    app: Flask = client.application
    method = method.upper()
    kit = _install(app)
    endpoint = _endpoint(app, method, url)
    options = _protection(app, endpoint, method)
    clock.install(app)
    header = app_state(app).header
    key = key or f"{_KEY_PREFIX}{uuid.uuid4().hex}"
    sent = {**(headers or {}), header: key} if options.key is None else dict(headers or {})
    body = {"json": json} if json is not None else {"data": data}

    def retry(extra: Mapping[str, str] = sent) -> tuple[TestResponse, int]:
        before = kit.runs[endpoint]
        response = _open(client, kit, url, method, headers=extra, **body)
        return response, kit.runs[endpoint] - before

    kit.crash_next = endpoint
    with _claims(app) as claimed:
        try:
            response = _open(client, kit, url, method, headers=sent, **body)
        except _WorkerKilled:
            response = None
        finally:
            kit.crash_next = None
    commit_error = _atomic_commit_error(kit, None)
    if commit_error:
        raise AssertionError(commit_error)
    if response is not None or not claimed:
        shown = "" if response is None else f" Response: {_show(response)}"
        raise AssertionError(
            f"the view of {endpoint!r} did not run to its end, so there was no effect to crash after.{shown}"
        )
    owner = claimed[0]
    left = _record(app, owner.scope, owner.key)
    crossed = None
    if other_headers is not None:
        with _claims(app) as others:
            crossed, ran = retry({**other_headers, header: key} if options.key is None else dict(other_headers))
        if not ran or not others or others[0].scope == owner.scope:
            raise AssertionError(
                f"{_shared_scope(app, owner.scope)} After the first client's crash, the other got {_show(crossed)}"
            )

    if options.atomic:
        if left is not None:
            raise AssertionError(f"atomic mode: a crash must leave nothing, but the record is {left['state']}")
        again, ran = retry()
        if ran != 1 or again.status_code >= 500 or again.headers.get(REPLAYED_HEADER):
            raise AssertionError(f"atomic mode: after a crash the retry must run the view again; got {_show(again)}")
        return CrashResult(key, None, None, again, crossed)

    if left is None or left["state"] != "IN_PROGRESS" or left["attempts"] != 1:
        raise AssertionError(f"leased mode: a crash after the effect must leave the record IN_PROGRESS, found {left}")
    live, ran = retry()
    if live.status_code != options.in_progress_status or ran:
        raise AssertionError(
            f"while the lease is live the retry must be {options.in_progress_status}; got {_show(live)}"
        )
    clock.advance(seconds=options.lease + 1)
    late, ran = retry()
    now = _record(app, owner.scope, owner.key)
    assert now is not None
    if options.on_stale == "hold":
        if late.status_code != 409 or _problem(late) != "stuck" or ran or now["state"] != "IN_PROGRESS":
            raise AssertionError(
                f"after the lease ran out the retry must be 409 stuck (on_stale='hold'); got {_show(late)}"
            )
    elif ran != 1 or now["state"] != "COMPLETED" or now["attempts"] != 2:
        raise AssertionError(
            f"after the lease ran out the retry must take over (on_stale='takeover'): run once, attempts 2;"
            f" got {_show(late)}, record {now['state']} attempts {now['attempts']}"
        )
    return CrashResult(key, left, live, late, crossed)


# store_outage -----------------------------------------------------------------------------------------------


@dataclass
class Outage:
    """The protected requests :func:`store_outage` saw while the database was cut off."""

    responses: list[Reply] = field(default_factory=list)


def _engines(state: AppState) -> list[sa.Engine]:
    engines = [*state.db.engines.values(), state.engine]
    seen: dict[int, sa.Engine] = {}
    for engine in engines:
        seen.setdefault(id(engine.pool), engine)
    return list(seen.values())


@contextlib.contextmanager
def store_outage(app: Flask) -> Iterator[Outage]:
    """Cut ``app`` off its database while the block runs; on leaving it, assert the outage failed closed.

    Every connection the app's engines check out fails like a database that went away (a DBAPI
    ``OperationalError``). On leaving the block it asserts that each POST/PUT/PATCH/DELETE sent to the app inside
    it answered 503 ``store-unavailable`` with ``Retry-After`` and that no view ran; at least one must have
    been sent. Needs a database that outlives its connections (a file or a server, not ``sqlite://`` in memory).
    """
    kit = _install(app)
    with app.app_context():
        state = app_state(app)
        engines = _engines(state)
    for engine in engines:
        if engine.dialect.name == "sqlite" and engine.url.database in (None, "", ":memory:"):
            raise ValueError("store_outage needs a database that outlives its connections, not in-memory SQLite")
    outage = Outage()
    runs = sum(kit.runs.values())

    def cut(engine: sa.Engine) -> Callable[..., None]:
        error = engine.dialect.loaded_dbapi.OperationalError

        def refuse(*_: Any) -> None:
            raise error("flask_idempotent.testing.store_outage: the database is cut off")

        return refuse

    def finished(sender: Any, response: BaseResponse, **_: Any) -> None:
        if current_request.method in UNSAFE_METHODS:  # read now: the client closes the response afterwards
            outage.responses.append(Reply(response.status_code, Headers(response.headers), response.get_data()))

    listeners = [(engine.pool, cut(engine)) for engine in engines]
    for pool, listener in listeners:
        sa.event.listen(pool, "checkout", listener)
    raised: Exception | None = None
    try:
        with request_finished.connected_to(finished, sender=app):
            yield outage
    except Exception as exc:  # a view that ran without the store, say (TESTING propagates its error)
        raised = exc
    finally:
        for pool, listener in listeners:
            sa.event.remove(pool, "checkout", listener)
    ran = sum(kit.runs.values()) - runs
    if ran:
        raise AssertionError(
            f"{ran} view(s) ran while the store was cut off: the route is not protected by the layer (fail closed"
            " means the view never runs without a record)"
        ) from raised
    if raised is not None:
        raise raised
    if not outage.responses:
        raise AssertionError("store_outage saw no POST/PUT/PATCH/DELETE request to the app: send one inside the block")
    for response in outage.responses:
        problem = _problem(response)
        if response.status_code != 503 or problem != "store-unavailable" or "Retry-After" not in response.headers:
            raise AssertionError(
                "during a store outage a protected request must answer 503 store-unavailable with Retry-After"
                f" (fail closed); got {response.status_code} {problem or response.get_data()[:200]!r}"
            )


# The lease clock --------------------------------------------------------------------------------------------


class LeaseClock:
    """Moves the database's clock as the layer of each installed app sees it (no waiting for a lease).

    The layer decides leases, expiry and "stuck" with the database's clock plus an offset; :meth:`advance`
    moves that offset forward for every app :meth:`install` was called on (the fixture undoes it afterwards).
    It adds to any ``Idempotency(clock_offset=...)`` the app already has.

    A clock is also a ``clock_offset`` itself (calling it returns the offset): ``Idempotency(clock_offset=clock)``
    makes an app a test builds read it from the start, with no :meth:`install`.
    """

    def __init__(self) -> None:
        self.offset = timedelta(0)
        self._installed: dict[Flask, Callable[[], float]] = {}

    def __call__(self) -> timedelta:
        """The offset, for ``Idempotency(clock_offset=clock)``."""
        return self.offset

    @property
    def now(self) -> datetime:
        """This host's UTC time plus the offset, naive like the stored times: what the layer's database clock
        reads when the database runs on this machine's clock (for times a test stores, or compares within a
        margin)."""
        return datetime.now(timezone.utc).replace(tzinfo=None) + self.offset

    def install(self, app: Flask) -> LeaseClock:
        """Make ``app``'s layer read this clock (idempotent per app); returns the clock. An app whose
        ``clock_offset`` is this clock reads it already and is left as it is."""
        reads_already = getattr(app.extensions.get("idempotency"), "clock_offset", None) is self
        if app not in self._installed and not reads_already:
            store = app_state(app).store
            original = store.offset
            self._installed[app] = original
            store.offset = lambda: float(original()) + self.offset.total_seconds()
        return self

    def advance(self, **kwargs: float) -> None:
        """Move the clock forward by a ``timedelta(**kwargs)`` (``seconds=61``, ``minutes=5``...)."""
        self.offset += timedelta(**kwargs)

    def uninstall(self) -> None:
        """Give every installed app its own clock back."""
        for app, original in self._installed.items():
            app_state(app).store.offset = original
        self._installed.clear()
