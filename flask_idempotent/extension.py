"""The ``Idempotency`` extension: registration of the request hooks, the CLI group, the dashboard and the
app's callbacks. The hooks themselves are in ``pipeline.py`` (docs: "Behaviour")."""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, TypeVar

from flask import Flask, current_app, has_app_context

from . import openapi, outbox_cli, outbox_dashboard, pipeline  # noqa: F401 - outbox_*: add the commands and page
from .binds import WRITE_BINDS
from .cli import cli
from .constants import DEFAULTS, ConfigKey
from .dashboard import init_dashboard
from .errors import check_docs_url
from .outbox import Outbox
from .state import AppState, Callbacks, app_state, register
from .tasks import Operation, command_of, run_once, task_decorator

if TYPE_CHECKING:
    from flask_sqlalchemy import SQLAlchemy

ScopeLoader = TypeVar("ScopeLoader", bound=Callable[[], Any])
AccessCheck = TypeVar("AccessCheck", bound=Callable[[], Any])
Labeler = TypeVar("Labeler", bound=Callable[[str], Any])
Finder = TypeVar("Finder", bound=Callable[[str], Any])
Linker = TypeVar("Linker", bound=Callable[[Any], Any])
Handler = TypeVar("Handler", bound=Callable[..., Any])


class Idempotency:
    """The Flask extension: protects views marked with :func:`idempotent`.

    ``init_app(app, db)`` registers the request hooks, the ``flask idempotency`` CLI group and the dashboard
    blueprint, and adds the extension's tables to the metadata of the records' bind (``db.metadata`` by default).

    ``clock_offset`` (a callable returning seconds or a ``timedelta``) is for tests that need a lease to run
    out: it is added to the database's clock, which decides every lease, expiry and "stuck"
    (docs: "Time: the database's clock decides").
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
        self._apps: weakref.WeakSet[Flask] = weakref.WeakSet()
        #: The outbox's handlers and its operator functions (``jobs``, ``show``, ``stats``, ``act``).
        self.outbox = Outbox()
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
        check_docs_url(app.config[ConfigKey.DOCS_URL])
        self.outbox.check_config(app.config)
        register(app, AppState(app, db, self._callbacks, self.clock_offset))
        self._apps.add(app)
        app.extensions["idempotency"] = self
        pipeline.COMMIT_GUARD.install(db)
        WRITE_BINDS.install(db)
        self.outbox.install(db)
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

    def scope_label(self, label: Labeler) -> Labeler:
        """Register the function that names a scope for people on the dashboard (``"alice"`` for ``"1"``).

        It takes the stored scope string and returns a ``str`` (or ``None``: no label). It runs once per scope
        per page; keep it cheap. If it raises or returns anything else, the page shows the raw scope and the
        problem is logged once per process.
        """
        self._callbacks.scope_label = label
        return label

    def scope_search(self, find: Finder) -> Finder:
        """Register the reverse of :meth:`scope_label` for the dashboard's search: text → the scopes it names.

        It takes what the operator typed (``"alice"``) and returns an iterable of scope strings (``["1"]``);
        the search then also lists the records of those scopes (the first 50 scopes are used).
        """
        self._callbacks.scope_search = find
        return find

    def resource_url(self, link: Linker) -> Linker:
        """Register the function mapping a record's resource reference (its ``resource_ref`` JSON) to a URL.

        The record page links to it when it is a relative path (``/payments/7``) or an ``http(s)`` URL;
        anything else (``javascript:``...) or ``None`` shows no link.
        """
        self._callbacks.resource_url = link
        return link

    def state(self, app: Flask | None = None) -> AppState:
        """The per-app state of ``app`` (default: the current app)."""
        return app_state(app)

    def openapi(self, app: Flask | None = None) -> dict[str, Any]:
        """The OpenAPI 3.1 ``paths`` and ``components`` for the routes this layer protects on ``app`` (default:
        the current app), to merge into the app's own document (docs/publishing.md).

        Each protected operation gets the ``Idempotency-Key`` header parameter, the problem responses the layer
        can answer (400, 409 or 202, 413, 422, 503, ...) with their ``type`` URIs, and an ``x-idempotency`` field
        with its ``mode``, ``required``, ``ttl`` and ``lease`` (seconds). ``openapi.merge(document, fragment)``
        folds it into an existing document.
        """
        return openapi.fragment(app or current_app._get_current_object())  # type: ignore[attr-defined]

    # Beyond views ------------------------------------------------------------------------------------------

    def _bound(self) -> tuple[AppState, Callable[[], contextlib.AbstractContextManager[Any]]]:
        """The app to work in: the current one, else the one app this extension was registered on."""
        if has_app_context() and current_app._get_current_object() in self._apps:  # type: ignore[attr-defined]
            return app_state(), contextlib.nullcontext
        apps = list(self._apps)
        if len(apps) != 1:
            raise RuntimeError(
                "an idempotent task called outside an app context needs the extension registered on exactly one"
                f" app (it is on {len(apps)}); call it inside `with app.app_context():`"
            )
        return app_state(apps[0]), apps[0].app_context

    def task(
        self,
        *,
        key: Callable[..., str],
        scope: str = "",
        lease: float | timedelta | None = None,
        ttl: float | timedelta | None = None,
        transient: tuple[type[BaseException], ...] = (),
        name: str | None = None,
        bind: bool = False,
    ) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        """Make a function (a Celery task's body, say) run at most once per key.

        docs: "Tasks and other code paths".

        ``key`` computes the key from the call's arguments; the arguments (JSON) are the command, so the same
        key with other arguments raises ``KeyReused``; the return value (JSON) is stored and returned to a
        redelivered or repeated call, and to the first call too as JSON gives it back. Celery's own retries
        (``self.retry()``, the task's ``autoretry_for``) leave the record retryable. Outside an app context it
        pushes the context of the app it was registered on. Place it below ``@celery.task``; with Celery's
        ``bind=True`` pass ``bind=True`` here too: the task object (``self``) is then handed to the function but
        is neither part of the key nor of the command.
        """
        return task_decorator(
            self._bound,
            key=key,
            scope=scope,
            lease=_seconds(lease),
            ttl=_seconds(ttl),
            transient=transient,
            name=name,
            bind=bind,
        )

    @contextlib.contextmanager
    def once(
        self,
        scope: str,
        key: str,
        *,
        command: Any = None,
        name: str = "once",
        lease: float | timedelta | None = None,
        ttl: float | timedelta | None = None,
        transient: tuple[type[BaseException], ...] = (),
    ) -> Iterator[Operation]:
        """Run a block at most once per ``(scope, key)`` (docs: "Tasks and other code paths")::

            with idempotency.once("refunds", refund_id, command=payload) as op:
                if op.done:
                    return op.result
                op.complete(do_refund())

        ``command`` (JSON) is what the key stands for: the same key with another command raises ``KeyReused``.
        """
        state, app_context = self._bound()
        with (
            app_context(),
            run_once(
                state,
                scope=scope,
                key=key,
                command=command_of(name, {"command": command}),
                name=name,
                lease=_seconds(lease),
                ttl=_seconds(ttl),
                transient=transient,
            ) as operation,
        ):
            yield operation

    # The outbox -------------------------------------------------------------------------------------------

    def stage(
        self,
        target: Any,
        *args: Any,
        countdown: float | None = None,
        eta: datetime | None = None,
        ordered: bool = False,
        **kwargs: Any,
    ) -> str:
        """Stage a job in ``db.session``'s transaction; it is handed on after that transaction commits.

        docs: "The outbox". ``target`` is a Celery task (anything with ``name`` and ``apply_async``), a function
        registered with :meth:`handler`, or a handler's name; ``args`` and ``kwargs`` are JSON. Anything else is
        a ``TypeError`` here, at the call, and nothing is staged. A rolled-back transaction stages nothing.
        ``countdown`` (seconds, by the database's clock) or ``eta`` (a datetime; naive means UTC) delay it;
        ``ordered=True``: the scope's ordered jobs are delivered in staging order. The scope is the protected
        request's (``current_record.scope``), else ``""``. Returns the job's key (``outbox:<uuid>``), which its
        delivery carries: the Celery task id, or the ``once()`` key a handler runs under.
        """
        return self.outbox.stage(target, args, kwargs, countdown=countdown, eta=eta, ordered=ordered)

    def handler(self, name: str) -> Callable[[Handler], Handler]:
        """Register an outbox handler: work that is not a Celery task, staged with ``stage(func, ...)`` or
        ``stage("name", ...)``. Each delivery runs it under ``once(scope, job key)``: a job delivered twice runs it
        once. A handler that raises is a failed delivery (retried with backoff, then dead)."""
        return self.outbox.handler(name)

    def drain(self, *, limit: int = 100, max_batches: int | None = None) -> dict[str, int]:
        """Deliver the outbox's due jobs (for a periodic task; ``flask idempotency drain`` on the command line).

        Jobs are taken under leases, ``limit`` per batch (``FOR UPDATE SKIP LOCKED`` on PostgreSQL and MariaDB:
        drainers on several hosts never take one job; SQLite: one drainer), until a batch comes back short or
        after ``max_batches``. Returns the counts ``delivered``, ``failed`` (retried later, with backoff) and
        ``dead`` (``IDEMPOTENCY_OUTBOX_MAX_ATTEMPTS`` reached). Outside an app context it pushes the context of
        the app it was registered on.
        """
        _, app_context = self._bound()
        with app_context():
            return self.outbox.drain(limit=limit, max_batches=max_batches)

    def create_all(self) -> None:
        """Create the extension's tables if missing, on the records' bind (apps without migrations; needs an app
        context)."""
        state = app_state()
        tables = [state.tables.records, state.tables.events, state.tables.outbox]
        state.tables.records.metadata.create_all(state.records_engine, tables=tables)


def _seconds(value: float | timedelta | None) -> float | None:
    return value.total_seconds() if isinstance(value, timedelta) else value
