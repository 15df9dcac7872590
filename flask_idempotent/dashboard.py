"""The operator dashboard: a blueprint that shows stuck, failed and conflicting records and resolves them.

``Idempotency.init_app`` mounts it at ``IDEMPOTENCY_DASHBOARD_URL_PREFIX`` (default ``/idempotency``; ``None``
or ``""`` mounts nothing). Pages are server-rendered Jinja templates (``flask_idempotent/*.html``, which an app
may override with its own file of the same name) styled only by the namespaced ``fi-`` classes of
``flask_idempotent/dashboard.css``; no JavaScript is needed. Every query goes through :mod:`.operations`.

Access. Every page, action and static file answers 403 until the app registers a check with
``@idempotency.dashboard_access``. The check runs once per request and returns:

- the operator's name (a non-empty ``str``): full access; actions are audited under that name;
- ``ReadOnly("name")``: the pages without the action buttons; action POSTs answer 403;
- anything falsy (``None``, ``""``, ``False``): 403.

It may also raise an HTTP exception itself (``abort(401)``, a redirect to the app's login page).

Actions (mark retryable, mark failed, acknowledge, release) are POST forms carrying a CSRF token: Flask-WTF's
when the app registered ``CSRFProtect`` (and ``WTF_CSRF_ENABLED`` is on), otherwise the dashboard's own
per-session token. A missing or wrong token answers 400 and changes nothing. Both need ``SECRET_KEY``;
without it the pages are read-only. Each form also carries the ``version`` of the record the operator saw,
and the action is a compare-and-set on it: if the record changed since (a retry ran, another operator
acted), the action answers 409 instead of acting on a state nobody looked at. Which action is allowed is
the state machine's rule (``machine.operator_transition``), the same for the CLI and the Python API; a
refused one answers 409 naming the rule.
Releasing (deleting) a record needs a confirmation step.

Response bodies are hidden unless ``IDEMPOTENCY_DASHBOARD_SHOW_BODIES`` is on; then the first :data:`BODY_LIMIT`
bytes are shown. Recovery data (the app's own checkpoint, what a runbook names) is always shown, up to
:data:`BODY_LIMIT` characters. Stored text (keys, scopes, paths, summaries, errors, details) is shown with its
control characters escaped (``\\x1b``), never raw.

Hardening. Every response under the prefix (pages, actions, errors, the stylesheet, a 405) carries
:data:`SECURITY_HEADERS`: it cannot be framed (the one-click actions cannot be clickjacked), is not cached, and
loads nothing but the dashboard's own stylesheet. No query argument is a 500: paging values are clamped
(``operations.bounds``), only the list parameters (:data:`LIST_ARGS`) ever reach ``url_for``, ids beyond 64 bits
are 404, and a database that cannot be reached is a 503 dashboard page.
"""

from __future__ import annotations

import hmac
import importlib
import json
import logging
import re
import secrets
from collections.abc import Container
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from flask import (
    Blueprint,
    Flask,
    abort,
    current_app,
    flash,
    g,
    redirect,
    render_template,
    request,
    session,
    url_for,
)
from flask.typing import ResponseReturnValue
from flask.wrappers import Response
from werkzeug.exceptions import HTTPException

from . import dberrors
from . import operations as ops
from .constants import ConfigKey
from .decorator import idempotent
from .display import event_words, json_text, visible
from .errors import SchemaVersionError
from .machine import Action
from .state import app_state

__all__ = ["BODY_LIMIT", "LIST_ARGS", "SECURITY_HEADERS", "ReadOnly", "blueprint", "init_dashboard"]

logger = logging.getLogger("flask_idempotent")

#: How much of a stored response body (and of recovery data) the record page shows, when bodies are shown.
BODY_LIMIT = 4096

#: The endpoint prefix: ``url_for("idempotency_dashboard.overview")``.
BLUEPRINT_NAME = "idempotency_dashboard"

_SETTINGS = "idempotency_dashboard"
_SESSION_TOKEN = "_flask_idempotent_csrf"
_CSRF_FIELD = "csrf_token"
_FLASH_OK = "fi-success"
_FLASH_ERROR = "fi-error"
_OUTAGE = "flask_idempotent.dashboard_outage"

