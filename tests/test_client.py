"""The clients (``flask_idempotent.client``) against the test app served by Werkzeug in a thread, on 127.0.0.1.

Each scenario runs with ``requests`` (:class:`IdempotentSession`) and ``httpx`` (:class:`IdempotentTransport`),
on SQLite and PostgreSQL. What the server saw is recorded by a WSGI middleware (every request's method, path,
key, status and arrival time) and by the extension's own tables: the proofs are one record and one charge per
logical call, and the number of requests that reached the server.

Lost responses come from :class:`procs.ResponseDroppingProxy` between the client and the server; requests that
must be "still running" are parked in the view with ``Controls.hold``. Nothing waits on a guess: a held view is
released when the middleware has seen the answer the test waits for.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import pickle
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from email.utils import format_datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
import requests
from clients import FLAVOURS, Flavour
from concurrency import InThread
from flask import Flask, jsonify, redirect, request
from helpers import charges, ext, records
from procs import ResponseDroppingProxy, TcpProxy
from werkzeug.serving import make_server

from flask_idempotent import TransientError, idempotent
from flask_idempotent.client import (
    AsyncIdempotentTransport,
    IdempotentSession,
    IdempotentTransport,
    RetryPolicy,
    redirect_key,
    retry_after_seconds,
    sent_key,
    was_replayed,
)

FAST = {"backoff": 0.01, "max_backoff": 0.05}  # retries without Retry-After come quickly in tests


# What the server saw ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Seen:
    method: str
    path: str
    key: str | None
    status: int
    arrived: float


@dataclass
class Scripted:
    """An answer the middleware gives instead of the app, once, to the next request with ``method``."""

    method: str
    status: int
    headers: list[tuple[str, str]] = field(default_factory=list)


class Recorder:
    """WSGI middleware: records each request and its status; can answer one request itself (:meth:`script`)."""

    def __init__(self, wsgi_app: Callable[..., Any]) -> None:
        self.wsgi_app = wsgi_app
        self.seen: list[Seen] = []
        self.changed = threading.Condition()
        self.scripts: list[Scripted] = []

    def script(self, method: str, status: int, headers: list[tuple[str, str]] | None = None) -> None:
        with self.changed:
            self.scripts.append(Scripted(method, status, headers or []))

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        arrived = time.monotonic()
        method, path = environ["REQUEST_METHOD"], environ["PATH_INFO"]
        key = environ.get("HTTP_IDEMPOTENCY_KEY")

        def record(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
            with self.changed:
                self.seen.append(Seen(method, path, key, int(status.split()[0]), arrived))
                self.changed.notify_all()
            return start_response(status, headers, exc_info)

        with self.changed:
            scripted = next((s for s in self.scripts if s.method == method), None)
            if scripted is not None:
                self.scripts.remove(scripted)
        if scripted is not None:
            body = json.dumps({"scripted": scripted.status}).encode()
            record(f"{scripted.status} SCRIPTED", [("Content-Length", str(len(body))), *scripted.headers])
            return [body]
        return self.wsgi_app(environ, record)

    def requests(self, method: str = "POST", key: str | None = None) -> list[Seen]:
        """The requests seen, in the order they arrived (a held one answers after those that came later)."""
        with self.changed:
            found = [s for s in self.seen if s.method == method and (key is None or s.key == key)]
        return sorted(found, key=lambda s: s.arrived)

    def wait_for(self, what: str, check: Callable[[list[Seen]], bool], timeout: float = 30) -> None:
        with self.changed:
            assert self.changed.wait_for(lambda: check(self.seen), timeout), f"the server never saw {what}"


@dataclass
class Served:
    app: Flask
    url: str  # straight to the server
    recorder: Recorder
    proxy: ResponseDroppingProxy  # to the server, losing the responses a test arms it for

    @property
    def via_proxy(self) -> str:
        return f"http://127.0.0.1:{self.proxy.port}"


@pytest.fixture
def served(app: Flask) -> Iterator[Served]:
    recorder = Recorder(app.wsgi_app)
    app.wsgi_app = recorder  # type: ignore[method-assign]
    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    proxy = ResponseDroppingProxy("127.0.0.1", server.server_port)
    try:
        yield Served(app, f"http://127.0.0.1:{server.server_port}", recorder, proxy)
    finally:
        proxy.close()
        server.shutdown()
        thread.join(10)


@pytest.fixture(params=FLAVOURS, ids=repr)
def flavour(request: pytest.FixtureRequest) -> Flavour:
    return request.param  # type: ignore[no-any-return]


def only_record(served: Served) -> dict[str, Any]:
    rows = records(served.app)
    assert len(rows) == 1, rows
    return rows[0]


# The policy itself -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("make", [IdempotentSession, IdempotentTransport, AsyncIdempotentTransport, RetryPolicy])
@pytest.mark.parametrize(
    ("options", "error"),
    [
        ({"deadline": 0}, ValueError),
        ({"deadline": -1.5}, ValueError),
        ({"deadline": math.nan}, ValueError),
        ({"deadline": math.inf}, ValueError),
        ({"attempts": 0}, ValueError),
        ({"attempts": -3}, ValueError),
        ({"attempts": 2.5}, TypeError),
        ({"attempts": True}, TypeError),
        ({"deadline": "30"}, TypeError),
        ({"backoff": -0.1}, ValueError),
        ({"key_header": ""}, ValueError),
        ({"max_retry_after": -1}, ValueError),
        ({"max_retry_after": math.inf}, ValueError),
    ],
)
def test_bad_options_are_refused_at_construction(make: Any, options: dict[str, Any], error: type) -> None:
    with pytest.raises(error):
        make(**options)


def test_defaults_are_documented_values() -> None:
    assert RetryPolicy() == RetryPolicy(
        attempts=5, deadline=60.0, backoff=0.5, max_backoff=10.0, key_header="Idempotency-Key", max_retry_after=60.0
    )
    with IdempotentSession() as session, IdempotentTransport() as transport:
        assert session.policy == transport.policy == RetryPolicy()


def test_backoff_grows_exponentially_with_jitter_and_never_undercuts_retry_after() -> None:
    policy = RetryPolicy(backoff=1.0, max_backoff=5.0)
    for retry, cap in [(1, 1.0), (2, 2.0), (3, 4.0), (4, 5.0), (9, 5.0)]:
        waits = {policy.delay(retry) for _ in range(200)}
        assert all(cap / 2 <= w <= cap for w in waits), (retry, waits)
        assert len(waits) > 1  # jittered
    assert all(policy.delay(1, retry_after=3.0) == 3.0 for _ in range(50))
    assert all(2.0 <= policy.delay(3, retry_after=0.0) <= 4.0 for _ in range(50))


def test_retry_after_reads_seconds_and_http_dates() -> None:
    now = datetime(2030, 1, 1, 12, 0, 0, tzinfo=timezone.utc)
    assert retry_after_seconds("3", now) == 3.0
    assert retry_after_seconds(" 0 ", now) == 0.0
    assert retry_after_seconds(format_datetime(now + timedelta(seconds=7), usegmt=True), now) == 7.0
    assert retry_after_seconds(format_datetime(now - timedelta(seconds=7), usegmt=True), now) == 0.0
    assert retry_after_seconds(None, now) is None
    assert retry_after_seconds("soon", now) is None
    assert retry_after_seconds("-1", now) is None


@pytest.mark.parametrize(
    "value", ["\u00b2", "\u0663", "1\u00b9", "1.5", "1e3", "+3", "-0", "0x10", "Fri, 99 Xyz 99999 99:99:99 GMT"]
)
def test_retry_after_that_rfc_9110_does_not_allow_is_ignored_never_an_exception(value: str) -> None:
    """Only ASCII digits or an HTTP date: ``str.isdigit()`` alone takes ``²`` and ``٣``, which float() refuses."""
    assert retry_after_seconds(value, datetime(2030, 1, 1, tzinfo=timezone.utc)) is None


def test_a_huge_retry_after_is_read_without_overflow() -> None:
    assert retry_after_seconds("9" * 5000) == math.inf
    assert retry_after_seconds("86400") == 86400.0


# Lost connections: one key for every attempt -----------------------------------------------------------------


def test_a_lost_response_is_retried_with_the_same_key_and_answered_by_the_replay(
    served: Served, flavour: Flavour
) -> None:
    served.proxy.arm()  # the first response is read from the server, then the connection is closed
    answer = flavour.call("POST", f"{served.via_proxy}/payments", FAST, json={"amount": 7})

    assert (answer.status, answer.replayed) == (201, True)
    [lost] = served.proxy.lost
    assert lost.status == 201 and answer.body == lost.body  # the original answer, which the client never saw
    posts = served.recorder.requests()
    assert [s.status for s in posts] == [201, 201]
    assert {s.key for s in posts} == {answer.key} and answer.key is not None and len(answer.key) == 36
    row = only_record(served)
    assert (row["key"], row["state"], row["attempts"]) == (answer.key, "COMPLETED", 1)
    assert charges(served.app) == 1


def test_the_callers_key_is_used_and_kept_across_retries(served: Served, flavour: Flavour) -> None:
    served.proxy.arm()
    headers = {"Idempotency-Key": "order-1234-capture"}
    answer = flavour.call("POST", f"{served.via_proxy}/payments", FAST, json={"amount": 7}, headers=headers)
    assert (answer.status, answer.replayed, answer.key) == (201, True, "order-1234-capture")
    assert [s.key for s in served.recorder.requests()] == ["order-1234-capture"] * 2
    assert only_record(served)["key"] == "order-1234-capture"
    assert charges(served.app) == 1


def test_each_logical_call_gets_its_own_key(served: Served, flavour: Flavour) -> None:
    first = flavour.call("POST", f"{served.url}/payments", FAST, json={"amount": 1})
    second = flavour.call("POST", f"{served.url}/payments", FAST, json={"amount": 1})
    assert first.status == second.status == 201 and not first.replayed and not second.replayed
    assert first.key != second.key
    assert len(records(served.app)) == 2 and charges(served.app) == 2


def test_a_response_that_never_came_is_retried_until_the_replay(served: Served, flavour: Flavour) -> None:
    """The first attempt times out while its view is parked; the retry finds it in progress; then the replay."""
    controls = ext(served.app)["controls"]
    held = controls.hold("payments")
    options = {**FAST, "deadline": 30}
    thread = InThread(lambda: flavour.call("POST", f"{served.url}/payments", options, json={"amount": 3}, timeout=2))
    assert held.entered.wait(30)
    served.recorder.wait_for("a 409 in-progress", lambda seen: any(s.status == 409 for s in seen))
    held.release.set()
    answer = thread.result(60)

    assert (answer.status, answer.replayed) == (201, True)
    statuses = [s.status for s in served.recorder.requests(key=answer.key)]
    # The held first attempt (answered, to nobody, once released), 409s while it was held, then the replay.
    assert statuses[0] == statuses[-1] == 201 and 409 in statuses and set(statuses) == {201, 409}, statuses
    assert only_record(served)["attempts"] == 1
    assert charges(served.app) == 1


def test_in_progress_is_retried_honouring_retry_after_until_the_replay(served: Served, flavour: Flavour) -> None:
    """Another caller's request with the same key is running: 409 in-progress, then the stored outcome."""
    controls = ext(served.app)["controls"]
    held = controls.hold("payments")
    key = {"Idempotency-Key": "shared-key"}
    first = InThread(lambda: requests.post(f"{served.url}/payments", json={"amount": 9}, headers=key, timeout=30))
    assert held.entered.wait(30)
    second = InThread(lambda: flavour.call("POST", f"{served.url}/payments", FAST, json={"amount": 9}, headers=key))
    served.recorder.wait_for("a 409 in-progress", lambda seen: any(s.status == 409 for s in seen))
    held.release.set()
    original, answer = first.result(60), second.result(60)

    assert original.status_code == 201 and not was_replayed(original)
    assert (answer.status, answer.replayed, answer.body) == (201, True, original.content)
    seen = served.recorder.requests(key="shared-key")
    retries = seen[1:]  # the first is the held request; the rest are the client's attempts
    assert [s.status for s in retries[:-1]] == [409] * (len(retries) - 1) and retries[-1].status == 201
    gaps = [b.arrived - a.arrived for a, b in zip(retries, retries[1:], strict=False)]
    assert all(gap >= 1.0 for gap in gaps), gaps  # Retry-After: 1
    assert only_record(served)["attempts"] == 1 and charges(served.app) == 1


