"""Crash injection: a gunicorn worker is SIGKILLed at each point of a request, in leased and atomic mode.

The points: after the claim (before the view's effect), after the effect (before the outcome is stored), and
after the outcome is stored (before a byte of the response is sent). gunicorn's master restarts the worker;
the test polls ``GET /health`` until the new one answers, then retries the request as a client would.

Leased mode must never re-execute silently: the record stays IN_PROGRESS, answers 409 ``in-progress`` while its
lease is live and 409 ``stuck`` once the (test-controlled) lease clock passed it, until an operator marks it
retryable with the CLI; then the next retry runs the view exactly once more. Atomic mode leaves nothing or
everything, and a retry makes exactly one effect in total.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from conftest import faultapp_env
from faultapp import CRASH_HEADER
from procs import CONNECTION_LOST, FileClock, Reply, ServedApp, flask_cli, poll, send

#: Also on the distributed-SQL emulations of ``IDEMPOTENCY_TEST_PG_VARIANTS`` (conftest).
PG_VARIANTS = True

LEASE = 30  # seconds; real time never runs it out during a test, only the test's clock does


class CrashRig(ServedApp):
    """One single-worker gunicorn, its lease clock, and the test's own view of the database."""

    def __init__(self, url: str, tmp: Path, config: dict[str, object]) -> None:
        self.signals = tmp / "signals"
        self.signals.mkdir()
        self.clock = FileClock(tmp / "clock")
        env = {
            "FAULTAPP_CLOCK_FILE": str(self.clock.path),
            "FAULTAPP_LEASE": str(LEASE),
            "FAULTAPP_SIGNAL_DIR": str(self.signals),
            **faultapp_env(config),
        }
        super().__init__(url, env, tmp, workers=1)

    def post(self, path: str, key: str, **kwargs: Any) -> Reply:
        return send(self.server.port, "POST", path, key=key, body={"amount": 7}, **kwargs)

    def crash(self, path: str, key: str, point: str) -> dict[str, Any]:
        """Send a request that kills its worker at ``point``; wait for the replacement worker.

        Returns the witness: what another connection saw in the database just before the kill.
        """
        before = self.server.wait_ready()
        with pytest.raises(CONNECTION_LOST):
            self.post(path, key, headers={CRASH_HEADER: point})
        after = self.server.wait_ready()
        assert after != before, "the worker was not replaced"
        witness = self.signals / f"{key}.{point}.json"
        assert witness.exists(), "the worker died before reaching the crash point"
        return json.loads(witness.read_text())  # type: ignore[no-any-return]

    def events(self, record_id: int) -> list[dict[str, Any]]:
        with self.engine.connect() as conn:
            rows = conn.execute(
                sa.text("SELECT kind, actor FROM idempotency_events WHERE record_id = :id ORDER BY id"),
                {"id": record_id},
            )
            return [dict(r._mapping) for r in rows]

    def retry_until_answered(self, path: str, key: str) -> Reply:
        """Retry while the key is in progress: after an atomic crash the dead worker's transaction (and its lock
        on the key) lives until PostgreSQL notices the closed socket."""

        def answered() -> Reply | None:
            reply = self.post(path, key)
            return None if reply.problem == "in-progress" else reply

        return poll(answered, timeout=15, what=f"{key} to stop being in progress")


@pytest.fixture(scope="module")
def rig(pg_database: tuple[str, dict[str, object]], tmp_path_factory: pytest.TempPathFactory) -> Iterator[CrashRig]:
    url, config = pg_database
    with CrashRig(url, tmp_path_factory.mktemp("crash"), config) as rig:
        yield rig


def assert_in_progress(reply: Reply) -> None:
    assert reply.status == 409, reply
    assert reply.problem == "in-progress"
    assert int(reply.headers["retry-after"]) >= 1