#: Set on every dashboard response. The pages use no JavaScript, no inline style and nothing from elsewhere:
#: only ``dashboard.css`` from the blueprint's static folder.
SECURITY_HEADERS = {
    "X-Frame-Options": "DENY",
    "Content-Security-Policy": "default-src 'self'; base-uri 'none'; frame-ancestors 'none'",
    "Cache-Control": "no-store",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
}

#: The only query arguments carried into the pagination links (nothing else ever reaches ``url_for``).
LIST_ARGS = frozenset({"page", "per_page", "kind", "record_kind", "window", "q"})

#: What a dashboard page answers with 503 instead of a 500: the database (or its tables) cannot be used.
_STORE_ERRORS = (*dberrors.STORE_ERRORS, SchemaVersionError)


class ReadOnly(str):
    """Return ``ReadOnly("alice")`` from the ``dashboard_access`` hook to let alice see pages but not act."""

    __slots__ = ()


@dataclass(frozen=True)
class Viewer:
    """Who is looking at the dashboard in this request."""

    name: str
    read_only: bool


@dataclass(frozen=True)
class Settings:
    """The dashboard's config, read once in ``init_app``."""

    show_bodies: bool
    prefix: str


def _assets(name: str) -> str:
    """A wheel carries ``templates``/``static`` inside the package; a checkout has them at the top level."""
    here = Path(__file__).resolve().parent
    inside = here / name
    return str(inside if inside.is_dir() else here.parent / name)


blueprint = Blueprint(
    BLUEPRINT_NAME,
    __name__,
    template_folder=_assets("templates"),
    static_folder=_assets("static"),
    static_url_path="/static",
)

#: Dashboard views are never protected by ``IDEMPOTENCY_PROTECT_ALL``: their POSTs need no key.
_exempt = idempotent(exempt=True)


def init_dashboard(app: Flask) -> None:
    """Mount the dashboard at ``IDEMPOTENCY_DASHBOARD_URL_PREFIX`` (``None`` or ``""``: not mounted)."""
    prefix = app.config.get(ConfigKey.DASHBOARD_URL_PREFIX)
    if not prefix:
        return
    url_prefix = str(prefix).rstrip("/")
    app.extensions[_SETTINGS] = Settings(
        show_bodies=bool(app.config[ConfigKey.DASHBOARD_SHOW_BODIES]), prefix=url_prefix
    )
    app.register_blueprint(blueprint, url_prefix=url_prefix)


def _is_dashboard_request() -> bool:
    """A request routed to the dashboard, or one under its prefix that matched no route (a 404 or 405)."""
    if request.blueprint == BLUEPRINT_NAME:
        return True
    if request.url_rule is not None:
        return False
    settings: Settings | None = current_app.extensions.get(_SETTINGS)
    prefix = settings.prefix if settings is not None else ""
    return bool(prefix) and (request.path == prefix or request.path.startswith(prefix + "/"))


@blueprint.after_app_request
def _harden(response: Response) -> Response:
    if _is_dashboard_request():
        response.headers.update(SECURITY_HEADERS)
    return response


# Access and CSRF --------------------------------------------------------------------------------------------


@blueprint.before_request
def _check_access() -> None:
    check = app_state().callbacks.dashboard_access
    if check is None:
        abort(403, "The dashboard is closed: the app has not registered @idempotency.dashboard_access.")
    who = current_app.ensure_sync(check)()
    if not who:
        abort(403, "You do not have access to the idempotency dashboard.")
    g._flask_idempotent_viewer = Viewer(name=str(who), read_only=isinstance(who, ReadOnly))


def _viewer() -> Viewer | None:
    viewer: Viewer | None = g.get("_flask_idempotent_viewer")
    return viewer


def _settings() -> Settings:
    settings: Settings = current_app.extensions[_SETTINGS]
    return settings


def _flask_wtf() -> Any | None:
    """The app's ``CSRFProtect``, when it registered one and left it enabled."""
    csrf = current_app.extensions.get("csrf")
    if csrf is None or not current_app.config.get("WTF_CSRF_ENABLED", True):
        return None
    return csrf


def _actions_enabled() -> bool:
    """Actions need a session for their CSRF token (ours or Flask-WTF's): no ``SECRET_KEY``, no actions."""
    return bool(current_app.secret_key)