def test_503_is_retried_after_retry_after_and_the_command_runs_once(served: Served, flavour: Flavour) -> None:
    """The view raises TransientError once (503 ``transient-error``, Retry-After: 1); the retry runs it."""
    controls = ext(served.app)["controls"]
    controls.exception = TransientError("the provider timed out")
    first_run = controls.hold("payments")
    thread = InThread(lambda: flavour.call("POST", f"{served.url}/payments", FAST, json={"amount": 5}))
    assert first_run.entered.wait(30)
    second_run = controls.hold("payments")  # parks the retry, so the fault is lifted exactly between the two
    first_run.release.set()
    assert second_run.entered.wait(30)
    controls.exception = None
    second_run.release.set()
    answer = thread.result(60)

    assert (answer.status, answer.replayed) == (201, False)
    assert answer.json()["attempt"] == 2
    posts = served.recorder.requests(key=answer.key)
    assert [s.status for s in posts] == [503, 201]
    assert posts[1].arrived - posts[0].arrived >= 1.0  # honoured Retry-After: 1
    row = only_record(served)
    assert (row["state"], row["attempts"]) == ("COMPLETED", 2)
    assert charges(served.app) == 1


# Never retried -----------------------------------------------------------------------------------------------


def test_422_key_reused_is_not_retried(served: Served, flavour: Flavour) -> None:
    key = {"Idempotency-Key": "reused"}
    assert flavour.call("POST", f"{served.url}/payments", FAST, json={"amount": 1}, headers=key).status == 201
    answer = flavour.call("POST", f"{served.url}/payments", FAST, json={"amount": 2}, headers=key)
    assert (answer.status, answer.problem, answer.replayed) == (422, "key-reused", False)
    assert [s.status for s in served.recorder.requests(key="reused")] == [201, 422]  # one request each
    assert charges(served.app) == 1


