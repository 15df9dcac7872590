"""The example's own errors, as RFC 9457 problem details like the extension's."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Mapping
from typing import NoReturn

from flask import Response, abort, current_app, request
from sqlalchemy import exc as sa_exc
from werkzeug.wrappers import Response as WerkzeugResponse

from flask_idempotent import StoreUnavailable

from .extensions import db

PROBLEM_TYPE_BASE = "urn:example-app:problem:"


def problem(status: int, code: str, title: str, detail: str, *, headers: Mapping[str, str] | None = None) -> Response:
    body = {"type": PROBLEM_TYPE_BASE + code, "title": title, "status": status, "detail": detail}
    response = Response(json.dumps(body), status=status, mimetype="application/problem+json")
    response.headers.update(headers or {})
    return response


def abort_problem(
    status: int, code: str, title: str, detail: str, *, headers: Mapping[str, str] | None = None
) -> NoReturn:
    abort(problem(status, code, title, detail, headers=headers))


#: What a database outage raises: the server is gone or refuses connections (``OperationalError``), the
#: connection broke under a statement (``InterfaceError``), or the pool found no free connection in time.
DATABASE_DOWN = (sa_exc.OperationalError, sa_exc.InterfaceError, sa_exc.TimeoutError)


def database_unavailable(exc: Exception) -> WerkzeugResponse:
    """Error handler of the API blueprints for :data:`DATABASE_DOWN`: 503 ``store-unavailable`` with Retry-After.

    The same answer (type, title, status) the idempotency layer gives when it cannot reach its records, so a
    client sees one outage answer wherever the request was when the database went away: in the token lookup
    (which runs before the layer's hook), in the layer, or in the view. The log gets one line, no traceback.
    """
    orig = getattr(exc, "orig", None) or exc
    first = (str(orig).strip().splitlines() or [""])[0][:300]
    current_app.logger.error(
        "database unavailable during %s %s: %s: %s", request.method, request.path, type(orig).__name__, first
    )
    with contextlib.suppress(Exception):
        db.session.rollback()  # a broken connection goes back to the pool invalidated
    unavailable = StoreUnavailable("The database cannot be reached; nothing was done. Retry later.", retry_after=1)
    response = unavailable.get_response()
    assert isinstance(response, WerkzeugResponse)
    return response