def _csrf_field() -> str:
    if _flask_wtf() is not None:
        return str(current_app.config.get("WTF_CSRF_FIELD_NAME", _CSRF_FIELD))
    return _CSRF_FIELD


def _csrf_token() -> str:
    if _flask_wtf() is not None:
        return str(importlib.import_module("flask_wtf.csrf").generate_csrf())
    token = session.get(_SESSION_TOKEN)
    if not isinstance(token, str) or not token:
        token = secrets.token_urlsafe(32)
        session[_SESSION_TOKEN] = token
    return token


def _check_csrf() -> None:
    """Answer 400 unless the form carries this session's token."""
    csrf = _flask_wtf()
    if csrf is not None:
        if not g.get("csrf_valid"):  # CSRFProtect's own before_request may already have checked it
            csrf.protect()  # raises CSRFError, a 400
        return
    expected = session.get(_SESSION_TOKEN)
    sent = request.form.get(_CSRF_FIELD, "")
    if not (isinstance(expected, str) and expected and hmac.compare_digest(sent.encode(), expected.encode())):
        abort(400, "The form's CSRF token is missing or wrong. Reload the page and try again.")


def _require_operator() -> Viewer:
    viewer = _viewer()
    if viewer is None or viewer.read_only:
        abort(403, "Read-only access: you can look at records but not change them.")
    if not _actions_enabled():
        abort(403, "Dashboard actions need the app's SECRET_KEY (for the CSRF token).")
    return viewer


# Template helpers -------------------------------------------------------------------------------------------


def human_age(seconds: float | None) -> str:
    """``725`` → ``"12 min"``; ``None`` → ``"-"``."""
    if seconds is None:
        return "-"
    s = int(abs(seconds))
    if s < 60:
        return f"{s} s"
    minutes = s // 60
    if minutes < 60:
        return f"{minutes} min"
    hours, minutes = divmod(minutes, 60)
    if hours < 24:
        return f"{hours} h {minutes} min" if minutes else f"{hours} h"
    days, hours = divmod(hours, 24)
    return f"{days} d {hours} h" if hours else f"{days} d"


def _now() -> datetime:
    """The database's clock, read once per request: ages on the page are measured with it.

    Kept in the request's environ, not on ``g``: an app context can outlive one request (tests push one).
    """
    now: datetime | None = request.environ.get("flask_idempotent.now")
    if now is None:
        now = request.environ["flask_idempotent.now"] = ops.now()
    return now


def _page_now() -> datetime | None:
    """The clock for a page being rendered; ``None`` (ages shown as "-") for a visitor without access and
    for the outage page, which must not wait on the database again."""
    if _viewer() is None or request.environ.get(_OUTAGE):
        return None
    return _now()


def _page_url(page: int) -> str:
    """The current list page at another ``page``, keeping its list parameters and nothing else.

    Only :data:`LIST_ARGS` are passed on: any other query argument would reach ``url_for`` as a keyword
    (``_anchor``, ``_external``, ``_scheme``, ``_method`` change the link or make it fail).
    """
    args: dict[str, Any] = {name: value for name, value in request.args.items() if name in LIST_ARGS}
    args["page"] = page
    return url_for(str(request.endpoint), **(request.view_args or {}), **args)


def _json(value: Any, limit: int | None = None) -> str:
    text = json.dumps(value, indent=2, sort_keys=True, default=str, ensure_ascii=False)
    if limit is not None and len(text) > limit:
        return text[:limit] + "\n… (truncated)"
    return text


# Scope labels, links, grouped events and charts ---------------------------------------------------------------

_warn_once = ops.warn_once


def scope_label(scope: str) -> str | None:
    """The app's ``scope_label`` for ``scope`` (:func:`flask_idempotent.operations.scope_label`), asked once
    per scope and request."""
    cache: dict[str, str | None] = request.environ.setdefault("flask_idempotent.scope_labels", {})
    return ops.scope_label(scope, cache)


