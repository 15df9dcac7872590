"""The outbox in real processes: gunicorn serves ``outboxapp``, ``flask idempotency drain`` drains it, a real
``celery worker`` on Redis consumes its jobs (the task is keyed by ``outbox_key``), on PostgreSQL; three drainer
processes on PostgreSQL and on MariaDB deliver 2,000 jobs to a handler.

Every effect is a row the consumer writes (``outbox_effects``, with the job's key); the tests assert on those
rows and on the outbox's. Leases and backoffs end by moving the database's clock (a file the app reads), never by
waiting; faults are flag files and a request header (see ``outboxapp``). Every wait is bounded and every process
is stopped at the end. Needs Redis for the Celery tests (skipped without it, as ``test_celery_tasks``).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import outboxapp
import pytest
import sqlalchemy as sa
from procs import TESTS_DIR, FileClock, Gunicorn, TcpProxy, poll, send
from test_celery_tasks import REDIS_URL, redis_or_skip

LEASE = 60  # the records' default lease, which the hand-off's and the drainers' leases are
HANDOFF = 1.0  # seconds: IDEMPOTENCY_OUTBOX_HANDOFF_SECONDS of the served app


JOB_COLUMNS = ("key", "state", "attempts", "last_error", "args")
EFFECT_COLUMNS = ("order_id", "seq", "job_key", "via", "pid")


def select(table: str, *columns: str) -> sa.Select[Any]:
    """``SELECT columns FROM table ORDER BY id``, quoted for each database (``key`` is reserved on MariaDB)."""
    t = sa.table(table, sa.column("id"), *(sa.column(c) for c in columns))
    return sa.select(*(t.c[c] for c in columns)).order_by(t.c.id)


class StallingProxy(TcpProxy):
    """A :class:`~procs.TcpProxy` that can also :meth:`stall`: it keeps every connection open and accepts new
    ones, but forwards nothing until :meth:`resume` (a broker that hangs: each command waits for its reply)."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self._flowing = threading.Event()
        self._flowing.set()
        super().__init__(target_host, target_port)

    def stall(self) -> None:
        self._flowing.clear()

    def resume(self) -> None:
        self._flowing.set()

    def _pump(self, pair: tuple[socket.socket, socket.socket], src: socket.socket, dst: socket.socket) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                while not self._flowing.wait(0.1):  # held, not lost: delivered when the broker comes back
                    if pair not in self._pairs:
                        return
                dst.sendall(data)
        except OSError:
            pass
        finally:
            self._drop(pair)


