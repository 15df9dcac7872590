"""A PostgreSQL primary fails over: what clients and operators see during the switch and after it.

gunicorn reaches PostgreSQL through a TCP proxy. The cut is the primary going away: every connection drops at
once, in the middle of a request too. The restore is the promoted standby taking the address (here the same
server, so nothing committed before the cut is lost: synchronous replication's promise; see
docs/deployment.md for an asynchronous standby). During the switch every protected request answers 503
``store-unavailable`` and runs nothing; afterwards the same workers serve the same keys correctly, and the
request caught in flight is left for an operator — visible as stuck — never run twice.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
import sqlalchemy as sa
from faultapp import drop_tables, reset_database
from procs import flask_cli
from test_faults_outage import LEASE, OutageRig, assert_store_unavailable, held_request, release


@pytest.fixture
def rig(postgres_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[OutageRig]:
    reset_database(postgres_url)
    rig = OutageRig(postgres_url, tmp_path_factory.mktemp("failover"))
    try:
        rig.server.start()
        yield rig
    finally:
        rig.server.stop()
        rig.proxy.close()
        rig.engine.dispose()
        drop_tables(postgres_url)


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
    in_flight, result = held_request(rig, "/payments", "fo-in-flight")  # its effect is committed; it is parked

    rig.proxy.cut()  # the primary is gone
    try:
        during = {key: rig.post("/payments", key) for key in ("fo-new", "fo-done")}
        for reply in during.values():
            assert_store_unavailable(reply)
        caught = release(rig, "fo-in-flight", in_flight, result)  # it ends while the store is away
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
