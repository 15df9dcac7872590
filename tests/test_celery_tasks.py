"""``idempotency.task`` under a real Celery worker: Redis broker (and result backend), PostgreSQL records.

Real ``celery worker`` processes (``--pool=solo``: the task runs in the worker process, so a SIGKILL from the task
kills the whole worker, as a lost machine would) run ``celeryapp.charge``, an ``acks_late`` task whose body is an
idempotent function writing one charge row per execution. The test sends tasks with ``.delay()`` and reads the
results from the result backend and the records and charges from PostgreSQL.

- The same task sent twice runs once; a second delivery while the first holds the lease retries
  (``RequestInProgress`` -> ``self.retry(countdown=retry_after)``) until the first finished, then gets its value.
- A worker killed after the effect, before the outcome: Redis gives the unacknowledged message to a fresh worker
  after its visibility timeout. While the lease is live the redelivered task retries; once the lease ended (the
  test moves the database's clock) it is stuck (``RecordStuck``, the task fails). Nothing runs twice until an
  operator decides with the CLI: ``mark-retryable`` (the next delivery runs it again: a second charge, attempt 2)
  or ``mark-failed`` (the next delivery fails with ``RequestFailed``, no charge).
- A worker killed after the outcome, before the acknowledgement: the redelivered task returns the stored value.
- Celery's own retries (``raise self.retry(...)`` under ``bind=True``, ``autoretry_for``) are transient: each
  retry runs the function again (attempts + 1); when Celery gives up (``max_retries``) the record stays FAILED
  retryable, and the task sent again runs it.

Needs PostgreSQL and Redis (``IDEMPOTENCY_TEST_REDIS_URL``, default ``redis://127.0.0.1:6379/15``). Each test
starts from an empty broker and result backend of its own: every Redis key it uses has a fresh prefix (kombu's and
Celery's ``global_keyprefix``), deleted at its end. A ``FLUSHDB`` would do the same for one run alone, but would
also delete the queues and results of another run sharing the database (two checkouts, the full suite and this
module at once) in the middle of its tests. Skipped when either is unreachable, failed instead with
``IDEMPOTENCY_REQUIRE_POSTGRES=1`` / ``IDEMPOTENCY_REQUIRE_REDIS=1`` (CI). Every wait is bounded; every worker is
killed (its process group) in teardown.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
import sqlalchemy as sa
from procs import TESTS_DIR, FileClock, poll

pytestmark = pytest.mark.postgresql_only

REDIS_URL = os.environ.get("IDEMPOTENCY_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
REQUIRE_REDIS = os.environ.get("IDEMPOTENCY_REQUIRE_REDIS") == "1"
LEASE = 30  # seconds: real time never ends it during a test, the test's clock does
VISIBILITY_TIMEOUT = 5  # seconds before Redis gives an unacknowledged message to another worker
SCOPE = "billing"
T = TypeVar("T")


def redis_or_skip() -> Any:
    """A client of the test's Redis database, or skip (fail under ``IDEMPOTENCY_REQUIRE_REDIS=1``)."""

    def missing(reason: str) -> Any:
        if REQUIRE_REDIS:
            pytest.fail(f"IDEMPOTENCY_REQUIRE_REDIS=1 but {reason}")
        pytest.skip(reason)

    try:
        import celery  # noqa: F401
        import redis
    except ImportError as exc:
        return missing(f"celery[redis] is not installed ({exc})")
    client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2, socket_timeout=5)
    try:
        client.ping()
    except redis.RedisError as exc:
        client.close()
        return missing(f"Redis not reachable at {REDIS_URL}: {exc}")
    return client


