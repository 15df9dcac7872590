"""The app the Celery worker test runs in real ``celery worker`` processes, configured from environment variables.

``celery -A celeryapp worker`` and ``flask --app celeryapp:flask_app idempotency ...`` both build it (on first
use of ``celeryapp.celery`` or ``celeryapp.flask_app``) from:

- ``CELERYAPP_DATABASE_URL`` (required): the PostgreSQL URL of the effects and the idempotency records;
- ``CELERYAPP_BROKER_URL`` (required): the Redis URL of the broker, also the result backend;
- ``CELERYAPP_QUEUE``: the queue name (default ``celeryapp``);
- ``CELERYAPP_KEY_PREFIX``: a prefix of every Redis key of the broker and the result backend (default none): one
  per test, so that test runs sharing the Redis database (two checkouts, two engineers) never meet;
- ``CELERYAPP_CLOCK_FILE``: the offset in seconds added to the database's clock (as ``FAULTAPP_CLOCK_FILE``): the
  test ends a lease by moving that clock instead of waiting;
- ``CELERYAPP_LEASE`` (seconds, default 30): the lease of ``charge``;
- ``CELERYAPP_VISIBILITY_TIMEOUT`` (seconds, default 5): how long Redis keeps a delivered, unacknowledged message
  before giving it to another worker (the real default is an hour, see :func:`create`);
- ``CELERYAPP_SIGNAL_DIR``: where faults are ordered and witnessed (below), and workers say they are ready.

Faults are one-shot flag files in the signal dir, taken (renamed to ``<flag>.taken-<pid>``) by the delivery that
reaches their point first; the arguments (the idempotency command) stay the same, so the task's key is reused:

- ``<order_id>.park-after-effect``: after the effect is committed (the record IN_PROGRESS, its lease held), create
  ``<order_id>.parked`` and wait until the test creates ``<order_id>.go`` (at most 30 s);
- ``<order_id>.kill-after-effect``: SIGKILL the worker after the effect, before the outcome is stored: the record
  stays IN_PROGRESS and the message is neither acknowledged nor rejected;
- ``<order_id>.kill-after-completion``: SIGKILL the worker after the outcome is stored, before the task returns
  (so before the late acknowledgement): the record is COMPLETED, the message is delivered again.

Celery's own retries: ``retry_charge`` (``bind=True``, ``raise self.retry(...)``) and ``auto_charge``
(``autoretry_for=(ProviderBusy,)``), both with ``max_retries=2`` and no countdown, charge through a provider that is
busy for the first ``busy`` runs of an order (counted in ``celery_runs``, one row per run of the function).
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
from celery import Celery, current_task
from celery.signals import worker_ready
from faultapp import engine_options, file_clock
from flask import Flask
from flask_sqlalchemy import SQLAlchemy
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from flask_idempotent import Idempotency, RequestInProgress

TASK_NAME = "celeryapp.charge"
PARK_TIMEOUT = 30.0


@dataclass
class CeleryApp:
    flask_app: Flask
    celery: Celery
    db: SQLAlchemy
    charge: Any  # the Celery task
    charge_once: Any  # the idempotent function it runs
    retry_charge: Any  # the Celery tasks retried by Celery: raise self.retry(...), autoretry_for
    auto_charge: Any


class ProviderBusy(Exception):
    """The provider could not take the charge now: nothing happened, a retry may succeed."""


MAX_RETRIES = 2
RETRY_TASK_NAME = "celeryapp.retry_charge"
AUTO_TASK_NAME = "celeryapp.auto_charge"


def take_fault(signal_dir: Path | None, order_id: int, fault: str) -> bool:
    """Whether this delivery takes the one-shot fault ``fault`` ordered for ``order_id`` (atomic rename)."""
    if signal_dir is None:
        return False
    flag = signal_dir / f"{order_id}.{fault}"
    try:
        flag.rename(flag.with_name(f"{flag.name}.taken-{os.getpid()}"))
    except FileNotFoundError:
        return False
    return True


def kill_self() -> None:
    os.kill(os.getpid(), signal.SIGKILL)
    raise AssertionError("unreachable: the worker was killed")


def park(signal_dir: Path, order_id: int) -> None:
    (signal_dir / f"{order_id}.parked").touch()
    go = signal_dir / f"{order_id}.go"
    deadline = time.monotonic() + PARK_TIMEOUT
    while not go.exists() and time.monotonic() < deadline:  # bounded: a test that never releases it
        time.sleep(0.01)


def create(env: Mapping[str, str] | None = None) -> CeleryApp:
    """Build the Flask app, its Idempotency extension and the Celery app from ``env`` (default: os.environ)."""
    env = os.environ if env is None else env
    signal_dir = Path(env["CELERYAPP_SIGNAL_DIR"]) if env.get("CELERYAPP_SIGNAL_DIR") else None
    lease = float(env.get("CELERYAPP_LEASE", "30"))

    flask_app = Flask(__name__)
    flask_app.config.update(
        SQLALCHEMY_DATABASE_URI=env["CELERYAPP_DATABASE_URL"],
        SQLALCHEMY_ENGINE_OPTIONS=engine_options(2),
    )

    class Base(DeclarativeBase):
        pass

    db = SQLAlchemy(model_class=Base)

    class Charge(db.Model):  # type: ignore[name-defined,misc]
        """One row per execution of the task's body: the effect that must not happen twice."""

        __tablename__ = "celery_charges"
        id: Mapped[int] = mapped_column(primary_key=True)
        order_id: Mapped[int] = mapped_column(index=True)
        amount: Mapped[int]
        pid: Mapped[int]
        task_id: Mapped[str] = mapped_column(sa.String(64))

    class Run(db.Model):  # type: ignore[name-defined,misc]
        """One row per run of a retried task's function, committed before the provider answers."""

        __tablename__ = "celery_runs"
        id: Mapped[int] = mapped_column(primary_key=True)
        order_id: Mapped[int] = mapped_column(index=True)
        task: Mapped[str] = mapped_column(sa.String(64))
        retries: Mapped[int]  # Celery's count of the retries before this run

    def busy_provider(order_id: int, amount: int, busy: int) -> dict[str, Any]:
        """Record the run; ProviderBusy for the first ``busy`` runs of the order, then one charge."""
        db.session.add(Run(order_id=order_id, task=current_task.name, retries=current_task.request.retries))
        db.session.commit()
        if db.session.scalar(sa.select(sa.func.count()).where(Run.order_id == order_id)) <= busy:
            raise ProviderBusy(f"order {order_id}: the provider is busy")
        row = Charge(order_id=order_id, amount=amount, pid=os.getpid(), task_id=current_task.request.id or "")
        db.session.add(row)
        db.session.commit()
        return {"charge": row.id, "order_id": order_id, "amount": amount}

    db.init_app(flask_app)
    clock = file_clock(env["CELERYAPP_CLOCK_FILE"]) if env.get("CELERYAPP_CLOCK_FILE") else None
    idempotency = Idempotency(clock_offset=clock)
    idempotency.init_app(flask_app, db)

    broker = env["CELERYAPP_BROKER_URL"]
    celery = Celery("celeryapp", broker=broker, backend=broker, set_as_current=False)
    queue = env.get("CELERYAPP_QUEUE", "celeryapp")
    prefix = {"global_keyprefix": env["CELERYAPP_KEY_PREFIX"]} if env.get("CELERYAPP_KEY_PREFIX") else {}
    celery.conf.update(
        task_default_queue=queue,
        worker_prefetch_multiplier=1,  # a busy worker holds no second message: the other worker gets it
        broker_connection_retry_on_startup=True,
        # Redis has no acknowledgements of its own: kombu keeps a delivered message in an "unacked" hash and
        # gives it to a worker again only once it is older than visibility_timeout (default 1 hour) -- how an
        # acks_late message of a kill -9'd worker comes back. A few seconds keep the test short; it must
        # exceed the longest a message is legitimately held (a parked task, a retry's countdown), or the
        # message is delivered again while still running. The sweep that restores such messages runs every
        # unacked_restore_interval * unacked_restore_throttle seconds (kombu >= 5.7; default 10 * 10).
        broker_transport_options={
            "visibility_timeout": float(env.get("CELERYAPP_VISIBILITY_TIMEOUT", "5")),
            "unacked_restore_interval": 1,
            "unacked_restore_throttle": 1,
            **prefix,
        },
        result_backend_transport_options=prefix,
        result_expires=3600,
    )

    @idempotency.task(key=lambda order_id, amount: f"charge:{order_id}", scope="billing", lease=lease, name=TASK_NAME)
    def charge_once(order_id: int, amount: int) -> dict[str, Any]:
        """The effect, at most once per order: the charge row is committed before the outcome is stored."""
        row = Charge(order_id=order_id, amount=amount, pid=os.getpid(), task_id=current_task.request.id or "")
        db.session.add(row)
        db.session.commit()
        result = {"charge": row.id, "order_id": order_id, "amount": amount, "pid": row.pid}
        if take_fault(signal_dir, order_id, "kill-after-effect"):
            kill_self()
        if signal_dir is not None and take_fault(signal_dir, order_id, "park-after-effect"):
            park(signal_dir, order_id)
        return result

    # Not stacked directly on charge_once: with bind=True Celery passes the task itself as the first argument,
    # which idempotency.task would take as part of the call's arguments (the key callable's and the command's).
    # max_retries=None: a RequestInProgress retry ends with the lease (then the record is COMPLETED, FAILED, or
    # stuck, and RecordStuck fails the task for an operator to decide).
    @celery.task(bind=True, acks_late=True, reject_on_worker_lost=True, max_retries=None, name=TASK_NAME)
    def charge(self: Any, order_id: int, amount: int) -> dict[str, Any]:
        try:
            result = charge_once(order_id, amount)
        except RequestInProgress as exc:
            raise self.retry(exc=exc, countdown=exc.retry_after) from exc
        if take_fault(signal_dir, order_id, "kill-after-completion"):
            kill_self()  # the outcome is stored; the message is not acknowledged yet
        return result

    # The documented bind=True set-up: Celery hands the task to the function as ``self``, and so does the layer.
    @celery.task(bind=True, acks_late=True, max_retries=MAX_RETRIES, name=RETRY_TASK_NAME)
    @idempotency.task(
        key=lambda order_id, amount, busy: f"charge:{order_id}", scope="billing", bind=True, name=RETRY_TASK_NAME
    )
    def retry_charge(self: Any, order_id: int, amount: int, busy: int) -> dict[str, Any]:
        try:
            return busy_provider(order_id, amount, busy)
        except ProviderBusy as exc:
            raise self.retry(exc=exc, countdown=0) from exc

    @celery.task(
        autoretry_for=(ProviderBusy,),
        retry_kwargs={"countdown": 0},
        acks_late=True,
        max_retries=MAX_RETRIES,
        name=AUTO_TASK_NAME,
    )
    @idempotency.task(key=lambda order_id, amount, busy: f"charge:{order_id}", scope="billing", name=AUTO_TASK_NAME)
    def auto_charge(order_id: int, amount: int, busy: int) -> dict[str, Any]:
        return busy_provider(order_id, amount, busy)

    if signal_dir is not None:

        @worker_ready.connect(weak=False)
        def announce(sender: Any = None, **kwargs: Any) -> None:
            (signal_dir / f"ready.{os.getpid()}").touch()

    return CeleryApp(
        flask_app=flask_app,
        celery=celery,
        db=db,
        charge=charge,
        charge_once=charge_once,
        retry_charge=retry_charge,
        auto_charge=auto_charge,
    )


_built: list[CeleryApp] = []


def __getattr__(name: str) -> Any:
    """``celeryapp.celery``, ``celeryapp.flask_app`` (what ``celery -A`` and ``flask --app`` load), built from the
    environment on first use, so that importing this module (the test does) needs no environment."""
    if name not in ("celery", "flask_app", "charge", "db"):
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    if not _built:
        _built.append(create())
    return getattr(_built[0], name)
