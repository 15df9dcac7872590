"""Two app hosts whose clocks differ by 90 s share one PostgreSQL store: the database's clock alone decides.

Host A serves ``faultapp`` on the real clock; host B serves it under ``faketime -f +90s`` (libfaketime), and the
operator's CLI "on host B" runs under it too. Both are Werkzeug servers in their own processes on one database,
with a 60 s lease. A request held on host A right after its effect has a lease that is live by the database's
clock (about 60 s left) but ended about 30 s ago by host B's clock.

Had the layer decided with the host's clock, host B would answer 409 ``stuck`` on the hold route, take the record
over and run the view a second time on the takeover route, and the CLI would mark the record retryable or
release it. It must do none of these: host B answers 409 ``in-progress``, the CLI refuses with the live-lease
rule, the record is unchanged; once the held request completes, host B replays it. A control shows that host B
does end the lease (stuck, takeover) as soon as the *database's* clock, as host B sees it, passes it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from faultapp import HOLD_HEADER, drop_tables, reset_database
from procs import TESTS_DIR, FileClock, Reply, free_port, poll, send

LEASE = 60  # seconds
SKEW = 90  # host B's clock is this far ahead: its reading puts every fresh lease 30 s in the past
FAKETIME = shutil.which("faketime")
TOLERANCE = 5.0  # seconds between two readings of "the same" clock (process start-up, a slow machine)


def skewed(argv: list[str]) -> list[str]:
    """``argv`` run with host B's clock (libfaketime, LD_PRELOAD)."""
    assert FAKETIME is not None
    return [FAKETIME, "-f", f"+{SKEW}s", *argv]


class _Exited(Exception):
    """The server exited while we waited for it (e.g. its port was taken)."""


