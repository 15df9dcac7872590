"""The overview's replays-per-hour chart: replays write nothing to their record, so each process counts them
and writes its count as one ``replays`` event at most once per ``IDEMPOTENCY_REPLAY_TALLY_SECONDS``, dated at
the first replay it counts. Runs on SQLite and PostgreSQL (the ``app`` fixture)."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
import sqlalchemy as sa
from flask import Flask
from flask.testing import FlaskClient
from helpers import ext, post
from test_dashboard import PREFIX, allow
from test_dashboard_operator_views import bars
from testapp import Controls, build_app

from flask_idempotent import operations
from flask_idempotent.state import app_state


class Ticks:
    """The tally's clock (host monotonic seconds), moved by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def tallies(app: Flask) -> list[dict[str, Any]]:
    """The ``replays`` events, oldest first, with the database's current time."""
    with app.app_context():
        db = ext(app)["db"]
        events = db.metadata.tables["idempotency_events"]
        with db.engine.connect() as conn:
            rows = conn.execute(sa.select(events).where(events.c.kind == "replays").order_by(events.c.id)).all()
        return [dict(row._mapping) for row in rows]


def db_now(app: Flask) -> Any:
    with app.app_context():
        state = app_state(app)
        with state.db.engine.connect() as conn:
            return state.store.now(conn)


def replay(client: FlaskClient, key: str = "k") -> None:
    response = post(client, "/payments", key, json={"amount": 5})
    assert (response.status_code, response.headers["Idempotent-Replayed"]) == (201, "true")


@pytest.fixture
def ticks(app: Flask) -> Ticks:
    ticks = Ticks()
    app_state(app).replays.clock = ticks
    return ticks


def test_replays_are_written_as_one_count_per_interval_dated_at_the_first(
    app: Flask, client: FlaskClient, ticks: Ticks
) -> None:
    allow(app)
    assert post(client, "/payments", "k", json={"amount": 5}).status_code == 201  # the first request: no replay
    replay(client)
    ticks.now += 10
    replay(client)
    assert tallies(app) == []  # counted in the process, not written yet: a replay is still one read

    ticks.now += 65  # 75 s after the first counted replay: the next protected request writes the count
    assert post(client, "/payments", "other", json={"amount": 1}).status_code == 201
    [tally] = tallies(app)
    assert (tally["detail"], tally["record_id"], tally["scope"], tally["key"]) == ({"count": 2}, None, "", "")
    age = (db_now(app) - tally["created_at"]).total_seconds()
    assert 74 <= age <= 90  # dated at the first replay, by the database's clock

    replay(client)  # a new count starts
    ticks.now += 60
    replay(client)
    assert [t["detail"] for t in tallies(app)] == [{"count": 2}, {"count": 1}]

    page = client.get(PREFIX + "/").get_data(as_text=True)
    # The page writes its own process's count first: the third replay, not due yet, shows too.
    assert [t["detail"] for t in tallies(app)] == [{"count": 2}, {"count": 1}, {"count": 1}]
    assert 'data-fi-total="replays">4<' in page
    hour = tally["created_at"].strftime("%H:00")
    assert bars(page, "replays")[hour] >= 2
    assert sum(bars(page, "replays").values()) == 4
    assert "Replays are counted by each worker process" in page
    assert "a process that stopped before writing" in page  # what the number cannot cover, said


