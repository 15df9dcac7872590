"""Reading the database state the tests assert on."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any, TypeVar

import sqlalchemy as sa
from flask import Flask
from flask.testing import FlaskClient
from werkzeug.test import TestResponse

from flask_idempotent.testing import LeaseClock

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


def code_of(problem_type: str) -> str:
    """The problem code a problem ``type`` ends with: the URN's last part or the docs URL's last segment."""
    return problem_type.rsplit(":", 1)[-1].rsplit("/", 1)[-1]


def problem_body_code(body: Any, status: int) -> str:
    """The code of a problem+json body answered with ``status``; asserts its status, title and detail."""
    assert body["status"] == status and body["title"] and body["detail"], body
    return code_of(str(body["type"]))


def problem_code(response: TestResponse) -> str:
    """The problem code of a test client's response, which must be ``application/problem+json``."""
    assert response.mimetype == "application/problem+json", response.data
    return problem_body_code(response.get_json(force=True), response.status_code)


def reads(clock: LeaseClock, stored: datetime, plus: timedelta = timedelta(0), margin: float = 5.0) -> bool:
    """Whether ``stored`` is ``clock``'s time (plus ``plus``) when written: within ``margin`` seconds."""
    return abs((stored - plus - clock.now).total_seconds()) <= margin
