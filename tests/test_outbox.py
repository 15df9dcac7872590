"""The outbox (SPEC "The outbox"): jobs staged in the view's transaction, handed on after its commit, drained
under leases, retried with backoff, dead after IDEMPOTENCY_OUTBOX_MAX_ATTEMPTS, and resolved by operators.

Every test asserts on the outbox rows as well as on what the consumer saw. Time that decides (backoff, countdown,
leases) is the database's clock moved by the ``clock`` fixture, never a sleep.
"""

from __future__ import annotations

import html
import json
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

import flask_sqlalchemy
import prometheus_client
import pytest
import sqlalchemy as sa
from flask import Flask, jsonify, request
from flask.testing import FlaskClient
from helpers import ext, post

from flask_idempotent import Idempotency, SchemaVersionError, idempotent, outbox_key
from flask_idempotent.metrics import instrument_prometheus
from flask_idempotent.outbox_store import JobState


@dataclass
class FakeTask:
    """What the outbox needs of a Celery task (``name``, ``apply_async``): records each call's task id."""

    name: str = "tests.send_receipt"
    calls: list[dict[str, Any]] = field(default_factory=list)
    broken: bool = False
    #: Set while a call should block (a broker that hangs); released by the test.
    hang: threading.Event | None = None

    def apply_async(self, args: Any = None, kwargs: Any = None, task_id: str | None = None, **options: Any) -> Any:
        if self.hang is not None:
            self.hang.wait(30)
        if self.broken:
            raise ConnectionError("broker unreachable")
        self.calls.append({"args": args, "kwargs": kwargs, "task_id": task_id})
        return task_id


@pytest.fixture
def task() -> FakeTask:
    return FakeTask()


@dataclass
class Effects:
    """A handler's effects, as a consumer would keep them: one entry per run."""

    runs: list[tuple[Any, ...]] = field(default_factory=list)
    keys: list[str] = field(default_factory=list)
    failing: int = 0  # how many of the next runs raise


@pytest.fixture
def effects(app: Flask) -> Effects:
    done = Effects()
    idempotency: Idempotency = ext(app)["idempotency"]

    @idempotency.handler("reindex")
    def reindex(order_id: int, *, note: str = "") -> None:
        if done.failing:
            done.failing -= 1
            raise RuntimeError("search index down")
        done.runs.append((order_id, note))
        done.keys.append(outbox_key())

    return done


@pytest.fixture
def routes(app: Flask, task: FakeTask, effects: Effects) -> None:
    """Views that stage a receipt (the fake Celery task) and a reindex (the handler)."""
    idempotency: Idempotency = ext(app)["idempotency"]
    db = ext(app)["db"]
    Charge = ext(app)["Charge"]

    def place(route: str) -> Any:
        body = request.get_json(silent=True) or {}
        row = Charge(amount=int(body.get("amount", 0)), route=route)
        db.session.add(row)
        db.session.flush()
        idempotency.stage(task, row.id, amount=row.amount)
        idempotency.stage("reindex", row.id)
        if body.get("raise"):
            raise RuntimeError("the view failed after staging")
        return row

    @app.post("/outbox/atomic")
    @idempotent(atomic=True)
    def atomic_order() -> Any:
        row = place("atomic")
        status = int((request.get_json(silent=True) or {}).get("status", 201))
        return jsonify(id=row.id), status

    @app.post("/outbox/leased")
    @idempotent
    def leased_order() -> Any:
        row = place("leased")
        if not (request.get_json(silent=True) or {}).get("no_commit"):
            db.session.commit()
        return jsonify(id=row.id), 201


def jobs(app: Flask) -> list[dict[str, Any]]:
    with app.app_context():
        table = ext(app)["idempotency"].state().tables.outbox
        with ext(app)["db"].engine.connect() as conn:
            return [dict(r._mapping) for r in conn.execute(sa.select(table).order_by(table.c.id))]


def drain(app: Flask, **kwargs: Any) -> dict[str, int]:
    with app.app_context():
        result: dict[str, int] = ext(app)["idempotency"].drain(**kwargs)
        return result


@pytest.fixture
def no_hand_off(app: Flask) -> Iterator[None]:
    """The staging process hands nothing on (as if it died right after the commit): the drainer's work."""
    app.config["IDEMPOTENCY_OUTBOX_HANDOFF_SECONDS"] = 0
    yield


# Staging commits with the transaction it is in -------------------------------------------------------------


