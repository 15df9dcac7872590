"""A reference model of docs/behaviour.md, and a Hypothesis state machine that drives the real extension against it.

After every step the real response, the database row and the number of times each view body ran must match
the model. A crash is modelled as a claim whose process died: the record is put IN_PROGRESS with a lease
token nobody holds, exactly what a real claim leaves behind when its worker is killed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from flask import Flask, jsonify, request
from flask_sqlalchemy import SQLAlchemy
from helpers import code_of
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule, run_state_machine_as_test

from flask_idempotent import Idempotency, TransientError, idempotent
from flask_idempotent import operations as ops
from flask_idempotent.testing import LeaseClock

#: Also on the distributed-SQL emulations of ``IDEMPOTENCY_TEST_PG_VARIANTS`` (conftest).
PG_VARIANTS = True

LEASE = timedelta(seconds=60)
TTL = timedelta(hours=24)
OUTCOMES = [201, 404, 409, 500, 503, "transient", "exception"]
ROUTES = ["/m/leased", "/m/atomic"]


# The reference model ---------------------------------------------------------------------------------------


@dataclass
class ModelRecord:
    command: tuple[Any, ...]
    state: str
    retryable: bool
    attempts: int
    expires_at: datetime
    locked_until: datetime | None
    status: int | None = None
    body: bytes | None = None
    acknowledged: bool = False


@dataclass
class Model:
    """What the docs say should happen; a few dozen lines on purpose."""

    now: datetime
    records: dict[tuple[str, str], ModelRecord] = field(default_factory=dict)
    runs: dict[str, int] = field(default_factory=lambda: dict.fromkeys(ROUTES, 0))

    def live(self, scope: str, key: str) -> ModelRecord | None:
        rec = self.records.get((scope, key))
        if rec is not None and not self.undecided(rec) and rec.expires_at <= self.now:
            return None  # expired: treated as absent
        return rec

    @staticmethod
    def undecided(rec: ModelRecord) -> bool:
        """Awaiting a decision, so it never expires: IN_PROGRESS, or a final failure nobody acknowledged."""
        return rec.state == "IN_PROGRESS" or (rec.state == "FAILED" and not rec.retryable and not rec.acknowledged)

    @staticmethod
    def outcome(route: str, outcome: Any) -> tuple[int, str, bool]:
        status = {"transient": 503, "exception": 500}.get(outcome, outcome)
        if status in (408, 409, 425, 429, 502, 503, 504) or outcome == "transient":
            return status, "FAILED", True
        if status >= 500:
            return status, "FAILED", route == "/m/atomic"
        return status, "COMPLETED", False

    def request(self, scope: str, key: str, command: tuple[Any, ...], outcome: Any) -> tuple[str, int | None]:
        """Return (kind, status): kind is run, replay, conflict, in-progress, stuck or failed."""
        route = command[0]
        rec = self.live(scope, key)
        if rec is not None and rec.command != command:
            return "conflict", 422
        if rec is not None and rec.state == "COMPLETED":
            return "replay", rec.status
        if rec is not None and rec.state == "FAILED" and not rec.retryable:
            return ("replay", rec.status) if rec.status is not None else ("failed", 500)
        if rec is not None and rec.state == "IN_PROGRESS":
            assert rec.locked_until is not None
            return ("in-progress", 409) if rec.locked_until > self.now else ("stuck", 409)
        status, state, retryable = self.outcome(route, outcome)
        self.runs[route] += 1
        attempts = 1 if rec is None else rec.attempts + 1
        expires = self.now + TTL
        self.records[(scope, key)] = ModelRecord(command, state, retryable, attempts, expires, None, status)
        return "run", status

    def crash(self, scope: str, key: str, command: tuple[Any, ...]) -> bool:
        """A worker claims and dies. Returns False where the request would not have claimed."""
        rec = self.live(scope, key)
        if rec is not None and (rec.command != command or rec.state != "FAILED" or not rec.retryable):
            return False
        attempts = 1 if rec is None else rec.attempts + 1
        self.runs[command[0]] += 1
        self.records[(scope, key)] = ModelRecord(
            command, "IN_PROGRESS", False, attempts, self.now + TTL, self.now + LEASE
        )
        return True

    def operator(self, scope: str, key: str, action: str) -> bool:
        rec = self.records.get((scope, key))
        if rec is None:
            return False
        # docs/operating.md's operator table.
        if rec.state == "IN_PROGRESS" and rec.locked_until is not None and rec.locked_until > self.now:
            return False  # a live lease: nothing, not even release
        if action == "release":
            del self.records[(scope, key)]
            return True
        if rec.state == "COMPLETED":
            return False
        if action == "acknowledge":
            if rec.state != "FAILED" or rec.retryable or rec.acknowledged:
                return False
            rec.acknowledged = True
            rec.expires_at = self.now + TTL  # every decision starts the ttl afresh
            return True
        retryable = action == "mark_retryable"
        if rec.state == "FAILED" and rec.retryable == retryable:
            return False  # already so
        rec.state, rec.retryable, rec.locked_until = "FAILED", retryable, None
        rec.acknowledged = rec.acknowledged and not retryable
        rec.expires_at = self.now + TTL
        return True


# The real app ----------------------------------------------------------------------------------------------


def model_app(
    database_url: str, config: dict[str, object] | None = None
) -> tuple[Flask, SQLAlchemy, LeaseClock, dict[str, Any]]:
    app = Flask(__name__)
    app.config.update(SQLALCHEMY_DATABASE_URI=database_url, PROPAGATE_EXCEPTIONS=False, **(config or {}))
    db = SQLAlchemy()
    db.init_app(app)
    clock = LeaseClock()
    Idempotency(app, db, clock_offset=clock)
    switch: dict[str, Any] = {"outcome": 201}

    def body(route: str) -> Any:
        switch["runs"][route] += 1
        outcome = switch["outcome"]
        if outcome == "transient":
            raise TransientError("try later")
        if outcome == "exception":
            raise RuntimeError("ambiguous")
        return jsonify(route=route, n=switch["runs"][route], amount=request.get_json()["amount"]), outcome

    @app.post("/m/leased")
    @idempotent
    def leased() -> Any:
        return body("/m/leased")

    @app.post("/m/atomic")
    @idempotent(atomic=True)
    def atomic() -> Any:
        return body("/m/atomic")

    with app.app_context():
        db.drop_all()
        db.create_all()
    return app, db, clock, switch


scopes = st.sampled_from(["", "alice"])
keys = st.sampled_from(["k1", "k2", "k3"])
commands = st.tuples(st.sampled_from(ROUTES), st.sampled_from([1, 2]))


class Machine(RuleBasedStateMachine):
    app: Flask

    def __init__(self) -> None:
        super().__init__()
        app, db, clock, switch = self.setup
        with app.app_context(), db.engine.begin() as conn:
            for table in ("idempotency_events", "idempotency_records"):
                conn.execute(sa.text(f"DELETE FROM {table}"))
        clock.offset = timedelta(0)
        switch["runs"] = dict.fromkeys(ROUTES, 0)
        self.app, self.db, self.clock, self.switch = app, db, clock, switch
        self.model = Model(now=clock.now)
        self.client = app.test_client()
        self.hashes: dict[tuple[Any, ...], str] = {}

    setup: tuple[Flask, SQLAlchemy, LeaseClock, dict[str, Any]]

    @initialize()
    def start(self) -> None:
        pass

    def row(self, scope: str, key: str) -> Any:
        with self.app.app_context(), self.db.engine.connect() as conn:
            table = self.db.metadata.tables["idempotency_records"]
            return conn.execute(sa.select(table).where(table.c.scope == scope, table.c.key == key)).first()

    @rule(scope=scopes, key=keys, command=commands, outcome=st.sampled_from(OUTCOMES))
    def send(self, scope: str, key: str, command: tuple[Any, ...], outcome: Any) -> None:
        self.model.now = self.clock.now
        expected_kind, expected_status = self.model.request(scope, key, command, outcome)
        self.switch["outcome"] = outcome
        route, amount = command
        headers = {"Idempotency-Key": key, **({"X-Scope": scope} if scope else {})}
        response = self.client.post(route, json={"amount": amount}, headers=headers)
        assert response.status_code == expected_status, (expected_kind, response.data)
        replayed = response.headers.get("Idempotent-Replayed") == "true"
        assert replayed == (expected_kind in ("replay",)), expected_kind
        rec = self.model.records.get((scope, key))
        if expected_kind == "run":
            assert rec is not None
            rec.body = response.data
        elif expected_kind == "replay":
            assert rec is not None and response.data == rec.body
        else:
            code = code_of(response.get_json()["type"])
            assert (
                code
                == {"conflict": "key-reused", "in-progress": "in-progress", "stuck": "stuck", "failed": "failed"}[
                    expected_kind
                ]
            )

    @rule(scope=scopes, key=keys, command=commands)
    def crash(self, scope: str, key: str, command: tuple[Any, ...]) -> None:
        """A worker claims the key, runs the view body's outside effect, and is killed before settling."""
        row = self.row(scope, key)
        self.model.now = self.clock.now
        if not self.model.crash(scope, key, command):
            return
        self.switch["runs"][command[0]] += 1
        now = self.clock.now
        values = {
            "state": "IN_PROGRESS",
            "retryable": False,
            "lease_token": "dead-worker",
            "locked_until": now + LEASE,
            "updated_at": now,
            "expires_at": now + TTL,
            "attempts": self.model.records[(scope, key)].attempts,
            "response_status": None,
            "response_headers": None,
            "response_body": None,
            "error": None,
        }
        table = self.db.metadata.tables["idempotency_records"]
        with self.app.app_context(), self.db.engine.begin() as conn:
            if row is not None and row.state != "IN_PROGRESS" and row.expires_at <= now:
                conn.execute(sa.delete(table).where(table.c.id == row.id))
                row = None
            if row is None:
                # The hash a real claim would store: learned from the first real request with this command.
                conn.execute(
                    sa.insert(table).values(
                        scope=scope,
                        key=key,
                        request_hash=self.hashes.get(command, f"v1:unseen-{command}"),
                        method="POST",
                        path=command[0],
                        endpoint=None,
                        event_count=0,
                        created_at=now,
                        **values,
                    )
                )
            else:
                conn.execute(sa.update(table).where(table.c.id == row.id).values(**values))
        if command not in self.hashes:
            self.model.records.pop((scope, key))  # unseen hash: nothing real can match it; drop from both
            with self.app.app_context(), self.db.engine.begin() as conn:
                conn.execute(sa.delete(table).where(table.c.scope == scope, table.c.key == key))

    @rule(seconds=st.sampled_from([1, 61, 24 * 3600 + 1]))
    def advance(self, seconds: int) -> None:
        self.clock.advance(seconds=seconds)
        self.model.now = self.clock.now

    @rule(scope=scopes, key=keys, action=st.sampled_from(["mark_retryable", "mark_failed", "acknowledge", "release"]))
    def operate(self, scope: str, key: str, action: str) -> None:
        row = self.row(scope, key)
        self.model.now = self.clock.now
        allowed = self.model.operator(scope, key, action)
        if row is None:
            assert not allowed
            return
        with self.app.app_context():
            try:
                getattr(ops, action)(row.id, actor="model")
                done = True
            except ops.TransitionError:
                done = False
        assert done == allowed

    @invariant()
    def database_matches_model(self) -> None:
        with self.app.app_context(), self.db.engine.connect() as conn:
            table = self.db.metadata.tables["idempotency_records"]
            rows = {(r.scope, r.key): r for r in conn.execute(sa.select(table))}
        assert set(rows) == set(self.model.records)
        for where, rec in self.model.records.items():
            row = rows[where]
            assert (row.state, row.attempts) == (rec.state, rec.attempts), where
            if rec.state == "FAILED":
                assert row.retryable == rec.retryable
            assert (row.acknowledged_at is not None) == rec.acknowledged, where
            if rec.state != "IN_PROGRESS" or row.lease_token != "dead-worker":
                # One command, one hash; two commands never share one.
                known = self.hashes.setdefault(rec.command, row.request_hash)
                assert known == row.request_hash
        assert len(set(self.hashes.values())) == len(self.hashes)
        assert self.switch["runs"] == self.model.runs


def test_the_extension_behaves_like_the_model(database_url: str, database_config: dict[str, object]) -> None:
    setup = model_app(database_url, database_config)

    @setup[0].before_request
    def _scope() -> None:
        pass

    ext: Idempotency = setup[0].extensions["idempotency"]
    ext.scope_loader(lambda: request.headers.get("X-Scope"))
    Machine.setup = setup
    run_state_machine_as_test(
        Machine,
        settings=settings(
            max_examples=40, stateful_step_count=40, deadline=None, suppress_health_check=list(HealthCheck)
        ),
    )
    with setup[0].app_context():
        setup[1].drop_all()
        setup[1].engine.dispose()
