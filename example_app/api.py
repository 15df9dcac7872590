"""The payments API: ``POST /payments`` (leased mode), ``POST /transfers`` (atomic mode), and their reads.

Every route needs ``Authorization: Bearer <token>``; the user id is the idempotency scope (see ``auth.py``).
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from flask import Blueprint, current_app, g, jsonify, request, url_for
from flask.typing import ResponseReturnValue

from flask_idempotent import TransientError, current_record, idempotent

from .auth import require_user
from .extensions import db, idempotency
from .models import Account, Payment, Receipt, Transfer
from .problems import DATABASE_DOWN, abort_problem, database_unavailable, problem
from .provider import SIMULATE_HEADER, ProviderError, ProviderUnavailable, get_provider
from .receipts import send_receipt

api = Blueprint("api", __name__)
# A database outage answers 503 store-unavailable (problem+json, Retry-After) on every API route, also when it
# hits the token lookup, which runs before the idempotency layer's hook.
for _down in DATABASE_DOWN:
    api.register_error_handler(_down, database_unavailable)

MAX_AMOUNT = 10**12


def _body() -> dict[str, Any]:
    data = request.get_json(silent=True)
    if not isinstance(data, dict):
        abort_problem(
            400, "invalid-body", "Invalid request body", "Send a JSON object (Content-Type: application/json)."
        )
    return data


def _amount(data: dict[str, Any]) -> int:
    amount = data.get("amount")
    if isinstance(amount, bool) or not isinstance(amount, int) or not 0 < amount <= MAX_AMOUNT:
        abort_problem(
            400, "invalid-amount", "Invalid amount", "amount must be a positive integer of minor units (cents)."
        )
    return amount


# Payments: leased mode ---------------------------------------------------------------------------------------


def _describe_payment() -> str:
    """What an operator sees for a payment record (no personal data: amount, currency, description's length)."""
    data = request.get_json(silent=True) or {}
    return f"{data.get('amount')} {data.get('currency', 'EUR')} (minor units)"


PAYMENT_RUNBOOK = (
    "Stuck after 'provider-charged': the provider charged (see recovery data: charge_id). The provider"
    " deduplicates by scope:key, so Mark retryable is safe: the retry books the existing charge without charging"
    " again. Stuck with no recovery point: the provider was not reached or did not answer; Mark retryable too."
    " Final failures (provider errors): Acknowledge once the customer was told."
)


@api.post("/payments")
@idempotent(transient=ProviderUnavailable, describe=_describe_payment, runbook=PAYMENT_RUNBOOK)
def create_payment() -> ResponseReturnValue:
    """Charge the caller through the payment provider and book the payment.

    Leased mode: the provider call is an outside effect no database transaction can undo, so the claim is
    committed before it. A retry replays the stored 201; a crash after the charge leaves the record stuck for
    an operator. The provider gets ``scope:key`` as its reference, so a retry an operator allowed cannot charge
    twice.
    """
    user = require_user()
    data = _body()
    amount = _amount(data)
    currency = data.get("currency", "EUR")
    if not (isinstance(currency, str) and len(currency) == 3 and currency.isalpha() and currency.isupper()):
        abort_problem(400, "invalid-currency", "Invalid currency", "currency must be a 3-letter ISO code like EUR.")
    description = data.get("description")
    if description is not None and not (isinstance(description, str) and len(description) <= 255):
        abort_problem(400, "invalid-description", "Invalid description", "description must be text, 255 at most.")
    simulate = g.simulate = request.headers.get(SIMULATE_HEADER)
    provider = get_provider()
    charge = provider.charge(
        amount=amount,
        currency=currency,
        reference=f"{current_record.scope}:{current_record.key}",
        simulate=simulate,
    )
    # Durable before anything else can go wrong: the dashboard shows that the provider charged.
    current_record.checkpoint("provider-charged", {"charge_id": charge.id})
    if simulate == "crash":
        provider.crash()
    payment = None if charge.created else _booked(charge.id)
    if payment is None:
        payment = Payment(
            user_id=user.id,
            amount=amount,
            currency=currency,
            description=description,
            charge_id=charge.id,
            idempotency_key=current_record.key,
        )
        db.session.add(payment)
        try:
            db.session.flush()
            # The receipt commits with the payment (a rollback stages nothing) and is handed off right after.
            idempotency.stage(send_receipt, payment.id)
            db.session.commit()
        except sa.exc.IntegrityError:
            # Booked in between by another request of this charge: answer with that payment.
            db.session.rollback()
            payment = _booked(charge.id)
            if payment is None:
                raise
    return jsonify(payment.to_dict()), 201, {"Location": url_for("api.get_payment", payment_id=payment.id)}


def _booked(charge_id: str) -> Payment | None:
    """The payment already booked for a provider charge.

    The provider answers a repeated reference (``scope:key``) with the charge it made before. After a crash the
    payment was never booked; but when an operator released a completed record, the key runs again and gets the
    charge whose payment exists: that payment is the answer (201 with the same body as the first time), not a
    second booking, which the unique ``charge_id`` would refuse with an IntegrityError.
    """
    payment: Payment | None = db.session.scalar(sa.select(Payment).where(Payment.charge_id == charge_id))
    return payment


@api.get("/payments/<int:payment_id>")
def get_payment(payment_id: int) -> ResponseReturnValue:
    user = require_user()
    payment = db.session.get(Payment, payment_id)
    if payment is None or payment.user_id != user.id:
        abort_problem(404, "not-found", "No such payment", f"You have no payment {payment_id}.")
    return jsonify(payment.to_dict())


@api.get("/payments/<int:payment_id>/receipt")
def get_receipt(payment_id: int) -> ResponseReturnValue:
    """The payment's receipt once the outbox delivered it (404 ``not-found`` before)."""
    user = require_user()
    payment = db.session.get(Payment, payment_id)
    if payment is None or payment.user_id != user.id:
        abort_problem(404, "not-found", "No such payment", f"You have no payment {payment_id}.")
    receipt = db.session.scalar(sa.select(Receipt).where(Receipt.payment_id == payment_id).order_by(Receipt.id))
    if receipt is None:
        abort_problem(404, "not-found", "No receipt yet", f"The receipt of payment {payment_id} is not sent yet.")
    return jsonify(receipt.to_dict())


@api.errorhandler(ProviderUnavailable)
def _provider_unavailable(exc: ProviderUnavailable) -> ResponseReturnValue:
    # Listed in transient=: the record is FAILED and retryable, so the client's retry runs the view again.
    return problem(503, "provider-unavailable", "Payment provider unavailable", str(exc), headers={"Retry-After": "1"})


@api.errorhandler(ProviderError)
def _provider_error(exc: ProviderError) -> ResponseReturnValue:
    # A 500 in leased mode is a final failure: retries get this answer again until an operator decides.
    return problem(500, "provider-error", "Payment provider error", str(exc))


# Transfers: atomic mode -------------------------------------------------------------------------------------


@api.post("/transfers")
@idempotent(
    atomic=True,
    wait=2.0,
    describe=lambda: "{amount} from account {from_account} to {to_account}".format_map(
        {"amount": None, "from_account": None, "to_account": None, **(request.get_json(silent=True) or {})}
    ),
)
def create_transfer() -> ResponseReturnValue:
    """Move money between two ledger accounts of this database.

    Atomic mode: the claim, both balance updates, the transfer row and the outcome commit in one transaction,
    which the layer commits after the view returns. The view never commits. A 4xx answer is an outcome too
    (COMPLETED, replayed), but its writes are rolled back and the record is stored alone: so the balance check
    may come after the debit, as a ledger's own rule often does, and a refused transfer leaves no trace.
    """
    user = require_user()
    data = _body()
    amount = _amount(data)
    source_id, target_id = data.get("from_account"), data.get("to_account")
    if (
        not all(isinstance(v, int) and not isinstance(v, bool) for v in (source_id, target_id))
        or source_id == target_id
    ):
        abort_problem(400, "invalid-accounts", "Invalid accounts", "from_account and to_account: two account ids.")
    # Lock both rows in id order (PostgreSQL; SQLite locks the whole database): opposite transfers never deadlock.
    rows = db.session.scalars(
        sa.select(Account).where(Account.id.in_([source_id, target_id])).order_by(Account.id).with_for_update()
    ).all()
    accounts = {account.id: account for account in rows}
    source, target = accounts.get(source_id), accounts.get(target_id)
    if source is None or source.owner_id != user.id:
        abort_problem(404, "unknown-account", "Unknown account", f"You have no account {source_id}.")
    if target is None:
        abort_problem(404, "unknown-account", "Unknown account", f"There is no account {target_id}.")
    if source.currency != target.currency:
        abort_problem(422, "currency-mismatch", "Currency mismatch", "Both accounts must have the same currency.")
    source.balance -= amount
    target.balance += amount
    db.session.flush()
    if source.balance < 0:
        # After the writes: the layer rolls back what a 4xx wrote (no commit_4xx=True here), balances included.
        abort_problem(
            422,
            "insufficient-funds",
            "Insufficient funds",
            f"Account {source.id} holds {source.balance + amount}, not {amount}.",
        )
    transfer = Transfer(
        user_id=user.id,
        from_account_id=source.id,
        to_account_id=target.id,
        amount=amount,
        idempotency_key=current_record.key,
    )
    db.session.add(transfer)
    db.session.flush()
    if request.headers.get(SIMULATE_HEADER) == "transient":
        # After the writes: the layer rolls them back with the FAILED (retryable) outcome.
        raise TransientError("simulated transient failure after the ledger writes; nothing was kept")
    body = {
        "id": transfer.id,
        "amount": amount,
        "from_account": source.to_dict(),
        "to_account": target.to_dict() if target.owner_id == user.id else {"id": target.id},
    }
    return jsonify(body), 201


@api.get("/accounts")
def list_accounts() -> ResponseReturnValue:
    user = require_user()
    accounts = db.session.scalars(sa.select(Account).where(Account.owner_id == user.id).order_by(Account.id))
    return jsonify([account.to_dict() for account in accounts])


# The simulated provider's knobs (only with PROVIDER_SIMULATION) ---------------------------------------------


def _simulation_only() -> None:
    if not current_app.config["PROVIDER_SIMULATION"]:
        abort_problem(404, "not-found", "Not found", "The provider simulation is off in this app.")


@api.post("/provider/release")
def release_hung_calls() -> ResponseReturnValue:
    """Let every provider call blocked by ``X-Simulate: hang`` go on."""
    _simulation_only()
    require_user()
    return jsonify(released=get_provider().gate.release())


@api.get("/provider/charges")
def provider_charges() -> ResponseReturnValue:
    """The provider's side of the story: what it charged, for the caller's references (``scope:key``)."""
    _simulation_only()
    user = require_user()
    charges = get_provider().charges()
    mine = [c for c in charges if str(c["reference"]).startswith(f"{user.id}:")]
    return jsonify(mine)
