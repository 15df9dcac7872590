"""``flask idempotency ...``: the operations API on the command line. Every command takes ``--json``.

Errors are one line and a non-zero exit status, never a traceback (:class:`OperatorGroup` turns every
exception of a command, and every usage error, into that line). Exit status 2: the command line is wrong (a
usage error); 1: anything else (no such record, an action refused, the record changed, the database cannot be
reached). Without ``--json`` the line goes to stderr as ``Error: ...``; with ``--json`` stdout holds one JSON
object ``{"error": {"code": ..., "message": ...}}`` instead of the result, so stdout is always exactly one JSON
document and the exit status says which.
"""

from __future__ import annotations

import getpass
import json
import logging
import math
import re
from collections.abc import Callable
from datetime import date, datetime, timedelta
from typing import TYPE_CHECKING, Any, NoReturn

import click
import sqlalchemy as sa
from flask.cli import AppGroup
from flask.helpers import get_debug_flag

from . import dberrors
from . import operations as ops
from .display import event_words, iso_time, json_text, visible
from .errors import SchemaVersionError
from .migrations import upgrade_schema
from .state import app_state

logger = logging.getLogger("flask_idempotent")

_ARGV = "flask_idempotent.argv"

#: Error codes of ``--json`` errors (``{"error": {"code": ..., "message": ...}}``).
ERROR_CODES = (
    "usage",
    "not-found",
    "refused",
    "changed",
    "invalid",
    "database-unreachable",
    "database-error",
    "schema-version",
    "internal-error",
)


def _one_line(text: str) -> str:
    """Line breaks become one space; other spacing stays (a key with two spaces is quoted as it is)."""
    return re.sub(r"\s*[\r\n]+\s*", " ", text).strip() or "(no message)"


def _classify(exc: Exception) -> tuple[str, str, int]:
    """``(code, message, exit status)`` for an exception a command (or its parsing) raised."""
    if isinstance(exc, click.UsageError):
        hint = f" (see '{exc.ctx.command_path} --help')" if exc.ctx is not None else ""
        return "usage", exc.format_message() + hint, exc.exit_code
    if isinstance(exc, click.ClickException):
        return "invalid", exc.format_message(), exc.exit_code
    if isinstance(exc, ops.RecordNotFound):
        return "not-found", str(exc), 1
    if isinstance(exc, ops.TransitionError):
        return "refused", str(exc), 1
    if isinstance(exc, ops.RecordChanged):
        return "changed", str(exc), 1
    if isinstance(exc, SchemaVersionError):
        return "schema-version", str(exc), 1
    if dberrors.unreachable(exc):
        return "database-unreachable", f"the database cannot be reached: {dberrors.message(exc)}", 1
    if isinstance(exc, sa.exc.SQLAlchemyError):
        return "database-error", f"the database refused the command: {dberrors.message(exc)}", 1
    if isinstance(exc, (ValueError, LookupError)):
        return "invalid", str(exc), 1
    return "internal-error", f"unexpected error: {type(exc).__name__}: {exc}", 1


#: Not errors: an exit status chosen by the command, ^C or a declined confirmation, and click 8.2+'s help
#: for a command given no arguments (shown through an exception).
_PASS_THROUGH: tuple[type[BaseException], ...] = (
    click.exceptions.Exit,
    click.Abort,
    *filter(None, [getattr(click.exceptions, "NoArgsIsHelpError", None)]),
)