@pytest.mark.usefixtures("routes", "no_hand_off")
def test_an_atomic_view_stages_its_jobs_in_its_single_commit(app: Flask, client: FlaskClient) -> None:
    response = post(client, "/outbox/atomic", json={"amount": 7}, user="alice")

    assert response.status_code == 201
    staged = jobs(app)
    assert [(j["kind"], j["target"], j["state"]) for j in staged] == [
        ("celery", "tests.send_receipt", "PENDING"),
        ("handler", "reindex", "PENDING"),
    ]
    order_id = response.get_json()["id"]
    assert staged[0]["args"] == [order_id] and staged[0]["kwargs"] == {"amount": 7}
    assert {j["scope"] for j in staged} == {"alice"}  # the request's scope
    assert all(j["key"].startswith("outbox:") for j in staged) and staged[0]["key"] != staged[1]["key"]


@pytest.mark.usefixtures("routes", "no_hand_off")
def test_a_leased_view_stages_its_jobs_with_its_own_commit(app: Flask, client: FlaskClient) -> None:
    assert post(client, "/outbox/leased", json={"amount": 3}).status_code == 201
    assert [j["state"] for j in jobs(app)] == ["PENDING", "PENDING"]


@pytest.mark.usefixtures("effects", "no_hand_off")
def test_plain_db_session_code_stages_with_its_commit_and_a_rollback_stages_nothing(app: Flask) -> None:
    idempotency: Idempotency = ext(app)["idempotency"]
    db = ext(app)["db"]
    with app.app_context():
        idempotency.stage("reindex", 1)
        db.session.rollback()
        idempotency.stage("reindex", 2)
        assert jobs(app) == []  # not before the commit
        db.session.commit()

    assert [j["args"] for j in jobs(app)] == [[2]]


@pytest.mark.usefixtures("routes")
@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/outbox/atomic", {"raise": True}),  # the view raises: its transaction rolls back
        ("/outbox/atomic", {"status": 422}),  # an atomic 4xx: the view's writes roll back, the record alone stays
        ("/outbox/leased", {"raise": True}),
        ("/outbox/leased", {"no_commit": True}),  # a leased view that never commits
    ],
)
def test_a_view_whose_transaction_does_not_commit_stages_nothing(
    app: Flask,
    client: FlaskClient,
    path: str,
    body: dict[str, Any],
    task: FakeTask,
    effects: Effects,
    database_url: str,
) -> None:
    if path == "/outbox/leased" and database_url.startswith("sqlite"):
        # One writer: the view's uncommitted INSERT holds the layer's outcome write until the session ends (the
        # busy timeout). The same rollback is proven on the servers.
        pytest.skip("SQLite: a leased view's open write transaction blocks the layer's own writes")
    app.config["PROPAGATE_EXCEPTIONS"] = False  # a raising view answers 500, as in production

    assert post(client, path, json=body).status_code in (201, 422, 500)

    assert jobs(app) == []
    assert task.calls == [] and effects.runs == []
    assert drain(app) == {"delivered": 0, "failed": 0, "dead": 0}


@pytest.mark.usefixtures("effects")
def test_arguments_that_are_not_json_or_an_unknown_target_are_a_type_error_at_the_call(app: Flask) -> None:
    idempotency: Idempotency = ext(app)["idempotency"]
    with app.app_context():
        with pytest.raises(TypeError, match="holds a set"):
            idempotency.stage("reindex", {1, 2})
        with pytest.raises(TypeError, match="'when' of the job reindex holds a object"):
            idempotency.stage("reindex", 1, when=object())
        with pytest.raises(TypeError, match="NaN"):
            idempotency.stage("reindex", float("nan"))
        with pytest.raises(TypeError, match="no outbox handler is registered under the name 'nope'"):
            idempotency.stage("nope", 1)
        with pytest.raises(TypeError, match="not a builtin_function_or_method"):
            idempotency.stage(print, 1)
        ext(app)["db"].session.commit()
    assert jobs(app) == []


# Hand-off right after the commit --------------------------------------------------------------------------


@pytest.mark.usefixtures("routes")
def test_after_the_commit_the_staging_process_hands_its_jobs_on_with_their_keys(
    app: Flask, client: FlaskClient, task: FakeTask, effects: Effects
) -> None:
    response = post(client, "/outbox/atomic", json={"amount": 5})

    assert response.status_code == 201
    order_id = response.get_json()["id"]
    receipt, reindex = jobs(app)
    assert task.calls == [{"args": [order_id], "kwargs": {"amount": 5}, "task_id": receipt["key"]}]
    assert effects.runs == [(order_id, "")] and effects.keys == [reindex["key"]]
    assert [(j["state"], j["attempts"], j["lease_token"]) for j in (receipt, reindex)] == [("DELIVERED", 1, None)] * 2
    assert receipt["delivered_at"] is not None and receipt["expires_at"] is not None


