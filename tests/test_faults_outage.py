"""Store outage: gunicorn reaches PostgreSQL through a TCP proxy that the test cuts and restores.

While the store is cut away, every protected request fails closed (503 ``store-unavailable`` with
``Retry-After``) and no view runs; once it is back, the same gunicorn workers serve 201s again by themselves.
A cut in the middle of a request is safe too: leased mode keeps its effect but never re-executes it silently
(the record is held as stuck), atomic mode keeps nothing. A primary's failover is the same cut and restore, seen
whole: 503 during the switch, every key served correctly after it, the request caught in flight left stuck.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from concurrency import InThread
from faultapp import HOLD_HEADER
from procs import FileClock, Reply, ServedApp, TcpProxy, flask_cli, poll, send

LEASE = 30
ROUTES = ("/payments", "/transfers")  # leased, atomic


class OutageRig(ServedApp):
    """Two gunicorn workers that reach the database through a cuttable proxy; the test's engine goes around it."""

    def __init__(self, url: str, tmp: Path) -> None:
        target = sa.make_url(url)
        self.proxy = TcpProxy(target.host or "127.0.0.1", target.port or 5432)
        self.signals = tmp / "signals"
        self.signals.mkdir()
        self.clock = FileClock(tmp / "clock")
        env = {
            "FAULTAPP_DATABASE_URL": target.set(port=self.proxy.port).render_as_string(hide_password=False),
            "FAULTAPP_CLOCK_FILE": str(self.clock.path),
            "FAULTAPP_LEASE": str(LEASE),
            "FAULTAPP_SIGNAL_DIR": str(self.signals),
            "FAULTAPP_CONNECT_TIMEOUT": "1",
        }
        super().__init__(url, env, tmp, workers=2)

    def stop(self) -> None:
        try:
            super().stop()
        finally:
            self.proxy.close()

    def post(self, path: str, key: str, **kwargs: Any) -> Reply:
        return send(self.server.port, "POST", path, key=key, body={"amount": 5}, **kwargs)

    def effect_count(self) -> int:
        with self.engine.connect() as conn:
            return int(conn.execute(sa.text("SELECT count(*) FROM fault_effects")).scalar_one())


