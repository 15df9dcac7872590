"""flask_idempotent benchmark: the layer's cost next to the bare route and next to a peer, and how it scales.

    .venv/bin/python bench/run.py --quick            # smoke run: 2 rounds of 2 s per cell, no scale/memory
    .venv/bin/python bench/run.py --all              # full run (~20 min on 2 cores): matrix + scale + memory
    .venv/bin/python bench/run.py --scale --memory --rounds 5 --duration 5

Starts gunicorn (sync workers) on throwaway PostgreSQL databases, drives it with wrk (bench/load.lua), and writes
bench/results/results.json, results.md and bench.png. Everything it starts it stops; the databases it creates it
drops; the peer's Redis keys (prefix ``bench:<run id>:``) it deletes.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import infra
import psutil
from infra import (
    BENCH_DIR,
    REPO,
    VENV_BIN,
    BackgroundWrk,
    Databases,
    Server,
    bench_env,
    log,
    pg_connect,
    redis_cleanup,
    request,
    run_wrk,
    vacuum,
)

RESULTS = BENCH_DIR / "results"
#: SQLAlchemy URL templates of the PostgreSQL drivers (``--drivers``); SQLAlchemy 2.1 maps postgresql:// to psycopg.
DRIVER_URLS = {
    "psycopg2": "postgresql+psycopg2://root@127.0.0.1:5432/{db}",
    "psycopg": "postgresql+psycopg://root@127.0.0.1:5432/{db}",
}
VARIANTS = {
    "bare": "/bare",
    "leased": "/leased",
    "atomic": "/atomic",
    "peer": "/peer",
}

# scenario -> (title, wrk mode, n, body, variants)
SCENARIOS: dict[str, dict[str, Any]] = {
    "fresh": {
        "title": "Fresh keys (every request a first request)",
        "mode": "fresh",
        "variants": {
            "bare": "/bare",
            "leased": "/leased",
            "floor-leased": "/floor-leased",
            "atomic": "/atomic",
            "floor-atomic": "/floor-atomic",
            "peer": "/peer",
        },
    },
    "replay": {
        "title": "Replays of one completed key",
        "mode": "fixed",
        "variants": {"bare": "/bare", "leased": "/leased", "atomic": "/atomic", "peer": "/peer"},
    },
    "duplicates": {
        "title": "Concurrent duplicates (16 in-flight requests per key)",
        "mode": "dup",
        "n": 16,
        "variants": {"bare": "/bare", "leased": "/leased", "atomic": "/atomic", "peer": "/peer"},
    },
    "reuse": {
        "title": "Key reuse with another command (500 keys, other amount)",
        "mode": "cycle",
        "n": 500,
        "body": "b",
        "variants": {"bare": "/bare", "leased": "/leased", "atomic": "/atomic", "peer": "/peer"},
    },
    "keyless": {
        "title": "Keyless requests on an optional route",
        "mode": "none",
        "variants": {"bare": "/bare", "leased": "/optional", "peer": "/peer"},
    },
}


def median(values: list[float]) -> float:
    return round(statistics.median(values), 3) if values else float("nan")


# Machine ----------------------------------------------------------------------------------------------------------


def _version(cmd: list[str], empty: str = "unknown") -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
        lines = (out.stdout or out.stderr).strip().splitlines()
        return lines[0] if lines else empty
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"


def machine_info() -> dict[str, Any]:
    from importlib.metadata import version

    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    conn = pg_connect("postgres")
    with conn.cursor() as cur:
        cur.execute("SELECT version()")
        pg_version = cur.fetchone()[0].split(" on ")[0]
        settings = {}
        for name in ("shared_buffers", "synchronous_commit", "fsync", "work_mem", "max_connections"):
            cur.execute(f"SHOW {name}")
            settings[name] = cur.fetchone()[0]
    conn.close()
    import redis

    redis_version = redis.Redis.from_url(os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")).info()[
        "redis_version"
    ]
    commit = _version(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"])
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "os": platform.platform(),
        "python": platform.python_version(),
        "postgresql": pg_version,
        "postgresql_settings": settings,
        "redis": redis_version,
        "wrk": _version(["wrk", "-v"]),
        "gunicorn": version("gunicorn"),
        "flask": version("flask"),
        "sqlalchemy": version("sqlalchemy"),
        "psycopg2": version("psycopg2-binary"),
        "aws_lambda_powertools": version("aws-lambda-powertools"),
        "flask_idempotent_commit": commit,
        "flask_idempotent_uncommitted_changes": _version(
            ["git", "-C", str(REPO), "diff", "--shortstat", "HEAD", "--", "flask_idempotent"], empty="none"
        ),
        "loadavg_at_start": os.getloadavg(),
    }


# Main matrix ------------------------------------------------------------------------------------------------------


def effects_of(db: str, route: str, prefix: str) -> dict[str, int]:
    conn = pg_connect(db)
    try:
        with conn.cursor() as cur:
            cur.execute(
                "SELECT count(*), count(DISTINCT idem_key) FROM bench_payments WHERE route = %s AND idem_key LIKE %s",
                (route, prefix.replace("_", r"\_") + "%"),
            )
            effects, keys = cur.fetchone()
            cur.execute(
                "SELECT count(*) FROM (SELECT idem_key FROM bench_payments WHERE route = %s AND idem_key LIKE %s"
                " GROUP BY idem_key HAVING count(*) > 1) d",
                (route, prefix.replace("_", r"\_") + "%"),
            )
            dup_keys = cur.fetchone()[0]
        return {"effects": int(effects), "keys_with_effects": int(keys), "keys_with_duplicate_effects": int(dup_keys)}
    finally:
        conn.close()


def _route_name(path: str) -> str:
    return path.lstrip("/")


def prepare(server: Server, run_id: str) -> None:
    """Keys the replay and reuse scenarios need: completed once with body "a"."""
    body_a = {"amount": 1250, "currency": "EUR", "creditor": "ACME GmbH", "reference": "invoice 2024-0042"}
    jobs = []
    for variant, path in SCENARIOS["replay"]["variants"].items():
        jobs.append((path, f"{run_id}-replay-{variant}"))
    n = SCENARIOS["reuse"]["n"]
    for variant, path in SCENARIOS["reuse"]["variants"].items():
        if variant != "bare":
            jobs += [(path, f"{run_id}-reuse-{variant}-{i}") for i in range(n)]

    def send(job: tuple[str, str]) -> int:
        return request(server.port, "POST", job[0], body_a, {"Idempotency-Key": job[1]})[0]

    with ThreadPoolExecutor(8) as pool:
        statuses = list(pool.map(send, jobs))
    bad = [s for s in statuses if s != 201]
    if bad:
        raise RuntimeError(f"preparing keys: {len(bad)} answers were not 201: {sorted(set(bad))}")


def cell_prefix(run_id: str, scenario: str, variant: str, round_no: int) -> str:
    if scenario == "replay":
        return f"{run_id}-replay-{variant}"
    if scenario == "reuse":
        return f"{run_id}-reuse-{variant}"
    return f"{run_id}-{scenario}-{variant}-r{round_no}"


def run_cell(server: Server, run_id: str, scenario: str, variant: str, round_no: int, duration: float) -> dict:
    spec = SCENARIOS[scenario]
    path = spec["variants"][variant]
    prefix = cell_prefix(run_id, scenario, variant, round_no)
    result = run_wrk(
        server.port, path, spec["mode"], prefix, n=spec.get("n", 1), body=spec.get("body", "a"), duration=duration
    ).as_dict()
    result["round"] = round_no
    if scenario in ("fresh", "duplicates"):
        result["db"] = effects_of(server.db, _route_name(path), prefix + "-")
    return result


def summarize(cells: dict[str, dict[str, list[dict]]]) -> dict[str, Any]:
    """Medians per cell; ratio to bare as the median of per-round paired ratios (robust to drifting load)."""
    out: dict[str, Any] = {}
    for scenario, variants in cells.items():
        bare_runs = {r["round"]: r for r in variants.get("bare", [])}
        out[scenario] = {}
        for variant, runs in variants.items():
            rps = [r["rps"] for r in runs]
            p50 = [r["p50_ms"] for r in runs]
            p99 = [r["p99_ms"] for r in runs]
            paired = [(r, bare_runs[r["round"]]) for r in runs if r["round"] in bare_runs]
            statuses: dict[str, int] = {}
            for r in runs:
                for code, count in r["statuses"].items():
                    statuses[code] = statuses.get(code, 0) + count
            entry = {
                "rounds": len(runs),
                "rps": median(rps),
                "p50_ms": median(p50),
                "p99_ms": median(p99),
                "rps_ratio": median([a["rps"] / b["rps"] for a, b in paired if b["rps"]]),
                "p50_ratio": median([a["p50_ms"] / b["p50_ms"] for a, b in paired if b["p50_ms"]]),
                "p99_ratio": median([a["p99_ms"] / b["p99_ms"] for a, b in paired if b["p99_ms"]]),
                "p99_added_ms": median([a["p99_ms"] - b["p99_ms"] for a, b in paired]),
                "p50_added_ms": median([a["p50_ms"] - b["p50_ms"] for a, b in paired]),
                "statuses": statuses,
                "load1": median([r["load1"] for r in runs]),
            }
            floor_runs = {r["round"]: r for r in variants.get(f"floor-{variant}", [])}
            if floor_runs:  # the layer against its protocol written as raw SQL in the same app (bench/app.py)
                entry["floor_ratio"] = median(
                    [r["rps"] / floor_runs[r["round"]]["rps"] for r in runs if r["round"] in floor_runs]
                )
            dbs = [r["db"] for r in runs if "db" in r]
            if dbs:
                entry["effects"] = sum(d["effects"] for d in dbs)
                entry["keys_with_effects"] = sum(d["keys_with_effects"] for d in dbs)
                entry["keys_with_duplicate_effects"] = sum(d["keys_with_duplicate_effects"] for d in dbs)
            out[scenario][variant] = entry
    return out


def main_matrix(server: Server, run_id: str, rounds: int, duration: float, only: list[str] | None) -> dict[str, Any]:
    scenarios = [s for s in SCENARIOS if not only or s in only]
    prepare(server, run_id)
    log("warm-up: 1 s per cell")
    for scenario in scenarios:
        for variant in SCENARIOS[scenario]["variants"]:
            run_cell(server, run_id, scenario, variant, -1, 1)
    cells: dict[str, dict[str, list[dict]]] = {s: {v: [] for v in SCENARIOS[s]["variants"]} for s in scenarios}
    for round_no in range(rounds):
        for scenario in scenarios:
            order = list(SCENARIOS[scenario]["variants"])
            if round_no % 2:
                order.reverse()  # A B C D, then D C B A: no variant always runs first or last
            for variant in order:
                result = run_cell(server, run_id, scenario, variant, round_no, duration)
                cells[scenario][variant].append(result)
                log(
                    f"round {round_no + 1}/{rounds} {scenario:<10} {variant:<7} {result['rps']:8.1f} req/s"
                    f"  p50 {result['p50_ms']:6.2f} ms  p99 {result['p99_ms']:6.2f} ms  load {result['load1']:.2f}"
                    f"  {result['statuses']}"
                )
        vacuum(server.db)  # between rounds, outside the timed cells: what autovacuum would do (it is off here)
    return {"titles": {s: SCENARIOS[s]["title"] for s in scenarios}, "runs": cells, "summary": summarize(cells)}


# Scale ------------------------------------------------------------------------------------------------------------


def scale_phase(
    dbs: Databases, run_id: str, records: int, rounds: int, duration: float, workers: int, connections: int
) -> dict[str, Any]:
    import scale
    from app import create_app, create_tables

    out: dict[str, Any] = {"records": records}
    empty_db = dbs.create(f"bench_idem_empty_{run_id}")
    big_db = dbs.create(f"bench_idem_1m_{run_id}")
    for name in (empty_db, big_db):
        os.environ.update(bench_env(name, run_id))
        create_tables(create_app())
    out["seed"] = scale.seed(big_db, records, expired=False)

    empty = Server(empty_db, run_id, workers=workers).start()
    big = Server(big_db, run_id, workers=workers).start()
    try:
        runs: dict[str, dict[str, list[dict]]] = {"leased": {"empty": [], "1m": []}, "atomic": {"empty": [], "1m": []}}
        for server in (empty, big):  # warm-up
            for path in ("/leased", "/atomic"):
                run_wrk(server.port, path, "fresh", f"{run_id}-scale-warm{path.strip('/')}", duration=1)
        for round_no in range(rounds):
            order = [("empty", empty), ("1m", big)]
            if round_no % 2:
                order.reverse()
            for variant in ("leased", "atomic"):
                for label, server in order:
                    r = run_wrk(
                        server.port,
                        f"/{variant}",
                        "fresh",
                        f"{run_id}-scale-{variant}-{label}-r{round_no}",
                        duration=duration,
                        connections=connections,
                    ).as_dict()
                    r["round"] = round_no
                    runs[variant][label].append(r)
                    log(
                        f"scale round {round_no + 1}/{rounds} {variant:<7} {label:<5} {r['rps']:8.1f} req/s"
                        f"  p99 {r['p99_ms']:6.2f} ms"
                    )
        out["throughput"] = {
            variant: {
                label: {
                    "rps": median([r["rps"] for r in rs]),
                    "p50_ms": median([r["p50_ms"] for r in rs]),
                    "p99_ms": median([r["p99_ms"] for r in rs]),
                }
                for label, rs in by_label.items()
            }
            | {
                "ratio_1m_to_empty": median(
                    [b["rps"] / a["rps"] for a, b in zip(by_label["empty"], by_label["1m"], strict=True) if a["rps"]]
                )
            }
            for variant, by_label in runs.items()
        }
        out["throughput_runs"] = runs
        empty.stop()

        log("timing every dashboard/CLI/store query on the 1M-record table (EXPLAIN ANALYZE)")
        out["queries"] = scale.measure_queries(big_db, run_id)
        log("adding a conflict event per record and timing the queries that read events")
        out["event_queries"] = scale.measure_event_queries(big_db, run_id)

        log(f"purge: re-seeding {records:,} expired records")
        out["purge_seed"] = scale.seed(big_db, records, expired=True)
        out["purge"] = purge_phase(big, run_id, duration, connections, records)
    finally:
        empty.stop()
        big.stop()
    return out


def purge_phase(
    server: Server, run_id: str, duration: float, connections: int, records: int = 1_000_000
) -> dict[str, Any]:
    """``flask idempotency purge`` of ``records`` expired records (seeded by the caller) under load: with its
    default pause between batches, then back to back (``--pause 0``) after seeding them again."""
    import scale

    def baseline(tag: str) -> dict[str, Any]:
        return run_wrk(
            server.port, "/leased", "fresh", f"{run_id}-purge-{tag}", duration=duration, connections=connections
        ).as_dict()

    def purge_under_load(tag: str, *args: str) -> dict[str, Any]:
        load = BackgroundWrk(server.port, "/leased", "fresh", f"{run_id}-purge-{tag}", connections=connections)
        time.sleep(1)
        cmd = [str(VENV_BIN / "flask"), "--app", "app:create_app", "idempotency", "purge", "--batch-size", "1000"]
        cmd += [*args, "--json"]
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(
                cmd, cwd=BENCH_DIR, env=bench_env(server.db, run_id), capture_output=True, text=True, timeout=1800
            )
        finally:
            took = time.perf_counter() - t0
            during = load.stop().as_dict()
            load.kill()
        if proc.returncode != 0:
            raise RuntimeError(f"purge failed: {proc.stderr}")
        deleted = json.loads(proc.stdout)["deleted"]
        log(f"purge {tag}: {deleted:,} in {took:.1f}s; during: {during['rps']:.1f} req/s p99 {during['p99_ms']:.2f} ms")
        return {
            "command": "flask " + " ".join(cmd[3:]),
            "deleted": deleted,
            "seconds": round(took, 2),
            "rows_per_second": round(deleted / took) if took else None,
            "during": during,
        }

    run_wrk(server.port, "/leased", "fresh", f"{run_id}-purge-warm", duration=1)
    before = baseline("before")
    log(f"purge baseline before: {before['rps']:.1f} req/s p99 {before['p99_ms']:.2f} ms")
    default = purge_under_load("default")
    after = baseline("after")
    log(f"purge baseline after: {after['rps']:.1f} req/s p99 {after['p99_ms']:.2f} ms")
    log(f"purge: re-seeding {records:,} expired records")
    scale.seed(server.db, records, expired=True)
    back_to_back = purge_under_load("back-to-back", "--pause", "0")
    return purge_ratios(
        {"batch_size": 1000, "before": before, "after": after, "default": default, "back_to_back": back_to_back}
    )


def purge_ratios(purge: dict[str, Any]) -> dict[str, Any]:
    """p99 during each purge over the normal p99: the same load on the same table just before the purge.

    The run after the purge is reported, not used: it runs on a freshly emptied table (autovacuum likely at
    work), and one slow run there (100 ms against 40 ms before) made any purge look harmless.
    """
    normal = purge["before"]["p99_ms"]
    purge["normal_p99_ms"] = normal
    for run in (purge["default"], purge["back_to_back"]):
        run["p99_ratio_during_to_normal"] = round(run["during"]["p99_ms"] / normal, 3) if normal else None
    return purge


# Memory -----------------------------------------------------------------------------------------------------------


def memory_phase(dbs: Databases, run_id: str, total: int, workers: int, connections: int) -> dict[str, Any]:
    from app import create_app, create_tables

    db = dbs.create(f"bench_idem_mem_{run_id}")
    os.environ.update(bench_env(db, run_id))
    create_tables(create_app())
    server = Server(db, run_id, workers=workers).start()
    samples: list[dict[str, Any]] = []

    def sample(done: int) -> None:
        for pid in server.worker_pids():
            try:
                info = psutil.Process(pid).memory_full_info()
            except psutil.NoSuchProcess:
                continue
            samples.append({"requests": done, "pid": pid, "rss_mb": info.rss / 2**20, "uss_mb": info.uss / 2**20})

    try:
        request(server.port, "POST", "/leased", {"amount": 1}, {"Idempotency-Key": f"{run_id}-mem-replay"})
        warm = run_wrk(server.port, "/leased", "mix", f"{run_id}-mem-w", duration=5, connections=connections)
        pids = server.worker_pids()
        sample(0)
        done = 0
        chunk = 0
        while done < total:
            r = run_wrk(server.port, "/leased", "mix", f"{run_id}-mem-{chunk}", duration=10, connections=connections)
            done += r.requests
            chunk += 1
            sample(done)
            log(f"memory: {done:,} requests, rss {[round(s['rss_mb'], 1) for s in samples[-len(pids) :]]} MB")
        if server.worker_pids() != pids:
            log("memory: a worker was replaced during the run; growth is per surviving pid")
    finally:
        server.stop()
    per_worker = {}
    for pid in pids:
        mine = [s for s in samples if s["pid"] == pid]
        if len(mine) >= 2:
            per_worker[str(pid)] = {
                "rss_start_mb": round(mine[0]["rss_mb"], 2),
                "rss_end_mb": round(mine[-1]["rss_mb"], 2),
                "rss_growth_mb": round(mine[-1]["rss_mb"] - mine[0]["rss_mb"], 2),
                "uss_growth_mb": round(mine[-1]["uss_mb"] - mine[0]["uss_mb"], 2),
                "rss_max_mb": round(max(s["rss_mb"] for s in mine), 2),
            }
    return {
        "mix": "fresh /leased, fresh /atomic, replay /leased, keyless /optional in turn",
        "warmup_requests": warm.requests,
        "requests": done,
        "per_worker": per_worker,
        "max_rss_growth_mb": max((w["rss_growth_mb"] for w in per_worker.values()), default=None),
        "samples": [{**s, "rss_mb": round(s["rss_mb"], 2), "uss_mb": round(s["uss_mb"], 2)} for s in samples],
    }


# Targets ----------------------------------------------------------------------------------------------------------


def targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    s = results.get("main", {}).get("summary", {})

    def add(name: str, value: Any, goal: str, met: bool | None) -> None:
        out.append({"target": name, "goal": goal, "value": value, "met": met})

    if "fresh" in s:
        add(
            "leased first request throughput",
            s["fresh"]["leased"]["rps_ratio"],
            ">= 0.90 x bare",
            s["fresh"]["leased"]["rps_ratio"] >= 0.90,
        )
        add(
            "atomic first request throughput",
            s["fresh"]["atomic"]["rps_ratio"],
            ">= 0.95 x bare",
            s["fresh"]["atomic"]["rps_ratio"] >= 0.95,
        )
        for v in ("leased", "atomic"):
            if "floor_ratio" in s["fresh"][v]:
                ratio = s["fresh"][v]["floor_ratio"]
                add(f"{v} first request throughput vs its floor", ratio, ">= 0.95 x floor", ratio >= 0.95)
        for v in ("leased", "atomic"):
            add(
                f"p99 added by the layer ({v}, fresh keys), ms",
                s["fresh"][v]["p99_added_ms"],
                "<= 2 ms",
                s["fresh"][v]["p99_added_ms"] <= 2,
            )
    for name, matrix in results.items():
        if not name.startswith("main-") or "fresh" not in matrix.get("summary", {}):
            continue
        driver = name.removeprefix("main-")
        other = matrix["summary"]
        for v in ("leased", "atomic"):
            if "floor_ratio" in other["fresh"][v]:
                ratio = other["fresh"][v]["floor_ratio"]
                add(f"{v} first request throughput vs its floor ({driver})", ratio, ">= 0.95 x floor", ratio >= 0.95)
        for v in ("leased", "atomic"):
            if v in other.get("replay", {}):
                ratio = other["replay"][v]["rps_ratio"]
                add(f"{v} replay throughput ({driver})", ratio, ">= 1.2 x bare", ratio >= 1.2)
    if "replay" in s:
        for v in ("leased", "atomic"):
            add(
                f"{v} replay throughput",
                s["replay"][v]["rps_ratio"],
                ">= 1.2 x bare",
                s["replay"][v]["rps_ratio"] >= 1.2,
            )
            add(
                f"p99 added by the layer ({v}, replays), ms",
                s["replay"][v]["p99_added_ms"],
                "<= 2 ms",
                s["replay"][v]["p99_added_ms"] <= 2,
            )
    sc = results.get("scale")
    if sc:
        for v in ("leased", "atomic"):
            ratio = sc["throughput"][v]["ratio_1m_to_empty"]
            add(f"{v} first request throughput, 1M records vs empty", ratio, ">= 0.90", ratio >= 0.90)
        queries = [q for q in sc["queries"]["queries"] if "wall_ms_median" in q]
        dash = [q for q in queries if q["name"].startswith("operations.") and "purge" not in q["name"]]
        worst = max(dash, key=lambda q: q["wall_ms_median"]) if dash else None
        if worst:
            add(
                f"slowest dashboard/CLI query ({worst['name']}), ms",
                worst["wall_ms_median"],
                "< 50 ms",
                worst["wall_ms_median"] < 50,
            )
        slow = [q["name"] for q in dash if q["wall_ms_median"] >= 50]
        add("dashboard/CLI queries at or over 50 ms", slow, "none", not slow)
        heavy = [q for q in sc.get("event_queries", {}).get("queries", []) if "wall_ms_median" in q]
        if heavy:
            worst = max(heavy, key=lambda q: q["wall_ms_median"])
            added = sc["event_queries"]["events_added"]
            add(
                f"slowest query reading events, with {added:,} conflict events ({worst['name']}), ms",
                worst["wall_ms_median"],
                "< 50 ms",
                worst["wall_ms_median"] < 50,
            )
        p = sc["purge"]
        add(
            "p99 of first requests during the purge (default pause) vs normal",
            p["default"]["p99_ratio_during_to_normal"],
            "< 2 x",
            p["default"]["p99_ratio_during_to_normal"] < 2,
        )
        add(
            "same, purge back to back (`--pause 0`; for comparison)",
            p["back_to_back"]["p99_ratio_during_to_normal"],
            "< 2 x",
            p["back_to_back"]["p99_ratio_during_to_normal"] < 2,
        )
    mem = results.get("memory")
    if mem and mem.get("max_rss_growth_mb") is not None:
        add(
            f"worker RSS growth over {mem['requests']:,} requests, MB",
            mem["max_rss_growth_mb"],
            "<= 10 MB",
            mem["max_rss_growth_mb"] <= 10,
        )
    return out


# Entry point ------------------------------------------------------------------------------------------------------


def render(out: Path) -> int:
    import report

    results = json.loads((out / "results.json").read_text())
    if "scale" in results:
        purge_ratios(results["scale"]["purge"])
    results["targets"] = targets(results)
    results["rendered"] = datetime.now(timezone.utc).isoformat()
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str))
    (out / "results.md").write_text(report.markdown(results))
    report.chart(results, out / "bench.png")
    log(f"rewrote {out / 'results.md'} and bench.png from results.json")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke run: 2 rounds of 2 s, small scale/memory sizes")
    parser.add_argument("--scale", action="store_true", help="1M-record table: throughput, queries, purge")
    parser.add_argument("--memory", action="store_true", help="worker RSS over --memory-requests requests")
    parser.add_argument("--all", action="store_true", help="--scale and --memory")
    parser.add_argument("--no-matrix", action="store_true", help="skip the scenario matrix")
    parser.add_argument("--no-checks", action="store_true", help="skip the correctness checks")
    parser.add_argument("--scenarios", nargs="*", choices=list(SCENARIOS), help="only these scenarios")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 5; quick 2)")
    parser.add_argument("--duration", type=float, default=None, help="seconds per cell (default 5; quick 2)")
    parser.add_argument(
        "--drivers",
        default="psycopg2",
        help="PostgreSQL drivers, comma-separated (psycopg2, psycopg): the matrix runs on each, the first is 'main'",
    )
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--records", type=int, default=None, help="scale table size (default 1,000,000)")
    parser.add_argument("--memory-requests", type=int, default=None, help="default 100,000")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument(
        "--render", action="store_true", help="measure nothing: recompute derived values, rewrite md/png"
    )
    args = parser.parse_args()
    if args.render:
        return render(args.out)
    if args.all:
        args.scale = args.memory = True
    rounds = args.rounds or (2 if args.quick else 5)
    duration = args.duration or (2 if args.quick else 5)
    records = args.records or (50_000 if args.quick else 1_000_000)
    mem_requests = args.memory_requests or (5_000 if args.quick else 100_000)
    if args.connections != 16:
        for spec in SCENARIOS.values():
            if spec["mode"] == "dup":
                spec["n"] = args.connections

    drivers = [d.strip() for d in args.drivers.split(",") if d.strip()]
    if unknown := set(drivers) - set(DRIVER_URLS):
        parser.error(f"--drivers: unknown {sorted(unknown)}; known: {', '.join(DRIVER_URLS)}")
    infra.PG_URL_TEMPLATE = DRIVER_URLS[drivers[0]]
    run_id = uuid.uuid4().hex[:8]
    args.out.mkdir(parents=True, exist_ok=True)
    dbs = Databases()
    servers: list[Server] = []
    loads: list[tuple[float, tuple[float, float, float]]] = []
    stop_sampling = threading.Event()

    def sample_load() -> None:
        while not stop_sampling.wait(10):
            loads.append((time.time(), os.getloadavg()))

    threading.Thread(target=sample_load, daemon=True).start()
    started = datetime.now(timezone.utc)
    results: dict[str, Any] = {
        "run_id": run_id,
        "started": started.isoformat(),
        "config": {
            "quick": args.quick,
            "rounds": rounds,
            "seconds_per_cell": duration,
            "workers": args.workers,
            "worker_class": "sync",
            "connections": args.connections,
            "drivers": drivers,
            "wrk_threads": 1,
            "load_generator": "wrk (Debian package) with bench/load.lua",
        },
        "machine": machine_info(),
    }
    log(f"run {run_id}: rounds={rounds} duration={duration}s workers={args.workers} connections={args.connections}")
    import report

    def write(final: bool = False) -> None:
        finished = datetime.now(timezone.utc)
        results["finished" if final else "written"] = finished.isoformat()
        results["wall_seconds"] = round((finished - started).total_seconds(), 1)
        results["machine"]["loadavg_samples"] = [{"t": round(t, 1), "load": list(v)} for t, v in loads]
        results["machine"]["loadavg_at_end"] = os.getloadavg()
        results["targets"] = targets(results)
        (args.out / "results.json").write_text(json.dumps(results, indent=2, default=str))
        (args.out / "results.md").write_text(report.markdown(results))
        report.chart(results, args.out / "bench.png")

    def phase(name: str, fn: Any) -> None:
        try:
            results[name] = fn()
        except KeyboardInterrupt:
            raise
        except Exception as exc:  # keep what the other phases measured
            log(f"phase {name} failed: {type(exc).__name__}: {exc}")
            results.setdefault("errors", {})[name] = f"{type(exc).__name__}: {exc}"
        finally:
            for server in servers:
                server.stop()
        write()

    try:
        from app import create_app, create_tables

        main_db = dbs.create(f"bench_idem_{run_id}")
        os.environ.update(bench_env(main_db, run_id))
        create_tables(create_app())
        if not args.no_checks:

            def checks() -> dict[str, Any]:
                # Real concurrency for the duplicate checks: more workers than the 16 threads' first wave needs.
                checker = Server(main_db, run_id, workers=8)
                servers.append(checker)
                checker.start()
                import correctness

                log("correctness checks (effects counted in the database)")
                return correctness.run_checks(checker.port, main_db, run_id)

            phase("correctness", checks)
        if not args.no_matrix:

            def matrix() -> dict[str, Any]:
                server = Server(main_db, run_id, workers=args.workers)
                servers.append(server)
                server.start()
                return main_matrix(server, run_id, rounds, duration, args.scenarios)

            phase("main", matrix)
        for driver in drivers[1:] if not args.no_matrix else []:

            def matrix_on(driver: str = driver) -> dict[str, Any]:
                infra.PG_URL_TEMPLATE = DRIVER_URLS[driver]
                try:
                    server = Server(main_db, run_id, workers=args.workers)
                    servers.append(server)
                    server.start()
                    log(f"matrix on {driver}")
                    return main_matrix(server, f"{run_id}-{driver}", rounds, duration, args.scenarios)
                finally:
                    infra.PG_URL_TEMPLATE = DRIVER_URLS[drivers[0]]

            phase(f"main-{driver}", matrix_on)
        if not args.no_matrix:

            def floor() -> dict[str, Any]:
                import floor as floor_module

                log("floor: the layer's statements alone, raw psycopg2, one request at a time")
                return floor_module.measure(main_db, run_id, rounds=rounds)

            phase("floor", floor)
        if args.scale:
            phase(
                "scale",
                lambda: scale_phase(dbs, run_id, records, max(3, rounds - 2), duration, args.workers, args.connections),
            )
        if args.memory:
            phase("memory", lambda: memory_phase(dbs, run_id, mem_requests, args.workers, args.connections))
    except KeyboardInterrupt:
        log("interrupted: cleaning up")
        results["interrupted"] = True
    finally:
        stop_sampling.set()
        for server in servers:
            server.stop()
        dbs.drop_all()
        results["redis_keys_deleted"] = redis_cleanup(run_id)
    write(final=True)
    log(f"wrote {args.out / 'results.json'}, results.md, bench.png in {results['wall_seconds']}s")
    for t in results["targets"]:
        mark = "MET " if t["met"] else "MISS"
        log(f"{mark} {t['target']}: {t['value']} (goal {t['goal']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