@pytest.mark.postgresql_only
@pytest.mark.parametrize("point", ["claimed", "effect"])
def test_leased_crash_before_the_outcome_is_held_until_an_operator_marks_it_retryable(
    rig: CrashRig, point: str
) -> None:
    key = f"leased-{point}"
    effects_at_crash = 1 if point == "effect" else 0

    witness = rig.crash("/payments", key, point)
    # The claim was committed before the view ran; the effect (if reached) committed on its own.
    assert witness["record"]["state"] == "IN_PROGRESS"
    assert len(witness["effects"]) == effects_at_crash
    state = rig.state(key)
    assert state["record"]["state"] == "IN_PROGRESS"
    assert state["record"]["attempts"] == 1
    assert state["effects"] == witness["effects"]

    # Lease live: the owner might still be running.
    assert_in_progress(rig.post("/payments", key))
    # Lease over: the owner is presumed dead, but it may have had its effect. Held, not re-executed.
    rig.clock.advance(LEASE + 1)
    stuck = rig.post("/payments", key)
    assert stuck.status == 409 and stuck.problem == "stuck", stuck
    assert rig.state(key)["effects"] == witness["effects"]
    assert rig.state(key)["record"]["state"] == "IN_PROGRESS"

    # An operator decides, with the CLI.
    record_id = state["record"]["id"]
    result = flask_cli(rig.env, "idempotency", "mark-retryable", str(record_id), "--actor", "ops:alice", "--json")
    assert result.returncode == 0, result.stderr
    marked = json.loads(result.stdout)
    assert (marked["id"], marked["state"], marked["retryable"]) == (record_id, "FAILED", True)
    assert {"kind": "mark_retryable", "actor": "ops:alice"} in rig.events(record_id)

    # The next retry runs the view exactly once more.
    rerun = rig.post("/payments", key)
    assert rerun.status == 201 and not rerun.replayed, rerun
    assert rerun.json()["attempt"] == 2
    after = rig.state(key)
    assert len(after["effects"]) == effects_at_crash + 1
    assert after["effects"][-1] == rerun.json()["effect"]
    assert after["record"]["state"] == "COMPLETED"
    assert after["record"]["attempts"] == 2
    assert after["record"]["response_body"].encode() == rerun.body

    replay = rig.post("/payments", key)
    assert (replay.status, replay.replayed, replay.body) == (201, True, rerun.body)
    assert rig.state(key)["effects"] == after["effects"]


@pytest.mark.postgresql_only
def test_leased_crash_after_completion_replays_the_stored_outcome(rig: CrashRig) -> None:
    key = "leased-completed"
    witness = rig.crash("/payments", key, "completed")
    # The outcome was stored before the worker died: the client never saw it, a retry replays it.
    assert witness["record"]["state"] == "COMPLETED"
    assert len(witness["effects"]) == 1
    assert rig.state(key) == witness

    replay = rig.post("/payments", key)
    assert (replay.status, replay.replayed) == (201, True), replay
    assert replay.body == witness["record"]["response_body"].encode()
    assert replay.json()["effect"] == witness["effects"][0]
    assert replay.headers["location"] == f"/effects/{witness['effects'][0]}"
    assert rig.state(key)["effects"] == witness["effects"]


@pytest.mark.postgresql_only
@pytest.mark.parametrize("point", ["claimed", "effect", "completed"])
def test_atomic_crash_leaves_nothing_or_everything_and_a_retry_makes_one_effect(rig: CrashRig, point: str) -> None:
    key = f"atomic-{point}"
    witness = rig.crash("/transfers", key, point)
    state = rig.state(key)
    if point == "completed":
        # Everything: committed with its outcome before the worker died.
        assert witness["record"]["state"] == "COMPLETED" and len(witness["effects"]) == 1
        assert state == witness
    else:
        # Nothing: the claim and the effect were in one uncommitted transaction, rolled back with the process.
        assert witness == {"record": None, "effects": []}
        assert state == {"record": None, "effects": []}

    retry = rig.retry_until_answered("/transfers", key)
    assert retry.status == 201, retry
    assert retry.replayed is (point == "completed")
    after = rig.state(key)
    assert len(after["effects"]) == 1
    assert retry.json()["effect"] == after["effects"][0]
    assert after["record"]["state"] == "COMPLETED"
    assert after["record"]["attempts"] == 1
    assert after["record"]["response_body"].encode() == retry.body

    again = rig.post("/transfers", key)
    assert (again.status, again.replayed, again.body) == (201, True, retry.body)
    assert rig.state(key)["effects"] == after["effects"]