def test_400_invalid_key_is_not_retried(served: Served, flavour: Flavour) -> None:
    two_keys = {"Idempotency-Key": "a,b"}
    answer = flavour.call("POST", f"{served.url}/payments", FAST, json={"amount": 2}, headers=two_keys)
    assert (answer.status, answer.problem) == (400, "invalid-key")
    assert len(served.recorder.requests()) == 1
    assert records(served.app) == [] and charges(served.app) == 0


def test_409_stuck_is_not_retried(served: Served, flavour: Flavour, clock: Any) -> None:
    controls = ext(served.app)["controls"]
    held = controls.hold("payments")
    key = {"Idempotency-Key": "stuck-key"}
    first = InThread(lambda: requests.post(f"{served.url}/payments", json={"amount": 4}, headers=key, timeout=30))
    assert held.entered.wait(30)
    try:
        clock.advance(seconds=61)  # the held request's lease (60 s) is over: the record is stuck
        answer = flavour.call("POST", f"{served.url}/payments", FAST, json={"amount": 4}, headers=key)
    finally:
        held.release.set()
    first.result(60)
    assert (answer.status, answer.problem) == (409, "stuck")
    assert [s.status for s in served.recorder.requests(key="stuck-key")][1:] == [409]  # exactly one attempt
    assert charges(served.app) == 1


