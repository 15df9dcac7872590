"""psycopg 3: the layer's own autocommit engine does not prepare statements and leaves no connection open
(see state.AppState.engine)."""

from __future__ import annotations

import gc
from typing import Any

import pytest
from conftest import with_driver
from flask import render_template_string
from helpers import ext
from testapp import Controls, build_app

from flask_idempotent.testing import LeaseClock

pytest.importorskip("psycopg")


@pytest.mark.postgresql_only
def test_the_layers_engine_on_psycopg_3_never_prepares_statements(postgres_url: str) -> None:
    app = build_app(with_driver(postgres_url, "psycopg"), clock=LeaseClock(), controls=Controls())
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


def _drop_an_app_holding_a_pooled_connection(postgres_url: str, *, render: bool) -> tuple[Any, Any]:
    """Build an app on psycopg 3, check one connection into the layer's own pool, drop the app undisposed;
    return that pool's engine and the driver's connection."""
    app = build_app(with_driver(postgres_url, "psycopg"), clock=LeaseClock(), controls=Controls())
    with app.app_context():
        if render:
            assert render_template_string("{{ 1 + 1 }}") == "2"
        own = app.extensions["idempotency"].state(app).engine
        with own.connect() as conn:
            raw = conn.connection.driver_connection
    assert own.pool.checkedin() == 1 and not raw.closed
    return own, raw  # the app goes with this frame


@pytest.mark.postgresql_only
def test_the_layers_engine_is_closed_when_its_app_is_dropped_undisposed(postgres_url: str) -> None:
    """An app dropped without ``db.engine.dispose()`` (a test suite's app per test): the layer's own pool closes
    its connections when the app is garbage-collected, so psycopg 3 has no open connection to warn about."""
    own, raw = _drop_an_app_holding_a_pooled_connection(postgres_url, render=False)
    gc.collect()
    assert own.pool.checkedin() == 0 and raw.closed


@pytest.mark.postgresql_only
def test_the_layers_engine_is_closed_in_one_collection_when_its_dropped_app_rendered_a_template(
    postgres_url: str,
) -> None:
    """Rendering a template (as any app does, or an extension adding a Jinja global) puts the app in a
    reference cycle (its Jinja environment points back at it), so only the garbage collector frees it: one
    ``gc.collect()`` still closes the layer's pool."""
    own, raw = _drop_an_app_holding_a_pooled_connection(postgres_url, render=True)
    gc.collect()
    assert own.pool.checkedin() == 0 and raw.closed