@pytest.mark.usefixtures("effects", "no_hand_off")
def test_a_job_delivered_twice_runs_its_handler_once(app: Flask, effects: Effects) -> None:
    idempotency: Idempotency = ext(app)["idempotency"]
    with app.app_context():
        idempotency.stage("reindex", 9, note="x")
        ext(app)["db"].session.commit()
        state = idempotency.state()
        with state.engine.connect() as conn:
            (job,) = idempotency.outbox.store(state).listing(conn, JobState.PENDING, 10)
        idempotency.outbox.deliver(state, job)
        idempotency.outbox.deliver(state, job)  # by hand, or by a drainer whose lease ran out mid-delivery

    assert effects.runs == [(9, "x")]


@pytest.mark.usefixtures("routes")
def test_a_broker_that_hangs_holds_the_response_no_longer_than_the_hand_off_bound(
    app: Flask, client: FlaskClient, task: FakeTask, effects: Effects, clock: Any
) -> None:
    app.config["IDEMPOTENCY_OUTBOX_HANDOFF_SECONDS"] = 0.2
    task.hang = threading.Event()
    try:
        response = post(client, "/outbox/atomic", json={"amount": 1})
        assert response.status_code == 201  # answered while apply_async still hangs
        receipt, reindex = jobs(app)
        # Both PENDING under the hand-off's lease: the receipt in its broker call, the reindex never reached.
        assert [(j["state"], j["lease_token"] is not None) for j in (receipt, reindex)] == [("PENDING", True)] * 2
        assert drain(app)["delivered"] == 0  # a drainer leaves leased jobs alone
    finally:
        task.hang.set()
    for thread in threading.enumerate():
        if thread.name == "flask_idempotent-outbox-hand-off":
            thread.join(30)
    receipt, reindex = jobs(app)
    assert receipt["state"] == "DELIVERED"  # the late hand-off still confirms its job, under its lease
    assert reindex["state"] == "PENDING" and effects.runs == []  # past the bound: not started
    clock.advance(seconds=61)  # the hand-off's lease ran out: the drainer's now
    assert drain(app) == {"delivered": 1, "failed": 0, "dead": 0}
    assert [call["task_id"] for call in task.calls] == [receipt["key"]] and len(effects.runs) == 1


@pytest.mark.usefixtures("routes")
def test_a_broker_that_raises_leaves_the_job_pending_and_the_drainer_delivers_it_after_recovery(
    app: Flask, client: FlaskClient, task: FakeTask, clock: Any
) -> None:
    task.broken = True
    assert post(client, "/outbox/atomic", json={"amount": 1}).status_code == 201
    receipt, _ = jobs(app)
    assert (receipt["state"], receipt["attempts"], receipt["last_error"]) == (
        "PENDING",
        1,
        "ConnectionError: broker unreachable",
    )
    assert drain(app)["delivered"] == 0  # backing off: not due yet

    task.broken = False
    clock.advance(seconds=2)
    assert drain(app) == {"delivered": 1, "failed": 0, "dead": 0}

    receipt, _ = jobs(app)
    assert receipt["state"] == "DELIVERED" and receipt["attempts"] == 2
    assert [call["task_id"] for call in task.calls] == [receipt["key"]]


# The drainer ----------------------------------------------------------------------------------------------


@pytest.mark.usefixtures("no_hand_off")
def test_failed_deliveries_back_off_exponentially_and_the_job_is_dead_after_max_attempts(
    app: Flask, effects: Effects, clock: Any
) -> None:
    app.config["IDEMPOTENCY_OUTBOX_MAX_ATTEMPTS"] = 3
    effects.failing = 10
    with app.app_context():
        ext(app)["idempotency"].stage("reindex", 1)
        ext(app)["db"].session.commit()

    assert drain(app) == {"delivered": 0, "failed": 1, "dead": 0}
    clock.advance(seconds=1.5)
    assert drain(app)["failed"] == 0  # the first backoff is 2 s
    clock.advance(seconds=1)
    assert drain(app) == {"delivered": 0, "failed": 1, "dead": 0}
    clock.advance(seconds=3)
    assert drain(app)["failed"] == 0  # the second is 4 s
    clock.advance(seconds=2)
    assert drain(app) == {"delivered": 0, "failed": 0, "dead": 1}
    clock.advance(hours=2)
    assert drain(app) == {"delivered": 0, "failed": 0, "dead": 0}  # dead: an operator decides

    (job,) = jobs(app)
    assert (job["state"], job["attempts"]) == ("DEAD", 3)
    assert job["last_error"] == "RuntimeError: search index down"
    assert effects.runs == []


