"""Does ``IDEMPOTENCY_OUTCOME_SYNCHRONOUS_COMMIT = False`` pay? Leased first requests with the outcome committed
synchronously and asynchronously, side by side.

    .venv/bin/python bench/durability.py                   # 5 interleaved rounds of 5 s per cell
    .venv/bin/python bench/durability.py --rounds 7 --duration 4 --driver psycopg

Two gunicorn servers (2 sync workers each) on one throwaway database, identical but for that setting; wrk (16
connections) sends fresh keys to ``/leased`` on each in turn, and to ``/bare`` for scale. A leased first request
commits three transactions (claim, the view's write, outcome); the setting spares the third its WAL flush.
Ratios are medians of per-round pairs. ``--sequential`` also times single requests one at a time (one
connection), where the flush is pure latency. PostgreSQL's records table is vacuumed and analyzed between rounds.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from infra import BENCH_DIR, Databases, Server, log, pg_connect, run_wrk, vacuum  # noqa: E402

DRIVERS = {"psycopg2": "postgresql+psycopg2", "psycopg": "postgresql+psycopg"}
RESULTS = BENCH_DIR / "results"


def pg_settings(db: str) -> dict[str, str]:
    conn = pg_connect(db)
    with conn.cursor() as cur:
        names = ("synchronous_commit", "fsync", "wal_sync_method", "commit_delay", "wal_writer_delay")
        out = {}
        for name in names:
            cur.execute(f"SHOW {name}")
            out[name] = cur.fetchone()[0]
    conn.close()
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--driver", choices=list(DRIVERS), default="psycopg2")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--duration", type=float, default=5)
    parser.add_argument("--connections", type=int, default=16)
    args = parser.parse_args()

    os.environ["BENCH_PG_URL"] = f"{DRIVERS[args.driver]}://root@127.0.0.1:5432/{{db}}"
    run_id = uuid.uuid4().hex[:8]
    dbs = Databases()
    db = dbs.create(f"bench_durability_{run_id}")
    servers: dict[str, Server] = {}
    cells: dict[str, list[dict]] = {"bare": [], "leased, synchronous outcome": [], "leased, asynchronous outcome": []}
    try:
        from app import create_app, create_tables

        os.environ["BENCH_DATABASE_URL"] = os.environ["BENCH_PG_URL"].format(db=db)
        create_tables(create_app())
        servers["on"] = Server(db, run_id).start()
        servers["off"] = Server(db, run_id, env={"BENCH_OUTCOME_SYNCHRONOUS_COMMIT": "off"}).start()
        plan = [
            ("bare", servers["on"], "/bare"),
            ("leased, synchronous outcome", servers["on"], "/leased"),
            ("leased, asynchronous outcome", servers["off"], "/leased"),
        ]
        for n in range(args.rounds):
            order = plan if n % 2 == 0 else plan[::-1]  # neither setting always runs right after the vacuum
            for cell, server, path in order:
                prefix = f"{run_id}-{n}-{'async' if server is servers['off'] else 'sync'}{path.replace('/', '-')}"
                result = run_wrk(
                    server.port, path, "fresh", prefix, duration=args.duration, connections=args.connections
                )
                cells[cell].append(result.as_dict())
            vacuum(db)
            log(f"round {n + 1}: " + ", ".join(f"{c} {v[-1]['rps']:.0f} req/s" for c, v in cells.items()))
        settings = pg_settings(db)
    finally:
        for server in servers.values():
            server.stop()
        dbs.drop_all()

    def med(cell: str, field: str) -> float:
        return statistics.median(r[field] for r in cells[cell])

    sync, asyn = "leased, synchronous outcome", "leased, asynchronous outcome"
    ratio = statistics.median(a["rps"] / s["rps"] for a, s in zip(cells[asyn], cells[sync], strict=True))
    bare_ratio = {
        c: statistics.median(x["rps"] / b["rps"] for x, b in zip(cells[c], cells["bare"], strict=True)) for c in cells
    }
    lines = [
        f"driver {args.driver}, {args.rounds} interleaved rounds x {args.duration:g} s, {args.connections} connections,"
        f" 2 sync workers per server; PostgreSQL {settings}; load average at the end {os.getloadavg()[0]:.2f}",
        "",
        "| cell | req/s | x bare | p50 ms | p99 ms |",
        "|---|---:|---:|---:|---:|",
    ]
    for cell in cells:
        lines.append(
            f"| {cell} | {med(cell, 'rps'):.0f} | {bare_ratio[cell]:.2f} | {med(cell, 'p50_ms'):.2f}"
            f" | {med(cell, 'p99_ms'):.2f} |"
        )
    lines += ["", f"asynchronous / synchronous outcome, req/s: {ratio:.3f} (median of per-round pairs)"]
    report = "\n".join(lines)
    print("\n" + report)
    RESULTS.mkdir(exist_ok=True)
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    (RESULTS / f"durability-{args.driver}-{args.connections}c.md").write_text(
        f"# Outcome commit, {stamp}\n\n{report}\n"
    )
    (RESULTS / f"durability-{args.driver}-{args.connections}c.json").write_text(
        json.dumps({"when": stamp, "settings": settings, "cells": cells, "ratio": ratio}, indent=1)
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
