"""The app the outbox's process tests serve, drain and consume, configured from environment variables.

``gunicorn 'outboxapp:wsgi()'`` serves it, ``flask --app outboxapp:flask_app idempotency drain`` drains it and
``celery -A outboxapp worker`` consumes its Celery jobs. All three build it (on first use) from:

- ``OUTBOXAPP_DATABASE_URL`` (required): the records, the outbox, the orders and the effects;
- ``OUTBOXAPP_BROKER_URL``: the Redis URL of the broker; without it there is no Celery
  app and only the handler ``record`` is a target;
- ``OUTBOXAPP_KEY_PREFIX``: a prefix of every Redis key (one per test, as ``celeryapp``);
- ``OUTBOXAPP_CLOCK_FILE``: the offset in seconds added to the database's clock: the test ends a lease or a backoff
  by moving it instead of waiting;
- ``OUTBOXAPP_HANDOFF_SECONDS``: ``IDEMPOTENCY_OUTBOX_HANDOFF_SECONDS`` (default 2; ``0``: every job is the
  drainer's);
- ``OUTBOXAPP_SIGNAL_DIR``: where faults are ordered and witnessed, and workers say they are ready.

``POST /orders`` (atomic) with ``{"order": n, "jobs": k, "target": "celery" | "handler"}`` inserts the order and
stages ``k`` jobs ``(n, seq)``. The consumers, the Celery task ``outboxapp.receipt`` (keyed by
:func:`~flask_idempotent.outbox_key`) and the handler ``record``, each write one ``outbox_effects`` row per run
of their body, with the job's key and the pid: the effects a test counts.

Faults (the testing hooks; none is in the package):

- the request header ``X-Kill-After-Commit: 1``: SIGKILL the web process from the first ``after_commit`` of
  ``db.session`` that carries staged jobs, before the outbox's own listener (registered ``insert=True``, so it
  runs first): the transaction is committed, the hand-off never starts;
- ``<order>-<seq>.kill-after-publish`` (a one-shot flag file, as ``celeryapp``'s): SIGKILL the process that
  published that job to the broker right after Celery's ``after_task_publish``: the broker has the message, the
  job is not marked delivered (a drainer killed mid-batch);
- ``hold`` (a flag file): the first run of the handler in each process creates ``ready.<pid>`` and waits (at most
  30 s) for ``go``: the test sees every drainer in the middle of a batch at once.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from faultapp import engine_options, file_clock
from flask import Flask, has_request_context, jsonify, request
from flask_sqlalchemy import SQLAlchemy
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from flask_idempotent import Idempotency, idempotent, outbox_key
from flask_idempotent.outbox import _STAGED

TASK_NAME = "outboxapp.receipt"
HOLD_TIMEOUT = 30.0


@dataclass
class OutboxApp:
    flask_app: Flask
    db: SQLAlchemy
    idempotency: Idempotency
    celery: Any  # None without OUTBOXAPP_BROKER_URL
    receipt: Any


def take_flag(signal_dir: Path | None, name: str) -> bool:
    """Whether this process takes the one-shot flag ``name`` (atomic rename to ``<name>.taken-<pid>``)."""
    if signal_dir is None:
        return False
    flag = signal_dir / name
    try:
        flag.rename(flag.with_name(f"{name}.taken-{os.getpid()}"))
    except FileNotFoundError:
        return False
    return True


def kill_self() -> None:
    os.kill(os.getpid(), signal.SIGKILL)
    raise AssertionError("unreachable: the process was killed")


def create(env: Mapping[str, str] | None = None) -> OutboxApp:
    env = os.environ if env is None else env
    signal_dir = Path(env["OUTBOXAPP_SIGNAL_DIR"]) if env.get("OUTBOXAPP_SIGNAL_DIR") else None

    flask_app = Flask(__name__)
    flask_app.config.update(
        SQLALCHEMY_DATABASE_URI=env["OUTBOXAPP_DATABASE_URL"],
        SQLALCHEMY_ENGINE_OPTIONS=engine_options(2),
        IDEMPOTENCY_OUTBOX_HANDOFF_SECONDS=float(env.get("OUTBOXAPP_HANDOFF_SECONDS", "2")),
    )

    class Base(DeclarativeBase):
        pass

    db = SQLAlchemy(model_class=Base)

    class Order(db.Model):  # type: ignore[name-defined,misc]
        __tablename__ = "outbox_orders"
        id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
        jobs: Mapped[int]

    class Effect(db.Model):  # type: ignore[name-defined,misc]
        """One row per run of a consumer's body: the effect that must happen once per job."""

        __tablename__ = "outbox_effects"
        id: Mapped[int] = mapped_column(primary_key=True)
        order_id: Mapped[int] = mapped_column(index=True)
        seq: Mapped[int]
        job_key: Mapped[str] = mapped_column(sa.String(64), index=True)
        via: Mapped[str] = mapped_column(sa.String(16))
        pid: Mapped[int]

    db.init_app(flask_app)
    clock = file_clock(env["OUTBOXAPP_CLOCK_FILE"]) if env.get("OUTBOXAPP_CLOCK_FILE") else None
    idempotency = Idempotency(clock_offset=clock)
    idempotency.init_app(flask_app, db)

    def effect(order_id: int, seq: int, via: str) -> dict[str, Any]:
        row = Effect(order_id=order_id, seq=seq, job_key=outbox_key(), via=via, pid=os.getpid())
        db.session.add(row)
        db.session.commit()
        return {"effect": row.id, "order_id": order_id, "seq": seq}

    held: list[bool] = []

    @idempotency.handler("record")
    def record(order_id: int, seq: int) -> None:
        if signal_dir is not None and not held and (signal_dir / "hold").exists():
            held.append(True)
            (signal_dir / f"ready.{os.getpid()}").touch()
            deadline = time.monotonic() + HOLD_TIMEOUT
            while not (signal_dir / "go").exists() and time.monotonic() < deadline:
                time.sleep(0.01)  # bounded: a test that never releases it
        effect(order_id, seq, "handler")

    celery = receipt = None
    if env.get("OUTBOXAPP_BROKER_URL"):
        from celery import Celery
        from celery.signals import after_task_publish, worker_ready

        broker = env["OUTBOXAPP_BROKER_URL"]
        # No result backend: the effects are the proof. Current app: a drainer finds the task by its name there.
        celery = Celery("outboxapp", broker=broker)
        prefix = {"global_keyprefix": env["OUTBOXAPP_KEY_PREFIX"]} if env.get("OUTBOXAPP_KEY_PREFIX") else {}
        celery.conf.update(
            task_default_queue=env.get("OUTBOXAPP_QUEUE", "outboxapp"),
            worker_prefetch_multiplier=1,
            broker_connection_retry_on_startup=True,
            broker_connection_timeout=1,
            broker_transport_options={"visibility_timeout": 3600, **prefix},
        )

        @celery.task(acks_late=True, name=TASK_NAME)
        @idempotency.task(key=outbox_key, scope="receipts", name=TASK_NAME)
        def receipt(order_id: int, seq: int) -> dict[str, Any]:
            return effect(order_id, seq, "celery")

        @after_task_publish.connect(weak=False)
        def published(sender: Any = None, body: Any = None, **kwargs: Any) -> None:
            args = body[0] if isinstance(body, (list, tuple)) and body else ()
            if len(args) == 2 and take_flag(signal_dir, f"{args[0]}-{args[1]}.kill-after-publish"):
                kill_self()  # the broker has the message; the job is not marked delivered

        if signal_dir is not None:

            @worker_ready.connect(weak=False)
            def announce(sender: Any = None, **kwargs: Any) -> None:
                (signal_dir / f"worker.{os.getpid()}").touch()

    @sa.event.listens_for(db.session, "after_commit", insert=True)
    def kill_after_commit(session: Any) -> None:
        # Before the outbox's own after_commit listener (insert=True): the jobs are committed, not handed off.
        if has_request_context() and request.headers.get("X-Kill-After-Commit") and session.info.get(_STAGED):
            kill_self()

    @flask_app.get("/health")
    def health() -> Any:
        return jsonify(pid=os.getpid())

    @flask_app.post("/orders")
    @idempotent(atomic=True)
    def orders() -> Any:
        data = request.get_json()
        order_id, jobs = int(data["order"]), int(data.get("jobs", 1))
        target = receipt if data.get("target", "celery") == "celery" else "record"
        db.session.add(Order(id=order_id, jobs=jobs))
        keys = [idempotency.stage(target, order_id, seq) for seq in range(jobs)]
        return jsonify(order=order_id, jobs=keys), 201

    return OutboxApp(flask_app=flask_app, db=db, idempotency=idempotency, celery=celery, receipt=receipt)


def tables(url: str, *, create_them: bool = True) -> None:
    """Drop the app's tables and the layer's (records, events, outbox) on ``url``, then create them again
    (``create_them=False``: leave the shared test database as the other tests expect it)."""
    app = create({"OUTBOXAPP_DATABASE_URL": url})
    with app.flask_app.app_context():
        app.db.drop_all()
        if create_them:
            app.db.create_all()
        app.db.engine.dispose()


_built: list[OutboxApp] = []


def _app() -> OutboxApp:
    if not _built:
        _built.append(create())
    return _built[0]


def wsgi() -> Flask:
    """What ``gunicorn 'outboxapp:wsgi()'`` serves."""
    return _app().flask_app


def __getattr__(name: str) -> Any:
    """``outboxapp.celery`` and ``outboxapp.flask_app`` (what ``celery -A`` and ``flask --app`` load), built from
    the environment on first use, so that importing this module needs no environment."""
    if name not in ("celery", "flask_app"):
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(_app(), name)