class OperatorGroup(AppGroup):
    """An ``AppGroup`` whose commands never end in a traceback: every error is one line and an exit status.

    Usage errors (exit 2) and everything a command raises (exit 1) are reported by :func:`_classify`; with
    ``--json`` on the command line as a JSON object on stdout, else as ``Error: ...`` on stderr. An unexpected
    exception is logged with its traceback at DEBUG on the ``flask_idempotent`` logger, and re-raised (a
    traceback) only when Flask's debug mode is on (``flask --debug``), for whoever is debugging the app.
    """

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        ctx.meta[_ARGV] = list(args)  # the subcommand's arguments: to know about --json when parsing fails
        return super().parse_args(ctx, args)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except _PASS_THROUGH:
            raise
        except Exception as exc:  # the point: one line, never a traceback
            code, message, status = _classify(exc)
            if code == "internal-error":
                logger.debug("flask idempotency: %s", message, exc_info=True)
                if get_debug_flag():
                    raise
            _report(ctx, code, _one_line(message), status)


def _report(ctx: click.Context, code: str, message: str, status: int) -> NoReturn:
    argv: list[str] = ctx.meta.get(_ARGV, [])
    given = argv[: argv.index("--")] if "--" in argv else argv
    if "--json" in given:
        click.echo(json.dumps({"error": {"code": code, "message": message}}, sort_keys=True))
    else:
        click.echo(f"Error: {visible(message)}", err=True)
    raise click.exceptions.Exit(status)


cli = OperatorGroup("idempotency", help="Inspect and resolve idempotency records.")

json_option = click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")


def _default_actor() -> str:
    try:
        return f"cli:{getpass.getuser()}"
    except (KeyError, OSError):
        return "cli"


#: The audit columns (``idempotency_events.actor``, ``acknowledged_by``) hold this many characters.
ACTOR_MAX = 255


def _check_actor(ctx: click.Context, param: click.Parameter, value: str) -> str:
    name = value.strip()
    if not name:
        raise click.BadParameter("must name who acts: it is recorded in the audit event", ctx, param)
    if len(name) > ACTOR_MAX:
        raise click.BadParameter(f"at most {ACTOR_MAX} characters", ctx, param)
    return name


actor_option = click.option(
    "--actor",
    default=_default_actor,
    show_default="cli:$USER",
    callback=_check_actor,
    help="Name recorded in the audit event (1 to 255 characters).",
)

page_option = click.option("--page", default=1, show_default=True, type=click.IntRange(1, ops.MAX_PAGE))
per_page_option = click.option(
    "--per-page", default=ops.DEFAULT_PER_PAGE, show_default=True, type=click.IntRange(1, ops.MAX_PER_PAGE)
)


def _json_default(value: Any) -> Any:
    if isinstance(value, (datetime, date)):
        return iso_time(value)  # stored times are UTC: say so (ISO 8601 with Z)
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


def _when(value: datetime | None) -> str:
    """A stored time (UTC) to the second, with its zone: ``2026-12-08T01:24:18Z``."""
    return "-" if value is None else iso_time(value.replace(microsecond=0))


def _quoted(value: Any) -> str:
    """A key or scope: quoted (it may hold spaces), every control character escaped."""
    return f'"{visible(value)}"'


def _scope(item: dict[str, Any]) -> str:
    if item["scope"] == "":
        return "scope (global)"
    label = item.get("scope_label")
    return f"scope {_quoted(item['scope'])}" + (f" ({visible(label)})" if label else "")