@pytest.mark.parametrize("status", [500, 502, 429, 404])
def test_no_other_status_is_retried(served: Served, flavour: Flavour, status: int) -> None:
    ext(served.app)["controls"].status = status
    answer = flavour.call("POST", f"{served.url}/payments", FAST, json={"amount": 1})
    assert answer.status == status
    assert len(served.recorder.requests()) == 1


@pytest.mark.parametrize("app_config", [{"IDEMPOTENCY_IN_PROGRESS_STATUS": 202}])
def test_202_in_progress_is_an_answer_not_a_retry(served: Served, flavour: Flavour) -> None:
    controls = ext(served.app)["controls"]
    held = controls.hold("payments")
    key = {"Idempotency-Key": "async-202"}
    first = InThread(lambda: requests.post(f"{served.url}/payments", json={"amount": 4}, headers=key, timeout=30))
    assert held.entered.wait(30)
    try:
        answer = flavour.call("POST", f"{served.url}/payments", FAST, json={"amount": 4}, headers=key)
    finally:
        held.release.set()
    first.result(60)
    assert (answer.status, answer.problem) == (202, "in-progress")
    assert len(served.recorder.requests(key="async-202")) == 2  # the held one and exactly one attempt


def test_retries_stop_at_the_attempt_limit_with_the_last_answer(served: Served, flavour: Flavour) -> None:
    answer = flavour.call("POST", f"{served.url}/transient", {**FAST, "attempts": 2}, json={})
    assert (answer.status, answer.problem) == (503, "transient-error")
    assert [s.status for s in served.recorder.requests()] == [503, 503]
    assert len({s.key for s in served.recorder.requests()}) == 1


