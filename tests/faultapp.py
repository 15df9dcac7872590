"""The app the real-process fault tests serve with gunicorn, configured from environment variables.

``gunicorn 'faultapp:create_app()'`` and ``flask --app faultapp:create_app idempotency ...`` both build it from:

- ``FAULTAPP_DATABASE_URL`` (required): the PostgreSQL URL, possibly through the test's TCP proxy;
- ``FAULTAPP_CLOCK_FILE``: a file holding an offset in seconds added to the database's clock. The test moves the
  database's clock as the server (and the CLI) see it by rewriting it, so a lease expires without waiting for it;
- ``FAULTAPP_LEASE`` (seconds, default 30) and ``FAULTAPP_CONNECT_TIMEOUT`` (seconds, default 2);
- ``FAULTAPP_ADVISORY_LOCKS``: ``0`` sets ``IDEMPOTENCY_ADVISORY_LOCKS = False`` (default ``1``);
- ``FAULTAPP_SIGNAL_DIR``: where the app writes crash witnesses and meets held requests (see below);
- ``FAULTAPP_VIEW_WORK_MS``: a slow query in each view, so that duplicates overlap (default 0);
- ``FAULTAPP_LOG_LEVEL``: e.g. ``INFO`` sends the ``flask_idempotent`` logger's records of that level and above
  to stderr (the server's log), so a test can count what the layer logs (lost races); default: Python's own.

Faults are chosen per request by headers, which are not part of the request fingerprint, so a retry without
them is the same command:

- ``X-Fault-Crash: claimed | effect | completed`` kills the worker with SIGKILL right after the claim (before
  the view's effect), right after the effect (before the outcome is stored), or after the outcome is stored and
  the request has ended but before a byte of the response is sent (:class:`CrashAfterCompletion`). Just before
  dying it writes ``<key>.<point>.json`` into the signal dir: what another connection sees in the database at
  that moment.
- ``X-Fault-Hold: effect`` parks the request right after the effect until the test creates ``<key>.effect.go``
  (it announces itself with ``<key>.effect.held``), so the test can cut the database away mid-request.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from flask import Blueprint, Flask, Response, abort, jsonify, request
from flask.views import MethodView
from flask_sqlalchemy import SQLAlchemy
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from flask_idempotent import Idempotency, current_record, idempotent

CRASH_HEADER = "X-Fault-Crash"
HOLD_HEADER = "X-Fault-Hold"
CRASH_POINTS = ("claimed", "effect", "completed")
HOLD_TIMEOUT = 30.0


def file_clock(path: str) -> Callable[[], float]:
    """The offset in seconds written in ``path``: added to the database's clock, which decides leases."""

    def offset() -> float:
        try:
            return float(Path(path).read_text() or 0)
        except FileNotFoundError:
            return 0.0

    return offset


def engine_options(connect_timeout: float) -> dict[str, Any]:
    """Detect a lost database fast: ping pooled connections, bound new connections' handshakes."""
    return {"pool_pre_ping": True, "connect_args": {"connect_timeout": max(1, int(connect_timeout))}}