class Worker:
    """One ``celery -A celeryapp worker`` (``--pool=solo``, or ``prefork`` with one child) in its own session
    (process group)."""

    def __init__(self, env: dict[str, str], signals: Path, log_path: Path, name: str, pool: str = "solo") -> None:
        self.env, self.signals, self.log_path, self.name, self.pool = env, signals, log_path, name, pool
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, timeout: float = 60) -> Worker:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [
                    *(sys.executable, "-m", "celery", "-A", "celeryapp", "worker"),
                    *(f"--pool={self.pool}", "--concurrency=1", "--loglevel=INFO", "-n", f"{self.name}@127.0.0.1"),
                    *("--without-heartbeat", "--without-mingle", "--without-gossip"),
                ],
                cwd=TESTS_DIR,
                env={**os.environ, **self.env},
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

        def ready() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"worker {self.name} exited with {self.proc.returncode}:\n{self.log_tail()}")
            return (self.signals / f"ready.{self.proc.pid}").exists()

        wait(ready, timeout=timeout, what=f"worker {self.name} to be ready", workers=[self])
        return self

    def wait_killed(self, timeout: float = 30) -> int:
        """Wait for the worker to die on its own (the task killed it); its exit status."""
        assert self.proc is not None
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"worker {self.name} still alive after {timeout} s:\n{self.log_tail()}") from None

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return "(no worker log)"

    def terminate(self) -> None:
        """SIGTERM the process group: a warm shutdown (:meth:`stop` waits for it)."""
        proc = self.proc
        if proc is not None and proc.poll() is None:
            # Not reaped yet: its pid still names the group start_new_session created.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)

    def stop(self) -> None:
        """:meth:`terminate`; SIGKILL the process group if the worker does not exit in time."""
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        self.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:  # a parked task delays a warm shutdown: no need to wait it out
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


def wait(check: Callable[[], T | None], *, timeout: float, what: str, workers: list[Worker]) -> T:
    """:func:`procs.poll`, with the workers' logs in the failure."""
    try:
        return poll(check, timeout=timeout, what=what)
    except AssertionError as exc:
        logs = "\n".join(f"--- worker {w.name} ---\n{w.log_tail()}" for w in workers)
        raise AssertionError(f"{exc}\n{logs}") from None