@pytest.mark.usefixtures("no_hand_off")
def test_countdown_and_eta_delay_a_job_by_the_databases_clock(app: Flask, effects: Effects, clock: Any) -> None:
    with app.app_context():
        ext(app)["idempotency"].stage("reindex", 1, countdown=60)
        ext(app)["idempotency"].stage("reindex", 2, eta=datetime.now(timezone.utc) + timedelta(seconds=120))
        ext(app)["db"].session.commit()

    assert drain(app)["delivered"] == 0
    clock.advance(seconds=61)
    assert drain(app)["delivered"] == 1
    assert effects.runs == [(1, "")]
    clock.advance(seconds=60)
    assert drain(app)["delivered"] == 1
    assert effects.runs == [(1, ""), (2, "")]


@pytest.mark.usefixtures("no_hand_off")
def test_ordered_jobs_of_a_scope_wait_for_the_earlier_pending_one(app: Flask, effects: Effects, clock: Any) -> None:
    effects.failing = 1  # the first delivery fails: the later ordered job must wait for it
    with app.app_context():
        for order_id in (1, 2, 3):
            ext(app)["idempotency"].stage("reindex", order_id, ordered=True)
        ext(app)["db"].session.commit()

    assert drain(app) == {"delivered": 0, "failed": 1, "dead": 0}  # 2 and 3 were not taken
    clock.advance(seconds=3)
    drain(app)
    drain(app)
    drain(app)
    assert effects.runs == [(1, ""), (2, ""), (3, "")]
    assert [j["state"] for j in jobs(app)] == ["DELIVERED"] * 3


@pytest.mark.usefixtures("no_hand_off")
def test_two_drainers_never_take_the_same_job(app: Flask, effects: Effects, database_url: str) -> None:
    """The first holds its take transaction open (rows locked) while the second drains: it skips those rows."""
    idempotency: Idempotency = ext(app)["idempotency"]
    with app.app_context():
        for order_id in range(1, 7):
            idempotency.stage("reindex", order_id)
        ext(app)["db"].session.commit()
        state = idempotency.state()
        store = idempotency.outbox.store(state)
        if database_url.startswith("sqlite"):
            pytest.skip("SQLite has one writer: one drainer at a time (docs: The outbox)")
        with state.db.engine.connect() as first:
            first = first.execution_options(isolation_level="READ COMMITTED")
            with first.begin():
                held = store.take(first, "first-drainer", 60.0, limit=2)
                assert [j.args for j in held] == [[1], [2]]
                second: dict[str, Any] = {}
                other = threading.Thread(target=lambda: second.update(drain(app)), daemon=True)
                other.start()
                other.join(30)
                assert not other.is_alive(), "the second drainer waited for the first one's rows"
        assert second == {"delivered": 4, "failed": 0, "dead": 0}

    assert sorted(effects.runs) == [(n, "") for n in range(3, 7)]
    rows = jobs(app)
    assert [(j["state"], j["lease_token"]) for j in rows[:2]] == [("PENDING", "first-drainer")] * 2
    assert [j["state"] for j in rows[2:]] == ["DELIVERED"] * 4


# Operators -------------------------------------------------------------------------------------------------


def outbox_cli(app: Flask, *args: str) -> tuple[int, Any]:
    result = app.test_cli_runner().invoke(args=["idempotency", "outbox", *args, "--json"])
    return result.exit_code, json.loads(result.output)