@pytest.mark.parametrize("app_config", [{"IDEMPOTENCY_REPLAY_TALLY_SECONDS": 0}])
def test_interval_zero_writes_every_replay_and_every_kind_of_replay_counts(app: Flask, client: FlaskClient) -> None:
    assert post(client, "/payments", "k", json={"amount": 5}).status_code == 201
    replay(client)
    replay(client)
    assert [t["detail"] for t in tallies(app)] == [{"count": 1}, {"count": 1}]
    # not replays: a conflict (422) and a new key
    assert post(client, "/payments", "k", json={"amount": 6}).status_code == 422
    assert post(client, "/payments", "new", json={"amount": 6}).status_code == 201
    assert len(tallies(app)) == 2
    # an answer from a stored failure is a replay too (metrics count it as outcome="replayed")
    controls: Controls = ext(app)["controls"]
    controls.status = 500
    assert post(client, "/payments", "fails", json={"amount": 1}).status_code == 500
    controls.status = None
    stored = post(client, "/payments", "fails", json={"amount": 1})
    assert (stored.status_code, stored.headers["Idempotent-Replayed"]) == (500, "true")
    assert len(tallies(app)) == 3
    assert operations_activity(app)["replays"]["counts"][-1] == 3


def operations_activity(app: Flask) -> dict[str, Any]:
    with app.test_request_context():
        return operations.activity()


def test_a_count_that_cannot_be_written_is_kept_for_the_next_try(
    app: Flask, client: FlaskClient, ticks: Ticks, monkeypatch: pytest.MonkeyPatch
) -> None:
    tally = app_state(app).replays
    write = tally._write
    failures: list[int] = []

    def unreachable(count: int, age: float) -> None:
        failures.append(count)
        raise sa.exc.OperationalError("INSERT", None, Exception("store unreachable"))

    assert post(client, "/payments", "k", json={"amount": 5}).status_code == 201
    replay(client)
    ticks.now += 61
    monkeypatch.setattr(tally, "_write", unreachable)
    replay(client)  # the write of the first count fails: the replay is answered all the same
    assert failures == [1] and tallies(app) == []
    monkeypatch.setattr(tally, "_write", write)
    ticks.now += 30
    replay(client)  # not retried before one more interval has passed: an outage costs no extra connects
    assert failures == [1] and tallies(app) == []
    ticks.now += 31
    replay(client)  # the kept count and the two replays counted since, written before this one is counted
    assert [t["detail"] for t in tallies(app)] == [{"count": 3}]
    age = (db_now(app) - tallies(app)[0]["created_at"]).total_seconds()
    assert 122 <= age <= 140  # still dated at the oldest replay it counts


def test_two_processes_counts_add_up(
    app: Flask, client: FlaskClient, database_url: str, clock: Any, ticks: Ticks
) -> None:
    allow(app)
    other = build_app(database_url, clock=clock, controls=Controls(), IDEMPOTENCY_REPLAY_TALLY_SECONDS=0)
    try:
        assert post(client, "/payments", "k", json={"amount": 5}).status_code == 201
        replay(client)
        replay(client)
        replay(other.test_client())
        ticks.now += 60
        post(client, "/payments", "next", json={"amount": 5})
        assert sorted(t["detail"]["count"] for t in tallies(app)) == [1, 2]
        assert 'data-fi-total="replays">3<' in client.get(PREFIX + "/").get_data(as_text=True)
    finally:
        with other.app_context():
            ext(other)["db"].engine.dispose()


def test_purge_deletes_counts_older_than_two_days(app: Flask, client: FlaskClient, clock: Any) -> None:
    with app.app_context():
        state = app_state(app)
        with state.engine.connect() as conn:
            state.store.add_replays(conn, 4, timedelta(hours=49).total_seconds())
            state.store.add_replays(conn, 5, timedelta(hours=47).total_seconds())
            state.store.add_replays(conn, 6, 0)
    with app.test_request_context():
        operations.purge()
    assert sorted(t["detail"]["count"] for t in tallies(app)) == [5, 6]
    assert operations_activity(app)["replays"]["counts"][-1] == 6  # 47 h ago is outside the chart's day


def test_the_interval_is_validated(database_url: str, clock: Any) -> None:
    with pytest.raises(ValueError, match="IDEMPOTENCY_REPLAY_TALLY_SECONDS must be a non-negative number"):
        build_app(database_url, clock=clock, controls=Controls(), IDEMPOTENCY_REPLAY_TALLY_SECONDS=-1)