def _labelled(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each item with ``scope_label``: the app's name for its scope (``@idempotency.scope_label``), or None."""
    cache: dict[str, str | None] = {}
    for item in items:
        item["scope_label"] = ops.scope_label(item["scope"], cache)
    return items


def _record_line(r: dict[str, Any]) -> str:
    state = r["state"]
    if r.get("stuck"):
        state = f"stuck for {_age(r.get('stuck_for_seconds'))}"
    elif state == "FAILED":
        state = "FAILED retryable" if r["retryable"] else "FAILED final"
    what = f"task {visible(r['path'])}" if r.get("kind") == "task" else f"{r['method']} {visible(r['path'])}"
    parts = [f"{r['id']:>8}  {state}", what]
    if r.get("summary"):
        parts.append(f"summary: {visible(r['summary'])}")
    parts += [_scope(r), f"key {_quoted(r['key'])}", f"attempts {r['attempts']}"]
    if r.get("recovery_point"):
        parts.append(f"recovery point {visible(r['recovery_point'])}")
    if r["state"] == "FAILED" and r.get("response_status") is not None:
        parts.append(f"status {r['response_status']}")
    if r["state"] == "FAILED" and r.get("error"):
        error = visible(r["error"])
        parts.append(f"error: {error[:59]}…" if len(error) > 60 else f"error: {error}")
    if r.get("acknowledged_by"):
        parts.append(f"acknowledged by {visible(r['acknowledged_by'])}")
    return "  ".join(parts)


def _print_records(items: list[dict[str, Any]]) -> None:
    if not items:
        click.echo("(none)")
    for r in items:
        click.echo(_record_line(r))


def _value(value: Any) -> str:
    """A field of ``show`` as text: no Python reprs (``None`` is ``-``, JSON as JSON, times in UTC with Z)."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, datetime):
        return iso_time(value)
    if isinstance(value, (dict, list, tuple)):
        return json_text(value)
    return visible(value)


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
@page_option
@per_page_option
@click.option("--kind", type=click.Choice(ops.KINDS), default=None, help="Only requests (http) or tasks.")
@json_option
def stuck_command(page: int, per_page: int, kind: str | None, as_json: bool) -> None:
    """IN_PROGRESS records whose lease expired: their outcome is unknown until an operator decides."""
    result = ops.list_stuck(page, per_page, kind=kind)
    _emit(_page_data(result), as_json, lambda d: _print_records(d["items"]))


def _page_data(result: ops.Page) -> dict[str, Any]:
    return {
        "items": _labelled(result.items),
        "total": result.total,
        "total_capped": result.total_capped,
        "page": result.page,
        "per_page": result.per_page,
    }


_FAILED_WHICH = {"all": None, "awaiting": False, "final": False, "retryable": True}


@cli.command("failed")
@click.option(
    "--which",
    type=click.Choice(list(_FAILED_WHICH)),
    default="all",
    show_default=True,
    help="awaiting: final failures nobody acknowledged yet.",
)
@page_option
@per_page_option
@click.option("--kind", type=click.Choice(ops.KINDS), default=None, help="Only requests (http) or tasks.")
@json_option
def failed_command(which: str, page: int, per_page: int, kind: str | None, as_json: bool) -> None:
    """FAILED records, newest first."""
    result = ops.list_failed(_FAILED_WHICH[which], page, per_page, awaiting=which == "awaiting", kind=kind)
    _emit(_page_data(result), as_json, lambda d: _print_records(d["items"]))


@cli.command("conflicts")
@click.option("--hours", type=click.IntRange(1, 24 * 366), default=None, help="Only the last HOURS hours.")
@page_option
@per_page_option
@json_option
def conflicts_command(hours: int | None, page: int, per_page: int, as_json: bool) -> None:
    """Keys reused with another command: the original request and the conflicting one, newest first."""
    since = None if hours is None else ops.now() - timedelta(hours=hours)
    result = ops.list_conflicts(since, page, per_page)

    def human(d: dict[str, Any]) -> None:
        if not d["items"]:
            click.echo("(none)")
        for ev in d["items"]:
            original = ev["record"]
            detail = ev["detail"] or {}
            if original is None:
                first = "first: (record released or purged)"
            else:
                first = f"first: record {original['id']} {original['method']} {visible(original['path'])}"
                if original.get("summary"):
                    first += f" summary: {visible(original['summary'])}"
            then = f"then: {visible(detail.get('method') or '?')} {visible(detail.get('path') or '?')}"
            if detail.get("summary"):
                then += f" summary: {visible(detail['summary'])}"
            click.echo(f"{_when(ev['created_at'])}  {_scope(ev)}  key {_quoted(ev['key'])}  {first}  {then}")

    _emit(_page_data(result), as_json, human)


@cli.command("search")
@click.argument("text")
@page_option
@per_page_option
@json_option
def search_command(text: str, page: int, per_page: int, as_json: bool) -> None:
    """Records whose key or scope is exactly TEXT."""
    _emit(_page_data(ops.search(text, page, per_page)), as_json, lambda d: _print_records(d["items"]))


@cli.command("show")
@click.argument("target", nargs=-1, required=True)
@click.option("--body", is_flag=True, help="Include the stored response body.")
@json_option
def show_command(target: tuple[str, ...], body: bool, as_json: bool) -> None:
    """One record with its events: by ID, or by SCOPE and KEY (the global scope is "")."""
    limit = None if body else 0
    if len(target) == 1:
        if not target[0].isascii() or not target[0].isdigit():
            raise click.UsageError("give a record ID (a number), or SCOPE and KEY")
        record = ops.get(int(target[0]), body_limit=limit)
    elif len(target) == 2:
        record = ops.show(target[0], target[1], body_limit=limit)
    else:
        raise click.UsageError("give a record ID, or SCOPE and KEY")

    record["scope_label"] = ops.scope_label(record["scope"])

    def human(r: dict[str, Any]) -> None:
        for name, value in r.items():
            if name in ("events", "scope_label", "event_count", "runbook"):
                continue
            if name == "scope":
                shown = _scope(r).removeprefix("scope ")
            elif name == "stuck_for_seconds" and value is not None:
                shown = f"{value:.0f} ({_age(value)})"
            else:
                shown = _value(value)
            click.echo(f"{name:<22}{shown}")
        click.echo(f"{'runbook':<22}{_value(r.get('runbook'))}")
        click.echo(
            f"{'client_events':<22}{r['event_count']} (conflicts and hits clients caused, counted for the"
            " per-record cap; operator actions and takeovers are listed below, not counted)"
        )
        click.echo(f"events ({len(r['events'])}, newest first):" if r["events"] else "events: none")
        for ev in r["events"]:
            actor = f" by {visible(ev['actor'])}" if ev["actor"] else ""
            detail = f"  {json_text(ev['detail'])}" if ev["detail"] else ""
            click.echo(f"  {_when(ev['created_at'])}  {event_words(ev['kind'])}{actor}{detail}")

    _emit(record, as_json, human)


if TYPE_CHECKING:  # click 8.2+ types ParamType by its value; older versions cannot subscript it at runtime
    _DurationBase = click.ParamType[timedelta]
else:
    _DurationBase = click.ParamType


class Duration(_DurationBase):
    """``90s``, ``10m``, ``2h``, ``3d`` or a number of seconds, as a ``timedelta`` (at most 10 years)."""

    name = "duration"
    _UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> timedelta:
        if isinstance(value, timedelta):
            return value
        match = re.fullmatch(r"([0-9]{1,9})([smhd]?)", str(value).strip())
        if not match:
            self.fail(f"{value!r} is not a duration such as 90s, 10m, 2h or 3d", param, ctx)
        seconds = int(match.group(1)) * self._UNITS[match.group(2) or "s"]
        if seconds > 10 * 366 * 86400:
            self.fail("at most 10 years", param, ctx)
        return timedelta(seconds=seconds)


_BULK_DEFAULT_LIMIT = 100


def _bulk(
    action: ops.Action,
    *,
    which: str,
    endpoint: str | None,
    recovery_point: str | None,
    older_than: timedelta | None,
    limit: int,
    dry_run: bool,
    yes: bool,
    actor: str,
    as_json: bool,
) -> None:
    """An action on every record a filter selects, each under the operator rules; refused ones are reported."""
    selected = ops.select_records(
        which, endpoint=endpoint, recovery_point=recovery_point, older_than=older_than, limit=limit
    )
    if action is ops.Action.RELEASE and selected and not (yes or dry_run):
        click.confirm(
            f"Release {len(selected)} record(s)? The next request with each key runs as new", abort=True, err=True
        )
    results = ops.act_many(action, selected, actor=actor, dry_run=dry_run)
    counts = {outcome: sum(r["outcome"] == outcome for r in results) for outcome in ("done", "would", "refused")}
    data = {
        "action": action.value,
        "dry_run": dry_run,
        "matched": len(selected),
        "limit_reached": len(selected) == limit,
        "results": results,
    }

    def human(d: dict[str, Any]) -> None:
        if not d["results"]:
            click.echo("no record matches")
        for r in d["results"]:
            named = f"Record {r['id']} (key {_quoted(r['key'])})"
            if r["outcome"] == "done":
                click.echo(r["message"])  # "Record 11 (key "k") is now retryable: ..."
            elif r["outcome"] == "would":
                click.echo(f"{named} {r['message']}")
            else:
                click.echo(f"{named}: {visible(r['message'])}")
        others = len(d["results"]) - counts["done"] - counts["would"] - counts["refused"]
        summary = (
            f"dry run: {counts['would']} would change, {counts['refused']} refused"
            if dry_run
            else f"{counts['done']} done, {counts['refused']} refused, {others} changed or gone since listed"
        )
        more = f"; stopped at --limit {limit}: run again for more" if d["limit_reached"] else ""
        click.echo(f"{summary} (of {d['matched']} matched{more})")

    _emit(data, as_json, human)
    if any(r["outcome"] not in ("done", "would") for r in results):
        raise click.exceptions.Exit(1)  # the results are printed; the status says not everything was applied


def _action(action: ops.Action, help_text: str) -> None:
    release = action is ops.Action.RELEASE

    @cli.command(action.value, help=help_text)
    @click.argument("record_id", type=int, required=False)
    @click.option(
        "--expect-version",
        type=int,
        default=None,
        help="Act only if the record is still at this version (the one you looked at); else exit 1.",
    )
    @click.option(
        "--where",
        "which",
        type=click.Choice(ops.BULK_LISTS),
        default=None,
        help="Instead of one RECORD_ID: act on the records of this list (with the filters below).",
    )
    @click.option("--endpoint", default=None, help="With --where: only records of this endpoint.")
    @click.option("--recovery-point", default=None, help="With --where: only records at this recovery point.")
    @click.option(
        "--older-than",
        type=Duration(),
        default=None,
        help="With --where: only records last changed more than this long ago (90s, 10m, 2h, 3d).",
    )
    @click.option(
        "--limit",
        type=click.IntRange(1, ops.MAX_BULK),
        default=_BULK_DEFAULT_LIMIT,
        show_default=True,
        help="With --where: act on at most this many records.",
    )
    @click.option("--dry-run", is_flag=True, help="With --where: show what would happen; change nothing.")
    @click.option("--yes", is_flag=True, help="Release without asking (release only).", hidden=not release)
    @actor_option
    @json_option
    def command(
        record_id: int | None,
        expect_version: int | None,
        which: str | None,
        endpoint: str | None,
        recovery_point: str | None,
        older_than: timedelta | None,
        limit: int,
        dry_run: bool,
        yes: bool,
        actor: str,
        as_json: bool,
    ) -> None:
        filtered = endpoint is not None or recovery_point is not None or older_than is not None or dry_run
        if record_id is None:
            if which is None:
                raise click.UsageError("give a RECORD_ID, or --where LIST (with --endpoint, --recovery-point,"
                                       " --older-than, --dry-run) to act on many")  # fmt: skip
            if expect_version is not None:
                raise click.UsageError("--expect-version is for one RECORD_ID; --where acts on the versions it lists")
            _bulk(
                action,
                which=which,
                endpoint=endpoint,
                recovery_point=recovery_point,
                older_than=older_than,
                limit=limit,
                dry_run=dry_run,
                yes=yes,
                actor=actor,
                as_json=as_json,
            )
            return
        if which is not None or filtered:
            raise click.UsageError("give either a RECORD_ID or --where with its filters, not both")
        if release and not yes:
            # The rule first (a live lease is refused without a question), then the question, then the
            # release of exactly the version the operator was asked about.
            seen = ops.get(record_id)
            if expect_version is not None and expect_version != seen["version"]:
                raise ops.RecordChanged(
                    f"record {record_id} changed since you looked at it (version {expect_version}, now"
                    f" {seen['version']}); look at it again, then decide"
                )
            refused = ops.refusal(action, seen)
            if refused:
                raise ops.TransitionError(refused)
            click.confirm(
                f"Release record {record_id} (key {_quoted(seen['key'])}, {seen['state']})? The next request"
                " with its key runs as new",
                abort=True,
                err=True,
            )
            expect_version = seen["version"] if expect_version is None else expect_version
        record = ops.act(action, record_id, actor=actor, version=expect_version)
        _emit(
            record,
            as_json,
            lambda r: click.echo(
                ops.done_message(action, r) + ("" if release else f" (now at version {r['version']})")
            ),
        )


_action(ops.Action.MARK_RETRYABLE, "Mark a FAILED or stuck record retryable: the next retry runs the view again.")
_action(ops.Action.MARK_FAILED, "Mark a retryable or stuck record failed for good: retries get the failure.")
_action(ops.Action.ACKNOWLEDGE, "Leave a final failure as it is: it no longer awaits a decision.")
_action(
    ops.Action.RELEASE,
    "Delete a record (not while its lease is live): its key is free again. The audit event stays. Asks first"
    " unless --yes.",
)


@cli.command("upgrade-schema")
@json_option
def upgrade_schema_command(as_json: bool) -> None:
    """Add the columns of the current schema version to existing tables (apps without migrations); on MariaDB
    and MySQL, give scopes and keys the NO PAD binary collation."""
    added = upgrade_schema(app_state().records_engine)
    _emit(
        {"added": added},
        as_json,
        lambda d: click.echo(f"added {', '.join(d['added'])}" if d["added"] else "the schema is already current"),
    )


#: Bounds of ``purge``'s options: a batch is one transaction (and a LIMIT the database must hold); a pause is
#: a sleep (``time.sleep`` refuses NaN and overflows on huge values).
PURGE_BATCH_MAX = 1_000_000
PURGE_PAUSE_MAX = 3600.0


def _finite(ctx: click.Context, param: click.Parameter, value: float) -> float:
    if not math.isfinite(value):  # FloatRange lets NaN through: it compares false with both bounds
        raise click.BadParameter(f"{value} is not a number of seconds", ctx, param)
    return value


@cli.command("purge")
@click.option("--batch-size", default=1000, show_default=True, type=click.IntRange(1, PURGE_BATCH_MAX))
@click.option("--max-batches", default=None, type=click.IntRange(min=1), help="Stop after this many batches.")
@click.option(
    "--pause",
    default=ops.PURGE_PAUSE,
    show_default=True,
    type=click.FloatRange(0, PURGE_PAUSE_MAX),
    callback=_finite,
    help="Seconds to rest between batches, leaving the database to requests.",
)
@json_option
def purge_command(batch_size: int, max_batches: int | None, pause: float, as_json: bool) -> None:
    """Delete expired COMPLETED and FAILED records, and delivered outbox jobs past their ttl, in batches (run it
    on a schedule)."""
    deleted = ops.purge(batch_size=batch_size, max_batches=max_batches, pause=pause)
    jobs = ops.purge_outbox(batch_size=batch_size, max_batches=max_batches, pause=pause)
    _emit(
        {"deleted": deleted, "outbox_deleted": jobs},
        as_json,
        lambda d: click.echo(f"deleted {d['deleted']} expired records and {d['outbox_deleted']} delivered jobs"),
    )