@pytest.mark.usefixtures("no_hand_off")
def test_operators_list_show_redeliver_and_discard_jobs_under_the_rules(
    app: Flask, effects: Effects, clock: Any
) -> None:
    app.config["IDEMPOTENCY_OUTBOX_MAX_ATTEMPTS"] = 1
    effects.failing = 1
    with app.app_context():
        ext(app)["idempotency"].stage("reindex", 1)
        ext(app)["idempotency"].stage("reindex", 2)
        ext(app)["db"].session.commit()
    drain(app, limit=1, max_batches=1)  # job 1 dies at once; job 2 stays pending
    dead, pending = jobs(app)

    code, listing = outbox_cli(app, "list")
    assert code == 0
    assert [j["id"] for j in listing["pending"]] == [pending["id"]]
    assert [(j["id"], j["last_error"]) for j in listing["dead"]] == [(dead["id"], "RuntimeError: search index down")]
    assert listing["stats"]["pending"] == 1 and listing["stats"]["dead"] == 1

    code, shown = outbox_cli(app, "show", str(dead["id"]))
    assert code == 0 and shown["state"] == "DEAD" and shown["version"] == dead["version"]

    code, error = outbox_cli(app, "redeliver", str(dead["id"]), "--expect-version", str(dead["version"] - 1))
    assert code == 1 and error["error"]["code"] == "changed"
    assert jobs(app)[0]["state"] == "DEAD"

    code, done = outbox_cli(app, "redeliver", str(dead["id"]), "--expect-version", str(dead["version"]))
    assert code == 0 and done == {"action": "redeliver", "from": "DEAD", "job": dead["id"]}
    assert (jobs(app)[0]["state"], jobs(app)[0]["attempts"]) == ("PENDING", 0)
    assert drain(app)["delivered"] == 2
    assert sorted(effects.runs) == [(1, ""), (2, "")]

    code, done = outbox_cli(app, "redeliver", str(pending["id"]))  # delivered: a broker that lost it, say
    assert code == 0 and done["from"] == "DELIVERED"
    assert drain(app)["delivered"] == 1
    assert sorted(effects.runs) == [(1, ""), (2, "")]  # delivered again, its effect still once

    code, error = outbox_cli(app, "discard", str(dead["id"]))
    assert code == 1 and error["error"]["code"] == "refused"
    assert "was delivered; only pending and dead jobs are discarded" in error["error"]["message"]

    code, error = outbox_cli(app, "show", "999999")
    assert code == 1 and error["error"]["code"] == "not-found"

    with app.app_context():
        ext(app)["idempotency"].stage("reindex", 3)
        ext(app)["db"].session.commit()
    third = jobs(app)[-1]
    code, done = outbox_cli(app, "discard", str(third["id"]), "--actor", "ops:ann")
    assert code == 0 and done["from"] == "PENDING"
    assert [j["id"] for j in jobs(app)] == [dead["id"], pending["id"]]
    with app.app_context(), ext(app)["db"].engine.connect() as conn:
        events = conn.execute(sa.text("SELECT kind, actor FROM idempotency_events ORDER BY id")).all()
    assert [tuple(e)[0] for e in events] == ["outbox_redeliver", "outbox_redeliver", "outbox_discard"]
    assert events[-1][1] == "ops:ann" and events[0][1].startswith("cli")


@pytest.mark.usefixtures("no_hand_off")
def test_a_job_being_delivered_is_neither_redelivered_nor_discarded(app: Flask, effects: Effects) -> None:
    idempotency: Idempotency = ext(app)["idempotency"]
    with app.app_context():
        idempotency.stage("reindex", 1)
        ext(app)["db"].session.commit()
        state = idempotency.state()
        with state.db.engine.begin() as conn:
            (job,) = idempotency.outbox.store(state).take(conn, "drainer", 60.0, limit=1)

    for action in ("redeliver", "discard"):
        code, error = outbox_cli(app, action, str(job.id))
        assert code == 1 and error["error"]["code"] == "refused"
        assert "is being delivered right now (its lease is live)" in error["error"]["message"]
    assert jobs(app)[0]["lease_token"] == "drainer"


