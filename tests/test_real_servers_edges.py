"""Edges that show only through a real server: gunicorn (sync and gthread workers) and Werkzeug's server,
on PostgreSQL.

A blueprint's auth hook rejecting the first attempt is not stored (the corrected retry runs); a streamed response
is passed through whole and stored while it is sent, up to the response limit; a stream that breaks midway
leaves a FAILED record, never an IN_PROGRESS one. Concurrent replays are each counted once for the dashboard's
chart, by worker processes and threads writing their counts (``IDEMPOTENCY_REPLAY_TALLY_SECONDS`` 0 here).
"""

from __future__ import annotations

import http.client
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from faultapp import create_app
from procs import ServedApp, send
from werkzeug.serving import make_server

pytestmark = pytest.mark.postgresql_only


class WerkzeugServer:
    """faultapp on Werkzeug's threaded server, in a thread of the test process."""

    def __init__(self, env: dict[str, str]) -> None:
        self.worker_class = "werkzeug"
        self.app = create_app(env)
        self.server = make_server("127.0.0.1", 0, self.app, threaded=True)
        self.port = self.server.server_port
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        with self.app.app_context():
            self.app.extensions["sqlalchemy"].engine.dispose()


class Rig(ServedApp):
    """The fault app on one server: gunicorn's ``sync`` or ``gthread`` worker, or Werkzeug's threaded server."""

    def __init__(self, url: str, tmp: Path, server: str) -> None:
        env = {"FAULTAPP_DATABASE_URL": url, "FAULTAPP_SIGNAL_DIR": str(tmp), "FAULTAPP_REPLAY_TALLY_SECONDS": "0"}
        if server == "werkzeug":
            super().__init__(url, env, tmp, server=WerkzeugServer(env))
        else:
            super().__init__(url, env, tmp, workers=1, worker_class=server, threads=4)


@pytest.fixture(scope="module", params=["sync", "gthread", "werkzeug"])
def rig(request: pytest.FixtureRequest, postgres_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    with Rig(postgres_url, tmp_path_factory.mktemp(f"edges-{request.param}"), request.param) as rig:
        yield rig


def test_a_blueprint_auth_rejection_through_gunicorn_leaves_the_key_free(rig: Rig) -> None:
    key = f"guarded-{rig.server.worker_class}"
    rejected = send(rig.server.port, "POST", "/guarded/payments", key=key, body={"amount": 5})
    assert rejected.status == 401 and not rejected.replayed
    assert rig.state(key) == {"record": None, "effects": []}
    ok = send(rig.server.port, "POST", "/guarded/payments", key=key, body={"amount": 5}, headers={"X-Auth": "ok"})
    assert ok.status == 201 and not ok.replayed
    again = send(rig.server.port, "POST", "/guarded/payments", key=key, body={"amount": 5}, headers={"X-Auth": "ok"})
    assert again.status == 201 and again.replayed and again.body == ok.body
    assert len(rig.state(key)["effects"]) == 1


def replays_counted(rig: Rig) -> int:
    with rig.engine.connect() as conn:
        details = conn.execute(sa.text("SELECT detail FROM idempotency_events WHERE kind = 'replays'")).scalars()
        return sum(int(detail["count"]) for detail in details)


def test_concurrent_replays_are_each_counted_once(rig: Rig) -> None:
    key = f"counted-{rig.server.worker_class}"
    first = send(rig.server.port, "POST", "/payments", key=key, body={"amount": 3})
    assert first.status == 201 and not first.replayed
    before = replays_counted(rig)
    start = threading.Barrier(8)
    replies: list[Any] = []

    def replay() -> None:
        start.wait(timeout=30)
        replies.append(send(rig.server.port, "POST", "/payments", key=key, body={"amount": 3}))

    threads = [threading.Thread(target=replay) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert len(replies) == 8 and all(r.status == 201 and r.replayed and r.body == first.body for r in replies)
    assert replays_counted(rig) - before == 8  # no replay lost or counted twice by the threads of a worker
    state = rig.state(key)
    assert state["record"]["state"] == "COMPLETED" and len(state["effects"]) == 1


def test_a_stream_under_the_limit_is_stored_as_sent_and_replayed(rig: Rig) -> None:
    key = f"small-stream-{rig.server.worker_class}"
    first = send(rig.server.port, "POST", "/stream", key=key, body={"chunks": 20})
    assert first.status == 201 and len(first.body) == 20_000
    state = rig.state(key)
    assert state["record"]["state"] == "COMPLETED" and state["record"]["response_body"] == first.body.decode()
    replay = send(rig.server.port, "POST", "/stream", key=key, body={"chunks": 20})
    assert replay.replayed and replay.body == first.body and len(rig.state(key)["effects"]) == 1


def test_a_stream_over_the_limit_is_sent_whole_but_not_stored(rig: Rig) -> None:
    key = f"big-stream-{rig.server.worker_class}"
    first = send(rig.server.port, "POST", "/stream", key=key, body={"chunks": 3000})  # 3 MB through a 1 MiB limit
    assert first.status == 201 and len(first.body) == 3_000_000
    record = rig.state(key)["record"]
    assert (record["state"], record["response_status"], record["response_body"]) == ("COMPLETED", 201, None)
    replay = send(rig.server.port, "POST", "/stream", key=key, body={"chunks": 3000})
    assert (replay.status, replay.problem, replay.replayed) == (500, "response-not-stored", True)
    assert len(rig.state(key)["effects"]) == 1


def test_a_stream_that_breaks_midway_is_failed_not_in_progress(rig: Rig) -> None:
    key = f"broken-stream-{rig.server.worker_class}"
    try:
        broken = send(rig.server.port, "POST", "/stream", key=key, body={"chunks": 20}, headers={"X-Break": "1"})
        assert len(broken.body) < 20_000  # the client never got a whole response
    except (http.client.HTTPException, ConnectionError):
        pass  # or the connection broke under it: either way the response was not whole
    record = rig.state(key)["record"]
    assert (record["state"], record["retryable"], record["response_status"]) == ("FAILED", False, 500)
    retry = send(rig.server.port, "POST", "/stream", key=key, body={"chunks": 20})
    assert (retry.status, retry.problem) == (500, "failed")
    assert len(rig.state(key)["effects"]) == 1
