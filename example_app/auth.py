"""Who is calling: API clients by bearer token (their user id is the idempotency scope), operators by session.

API tokens map to users. The user id is the scope of every idempotency key, so two clients can never see or
collide with each other's keys. Operators log in with the credentials from ``OPERATOR_USERNAME`` and
``OPERATOR_PASSWORD``; the dashboard's access hook returns the logged-in operator's name, which the dashboard
writes into the audit trail of every action.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from urllib.parse import urlsplit

from flask import Blueprint, abort, current_app, g, redirect, render_template, request, session, url_for
from flask.typing import ResponseReturnValue

from .extensions import db, idempotency
from .models import ApiToken, User, hash_token
from .problems import abort_problem
from .provider import SIMULATE_HEADER, SIMULATIONS

_OPERATOR = "operator"
_OPERATOR_TAG = "operator_tag"
_CSRF = "example_csrf"

operator = Blueprint("operator", __name__)


# API clients ------------------------------------------------------------------------------------------------


def current_user() -> User | None:
    """The user of the request's ``Authorization: Bearer`` token, looked up once per request."""
    if "api_user" not in g:
        g.api_user = _authenticate()
    user: User | None = g.api_user
    return user


def _authenticate() -> User | None:
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        return None
    found = db.session.get(ApiToken, hash_token(token))
    return None if found is None else db.session.get(User, found.user_id)


def require_user() -> User:
    """The calling user; 401 without a valid token."""
    user = current_user()
    if user is None:
        abort_problem(
            401,
            "unauthorized",
            "Authentication required",
            "Send an API token: Authorization: Bearer <token>.",
            headers={"WWW-Authenticate": 'Bearer realm="example_app"'},
        )
    return user


def authenticate_api() -> None:
    """App-level ``before_request`` hook, registered before ``idempotency.init_app``.

    Flask runs app-level hooks in registration order, so an unauthenticated request or an unknown switch is
    answered here, before the idempotency layer claims the key: a rejected request leaves no record.
    """
    if request.blueprint != "api":
        return
    require_user()
    simulate = request.headers.get(SIMULATE_HEADER)
    if simulate is None:
        return
    if not current_app.config["PROVIDER_SIMULATION"]:
        abort_problem(400, "simulation-disabled", "Simulation is off", "PROVIDER_SIMULATION is off in this app.")
    if simulate not in SIMULATIONS:
        abort_problem(
            400,
            "unknown-simulation",
            "Unknown simulation",
            f"{SIMULATE_HEADER} must be one of {', '.join(SIMULATIONS)}.",
        )


@idempotency.scope_loader
def load_scope() -> str:
    """Every key belongs to the calling user: the same key from two users names two records."""
    return str(require_user().id)


@idempotency.scope_label
def scope_name(scope: str) -> str | None:
    """The dashboard shows the user's name next to the scope (their id)."""
    user = db.session.get(User, int(scope)) if scope.isdigit() else None
    return None if user is None else user.name


@idempotency.scope_search
def scopes_named(text: str) -> list[str]:
    """The dashboard's search finds a user's records by name."""
    return [str(user.id) for user in db.session.query(User).filter(User.name == text).limit(50)]


# Operators --------------------------------------------------------------------------------------------------


def _credential_tag() -> str:
    """Ties a login session to the configured credentials: changing the password logs everyone out."""
    config = current_app.config
    material = f"{config['OPERATOR_USERNAME']}\0{config.get('OPERATOR_PASSWORD') or ''}".encode()
    return hmac.new(str(current_app.secret_key).encode(), material, hashlib.sha256).hexdigest()[:32]


def operator_name() -> str | None:
    """The logged-in operator's name, or ``None``."""
    name = session.get(_OPERATOR)
    tag = session.get(_OPERATOR_TAG)
    if not (isinstance(name, str) and isinstance(tag, str) and current_app.config.get("OPERATOR_PASSWORD")):
        return None
    if not hmac.compare_digest(tag, _credential_tag()):
        return None
    return name


@idempotency.dashboard_access
def dashboard_operator() -> str | None:
    """The dashboard's access hook: the operator's name (audited with each action); browsers go to the login."""
    name = operator_name()
    if name is None and request.method == "GET":
        abort(redirect(url_for("operator.login", next=_here())))
    return name


def _here() -> str:
    return request.full_path.rstrip("?")


def _safe_next(target: str | None) -> str:
    """Only redirect to a path of this site after login (never to another host)."""
    if target:
        parts = urlsplit(target)
        if not parts.scheme and not parts.netloc and target.startswith("/") and "\\" not in target:
            return target
    return url_for("idempotency_dashboard.overview")


def _csrf_token() -> str:
    token = session.get(_CSRF)
    if not isinstance(token, str):
        token = secrets.token_urlsafe(32)
        session[_CSRF] = token
    return token


def _check_csrf() -> None:
    expected = session.get(_CSRF)
    sent = request.form.get("csrf_token", "")
    if not (isinstance(expected, str) and hmac.compare_digest(sent.encode(), expected.encode())):
        abort(400, "The form's CSRF token is missing or wrong. Reload the page and try again.")


@operator.route("/login", methods=["GET", "POST"])
def login() -> ResponseReturnValue:
    """The operator login form; on success, on to ``next`` (the dashboard by default)."""
    next_url = request.values.get("next")
    if request.method == "GET":
        return render_template("example_app/login.html", csrf_token=_csrf_token(), next=next_url, error=None)
    _check_csrf()
    config = current_app.config
    password = config.get("OPERATOR_PASSWORD") or ""
    username_ok = hmac.compare_digest(request.form.get("username", "").encode(), config["OPERATOR_USERNAME"].encode())
    password_ok = hmac.compare_digest(request.form.get("password", "").encode(), password.encode())
    if not (password and username_ok and password_ok):
        error = "Wrong username or password." if password else "Operator login is off: OPERATOR_PASSWORD is not set."
        return render_template("example_app/login.html", csrf_token=_csrf_token(), next=next_url, error=error), 401
    session.clear()  # a fresh session at login: no fixation
    session[_OPERATOR] = config["OPERATOR_USERNAME"]
    session[_OPERATOR_TAG] = _credential_tag()
    return redirect(_safe_next(next_url), 303)


@operator.post("/logout")
def logout() -> ResponseReturnValue:
    _check_csrf()
    session.clear()
    return redirect(url_for("pages.index"), 303)


@operator.app_context_processor
def _operator_context() -> dict[str, object]:
    return {"operator_name": operator_name, "csrf_token_value": _csrf_token}