@pytest.mark.usefixtures("no_hand_off")
def test_drain_once_from_the_cli_delivers_and_purge_removes_delivered_jobs_after_their_ttl(
    app: Flask, effects: Effects, clock: Any
) -> None:
    with app.app_context():
        ext(app)["idempotency"].stage("reindex", 1)
        ext(app)["db"].session.commit()

    result = app.test_cli_runner().invoke(args=["idempotency", "drain", "--once", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output) == {"dead": 0, "delivered": 1, "failed": 0}

    runner = app.test_cli_runner()
    assert runner.invoke(args=["idempotency", "purge"]).exit_code == 0
    assert [j["state"] for j in jobs(app)] == ["DELIVERED"]  # its ttl (24 h) is still running
    clock.advance(hours=25)
    assert runner.invoke(args=["idempotency", "purge"]).exit_code == 0
    assert jobs(app) == []


@pytest.mark.usefixtures("no_hand_off")
def test_a_delivery_whose_lease_ran_out_cannot_overwrite_the_next_drainers_outcome(
    app: Flask, effects: Effects, clock: Any
) -> None:
    idempotency: Idempotency = ext(app)["idempotency"]
    with app.app_context():
        idempotency.stage("reindex", 1)
        ext(app)["db"].session.commit()
        state = idempotency.state()
        store = idempotency.outbox.store(state)
        with state.db.engine.begin() as conn:
            (job,) = store.take(conn, "slow-drainer", 60.0, limit=1)
        clock.advance(seconds=61)  # the slow drainer's lease ran out: presumed dead
        assert drain(app)["delivered"] == 1
        with state.engine.connect() as conn:
            assert not store.failed(conn, job.key, "slow-drainer", "late", max_attempts=10)
            assert not store.delivered(conn, job.key, "slow-drainer", 60.0)

    (row,) = jobs(app)
    assert (row["state"], row["attempts"], row["last_error"]) == ("DELIVERED", 1, None)
    assert effects.runs == [(1, "")]


@pytest.mark.usefixtures("no_hand_off")
def test_an_idempotency_task_consumer_keyed_by_outbox_key_runs_once_when_celery_delivers_twice(app: Flask) -> None:
    """A real Celery task (eager: the call runs in this process with the job's key as its task id)."""
    celery = pytest.importorskip("celery")
    idempotency: Idempotency = ext(app)["idempotency"]
    db = ext(app)["db"]
    Charge = ext(app)["Charge"]
    worker = celery.Celery("outbox-test", set_as_current=False)
    worker.conf.task_always_eager = True

    @worker.task(name="tests.export_ledger")
    @idempotency.task(key=outbox_key, scope="ledger")
    def export_ledger(amount: int) -> int:
        db.session.add(Charge(amount=amount, route="ledger"))
        db.session.commit()
        return amount

    with app.app_context():
        idempotency.stage(export_ledger, 42)
        db.session.commit()
        assert drain(app)["delivered"] == 1
        state = idempotency.state()
        with state.engine.connect() as conn:
            (job,) = idempotency.outbox.store(state).listing(conn, JobState.DELIVERED, 10)
        idempotency.outbox.deliver(state, job)  # the same job handed to the broker again
        assert db.session.execute(sa.select(sa.func.count()).select_from(Charge)).scalar() == 1
        records = state.tables.records
        record = db.session.execute(sa.select(records.c.scope, records.c.key, records.c.state)).one()
    assert tuple(record) == ("ledger", job.key, "COMPLETED")


@pytest.mark.usefixtures("no_hand_off")
def test_the_outbox_gauges_count_pending_and_dead_jobs_and_the_oldest_ones_age(
    app: Flask, effects: Effects, clock: Any
) -> None:
    registry = prometheus_client.CollectorRegistry()
    instrument_prometheus(app, registry)
    app.config["IDEMPOTENCY_OUTBOX_MAX_ATTEMPTS"] = 1
    effects.failing = 1
    with app.app_context():
        ext(app)["idempotency"].stage("reindex", 1)
        ext(app)["db"].session.commit()
    drain(app)  # dead at once
    with app.app_context():
        ext(app)["idempotency"].stage("reindex", 2)
        ext(app)["db"].session.commit()
    clock.advance(minutes=10)

    values = {
        family.name: family.samples[0].value
        for family in registry.collect()
        if family.name.startswith("idempotency_outbox")
    }
    assert values.keys() == {
        "idempotency_outbox_pending",
        "idempotency_outbox_oldest_seconds",
        "idempotency_outbox_dead",
    }
    assert values["idempotency_outbox_pending"] == 1 and values["idempotency_outbox_dead"] == 1
    assert 600 <= values["idempotency_outbox_oldest_seconds"] < 660


@pytest.mark.usefixtures("no_hand_off")
def test_a_following_drainer_delivers_each_round_and_outlives_an_unreachable_database(
    app: Flask, effects: Effects, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    idempotency: Idempotency = ext(app)["idempotency"]
    outbox = idempotency.outbox
    real_drain = outbox.drain
    rounds: list[float] = []

    def drain_or_fail(**kwargs: Any) -> dict[str, int]:
        if len(rounds) == 1:  # the second round finds the database away
            raise sa.exc.OperationalError("SELECT 1", {}, ConnectionRefusedError("connection refused"))
        return real_drain(**kwargs)

    def wait(seconds: float) -> None:  # between rounds: the next job is staged
        rounds.append(seconds)
        idempotency.stage("reindex", len(rounds))
        ext(app)["db"].session.commit()

    monkeypatch.setattr(outbox, "drain", drain_or_fail)
    with app.app_context(), caplog.at_level("WARNING", logger="flask_idempotent"):
        outbox.follow(interval=5.0, stop=lambda: len(rounds) >= 3, wait=wait)

    assert rounds == [5.0, 5.0, 5.0]
    assert effects.runs == [(1, ""), (2, "")]  # job 2 waited out the outage; job 3 is the next round's
    outage = [r.getMessage() for r in caplog.records if "cannot be reached" in r.getMessage()]
    assert outage == [
        "outbox drainer: the database cannot be reached, retrying in 5.0s:"
        " OperationalError: (builtins.ConnectionRefusedError) connection refused"
    ]


def _form_fields(page: str, action: str) -> dict[str, str]:
    match = re.search('<form[^>]*action="' + re.escape(action) + '"[^>]*>(.*?)</form>', page, re.S)
    assert match, f"no form posting to {action}"
    fields = re.findall(r'<input type="hidden" name="([^"]+)" value="([^"]*)"', match.group(1))
    return {name: html.unescape(value) for name, value in fields}


@pytest.mark.usefixtures("no_hand_off")
def test_the_dashboards_outbox_page_lists_jobs_and_redelivers_a_dead_one_under_the_rules(
    app: Flask, client: FlaskClient, effects: Effects
) -> None:
    ext(app)["idempotency"].dashboard_access(lambda: "ann")
    app.config["IDEMPOTENCY_OUTBOX_MAX_ATTEMPTS"] = 1
    effects.failing = 1
    with app.app_context():
        ext(app)["idempotency"].stage("reindex", 1)
        ext(app)["idempotency"].stage("reindex", 2)
        ext(app)["db"].session.commit()
    drain(app, limit=1, max_batches=1)
    dead, pending = jobs(app)

    overview = client.get("/idempotency/").get_data(as_text=True)
    assert '<span class="fi-card-value" data-fi-count="outbox_pending">1</span>' in overview
    assert "· 1 dead" in overview

    page = client.get("/idempotency/outbox")
    assert page.status_code == 200
    text = page.get_data(as_text=True)
    assert "<strong>1</strong> pending" in text and "<strong>1</strong> dead" in text
    assert "RuntimeError: search index down" in text and f'data-fi-job="{pending["id"]}"' in text

    action = f"/idempotency/outbox/{dead['id']}/redeliver"
    fields = _form_fields(text, action)
    assert client.post(action, data={**fields, "csrf_token": "wrong"}).status_code == 400
    assert client.post(action, data={**fields, "version": str(dead["version"] + 1)}).status_code == 409
    assert jobs(app)[0]["state"] == "DEAD"  # neither a forged form nor a stale one changed it

    assert client.post(action, data=fields).status_code == 303
    assert (jobs(app)[0]["state"], jobs(app)[0]["attempts"]) == ("PENDING", 0)
    assert client.post(action, data=fields).status_code == 409  # the version moved on
    with app.app_context(), ext(app)["db"].engine.connect() as conn:
        events = conn.execute(sa.text("SELECT kind, actor FROM idempotency_events")).all()
    assert [tuple(e) for e in events] == [("outbox_redeliver", "ann")]


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("IDEMPOTENCY_OUTBOX_MAX_ATTEMPTS", 0),
        ("IDEMPOTENCY_OUTBOX_MAX_ATTEMPTS", "10"),
        ("IDEMPOTENCY_OUTBOX_HANDOFF_SECONDS", -1),
        ("IDEMPOTENCY_OUTBOX_HANDOFF_SECONDS", float("nan")),
        ("IDEMPOTENCY_OUTBOX_HANDOFF_SECONDS", "2"),
    ],
)
def test_unusable_outbox_settings_are_refused_at_init_app(name: str, value: Any, tmp_path: Any) -> None:
    app = Flask(__name__)
    app.config.update(SQLALCHEMY_DATABASE_URI=f"sqlite:///{tmp_path / 'x.db'}", **{name: value})
    db = flask_sqlalchemy.SQLAlchemy()
    db.init_app(app)
    with pytest.raises(ValueError, match=name):
        Idempotency(app, db)


