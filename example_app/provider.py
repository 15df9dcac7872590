"""A simulated payment provider with switches, so every situation of the idempotency contract can be shown.

It keeps its own table (``provider_charges``) and writes it on its own connection, committed at once, the way a
remote provider's effect is out of the caller's transaction. Like real providers it takes a caller
``reference`` and answers a repeated reference with the charge it already made (pass your idempotency key
downstream), which is what makes "mark retryable, then retry" safe after a crash.

Switches, per request (``X-Simulate`` header, when ``PROVIDER_SIMULATION`` is on):

- ``transient``: the provider is unavailable (a 503 or a timeout) and charged nothing: safe to retry;
- ``fail``: the provider answers 500 and the charge's fate is unknown: a final failure, an operator decides;
- ``hang``: the call blocks until ``POST /provider/release`` (or ``PROVIDER_HANG_TIMEOUT`` seconds, then it
  counts as ``transient``), to show the 409 a concurrent duplicate gets;
- ``crash``: the charge is made, then the process is killed with SIGKILL before the payment is booked: the
  record stays IN_PROGRESS and shows up as stuck once its lease runs out.
"""

from __future__ import annotations

import os
import secrets
import signal
import threading
from dataclasses import dataclass

import sqlalchemy as sa
from flask import Flask, current_app

from .extensions import db
from .models import ProviderCharge, utcnow

SIMULATIONS = ("transient", "fail", "hang", "crash")
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
    """Where ``hang`` calls wait; ``release`` lets every waiting call go on."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._waiting = 0
        self._generation = 0

    def hold(self, timeout: float) -> bool:
        """Block until released (True) or ``timeout`` seconds passed (False)."""
        with self._cond:
            generation = self._generation
            self._waiting += 1
            self._cond.notify_all()
            try:
                return self._cond.wait_for(lambda: self._generation != generation, timeout)
            finally:
                self._waiting -= 1
                self._cond.notify_all()

    def release(self) -> int:
        """Release every waiting call; return how many there were."""
        with self._cond:
            waiting = self._waiting
            self._generation += 1
            self._cond.notify_all()
            return waiting

    def wait_for_waiters(self, count: int, timeout: float) -> bool:
        """Block until ``count`` calls are waiting (for tests and demos that must not race)."""
        with self._cond:
            return self._cond.wait_for(lambda: self._waiting >= count, timeout)


class SimulatedProvider:
    """The provider of one app (``app.extensions["payment_provider"]``)."""

    def __init__(self, hang_timeout: float) -> None:
        self.hang_timeout = hang_timeout
        self.gate = HangGate()

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
    provider = SimulatedProvider(hang_timeout=float(app.config["PROVIDER_HANG_TIMEOUT"]))
    app.extensions[EXTENSION_NAME] = provider
    return provider


def get_provider() -> SimulatedProvider:
    provider: SimulatedProvider = current_app.extensions[EXTENSION_NAME]
    return provider
