"""A simulated payment provider with switches, so every situation of the idempotency contract can be shown.

It keeps its own table (``provider_charges``) and writes it on its own connection, committed at once, the way a
remote provider's effect is out of the caller's transaction. Like real providers it takes a caller
``reference`` and answers a repeated reference with the charge it already made (pass your idempotency key
downstream), which is what makes "mark retryable, then retry" safe after a crash.

Switches, per request (``X-Simulate`` header, when ``PROVIDER_SIMULATION`` is on):

- ``transient``: the provider is unavailable (a 503 or a timeout) and charged nothing: safe to retry;
- ``fail``: the provider answers 500 and the charge's fate is unknown: a final failure, an operator decides;
- ``hang``: the call blocks until ``POST /provider/release`` (or ``PROVIDER_HANG_TIMEOUT`` seconds, then it
  counts as ``transient``), to show the 409 a concurrent duplicate gets. The release reaches the call in any
  worker process: the gate is a directory the workers share (``PROVIDER_HANG_DIR``, see :class:`HangGate`);
- ``crash``: the charge is made, then the process is killed with SIGKILL before the payment is booked: the
  record stays IN_PROGRESS and shows up as stuck once its lease runs out;
- ``crash-after-commit``: the payment is booked and committed with its receipt's outbox job, then the process is
  killed before the job's hand-off (``receipts.py``): the drainer sends the receipt.
"""

from __future__ import annotations

import os
import secrets
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import sqlalchemy as sa
from flask import Flask, current_app

from .extensions import db
from .models import ProviderCharge, utcnow

SIMULATIONS = ("transient", "fail", "hang", "crash", "crash-after-commit")
SIMULATE_HEADER = "X-Simulate"
EXTENSION_NAME = "payment_provider"


class ProviderUnavailable(Exception):
    """The provider took no charge (unavailable, timed out): trying again is safe. Answers 503."""


class ProviderError(Exception):
    """The provider failed and the charge may or may not have happened. Answers 500 (a final failure)."""


@dataclass(frozen=True)
class Charge:
    id: str
    reference: str
    amount: int
    currency: str
    #: False when the provider answered a repeated reference with the charge it had already made.
    created: bool


class HangGate:
    """Where ``hang`` calls wait; ``release`` lets every waiting call go on, in any process of the server.

    Under gunicorn the request that hangs holds one worker and ``POST /provider/release`` is served by another,
    so the gate lives in a directory every worker shares (``PROVIDER_HANG_DIR``, by default in the instance
    folder): each waiting call keeps a file in ``waiting/``, and a release writes a new token to ``released``,
    which waiting calls poll for. Workers on several hosts need a shared directory (or one host for the demo).
    """

    POLL_INTERVAL = 0.05

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory)
        self._waiting_dir = self.directory / "waiting"
        self._released = self.directory / "released"

    def hold(self, timeout: float) -> bool:
        """Block until released (True) or ``timeout`` seconds passed (False)."""
        self._waiting_dir.mkdir(parents=True, exist_ok=True)
        seen = self._release_token()  # before the waiting file: a release in between is not missed
        waiting = self._waiting_dir / f"{os.getpid()}-{threading.get_ident()}-{secrets.token_hex(4)}"
        waiting.touch()
        deadline = time.monotonic() + timeout
        try:
            while self._release_token() == seen:
                if time.monotonic() >= deadline:
                    return False
                time.sleep(self.POLL_INTERVAL)
            return True
        finally:
            waiting.unlink(missing_ok=True)

    def release(self) -> int:
        """Release every waiting call; return how many there were."""
        waiting = self.waiting()
        self.directory.mkdir(parents=True, exist_ok=True)
        fresh = self.directory / f"released.{os.getpid()}.{secrets.token_hex(4)}"
        fresh.write_text(secrets.token_hex(8))
        os.replace(fresh, self._released)  # atomic: a waiting call reads the old token or the new one
        return waiting

    def waiting(self) -> int:
        """How many calls wait at the gate now, in all processes."""
        try:
            return sum(1 for _ in self._waiting_dir.iterdir())
        except FileNotFoundError:
            return 0

    def wait_for_waiters(self, count: int, timeout: float) -> bool:
        """Block until ``count`` calls are waiting (for tests and demos that must not race)."""
        deadline = time.monotonic() + timeout
        while self.waiting() < count:
            if time.monotonic() >= deadline:
                return False
            time.sleep(self.POLL_INTERVAL)
        return True

    def _release_token(self) -> str:
        try:
            return self._released.read_text()
        except FileNotFoundError:
            return ""


class SimulatedProvider:
    """The provider of one app (``app.extensions["payment_provider"]``)."""

    def __init__(self, hang_timeout: float, hang_dir: str | os.PathLike[str]) -> None:
        self.hang_timeout = hang_timeout
        self.gate = HangGate(hang_dir)

    def charge(self, *, amount: int, currency: str, reference: str, simulate: str | None = None) -> Charge:
        """Charge ``amount`` once per ``reference``; a repeated reference gets the existing charge."""
        if simulate == "hang" and not self.gate.hold(self.hang_timeout):
            raise ProviderUnavailable("the payment provider did not answer in time; nothing was charged")
        if simulate == "transient":
            raise ProviderUnavailable("the payment provider is temporarily unavailable (503); nothing was charged")
        if simulate == "fail":
            raise ProviderError("the payment provider answered 500; whether it charged is unknown")
        table = ProviderCharge.__table__
        with db.engine.begin() as conn:
            row = conn.execute(sa.select(table).where(table.c.reference == reference)).first()
            if row is not None:
                if (row.amount, row.currency) != (amount, currency):
                    raise ProviderError(f"reference {reference!r} was already used for another amount")
                return Charge(row.id, reference, row.amount, row.currency, created=False)
            charge_id = "ch_" + secrets.token_hex(12)
            conn.execute(
                sa.insert(table).values(
                    id=charge_id, reference=reference, amount=amount, currency=currency, created_at=utcnow()
                )
            )
        return Charge(charge_id, reference, amount, currency, created=True)

    def charges(self, reference: str | None = None) -> list[dict[str, object]]:
        table = ProviderCharge.__table__
        query = sa.select(table).order_by(table.c.created_at, table.c.id)
        if reference is not None:
            query = query.where(table.c.reference == reference)
        with db.engine.connect() as conn:
            return [{**row._mapping, "created_at": row.created_at.isoformat() + "Z"} for row in conn.execute(query)]

    def crash(self) -> None:
        """Die the way a process dies under the OOM killer: no exception handler, no teardown, no outcome."""
        os.kill(os.getpid(), signal.SIGKILL)


def init_provider(app: Flask) -> SimulatedProvider:
    hang_dir = app.config.get("PROVIDER_HANG_DIR") or os.path.join(app.instance_path, "provider-hang")
    provider = SimulatedProvider(hang_timeout=float(app.config["PROVIDER_HANG_TIMEOUT"]), hang_dir=hang_dir)
    app.extensions[EXTENSION_NAME] = provider
    return provider


def get_provider() -> SimulatedProvider:
    provider: SimulatedProvider = current_app.extensions[EXTENSION_NAME]
    return provider
