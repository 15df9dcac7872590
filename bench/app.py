"""The app the benchmark serves: one view body, served bare, leased, atomic, optional and through the peer.

Run by gunicorn as ``app:create_app()`` from ``bench/`` (``BENCH_DATABASE_URL`` names the PostgreSQL database,
``BENCH_REDIS_URL`` the peer's Redis, ``BENCH_RUN_ID`` namespaces the peer's Redis keys).

The view body writes one ``bench_payments`` row (the effect the checks count) and returns it as JSON with 201
and a Location header. Switches in the JSON body, used only by the correctness checks:
``sleep_ms`` (hold the request after the write), ``fail_after_effect`` (the first attempt per key raises after
its write, like a downstream call failing after the charge).
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import time
from datetime import datetime, timezone
from typing import Any

import redis
import sqlalchemy as sa
from flask import Flask, jsonify, request
from flask_sqlalchemy import SQLAlchemy
from peer import IdempotencyAlreadyInProgressError, IdempotencyValidationError, make_peer_functions

from flask_idempotent import Idempotency, idempotent

db = SQLAlchemy()
idempotency = Idempotency()


class Payment(db.Model):  # type: ignore[name-defined,misc]
    __tablename__ = "bench_payments"
    id = db.Column(db.BigInteger, primary_key=True)
    route = db.Column(db.String(32), nullable=False)
    idem_key = db.Column(db.String(255), nullable=True, index=True)
    amount = db.Column(db.Integer, nullable=False)
    currency = db.Column(db.String(3), nullable=False)
    creditor = db.Column(db.String(255), nullable=False)
    reference = db.Column(db.String(255), nullable=False)
    created_at = db.Column(db.DateTime, nullable=False)


class DownstreamError(RuntimeError):
    """A call after the payment was written failed (the effect happened; the response did not)."""


_redis: redis.Redis | None = None


def _first_attempt(route: str, key: str | None) -> bool:
    global _redis
    if _redis is None:
        _redis = redis.Redis.from_url(os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0"))
    run_id = os.environ.get("BENCH_RUN_ID", "dev")
    return bool(_redis.set(f"bench:{run_id}:failonce:{route}:{key}", 1, nx=True, ex=3600))


def payment_body(command: dict[str, Any], *, commit: bool = True) -> dict[str, Any]:
    """The view body shared by every route. ``commit=False`` for the atomic route (the layer commits)."""
    data = command.get("body") or {}
    payment = Payment(
        route=command["route"],
        idem_key=command.get("key"),
        amount=int(data.get("amount", 0)),
        currency=str(data.get("currency", "EUR"))[:3],
        creditor=str(data.get("creditor", "")),
        reference=str(data.get("reference", "")),
        created_at=datetime.now(timezone.utc).replace(tzinfo=None),
    )
    db.session.add(payment)
    db.session.flush()
    result = {"id": payment.id, "amount": payment.amount, "currency": payment.currency, "status": "created"}
    if data.get("sleep_ms"):
        time.sleep(float(data["sleep_ms"]) / 1000)
    if commit:
        db.session.commit()
    if data.get("fail_after_effect") and _first_attempt(command["route"], command.get("key")):
        raise DownstreamError("the ledger call after the payment failed")
    return result


def _command(route: str) -> dict[str, Any]:
    return {
        "route": route,
        "key": request.headers.get("Idempotency-Key"),
        "body": request.get_json(force=True, silent=True),
    }


def _created(result: dict[str, Any]) -> Any:
    return jsonify(result), 201, {"Location": f"/payments/{result['id']}"}


# The floor: the layer's protocol for a first request written as raw SQL in a minimal view of this same app, so
# the layer's own Python shows as the difference between /leased and /floor-leased (and /atomic and
# /floor-atomic). It hashes the body like a fingerprint would, claims with one INSERT ... ON CONFLICT DO NOTHING,
# runs the same view body, and stores the response with a fenced UPDATE. No replay, no 409 handling beyond a
# bare answer: only a first request's cost is measured against it.
_NOW = "timezone('UTC', statement_timestamp())"
FLOOR_CLAIM = sa.text(
    "INSERT INTO idempotency_records (scope, key, request_hash, method, path, endpoint, version, kind, state,"
    " retryable, attempts, lease_token, locked_until, event_count, created_at, updated_at, expires_at)"
    " VALUES (:scope, :key, :hash, 'POST', :path, 'floor', 1, 'http', 'IN_PROGRESS', false, 1, :token,"
    f" {_NOW} + interval '60 seconds', 0, {_NOW}, {_NOW}, {_NOW} + interval '1 day')"
    " ON CONFLICT (scope, key) DO NOTHING RETURNING id"
)
FLOOR_OUTCOME = sa.text(
    "UPDATE idempotency_records SET state = 'COMPLETED', retryable = false, response_status = :status,"
    " response_headers = CAST(:headers AS JSON), response_body = :body, lease_token = NULL,"
    f" locked_until = NULL, updated_at = {_NOW}, version = version + 1"
    " WHERE id = :id AND version = 1 AND lease_token = :token AND state = 'IN_PROGRESS'"
)


def _floor_claim(conn: Any, route: str) -> int | None:
    digest = hashlib.sha256(request.get_data()).hexdigest()
    params = {
        "scope": request.headers.get("X-Tenant") or "",
        "key": request.headers.get("Idempotency-Key") or secrets.token_hex(8),
        "hash": f"v1:{digest}",
        "path": request.path,
        "token": secrets.token_hex(16),
    }
    record_id = conn.execute(FLOOR_CLAIM, params).scalar()
    request.environ["floor.token"] = params["token"]
    return None if record_id is None else int(record_id)


def _floor_outcome(conn: Any, record_id: int, response: Any) -> None:
    params = {
        "status": response.status_code,
        "headers": json.dumps([[k, v] for k, v in response.headers.items() if k in ("Content-Type", "Location")]),
        "body": response.get_data(),
        "id": record_id,
        "token": request.environ["floor.token"],
    }
    conn.execute(FLOOR_OUTCOME, params)


def create_app() -> Flask:
    app = Flask(__name__)
    app.config["SQLALCHEMY_DATABASE_URI"] = os.environ["BENCH_DATABASE_URL"]
    app.config["SQLALCHEMY_TRACK_MODIFICATIONS"] = False
    # bench/durability.py: the same app with leased outcomes committed asynchronously ("off").
    app.config["IDEMPOTENCY_OUTCOME_SYNCHRONOUS_COMMIT"] = os.environ.get("BENCH_OUTCOME_SYNCHRONOUS_COMMIT") != "off"
    db.init_app(app)
    idempotency.init_app(app, db)

    @idempotency.scope_loader
    def load_scope() -> str | None:
        return request.headers.get("X-Tenant")

    peers = make_peer_functions(payment_body)

    @app.post("/bare")
    def bare() -> Any:
        return _created(payment_body(_command("bare")))

    @app.post("/leased")
    @idempotent
    def leased() -> Any:
        return _created(payment_body(_command("leased")))

    @app.post("/atomic")
    @idempotent(atomic=True)
    def atomic() -> Any:
        return _created(payment_body(_command("atomic"), commit=False))

    @app.post("/optional")
    @idempotent(required=False)
    def optional() -> Any:
        return _created(payment_body(_command("optional")))

    @app.post("/peer")
    def peer() -> Any:
        return _created(peers["peer"](command=_command("peer")))

    @app.post("/peer-validated")
    def peer_validated() -> Any:
        return _created(peers["peer_validated"](command=_command("peer_validated")))

    @app.errorhandler(IdempotencyAlreadyInProgressError)
    def peer_in_progress(exc: Exception) -> Any:
        return jsonify(error="in-progress"), 409

    @app.errorhandler(IdempotencyValidationError)
    def peer_payload_mismatch(exc: Exception) -> Any:
        return jsonify(error="payload-mismatch"), 422

    autocommit = None

    @app.post("/floor-leased")
    def floor_leased() -> Any:
        nonlocal autocommit
        if autocommit is None:
            autocommit = db.engine.execution_options(isolation_level="AUTOCOMMIT")
        with autocommit.connect() as conn:
            record_id = _floor_claim(conn, "floor-leased")
        if record_id is None:
            return jsonify(error="in-progress"), 409
        response = app.make_response(_created(payment_body(_command("floor-leased"))))
        with autocommit.connect() as conn:
            _floor_outcome(conn, record_id, response)
        return response

    @app.post("/floor-atomic")
    def floor_atomic() -> Any:
        conn = db.session.connection()
        record_id = _floor_claim(conn, "floor-atomic")
        if record_id is None:
            db.session.rollback()
            return jsonify(error="in-progress"), 409
        response = app.make_response(_created(payment_body(_command("floor-atomic"), commit=False)))
        _floor_outcome(conn, record_id, response)
        db.session.commit()
        return response

    @app.get("/healthz")
    def healthz() -> Any:
        return {"ok": True, "pid": os.getpid()}

    return app


def create_tables(app: Flask) -> None:
    with app.app_context():
        db.create_all()
        idempotency.create_all()