@pytest.fixture(scope="module")
def rig(postgres_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[OutageRig]:
    with OutageRig(postgres_url, tmp_path_factory.mktemp("outage")) as rig:
        yield rig


def assert_store_unavailable(reply: Reply) -> None:
    assert reply.status == 503, reply
    assert reply.problem == "store-unavailable"
    assert int(reply.headers["retry-after"]) >= 1


@pytest.mark.postgresql_only
def test_cut_store_fails_closed_with_503_and_recovers_without_a_restart(rig: OutageRig) -> None:
    done = {path: rig.post(path, f"before{path.replace('/', '-')}") for path in ROUTES}
    assert [r.status for r in done.values()] == [201, 201]
    workers = rig.server.worker_pids()
    effects = rig.effect_count()
    keys = [(path, f"cut{path.replace('/', '-')}-{i}") for path in ROUTES for i in range(4)]

    rig.proxy.cut()
    # New keys, and retries of completed keys: without the store the layer can neither claim nor replay.
    for path, key in keys:
        assert_store_unavailable(rig.post(path, key))
    for path in done:
        assert_store_unavailable(rig.post(path, f"before{path.replace('/', '-')}"))
    assert send(rig.server.port, "GET", "/health").status == 200  # the workers are alive, only the store is gone
    assert rig.proxy.refused > 0 and rig.proxy.open_connections == 0
    assert rig.effect_count() == effects  # no view ran
    assert all(rig.state(key)["record"] is None for _, key in keys)

    rig.proxy.restore()
    for path, key in keys:
        reply = rig.post(path, key)
        assert (reply.status, reply.replayed) == (201, False), reply
        state = rig.state(key)
        assert state["effects"] == [reply.json()["effect"]]
        assert state["record"]["state"] == "COMPLETED"
    for path, original in done.items():
        replay = rig.post(path, f"before{path.replace('/', '-')}")
        assert (replay.status, replay.replayed, replay.body) == (201, True, original.body)
    assert rig.effect_count() == effects + len(keys)
    assert rig.server.worker_pids() == workers  # recovered by itself: the same worker processes


def held_request(rig: OutageRig, path: str, key: str) -> InThread:
    """Start a request that parks right after its view's effect; return once it is parked."""
    owner = InThread(lambda: rig.post(path, key, headers={HOLD_HEADER: "effect"}))
    poll(lambda: (rig.signals / f"{key}.effect.held").exists(), timeout=30, what=f"{key} to reach its effect")
    return owner


def release(rig: OutageRig, key: str, owner: InThread) -> Reply:
    (rig.signals / f"{key}.effect.go").touch()
    reply: Reply = owner.result()
    return reply


def cut_after_the_effect(rig: OutageRig, path: str, key: str) -> Reply:
    """A request parked right after its view's effect goes on while the store is cut; its reply (restored after)."""
    owner = held_request(rig, path, key)
    rig.proxy.cut()
    try:
        return release(rig, key, owner)
    finally:
        rig.proxy.restore()


@pytest.mark.postgresql_only
def test_leased_cut_after_the_effect_keeps_the_record_held_never_re_executed(rig: OutageRig) -> None:
    key = "cut-mid-leased"
    reply = cut_after_the_effect(rig, "/payments", key)
    # The view's effect was committed before the cut; its outcome could not be stored. The client gets the
    # view's answer; the record stays IN_PROGRESS and is held once its lease ends.
    assert reply.status == 201, reply
    state = rig.state(key)
    assert state["effects"] == [reply.json()["effect"]]
    assert state["record"]["state"] == "IN_PROGRESS"

    again = rig.post("/payments", key)
    assert (again.status, again.problem) == (409, "in-progress"), again
    rig.clock.advance(LEASE + 1)
    stuck = rig.post("/payments", key)
    assert (stuck.status, stuck.problem) == (409, "stuck"), stuck
    assert rig.state(key)["effects"] == state["effects"]


@pytest.mark.postgresql_only
def test_the_client_gets_the_views_response_even_when_its_session_dies_with_the_database(rig: OutageRig) -> None:
    key = "cut-mid-session"
    # At the cut the view's own session holds a connection: its teardown would roll back on it.
    reply = cut_after_the_effect(rig, "/payments-rereading", key)
    assert reply.status == 201 and reply.json()["effect"], reply  # not the server's bare 500
    state = rig.state(key)
    assert state["effects"] == [reply.json()["effect"]] and state["record"]["state"] == "IN_PROGRESS"
    again = rig.post("/payments-rereading", key)
    assert (again.status, again.problem) == (409, "in-progress"), again
    assert rig.state(key)["effects"] == state["effects"]


@pytest.mark.postgresql_only
def test_atomic_cut_before_commit_answers_503_and_keeps_nothing(rig: OutageRig) -> None:
    key = "cut-mid-atomic"
    reply = cut_after_the_effect(rig, "/transfers", key)
    # The claim and the effect were one transaction on the connection the cut closed: nothing was kept.
    assert_store_unavailable(reply)
    assert rig.state(key) == {"record": None, "effects": []}

    retry = rig.post("/transfers", key)
    assert (retry.status, retry.replayed) == (201, False), retry
    state = rig.state(key)
    assert state["effects"] == [retry.json()["effect"]]
    assert (state["record"]["state"], state["record"]["attempts"]) == ("COMPLETED", 1)


# A primary's failover: the cut is the primary going away (every connection drops at once, in the middle of a
# request too); the restore is the promoted standby taking the address. Here it is the same server, so nothing
# committed before the cut is lost: synchronous replication's promise (docs/deployment.md: asynchronous standbys).


def effects_of(rig: OutageRig, key: str) -> int:
    with rig.engine.connect() as conn:
        return int(conn.execute(sa.text("SELECT count(*) FROM fault_effects WHERE key = :k"), {"k": key}).scalar_one())


@pytest.mark.postgresql_only
def test_failover_answers_503_during_the_switch_then_serves_every_key_correctly(
    rig: OutageRig, postgres_url: str
) -> None:
    done = rig.post("/payments", "fo-done")
    assert done.status == 201
    workers = rig.server.worker_pids()
    in_flight = held_request(rig, "/payments", "fo-in-flight")  # its effect is committed; it is parked

    rig.proxy.cut()  # the primary is gone
    try:
        during = {key: rig.post("/payments", key) for key in ("fo-new", "fo-done")}
        for reply in during.values():
            assert_store_unavailable(reply)
        caught = release(rig, "fo-in-flight", in_flight)  # it ends while the store is away
    finally:
        rig.proxy.restore()  # the new primary answers at the same address

    # Nothing ran during the switch, and the request caught in flight still answered with its view's response.
    assert caught.status == 201, caught
    assert effects_of(rig, "fo-new") == 0
    assert rig.state("fo-new")["record"] is None

    # After the switch, with no restart: a new key runs once, a completed key replays.
    new = rig.post("/payments", "fo-new")
    assert (new.status, new.replayed) == (201, False), new
    assert effects_of(rig, "fo-new") == 1 and rig.state("fo-new")["record"]["state"] == "COMPLETED"
    replay = rig.post("/payments", "fo-done")
    assert (replay.status, replay.replayed, replay.body) == (201, True, done.body)
    assert rig.server.worker_pids() == workers

    # The request caught in flight: its outcome was never stored. It is in progress until its lease ends, then
    # held as stuck (never run again by a retry), and the operator's list shows it.
    record = rig.state("fo-in-flight")["record"]
    assert record["state"] == "IN_PROGRESS"
    again = rig.post("/payments", "fo-in-flight")
    assert (again.status, again.problem) == (409, "in-progress"), again
    rig.clock.advance(LEASE + 1)
    stuck = rig.post("/payments", "fo-in-flight")
    assert (stuck.status, stuck.problem) == (409, "stuck"), stuck
    operator = {"FAULTAPP_DATABASE_URL": postgres_url, "FAULTAPP_CLOCK_FILE": str(rig.clock.path)}
    listed = flask_cli(operator, "idempotency", "stuck", "--json")
    assert listed.returncode == 0, listed.stderr
    assert record["id"] in [item["id"] for item in json.loads(listed.stdout)["items"]]
    assert effects_of(rig, "fo-in-flight") == 1  # one effect, never two
