"""``POST /webhooks/provider``: the payment provider tells the app that a payout reached an account.

Senders retry a webhook until they get a 2xx, with the same event id, so a payout must be credited once however
often it arrives. The route's key is the event's id (``key=``) and its scope the sender (``scope="provider"``):
a redelivery is answered from the record and credits nothing, the same id with another payload is 422.

The signature (``X-Provider-Signature``: hex HMAC-SHA256 of the raw body with ``PROVIDER_WEBHOOK_SECRET``) is
checked inside the key callable, which runs before the claim: a forged or unsigned delivery never takes a key.
Atomic mode: the credit and the record commit together.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Any

from flask import Blueprint, current_app, jsonify, request
from flask.typing import ResponseReturnValue

from flask_idempotent import idempotent

from .extensions import db
from .models import Account
from .problems import DATABASE_DOWN, abort_problem, database_unavailable

webhooks = Blueprint("webhooks", __name__, url_prefix="/webhooks")
for _down in DATABASE_DOWN:
    webhooks.register_error_handler(_down, database_unavailable)  # 503 store-unavailable: the sender retries

SIGNATURE_HEADER = "X-Provider-Signature"


def sign(body: bytes, secret: str) -> str:
    return hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def verified_event_id() -> str | None:
    """The event's id, once the delivery's signature is verified (401 otherwise; 404 when not configured)."""
    secret = current_app.config.get("PROVIDER_WEBHOOK_SECRET")
    if not secret:
        abort_problem(404, "webhooks-off", "Webhooks are not configured", "Set PROVIDER_WEBHOOK_SECRET.")
    sent = request.headers.get(SIGNATURE_HEADER, "")
    if not hmac.compare_digest(sent, sign(request.get_data(), str(secret))):
        abort_problem(401, "bad-signature", "Invalid signature", f"{SIGNATURE_HEADER} does not match the body.")
    event = request.get_json(silent=True)
    return str(event["id"]) if isinstance(event, dict) and event.get("id") else None


def _event() -> dict[str, Any]:
    return request.get_json(silent=True) or {}


@webhooks.post("/provider")
@idempotent(
    key=verified_event_id,
    scope="provider",
    atomic=True,
    describe=lambda: f"{_event().get('type')} {_event().get('amount')} to account {_event().get('account')}",
)
def provider_event() -> ResponseReturnValue:
    event = _event()
    if event.get("type") != "payout.paid":
        return jsonify(ignored=event.get("type")), 200  # acknowledged, nothing to do: replayed as such
    account = db.session.get(Account, event.get("account"))
    amount = event.get("amount")
    if account is None or isinstance(amount, bool) or not isinstance(amount, int) or amount <= 0:
        abort_problem(422, "invalid-event", "Invalid payout event", "Unknown account or a non-positive amount.")
    account.balance += amount
    return jsonify(credited=amount, account=account.id, balance=account.balance), 200