class Proc:
    """A process of the test in its own session (process group), its output in a log file."""

    def __init__(self, argv: list[str], env: dict[str, str], log: Path) -> None:
        self.log = log
        with open(log, "ab") as out:
            self.proc = subprocess.Popen(
                argv, cwd=TESTS_DIR, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def tail(self, lines: int = 30) -> str:
        with contextlib.suppress(FileNotFoundError):
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        return "(no log)"

    def tally(self) -> dict[str, int]:
        """A ``drain --json``'s answer: the JSON object that ends its output."""
        text = self.log.read_text()
        return dict(json.loads(text[text.rindex("\n{") + 1 :] if "\n{" in text else text))

    def wait(self, timeout: float = 60) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{self.proc.args} still running after {timeout} s:\n{self.tail()}") from None

    def kill(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.kill()


class Rig:
    """The served app, its drainers and Celery workers, the database clock and the flag files of one test."""

    def __init__(self, url: str, tmp: Path, **env: str) -> None:
        self.url, self.tmp = url, tmp
        self.signals = tmp / "signals"
        self.signals.mkdir()
        self.clock = FileClock(tmp / "clock")
        self.env = {
            **os.environ,
            "OUTBOXAPP_DATABASE_URL": url,
            "OUTBOXAPP_CLOCK_FILE": str(self.clock.path),
            "OUTBOXAPP_SIGNAL_DIR": str(self.signals),
            "OUTBOXAPP_HANDOFF_SECONDS": str(HANDOFF),
            **env,
        }
        self.procs: list[Proc] = []
        self.servers: list[Gunicorn] = []
        self.engine = sa.create_engine(url)
        outboxapp.tables(url)

    def serve(self, workers: int = 1, **env: str) -> Gunicorn:
        server = Gunicorn({**self.env, **env}, self.tmp / "gunicorn.log", workers=workers, app="outboxapp:wsgi()")
        self.servers.append(server)
        return server.start()

    def order(self, server: Gunicorn, order_id: int, jobs: int = 1, target: str = "celery", **headers: str) -> Any:
        return send(
            server.port,
            "POST",
            "/orders",
            key=f"order-{order_id}",
            body={"order": order_id, "jobs": jobs, "target": target},
            headers=headers,
        )

    def worker(self, name: str, **env: str) -> Proc:
        argv = [sys.executable, "-m", "celery", "-A", "outboxapp", "worker", "--pool=solo", "--concurrency=1"]
        argv += ["-n", f"{name}@127.0.0.1", "--without-heartbeat", "--without-mingle", "--without-gossip"]
        worker = self.start(argv, name, **env)
        poll(
            lambda: (
                worker.proc.poll() is None and (self.signals / f"worker.{worker.pid}").exists() or self._exited(worker)
            ),
            timeout=60,
            what=f"worker {name} to be ready",
        )
        return worker

    @staticmethod
    def _exited(proc: Proc) -> bool:
        if proc.proc.poll() is not None:
            raise AssertionError(f"{proc.proc.args} exited with {proc.proc.returncode}:\n{proc.tail()}")
        return False

    def drainer(self, name: str, *args: str, **env: str) -> Proc:
        argv = [sys.executable, "-m", "flask", "--app", "outboxapp:flask_app", "idempotency", "drain", *args]
        return self.start(argv + ["--json"], name, **env)

    def drain_once(self, name: str, **env: str) -> dict[str, int]:
        drainer = self.drainer(name, "--once", **env)
        assert drainer.wait(120) == 0, drainer.tail()
        return drainer.tally()

    def start(self, argv: list[str], name: str, **env: str) -> Proc:
        proc = Proc(argv, {**self.env, **env}, self.tmp / f"{name}.log")
        self.procs.append(proc)
        return proc

    def jobs(self) -> list[dict[str, Any]]:
        with self.engine.connect() as conn:
            return [dict(r._mapping) for r in conn.execute(select("idempotency_outbox", *JOB_COLUMNS))]

    def effects(self) -> list[dict[str, Any]]:
        with self.engine.connect() as conn:
            return [dict(r._mapping) for r in conn.execute(select("outbox_effects", *EFFECT_COLUMNS))]

    def broker_idle(self, client: Any) -> bool:
        """No message waits in the queue, none is delivered and unacknowledged (kombu's ``unacked`` hash)."""
        prefix = self.env["OUTBOXAPP_KEY_PREFIX"]
        return not client.llen(f"{prefix}outboxapp") and not client.hlen(f"{prefix}unacked")

    def records(self) -> set[tuple[str, str, int]]:
        """The handlers' once() records: (key, state, attempts)."""
        with self.engine.connect() as conn:
            rows = conn.execute(select("idempotency_records", "key", "state", "attempts"))
            return {(r.key, r.state, r.attempts) for r in rows if r.key.startswith("outbox:")}

    def orders(self) -> list[int]:
        with self.engine.connect() as conn:
            return list(conn.execute(sa.text("SELECT id FROM outbox_orders ORDER BY id")).scalars())

    def close(self) -> None:
        for proc in self.procs:
            proc.stop()
        for server in self.servers:
            server.stop()
        self.engine.dispose()
        outboxapp.tables(self.url, create_them=False)


def effects_by_job(rig: Rig) -> dict[str, int]:
    counts: dict[str, int] = {}
    for effect in rig.effects():
        counts[effect["job_key"]] = counts.get(effect["job_key"], 0) + 1
    return counts


@pytest.fixture(scope="module")
def redis_client() -> Iterator[Any]:
    client = redis_or_skip()
    yield client
    client.close()


@contextlib.contextmanager
def celery_rig(postgres_url: str, redis_client: Any, tmp: Path, **env: str) -> Iterator[Rig]:
    prefix = f"flask-idempotent-outbox-{uuid.uuid4().hex[:12]}:"
    rig = Rig(postgres_url, tmp, OUTBOXAPP_BROKER_URL=REDIS_URL, OUTBOXAPP_KEY_PREFIX=prefix, **env)
    try:
        yield rig
    finally:
        rig.close()
        stale = list(redis_client.scan_iter(match=f"{prefix}*", count=1000))
        if stale:
            redis_client.delete(*stale)


@pytest.fixture
def celery_outbox(postgres_url: str, redis_client: Any, tmp_path: Path) -> Iterator[Rig]:
    with celery_rig(postgres_url, redis_client, tmp_path) as rig:
        yield rig


def test_a_web_process_killed_between_commit_and_hand_off_loses_no_job(celery_outbox: Rig) -> None:
    rig = celery_outbox
    rig.worker("w1")
    server = rig.serve()
    assert rig.order(server, 1).status == 201  # a normal request: handed off at once, consumed
    poll(lambda: len(rig.effects()) == 1, timeout=30, what="the first order's receipt")

    with pytest.raises(ConnectionError):  # the worker dies after the commit: no response
        rig.order(server, 2, **{"X-Kill-After-Commit": "1"})
    # Committed (the order and its job), never handed off: the job is PENDING, leased to the dead hand-off.
    assert rig.orders() == [1, 2]
    second = [job for job in rig.jobs() if job["args"] == [2, 0]]
    assert [(j["state"], j["attempts"]) for j in second] == [("PENDING", 0)]
    assert rig.drain_once("early") == {"delivered": 0, "failed": 0, "dead": 0}  # its lease is still live

    rig.clock.advance(LEASE + 1)  # the hand-off's lease ran out
    assert rig.drain_once("drainer") == {"delivered": 1, "failed": 0, "dead": 0}
    poll(lambda: len(rig.effects()) == 2, timeout=30, what="the drained receipt")
    assert rig.drain_once("again") == {"delivered": 0, "failed": 0, "dead": 0}
    assert [j["state"] for j in rig.jobs()] == ["DELIVERED", "DELIVERED"]
    effects = rig.effects()
    assert [(e["order_id"], e["via"]) for e in effects] == [(1, "celery"), (2, "celery")]
    assert effects[1]["job_key"] == second[0]["key"]  # the consumer ran under the job's key, once


def test_a_drainer_killed_mid_batch_leaves_the_rest_to_the_next_and_every_effect_runs_once(
    postgres_url: str, redis_client: Any, tmp_path: Path
) -> None:
    with celery_rig(postgres_url, redis_client, tmp_path, OUTBOXAPP_HANDOFF_SECONDS="0") as rig:
        rig.worker("w1")
        server = rig.serve()
        assert rig.order(server, 7, jobs=10).status == 201  # ten jobs, all the drainer's (no hand-off)
        assert [j["state"] for j in rig.jobs()] == ["PENDING"] * 10
        (rig.signals / "7-3.kill-after-publish").touch()  # the broker gets job 3; the drainer dies before its mark

        first = rig.drainer("first", "--once")
        assert first.wait(60) == -signal.SIGKILL
        assert list(rig.signals.glob("7-3.kill-after-publish.taken-*"))
        poll(lambda: len(rig.effects()) == 4, timeout=30, what="the first drainer's four receipts")
        states = [j["state"] for j in rig.jobs()]
        assert states == ["DELIVERED"] * 3 + ["PENDING"] * 7  # job 3 published but unmarked; the rest leased

        assert rig.drain_once("too-early") == {"delivered": 0, "failed": 0, "dead": 0}  # the dead one's leases
        rig.clock.advance(LEASE + 1)
        assert rig.drain_once("next") == {"delivered": 7, "failed": 0, "dead": 0}
        # One worker takes the queue in order: once the last job's receipt is there, the second message of job 3
        # (published before it) has been consumed too.
        poll(lambda: any(e["seq"] == 9 for e in rig.effects()), timeout=30, what="the last receipt")
        jobs = rig.jobs()
        assert [j["state"] for j in jobs] == ["DELIVERED"] * 10
        counts = effects_by_job(rig)
        assert counts == {j["key"]: 1 for j in jobs}  # job 3 was delivered twice, its receipt sent once
        assert sorted(e["seq"] for e in rig.effects()) == list(range(10))


@pytest.mark.parametrize("outage", ["stopped", "hanging"])
def test_a_broker_outage_keeps_jobs_pending_within_the_bound_and_delivers_all_once_after(
    outage: str, postgres_url: str, redis_client: Any, tmp_path: Path
) -> None:
    redis = urlsplit(REDIS_URL)
    with StallingProxy(redis.hostname or "127.0.0.1", redis.port or 6379) as proxy:
        proxied = urlunsplit(redis._replace(netloc=f"127.0.0.1:{proxy.port}"))
        with celery_rig(postgres_url, redis_client, tmp_path) as rig:
            rig.worker("w1")  # the worker and the drainer reach Redis directly; the web process through the proxy
            server = rig.serve(OUTBOXAPP_BROKER_URL=proxied)
            assert rig.order(server, 1).status == 201
            poll(lambda: len(rig.effects()) == 1, timeout=30, what="a receipt before the outage")

            # stopped: every connection dropped, new ones refused; hanging: nothing answers, nothing fails
            proxy.cut() if outage == "stopped" else proxy.stall()
            took = []
            for order_id in range(2, 7):
                started = time.monotonic()
                assert rig.order(server, order_id).status == 201
                took.append(time.monotonic() - started)
            assert max(took) < HANDOFF + 1.5, took  # the bound plus a request's own time on a loaded machine
            assert rig.orders() == [1, 2, 3, 4, 5, 6]
            jobs = rig.jobs()
            assert [j["state"] for j in jobs] == ["DELIVERED"] + ["PENDING"] * 5  # none lost, none delivered
            assert len(rig.effects()) == 1

            proxy.restore() if outage == "stopped" else proxy.resume()  # a hung hand-off may now finish, too
            rig.clock.advance(LEASE + 3600 + 1)  # past the hand-offs' leases and any backoff
            delivered = rig.drain_once("drainer")
            assert delivered["failed"] == delivered["dead"] == 0
            poll(
                lambda: {e["order_id"] for e in rig.effects()} == {1, 2, 3, 4, 5, 6} and rig.broker_idle(redis_client),
                timeout=30,
                what="every receipt, and every message consumed",
            )
            jobs = rig.jobs()
            assert [j["state"] for j in jobs] == ["DELIVERED"] * 6
            assert effects_by_job(rig) == {j["key"]: 1 for j in jobs}  # none lost, none twice


@pytest.mark.parametrize("server", ["postgresql", "mariadb"])
def test_three_drainer_processes_deliver_two_thousand_jobs_each_once(
    server: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    url = request.getfixturevalue("postgres_url" if server == "postgresql" else "mariadb_url")
    rig = Rig(url, tmp_path, OUTBOXAPP_HANDOFF_SECONDS="0")
    try:
        web = rig.serve(workers=2)
        with ThreadPoolExecutor(8) as pool:  # 200 concurrent requests, ten jobs each
            replies = list(pool.map(lambda n: rig.order(web, n, jobs=10, target="handler"), range(1, 201)))
        assert [r.status for r in replies] == [201] * 200
        jobs = rig.jobs()
        assert len(jobs) == 2000 and {j["state"] for j in jobs} == {"PENDING"}

        (rig.signals / "hold").touch()  # each drainer's first delivery waits until all three are in a batch
        drainers = [rig.drainer(f"drainer{n}", "--once", "--limit", "50") for n in range(3)]
        poll(
            lambda: len(list(rig.signals.glob("ready.*"))) == 3 or any(rig._exited(d) for d in drainers),
            timeout=60,
            what="three drainers in a batch at once",
        )
        (rig.signals / "go").touch()
        tallies = []
        for drainer in drainers:
            assert drainer.wait(180) == 0, drainer.tail()
            tallies.append(drainer.tally())
        assert sum(t["delivered"] for t in tallies) == 2000
        assert all(t["delivered"] > 0 and t["failed"] == 0 for t in tallies), tallies

        jobs = rig.jobs()
        # No job delivered by two drainers, at once or one after the other: each job counts one delivery (a second
        # one marks it again, attempts 2; one while the first held the job meets the handler's once() record
        # IN_PROGRESS: a failed delivery with its last_error), and each once() record ran its handler once.
        assert {(j["state"], j["attempts"], j["last_error"]) for j in jobs} == {("DELIVERED", 1, None)}
        assert rig.records() == {(j["key"], "COMPLETED", 1) for j in jobs}
        assert effects_by_job(rig) == {j["key"]: 1 for j in jobs}
        effects = rig.effects()
        assert {e["pid"] for e in effects} == {d.pid for d in drainers}
        assert sorted((e["order_id"], e["seq"]) for e in effects) == [(n, s) for n in range(1, 201) for s in range(10)]
    finally:
        rig.close()
