"""The app the tests drive: a few payment-like views, each counting how often its body ran."""

from __future__ import annotations

import threading
from collections import Counter
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from flask import Flask, jsonify, request
from flask_sqlalchemy import SQLAlchemy
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from flask_idempotent import Idempotency, TransientError, current_record, idempotent


class Controls:
    """Switches a test flips to make the views misbehave, and counters of view-body runs."""

    def __init__(self) -> None:
        self.status: int | None = None
        self.exception: BaseException | None = None
        self.commit_in_view = False
        self.runs: Counter[str] = Counter()
        self._lock = threading.Lock()
        self.seen: list[dict[str, Any]] = []
        self._holds: dict[str, Hold] = {}

    def hold(self, name: str) -> Hold:
        """Block the next view that reaches step ``name`` (once): the test waits for ``entered``, sets ``release``."""
        held = self._holds[name] = Hold(threading.Event(), threading.Event())
        return held

    def ran(self, name: str) -> None:
        with self._lock:
            self.runs[name] += 1
            held = self._holds.pop(name, None)
        if held is not None:
            held.entered.set()
            assert held.release.wait(30), "test never released the held view"


@dataclass(frozen=True)
class Hold:
    """A view parked at a step: ``entered`` when it got there, it goes on when the test sets ``release``."""

    entered: threading.Event
    release: threading.Event


def build_app(database_url: str, *, clock: Any, controls: Controls, **config: Any) -> Flask:
    app = Flask(__name__)
    default_engine_options = {"pool_size": 20} if not database_url.startswith("sqlite") else {}
    app.config.update(
        SQLALCHEMY_DATABASE_URI=database_url,
        SQLALCHEMY_ENGINE_OPTIONS=config.pop("SQLALCHEMY_ENGINE_OPTIONS", default_engine_options),
        TESTING=True,
        SECRET_KEY="test",
        **config,
    )

    class Base(DeclarativeBase):  # a fresh metadata per app
        pass

    db = SQLAlchemy(model_class=Base)

    class Charge(db.Model):  # type: ignore[name-defined,misc]
        __tablename__ = "charges"
        id: Mapped[int] = mapped_column(primary_key=True)
        amount: Mapped[int]
        route: Mapped[str] = mapped_column(sa.String(64))

    db.init_app(app)

    @app.teardown_request  # registered first, so it runs after the extension's teardown
    def end_session(exc: BaseException | None) -> None:
        # As in production, where every request has an app context (and so a session) of its own: pytest-flask
        # keeps one context around the whole test, and on MariaDB (REPEATABLE READ) a session left open would
        # read a later request's data from the snapshot of an earlier one.
        db.session.remove()

    idempotency = Idempotency(clock_offset=clock)
    idempotency.init_app(app, db)
    app.extensions["test"] = {"db": db, "Charge": Charge, "idempotency": idempotency, "controls": controls}

    @idempotency.scope_loader
    def scope() -> str | None:
        return request.headers.get("X-User")

    def charge(route: str, *, commit: bool = True) -> Any:
        controls.ran(route)
        if controls.exception is not None:
            raise controls.exception
        body = request.get_json(silent=True) or {}
        row = Charge(amount=int(body.get("amount", 0)), route=route)
        db.session.add(row)
        if commit:
            db.session.commit()
        else:
            db.session.flush()
        return row

    def created(row: Any) -> Any:
        try:
            attempt = current_record.attempt
        except RuntimeError:  # an optional route called without a key
            attempt = None
        response = jsonify(id=row.id, amount=row.amount, attempt=attempt)
        response.status_code = controls.status or 201
        response.headers["Location"] = f"/payments/{row.id}"
        response.headers["X-Not-Replayed"] = "live-only"
        response.set_cookie("session_hint", "secret")
        return response

    @app.post("/payments")
    @idempotent
    def create_payment() -> Any:
        return created(charge("payments"))

    @app.get("/payments")
    def list_payments() -> Any:
        return jsonify(count=db.session.query(Charge).count())

    @app.post("/accounts/<int:account>/refunds")
    @idempotent
    def refund(account: int) -> Any:
        return created(charge(f"refunds-{account}"))

    @app.post("/other")
    @idempotent
    def other() -> Any:
        return created(charge("other"))

    @app.post("/optional")
    @idempotent(required=False)
    def optional() -> Any:
        return created(charge("optional"))

    @app.post("/transfers")
    @idempotent(atomic=True)
    def transfer() -> Any:
        row = charge("transfers", commit=False)
        if controls.commit_in_view:
            db.session.commit()
        return created(row)

    @app.post("/async")
    @idempotent
    async def async_payment() -> Any:
        return created(charge("async"))

    @app.post("/flaky")
    @idempotent(transient=(ConnectionError,))
    def flaky() -> Any:
        return created(charge("flaky"))

    @app.post("/transient")
    @idempotent
    def transient() -> Any:
        controls.ran("transient")
        raise TransientError("provider timed out")

    def rebuild(ref: Any) -> Any:
        row = db.session.get(Charge, ref["charge"])
        if row is None:
            return None  # gone: the layer answers 410 resource-gone
        return jsonify(id=row.id, amount=row.amount, rebuilt=True)

    @app.post("/resources")
    @idempotent(replay=rebuild)
    def resource() -> Any:
        row = charge("resources")
        current_record.set_resource({"charge": row.id})
        return created(row)

    @app.post("/custom")
    @idempotent(fingerprint=lambda: {"amount": (request.get_json() or {}).get("amount")})
    def custom() -> Any:
        return created(charge("custom"))

    @app.post("/upload")
    @idempotent
    def upload() -> Any:
        controls.ran("upload")
        files = {name: f.read().decode() for name, f in request.files.items()}
        row = Charge(amount=len(files), route="upload")
        db.session.add(row)
        db.session.commit()
        return jsonify(id=row.id, form=request.form.to_dict(), files=files), 201

    @app.post("/phases")
    @idempotent(on_stale="takeover", lease=30)
    def phases() -> Any:
        controls.seen.append(
            {
                "point": current_record.recovery_point,
                "data": current_record.recovery_data,
                "attempt": current_record.attempt,
            }
        )
        if current_record.recovery_point is None:
            row = charge("phases")
            current_record.checkpoint("charged", {"charge": row.id})
            controls.ran("phases-after-charge")  # a test holds or crashes here
            if controls.exception is not None:
                raise controls.exception
            charge_id = row.id
        else:
            controls.ran("phases-resumed")  # a test holds a resuming owner here
            charge_id = current_record.recovery_data["charge"]
        return jsonify(charge=charge_id, attempt=current_record.attempt), 201

    return app
