"""What a claim costs on PostgreSQL, by CPU time: the read-first claim against the insert-first one.

    .venv/bin/python bench/claims.py                                   # psycopg2
    .venv/bin/python bench/claims.py --url 'postgresql+psycopg://root@127.0.0.1:5432/{db}'

One autocommit connection on a throwaway database, the store's own statements (flask_idempotent/store.py), 8
interleaved rounds of 300 claims per variant. It reports wall time and, less disturbed by other load on the
machine, CPU time: the server backend's (``/proc/<pid>/schedstat``, so PostgreSQL must run on this machine)
and this process's (``time.process_time``). Variants:

- read first: the deciding read (``find``; in atomic mode ``find_and_lock``), then the ``INSERT`` (the claim
  before this round, and still SQLite's);
- insert first: ``insert_claim`` (the ``INSERT``; in atomic mode with the key's advisory lock), read only if the
  key is taken (today's claim on PostgreSQL);
- replays of a taken key the same two ways.

The atomic variants run on the autocommit connection too (each statement its own transaction): they measure
the statements, not the view's transaction around them.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import sqlalchemy as sa

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from flask_idempotent.machine import Command, new_claim  # noqa: E402
from flask_idempotent.models import define_tables  # noqa: E402
from flask_idempotent.store import RecordStore  # noqa: E402

ADMIN_URL = "postgresql+psycopg2://root@127.0.0.1:5432/postgres"


def on_cpu_us(pid: int) -> float:
    """Microseconds process ``pid`` has spent on a CPU."""
    return int(Path(f"/proc/{pid}/schedstat").read_text().split()[0]) / 1e3


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="postgresql+psycopg2://root@127.0.0.1:5432/{db}")
    parser.add_argument("--claims", type=int, default=300, help="claims per variant and round")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument(
        "--connect-args",
        type=json.loads,
        default={},
        help="the driver's connect arguments as JSON, e.g. '{\"prepare_threshold\": null}' (psycopg 3)",
    )
    args = parser.parse_args()
    admin = sa.create_engine(ADMIN_URL, isolation_level="AUTOCOMMIT")
    name = f"bench_claims_{uuid.uuid4().hex[:8]}"
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    try:
        engine = sa.create_engine(
            args.url.format(db=name), isolation_level="AUTOCOMMIT", connect_args=args.connect_args
        )
        metadata = sa.MetaData()
        store = RecordStore(define_tables(metadata))
        metadata.create_all(engine)
        taken: list[str] = []

        def claim_of(key: str) -> Any:
            return new_claim(Command("bench", key, "v1:" + "a" * 64, "POST", "/payments", "payments"), "t" * 32)

        def read_first(atomic: bool, key: str | None = None) -> Callable[[Any], None]:
            def run(conn: Any) -> None:
                k = key or uuid.uuid4().hex
                row = store.find_and_lock(conn, "bench", k)[1] if atomic else store.find(conn, "bench", k)
                if row is None:
                    store.insert(conn, claim_of(k), lease=60, ttl=86400)
                    taken.append(k)

            return run

        def insert_first(atomic: bool, key: str | None = None) -> Callable[[Any], None]:
            def run(conn: Any) -> None:
                k = key or uuid.uuid4().hex
                if store.insert_claim(conn, claim_of(k), lease=60, ttl=86400, lock=atomic) is None:
                    (store.find_and_lock(conn, "bench", k) if atomic else store.find(conn, "bench", k))
                else:
                    taken.append(k)

            return run

        with engine.connect() as conn:
            read_first(False)(conn)
            replayed = taken[0]
            variants = {
                "first request, read first": read_first(False),
                "first request, insert first": insert_first(False),
                "atomic first, read first": read_first(True),
                "atomic first, insert first": insert_first(True),
                "replay, read first": read_first(False, replayed),
                "replay, insert first": insert_first(False, replayed),
            }
            backend = int(conn.exec_driver_sql("SELECT pg_backend_pid()").scalar_one())
            wall: dict[str, list[float]] = {v: [] for v in variants}
            server: dict[str, list[float]] = {v: [] for v in variants}
            client: dict[str, list[float]] = {v: [] for v in variants}
            for run in variants.values():  # warm-up: compiled-statement cache, the table's first pages
                for _ in range(50):
                    run(conn)
            for round_no in range(args.rounds):
                order = list(variants) if round_no % 2 == 0 else list(variants)[::-1]
                for variant in order:
                    run = variants[variant]
                    t0, s0, c0 = time.perf_counter(), on_cpu_us(backend), time.process_time()
                    for _ in range(args.claims):
                        run(conn)
                    wall[variant].append((time.perf_counter() - t0) / args.claims * 1e6)
                    server[variant].append((on_cpu_us(backend) - s0) / args.claims)
                    client[variant].append((time.process_time() - c0) / args.claims * 1e6)
        engine.dispose()
        print(f"{args.url.split(':')[0]} {args.connect_args}: medians of {args.rounds} rounds, us per claim")
        print(f"{'':30} {'wall':>7} {'server CPU':>11} {'client CPU':>11}")
        for variant in variants:
            print(
                f"{variant:30} {statistics.median(wall[variant]):7.0f} {statistics.median(server[variant]):11.0f}"
                f" {statistics.median(client[variant]):11.0f}"
            )
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE "{name}" WITH (FORCE)'))
        admin.dispose()
    return 0


if __name__ == "__main__":
    sys.exit(main())