class Rig:
    """The workers of one test, the producer side of the Celery app, the lease clock and the database."""

    def __init__(self, postgres_url: str, tmp: Path, key_prefix: str) -> None:
        import celeryapp

        self.tmp = tmp
        self.signals = tmp / "signals"
        self.signals.mkdir()
        self.clock = FileClock(tmp / "clock")
        self.env = {
            "CELERYAPP_DATABASE_URL": postgres_url,
            "CELERYAPP_BROKER_URL": REDIS_URL,
            "CELERYAPP_KEY_PREFIX": key_prefix,
            "CELERYAPP_CLOCK_FILE": str(self.clock.path),
            "CELERYAPP_LEASE": str(LEASE),
            "CELERYAPP_VISIBILITY_TIMEOUT": str(VISIBILITY_TIMEOUT),
            "CELERYAPP_SIGNAL_DIR": str(self.signals),
        }
        self.app = celeryapp.create(self.env)  # the producer: .delay() and the results
        self.charge = self.app.charge
        self.engine = sa.create_engine(postgres_url)
        self.workers: list[Worker] = []
        with self.app.flask_app.app_context():
            # Bounded: a lock left by a killed worker's session must fail the test, not hang it.
            engine = sa.create_engine(postgres_url, connect_args={"options": "-c lock_timeout=10000"})
            try:
                self.app.db.metadata.drop_all(engine)
                self.app.db.metadata.create_all(engine)
            finally:
                engine.dispose()

    def worker(self, name: str, pool: str = "solo", **env: str) -> Worker:
        worker = Worker({**self.env, **env}, self.signals, self.tmp / f"{name}.log", name, pool)
        self.workers.append(worker)
        return worker.start()

    def wait(self, check: Callable[[], T | None], *, timeout: float, what: str) -> T:
        return wait(check, timeout=timeout, what=what, workers=self.workers)

    def fault(self, order_id: int, fault: str) -> Path:
        flag = self.signals / f"{order_id}.{fault}"
        flag.touch()
        return flag

    def taken_by(self, order_id: int, fault: str) -> list[int]:
        """The pids of the deliveries that took the fault (one at most)."""
        return [int(p.name.rsplit("-", 1)[1]) for p in self.signals.glob(f"{order_id}.{fault}.taken-*")]

    def result(self, async_result: Any, timeout: float = 30) -> Any:
        """The task's final value, or its exception (not raised)."""
        try:
            return async_result.get(timeout=timeout, propagate=False, interval=0.05)
        except Exception as exc:  # celery's TimeoutError: show the workers' logs
            logs = "\n".join(f"--- worker {w.name} ---\n{w.log_tail()}" for w in self.workers)
            raise AssertionError(f"no result for task {async_result.id} in {timeout} s: {exc!r}\n{logs}") from None

    def record(self, order_id: int) -> dict[str, Any] | None:
        with self.engine.connect() as conn:
            row = conn.execute(
                sa.text(
                    "SELECT id, kind, method, path, state, retryable, attempts, response_body"
                    " FROM idempotency_records WHERE scope = :scope AND key = :key"
                ),
                {"scope": SCOPE, "key": f"charge:{order_id}"},
            ).first()
        if row is None:
            return None
        record = dict(row._mapping)
        body = record.pop("response_body")
        record["value"] = None if body is None else json.loads(bytes(body))
        return record

    def charges(self, order_id: int) -> list[dict[str, Any]]:
        with self.engine.connect() as conn:
            rows = conn.execute(
                sa.text("SELECT id, amount, pid, task_id FROM celery_charges WHERE order_id = :o ORDER BY id"),
                {"o": order_id},
            )
            return [dict(r._mapping) for r in rows]

    def runs(self, order_id: int) -> list[tuple[str, int]]:
        """The runs of a retried task's function for the order: (task name, Celery's retries before it)."""
        with self.engine.connect() as conn:
            rows = conn.execute(
                sa.text("SELECT task, retries FROM celery_runs WHERE order_id = :o ORDER BY id"), {"o": order_id}
            )
            return [(r.task, r.retries) for r in rows]

    def events(self, record_id: int, kind: str | None = None) -> list[dict[str, Any]]:
        with self.engine.connect() as conn:
            rows = conn.execute(
                sa.text("SELECT kind, actor FROM idempotency_events WHERE record_id = :id ORDER BY id"),
                {"id": record_id},
            )
            return [dict(r._mapping) for r in rows if kind is None or r.kind == kind]

    def cli(self, *args: str) -> Any:
        """``flask --app celeryapp:flask_app idempotency ARGS --json``, as an operator runs it; its JSON."""
        result = subprocess.run(
            [sys.executable, "-m", "flask", "--app", "celeryapp:flask_app", "idempotency", *args, "--json"],
            cwd=TESTS_DIR,
            env={**os.environ, **self.env},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 0, (result.stdout, result.stderr)
        return json.loads(result.stdout)

    def close(self) -> None:
        for worker in self.workers:
            worker.terminate()  # all at once, then each is waited for (and killed if need be)
        for worker in self.workers:
            worker.stop()
        self.app.celery.close()
        self.engine.dispose()
        with self.app.flask_app.app_context():
            self.app.db.engine.dispose()


@pytest.fixture(scope="module")
def redis_client() -> Iterator[Any]:
    client = redis_or_skip()
    yield client
    client.close()


@pytest.fixture
def rig(postgres_url: str, redis_client: Any, tmp_path: Path) -> Iterator[Rig]:
    key_prefix = f"flask-idempotent-test-{uuid.uuid4().hex[:12]}:"
    rig = Rig(postgres_url, tmp_path, key_prefix)
    try:
        yield rig
    finally:
        rig.close()
        stale = list(redis_client.scan_iter(match=f"{key_prefix}*", count=1000))
        if stale:
            redis_client.delete(*stale)
        with contextlib.suppress(sa.exc.SQLAlchemyError):
            engine = sa.create_engine(postgres_url, connect_args={"options": "-c lock_timeout=10000"})
            try:
                rig.app.db.metadata.drop_all(engine)  # the shared test database, as the other tests expect it
            finally:
                engine.dispose()


def test_the_same_task_sent_twice_charges_once(rig: Rig) -> None:
    rig.worker("w1")
    first, second = rig.charge.delay(1, 1000), rig.charge.delay(1, 1000)
    assert first.id != second.id  # two messages, two deliveries
    value = rig.result(first)
    assert rig.result(second) == value
    assert (first.state, second.state) == ("SUCCESS", "SUCCESS")

    charges = rig.charges(1)
    assert len(charges) == 1
    assert value == {"charge": charges[0]["id"], "order_id": 1, "amount": 1000, "pid": charges[0]["pid"]}
    assert charges[0]["task_id"] == first.id  # the first delivery charged; the second got its stored value
    record = rig.record(1)
    assert record is not None
    assert (record["kind"], record["method"], record["path"]) == ("task", "TASK", "celeryapp.charge")
    assert (record["state"], record["attempts"], record["value"]) == ("COMPLETED", 1, value)

    # The same key with another amount is another command: refused, nothing charged.
    other = rig.charge.delay(1, 9999)
    assert type(rig.result(other)).__name__ == "KeyReused"
    assert other.state == "FAILURE"
    assert len(rig.charges(1)) == 1 and rig.record(1) == record


def test_a_delivery_while_another_holds_the_lease_retries_until_it_finished(rig: Rig) -> None:
    rig.worker("w1")
    rig.worker("w2")
    rig.fault(2, "park-after-effect")
    first = rig.charge.delay(2, 500)
    rig.wait(lambda: (rig.signals / "2.parked").exists(), timeout=30, what="the first delivery to park")
    (owner,) = rig.taken_by(2, "park-after-effect")
    record = rig.record(2)
    assert record is not None and record["state"] == "IN_PROGRESS"

    second = rig.charge.delay(2, 500)  # the owner's worker is busy: the other worker takes it
    # RequestInProgress -> self.retry(countdown=retry_after): it comes back, and is refused again.
    rig.wait(
        lambda: len(rig.events(record["id"], "in_progress_hit")) >= 2,
        timeout=30,
        what="the second delivery to be refused twice",
    )
    assert second.state == "RETRY"
    assert len(rig.charges(2)) == 1

    (rig.signals / "2.go").touch()
    value = rig.result(first)
    assert rig.result(second) == value  # its next retry found the outcome: the stored value
    assert (first.state, second.state) == ("SUCCESS", "SUCCESS")
    charges = rig.charges(2)
    assert len(charges) == 1 and charges[0]["pid"] == owner == value["pid"]
    after = rig.record(2)
    assert after is not None
    assert (after["state"], after["attempts"], after["value"]) == ("COMPLETED", 1, value)


@pytest.mark.parametrize("decision", ["mark-retryable", "mark-failed"])
def test_a_worker_killed_after_the_effect_holds_the_task_until_an_operator_decides(rig: Rig, decision: str) -> None:
    order = 3
    first_worker = rig.worker("w1")
    rig.fault(order, "kill-after-effect")
    sent = rig.charge.delay(order, 700)
    assert first_worker.wait_killed() == -signal.SIGKILL
    assert rig.taken_by(order, "kill-after-effect") == [first_worker.pid]
    charges = rig.charges(order)
    assert len(charges) == 1 and charges[0]["pid"] == first_worker.pid
    record = rig.record(order)
    assert record is not None
    assert (record["state"], record["attempts"], record["value"]) == ("IN_PROGRESS", 1, None)

    # acks_late: the message was never acknowledged. Once older than the visibility timeout, Redis gives it to
    # the fresh worker; the lease is live (the owner might still be running): it retries, and retries.
    rig.worker("w2")
    rig.wait(
        lambda: len(rig.events(record["id"], "in_progress_hit")) >= 2,
        timeout=VISIBILITY_TIMEOUT + 30,
        what="the redelivered task to be refused twice",
    )
    assert sent.state == "RETRY"

    # The lease ends (the database's clock moves): the owner is presumed dead, but its charge may have happened.
    rig.clock.advance(LEASE + 1)
    assert type(rig.result(sent)).__name__ == "RecordStuck"
    assert sent.state == "FAILURE"
    assert rig.charges(order) == charges  # nothing ran again
    assert rig.record(order) == record
    assert rig.events(record["id"], "stale_hit")

    # What an operator sees: the stuck task record, and its history.
    stuck = rig.cli("stuck")
    assert [(r["id"], r["kind"], r["path"]) for r in stuck["items"]] == [(record["id"], "task", "celeryapp.charge")]
    shown = rig.cli("show", SCOPE, f"charge:{order}")
    assert shown["state"] == "IN_PROGRESS"
    assert {"in_progress_hit", "stale_hit"} <= {e["kind"] for e in shown["events"]}

    # The operator decides; the next delivery (the same task sent again) does what the decision says.
    marked = rig.cli(decision, str(record["id"]), "--actor", "ops:alice")
    assert (marked["state"], marked["retryable"]) == ("FAILED", decision == "mark-retryable")
    assert {"kind": decision.replace("-", "_"), "actor": "ops:alice"} in rig.events(record["id"])
    again = rig.charge.delay(order, 700)
    if decision == "mark-failed":
        assert type(rig.result(again)).__name__ == "RequestFailed"
        assert again.state == "FAILURE"
        assert rig.charges(order) == charges
        after = rig.record(order)
        assert after is not None and (after["state"], after["retryable"], after["attempts"]) == ("FAILED", False, 1)
        return
    value = rig.result(again)
    assert again.state == "SUCCESS"
    rerun = rig.charges(order)
    assert len(rerun) == 2 and rerun[0] == charges[0]  # a second charge: the operator's explicit decision
    assert value == {"charge": rerun[1]["id"], "order_id": order, "amount": 700, "pid": rerun[1]["pid"]}
    after = rig.record(order)
    assert after is not None
    assert (after["state"], after["attempts"], after["value"]) == ("COMPLETED", 2, value)
    replay = rig.charge.delay(order, 700)
    assert rig.result(replay) == value and rig.charges(order) == rerun


@pytest.mark.parametrize("pool", ["solo", "prefork"])
def test_a_worker_killed_after_the_outcome_before_the_ack_gets_the_stored_value(rig: Rig, pool: str) -> None:
    order = 4
    if pool == "solo":
        worker = rig.worker("w1")
    else:
        # The real default visibility timeout (1 hour): within this test, only reject_on_worker_lost brings the
        # message back.
        worker = rig.worker("w1", pool="prefork", CELERYAPP_VISIBILITY_TIMEOUT="3600")
    rig.fault(order, "kill-after-completion")
    sent = rig.charge.delay(order, 300)
    if pool == "solo":
        # The task ran in the worker process: the whole worker died, the message is neither acked nor rejected.
        # Redis gives it to the fresh worker once it is older than the visibility timeout.
        assert worker.wait_killed() == -signal.SIGKILL
        (killed,) = rig.taken_by(order, "kill-after-completion")
        assert killed == worker.pid
        record = rig.record(order)
        assert record is not None and (record["state"], record["attempts"]) == ("COMPLETED", 1)
        rig.worker("w2")
    else:
        # The pool's child died; the worker saw it and (reject_on_worker_lost) requeued the message for its next
        # child at once, instead of failing the task with WorkerLostError.
        (killed,) = rig.wait(
            lambda: rig.taken_by(order, "kill-after-completion"), timeout=30, what="the task to take the fault"
        )
        assert killed != worker.pid
    value = rig.result(sent, timeout=VISIBILITY_TIMEOUT + 30)
    assert sent.state == "SUCCESS"
    rig.wait(lambda: not pid_alive(killed), timeout=30, what=f"process {killed} to be gone")
    charges = rig.charges(order)
    assert len(charges) == 1 and charges[0]["pid"] == killed
    assert value == {"charge": charges[0]["id"], "order_id": order, "amount": 300, "pid": killed}
    record = rig.record(order)
    assert record is not None
    assert (record["state"], record["attempts"], record["value"]) == ("COMPLETED", 1, value)
    if pool == "prefork":
        assert worker.proc is not None and worker.proc.poll() is None  # the worker itself lived on


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


RETRIED_BY = {"self.retry": "retry_charge", "autoretry_for": "auto_charge"}  # how Celery is asked to retry


@pytest.mark.parametrize("how", list(RETRIED_BY))
def test_celery_retries_run_the_task_again_until_it_succeeds(rig: Rig, how: str) -> None:
    order = 5
    task = getattr(rig.app, RETRIED_BY[how])
    rig.worker("w1")
    sent = task.delay(order, 800, 2)  # the provider is busy for the first two runs
    value = rig.result(sent)
    assert sent.state == "SUCCESS"
    assert rig.runs(order) == [(task.name, 0), (task.name, 1), (task.name, 2)]  # ran three times: two retries
    charges = rig.charges(order)
    assert len(charges) == 1 and charges[0]["task_id"] == sent.id  # one effect
    assert value == {"charge": charges[0]["id"], "order_id": order, "amount": 800}
    record = rig.record(order)
    assert record is not None and (record["kind"], record["path"]) == ("task", task.name)
    assert (record["state"], record["retryable"], record["attempts"], record["value"]) == ("COMPLETED", False, 3, value)

    replay = task.delay(order, 800, 2)  # the same task sent again: the stored value, nothing runs
    assert rig.result(replay) == value and replay.state == "SUCCESS"
    assert len(rig.runs(order)) == 3 and rig.charges(order) == charges and rig.record(order) == record


@pytest.mark.parametrize("how", list(RETRIED_BY))
def test_when_celery_gives_up_the_record_stays_failed_retryable(rig: Rig, how: str) -> None:
    order = 6
    task = getattr(rig.app, RETRIED_BY[how])
    rig.worker("w1")
    sent = task.delay(order, 900, 3)  # busy for three runs: max_retries=2 gives up after the third
    assert type(rig.result(sent)).__name__ == "ProviderBusy"
    assert sent.state == "FAILURE"
    assert rig.runs(order) == [(task.name, 0), (task.name, 1), (task.name, 2)]
    assert rig.charges(order) == []
    record = rig.record(order)
    assert record is not None
    assert (record["state"], record["retryable"], record["attempts"], record["value"]) == ("FAILED", True, 3, None)

    # What an operator sees: a retryable failure (nothing awaits a decision), as the dashboard's list shows it.
    listed = rig.cli("failed", "--which", "retryable", "--kind", "task")
    assert [(r["id"], r["state"], r["retryable"]) for r in listed["items"]] == [(record["id"], "FAILED", True)]
    assert rig.cli("failed", "--which", "awaiting")["items"] == []
    shown = rig.cli("show", SCOPE, f"charge:{order}")
    assert (shown["state"], shown["retryable"], shown["attempts"]) == ("FAILED", True, 3)

    # The task sent again (the provider answers now) runs the function again: attempt 4, one charge.
    again = task.delay(order, 900, 3)
    value = rig.result(again)
    assert again.state == "SUCCESS"
    charges = rig.charges(order)
    assert len(charges) == 1 and value == {"charge": charges[0]["id"], "order_id": order, "amount": 900}
    after = rig.record(order)
    assert after is not None
    assert (after["state"], after["retryable"], after["attempts"], after["value"]) == ("COMPLETED", False, 4, value)