def test_no_retry_is_made_that_would_start_past_the_deadline(served: Served, flavour: Flavour) -> None:
    served.recorder.script("POST", 503, [("Retry-After", "600")])  # say, a load balancer shedding load
    started = time.monotonic()
    answer = flavour.call("POST", f"{served.url}/payments", {**FAST, "deadline": 20}, json={})
    assert answer.status == 503 and answer.headers["Retry-After"] == "600"
    assert time.monotonic() - started < 20  # it did not wait 600 s: that is past the deadline
    assert len(served.recorder.requests()) == 1


@pytest.mark.parametrize("value", ["\u00b2", "-5", "soon"])
def test_an_unreadable_retry_after_is_ignored_and_the_call_retried(
    served: Served, flavour: Flavour, value: str
) -> None:
    served.recorder.script("POST", 503, [("Retry-After", value)])
    answer = flavour.call("POST", f"{served.url}/payments", FAST, json={"amount": 4})
    assert (answer.status, answer.replayed) == (201, False)
    assert [s.status for s in served.recorder.requests()] == [503, 201]
    assert only_record(served)["state"] == "COMPLETED" and charges(served.app) == 1


@pytest.mark.parametrize("value", ["86400", "9" * 400])
def test_a_retry_after_beyond_max_retry_after_ends_the_call_with_that_answer(
    served: Served, flavour: Flavour, value: str
) -> None:
    served.recorder.script("POST", 503, [("Retry-After", value)])
    started = time.monotonic()
    answer = flavour.call("POST", f"{served.url}/payments", {**FAST, "deadline": 10**6}, json={})
    assert answer.status == 503 and answer.headers["Retry-After"] == value
    assert time.monotonic() - started < 20  # it did not wait: the deadline alone would have allowed it
    assert len(served.recorder.requests()) == 1 and records(served.app) == []


def test_a_retry_after_within_max_retry_after_is_waited_for(served: Served, flavour: Flavour) -> None:
    served.recorder.script("POST", 503, [("Retry-After", "1")])
    answer = flavour.call("POST", f"{served.url}/payments", {**FAST, "max_retry_after": 1}, json={"amount": 2})
    posts = served.recorder.requests()
    assert answer.status == 201 and [s.status for s in posts] == [503, 201]
    assert posts[1].arrived - posts[0].arrived >= 1.0


def test_lost_connections_until_the_attempts_run_out_raise_the_librarys_error(served: Served, flavour: Flavour) -> None:
    served.proxy.arm()
    served.proxy.arm()
    with pytest.raises(flavour.lost):
        flavour.call("POST", f"{served.via_proxy}/payments", {**FAST, "attempts": 2}, json={"amount": 1})
    posts = served.recorder.requests()
    assert [s.status for s in posts] == [201, 201] and len({s.key for s in posts}) == 1
    assert charges(served.app) == 1  # the second attempt was the replay, lost as well


def test_a_connection_closed_at_once_is_retried_then_raised(flavour: Flavour, caplog: pytest.LogCaptureFixture) -> None:
    proxy = TcpProxy("127.0.0.1", 9)
    proxy.cut()  # accepts and closes every connection before reading a byte
    try:
        with caplog.at_level("INFO", logger="flask_idempotent.client"), pytest.raises(flavour.lost):
            flavour.call("POST", f"http://127.0.0.1:{proxy.port}/payments", {**FAST, "attempts": 3}, json={})
    finally:
        proxy.close()
    assert proxy.refused == 3
    assert "attempt 3 of 3" in caplog.text and "giving up after 3 attempts" in caplog.text


@pytest.mark.parametrize("kind", ["generator", "file"])
def test_a_streamed_body_is_sent_again_byte_for_byte(
    served: Served, flavour: Flavour, kind: str, tmp_path: Path
) -> None:
    served.proxy.arm()

    def generator() -> Iterator[bytes]:
        yield b'{"amount": '
        yield b"11}"

    (tmp_path / "body.json").write_bytes(b'{"amount": 11}')
    with open(tmp_path / "body.json", "rb") as file:
        body = generator() if kind == "generator" else file
        answer = flavour.call(
            "POST", f"{served.via_proxy}/payments", FAST, data=body, headers={"Content-Type": "application/json"}
        )
    assert (answer.status, answer.replayed) == (201, True)  # the same command: not 422
    assert answer.json()["amount"] == 11 and charges(served.app) == 1


