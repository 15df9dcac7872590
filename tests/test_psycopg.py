"""psycopg 3: the layer's own autocommit engine does not prepare statements and leaves no connection open
(see state.AppState.engine)."""

from __future__ import annotations

import gc

import pytest
from conftest import Clock, with_driver
from helpers import ext
from testapp import Controls, build_app

pytest.importorskip("psycopg")


@pytest.mark.postgresql_only
def test_the_layers_engine_on_psycopg_3_never_prepares_statements(postgres_url: str) -> None:
    app = build_app(with_driver(postgres_url, "psycopg"), clock=Clock(), controls=Controls())
    with app.app_context():
        db = ext(app)["db"]
        state = app.extensions["idempotency"].state(app)
        try:
            with state.engine.connect() as conn:
                assert conn.connection.driver_connection.prepare_threshold is None
            with db.engine.connect() as conn:  # the app's own engine keeps the driver's default (5)
                assert conn.connection.driver_connection.prepare_threshold == 5
        finally:
            state.engine.dispose()
            db.engine.dispose()


@pytest.mark.postgresql_only
def test_the_layers_engine_is_closed_when_its_app_is_dropped_undisposed(postgres_url: str) -> None:
    """An app dropped without ``db.engine.dispose()`` (a test suite's app per test): the layer's own pool closes
    its connections when the app is garbage-collected, so psycopg 3 has no open connection to warn about."""
    app = build_app(with_driver(postgres_url, "psycopg"), clock=Clock(), controls=Controls())
    with app.app_context():
        own = app.extensions["idempotency"].state(app).engine
        with own.connect() as conn:
            raw = conn.connection.driver_connection
    assert own.pool.checkedin() == 1 and not raw.closed
    del app, conn
    gc.collect()
    assert own.pool.checkedin() == 0 and raw.closed
