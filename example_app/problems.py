"""The example's own errors, as RFC 9457 problem details like the extension's."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import NoReturn

from flask import Response, abort

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
