"""Reading the database state the tests assert on."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import sqlalchemy as sa
from flask import Flask
from flask.testing import FlaskClient
from werkzeug.test import TestResponse

T = TypeVar("T")


def in_app(app: Flask, func: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Call ``func`` (an operations API function, say) inside an app context of ``app``."""
    with app.app_context():
        return func(*args, **kwargs)


def ext(app: Flask) -> dict[str, Any]:
    return app.extensions["test"]  # type: ignore[no-any-return]


def records(app: Flask) -> list[dict[str, Any]]:
    with app.app_context():
        table = ext(app)["db"].metadata.tables["idempotency_records"]
        with ext(app)["db"].engine.connect() as conn:
            return [dict(r._mapping) for r in conn.execute(sa.select(table).order_by(table.c.id))]


def record(app: Flask, key: str, scope: str = "") -> dict[str, Any] | None:
    found = [r for r in records(app) if r["key"] == key and r["scope"] == scope]
    return found[0] if found else None


def events(app: Flask, kind: str | None = None) -> list[dict[str, Any]]:
    with app.app_context():
        table = ext(app)["db"].metadata.tables["idempotency_events"]
        query = sa.select(table).order_by(table.c.id)
        if kind is not None:
            query = query.where(table.c.kind == kind)
        with ext(app)["db"].engine.connect() as conn:
            return [dict(r._mapping) for r in conn.execute(query)]


def charges(app: Flask, route: str | None = None) -> int:
    with app.app_context():
        table = ext(app)["db"].metadata.tables["charges"]
        query = sa.select(sa.func.count()).select_from(table)
        if route is not None:
            query = query.where(table.c.route == route)
        with ext(app)["db"].engine.connect() as conn:
            return int(conn.execute(query).scalar_one())


def post(
    client: FlaskClient, path: str, key: str | None = "k-1", *, user: str | None = None, **kwargs: Any
) -> TestResponse:
    headers = dict(kwargs.pop("headers", {}))
    if key is not None:
        headers["Idempotency-Key"] = key
    if user is not None:
        headers["X-User"] = user
    return client.post(path, headers=headers, **kwargs)


def problem_code(response: TestResponse) -> str:
    assert response.mimetype == "application/problem+json", response.data
    body = response.get_json(force=True)
    assert body["status"] == response.status_code
    assert body["title"] and body["detail"]
    return str(body["type"]).rsplit(":", 1)[-1].rsplit("/", 1)[-1]
