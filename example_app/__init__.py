"""flask_idempotent's example: a small payments API whose every request is safe to retry.

``flask --app example_app run`` starts it (see the README for the walk-through). ``POST /payments`` calls a
simulated payment provider in leased mode; ``POST /transfers`` moves money between ledger accounts in atomic
mode; the dashboard at ``/idempotency`` sits behind an operator login.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from flask import Flask

from .api import api
from .auth import authenticate_api, operator
from .cli import add_user_command, init_db_command
from .config import ConfigurationError, configure, normalize_database_url
from .extensions import db, idempotency, migrate
from .metrics import init_metrics_endpoint
from .pages import pages
from .provider import init_provider
from .webhooks import webhooks

__all__ = ["ConfigurationError", "MIGRATIONS_DIR", "create_app", "db", "idempotency", "normalize_database_url"]

#: The app's Alembic migrations; they create the extension's tables together with the app's own.
MIGRATIONS_DIR = str(Path(__file__).resolve().parent / "migrations")


def create_app(config: Mapping[str, Any] | None = None) -> Flask:
    """Build the app; ``config`` wins over the environment (see ``config.py``)."""
    app = Flask(__name__, instance_relative_config=True)
    configure(app, config)
    db.init_app(app)
    # Batch mode: SQLite cannot ALTER most things, so migrations copy and swap the table there.
    migrate.init_app(app, db, directory=MIGRATIONS_DIR, render_as_batch=True)
    init_provider(app)
    # Before init_app on purpose: Flask runs app-level hooks in order, so authentication answers 401 before
    # the idempotency layer claims a key (see auth.authenticate_api).
    app.before_request(authenticate_api)
    idempotency.init_app(app, db)
    app.register_blueprint(pages)
    app.register_blueprint(api)
    app.register_blueprint(webhooks)
    app.register_blueprint(operator)
    init_metrics_endpoint(app)
    app.cli.add_command(init_db_command)
    app.cli.add_command(add_user_command)
    return app
