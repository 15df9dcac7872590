"""``flask idempotency drain`` and ``flask idempotency outbox ...`` (docs: "The outbox").

Errors are the operator commands' (:mod:`.cli`): one line, a non-zero exit, ``--json`` as one JSON object.
"""

from __future__ import annotations

import logging
import math
import signal
from typing import Any

import click
from flask import current_app

from .cli import OperatorGroup, _age, _emit, _when, actor_option, cli, json_option
from .display import visible
from .outbox import Outbox

logger = logging.getLogger("flask_idempotent")


def _outbox() -> Outbox:
    outbox: Outbox = current_app.extensions["idempotency"].outbox
    return outbox


def _interval(ctx: click.Context, param: click.Parameter, value: float | None) -> float | None:
    if value is not None and not math.isfinite(value):
        raise click.BadParameter(f"{value} is not a number of seconds", ctx, param)
    return value


@cli.command("drain")
@click.option("--once", "once", is_flag=True, help="Deliver what is due now, then exit (the default).")
@click.option(
    "--interval",
    type=click.FloatRange(0.05, 3600),
    default=None,
    callback=_interval,
    help="Keep draining, every INTERVAL seconds, until SIGTERM or ^C.",
)
@click.option("--limit", type=click.IntRange(1, 10_000), default=100, show_default=True, help="Jobs per batch.")
@json_option
def drain_command(once: bool, interval: float | None, limit: int, as_json: bool) -> None:
    """Deliver the outbox's jobs whose hand-off was not confirmed (a crash after the commit, a broker outage)."""
    if once and interval is not None:
        raise click.UsageError("--once and --interval exclude each other")
    outbox = _outbox()
    if interval is None:
        _emit(
            outbox.drain(limit=limit),
            as_json,
            lambda d: click.echo(f"delivered {d['delivered']}, failed {d['failed']}, dead {d['dead']}"),
        )
        return
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        logger.info("outbox drainer: following every %ss", interval)
        outbox.follow(interval=interval, limit=limit)
    except KeyboardInterrupt:
        pass  # SIGTERM or ^C: a delivery cut short keeps its lease, and the next drainer delivers that job
    finally:
        signal.signal(signal.SIGTERM, previous)


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt  # out of a LISTEN's wait too, which a flag would only end at the interval


outbox_group = OperatorGroup("outbox", help="List, show, redeliver and discard outbox jobs.")
cli.add_command(outbox_group)


def _job_line(job: dict[str, Any]) -> str:
    error = f"  {visible(job['last_error'])}" if job.get("last_error") else ""
    return (
        f"{job['id']:>8}  {job['state']:<9}  {visible(job['target'])}  attempts={job['attempts']}"
        f"  age={_age(job['age_seconds'])}  key={visible(job['key'])}{error}"
    )


@outbox_group.command("list")
@click.option("--limit", type=click.IntRange(1, 1000), default=50, show_default=True)
@json_option
def list_command(limit: int, as_json: bool) -> None:
    """Pending jobs (with the oldest's age) and dead jobs (with their last error), oldest first."""
    outbox = _outbox()
    data = {
        "stats": outbox.stats(),
        "pending": outbox.jobs("pending", limit=limit),
        "dead": outbox.jobs("dead", limit=limit),
    }

    def human(d: dict[str, Any]) -> None:
        stats = d["stats"]
        click.echo(f"pending {stats['pending']} (oldest {_age(stats['oldest_seconds'])}), dead {stats['dead']}")
        for job in d["pending"] + d["dead"]:
            click.echo(_job_line(job))

    _emit(data, as_json, human)


@outbox_group.command("show")
@click.argument("job_id", type=int)
@json_option
def show_command(job_id: int, as_json: bool) -> None:
    """One job with its arguments, attempts, times and last error."""

    def human(job: dict[str, Any]) -> None:
        for name in ("id", "state", "kind", "target", "key", "scope", "attempts", "version", "ordered", "leased"):
            click.echo(f"{name:>12}: {visible(str(job[name]))}")
        for name in ("created_at", "available_at", "delivered_at", "expires_at"):
            click.echo(f"{name:>12}: {_when(job[name])}")
        click.echo(f"{'args':>12}: {visible(repr(job['args']))}")
        click.echo(f"{'kwargs':>12}: {visible(repr(job['kwargs']))}")
        click.echo(f"{'last_error':>12}: {visible(job['last_error'] or '-')}")

    _emit(_outbox().show(job_id), as_json, human)


def _action(action: str, help_text: str) -> None:
    @outbox_group.command(action, help=help_text)
    @click.argument("job_id", type=int)
    @click.option(
        "--expect-version",
        type=int,
        default=None,
        help="Refuse (exit 1, 'changed') unless the job is still at this version (as you saw it).",
    )
    @actor_option
    @json_option
    def command(job_id: int, expect_version: int | None, actor: str, as_json: bool) -> None:
        done = _outbox().act(action, job_id, actor=actor, expected_version=expect_version)
        _emit(done, as_json, lambda d: click.echo(f"job {d['job']}: {action} (was {d['from']})"))


_action("redeliver", "Deliver a dead, delivered or backing-off job again, due now, attempts from 0.")
_action("discard", "Delete a pending or dead job without delivering it (the audit event keeps its arguments).")
