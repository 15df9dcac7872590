"""Lost races: the database aborts a statement or a COMMIT with SQLSTATE 40001 (serialization failure).

That is what PostgreSQL under SERIALIZABLE, CockroachDB and YugabyteDB answer when two transactions conflict,
and (as MySQL error 1213) what a MariaDB Galera node answers to the loser of two commits. Nothing of the
aborted transaction was written. The layer retries its own statements a bounded number of times, and when a
retry is not safe or does not help, answers as a duplicate would — never 500.

The races are forced deterministically: a deferred constraint trigger on the records table fails the COMMIT
of the next N writes of one kind (``INSERT:IN_PROGRESS`` is a claim, ``UPDATE:COMPLETED`` an outcome or an
atomic commit, ``UPDATE:FAILED`` an operator's mark-failed), counting with a sequence, which a rollback does
not undo.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest
import sqlalchemy as sa
from concurrency import Background, finish, make_stuck
from flask import Flask
from flask.testing import FlaskClient
from helpers import charges, ext, in_app, post, problem_code, record
from procs import poll

from flask_idempotent import operations as ops
from flask_idempotent import pipeline
from flask_idempotent.dberrors import LOST_RACE_ATTEMPTS, lost_race
from flask_idempotent.machine import new_claim
from flask_idempotent.testing import LeaseClock

#: Also on the distributed-SQL emulations of ``IDEMPOTENCY_TEST_PG_VARIANTS`` (conftest).
PG_VARIANTS = True

LOSE_RACES = (
    "CREATE TABLE race_plan (point text PRIMARY KEY, failures int NOT NULL, seq text NOT NULL)",
    """CREATE FUNCTION lose_race() RETURNS trigger LANGUAGE plpgsql AS $$
    DECLARE this_point text := TG_OP || ':' || NEW.state;
    BEGIN
        IF EXISTS (SELECT 1 FROM race_plan p WHERE p.point = this_point AND nextval(p.seq::regclass) <= p.failures)
        THEN
            RAISE EXCEPTION 'test: % lost a race', this_point USING ERRCODE = '40001';
        END IF;
        RETURN NULL;
    END $$""",
    "CREATE CONSTRAINT TRIGGER lose_race AFTER INSERT OR UPDATE ON idempotency_records"
    " DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION lose_race()",
)


class Races:
    """Plans lost races at COMMIT, and says how many of them happened."""

    def __init__(self, engine: sa.Engine) -> None:
        self.engine = engine

    def lose(self, point: str, times: int) -> None:
        """Fail the COMMIT of the next ``times`` writes at ``point`` (``INSERT:IN_PROGRESS``, ...)."""
        seq = "race_" + point.replace(":", "_").lower()
        with self.engine.begin() as conn:
            conn.execute(sa.text(f"DROP SEQUENCE IF EXISTS {seq}"))
            conn.execute(sa.text(f"CREATE SEQUENCE {seq}"))
            conn.execute(sa.text("DELETE FROM race_plan WHERE point = :p"), {"p": point})
            conn.execute(sa.text("INSERT INTO race_plan VALUES (:p, :n, :s)"), {"p": point, "n": times, "s": seq})

    def lost(self, point: str) -> int:
        """How many writes at ``point`` were failed so far."""
        with self.engine.connect() as conn:
            planned, seq = conn.execute(
                sa.text("SELECT failures, seq FROM race_plan WHERE point = :p"), {"p": point}
            ).one()
            called = conn.execute(sa.text(f"SELECT CASE WHEN is_called THEN last_value ELSE 0 END FROM {seq}")).scalar()
        return min(int(called), int(planned))

    def lose_in_view(self, times: int) -> None:
        """Fail the next ``times`` inserts of a charge (the view's own write) at once, not at COMMIT."""
        with self.engine.begin() as conn:
            conn.execute(sa.text("CREATE SEQUENCE race_view"))
            conn.execute(
                sa.text(
                    "CREATE FUNCTION lose_race_in_view() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN"
                    f" IF nextval('race_view') <= {int(times)} THEN"
                    " RAISE EXCEPTION 'test: the view lost a race' USING ERRCODE = '40001'; END IF;"
                    " RETURN NEW; END $$"
                )
            )
            conn.execute(
                sa.text(
                    "CREATE TRIGGER lose_race_in_view BEFORE INSERT ON charges"
                    " FOR EACH ROW EXECUTE FUNCTION lose_race_in_view()"
                )
            )

    def stop(self) -> None:
        with self.engine.begin() as conn:
            conn.execute(sa.text("DELETE FROM race_plan"))


@pytest.fixture
def races(app: Flask, database_url: str) -> Iterator[Races]:
    if not database_url.startswith("postgresql"):
        pytest.skip("the races are forced by a PostgreSQL trigger")
    engine = sa.create_engine(database_url)
    with engine.begin() as conn:
        for statement in LOSE_RACES:
            conn.execute(sa.text(statement))
    try:
        yield Races(engine)
    finally:
        with engine.begin() as conn:
            conn.execute(sa.text("DROP TRIGGER IF EXISTS lose_race ON idempotency_records"))
            conn.execute(sa.text("DROP FUNCTION IF EXISTS lose_race() CASCADE"))
            conn.execute(sa.text("DROP FUNCTION IF EXISTS lose_race_in_view() CASCADE"))
            conn.execute(sa.text("DROP TABLE IF EXISTS race_plan"))
            for (seq,) in conn.execute(
                sa.text("SELECT sequencename FROM pg_sequences WHERE sequencename LIKE 'race_%'")
            ):
                conn.execute(sa.text(f"DROP SEQUENCE {seq}"))
        engine.dispose()


def test_a_claim_that_lost_a_race_is_retried_and_runs_the_view_once(
    app: Flask, client: FlaskClient, races: Races
) -> None:
    races.lose("INSERT:IN_PROGRESS", 2)
    reply = post(client, "/payments", json={"amount": 10})
    assert reply.status_code == 201, reply.data
    assert races.lost("INSERT:IN_PROGRESS") == 2
    assert charges(app) == 1
    row = record(app, "k-1")
    assert row is not None and (row["state"], row["attempts"]) == ("COMPLETED", 1)


def test_a_claim_that_keeps_losing_answers_409_in_progress_and_runs_nothing(
    app: Flask, client: FlaskClient, races: Races
) -> None:
    races.lose("INSERT:IN_PROGRESS", 1000)
    reply = post(client, "/payments", json={"amount": 10})
    assert reply.status_code == 409 and problem_code(reply) == "in-progress"
    assert reply.headers["Retry-After"] == "1"
    assert races.lost("INSERT:IN_PROGRESS") == LOST_RACE_ATTEMPTS  # bounded
    assert charges(app) == 0 and record(app, "k-1") is None
    races.stop()
    retry = post(client, "/payments", json={"amount": 10})
    assert (retry.status_code, retry.headers.get("Idempotent-Replayed")) == (201, None)
    assert charges(app) == 1


@pytest.mark.parametrize("app_config", [{"PROPAGATE_EXCEPTIONS": False}])
@pytest.mark.parametrize("where", ["INSERT:IN_PROGRESS", "UPDATE:COMPLETED", "view"])
def test_an_atomic_transaction_that_lost_a_race_keeps_nothing_is_not_re_run_and_answers_503_commit_conflict(
    app: Flask, client: FlaskClient, races: Races, where: str
) -> None:
    """Atomic: the claim, the view's writes and the outcome are one transaction. It loses at COMMIT (the claim's
    insert or the outcome's update: the trigger is deferred to it) or in the view's own write (under
    SERIALIZABLE often against the claim's read in the same transaction). Either way nothing was written."""
    if where == "view":
        races.lose_in_view(1)
    else:
        races.lose(where, 1)
    reply = post(client, "/transfers", json={"amount": 30})
    assert reply.status_code == 503 and problem_code(reply) == "commit-conflict"
    assert int(reply.headers["Retry-After"]) >= 1
    assert ext(app)["controls"].runs["transfers"] == 1  # the view ran once and was not run again
    assert charges(app, "transfers") == 0 and record(app, "k-1") is None
    retry = post(client, "/transfers", json={"amount": 30})
    assert retry.status_code == 201 and retry.get_json()["attempt"] == 1
    assert charges(app, "transfers") == 1
    row = record(app, "k-1")
    assert row is not None and (row["state"], row["attempts"]) == ("COMPLETED", 1)


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
@pytest.mark.parametrize(
    "app_config",
    [{"IDEMPOTENCY_ADVISORY_LOCKS": False, "SQLALCHEMY_ENGINE_OPTIONS": {"isolation_level": "SERIALIZABLE"}}],
)
def test_an_atomic_duplicate_without_advisory_locks_waits_loses_its_insert_and_replays(
    app: Flask, client: FlaskClient, caplog: pytest.LogCaptureFixture
) -> None:
    """A real race, CockroachDB-style: SERIALIZABLE and no advisory locks. The duplicate's INSERT waits on the
    owner's uncommitted row; the owner commits; the duplicate's INSERT fails with 40001; deciding again, it replays.
    """
    caplog.set_level(logging.INFO, logger="flask_idempotent")
    controls = ext(app)["controls"]
    held = controls.hold("transfers")
    owner = Background(app, "/transfers", key="k-1", json={"amount": 30})
    assert held.entered.wait(10)
    duplicate = Background(app, "/transfers", key="k-1", json={"amount": 30})
    waiting = sa.text(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
        " AND wait_event_type = 'Lock' AND query LIKE 'INSERT INTO idempotency_records%'"
    )

    def duplicate_waits() -> int:
        # A fresh transaction per look: pg_stat_activity is a snapshot taken once per transaction.
        with app.app_context(), ext(app)["db"].engine.connect() as conn:
            return int(conn.execute(waiting).scalar_one())

    poll(duplicate_waits, timeout=10, what="the duplicate's INSERT to wait for the owner's row")
    held.release.set()
    first = owner.result()
    again = duplicate.result()
    assert first.status_code == 201
    assert (again.status_code, again.headers["Idempotent-Replayed"], again.data) == (201, "true", first.data)
    assert any("lost a race" in r.getMessage() for r in caplog.records)
    assert charges(app, "transfers") == 1 and controls.runs["transfers"] == 1
    row = record(app, "k-1")
    assert row is not None and (row["state"], row["attempts"]) == ("COMPLETED", 1)


def test_an_outcome_write_that_lost_a_race_is_written_again(app: Flask, client: FlaskClient, races: Races) -> None:
    races.lose("UPDATE:COMPLETED", 3)
    first = post(client, "/payments", json={"amount": 10})
    assert first.status_code == 201
    assert races.lost("UPDATE:COMPLETED") == 3
    row = record(app, "k-1")
    assert row is not None and (row["state"], row["response_status"], row["version"]) == ("COMPLETED", 201, 2)
    again = post(client, "/payments", json={"amount": 10})
    assert (again.status_code, again.headers["Idempotent-Replayed"], again.data) == (201, "true", first.data)
    assert charges(app) == 1


def test_an_outcome_write_that_keeps_losing_leaves_the_record_in_progress_never_re_executed(
    app: Flask, client: FlaskClient, races: Races, clock: LeaseClock
) -> None:
    races.lose("UPDATE:COMPLETED", 1000)
    first = post(client, "/payments", json={"amount": 10})
    assert first.status_code == 201  # the client gets the view's answer
    assert races.lost("UPDATE:COMPLETED") == LOST_RACE_ATTEMPTS
    row = record(app, "k-1")
    assert row is not None and row["state"] == "IN_PROGRESS"
    races.stop()
    clock.advance(minutes=5)
    stuck = post(client, "/payments", json={"amount": 10})
    assert stuck.status_code == 409 and problem_code(stuck) == "stuck"
    assert charges(app) == 1


@pytest.mark.parametrize("winner", ["completed", "in_progress"])
def test_the_loser_of_a_commit_race_for_its_key_answers_as_a_duplicate(
    app: Flask, client: FlaskClient, races: Races, monkeypatch: pytest.MonkeyPatch, winner: str
) -> None:
    """Galera's case: two nodes both claimed the key; the loser's COMMIT fails, and the winner's record stands.

    Between the loser's failed COMMIT and its re-read the winner commits: a real request that completes, or
    (an in-flight owner on another node) its committed claim.
    """
    races.lose("UPDATE:COMPLETED", 1)
    real_rollback = pipeline._rollback_quietly
    winners: list[Any] = []

    def rollback_then_the_winner_commits(state: Any) -> None:
        real_rollback(state)
        if winners:
            return
        if winner == "completed":
            winners.append(Background(app, "/transfers", key="k-1", json={"amount": 30}).result())
        else:
            ctx = pipeline.get_current()
            assert ctx is not None
            with state.db.engine.begin() as conn:
                winners.append(state.store.insert(conn, new_claim(ctx.command, "winner"), lease=60, ttl=3600))

    monkeypatch.setattr(pipeline, "_rollback_quietly", rollback_then_the_winner_commits)
    loser = post(client, "/transfers", json={"amount": 30})
    assert winners, "the loser's COMMIT did not fail"
    row = record(app, "k-1")
    assert row is not None
    if winner == "completed":
        assert (loser.status_code, loser.headers["Idempotent-Replayed"]) == (201, "true")
        assert loser.data == winners[0].data
        assert charges(app, "transfers") == 1
        assert (row["state"], row["attempts"]) == ("COMPLETED", 1)
    else:
        assert loser.status_code == 409 and problem_code(loser) == "in-progress"
        assert charges(app, "transfers") == 0
        assert (row["state"], row["lease_token"]) == ("IN_PROGRESS", "winner")


def test_an_operator_action_that_lost_a_race_is_retried(app: Flask, races: Races, clock: LeaseClock) -> None:
    owner = make_stuck(app, clock)
    row = record(app, "stuck-1")
    assert row is not None
    races.lose("UPDATE:FAILED", 2)
    done = in_app(app, ops.mark_failed, row["id"], actor="alice", version=row["version"])
    assert (done["state"], done["retryable"]) == ("FAILED", False)
    assert races.lost("UPDATE:FAILED") == 2
    finish(owner)


def test_an_operator_action_that_keeps_losing_is_refused_as_changed_and_changes_nothing(
    app: Flask, races: Races, clock: LeaseClock
) -> None:
    owner = make_stuck(app, clock)
    row = record(app, "stuck-1")
    assert row is not None
    races.lose("UPDATE:FAILED", 1000)
    with pytest.raises(ops.RecordChanged, match="being changed by others"):
        in_app(app, ops.mark_failed, row["id"], actor="alice", version=row["version"])
    after = record(app, "stuck-1")
    assert after is not None and (after["state"], after["version"]) == ("IN_PROGRESS", row["version"])
    races.stop()
    finish(owner)


@pytest.mark.parametrize(
    ("orig", "expected"),
    [
        (SimpleNamespace(pgcode="40001", args=()), True),  # psycopg2: serialization failure
        (SimpleNamespace(pgcode="40P01", args=()), True),  # psycopg2: deadlock
        (SimpleNamespace(sqlstate="40001", args=()), True),  # psycopg 3
        (SimpleNamespace(pgcode="23505", args=()), False),  # a unique violation is not a lost race
        (SimpleNamespace(pgcode=None, args=("server closed the connection",)), False),
        (SimpleNamespace(args=(1213, "Deadlock found when trying to get lock")), True),  # PyMySQL, Galera
        (SimpleNamespace(args=(1062, "Duplicate entry")), False),
        (SimpleNamespace(args=(2013, "Lost connection")), False),
    ],
)
def test_lost_races_are_told_apart_from_other_database_errors(orig: Any, expected: bool) -> None:
    assert lost_race(sa.exc.OperationalError("COMMIT", {}, orig)) is expected  # type: ignore[arg-type]
    assert lost_race(RuntimeError("40001")) is False


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
@pytest.mark.parametrize("app_config", [{"IDEMPOTENCY_ADVISORY_LOCKS": False}])
def test_advisory_locks_off_sends_no_lock_statement_and_atomic_requests_still_work(
    app: Flask, client: FlaskClient
) -> None:
    statements: list[str] = []
    with app.app_context():
        engine = ext(app)["db"].engine
    listener = lambda *args: statements.append(args[2])  # noqa: E731 - (conn, cursor, statement, ...)
    sa.event.listen(engine, "before_cursor_execute", listener)
    try:
        first = post(client, "/transfers", json={"amount": 30})
        again = post(client, "/transfers", json={"amount": 30})
    finally:
        sa.event.remove(engine, "before_cursor_execute", listener)
    assert first.status_code == 201 and again.headers["Idempotent-Replayed"] == "true"
    assert statements and not [s for s in statements if "advisory" in s]
    assert charges(app, "transfers") == 1


@pytest.mark.parametrize("value", ["off", 0, None])
def test_advisory_locks_must_be_a_bool(value: Any, clock: LeaseClock) -> None:
    from testapp import Controls, build_app

    with pytest.raises(ValueError, match="IDEMPOTENCY_ADVISORY_LOCKS must be True or False"):
        build_app("sqlite://", clock=clock, controls=Controls(), IDEMPOTENCY_ADVISORY_LOCKS=value)


def test_the_variant_databases_are_what_they_emulate(app: Flask, request: pytest.FixtureRequest) -> None:
    """The emulations are real: SERIALIZABLE connections; a lock another session holds is refused by the real
    function, granted by the stub of ``grantall``, and ``nolocks`` has no function at all."""
    expected = {
        "postgresql-serializable": ("serializable", False),
        "postgresql-nolocks": ("serializable", "error 42883"),
        "postgresql-grantall": ("read committed", True),
    }.get(request.node.callspec.params["database_url"])
    if expected is None:
        pytest.skip("not a distributed-SQL emulation")
    with app.app_context(), ext(app)["db"].engine.connect() as holder, ext(app)["db"].engine.connect() as conn:
        holder.execute(sa.text("SELECT pg_advisory_xact_lock(1)"))  # held until ``holder`` ends its transaction
        isolation = conn.execute(sa.text("SHOW default_transaction_isolation")).scalar()
        try:
            granted: Any = conn.execute(sa.text("SELECT pg_try_advisory_xact_lock(1)")).scalar()
        except sa.exc.DBAPIError as exc:
            granted = f"error {exc.orig.pgcode}"  # type: ignore[union-attr]
    assert (isolation, granted) == expected
