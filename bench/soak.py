"""Soak: minutes of mixed traffic per driver, reported per minute. Does the layer stay flat the longer it runs?

    .venv/bin/python bench/soak.py                       # 10 minutes per driver, psycopg2 and psycopg 3
    .venv/bin/python bench/soak.py --minutes 3 --drivers psycopg

One gunicorn (2 sync workers) and one throwaway database per driver, both up for the whole run and loaded at
the same time (one wrk each), so a change of the machine's load hits both alike and the run takes ten minutes,
not twenty; each driver's numbers are therefore those of a machine shared with the other. Each minute is wrk
(16 connections per driver) sending the mix of
bench/load.lua: a fresh key to /leased, a fresh key to /atomic, a replay on /leased and a keyless request to
/optional, in turn; the table only grows. PostgreSQL here runs with autovacuum off; like autovacuum would,
``VACUUM ANALYZE`` of the records, events and payments tables runs after each minute of a driver, outside the
timed minute (``--no-vacuum``: never, and the report says so). After each minute, ``--control`` seconds (10) of
the bare route on both servers at once show what the machine itself did that minute (disk stalls, a neighbour's
load): the layer decays only if the mix falls against that control. Flat means: the last three minutes' median
within the run's own minute-to-minute noise of the first three's, for req/s, p99 and mix/bare.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from infra import BENCH_DIR, Databases, Server, WrkResult, log, pg_connect, request, run_wrk, vacuum  # noqa: E402

DRIVERS = {"psycopg2": "postgresql+psycopg2", "psycopg": "postgresql+psycopg"}
RESULTS = BENCH_DIR / "results"
BODY = {"amount": 1250, "currency": "EUR", "creditor": "ACME GmbH", "reference": "invoice 2024-0042"}  # load.lua's


def rows_and_vacuum(db: str, vacuumed: bool) -> tuple[int, float]:
    took = vacuum(db) if vacuumed else 0.0
    conn = pg_connect(db)
    with conn.cursor() as cur:
        cur.execute("SELECT count(*) FROM idempotency_records")
        (rows,) = cur.fetchone()
    conn.close()
    return rows, took


def on_every_server(
    servers: dict[str, Server], path: str, mode: str, prefix: str, duration: float, connections: int
) -> dict[str, WrkResult]:
    """wrk on every driver's server at once (keys prefixed by the server's run id, driver and ``prefix``)."""
    with ThreadPoolExecutor(len(servers)) as pool:
        runs = {
            driver: pool.submit(
                run_wrk,
                server.port,
                path,
                mode,
                f"{server.run_id}-{driver}-{prefix}",
                duration=duration,
                connections=connections,
            )
            for driver, server in servers.items()
        }
    return {driver: run.result() for driver, run in runs.items()}


def flatness(minutes: list[dict[str, Any]], field: str) -> dict[str, float]:
    values = [m[field] for m in minutes]
    head, tail = values[:3], values[-3:]
    steps = [abs(b - a) / a for a, b in zip(values, values[1:], strict=False) if a]
    return {
        "first3": statistics.median(head),
        "last3": statistics.median(tail),
        "last_over_first": statistics.median(tail) / statistics.median(head),
        "noise": statistics.median(steps) if steps else 0.0,  # median relative change from one minute to the next
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--drivers", default="psycopg2,psycopg")
    parser.add_argument("--minutes", type=int, default=10)
    parser.add_argument("--minute", type=float, default=60, help="seconds per reported minute (default 60)")
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--no-vacuum", action="store_true")
    parser.add_argument("--control", type=float, default=10, help="seconds of the bare route after each minute")
    args = parser.parse_args()
    drivers = args.drivers.split(",")
    run_id = uuid.uuid4().hex[:8]
    dbs = Databases()
    servers: dict[str, Server] = {}
    rows: dict[str, list[dict[str, Any]]] = {d: [] for d in drivers}
    try:
        from app import create_app, create_tables

        for driver in drivers:
            db = dbs.create(f"bench_soak_{driver}_{run_id}")
            os.environ["BENCH_DATABASE_URL"] = f"{DRIVERS[driver]}://root@127.0.0.1:5432/{db}"
            create_tables(create_app())
            url = {"BENCH_DATABASE_URL": os.environ["BENCH_DATABASE_URL"]}
            servers[driver] = Server(db, run_id, env=url).start()
        for minute in range(1, args.minutes + 1):
            for driver in drivers:  # the mix's replay key, completed before its replays start (else: 409s)
                key = f"{run_id}-{driver}-{minute}-replay"
                status, _, _ = request(servers[driver].port, "POST", "/leased", BODY, {"Idempotency-Key": key})
                assert status == 201, status
            runs = on_every_server(servers, "/leased", "mix", f"{minute}", args.minute, args.connections)
            controls = on_every_server(servers, "/bare", "none", f"{minute}-bare", args.control, args.connections)
            for driver in drivers:
                server, result, bare = servers[driver], runs[driver], controls[driver]
                records, vacuumed = rows_and_vacuum(server.db, not args.no_vacuum)
                bad = {k: v for k, v in result.statuses.items() if not k.startswith("2")}
                rows[driver].append(
                    {
                        "minute": minute,
                        "rps": result.rps,
                        "p50_ms": result.p50_ms,
                        "p99_ms": result.p99_ms,
                        "bare_rps": bare.rps,
                        "vs_bare": result.rps / bare.rps if bare.rps else 0.0,
                        "non_2xx": bad,
                        "errors": {k: v for k, v in result.errors.items() if v},
                        "records": records,
                        "vacuum_s": vacuumed,
                        "load1": result.load1,
                    }
                )
                log(
                    f"{driver} minute {minute}: {result.rps:.0f} req/s, p99 {result.p99_ms:.1f} ms,"
                    f" bare {bare.rps:.0f} req/s, {records} records" + (f", non-2xx {bad}" if bad else "")
                )
    finally:
        for server in servers.values():
            server.stop()
        dbs.drop_all()

    vacuum = "no VACUUM during the run (autovacuum off)" if args.no_vacuum else "VACUUM ANALYZE after each minute"
    lines = [
        f"{args.minutes} x {args.minute:g} s of mixed traffic per driver, both drivers loaded at once;"
        f" {args.connections} connections, 2 sync workers; {vacuum}.",
        "",
        "| minute | "
        + " | ".join(f"{d} req/s | {d} p99 ms | {d} bare req/s | {d} mix/bare" for d in drivers)
        + " | records ("
        + drivers[0]
        + ") |",
        "|---:|" + "---:|---:|---:|---:|" * len(drivers) + "---:|",
    ]
    for i in range(args.minutes):
        cells = " | ".join(
            f"{rows[d][i]['rps']:.0f} | {rows[d][i]['p99_ms']:.1f} | {rows[d][i]['bare_rps']:.0f}"
            f" | {rows[d][i]['vs_bare']:.2f}"
            for d in drivers
        )
        lines.append(f"| {i + 1} | {cells} | {rows[drivers[0]][i]['records']} |")
    summary: dict[str, Any] = {}
    lines.append("")
    for driver in drivers:
        summary[driver] = {f: flatness(rows[driver], f) for f in ("rps", "p99_ms", "bare_rps", "vs_bare")}
        r, p, c = summary[driver]["rps"], summary[driver]["p99_ms"], summary[driver]["vs_bare"]
        b = summary[driver]["bare_rps"]
        lines.append(
            f"- {driver}: req/s last 3 min / first 3 min = {r['last_over_first']:.3f} (minute-to-minute noise"
            f" {r['noise']:.1%}); p99 last/first = {p['last_over_first']:.3f} (noise {p['noise']:.1%});"
            f" the bare control last/first = {b['last_over_first']:.3f}; mix/bare last/first ="
            f" {c['last_over_first']:.3f} (noise {c['noise']:.1%});"
            f" non-2xx: {sum(sum(m['non_2xx'].values()) for m in rows[driver])}"
        )
    report = "\n".join(lines)
    print("\n" + report)
    RESULTS.mkdir(exist_ok=True)
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    (RESULTS / "soak.md").write_text(f"# Soak, {stamp}\n\n{report}\n")
    (RESULTS / "soak.json").write_text(json.dumps({"when": stamp, "rows": rows, "summary": summary}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