class Host:
    """``hostserver.py`` (faultapp on Werkzeug, threaded) on a free 127.0.0.1 port, in its own session."""

    def __init__(self, name: str, env: Mapping[str, str], log_path: Path, *, skew: bool) -> None:
        self.name = name
        self.env = {**os.environ, **env}
        self.log_path = log_path
        self.skew = skew
        self.port = 0
        self.pid = 0  # the serving Python process (under faketime: the child of ``proc``)
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30) -> Host:
        for _ in range(3):  # another process may take the free port between our probe and the server's bind
            self.port = free_port()
            argv = [sys.executable, str(TESTS_DIR / "hostserver.py"), str(self.port)]
            with open(self.log_path, "ab") as log:
                self.proc = subprocess.Popen(
                    skewed(argv) if self.skew else argv,
                    cwd=TESTS_DIR,
                    env=self.env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            try:
                self.pid = poll(self._answered, timeout=timeout, what=f"host {self.name} to answer GET /health")
                return self
            except _Exited:
                self.stop()
            except AssertionError as exc:
                self.stop()
                raise AssertionError(f"{exc}\n{self.log_tail()}") from None
        raise AssertionError(f"host {self.name} did not start:\n{self.log_tail()}")

    def _answered(self) -> int | None:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise _Exited
        try:
            return int(send(self.port, "GET", "/health", timeout=2).json()["pid"])
        except (OSError, ValueError):
            return None

    def clock(self) -> float:
        """``time.time()`` as the serving process reads it."""
        return float(send(self.port, "GET", "/host-clock", timeout=10).json()["time"])

    def post(self, path: str, key: str, **kwargs: Any) -> Reply:
        return send(self.port, "POST", path, key=key, body={"amount": 7}, **kwargs)

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return f"(no log for host {self.name})"

    def stop(self) -> None:
        """SIGTERM the server; SIGKILL the session's process group if it does not exit in time.

        Under faketime the server is faketime's child: it is signalled alone, so that faketime outlives it and
        removes its shared memory (``/dev/shm/faketime_shm_*``) as it exits normally.
        """
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            # Not reaped yet: its pid still names the group we created (start_new_session).
            ours = self.pid and _alive(self.pid) and proc.pid in (self.pid, _parent(self.pid))
            server = self.pid if ours else proc.pid
            with contextlib.suppress(ProcessLookupError):
                os.kill(server, signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
        if self.pid and self.pid != proc.pid:  # faketime's child, the server itself, must be gone too
            try:
                poll(lambda: not _alive(self.pid), timeout=10, what=f"host {self.name}'s server {self.pid} to exit")
            except AssertionError:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.pid, signal.SIGKILL)
        self.pid = 0


def _stat(pid: int) -> list[str]:
    """The fields of ``/proc/PID/stat`` after the command name (state, ppid, ...); empty if there is none."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except FileNotFoundError:
        return []


def _alive(pid: int) -> bool:
    fields = _stat(pid)
    return bool(fields) and fields[0] != "Z"


def _parent(pid: int) -> int:
    fields = _stat(pid)
    return int(fields[1]) if fields else 0


class TwoHosts:
    """Host A (real clock), host B (+90 s), one database, one signal dir, and the test's own view of the data."""

    def __init__(self, url: str, tmp: Path) -> None:
        self.signals = tmp / "signals"
        self.signals.mkdir()
        common = {"FAULTAPP_DATABASE_URL": url, "FAULTAPP_LEASE": str(LEASE), "FAULTAPP_SIGNAL_DIR": str(self.signals)}
        # Host B's view of the database's clock: offset 0 (the database's own clock) except in the control test.
        self.b_db_clock = FileClock(tmp / "b-db-clock")
        self.env_a = dict(common)
        self.env_b = {**common, "FAULTAPP_CLOCK_FILE": str(self.b_db_clock.path)}
        self.a = Host("A", self.env_a, tmp / "host-a.log", skew=False)
        self.b = Host("B", self.env_b, tmp / "host-b.log", skew=True)
        self.engine = sa.create_engine(url)
        self.pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="held-request")
        self.held: list[str] = []

    # Requests held on host A ------------------------------------------------------------------------------

    def hold_on_a(self, path: str, key: str) -> Future[Reply]:
        """Send ``key`` to host A, parked right after its effect; return once it is held there."""
        self.held.append(key)
        future = self.pool.submit(self.a.post, path, key, headers={HOLD_HEADER: "effect"}, timeout=60)
        marker = self.signals / f"{key}.effect.held"

        def held() -> bool:
            if future.done():
                raise AssertionError(f"{key} ended before it was held: {future.result()}\n{self.a.log_tail()}")
            return marker.exists()

        poll(held, timeout=20, what=f"{key} to be held after its effect on host A")
        return future

    def release(self, key: str) -> None:
        (self.signals / f"{key}.effect.go").touch()

    def release_all(self) -> None:
        for key in self.held:
            self.release(key)

    # The database, read with plain SQL and the database's own clock ----------------------------------------

    def record(self, key: str) -> dict[str, Any] | None:
        with self.engine.connect() as conn:
            row = conn.execute(
                sa.text(
                    "SELECT id, state, retryable, attempts, version, lease_token, locked_until,"
                    " extract(epoch FROM locked_until AT TIME ZONE 'UTC') AS lease_end,"
                    " extract(epoch FROM statement_timestamp()) AS db_now,"
                    " response_status, response_body"
                    " FROM idempotency_records WHERE scope = '' AND key = :key"
                ),
                {"key": key},
            ).first()
        if row is None:
            return None
        record = dict(row._mapping)
        for name in ("lease_end", "db_now"):
            record[name] = None if record[name] is None else float(record[name])
        body = record.pop("response_body")
        record["response_body"] = None if body is None else bytes(body)
        return record

    def effects(self, key: str) -> list[int]:
        with self.engine.connect() as conn:
            rows = conn.execute(sa.text("SELECT id FROM fault_effects WHERE key = :key ORDER BY id"), {"key": key})
            return [r.id for r in rows]

    def events(self, record_id: int) -> list[str]:
        with self.engine.connect() as conn:
            rows = conn.execute(
                sa.text("SELECT kind FROM idempotency_events WHERE record_id = :id ORDER BY id"), {"id": record_id}
            )
            return [r.kind for r in rows]

    def db_clock(self) -> float:
        with self.engine.connect() as conn:
            return float(conn.execute(sa.text("SELECT extract(epoch FROM clock_timestamp())")).scalar_one())

    # The operator, on host B ------------------------------------------------------------------------------

    def cli_on_b(self, *args: str) -> subprocess.CompletedProcess[str]:
        """``flask --app faultapp:create_app ARGS`` under host B's clock and environment."""
        return subprocess.run(
            skewed([sys.executable, "-m", "flask", "--app", "faultapp:create_app", *args]),
            cwd=TESTS_DIR,
            env={**os.environ, **self.env_b},
            capture_output=True,
            text=True,
            timeout=60,
        )

    def close(self) -> None:
        self.release_all()  # a held request would otherwise sit out its 30 s hold
        try:
            self.a.stop()
        finally:
            self.b.stop()
            self.pool.shutdown(wait=True)  # bounded: each request has a client timeout
            self.engine.dispose()


