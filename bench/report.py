"""Markdown tables and the PNG chart from a results dict (see run.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

LABELS = {
    "bare": "bare",
    "leased": "leased",
    "atomic": "atomic",
    "peer": "Powertools (Redis)",
    "peer_validated": "Powertools + payload validation",
}


def _f(value: Any, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def machine_line(results: dict[str, Any]) -> str:
    m = results["machine"]
    c = results["config"]
    loads = [s["load"][0] for s in m.get("loadavg_samples", [])]
    load = f"{min(loads):.2f}-{max(loads):.2f}" if loads else _f(m["loadavg_at_start"][0])
    return (
        f"{m['cores']} x {m['cpu']}, {m['memory_gb']} GB RAM, {m['os']}; Python {m['python']}; {m['postgresql']} "
        f"(loopback, synchronous_commit={m['postgresql_settings']['synchronous_commit']}, "
        f"shared_buffers={m['postgresql_settings']['shared_buffers']}); Redis {m['redis']}; {m['wrk']}; "
        f"gunicorn {m['gunicorn']} ({c['workers']} {c['worker_class']} workers), {c['connections']} connections, "
        f"1 wrk thread; {c['rounds']} interleaved rounds x {c['seconds_per_cell']:g} s per cell, VACUUM ANALYZE "
        "between rounds (autovacuum is off on this server); "
        f"1-min load average during the run {load} (wrk, gunicorn and PostgreSQL share the 2 cores); "
        f"flask_idempotent at {m['flask_idempotent_commit']}."
    )


def main_table(results: dict[str, Any]) -> str:
    s = results["main"]["summary"]
    lines = [
        "| Scenario | Variant | req/s | x bare | x floor | p50 ms | p99 ms | p99 added ms | Responses |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for scenario, variants in s.items():
        for variant, e in variants.items():
            label = LABELS.get(variant, variant)
            if scenario == "keyless" and variant == "leased":
                label = "`@idempotent(required=False)`"
            statuses = ", ".join(f"{k}: {v}" for k, v in sorted(e["statuses"].items()))
            extra = ""
            if e.get("keys_with_duplicate_effects"):
                extra = f"; **{e['keys_with_duplicate_effects']} keys charged more than once**"
            lines.append(
                f"| {results['main']['titles'][scenario]} | {label} | {e['rps']:.0f} | {_f(e['rps_ratio'])} | "
                f"{_f(e['floor_ratio']) if 'floor_ratio' in e else ''} | "
                f"{_f(e['p50_ms'])} | {_f(e['p99_ms'])} | {_f(e['p99_added_ms'])} | {statuses}{extra} |"
            )
    return "\n".join(lines)


def drivers_table(results: dict[str, Any]) -> str:
    """The matrix on each PostgreSQL driver, side by side (``--drivers``): req/s, x bare, x floor."""
    drivers = results["config"].get("drivers", ["psycopg2"])
    summaries = [results["main"]["summary"], *(results[f"main-{d}"]["summary"] for d in drivers[1:])]
    head = " | ".join(f"{d} req/s | {d} x bare | {d} x floor" for d in drivers)
    lines = [f"| Scenario | Variant | {head} |", "|---|---|" + "---:|---:|---:|" * len(drivers)]
    for scenario, variants in summaries[0].items():
        for variant in variants:
            cells = []
            for s in summaries:
                e = s.get(scenario, {}).get(variant)
                if e is None:
                    cells.append("- | - | -")
                else:
                    floor = _f(e["floor_ratio"]) if "floor_ratio" in e else ""
                    cells.append(f"{e['rps']:.0f} | {_f(e['rps_ratio'])} | {floor}")
            title = results["main"]["titles"][scenario]
            lines.append(f"| {title} | {LABELS.get(variant, variant)} | {' | '.join(cells)} |")
    return "\n".join(lines)


def correctness_table(results: dict[str, Any]) -> str:
    c = results["correctness"]
    variants = list(c["results"])
    lines = [
        "| Check | " + " | ".join(LABELS.get(v, v) for v in variants) + " |",
        "|---|" + "---|" * len(variants),
    ]
    for check, title in c["checks"].items():
        cells = []
        for v in variants:
            r = c["results"][v][check]
            mark = "ok" if r["ok"] else "**WRONG**"
            if v == "bare" and not r["ok"]:
                mark = "unprotected"
            cells.append(f"{mark}: {r['what']}")
        lines.append(f"| {title} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def query_table(title: str, queries: list[dict[str, Any]]) -> list[str]:
    out = [
        f"| {title} | Used by | wall ms (median of 5) | statements | slowest statement (EXPLAIN ANALYZE) ms | plan |",
        "|---|---|---:|---:|---:|---|",
    ]
    for q in queries:
        if "error" in q:
            out.append(f"| {q['name']} | {q['used_by']} | error: {q['error']} | | | |")
            continue
        nodes = "; ".join(", ".join(dict.fromkeys(p.get("nodes", [])))[:120] for p in q["plans"] if p.get("nodes"))
        flag = " **Seq Scan**" if q["seq_scan"] else ""
        out.append(
            f"| {q['name']} | {q['used_by']} | {_f(q['wall_ms_median'])} | {q['statements']} | "
            f"{_f(q['slowest_statement_ms'], 3)} | {nodes}{flag} |"
        )
    return out


def scale_tables(results: dict[str, Any]) -> str:
    sc = results["scale"]
    out = [
        f"Table seeded with {sc['records']:,} records ({sc['seed']['events']:,} events) by `INSERT ... SELECT "
        f"generate_series` in {sc['seed']['insert_seconds']} s.",
        "",
        "| First request (fresh keys) | empty table req/s | 1M records req/s | ratio | p99 empty ms | p99 1M ms |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for v, t in sc["throughput"].items():
        out.append(
            f"| {v} | {t['empty']['rps']:.0f} | {t['1m']['rps']:.0f} | {_f(t['ratio_1m_to_empty'])} | "
            f"{_f(t['empty']['p99_ms'])} | {_f(t['1m']['p99_ms'])} |"
        )
    out += ["", *query_table("Query (1M records)", sc["queries"]["queries"])]
    heavy = sc.get("event_queries")
    if heavy:
        out += [
            "",
            f"Then {heavy['events_added']:,} conflict events were added (one per record, {heavy['events_total']:,} "
            "events in all: a day of hostile clients), and the queries that read events timed again:",
            "",
            *query_table(
                f"Query ({sc['records']:,} records, {heavy['events_added']:,} conflict events)", heavy["queries"]
            ),
        ]
    if sc["queries"].get("not_measured"):
        out.append(f"\nNot measured (new in operations.py): {', '.join(sc['queries']['not_measured'])}")
    p = sc["purge"]
    out.append(
        f"\nFirst requests on the same table, no purge: p99 {p['before']['p99_ms']:.2f} ms before the purges, "
        f"{p['after']['p99_ms']:.2f} ms right after the first one (one slow run, likely autovacuum on the emptied "
        "table; not used as the reference)."
    )
    for run in (p["default"], p["back_to_back"]):
        out.append(
            f"\nPurge: `{run['command']}` deleted {run['deleted']:,} expired records in {run['seconds']} s "
            f"({run['rows_per_second']:,} rows/s). First requests (fresh keys, leased) meanwhile: "
            f"{run['during']['rps']:.0f} req/s, p99 {run['during']['p99_ms']:.2f} ms vs {p['normal_p99_ms']:.2f} ms "
            f"just before the purge (x{run['p99_ratio_during_to_normal']})."
        )
    return "\n".join(out)


def floor_text(results: dict[str, Any]) -> str:
    f = results["floor"]
    us, added = f["us_per_request"], f["us_added"]
    text = (
        f"The statements each variant sends, with its commits, and nothing else ({f['how']}; bench/floor.py): "
        f"bare {us['bare']:.0f} us per request (1 commit), leased {us['leased']:.0f} us (3 commits: the claim "
        f"must be durable before the effect, the outcome after it), atomic {us['atomic']:.0f} us (1 commit). "
        f"The layer's statements alone add {added['leased']:.0f} us (leased) and {added['atomic']:.0f} us "
        "(atomic) to a request."
    )
    fresh = results.get("main", {}).get("summary", {}).get("fresh", {})
    if "bare" in fresh and fresh["bare"]["rps"]:
        workers = results["config"]["workers"]
        bare_us = workers / fresh["bare"]["rps"] * 1e6
        best = {v: bare_us / (bare_us + added[v]) for v in ("leased", "atomic")}
        text += (
            f" The bare route takes {bare_us:.0f} us of a worker per request in the fresh-keys scenario above "
            f"({workers} workers), so with no Python cost at all the layer could reach at most "
            f"x{best['leased']:.2f} (leased) and x{best['atomic']:.2f} (atomic) of its throughput here."
        )
    return text


def memory_text(results: dict[str, Any]) -> str:
    m = results["memory"]
    rows = ", ".join(
        f"pid {pid}: {w['rss_start_mb']} -> {w['rss_end_mb']} MB ({w['rss_growth_mb']:+.2f} MB RSS, "
        f"{w['uss_growth_mb']:+.2f} MB USS)"
        for pid, w in m["per_worker"].items()
    )
    return (
        f"Worker memory over {m['requests']:,} requests ({m['mix']}), after {m['warmup_requests']:,} warm-up "
        f"requests: {rows}."
    )


def targets_table(results: dict[str, Any]) -> str:
    lines = ["| Target | Goal | Measured | |", "|---|---|---:|---|"]
    for t in results["targets"]:
        value = t["value"]
        if isinstance(value, list):
            value = ", ".join(value) or "none"
        lines.append(f"| {t['target']} | {t['goal']} | {_f(value)} | {'met' if t['met'] else '**missed**'} |")
    return "\n".join(lines)


def markdown(results: dict[str, Any]) -> str:
    parts = [f"# flask_idempotent benchmark ({results['started'][:16]}Z, run {results['run_id']})", ""]
    parts += ["Machine: " + machine_line(results), ""]
    for name, error in results.get("errors", {}).items():
        parts += [f"**Phase {name} failed:** {error}", ""]
    if results.get("targets"):
        parts += ["## Targets", "", targets_table(results), ""]
    if "main" in results:
        parts += [
            "## Throughput and latency (medians of interleaved rounds; ratios are medians of per-round pairs)",
            "",
            main_table(results),
            "",
        ]
    drivers = results["config"].get("drivers", ["psycopg2"])
    if "main" in results and len(drivers) > 1 and all(f"main-{d}" in results for d in drivers[1:]):
        parts += [
            f"## Both drivers ({', '.join(drivers)}), the same matrix in turn on one database",
            "",
            drivers_table(results),
            "",
        ]
    if "floor" in results:
        parts += ["## The floor: the layer's database work alone", "", floor_text(results), ""]
    if "correctness" in results:
        parts += ["## What each variant gets wrong (effects counted in PostgreSQL)", "", correctness_table(results), ""]
    if "scale" in results:
        parts += ["## Scale", "", scale_tables(results), ""]
    if "memory" in results:
        parts += ["## Memory", "", memory_text(results), ""]
    return "\n".join(parts)


def chart(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = ["rps", "p50_ms", "p99_ms"]
    extra = [k for k in ("scale", "memory") if k in results]
    fig, axes = plt.subplots(1, len(panels) + len(extra), figsize=(6 * (len(panels) + len(extra)), 5))
    if "main" in results:
        s = results["main"]["summary"]
        scenarios = list(s)
        variants = ["bare", "leased", "atomic", "peer"]
        width = 0.8 / len(variants)
        for ax, metric in zip(axes, panels, strict=False):
            for i, v in enumerate(variants):
                xs = [j + i * width for j, sc in enumerate(scenarios) if v in s[sc]]
                ys = [s[sc][v][metric] for sc in scenarios if v in s[sc]]
                ax.bar(xs, ys, width, label=LABELS[v])
            ax.set_xticks([j + width * (len(variants) - 1) / 2 for j in range(len(scenarios))])
            ax.set_xticklabels(scenarios, rotation=20)
            ax.set_title(
                {"rps": "Throughput (req/s)", "p50_ms": "p50 latency (ms)", "p99_ms": "p99 latency (ms)"}[metric]
            )
            ax.grid(axis="y", alpha=0.3)
        axes[0].legend(fontsize=8)
    i = len(panels)
    if "scale" in results:
        ax = axes[i]
        t = results["scale"]["throughput"]
        names = list(t)
        ax.bar([j - 0.2 for j in range(len(names))], [t[n]["empty"]["rps"] for n in names], 0.4, label="empty")
        ax.bar([j + 0.2 for j in range(len(names))], [t[n]["1m"]["rps"] for n in names], 0.4, label="1M records")
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names)
        ax.set_title("First requests: empty vs 1M-record table (req/s)")
        ax.legend(fontsize=8)
        ax.grid(axis="y", alpha=0.3)
        i += 1
    if "memory" in results:
        ax = axes[i]
        samples = results["memory"]["samples"]
        for pid in sorted({smp["pid"] for smp in samples}):
            mine = [smp for smp in samples if smp["pid"] == pid]
            ax.plot([smp["requests"] for smp in mine], [smp["rss_mb"] for smp in mine], marker=".", label=f"pid {pid}")
        ax.set_title("Worker RSS (MB) over requests")
        ax.set_xlabel("requests served (both workers)")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.suptitle(f"flask_idempotent benchmark, run {results['run_id']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
