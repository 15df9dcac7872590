"""Profile one route of the benchmark app in process: where a first request's time goes.

    .venv/bin/python bench/profiling.py                      # us per request of each route (interleaved)
    .venv/bin/python bench/profiling.py /leased              # pyinstrument tree of 2,000 first requests
    .venv/bin/python bench/profiling.py /atomic --cprofile   # cProfile (CPU time), sorted by own time
    .venv/bin/python bench/profiling.py --split              # each route's CPU time by part: hooks, claim, ...

Runs the bench app (bench/app.py) with Flask's test client on a throwaway PostgreSQL database, one request at
a time, every request with a fresh key. No server and no load generator: it shows the Python side and the
database round trips of one request, not throughput under load (that is bench/run.py).
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
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from infra import Databases, bench_env  # noqa: E402

BODY = json.dumps({"amount": 1250, "currency": "EUR", "creditor": "ACME", "reference": "profile"})
ROUTES = ["/bare", "/leased", "/floor-leased", "/atomic", "/floor-atomic"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("route", nargs="?", choices=ROUTES, help="profile this route (default: time all three)")
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--cprofile", action="store_true", help="cProfile instead of pyinstrument")
    parser.add_argument("--split", action="store_true", help="CPU time per request by part, every route")
    parser.add_argument("--replays", action="store_true", help="with --split: replays of one key per route")
    args = parser.parse_args()
    dbs = Databases()
    db = dbs.create(f"bench_profile_{uuid.uuid4().hex[:8]}")
    try:
        os.environ.update(bench_env(db, "profile"))
        from app import create_app, create_tables
        from app import db as sqla

        app = create_app()
        create_tables(app)
        client = app.test_client()

        cpu: dict[str, list[float]] = {path: [] for path in ROUTES}

        def run(path: str, n: int) -> float:
            t0, c0 = time.perf_counter(), time.process_time()
            for _ in range(n):
                headers = {"Content-Type": "application/json", "X-Tenant": "t1", "Idempotency-Key": uuid.uuid4().hex}
                response = client.post(path, data=BODY, headers=headers)
                assert response.status_code == 201, (response.status_code, response.data)
            cpu[path].append((time.process_time() - c0) / n * 1e6)
            return (time.perf_counter() - t0) / n * 1e6

        try:
            if args.split:
                split(app, client, args.requests, replays=args.replays)
            elif args.route is None:
                for path in ROUTES:
                    run(path, 200)  # warm-up
                times: dict[str, list[float]] = {path: [] for path in ROUTES}
                for path in ROUTES:
                    cpu[path].clear()
                for round_no in range(5):
                    for path in ROUTES if round_no % 2 == 0 else ROUTES[::-1]:
                        times[path].append(run(path, args.requests // 5))
                bare = statistics.median(times["/bare"])
                # Wall time includes the database's; CPU time is this process's Python (and driver) alone, which
                # the load on the machine disturbs far less.
                for path, us in times.items():
                    median, own = statistics.median(us), statistics.median(cpu[path])
                    floor = f"/floor-{path.lstrip('/')}"
                    vs_floor = f"   CPU x{own / statistics.median(cpu[floor]):.2f} of {floor}" if floor in cpu else ""
                    print(
                        f"{path:14} {median:7.0f} us per request   x{median / bare:.2f} of bare"
                        f"   CPU {own:5.0f} us{vs_floor}"
                    )
            else:
                profile(args.route, args.requests, args.cprofile, run)
        finally:
            with app.app_context():
                sqla.engine.dispose()
    finally:
        dbs.drop_all()
    return 0


def split(app: Any, client: Any, requests: int, *, replays: bool = False) -> None:
    """This process's CPU time per request, by part: the layer's hooks (before and after the view), and inside
    them the fingerprint, the claim and the outcome statements; the view body; and the floor's own claim and
    outcome. CPU time leaves out the waits on the database, so other load on the machine disturbs it little."""
    import functools

    import app as bench_app

    from flask_idempotent import pipeline, store

    spent: dict[str, float] = {}

    def timed(func: Any, part: str) -> Any:
        @functools.wraps(func)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            start = time.process_time()
            try:
                return func(*args, **kwargs)
            finally:
                spent[part] = spent.get(part, 0.0) + time.process_time() - start

        return wrapper

    for owner, name, part in [
        (store.RecordStore, "insert_claim", "claim statement"),
        (store.RecordStore, "settle", "outcome statement"),
        (store.RecordStore, "find", "read statement"),
        (pipeline, "request_fingerprint", "fingerprint"),
        (bench_app, "payment_body", "view body"),
        (bench_app, "_floor_claim", "claim statement"),
        (bench_app, "_floor_outcome", "outcome statement"),
    ]:
        setattr(owner, name, timed(getattr(owner, name), part))
    for hooks, part in [(app.before_request_funcs, "before the view"), (app.after_request_funcs, "after the view")]:
        for blueprint, funcs in hooks.items():
            hooks[blueprint] = [timed(func, part) for func in funcs]
    parts = ["before the view", "fingerprint", "claim statement", "view body", "after the view", "outcome statement"]
    routes = ROUTES
    if replays:  # the floor answers no replay: bare, leased and atomic only, each replaying one completed key
        parts = ["before the view", "fingerprint", "claim statement", "read statement", "view body"]
        routes = ["/bare", "/leased", "/atomic"]
    keys = {path: uuid.uuid4().hex for path in routes}
    results: dict[str, dict[str, list[float]]] = {path: {} for path in routes}
    for path in routes:  # warm-up
        for _ in range(200):
            client.post(path, data=BODY, headers=_headers(keys[path] if replays else None))
    for round_no in range(5):
        for path in routes if round_no % 2 == 0 else routes[::-1]:
            spent.clear()
            n = requests // 5
            start = time.process_time()
            for _ in range(n):
                response = client.post(path, data=BODY, headers=_headers(keys[path] if replays else None))
                assert response.status_code == 201
            results[path].setdefault("total", []).append((time.process_time() - start) / n * 1e6)
            for part in parts:
                results[path].setdefault(part, []).append(spent.get(part, 0.0) / n * 1e6)
    print("CPU us per request (this process: test client, Flask, the layer, SQLAlchemy, the driver), medians of 5")
    print("interleaved rounds. 'before/after the view' include the fingerprint, claim and outcome lines below them.")
    print(f"| route | total | {' | '.join(parts)} |")
    print("|---|" + "---:|" * (len(parts) + 1))
    for path, by_part in results.items():
        cells = " | ".join(f"{statistics.median(by_part[part]):.0f}" for part in parts)
        print(f"| {path} | {statistics.median(by_part['total']):.0f} | {cells} |")


def _headers(key: str | None = None) -> dict[str, str]:
    return {"Content-Type": "application/json", "X-Tenant": "t1", "Idempotency-Key": key or uuid.uuid4().hex}


def profile(path: str, n: int, use_cprofile: bool, run: Any) -> None:
    run(path, 200)  # warm-up: compiled-statement cache, pools
    if use_cprofile:
        import cProfile
        import pstats

        profiler = cProfile.Profile(time.process_time)  # CPU time: waits on the database are not counted
        profiler.enable()
        run(path, n)
        profiler.disable()
        # BENCH_PROFILE_SORT=cumulative BENCH_PROFILE_FILTER=flask_idempotent: the layer's own functions.
        stats = pstats.Stats(profiler).sort_stats(os.environ.get("BENCH_PROFILE_SORT", "tottime"))
        stats.print_stats(os.environ.get("BENCH_PROFILE_FILTER", ""), 40)
        return
    from pyinstrument import Profiler

    sampler = Profiler(interval=0.0002)
    sampler.start()
    run(path, n)
    sampler.stop()
    print(sampler.output_text(unicode=False, color=False))


if __name__ == "__main__":
    sys.exit(main())