@pytest.mark.usefixtures("routes")
def test_a_crash_between_the_commit_and_the_hand_off_delays_the_job_by_its_lease_and_never_loses_it(
    app: Flask, client: FlaskClient, task: FakeTask, effects: Effects, clock: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ext(app)["idempotency"].outbox, "hand_off", lambda staged: None)  # died after the commit
    assert post(client, "/outbox/atomic", json={"amount": 4}).status_code == 201

    assert drain(app)["delivered"] == 0  # leased to the hand-off that never came
    clock.advance(seconds=61)
    assert drain(app) == {"delivered": 2, "failed": 0, "dead": 0}
    receipt, _ = jobs(app)
    assert [call["task_id"] for call in task.calls] == [receipt["key"]] and len(effects.runs) == 1


@pytest.mark.usefixtures("routes")
def test_a_job_staged_in_a_rolled_back_savepoint_is_never_handed_on(app: Flask, effects: Effects) -> None:
    idempotency: Idempotency = ext(app)["idempotency"]
    db = ext(app)["db"]
    with app.app_context():
        savepoint = db.session.begin_nested()
        idempotency.stage("reindex", 1)
        savepoint.rollback()
        idempotency.stage("reindex", 2)
        db.session.commit()

    assert effects.runs == [(2, "")]
    assert [(j["args"], j["state"]) for j in jobs(app)] == [([2], "DELIVERED")]


