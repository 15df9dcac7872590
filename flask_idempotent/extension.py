"""The ``Idempotency`` extension: registration of the request hooks, the CLI group, the dashboard and the
app's callbacks. The hooks themselves are in ``pipeline.py`` (README: "How it works")."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from typing import TYPE_CHECKING, Any, TypeVar

from flask import Flask

from . import pipeline
from .cli import cli
from .constants import DEFAULTS
from .dashboard import init_dashboard
from .state import AppState, Callbacks, app_state, register

if TYPE_CHECKING:
    from flask_sqlalchemy import SQLAlchemy

ScopeLoader = TypeVar("ScopeLoader", bound=Callable[[], Any])
AccessCheck = TypeVar("AccessCheck", bound=Callable[[], Any])


class Idempotency:
    """The Flask extension: protects views marked with :func:`idempotent`.

    ``init_app(app, db)`` registers the request hooks, the ``flask idempotency`` CLI group and the dashboard
    blueprint, and adds the extension's tables to ``db.metadata``.

    ``clock_offset`` (a callable returning seconds or a ``timedelta``) is for tests that need a lease to run
    out: it is added to the database's clock, which decides every lease, expiry and "stuck" (README: "Time").
    """

    def __init__(
        self,
        app: Flask | None = None,
        db: SQLAlchemy | None = None,
        *,
        clock_offset: Callable[[], float | timedelta] | None = None,
    ) -> None:
        self.clock_offset = clock_offset
        self._callbacks = Callbacks()
        if app is not None:
            if db is None:
                raise TypeError("Idempotency(app, db) needs the app's Flask-SQLAlchemy instance")
            self.init_app(app, db)

    def init_app(self, app: Flask, db: SQLAlchemy) -> None:
        """Register the extension on ``app``, storing records through ``db`` (a ``SQLAlchemy`` instance)."""
        if "idempotency" in app.extensions:
            raise RuntimeError("flask_idempotent is already registered on this app")
        for name, value in DEFAULTS.items():
            app.config.setdefault(name, value)
        register(app, AppState(app, db, self._callbacks, self.clock_offset))
        app.extensions["idempotency"] = self
        pipeline.COMMIT_GUARD.install(db)
        app.cli.add_command(cli)
        init_dashboard(app)
        app.before_request(pipeline.before_request)
        app.after_request(pipeline.after_request)
        app.teardown_request(pipeline.teardown_request)

    def scope_loader(self, loader: ScopeLoader) -> ScopeLoader:
        """Register the function that names who owns a key (user, API key, tenant).

        Keys are independent per scope. Without a loader, or when it returns ``None``, all requests share the
        global scope ``""``: register one whenever more than one client can send keys.
        """
        self._callbacks.scope_loader = loader
        return loader

    def dashboard_access(self, check: AccessCheck) -> AccessCheck:
        """Register the dashboard's access check; it returns the actor's name, or something falsy for 403."""
        self._callbacks.dashboard_access = check
        return check

    def state(self, app: Flask | None = None) -> AppState:
        """The per-app state of ``app`` (default: the current app)."""
        return app_state(app)

    def create_all(self) -> None:
        """Create the extension's tables if missing (apps without migrations; needs an app context)."""
        state = app_state()
        state.db.metadata.create_all(state.db.engine, tables=[state.tables.records, state.tables.events])
