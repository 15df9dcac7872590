"""What the outbox costs a view, and how fast drainers drain (docs: The outbox, "What it costs").

Requests per second (Flask's test client, one thread, interleaved rounds: the variants alternate, so a busy
machine slows all alike) of one atomic view that inserts one row, in four variants:

- ``bare``: the view alone;
- ``apply_async``: the view calls ``task.apply_async`` itself (the pattern the outbox replaces);
- ``stage, hand-off``: the view stages one job, handed to the broker right after the commit (the default);
- ``stage, no hand-off``: the view stages one job for the drainer (``IDEMPOTENCY_OUTBOX_HANDOFF_SECONDS=0``).

Then drain throughput (jobs/s): ``--jobs`` jobs staged, drained by 1 and by 3 drainer processes at once
(``idempotency.drain()`` in each, delivering to the broker), from the first drainer's start to the last's end.

    .venv/bin/python bench/outbox.py --database-url postgresql+psycopg2://root@127.0.0.1:5432/bench \\
        --broker redis://127.0.0.1:6379/15 [--rounds 7] [--requests 300] [--jobs 3000]

The database is emptied of the bench's tables first and they are dropped at the end; the broker's keys carry a
prefix of their own, deleted at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import uuid
from typing import Any

from flask import Flask, jsonify
from flask_sqlalchemy import SQLAlchemy
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from flask_idempotent import Idempotency, idempotent

VARIANTS = ("bare", "apply_async", "stage, hand-off", "stage, no hand-off")


def build(database_url: str, broker: str, prefix: str, handoff: float = 2.0) -> tuple[Flask, Any, Any]:
    from celery import Celery

    class Base(DeclarativeBase):
        pass

    db = SQLAlchemy(model_class=Base)

    class Row(db.Model):  # type: ignore[name-defined,misc]
        __tablename__ = "bench_outbox_rows"
        id: Mapped[int] = mapped_column(primary_key=True)
        value: Mapped[int]

    app = Flask(__name__)
    app.config.update(SQLALCHEMY_DATABASE_URI=database_url, IDEMPOTENCY_OUTBOX_HANDOFF_SECONDS=handoff)
    db.init_app(app)
    idempotency = Idempotency()
    idempotency.init_app(app, db)
    celery = Celery("bench_outbox", broker=broker)
    celery.conf.update(
        task_default_queue="bench_outbox",
        broker_transport_options={"global_keyprefix": prefix},
    )

    @celery.task(name="bench_outbox.noop")
    def noop(value: int) -> None:
        return None

    def row() -> int:
        item = Row(value=1)
        db.session.add(item)
        db.session.flush()
        return item.id

    @app.post("/bare")
    @idempotent(atomic=True)
    def bare() -> Any:
        return jsonify(id=row()), 201

    @app.post("/apply_async")
    @idempotent(atomic=True)
    def direct() -> Any:
        ident = row()
        noop.apply_async(args=[ident])  # before the commit: the pattern that can send for a rollback
        return jsonify(id=ident), 201

    @app.post("/stage")
    @idempotent(atomic=True)
    def staged() -> Any:
        ident = row()
        idempotency.stage(noop, ident)
        return jsonify(id=ident), 201

    app.extensions["bench_outbox"] = {"db": db, "noop": noop, "celery": celery}
    return app, db, idempotency


def reset(app: Flask, db: SQLAlchemy, *, create: bool = True) -> None:
    with app.app_context():
        db.drop_all()
        if create:
            db.create_all()


def rate(app: Flask, path: str, requests: int) -> float:
    client = app.test_client()
    started = time.perf_counter()
    for _ in range(requests):
        response = client.post(path, headers={"Idempotency-Key": uuid.uuid4().hex})
        assert response.status_code == 201, response.data
    return requests / (time.perf_counter() - started)


def requests_bench(args: argparse.Namespace, prefix: str) -> dict[str, list[float]]:
    with_handoff, db, _ = build(args.database_url, args.broker, prefix)
    without, db2, _ = build(args.database_url, args.broker, prefix, handoff=0)
    reset(with_handoff, db)
    apps = {
        "bare": (with_handoff, "/bare"),
        "apply_async": (with_handoff, "/apply_async"),
        "stage, hand-off": (with_handoff, "/stage"),
        "stage, no hand-off": (without, "/stage"),
    }
    for app, path in apps.values():  # warm-up: connections, the broker's, first-use checks
        rate(app, path, 20)
    results: dict[str, list[float]] = {name: [] for name in VARIANTS}
    for round_ in range(args.rounds):
        order = VARIANTS if round_ % 2 == 0 else tuple(reversed(VARIANTS))
        for name in order:
            app, path = apps[name]
            results[name].append(rate(app, path, args.requests))
    with without.app_context():
        db2.engine.dispose()
    with with_handoff.app_context():
        db.engine.dispose()
    return results


def drain_bench(args: argparse.Namespace, prefix: str, drainers: int) -> float:
    app, db, idempotency = build(args.database_url, args.broker, prefix, handoff=0)
    reset(app, db)
    noop = app.extensions["bench_outbox"]["noop"]
    with app.app_context():
        for start in range(0, args.jobs, 500):
            for value in range(start, min(start + 500, args.jobs)):
                idempotency.stage(noop, value)
            db.session.commit()
        db.engine.dispose()
    env = {**os.environ, "BENCH_OUTBOX_URL": args.database_url, "BENCH_OUTBOX_BROKER": args.broker}
    env["BENCH_OUTBOX_PREFIX"] = prefix
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, "--drain-child"],
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(drainers)
    ]
    for proc in procs:  # a barrier: every drainer has started up and connected before any drains
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    outs = [json.loads(proc.communicate("go\n", timeout=600)[0]) for proc in procs]
    delivered = sum(out["delivered"] for out in outs)
    assert delivered == args.jobs, (delivered, args.jobs)
    # From the first drainer's first take to the last one's end: the processes' start-up is not draining.
    return args.jobs / (max(out["ended"] for out in outs) - min(out["started"] for out in outs))


def drain_child() -> None:
    app, _db, idempotency = build(
        os.environ["BENCH_OUTBOX_URL"], os.environ["BENCH_OUTBOX_BROKER"], os.environ["BENCH_OUTBOX_PREFIX"], 0
    )
    with app.app_context():
        app.extensions["bench_outbox"]["celery"].connection_for_write().ensure_connection()  # not timed
        print("ready", flush=True)
        assert sys.stdin.readline().strip() == "go"
        started = time.time()
        tally = idempotency.drain(limit=100)
        print(json.dumps({**tally, "started": started, "ended": time.time()}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--database-url")
    parser.add_argument("--broker", default="redis://127.0.0.1:6379/15")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--jobs", type=int, default=3000)
    parser.add_argument("--drain-rounds", type=int, default=3)
    parser.add_argument("--drain-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.drain_child:
        drain_child()
        return
    if not args.database_url:
        parser.error("--database-url is required")
    prefix = f"bench-outbox-{uuid.uuid4().hex[:8]}:"
    try:
        results = requests_bench(args, prefix)
        bare = statistics.median(results["bare"])
        print(f"requests/s, median of {args.rounds} interleaved rounds of {args.requests} (test client, 1 thread):")
        for name in VARIANTS:
            median = statistics.median(results[name])
            change = (median / bare - 1) * 100
            print(f"  {name:<20} {median:8.1f}  ({change:+.1f} % vs bare; max {max(results[name]):.1f})")
        drains: dict[int, list[float]] = {1: [], 3: []}
        for _ in range(args.drain_rounds):
            for count in (1, 3):
                drains[count].append(drain_bench(args, prefix, count))
        one, three = statistics.median(drains[1]), statistics.median(drains[3])
        print(f"drain, {args.jobs} jobs, median of {args.drain_rounds} rounds:")
        print(f"  1 drainer   {one:8.1f} jobs/s  {[round(x) for x in drains[1]]}")
        print(f"  3 drainers  {three:8.1f} jobs/s  {[round(x) for x in drains[3]]}  ({three / one:.2f}x)")
    finally:
        app, db, _ = build(args.database_url, args.broker, prefix)
        reset(app, db, create=False)
        import redis

        client = redis.Redis.from_url(args.broker)
        stale = list(client.scan_iter(match=f"{prefix}*", count=1000))
        if stale:
            client.delete(*stale)
        client.close()


if __name__ == "__main__":
    main()
