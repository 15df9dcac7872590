"""Configuration: defaults, then ``FLASK_*`` variables, then the plain variables below, then ``create_app(config)``.

Environment variables:

- ``DATABASE_URL``: SQLAlchemy URL. Default: ``sqlite:///<instance folder>/example.db``. ``postgres://`` and
  ``postgresql://`` (what hosting platforms hand out) are mapped to ``postgresql+psycopg2://``.
- ``SECRET_KEY``: signs the operator's session. Required outside debug/testing; random per process in debug.
- ``OPERATOR_USERNAME`` (default ``operator``), ``OPERATOR_PASSWORD``: the dashboard login. Outside debug and
  testing the app refuses to start without a password. In debug mode, without one, the documented
  development password :data:`DEV_OPERATOR_PASSWORD` is used and a warning says so.
- Any ``FLASK_<KEY>`` sets config ``<KEY>`` (Flask's ``from_prefixed_env``, values parsed as JSON), e.g.
  ``FLASK_IDEMPOTENCY_LEASE=10`` for a 10 s lease, ``FLASK_PROVIDER_SIMULATION=true``.
- ``FLASK_LOG_LEVEL`` (default ``INFO``): the log level; ``DEBUG`` adds tracebacks to failures (see ``logs.py``).
- ``FLASK_PROVIDER_HANG_DIR``: where the simulated provider's ``hang`` calls wait for ``POST /provider/release``
  (default: ``<instance folder>/provider-hang``); every worker of one server must share it (see ``provider.py``).
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Mapping
from typing import Any

from flask import Flask

from .logs import configure_logging

DEV_OPERATOR_USERNAME = "operator"
#: Used only in debug mode when ``OPERATOR_PASSWORD`` is unset; never in production mode.
DEV_OPERATOR_PASSWORD = "dev-password"

_PLAIN_ENV = ("DATABASE_URL", "SECRET_KEY", "OPERATOR_USERNAME", "OPERATOR_PASSWORD", "PROVIDER_WEBHOOK_SECRET")


class ConfigurationError(RuntimeError):
    """The app refuses to start: a setting production needs is missing."""


def normalize_database_url(url: str) -> str:
    """Map ``postgres://`` and ``postgresql://`` to the psycopg2 driver the example installs with."""
    for prefix in ("postgres://", "postgresql://"):
        if url.startswith(prefix):
            return "postgresql+psycopg2://" + url[len(prefix) :]
    return url


def configure(app: Flask, overrides: Mapping[str, Any] | None) -> None:
    """Load the configuration into ``app.config``; raise :class:`ConfigurationError` if production lacks a secret."""
    config = app.config
    config.from_mapping(
        OPERATOR_USERNAME=DEV_OPERATOR_USERNAME,
        OPERATOR_PASSWORD=None,
        LOG_LEVEL="INFO",
        PROVIDER_HANG_TIMEOUT=300.0,
        PROVIDER_HANG_DIR=None,
        PROVIDER_WEBHOOK_SECRET=None,
        SESSION_COOKIE_SAMESITE="Lax",
        SESSION_COOKIE_SECURE=None,  # decided below, unless set (Flask's own default is False)
    )
    config.from_prefixed_env()
    for name in _PLAIN_ENV:
        if os.environ.get(name):
            config[name] = os.environ[name]
    config.update(overrides or {})
    configure_logging(app)  # first: the warnings below are logged in its format
    development = app.debug or app.testing

    if "SQLALCHEMY_DATABASE_URI" not in config:
        url = config.get("DATABASE_URL")
        if not url:
            os.makedirs(app.instance_path, exist_ok=True)
            url = "sqlite:///" + os.path.join(app.instance_path, "example.db")
        config["SQLALCHEMY_DATABASE_URI"] = normalize_database_url(str(url))
    if not str(config["SQLALCHEMY_DATABASE_URI"]).startswith("sqlite"):
        # Workers outlive database restarts and failovers: test a pooled connection before using it.
        config.setdefault("SQLALCHEMY_ENGINE_OPTIONS", {"pool_pre_ping": True})

    if not config.get("SECRET_KEY"):
        if not development:
            raise ConfigurationError("SECRET_KEY is not set: it signs the operator's session. Set SECRET_KEY.")
        config["SECRET_KEY"] = secrets.token_hex(32)  # sessions last until the process restarts
    if not config.get("OPERATOR_PASSWORD"):
        if app.debug:
            config["OPERATOR_PASSWORD"] = DEV_OPERATOR_PASSWORD
            _announce_dev_login(app)
        elif not app.testing:
            raise ConfigurationError(
                "OPERATOR_PASSWORD is not set: the dashboard can release and re-run payments, so production mode"
                " refuses to start without a password. Set OPERATOR_PASSWORD (and OPERATOR_USERNAME)."
            )
    config.setdefault("PROVIDER_SIMULATION", development)
    if config["SESSION_COOKIE_SECURE"] is None:
        config["SESSION_COOKIE_SECURE"] = not development  # production is served over HTTPS


def _announce_dev_login(app: Flask) -> None:
    """Say the development login once, with the first request the app serves: not on every ``flask`` command
    (``flask idempotency stuck`` has no dashboard to log in to, and its stderr is for its own errors)."""
    said: list[bool] = []

    @app.before_request
    def announce() -> None:
        if not said:
            said.append(True)
            app.logger.warning(
                "Operator login for the dashboard: %s / %s (the development default; set OPERATOR_PASSWORD).",
                app.config["OPERATOR_USERNAME"],
                DEV_OPERATOR_PASSWORD,
            )