@pytest.fixture(scope="module")
def hosts(postgres_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TwoHosts]:
    if FAKETIME is None:
        message = "faketime (libfaketime) is not installed: host B cannot run on another clock"
        if os.environ.get("IDEMPOTENCY_REQUIRE_FAKETIME") == "1":
            pytest.fail(f"IDEMPOTENCY_REQUIRE_FAKETIME=1 but {message}")
        pytest.skip(message)
    reset_database(postgres_url)
    rig = TwoHosts(postgres_url, tmp_path_factory.mktemp("two-hosts"))
    try:
        rig.a.start()
        rig.b.start()
        yield rig
    finally:
        try:
            rig.close()
        finally:
            drop_tables(postgres_url)


def assert_clocks_differ(hosts: TwoHosts) -> None:
    """Host A and the database read the real time; host B and its CLI read it 90 s ahead (so no vacuous pass)."""
    before = time.time()
    a, b, db = hosts.a.clock(), hosts.b.clock(), hosts.db_clock()
    cli = subprocess.run(
        skewed([sys.executable, "-c", "import time; print(time.time())"]),
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    after = time.time()
    for name, reading, expected in (("A", a, 0), ("the database", db, 0), ("B", b, SKEW)):
        assert before - TOLERANCE <= reading - expected <= after + TOLERANCE, (name, reading - before)
    assert before - TOLERANCE <= float(cli.stdout) - SKEW <= after + TOLERANCE, cli.stdout
    assert hosts.b.pid != hosts.a.pid


def assert_in_progress(reply: Reply) -> None:
    assert reply.status == 409, reply
    assert reply.problem == "in-progress", reply
    assert int(reply.headers["retry-after"]) >= 1


def assert_live_by_db_but_over_by_b(hosts: TwoHosts, record: dict[str, Any]) -> None:
    """The record's lease has most of its 60 s left by the database's clock, and ended by host B's clock."""
    assert record["state"] == "IN_PROGRESS" and record["lease_token"] is not None
    left = record["lease_end"] - record["db_now"]
    assert LEASE - 15 < left <= LEASE, left
    assert hosts.b.clock() > record["lease_end"] + (SKEW - LEASE) - 15  # host B: over for ~30 s already


STABLE = ("id", "state", "retryable", "attempts", "version", "lease_token", "locked_until")


def stable(record: dict[str, Any] | None) -> dict[str, Any]:
    assert record is not None
    return {name: record[name] for name in STABLE}


@pytest.mark.postgresql_only
def test_host_b_90s_ahead_neither_reruns_nor_steals_a_live_lease_nor_lets_its_operator_end_it(
    hosts: TwoHosts,
) -> None:
    assert_clocks_differ(hosts)
    key, key2 = "two-hosts-hold", "two-hosts-takeover"

    # 1. Host A runs the view (its effect is committed) and is held before its outcome.
    first = hosts.hold_on_a("/payments", key)
    claimed = hosts.record(key)
    assert claimed is not None
    assert (claimed["state"], claimed["attempts"], claimed["version"], claimed["retryable"]) == (
        "IN_PROGRESS",
        1,
        1,
        False,
    )
    assert_live_by_db_but_over_by_b(hosts, claimed)
    effects = hosts.effects(key)
    assert len(effects) == 1

    # 2. The same command on host B: in progress (not stuck), the view not run again, the record untouched.
    assert_in_progress(hosts.b.post("/payments", key))
    assert stable(hosts.record(key)) == stable(claimed)
    assert hosts.effects(key) == effects
    assert hosts.events(claimed["id"]) == ["in_progress_hit"]

    # 3. On the takeover route: host B does not take the lease over, does not run the view.
    second = hosts.hold_on_a("/takeover-payments", key2)
    claimed2 = hosts.record(key2)
    assert claimed2 is not None
    assert (claimed2["state"], claimed2["attempts"], claimed2["version"]) == ("IN_PROGRESS", 1, 1)
    assert_live_by_db_but_over_by_b(hosts, claimed2)
    effects2 = hosts.effects(key2)
    assert len(effects2) == 1
    assert_in_progress(hosts.b.post("/takeover-payments", key2))
    assert stable(hosts.record(key2)) == stable(claimed2)
    assert hosts.effects(key2) == effects2
    assert hosts.events(claimed2["id"]) == ["in_progress_hit"]  # no takeover

    # 4. The operator on host B: the live-lease rule refuses every action that would end the lease.
    record_id = str(claimed["id"])
    for action in ("mark-retryable", "mark-failed", "release"):
        result = hosts.cli_on_b("idempotency", action, record_id, "--actor", "ops:host-b")
        output = result.stdout + result.stderr
        assert result.returncode != 0, output
        assert f"{action} refused" in output and "lease is still live" in output, output
        assert stable(hosts.record(key)) == stable(claimed)
    assert hosts.events(claimed["id"]) == ["in_progress_hit"]  # no operator event: nothing was done
    assert hosts.effects(key) == effects

    # Every answer above was given while the owner was really in flight (its hold had not timed out).
    assert not first.done() and not second.done()

    # 5. The owner completes; host B replays its outcome, nothing runs again.
    for k, future, claim, path in ((key, first, claimed, "/payments"), (key2, second, claimed2, "/takeover-payments")):
        hosts.release(k)
        done = future.result(timeout=30)
        assert done.status == 201 and not done.replayed, done
        assert done.json()["attempt"] == 1 and done.json()["pid"] == hosts.a.pid
        completed = hosts.record(k)
        assert completed is not None
        assert (completed["id"], completed["state"], completed["attempts"], completed["version"]) == (
            claim["id"],
            "COMPLETED",
            1,
            2,
        )
        assert completed["locked_until"] is None and completed["response_body"] == done.body
        replay = hosts.b.post(path, k)
        assert (replay.status, replay.replayed, replay.body) == (201, True, done.body), replay
        assert hosts.effects(k) == [done.json()["effect"]]
        assert stable(hosts.record(k)) == stable(completed)
        assert hosts.events(claim["id"]) == ["in_progress_hit"]


@pytest.mark.postgresql_only
def test_control_host_b_ends_the_lease_once_the_database_clock_it_sees_passes_it(hosts: TwoHosts) -> None:
    """The same host B, same skewed clock: moving only the database's clock (its ``clock_offset``) ends leases."""
    assert_clocks_differ(hosts)
    held, taken = "control-hold", "control-takeover"
    first = hosts.hold_on_a("/payments", held)
    second = hosts.hold_on_a("/takeover-payments", taken)
    assert_in_progress(hosts.b.post("/payments", held))
    assert_in_progress(hosts.b.post("/takeover-payments", taken))
    claimed = hosts.record(taken)
    assert claimed is not None and claimed["version"] == 1

    hosts.b_db_clock.advance(LEASE + 1)
    try:
        stuck = hosts.b.post("/payments", held)
        assert (stuck.status, stuck.problem) == (409, "stuck"), stuck
        assert len(hosts.effects(held)) == 1
        takeover = hosts.b.post("/takeover-payments", taken)
        assert takeover.status == 201 and not takeover.replayed, takeover
        assert takeover.json()["attempt"] == 2 and takeover.json()["pid"] == hosts.b.pid
    finally:
        hosts.b_db_clock.advance(-(LEASE + 1))
    assert len(hosts.effects(taken)) == 2
    after = hosts.record(taken)
    assert after is not None
    assert (after["state"], after["attempts"], after["response_body"]) == ("COMPLETED", 2, takeover.body)
    assert "takeover" in hosts.events(claimed["id"])

    # The owners on host A finish; the taken-over one's outcome is refused (its lease token is gone).
    hosts.release(held)
    hosts.release(taken)
    assert first.result(timeout=30).status == 201
    assert second.result(timeout=30).status == 201
    assert stable(hosts.record(held))["state"] == "COMPLETED"
    final = hosts.record(taken)
    assert final is not None
    assert (final["attempts"], final["response_body"]) == (2, takeover.body)
    assert hosts.b.post("/takeover-payments", taken).body == takeover.body