def _pipe_with(data: bytes) -> Any:
    read, write = os.pipe()
    os.write(write, data)
    os.close(write)
    return os.fdopen(read, "rb")


def test_a_body_that_cannot_be_rewound_is_refused_before_anything_is_sent(served: Served) -> None:
    """A pipe cannot be sent twice: the session says so before the first attempt, not on the retry."""
    refused = pytest.raises(requests.exceptions.UnrewindableBodyError, match="cannot be rewound.*nothing was sent")
    with _pipe_with(b'{"amount": 5}') as pipe, IdempotentSession(**FAST) as session, refused:
        session.post(f"{served.url}/payments", data=pipe, headers={"Content-Type": "application/json"})
    assert served.recorder.requests() == [] and records(served.app) == [] and charges(served.app) == 0


def test_a_body_that_cannot_be_rewound_is_sent_once_when_retries_are_off(served: Served) -> None:
    with _pipe_with(b'{"amount": 5}') as pipe, IdempotentSession(attempts=1) as session:
        response = session.post(f"{served.url}/payments", data=pipe, headers={"Content-Type": "application/json"})
    assert response.status_code == 201 and response.json()["amount"] == 5
    assert only_record(served)["state"] == "COMPLETED" and charges(served.app) == 1


# Redirects: another address is another command ---------------------------------------------------------------


def _moved_routes(app: Flask, status: int) -> None:
    """``/v1/payments`` answers ``status`` to ``/v2/payments``; both are protected, v2 charges."""
    db, Charge = ext(app)["db"], ext(app)["Charge"]

    @app.post("/v1/payments")
    @idempotent
    def old_payments() -> Any:
        return redirect("/v2/payments", code=status)

    @app.post("/v2/payments")
    @idempotent
    def new_payments() -> Any:
        body = request.get_json(silent=True) or {}
        row = Charge(amount=int(body.get("amount", 0)), route="v2")
        db.session.add(row)
        db.session.commit()
        return jsonify(id=row.id, amount=row.amount), 201


@pytest.mark.parametrize("status", [307, 308])
def test_a_followed_redirect_is_sent_with_its_own_key_and_replays_on_retry(
    served: Served, flavour: Flavour, status: int
) -> None:
    _moved_routes(served.app, status)
    key = "call-moved-1"
    for _ in range(2):  # the second call is a retry of the same logical call: same key, same body
        answer = flavour.call(
            "POST",
            f"{served.url}/v1/payments",
            FAST,
            json={"amount": 30},
            headers={"Idempotency-Key": key},
            follow_redirects=True,
        )
        assert answer.status == 201 and answer.json()["amount"] == 30
    assert answer.replayed
    derived = redirect_key(key, f"{served.url}/v2/payments")
    assert answer.key == derived != key
    posts = served.recorder.requests()
    assert [(s.path, s.key, s.status) for s in posts] == [
        ("/v1/payments", key, status),
        ("/v2/payments", derived, 201),
        ("/v1/payments", key, status),
        ("/v2/payments", derived, 201),
    ]
    rows = {r["path"]: r for r in records(served.app)}
    assert rows["/v1/payments"]["key"] == key and rows["/v1/payments"]["response_status"] == status
    assert rows["/v2/payments"]["key"] == derived and rows["/v2/payments"]["state"] == "COMPLETED"
    assert charges(served.app, "v2") == 1


def test_a_redirect_to_get_keeps_no_unsafe_command(served: Served, flavour: Flavour) -> None:
    """303 See Other turns the POST into a GET: a safe request, passed through as it is."""
    _moved_routes(served.app, 303)
    answer = flavour.call(
        "POST",
        f"{served.url}/v1/payments",
        FAST,
        json={"amount": 30},
        follow_redirects=True,
    )
    assert answer.status == 405  # /v2/payments has no GET
    assert [s.method for s in served.recorder.seen] == ["POST", "GET"]
    assert charges(served.app, "v2") == 0