def _scopes_named(text: str) -> list[str]:
    """The scopes the app's ``scope_search`` finds for ``text`` (a label an operator typed); ``[]`` when it
    is not registered, raises (logged once) or answers something that is not an iterable of strings."""
    find = app_state().callbacks.scope_search
    if find is None:
        return []
    try:
        found = find(text)
        if found is None:
            return []
        if isinstance(found, (str, bytes)):
            raise TypeError("scope_search must return an iterable of scopes, not one string")
        scopes = [scope for scope in list(found)[: ops.MAX_SEARCH_SCOPES] if isinstance(scope, str)]
    except Exception:
        _warn_once("scope_search", "scope_search(%r) failed; searching keys and scopes only", text, exc_info=True)
        return []
    return [scope for scope in scopes if "\x00" not in scope]


_URL_UNSAFE = re.compile(r"[\x00-\x20\x7f\\]")  # control characters, spaces, backslashes


def safe_link(value: Any) -> str | None:
    """``value`` if it may be a link on the dashboard: a relative path (``/payments/7``) or an ``http(s)``
    URL with a host; anything else (``javascript:``, ``data:``, ``//other-host``, whitespace) is ``None``."""
    if not isinstance(value, str) or not value or len(value) > 2048 or _URL_UNSAFE.search(value):
        return None
    if value.startswith("/"):
        return None if value.startswith("//") else value
    scheme, sep, rest = value.partition("://")
    if sep and scheme.lower() in ("http", "https") and rest and not rest.startswith("/"):
        return value
    return None


def location_of(record: dict[str, Any]) -> str | None:
    """The stored response's ``Location`` header, when it is safe to link to."""
    for item in record.get("response_headers") or ():
        if isinstance(item, (list, tuple)) and len(item) == 2 and str(item[0]).lower() == "location":
            return safe_link(item[1])
    return None


def resource_link(record: dict[str, Any]) -> str | None:
    """The app's ``resource_url`` for the record's resource reference, when registered and safe to link to."""
    link = app_state().callbacks.resource_url
    if link is None or record.get("resource_ref") is None:
        return None
    try:
        url = link(record["resource_ref"])
    except Exception:
        _warn_once("resource_url", "resource_url raised for record %s; no link shown", record.get("id"), exc_info=True)
        return None
    return safe_link(url)


