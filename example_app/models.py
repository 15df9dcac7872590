"""The example's own tables: users and their API tokens, ledger accounts, payments, transfers, and the
simulated payment provider's charges (a stand-in for a remote system, kept in the same database for the demo).

The extension's ``idempotency_records`` and ``idempotency_events`` are not here: ``idempotency.init_app`` puts
them on the same ``db.metadata``, so the migrations in ``example_app/migrations`` create them too.
"""

from __future__ import annotations

import hashlib
from datetime import datetime, timezone
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Mapped, mapped_column

from .extensions import db


def utcnow() -> datetime:
    return datetime.now(timezone.utc).replace(tzinfo=None)


def hash_token(token: str) -> str:
    """API tokens are stored as their sha256: a leaked database does not leak usable tokens."""
    return hashlib.sha256(token.encode()).hexdigest()


class User(db.Model):  # type: ignore[name-defined,misc]
    __tablename__ = "users"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(sa.String(80), unique=True)


class ApiToken(db.Model):  # type: ignore[name-defined,misc]
    __tablename__ = "api_tokens"

    token_hash: Mapped[str] = mapped_column(sa.String(64), primary_key=True)
    user_id: Mapped[int] = mapped_column(sa.ForeignKey("users.id"), index=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Account(db.Model):  # type: ignore[name-defined,misc]
    """A ledger account; balances are integer minor units (cents)."""

    __tablename__ = "accounts"

    id: Mapped[int] = mapped_column(primary_key=True)
    owner_id: Mapped[int] = mapped_column(sa.ForeignKey("users.id"), index=True)
    name: Mapped[str] = mapped_column(sa.String(80))
    currency: Mapped[str] = mapped_column(sa.String(3), default="EUR")
    balance: Mapped[int] = mapped_column(sa.BigInteger(), default=0)

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "name": self.name, "currency": self.currency, "balance": self.balance}


class Payment(db.Model):  # type: ignore[name-defined,misc]
    __tablename__ = "payments"

    id: Mapped[int] = mapped_column(primary_key=True)
    user_id: Mapped[int] = mapped_column(sa.ForeignKey("users.id"), index=True)
    amount: Mapped[int] = mapped_column(sa.BigInteger())
    currency: Mapped[str] = mapped_column(sa.String(3))
    description: Mapped[str | None] = mapped_column(sa.String(255))
    #: One payment per provider charge: even a misbehaving retry cannot book a charge twice.
    charge_id: Mapped[str] = mapped_column(sa.String(40), unique=True)
    idempotency_key: Mapped[str] = mapped_column(sa.String(255))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "amount": self.amount,
            "currency": self.currency,
            "description": self.description,
            "status": "succeeded",
            "charge_id": self.charge_id,
            "created_at": self.created_at.isoformat() + "Z",
        }


class Transfer(db.Model):  # type: ignore[name-defined,misc]
    __tablename__ = "transfers"

    id: Mapped[int] = mapped_column(primary_key=True)
    user_id: Mapped[int] = mapped_column(sa.ForeignKey("users.id"), index=True)
    from_account_id: Mapped[int] = mapped_column(sa.ForeignKey("accounts.id"))
    to_account_id: Mapped[int] = mapped_column(sa.ForeignKey("accounts.id"))
    amount: Mapped[int] = mapped_column(sa.BigInteger())
    idempotency_key: Mapped[str] = mapped_column(sa.String(255))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class ProviderCharge(db.Model):  # type: ignore[name-defined,misc]
    """The simulated provider's own ledger of charges (see ``provider.py``)."""

    __tablename__ = "provider_charges"

    id: Mapped[str] = mapped_column(sa.String(40), primary_key=True)
    #: The caller's reference; the provider answers a repeated reference with the existing charge.
    reference: Mapped[str] = mapped_column(sa.String(600), unique=True)
    amount: Mapped[int] = mapped_column(sa.BigInteger())
    currency: Mapped[str] = mapped_column(sa.String(3))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Receipt(db.Model):  # type: ignore[name-defined,misc]
    """The receipt of a payment, written by the outbox handler ``payment-receipt`` (see ``receipts.py``).

    Not unique per payment on purpose: that the receipt is sent once however often its job is delivered is the
    handler's ``once()`` (the job's key), which ``job_key`` shows.
    """

    __tablename__ = "receipts"

    id: Mapped[int] = mapped_column(primary_key=True)
    payment_id: Mapped[int] = mapped_column(sa.ForeignKey("payments.id"), index=True)
    amount: Mapped[int] = mapped_column(sa.BigInteger())
    currency: Mapped[str] = mapped_column(sa.String(3))
    job_key: Mapped[str] = mapped_column(sa.String(64))
    sent_at: Mapped[datetime] = mapped_column(default=utcnow)

    def to_dict(self) -> dict[str, Any]:
        return {
            "payment_id": self.payment_id,
            "amount": self.amount,
            "currency": self.currency,
            "job": self.job_key,
            "sent_at": self.sent_at.isoformat() + "Z",
        }
