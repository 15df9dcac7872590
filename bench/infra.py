"""Processes and databases the benchmark starts, and always stops: PostgreSQL databases, gunicorn, wrk."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg2
import redis

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
VENV_BIN = Path(sys.executable).parent
LUA = BENCH_DIR / "load.lua"
PG_ADMIN_DSN = os.environ.get("BENCH_PG_ADMIN_DSN", "host=127.0.0.1 port=5432 user=root dbname=postgres")
PG_URL_TEMPLATE = os.environ.get("BENCH_PG_URL", "postgresql+psycopg2://root@127.0.0.1:5432/{db}")
PG_DSN_TEMPLATE = os.environ.get("BENCH_PG_DSN", "host=127.0.0.1 port=5432 user=root dbname={db}")
REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pg_url(db: str) -> str:
    return PG_URL_TEMPLATE.format(db=db)


def pg_connect(db: str) -> Any:
    return psycopg2.connect(PG_DSN_TEMPLATE.format(db=db))


#: What the bench app writes to: VACUUM ANALYZE'd between rounds and phases (PostgreSQL here runs with
#: autovacuum off, so without it dead tuples pile up and plans go stale as the tables grow).
BENCH_TABLES = "idempotency_records, idempotency_events, bench_payments"


def vacuum(db: str, tables: str = BENCH_TABLES) -> float:
    """``VACUUM ANALYZE`` ``tables`` of ``db``, as autovacuum would; returns the seconds it took."""
    conn = pg_connect(db)
    conn.autocommit = True
    start = time.monotonic()
    try:
        with conn.cursor() as cur:
            cur.execute(f"VACUUM ANALYZE {tables}")
    finally:
        conn.close()
    return time.monotonic() - start


class Databases:
    """Throwaway databases, dropped (WITH FORCE) on close."""

    def __init__(self) -> None:
        self.created: list[str] = []

    def create(self, name: str) -> str:
        conn = psycopg2.connect(PG_ADMIN_DSN)
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            cur.execute(f'CREATE DATABASE "{name}"')
        conn.close()
        self.created.append(name)
        return name

    def drop_all(self) -> None:
        if not self.created:
            return
        conn = psycopg2.connect(PG_ADMIN_DSN)
        conn.autocommit = True
        with conn.cursor() as cur:
            for name in self.created:
                with contextlib.suppress(psycopg2.Error):
                    cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.close()
        self.created.clear()


def bench_env(db: str, run_id: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        BENCH_DATABASE_URL=pg_url(db),
        BENCH_REDIS_URL=REDIS_URL,
        BENCH_RUN_ID=run_id,
        PYTHONPATH=os.pathsep.join([str(BENCH_DIR), str(REPO)]),
        POWERTOOLS_IDEMPOTENCY_DISABLED="false",
    )
    return env


@dataclass
class Server:
    """A gunicorn master serving ``app:create_app()`` on 127.0.0.1:port."""

    db: str
    run_id: str
    workers: int = 2
    log_dir: Path = BENCH_DIR / "results" / "raw"
    port: int = 0
    proc: subprocess.Popen[bytes] | None = None
    extra: list[str] = field(default_factory=list)
    #: Environment variables of this server only (e.g. ``BENCH_OUTCOME_SYNCHRONOUS_COMMIT``).
    env: dict[str, str] = field(default_factory=dict)

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Server:
        self.port = self.port or free_port()
        self.log_dir.mkdir(parents=True, exist_ok=True)
        errlog = self.log_dir / f"gunicorn-{self.db}-{self.port}.log"
        cmd = [
            str(VENV_BIN / "gunicorn"),
            "--workers",
            str(self.workers),
            "--worker-class",
            "sync",
            "--bind",
            f"127.0.0.1:{self.port}",
            "--backlog",
            "2048",
            "--timeout",
            "120",
            "--chdir",
            str(BENCH_DIR),
            "--error-logfile",
            str(errlog),
            "--log-level",
            "warning",
            *self.extra,
            "app:create_app()",
        ]
        self.proc = subprocess.Popen(
            cmd,
            env={**bench_env(self.db, self.run_id), **self.env},
            cwd=BENCH_DIR,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"gunicorn exited with {self.proc.returncode}; see {errlog}")
            try:
                status, _, _ = request(self.port, "GET", "/healthz")
                if status == 200 and len(self.worker_pids()) >= self.workers:
                    return self
            except OSError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"gunicorn did not come up; see {errlog}")

    def worker_pids(self) -> list[int]:
        import psutil

        if self.proc is None:
            return []
        try:
            return sorted(c.pid for c in psutil.Process(self.proc.pid).children())
        except psutil.NoSuchProcess:
            return []

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            self.proc = None
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)
        self.proc = None


def request(
    port: int, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None, timeout: float = 30
) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        data = None if body is None else json.dumps(body).encode()
        h = {"Content-Type": "application/json", **(headers or {})}
        conn.request(method, path, body=data, headers=h)
        resp = conn.getresponse()
        return resp.status, dict(resp.getheaders()), resp.read()
    finally:
        conn.close()


@dataclass
class WrkResult:
    requests: int
    seconds: float
    rps: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    max_ms: float
    statuses: dict[str, int]
    errors: dict[str, int]
    load1: float

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def wrk_command(
    port: int,
    path: str,
    mode: str,
    prefix: str,
    *,
    n: int = 1,
    body: str = "a",
    limit: int = 0,
    duration: float = 5,
    connections: int = 16,
    threads: int = 1,
) -> list[str]:
    return [
        "wrk",
        "-t",
        str(threads),
        "-c",
        str(connections),
        "-d",
        f"{max(1, round(duration))}s",
        "--timeout",
        "10s",
        "-s",
        str(LUA),
        f"http://127.0.0.1:{port}",
        "--",
        path,
        mode,
        prefix,
        str(n),
        body,
        str(limit),
    ]


def parse_wrk(output: str, load1: float) -> WrkResult:
    for line in output.splitlines():
        if line.startswith("BENCH_JSON "):
            data = json.loads(line[len("BENCH_JSON ") :])
            break
    else:
        raise RuntimeError(f"no BENCH_JSON line in wrk output:\n{output}")
    seconds = data["duration_us"] / 1e6
    lat = data["latency_us"]
    return WrkResult(
        requests=data["requests"],
        seconds=round(seconds, 3),
        rps=round(data["requests"] / seconds, 1) if seconds else 0.0,
        p50_ms=lat["p50"] / 1000,
        p90_ms=lat["p90"] / 1000,
        p99_ms=lat["p99"] / 1000,
        mean_ms=round(lat["mean"] / 1000, 3),
        max_ms=lat["max"] / 1000,
        statuses=data["statuses"],
        errors=data["errors"],
        load1=load1,
    )


def run_wrk(port: int, path: str, mode: str, prefix: str, **kwargs: Any) -> WrkResult:
    load1 = os.getloadavg()[0]
    cmd = wrk_command(port, path, mode, prefix, **kwargs)
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=kwargs.get("duration", 5) + 120)
    if out.returncode != 0:
        raise RuntimeError(f"wrk failed ({out.returncode}): {out.stderr}\n{out.stdout}")
    return parse_wrk(out.stdout, load1)


class BackgroundWrk:
    """wrk running until stopped (SIGINT makes it print its summary)."""

    def __init__(self, port: int, path: str, mode: str, prefix: str, **kwargs: Any) -> None:
        self.load1 = os.getloadavg()[0]
        cmd = wrk_command(port, path, mode, prefix, duration=3600, **kwargs)
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def stop(self) -> WrkResult:
        self.proc.send_signal(signal.SIGINT)
        out, err = self.proc.communicate(timeout=60)
        return parse_wrk(out, self.load1)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def redis_cleanup(run_id: str) -> int:
    client = redis.Redis.from_url(REDIS_URL)
    deleted = 0
    batch: list[bytes] = []
    for name in client.scan_iter(match=f"bench:{run_id}:*", count=1000):
        batch.append(name)
        if len(batch) >= 1000:
            deleted += int(client.delete(*batch))
            batch.clear()
    if batch:
        deleted += int(client.delete(*batch))
    return deleted