@pytest.mark.usefixtures("no_hand_off")
def test_three_concurrent_drainers_deliver_every_job_exactly_once(
    app: Flask, task: FakeTask, database_url: str
) -> None:
    if database_url.startswith("sqlite"):
        pytest.skip("SQLite has one writer: one drainer at a time (docs: The outbox)")
    idempotency: Idempotency = ext(app)["idempotency"]
    with app.app_context():
        for order_id in range(300):
            idempotency.stage(task, order_id)
        ext(app)["db"].session.commit()
    start = threading.Barrier(3)
    errors: list[BaseException] = []

    def drainer() -> None:
        try:
            start.wait(10)
            with app.app_context():
                while idempotency.outbox.drain(limit=10, max_batches=1)["delivered"]:
                    pass
        except BaseException as exc:  # reported by the test, not lost in the thread
            errors.append(exc)

    threads = [threading.Thread(target=drainer) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)

    assert errors == [] and not any(thread.is_alive() for thread in threads)
    rows = jobs(app)
    assert {j["state"] for j in rows} == {"DELIVERED"} and all(j["attempts"] == 1 for j in rows)
    delivered = [call["task_id"] for call in task.calls]
    assert sorted(delivered) == sorted(j["key"] for j in rows)  # each job handed to the broker once


@pytest.mark.usefixtures("no_hand_off")
@pytest.mark.parametrize("database_url", ["postgresql", "postgresql-psycopg"], indirect=True)
def test_a_following_drainer_on_postgresql_wakes_on_the_commits_notify_not_at_its_interval(app: Flask) -> None:
    idempotency: Idempotency = ext(app)["idempotency"]
    delivered = threading.Event()
    stopping = threading.Event()

    @idempotency.handler("wake")
    def wake(n: int) -> None:
        delivered.set()

    def follow() -> None:
        with app.app_context():
            idempotency.outbox.follow(interval=60.0, stop=stopping.is_set)

    drainer = threading.Thread(target=follow, daemon=True)
    drainer.start()
    with app.app_context(), ext(app)["db"].engine.connect() as conn:
        listening = sa.text(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND query = :q"
        ).bindparams(q="LISTEN idempotency_outbox")
        for _ in range(200):  # until the drainer listens (a condition, not an ordering hoped for)
            if conn.execute(listening).scalar():
                break
            conn.rollback()  # pg_stat_activity is a snapshot per transaction
            stopping.wait(0.05)
        assert conn.execute(listening).scalar() == 1

    with app.app_context():
        idempotency.stage("wake", 1)
        ext(app)["db"].session.commit()
    assert delivered.wait(15), "the drainer slept through the NOTIFY (its interval is 60 s)"

    stopping.set()
    with app.app_context():  # wakes it once more, to see it stop
        idempotency.stage("wake", 2)
        ext(app)["db"].session.commit()
    drainer.join(15)
    assert not drainer.is_alive()
    assert [j["state"] for j in jobs(app)][0] == "DELIVERED"


@pytest.mark.usefixtures("effects")
def test_staging_without_the_outbox_table_names_the_command_that_creates_it(app: Flask) -> None:
    with app.app_context():
        ext(app)["idempotency"].state().tables.outbox.drop(ext(app)["db"].engine)
        with pytest.raises(SchemaVersionError, match="flask idempotency upgrade-schema"):
            ext(app)["idempotency"].stage("reindex", 1)
    result = app.test_cli_runner().invoke(args=["idempotency", "upgrade-schema", "--json"])
    assert json.loads(result.output) == {"added": ["idempotency_outbox"]}
    with app.app_context():
        ext(app)["idempotency"].stage("reindex", 1)
        ext(app)["db"].session.commit()
    assert [j["args"] for j in jobs(app)] == [[1]]
