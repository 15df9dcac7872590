"""Fail closed: when the record store cannot be reached, no protected view runs."""

from __future__ import annotations

from pathlib import Path

import pytest
from flask import Flask
from flask.testing import FlaskClient
from helpers import ext, post, problem_code
from testapp import Controls, build_app


def unreachable_url(kind: str, tmp_path: Path) -> str:
    if kind == "sqlite":
        return f"sqlite:///{tmp_path / 'missing-dir' / 'db.sqlite'}"  # cannot be opened
    driver = {"postgresql": "psycopg2", "postgresql-psycopg": "psycopg"}[kind]  # each raises its own errors
    return f"postgresql+{driver}://root@127.0.0.1:1/nowhere?connect_timeout=2"  # nothing listens on port 1


@pytest.mark.parametrize("kind", ["sqlite", "postgresql", "postgresql-psycopg"])
def test_unreachable_store_answers_503_and_the_view_never_runs(kind: str, tmp_path: Path, clock) -> None:
    controls = Controls()
    app = build_app(unreachable_url(kind, tmp_path), clock=clock, controls=controls)
    client = app.test_client()
    for path in ("/payments", "/transfers"):
        response = post(client, path, json={"amount": 1})
        assert response.status_code == 503
        assert problem_code(response) == "store-unavailable"
        assert response.headers["Retry-After"] == "1"
    assert sum(controls.runs.values()) == 0


def test_missing_tables_fail_closed_too(app: Flask, client: FlaskClient) -> None:
    with app.app_context():
        db = ext(app)["db"]
        db.metadata.tables["idempotency_records"].drop(db.engine)
    response = post(client, "/payments", json={"amount": 1})
    assert response.status_code == 503
    assert ext(app)["controls"].runs["payments"] == 0
    with app.app_context():
        db.metadata.tables["idempotency_records"].create(db.engine)
    assert post(client, "/payments", json={"amount": 1}).status_code == 201  # recovers by itself