def create_app(env: Mapping[str, str] | None = None) -> Flask:
    """Build the fault app from ``env`` (default: the process environment)."""
    env = os.environ if env is None else env
    signal_dir = Path(env["FAULTAPP_SIGNAL_DIR"]) if env.get("FAULTAPP_SIGNAL_DIR") else None
    work_seconds = float(env.get("FAULTAPP_VIEW_WORK_MS", "0")) / 1000
    if env.get("FAULTAPP_LOG_LEVEL"):
        layer = logging.getLogger("flask_idempotent")
        layer.setLevel(env["FAULTAPP_LOG_LEVEL"])
        if not layer.handlers:
            handler = logging.StreamHandler()
            handler.setFormatter(logging.Formatter("[%(process)d] %(levelname)s %(name)s: %(message)s"))
            layer.addHandler(handler)

    app = Flask(__name__)
    app.config.update(
        SQLALCHEMY_DATABASE_URI=env["FAULTAPP_DATABASE_URL"],
        SQLALCHEMY_ENGINE_OPTIONS=engine_options(float(env.get("FAULTAPP_CONNECT_TIMEOUT", "2"))),
        IDEMPOTENCY_LEASE=float(env.get("FAULTAPP_LEASE", "30")),
        IDEMPOTENCY_ADVISORY_LOCKS=env.get("FAULTAPP_ADVISORY_LOCKS", "1") == "1",
        IDEMPOTENCY_REPLAY_TALLY_SECONDS=float(env.get("FAULTAPP_REPLAY_TALLY_SECONDS", "60")),
    )

    class Base(DeclarativeBase):
        pass

    db = SQLAlchemy(model_class=Base)

    class Effect(db.Model):  # type: ignore[name-defined,misc]
        """One row per execution of a view body: the side effect the layer must not repeat."""

        __tablename__ = "fault_effects"
        id: Mapped[int] = mapped_column(primary_key=True)
        key: Mapped[str] = mapped_column(sa.String(255), index=True)
        route: Mapped[str] = mapped_column(sa.String(32))
        amount: Mapped[int]
        attempt: Mapped[int]
        pid: Mapped[int]

    db.init_app(app)
    clock = file_clock(env["FAULTAPP_CLOCK_FILE"]) if env.get("FAULTAPP_CLOCK_FILE") else None
    idempotency = Idempotency(clock_offset=clock)
    idempotency.init_app(app, db)
    app.extensions["faultapp"] = {"db": db, "Effect": Effect, "idempotency": idempotency}

    def witness(key: str, point: str) -> None:
        """Write what a separate connection sees right now, then let the caller die."""
        if signal_dir is None:
            return
        with app.app_context(), db.engine.connect() as conn:  # also called after the app context ended
            state = snapshot(conn, key)
        tmp = signal_dir / f"{key}.{point}.tmp"
        tmp.write_text(json.dumps(state, default=str))
        tmp.replace(signal_dir / f"{key}.{point}.json")

    def fault(point: str) -> None:
        key = current_record.key
        if request.headers.get(CRASH_HEADER) == point:
            witness(key, point)
            os.kill(os.getpid(), signal.SIGKILL)
        if request.headers.get(HOLD_HEADER) == point and signal_dir is not None:
            (signal_dir / f"{key}.{point}.held").touch()
            go = signal_dir / f"{key}.{point}.go"
            deadline = time.monotonic() + HOLD_TIMEOUT
            while not go.exists():  # bounded: a test that never releases gets its request back anyway
                if time.monotonic() > deadline:
                    break
                time.sleep(0.01)

    def effect(route: str) -> Any:
        fault("claimed")
        if work_seconds:
            db.session.execute(sa.text("SELECT pg_sleep(:s)"), {"s": work_seconds})
        body = request.get_json(silent=True) or {}
        row = Effect(
            key=current_record.key,
            route=route,
            amount=int(body.get("amount", 0)),
            attempt=current_record.attempt,
            pid=os.getpid(),
        )
        db.session.add(row)
        return row

    def created(row: Any) -> Any:
        response = jsonify(
            effect=row.id,
            key=row.key,
            route=row.route,
            amount=row.amount,
            attempt=row.attempt,
            pid=row.pid,
            nonce=uuid.uuid4().hex,  # two executions never answer the same bytes
        )
        response.status_code = 201
        response.headers["Location"] = f"/effects/{row.id}"
        return response

    @app.get("/health")
    def health() -> Any:
        return jsonify(pid=os.getpid())

    def pay(route: str) -> Any:
        row = effect(route)
        db.session.flush()
        response = created(row)
        # Leased mode: the effect is durable before the outcome is. After the commit the session holds no
        # connection, so a fault that cuts the database away does not reach the view's own session.
        db.session.commit()
        fault("effect")
        return response

    @app.post("/payments")
    @idempotent
    def payment() -> Any:
        return pay("payments")

    class ClassPayments(MethodView):
        """``/payments`` as a class-based view: ``@idempotent`` on its ``post``."""

        @idempotent
        def post(self) -> Any:
            return pay("class-payments")

    class ClassTransfers(MethodView):
        """``/transfers`` as a class-based view: ``@idempotent(atomic=True)`` in its ``decorators``."""

        decorators = [idempotent(atomic=True)]

        def post(self) -> Any:
            row = effect("class-transfers")
            db.session.flush()
            return created(row)

    app.add_url_rule("/class-payments", view_func=ClassPayments.as_view("class_payments"))
    app.add_url_rule("/class-transfers", view_func=ClassTransfers.as_view("class_transfers"))

    guarded = Blueprint("guarded", __name__, url_prefix="/guarded")

    @guarded.before_request
    def authenticate() -> None:  # a blueprint's hook: it runs after the layer's claim
        if request.headers.get("X-Auth") != "ok":
            abort(401)

    @guarded.post("/payments")
    @idempotent
    def guarded_payment() -> Any:
        return pay("guarded-payments")

    app.register_blueprint(guarded)

    @app.post("/stream")
    @idempotent
    def stream() -> Any:
        """``chunks`` kB of text, streamed; with ``X-Break`` the stream raises after 2 kB."""
        row = effect("stream")
        db.session.commit()
        count, breaks = int(request.get_json()["chunks"]), bool(request.headers.get("X-Break"))
        row_id = row.id

        def body() -> Any:
            for i in range(count):
                if breaks and i == 2:
                    raise RuntimeError("the upstream stream broke")
                yield f"{row_id}:{i:06d}|".ljust(1000, ".").encode()

        return Response(body(), 201, mimetype="text/plain")

    @app.post("/payments-rereading")
    @idempotent
    def payment_rereading() -> Any:
        """``/payments`` whose view reads its effect back after the commit, so its session holds a connection
        while the request is parked: a cut then reaches the view's own session too."""
        row = effect("payments-rereading")
        db.session.commit()
        db.session.refresh(row)
        response = created(row)
        fault("effect")
        return response

    @app.post("/takeover-payments")
    @idempotent(on_stale="takeover")
    def takeover_payment() -> Any:
        """``/payments`` with ``on_stale="takeover"``: a request finding the lease over takes it and runs again."""
        return pay("takeover-payments")

    @app.post("/transfers")
    @idempotent(atomic=True)
    def transfer() -> Any:
        row = effect("transfers")
        db.session.flush()  # atomic mode: written, committed only with the outcome
        response = created(row)
        fault("effect")
        return response

    @app.post("/webhooks/sender")
    @idempotent(key=lambda: request.headers.get("X-Delivery"), scope="sender")
    def webhook_sender() -> Any:
        """A webhook receiver: the sender's delivery id is the key, in the fixed scope ``sender``."""
        return pay("webhooks-sender")

    app.wsgi_app = CrashAfterCompletion(app.wsgi_app, witness)  # type: ignore[method-assign]
    return app


