"""The payment's receipt, staged in the payment's transaction and delivered by the outbox (docs: The outbox).

``POST /payments`` stages ``send_receipt(payment_id)`` with ``idempotency.stage`` before it commits the payment:
the job commits with the payment or not at all. Right after the commit the request's own hand-off runs the
handler; if the process died in between, ``flask --app example_app idempotency drain --once`` (cron, or
``--interval 1`` as a service) delivers it once the hand-off's lease has run out.

A handler, not a Celery task, so that the example runs without a broker: ``@idempotency.handler`` runs under
``once()`` with the job's key, so a job delivered twice writes one receipt. With Celery, the same job would be
``@celery.task(acks_late=True)`` over ``@idempotency.task(key=outbox_key, scope="receipts")``, staged the same way.

The simulation switch ``X-Simulate: crash-after-commit`` (when ``PROVIDER_SIMULATION`` is on) kills the process
right after the payment's commit, before the hand-off: from an ``after_commit`` listener registered ahead of the
outbox's own (``insert=True``). It exists to show the recovery; it is not part of the outbox.
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from flask import g, has_request_context

from flask_idempotent import outbox_key

from .extensions import db, idempotency
from .models import Payment, Receipt

CRASH_AFTER_COMMIT = "crash-after-commit"


@idempotency.handler("payment-receipt")
def send_receipt(payment_id: int) -> None:
    """Send (here: write) the payment's receipt. Runs in an app context of its own, from its argument alone."""
    payment = db.session.get(Payment, payment_id)
    if payment is None:  # a failed delivery: retried with backoff, then dead for an operator
        raise LookupError(f"no payment {payment_id}")
    db.session.add(
        Receipt(payment_id=payment.id, amount=payment.amount, currency=payment.currency, job_key=outbox_key())
    )
    db.session.commit()


@sa.event.listens_for(db.session, "after_commit", insert=True)
def _crash_after_commit(session: Any) -> None:
    if has_request_context() and g.get("simulate") == CRASH_AFTER_COMMIT:
        from .provider import get_provider

        g.simulate = None
        get_provider().crash()  # the payment and its job are committed; the hand-off never starts
