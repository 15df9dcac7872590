"""Throughput over time on psycopg2 and psycopg 3 side by side: does the layer slow down the longer it runs?

    .venv/bin/python bench/decay.py                          # 6 rounds of 4 s per cell, both drivers
    .venv/bin/python bench/decay.py --rounds 8 --duration 5 --drivers psycopg
    .venv/bin/python bench/decay.py --vacuum                 # VACUUM ANALYZE the records table between rounds

One gunicorn (2 sync workers) and one throwaway database per driver; each round runs, in turn, fresh keys on
/leased, replays of one completed key on /leased, and the bare route, with wrk (16 connections). The table only
grows (fresh keys), so a layer whose cost follows the table's size shows up as a falling line. PostgreSQL here
runs with autovacuum off: without ``--vacuum`` nothing is vacuumed or analyzed during the run (say which when
you quote numbers). After the rounds it prints the plans of the deciding read as a prepared statement, custom
and generic (``plan_cache_mode``), on the table as the run left it.
"""

from __future__ import annotations

import argparse
import os
import sys
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from infra import Databases, Server, log, pg_connect, request, run_wrk  # noqa: E402

DRIVERS = {"psycopg2": "postgresql+psycopg2", "psycopg": "postgresql+psycopg"}
BODY = {"amount": 1250, "currency": "EUR", "creditor": "ACME GmbH", "reference": "invoice 2024-0042"}
# The deciding read as the layer sends it (store.RecordStore._find), reduced to its access path.
FIND = (
    "SELECT idempotency_records.id, idempotency_records.state FROM idempotency_records"
    " WHERE idempotency_records.scope = $1 AND idempotency_records.key = $2"
)


def explain(db: str, key: str) -> None:
    conn = pg_connect(db)
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute("SELECT scope FROM idempotency_records WHERE key = %s", (key,))
        (scope,) = cur.fetchone()
        cur.execute(
            "SELECT count(*), (SELECT reltuples FROM pg_class WHERE relname = 'idempotency_records')"
            " FROM idempotency_records"
        )
        n, reltuples = cur.fetchone()
        log(f"  records: {n} rows, planner thinks {reltuples:.0f}")
        cur.execute(f"PREPARE find(text, text) AS {FIND}")
        for mode in ("force_custom_plan", "force_generic_plan"):
            cur.execute(f"SET plan_cache_mode = {mode}")
            cur.execute("EXPLAIN (ANALYZE, BUFFERS, COSTS) EXECUTE find(%s, %s)", (scope, key))
            log(f"  {mode}:\n    " + "\n    ".join(row[0] for row in cur.fetchall()))
    conn.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--drivers", default="psycopg2,psycopg")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--duration", type=float, default=4)
    parser.add_argument("--vacuum", action="store_true", help="VACUUM ANALYZE the records table between rounds")
    parser.add_argument("--no-explain", action="store_true")
    args = parser.parse_args()
    cells = {"leased fresh": ("/leased", "fresh"), "leased replay": ("/leased", "fixed"), "bare": ("/bare", "fresh")}
    table: dict[str, dict[str, list[float]]] = {}
    for driver in args.drivers.split(","):
        os.environ["BENCH_PG_URL"] = f"{DRIVERS[driver]}://root@127.0.0.1:5432/{{db}}"
        run_id = uuid.uuid4().hex[:8]
        dbs = Databases()
        db = dbs.create(f"bench_decay_{driver}_{run_id}")
        server = None
        try:
            from app import create_app, create_tables

            os.environ["BENCH_DATABASE_URL"] = os.environ["BENCH_PG_URL"].format(db=db)
            create_tables(create_app())
            server = Server(db, run_id).start()
            replay_key = f"{run_id}-replay"
            status, _, _ = request(server.port, "POST", "/leased", BODY, {"Idempotency-Key": replay_key})
            assert status == 201, status
            rows = table[driver] = {cell: [] for cell in cells}
            for n in range(args.rounds):
                for cell, (path, mode) in cells.items():
                    prefix = replay_key if mode == "fixed" else f"{run_id}-{n}-{path.strip('/')}"
                    result = run_wrk(server.port, path, mode, prefix, duration=args.duration)
                    rows[cell].append(result.rps)
                if args.vacuum:
                    conn = pg_connect(db)
                    conn.autocommit = True
                    with conn.cursor() as cur:
                        cur.execute("VACUUM ANALYZE idempotency_records")
                    conn.close()
                log(f"{driver} round {n + 1}: " + ", ".join(f"{c} {v[-1]:.0f}" for c, v in rows.items()))
            if not args.no_explain:
                explain(db, replay_key)
        finally:
            if server is not None:
                server.stop()
            dbs.drop_all()
    vacuum = "VACUUM ANALYZE between rounds" if args.vacuum else "no VACUUM/ANALYZE during the run (autovacuum off)"
    print(f"\nreq/s per round ({args.rounds} x {args.duration:g} s per cell; {vacuum})\n")
    print("| driver | cell | " + " | ".join(str(i + 1) for i in range(args.rounds)) + " |")
    print("|---|---|" + "---:|" * args.rounds)
    for driver, rows in table.items():
        for cell, values in rows.items():
            print(f"| {driver} | {cell} | " + " | ".join(f"{v:.0f}" for v in values) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
