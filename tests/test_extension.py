"""Registering the extension, its configuration, PROTECT_ALL, signals and logging."""

from __future__ import annotations

import logging
import types
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from flask import Flask
from flask.testing import FlaskClient
from flask_sqlalchemy import SQLAlchemy
from helpers import charges, ext, post, records
from sqlalchemy.engine.default import DefaultDialect

from flask_idempotent import ConfigurationError, Idempotency, idempotent, signals


def bare_app(tmp_path: Path, **config: Any) -> tuple[Flask, SQLAlchemy]:
    app = Flask(__name__)
    app.config.update({"SQLALCHEMY_DATABASE_URI": f"sqlite:///{tmp_path / 'x.db'}", **config})
    db = SQLAlchemy()
    db.init_app(app)
    return app, db


def test_init_app_registers_once(tmp_path: Path) -> None:
    app, db = bare_app(tmp_path)
    idempotency = Idempotency(app, db)
    assert app.extensions["idempotency"] is idempotency
    with pytest.raises(RuntimeError, match="already registered"):
        idempotency.init_app(app, db)


def test_create_all_creates_the_two_tables(tmp_path: Path) -> None:
    app, db = bare_app(tmp_path)
    idempotency = Idempotency()
    idempotency.init_app(app, db)
    with app.app_context():
        idempotency.create_all()
        assert {"idempotency_records", "idempotency_events"} <= set(sa.inspect(db.engine).get_table_names())


def test_state_outside_a_registered_app_is_a_clear_error(tmp_path: Path) -> None:
    app, _ = bare_app(tmp_path)
    with app.app_context(), pytest.raises(RuntimeError, match="not registered"):
        Idempotency().state()


class NoStoreDialect(DefaultDialect):
    """A database the store has no statements for, loaded without any driver (nothing connects)."""

    name = "nostore"
    supports_statement_cache = True

    @classmethod
    def import_dbapi(cls) -> Any:
        return types.SimpleNamespace(paramstyle="named")


sa.dialects.registry.register("nostore", __name__, "NoStoreDialect")


def test_a_database_of_an_unsupported_dialect_is_refused_at_init_app(tmp_path: Path) -> None:
    app, db = bare_app(tmp_path, SQLALCHEMY_DATABASE_URI="nostore://host/db")
    with pytest.raises(ConfigurationError) as refused:
        Idempotency(app, db)
    message = str(refused.value)
    assert "'nostore'" in message and "supported are postgresql, sqlite, mysql, mariadb" in message
    assert isinstance(refused.value, ValueError)  # invalid config raises ValueError at init_app, as documented
    assert "idempotency" not in app.extensions


@pytest.mark.parametrize("url", ["mysql+pymysql://u@127.0.0.1:1/x", "mariadb+pymysql://u@127.0.0.1:1/x"])
def test_mysql_and_mariadb_urls_are_accepted_without_connecting(tmp_path: Path, url: str) -> None:
    app, db = bare_app(tmp_path, SQLALCHEMY_DATABASE_URI=url)  # nothing listens on port 1
    assert Idempotency(app, db) is app.extensions["idempotency"]


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"IDEMPOTENCY_REPLAY_HEADERS": ["Set-Cookie"]}, "Set-Cookie"),
        ({"IDEMPOTENCY_ON_STALE": "retry"}, "on_stale"),
        ({"IDEMPOTENCY_IN_PROGRESS_STATUS": 500}, "in_progress_status"),
        ({"IDEMPOTENCY_LEASE": -1}, "IDEMPOTENCY_LEASE"),
    ],
)
def test_bad_configuration_fails_at_init_app(tmp_path: Path, config: dict[str, Any], message: str) -> None:
    app, db = bare_app(tmp_path, **config)
    with pytest.raises(ValueError, match=message):
        Idempotency(app, db)