# Safe methods: untouched --------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["GET", "HEAD", "OPTIONS"])
def test_safe_methods_get_no_key_and_no_retries(served: Served, flavour: Flavour, method: str) -> None:
    ok = flavour.call(method, f"{served.url}/payments", FAST)
    assert ok.status == 200 and ok.key is None
    served.recorder.script(method, 503, [("Retry-After", "0")])
    unavailable = flavour.call(method, f"{served.url}/payments", FAST)
    assert unavailable.status == 503
    assert [(s.key, s.status) for s in served.recorder.requests(method)] == [(None, 200), (None, 503)]

    served.proxy.arm()
    with pytest.raises(flavour.lost):
        flavour.call(method, f"{served.via_proxy}/payments", FAST)
    assert len(served.recorder.requests(method)) == 3  # the lost one was not sent again


# httpx, async ------------------------------------------------------------------------------------------------


def test_the_async_transport_retries_a_lost_response_and_never_a_422(served: Served) -> None:
    async def body() -> AsyncIterator[bytes]:  # a one-shot async stream: read once, sent on every attempt
        yield b'{"amount": '
        yield b"1}"

    async def calls() -> tuple[httpx.Response, httpx.Response]:
        transport = AsyncIdempotentTransport(**FAST)
        async with httpx.AsyncClient(transport=transport, base_url=served.via_proxy) as client:
            served.proxy.arm()
            first = await client.post("/payments", content=body(), headers={"Content-Type": "application/json"})
            reused = await client.post(
                "/payments", json={"amount": 2}, headers={"Idempotency-Key": sent_key(first) or ""}
            )
            return first, reused

    first, reused = asyncio.run(calls())
    assert (first.status_code, was_replayed(first)) == (201, True)
    assert reused.status_code == 422
    assert [s.status for s in served.recorder.requests()] == [201, 201, 422]
    assert only_record(served)["key"] == sent_key(first) and charges(served.app) == 1


def test_the_async_transport_retries_in_progress_until_the_replay(served: Served) -> None:
    controls = ext(served.app)["controls"]
    held = controls.hold("payments")
    key = {"Idempotency-Key": "async-shared"}
    first = InThread(lambda: requests.post(f"{served.url}/payments", json={"amount": 2}, headers=key, timeout=30))
    assert held.entered.wait(30)

    async def call() -> httpx.Response:
        async with httpx.AsyncClient(transport=AsyncIdempotentTransport(**FAST)) as client:
            return await client.post(f"{served.url}/payments", json={"amount": 2}, headers=key)

    second = InThread(lambda: asyncio.run(call()))
    served.recorder.wait_for("a 409 in-progress", lambda seen: any(s.status == 409 for s in seen))
    held.release.set()
    original, answer = first.result(60), second.result(60)
    assert (answer.status_code, was_replayed(answer), answer.content) == (201, True, original.content)
    assert charges(served.app) == 1


# Packaging ---------------------------------------------------------------------------------------------------


def test_the_core_never_needs_the_client_libraries() -> None:
    """``import flask_idempotent`` imports neither the client module nor requests/httpx; without them, the
    client module still imports and its classes say what to install."""
    script = """
import sys
for name in ("requests", "httpx"):
    sys.modules[name] = None  # as if not installed: importing it raises ImportError
import flask_idempotent
assert "flask_idempotent.client" not in sys.modules
import flask_idempotent.client as client
assert not client.HAVE_REQUESTS and not client.HAVE_HTTPX
for cls in (client.IdempotentSession, client.IdempotentTransport, client.AsyncIdempotentTransport):
    try:
        cls()
    except ModuleNotFoundError as exc:
        assert "flask-idempotency[client]" in str(exc), exc
    else:
        raise AssertionError(cls)
print("ok")
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stdout.strip()) == (0, "ok"), done.stderr
    plain = (
        "import sys, flask_idempotent\n"
        "client = {'requests', 'httpx', 'flask_idempotent.client'}\n"
        "print(sorted(m for m in sys.modules if m in client or m.split('.')[0] in client))"
    )
    done = subprocess.run([sys.executable, "-c", plain], capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stdout.strip()) == (0, "[]"), done.stderr


def test_a_session_survives_pickling_with_its_policy() -> None:
    with IdempotentSession(attempts=3, deadline=9) as session:
        copy = pickle.loads(pickle.dumps(session))
    with copy:
        assert copy.policy == RetryPolicy(attempts=3, deadline=9)
