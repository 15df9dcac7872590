"""``flask idempotency ...``: the operations API on the command line. Every command takes ``--json``."""

from __future__ import annotations

import getpass
import json
from collections.abc import Callable
from datetime import date, datetime
from typing import Any

import click
from flask.cli import AppGroup

from . import operations as ops
from .migrations import upgrade_schema
from .state import app_state

cli = AppGroup("idempotency", help="Inspect and resolve idempotency records.")

json_option = click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")


def _default_actor() -> str:
    try:
        return f"cli:{getpass.getuser()}"
    except (KeyError, OSError):
        return "cli"


actor_option = click.option(
    "--actor", default=_default_actor, show_default="cli:$USER", help="Name recorded in the audit event."
)


def _json_default(value: Any) -> Any:
    if isinstance(value, (datetime, date)):
        return value.isoformat()
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    raise TypeError(f"cannot serialize {type(value).__name__}")


def _emit(data: Any, as_json: bool, human: Callable[[Any], None]) -> None:
    if as_json:
        click.echo(json.dumps(data, default=_json_default, indent=2, sort_keys=True))
    else:
        human(data)


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


def _print_records(items: list[dict[str, Any]]) -> None:
    if not items:
        click.echo("(none)")
    for r in items:
        stuck = f" stuck {_age(r.get('stuck_for_seconds'))}" if r.get("stuck") else ""
        retry = " retryable" if r["state"] == "FAILED" and r["retryable"] else ""
        click.echo(
            f"{r['id']:>8}  {r['state']:<11}{retry}{stuck}  attempts={r['attempts']}  "
            f"scope={r['scope']!r} key={r['key']!r}  {r['method']} {r['path']}"
        )


def _fail(exc: Exception) -> None:
    raise click.ClickException(str(exc))


@cli.command("stats")
@json_option
def stats_command(as_json: bool) -> None:
    """Counts by state, stuck records, failures awaiting a decision, conflicts in the last 24 h."""

    def human(s: dict[str, Any]) -> None:
        for state, n in s["by_state"].items():
            click.echo(f"{state:<12}{n}")
        click.echo(f"stuck       {s['stuck']} (oldest {_age(s['oldest_stuck_seconds'])})")
        click.echo(f"failed      {s['failed_final']} final, {s['failed_retryable']} retryable")
        more = "+" if s["conflicts_24h_capped"] else ""
        click.echo(f"conflicts   {s['conflicts_24h']}{more} in the last 24 h")

    _emit(ops.stats(), as_json, human)


@cli.command("stuck")
@click.option("--page", default=1, type=int)
@click.option("--per-page", default=ops.DEFAULT_PER_PAGE, type=int)
@json_option
def stuck_command(page: int, per_page: int, as_json: bool) -> None:
    """IN_PROGRESS records whose lease expired: their outcome is unknown until an operator decides."""
    result = ops.list_stuck(page, per_page)
    _emit(
        {
            "items": result.items,
            "total": result.total,
            "total_capped": result.total_capped,
            "page": result.page,
            "per_page": result.per_page,
        },
        as_json,
        lambda d: _print_records(d["items"]),
    )


@cli.command("show")
@click.argument("scope")
@click.argument("key")
@click.option("--body", is_flag=True, help="Include the stored response body.")
@json_option
def show_command(scope: str, key: str, body: bool, as_json: bool) -> None:
    """One record (by SCOPE and KEY; the global scope is "") with its events."""
    try:
        record = ops.show(scope, key, body_limit=None if body else 0)
    except ops.RecordNotFound as exc:
        _fail(exc)

    def human(r: dict[str, Any]) -> None:
        for name, value in r.items():
            if name != "events":
                click.echo(f"{name:<22}{value}")
        click.echo("events:")
        for ev in r["events"]:
            click.echo(f"  {ev['created_at']}  {ev['kind']:<16} actor={ev['actor']} {ev['detail']}")

    _emit(record, as_json, human)


def _action(action: ops.Action, help_text: str) -> None:
    @cli.command(action.value, help=help_text)
    @click.argument("record_id", type=int)
    @click.option(
        "--expect-version",
        type=int,
        default=None,
        help="Act only if the record is still at this version (the one you looked at); else exit 1.",
    )
    @actor_option
    @json_option
    def command(record_id: int, expect_version: int | None, actor: str, as_json: bool) -> None:
        try:
            record = ops.act(action, record_id, actor=actor, version=expect_version)
        except (ops.RecordNotFound, ops.TransitionError, ops.RecordChanged) as exc:
            _fail(exc)
        _emit(
            record,
            as_json,
            lambda r: click.echo(f"record {r['id']}: {action.value} done (state {r['state']}, version {r['version']})"),
        )


_action(ops.Action.MARK_RETRYABLE, "Mark a FAILED or stuck record retryable: the next retry runs the view again.")
_action(ops.Action.MARK_FAILED, "Mark a retryable or stuck record failed for good: retries get the failure.")
_action(ops.Action.ACKNOWLEDGE, "Leave a final failure as it is: it no longer awaits a decision.")
_action(
    ops.Action.RELEASE, "Delete a record (not while its lease is live): its key is free again. The audit event stays."
)


@cli.command("upgrade-schema")
@json_option
def upgrade_schema_command(as_json: bool) -> None:
    """Add the columns of the current schema version to existing tables (apps without migrations)."""
    try:
        added = upgrade_schema(app_state().db.engine)
    except LookupError as exc:
        _fail(exc)
    _emit(
        {"added": added},
        as_json,
        lambda d: click.echo(f"added {', '.join(d['added'])}" if d["added"] else "the schema is already current"),
    )


@cli.command("purge")
@click.option("--batch-size", default=1000, show_default=True, type=click.IntRange(min=1))
@click.option("--max-batches", default=None, type=click.IntRange(min=1), help="Stop after this many batches.")
@click.option(
    "--pause",
    default=ops.PURGE_PAUSE,
    show_default=True,
    type=click.FloatRange(min=0),
    help="Seconds to rest between batches, leaving the database to requests.",
)
@json_option
def purge_command(batch_size: int, max_batches: int | None, pause: float, as_json: bool) -> None:
    """Delete expired COMPLETED and FAILED records in batches (run it on a schedule)."""
    deleted = ops.purge(batch_size=batch_size, max_batches=max_batches, pause=pause)
    _emit({"deleted": deleted}, as_json, lambda d: click.echo(f"deleted {d['deleted']} expired records"))