def group_events(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Consecutive events of the same kind, actor and detail as one entry: ``count``, ``last`` (newest) and
    ``first`` times; ``event`` is the newest of them. ``events`` are newest first, and so are the groups."""
    groups: list[dict[str, Any]] = []
    for ev in events:
        same = (ev.get("kind"), ev.get("actor"), _json(ev.get("detail")))
        if groups and groups[-1]["same"] == same:
            group = groups[-1]
            group["count"] += 1
            group["first"] = ev.get("created_at")
        else:
            groups.append({"same": same, "event": ev, "count": 1, "last": ev["created_at"], "first": ev["created_at"]})
    return groups


def _event_note(ev: dict[str, Any]) -> str:
    """What an event's detail says, in words (the timeline's second line); control characters escaped."""
    detail = ev.get("detail") or {}
    if not isinstance(detail, dict):
        return json_text(detail)
    kind = ev.get("kind")
    if kind in ("conflict", "in_progress_hit", "stale_hit"):
        note = f"{visible(detail.get('method') or '?')} {visible(detail.get('path') or '?')}"
        if detail.get("summary"):
            note += f" · {visible(detail['summary'])}"
        return note
    if kind == "takeover":
        note = f"attempt {detail.get('attempt', '?')}"
        if detail.get("holder"):
            note += f" by {visible(detail['holder'])}"
        if detail.get("previous_holder"):
            note += f", after the lease of {visible(detail['previous_holder'])} expired"
        return note
    if kind == "checkpoint":
        return f"{visible(detail.get('point') or '?')}, attempt {detail.get('attempt', '?')}"
    if kind in ("mark_retryable", "mark_failed", "acknowledge", "release"):
        was = f"it was {visible(detail.get('from_state', '?'))}"
        if detail.get("from_state") == "FAILED":
            was += " retryable" if detail.get("retryable") else " final"
        parts = [was, f"attempt {detail.get('attempts', '?')}", f"version {detail.get('version', '?')}"]
        if detail.get("recovery_point"):
            parts.append(f"at recovery point {visible(detail['recovery_point'])}")
        if detail.get("lease_holder"):
            parts.append(f"lease held by {visible(detail['lease_holder'])}")
        return ", ".join(parts)
    return json_text(detail)


def timeline(record: dict[str, Any]) -> list[dict[str, Any]]:
    """The record's story, oldest first: the first claim, its events (repeats grouped, in words), the lease's
    expiry when stuck, and where it stands now (attempt, holder, recovery point). Each entry has ``kind``,
    ``title``, ``note``, ``at`` (a time or ``None``), ``count`` and ``actor``."""
    entries: list[dict[str, Any]] = [
        {
            "kind": "claim",
            "title": "first request claimed the key (attempt 1)",
            "note": visible(record.get("summary")) or "",
            "at": record.get("created_at"),
            "count": 1,
            "actor": None,
        }
    ]
    for group in reversed(group_events(record.get("events") or [])):
        ev = group["event"]
        entries.append(
            {
                "kind": ev.get("kind"),
                "title": event_words(str(ev.get("kind"))),
                "note": _event_note(ev),
                "at": group["first"] if group["count"] > 1 else ev.get("created_at"),
                "last": group["last"],
                "count": group["count"],
                "actor": ev.get("actor"),
            }
        )
    entries += _retries(record)
    if record.get("stuck") and record.get("locked_until") is not None:
        entries.append(
            {
                "kind": "lease_expired",
                "title": "the lease ran out without an outcome: stuck",
                "note": "retries answer 409 stuck until an operator decides",
                "at": record["locked_until"],
                "count": 1,
                "actor": None,
            }
        )
    # Oldest first; an entry without a time goes last (before "now"); a retry after the event that allowed it.
    entries.sort(key=lambda entry: (entry["at"] or datetime.max, entry["kind"] == "retry"))
    now = [f"attempt {record.get('attempts')}"]
    if record.get("lease_holder"):
        now.append(f"claimed by {visible(record['lease_holder'])}")
    if record.get("recovery_point"):
        now.append(f"last recovery point {visible(record['recovery_point'])}")
    if record.get("response_status") is not None:
        now.append(f"status {record['response_status']}")
    entries.append(
        {
            "kind": "now",
            "title": f"now: {_state_words(record)}",
            "note": ", ".join(now),
            "at": record.get("updated_at"),
            "count": 1,
            "actor": None,
        }
    )
    return entries


def _retries(record: dict[str, Any]) -> list[dict[str, Any]]:
    """The attempts after the first that no event tells of: a retry is one read and one claim, with no event of
    its own. One right after the operator's *mark retryable* that allowed it (the attempt that action counted
    plus one); the others (retries of retryable failures) as one entry, their times not recorded."""
    attempts = int(record.get("attempts") or 1)
    events = record.get("events") or []
    told = {
        ev["detail"]["attempt"]
        for ev in events
        if ev.get("kind") == "takeover" and isinstance(ev.get("detail"), dict) and "attempt" in ev["detail"]
    }
    added: list[dict[str, Any]] = []
    for ev in events:
        detail = ev.get("detail") or {}
        if ev.get("kind") != "mark_retryable" or not isinstance(detail.get("attempts"), int):
            continue
        attempt = detail["attempts"] + 1
        if attempt <= attempts and attempt not in told:
            told.add(attempt)
            added.append(
                {
                    "kind": "retry",
                    "title": f"attempt {attempt}: the client's retry ran it again",
                    "note": "after the operator's mark retryable (its time is not recorded)",
                    "at": ev.get("created_at"),
                    "count": 1,
                    "actor": None,
                }
            )
    others = [n for n in range(2, attempts + 1) if n not in told]
    if others:
        which = f"attempt {others[0]}" if len(others) == 1 else f"attempts {', '.join(map(str, others))}"
        added.append(
            {
                "kind": "retry",
                "title": f"{which}: retries of a retryable failure",
                "note": "their times are not recorded",
                "at": None,
                "count": 1,
                "actor": None,
            }
        )
    return added


def _state_words(record: dict[str, Any]) -> str:
    state = record.get("state")
    if state == "IN_PROGRESS":
        return "stuck" if record.get("stuck") else "in progress"
    if state == "COMPLETED":
        return "completed"
    if record.get("retryable"):
        return "failed, retryable: the next retry runs it again"
    return "failed, final" + (", acknowledged" if record.get("acknowledged_at") else ", awaiting a decision")


def primary_action(record: dict[str, Any], refused: dict[str, str | None]) -> str | None:
    """The button drawn as the primary one, following the generic runbook: a final failure awaiting a
    decision is acknowledged (it may have had an effect; re-running is a decision the route's runbook must
    support), so *Acknowledge* is primary and *Mark retryable* is not. For a stuck record none is: the route's
    runbook (shown above the buttons) decides between retrying and failing."""
    if record.get("state") == "FAILED" and not record.get("retryable") and not refused.get("acknowledge"):
        return "acknowledge"
    return None


def plural(count: int, noun: str, nouns: str | None = None) -> str:
    """``1 record``, ``2 records`` (``nouns`` for an irregular plural)."""
    return f"{count} {noun if count == 1 else (nouns or noun + 's')}"


#: The overview's charts: (series name, title, what one bar counts).
CHARTS = (
    ("created", "First requests", "first requests (records created)"),
    ("replays", "Replays", "replays (answers from a stored response)"),
    ("conflicts", "Conflicts", "conflicts (key reused with another request)"),
    ("failed", "Failures", "records that failed (FAILED, by last update)"),
)
_BAR, _GAP, _HEIGHT = 7, 2, 40  # 24 bars: four charts and the "Stuck now" card fit one row at 1366 px


def charts(activity: dict[str, Any]) -> list[dict[str, Any]]:
    """The overview's bar charts as geometry for the template's inline SVG (no JavaScript, no inline style)."""
    hours: list[datetime] = activity["hours"]
    result = []
    for name, title, unit in CHARTS:
        series = activity[name]
        counts: list[int] = series["counts"]
        top = max(counts) or 1
        bars = []
        for i, (start, n) in enumerate(zip(hours, counts, strict=True)):
            height = 0 if n == 0 else max(1, round(n * _HEIGHT / top))
            bars.append(
                {
                    "x": i * (_BAR + _GAP),
                    "y": _HEIGHT - height,
                    "width": _BAR,
                    "height": height,
                    "value": n,
                    "hour": start.strftime("%H:00"),
                    "label": f"{start:%H:00}–{start + timedelta(hours=1):%H:00} UTC: {n} {unit}",
                }
            )
        result.append(
            {
                "name": name,
                "title": title,
                "total": sum(counts),
                "capped": series["capped"],
                "max": max(counts),
                "bars": bars,
                "width": len(hours) * (_BAR + _GAP) - _GAP,
                "height": _HEIGHT,
                "first_hour": hours[0].strftime("%H:00") if hours else "",
            }
        )
    return result


@blueprint.app_template_filter("fi_text")
def _fi_text(value: Any, lines: bool = False) -> str:
    """Stored text with every control character visible (``\\x1b``): :func:`flask_idempotent.display.visible`."""
    return visible(value, lines=lines)


@blueprint.context_processor
def _template_helpers() -> dict[str, Any]:
    now = _page_now()
    viewer = _viewer()

    def ago(value: datetime | None) -> str:
        if value is None or now is None:
            return "-"
        seconds = (now - value).total_seconds()
        return f"{human_age(seconds)} ago" if seconds >= 0 else f"in {human_age(seconds)}"

    def when(value: datetime | None) -> str:
        return "-" if value is None else value.strftime("%Y-%m-%d %H:%M:%S UTC")

    can_act = viewer is not None and not viewer.read_only and _actions_enabled()
    return {
        "fi_now": now,
        "fi_viewer": viewer,
        "fi_can_act": can_act,
        "fi_actions_enabled": _actions_enabled(),
        "fi_age": human_age,
        "fi_ago": ago,
        "fi_when": when,
        "fi_json": _json,
        "fi_page_url": _page_url,
        "fi_csrf_field": _csrf_field,
        "fi_csrf_token": _csrf_token,
        "fi_scope_label": scope_label if viewer is not None else (lambda scope: None),
        "fi_location": location_of,
        "fi_resource_link": resource_link,
        "fi_group_events": group_events,
        "fi_timeline": timeline,
        "fi_event_words": event_words,
        "fi_plural": plural,
        "fi_search_labels": app_state().callbacks.scope_search is not None,
        "fi_flash_ok": _FLASH_OK,
        "fi_flash_error": _FLASH_ERROR,
    }


def _render(template: str, code: int = 200, **context: Any) -> ResponseReturnValue:
    return render_template(f"flask_idempotent/{template}", **context), code


def _error_page(exc: HTTPException) -> ResponseReturnValue:
    """Dashboard errors as dashboard pages (4xx); the app's own pages keep the app's handlers."""
    return _render(
        "error.html",
        exc.code or 500,
        status=exc.code,
        title=exc.name,
        message=exc.description,
        record_id=(request.view_args or {}).get("record_id"),
    )


for _code in (400, 403, 404, 409):
    blueprint.register_error_handler(_code, _error_page)


def _outage_page(exc: Exception) -> ResponseReturnValue:
    """The database cannot be reached (or its tables are at an older schema): 503, as a dashboard page."""
    request.environ[_OUTAGE] = True
    logger.error(
        "dashboard %s %s: the database cannot be used: %s", request.method, request.path, dberrors.message(exc)
    )
    if _viewer() is None:  # the access hook itself failed: say nothing about the database
        message = "The dashboard is unavailable. Try again in a moment."
    elif isinstance(exc, SchemaVersionError):
        message = str(exc)
    else:
        message = f"The database cannot be reached: {dberrors.message(exc)}. Try again in a moment."
        if request.method == "POST":
            message += (
                " If your action was applied before the connection failed, sending it again is refused as"
                " changed since you loaded the page."
            )
    return _render(
        "error.html",
        503,
        status=503,
        title="Service Unavailable",
        message=message,
        record_id=(request.view_args or {}).get("record_id"),
    )


for _error in _STORE_ERRORS:
    blueprint.register_error_handler(_error, _outage_page)


# Pages ------------------------------------------------------------------------------------------------------


@blueprint.get("/")
@_exempt
def overview() -> ResponseReturnValue:
    """Counts by state, stuck records, failures awaiting a decision, conflicts in the last 24 h."""
    return _render(
        "overview.html",
        stats=ops.stats(),
        charts=charts(ops.activity()),
        activity_limit=ops.ACTIVITY_LIMIT,
        replay_tally_seconds=ops.replay_tally_seconds(),
        stuck=ops.list_stuck(per_page=5),
        final=ops.list_failed(per_page=5, awaiting=True),
    )


@blueprint.get("/stuck")
@_exempt
def stuck() -> ResponseReturnValue:
    """IN_PROGRESS records whose lease expired, longest stuck first; ``?record_kind=http|task`` filters."""
    record_kind = _record_kind()
    page = ops.list_stuck(request.args.get("page"), request.args.get("per_page"), kind=record_kind)
    return _render("records.html", page=page, title="Stuck requests", kind="stuck", record_kind=record_kind)


_FAILED_FILTERS: dict[str, bool | None] = {"all": None, "awaiting": False, "final": False, "retryable": True}


@blueprint.get("/failed")
@_exempt
def failed() -> ResponseReturnValue:
    """FAILED records, newest first; ``?kind=awaiting`` (final, not acknowledged), ``final`` or ``retryable``."""
    kind = _arg_in("kind", _FAILED_FILTERS, "all")
    record_kind = _record_kind()
    page = ops.list_failed(
        _FAILED_FILTERS[kind],
        request.args.get("page"),
        request.args.get("per_page"),
        awaiting=kind == "awaiting",
        kind=record_kind,
    )
    return _render(
        "records.html", page=page, title="Failed requests", kind="failed", failed_kind=kind, record_kind=record_kind
    )


def _arg_in(name: str, choices: Container[str], default: str) -> str:
    """``?name=`` when it is one of ``choices``; anything else (a hand-edited URL) shows ``default``."""
    value = request.args.get(name, default)
    return value if value in choices else default


def _record_kind() -> str | None:
    """``?record_kind=http|task``; anything else means all kinds."""
    value = request.args.get("record_kind")
    return value if value in ops.KINDS else None


_WINDOWS = {"24h": 24, "7d": 24 * 7, "all": None}


@blueprint.get("/conflicts")
@_exempt
def conflicts() -> ResponseReturnValue:
    """Keys reused with another command: the original request and the conflicting one; ``?window=24h|7d|all``."""
    window = _arg_in("window", _WINDOWS, "all")
    hours = _WINDOWS[window]
    now = _now()
    since = None if hours is None else now - timedelta(hours=hours)
    page = ops.list_conflicts(since, request.args.get("page"), request.args.get("per_page"))
    return _render("conflicts.html", page=page, window=window)


@blueprint.get("/search")
@_exempt
def search() -> ResponseReturnValue:
    """Records whose key or scope is exactly ``?q=``, and those of the scopes ``scope_search`` names for it."""
    query = request.args.get("q", "")
    page_n, per_page = ops.bounds(request.args.get("page"), request.args.get("per_page"))
    scopes: list[str] = []
    if not query:
        page = None
    elif "\x00" in query:  # no key or scope holds NUL (PostgreSQL cannot even compare with it): no match
        page = ops.Page([], 0, page_n, per_page)
    else:
        scopes = _scopes_named(query)
        page = ops.search(query, page_n, per_page, scopes=scopes)
    return _render("search.html", page=page, query=query, scopes=scopes)


def _load(record_id: int, *, body_limit: int | None = 0) -> dict[str, Any]:
    try:
        return ops.get(record_id, body_limit=body_limit)
    except ops.RecordNotFound:
        abort(404, f"There is no idempotency record with id {record_id}; it may have been released or purged.")


@blueprint.get("/records/<int:record_id>")
@_exempt
def record(record_id: int) -> ResponseReturnValue:
    """One record: every field, the lease, the response, the events timeline and the actions."""
    show_bodies = _settings().show_bodies
    data = _load(record_id, body_limit=BODY_LIMIT if show_bodies else 0)
    refused = {action.name.lower(): ops.refusal(action, data) for action in Action}
    return _render(
        "record.html",
        record=data,
        refused=refused,
        primary=primary_action(data, refused),
        show_bodies=show_bodies,
        body_limit=BODY_LIMIT,
        runbook=data["runbook"],
    )


@blueprint.get("/records/<int:record_id>/release")
@_exempt
def confirm_release(record_id: int) -> ResponseReturnValue:
    """The confirmation step before a record is deleted."""
    data = _load(record_id)
    return _render("release.html", record=data, refused=ops.refusal(Action.RELEASE, data))


# Actions ----------------------------------------------------------------------------------------------------


_VERSION = re.compile(r"[0-9]{1,20}")  # ASCII digits only: str.isdigit() also takes "²", which int() refuses


def _act(record_id: int, action: Action) -> dict[str, Any]:
    """Run an operator action for the current viewer; 403, 400, 404 or 409 when it must not run."""
    viewer = _require_operator()
    _check_csrf()
    seen = request.form.get("version", "")
    if not _VERSION.fullmatch(seen):
        abort(400, "The form does not say which version of the record it acts on. Reload the page.")
    try:
        result = ops.act(action, record_id, actor=viewer.name, version=int(seen))
    except ops.RecordNotFound:
        abort(404, f"There is no idempotency record with id {record_id}.")
    except ops.RecordChanged:
        abort(409, "The record changed since you loaded the page. Look at it again, then decide.")
    except ops.TransitionError as exc:
        abort(409, f"Not applied: {exc}.")
    flash(ops.done_message(action, result), _FLASH_OK)
    return result


def _action(record_id: int, action: Action) -> ResponseReturnValue:
    """Run ``action`` (one URL each, below) on the record, then show it again (the overview, once released).

    Release deletes, so it runs only once confirmed (``confirm=release``); without that, its confirmation page.
    """
    if action is Action.RELEASE and request.form.get("confirm") != "release":
        _require_operator()
        _check_csrf()
        return redirect(url_for(".confirm_release", record_id=record_id), 303)
    _act(record_id, action)
    if action is Action.RELEASE:
        return redirect(url_for(".overview"), 303)  # the record is gone: the next request with its key runs as new
    return redirect(url_for(".record", record_id=record_id), 303)


# ``POST /records/<id>/mark-retryable`` (endpoint ``mark_retryable``), ``mark-failed``, ``acknowledge``, ``release``.
_action_view = _exempt(_action)
for _operator_action in Action:
    blueprint.add_url_rule(
        f"/records/<int:record_id>/{_operator_action.value}",
        _operator_action.name.lower(),
        _action_view,
        methods=["POST"],
        defaults={"action": _operator_action},
    )