class CrashAfterCompletion:
    """WSGI middleware: with ``X-Fault-Crash: completed``, die after Flask has finished the request.

    Flask's ``wsgi_app`` returns only after every ``after_request`` hook (where the extension stores the outcome)
    and every teardown ran; gunicorn has not sent anything yet. An ``after_request`` hook would not do: Flask
    runs them in reverse registration order, so one registered after ``init_app`` runs *before* the extension's.
    """

    def __init__(self, wsgi_app: Callable[..., Iterable[bytes]], witness: Callable[[str, str], None]) -> None:
        self.wsgi_app = wsgi_app
        self.witness = witness

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        if environ.get("HTTP_X_FAULT_CRASH") != "completed":
            return self.wsgi_app(environ, start_response)
        self.wsgi_app(environ, lambda *args: None)  # the response is never started
        key = environ.get("HTTP_IDEMPOTENCY_KEY", "")
        self.witness(key, "completed")
        os.kill(os.getpid(), signal.SIGKILL)
        raise AssertionError("unreachable: the worker was killed")


# What the tests read back (plain SQL, independent of the app) ------------------------------------------------


def snapshot(conn: sa.Connection, key: str, scope: str = "") -> dict[str, Any]:
    """The record of ``key`` (or ``None``) and the effects written under it, as one connection sees them."""
    row = conn.execute(
        sa.text(
            "SELECT id, state, retryable, attempts, locked_until, response_status, response_body"
            " FROM idempotency_records WHERE scope = :scope AND key = :key"
        ),
        {"scope": scope, "key": key},
    ).first()
    effects = conn.execute(sa.text("SELECT id FROM fault_effects WHERE key = :key ORDER BY id"), {"key": key}).all()
    record = None
    if row is not None:
        record = dict(row._mapping)
        body = record.pop("response_body")
        record["response_body"] = None if body is None else bytes(body).decode()
    return {"record": record, "effects": [e.id for e in effects]}


def _tables(url: str, action: Callable[[sa.MetaData, sa.Engine], None]) -> None:
    app = create_app({"FAULTAPP_DATABASE_URL": url})
    metadata = app.extensions["faultapp"]["db"].metadata
    # Bounded: a table lock left by a killed worker's session must fail the test, not hang it.
    engine = sa.create_engine(url, connect_args={"options": "-c lock_timeout=10000"})
    try:
        action(metadata, engine)
    finally:
        engine.dispose()


def reset_database(url: str) -> None:
    """Drop and create the fault app's tables (its effects and the extension's two tables)."""

    def reset(metadata: sa.MetaData, engine: sa.Engine) -> None:
        metadata.drop_all(engine)
        metadata.create_all(engine)

    _tables(url, reset)


def drop_tables(url: str) -> None:
    """Drop the fault app's tables, leaving the shared test database as the other tests expect it."""
    _tables(url, lambda metadata, engine: metadata.drop_all(engine))