@pytest.mark.parametrize(
    "options", [{"on_stale": "maybe"}, {"in_progress_status": 200}, {"lease": 0}, {"wait": -1}, {"ttl": "1h"}]
)
def test_bad_decorator_options_fail_at_import_time(options: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        idempotent(**options)


def test_transient_option_takes_exception_types() -> None:
    with pytest.raises(TypeError):
        idempotent(transient=("not a type",))  # type: ignore[arg-type]


@pytest.mark.parametrize("app_config", [{"IDEMPOTENCY_PROTECT_ALL": True}])
def test_protect_all_covers_undecorated_unsafe_routes_and_exempt_opts_out(app: Flask, client: FlaskClient) -> None:
    db, charge = ext(app)["db"], ext(app)["Charge"]

    @app.post("/plain")
    def plain() -> Any:
        db.session.add(charge(amount=1, route="plain"))
        db.session.commit()
        return {"ok": True}, 201

    @app.post("/webhook")
    @idempotent(exempt=True)
    def webhook() -> Any:
        return {"ok": True}, 200

    assert post(client, "/plain", key=None, json={}).status_code == 400
    assert post(client, "/plain", json={}).status_code == 201
    assert post(client, "/plain", json={}).headers["Idempotent-Replayed"] == "true"
    assert charges(app, "plain") == 1
    assert post(client, "/webhook", key=None, json={}).status_code == 200
    assert client.get("/payments").status_code == 200
    assert [r["path"] for r in records(app)] == ["/plain"]


@pytest.mark.parametrize("app_config", [{"IDEMPOTENCY_REPLAY_HEADERS": ["X-Not-Replayed"]}])
def test_configured_replay_headers_are_replayed(app: Flask, client: FlaskClient) -> None:
    post(client, "/payments", json={})
    assert post(client, "/payments", json={}).headers["X-Not-Replayed"] == "live-only"


def test_signals_tell_the_story_of_a_record(app: Flask, client: FlaskClient) -> None:
    seen: list[str] = []
    subscriptions = [
        (signals.record_claimed, "claimed"),
        (signals.record_completed, "completed"),
        (signals.record_failed, "failed"),
        (signals.response_replayed, "replayed"),
        (signals.key_conflict, "conflict"),
    ]
    receivers = []
    for signal, name in subscriptions:

        def receiver(sender: Flask, name: str = name, **kwargs: Any) -> None:
            seen.append(name)

        receivers.append(receiver)
        signal.connect(receiver, app)
    try:
        post(client, "/payments", json={"amount": 1})
        post(client, "/payments", json={"amount": 1})
        post(client, "/payments", json={"amount": 2})
        ext(app)["controls"].status = 503
        post(client, "/payments", key="k-2", json={})
    finally:
        for (signal, _), receiver in zip(subscriptions, receivers, strict=True):
            signal.disconnect(receiver, app)
    assert seen == ["claimed", "completed", "replayed", "conflict", "claimed", "failed"]


def test_store_errors_are_logged_under_flask_idempotent(
    app: Flask, client: FlaskClient, caplog: pytest.LogCaptureFixture
) -> None:
    with app.app_context():
        db = ext(app)["db"]
        db.metadata.tables["idempotency_records"].drop(db.engine)
    with caplog.at_level(logging.ERROR, logger="flask_idempotent"):
        assert post(client, "/payments", json={}).status_code == 503
    assert any(r.name == "flask_idempotent" and "unavailable" in r.getMessage() for r in caplog.records)
    with app.app_context():
        db.metadata.tables["idempotency_records"].create(db.engine)


def test_client_caused_events_are_capped_per_record(app: Flask, client: FlaskClient) -> None:
    from helpers import events, record

    from flask_idempotent.pipeline import MAX_CLIENT_EVENTS_PER_RECORD

    post(client, "/payments", json={"amount": 1})
    for amount in range(2, MAX_CLIENT_EVENTS_PER_RECORD + 12):
        assert post(client, "/payments", json={"amount": amount}).status_code == 422
    assert len(events(app, "conflict")) == MAX_CLIENT_EVENTS_PER_RECORD
    assert record(app, "k-1")["event_count"] == MAX_CLIENT_EVENTS_PER_RECORD + 10


def test_leased_statements_use_an_autocommit_engine_disposed_with_the_apps(app: Flask, client: FlaskClient) -> None:
    assert post(client, "/payments", json={"amount": 1}).status_code == 201
    state = app.extensions["idempotency"].state(app)
    with app.app_context():
        engine, own = ext(app)["db"].engine, state.engine
        events = state.tables.events
        with own.connect() as conn:  # autocommit: visible to others at once, without a commit
            conn.execute(sa.insert(events).values(scope="", key="k", kind="probe", created_at=state.store.now(conn)))
            with engine.connect() as other:
                assert other.execute(sa.select(sa.func.count()).select_from(events)).scalar_one() == 1
        if engine.dialect.name == "sqlite":
            assert own.pool is engine.pool  # an in-memory database lives in the app's pool
            return
        # PostgreSQL: a pool of its own on the same URL and SQLALCHEMY_ENGINE_OPTIONS (pool_size=20 here).
        assert own.pool is not engine.pool and own.url == engine.url and own.pool.size() == 20
        assert own.pool.checkedin() >= 1
        engine.dispose()
        assert own.pool.checkedin() == 0  # disposed with the app's engine: no connections left behind
