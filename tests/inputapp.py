"""``testapp`` as gunicorn serves it for the request-input tests: ``gunicorn 'inputapp:create_app()'``.

Configured from the environment: ``INPUTAPP_DATABASE_URL`` (required; SQLite or PostgreSQL) and
``INPUTAPP_MAX_BODY_BYTES`` (``IDEMPOTENCY_MAX_BODY_BYTES``, default: the extension's own). Every view run writes a
row to ``charges``, which the test reads from its own process. Besides testapp's routes:

- ``GET /health``: the worker's pid, for :meth:`procs.Gunicorn.wait_ready`;
- ``POST /echo`` (idempotent): the length and sha256 of the body the view reads with ``request.get_data()``;
- ``POST /export`` (idempotent, atomic): writes a charge row, then streams ``{"mib": n}`` MiB of
  :data:`EXPORT_CHUNK` repeats (one bytes object, so the view itself holds 1 MiB).
- ``POST /notes/<name>`` (idempotent, ``describe=`` the body's ``summary``): the name, for stored-text tests.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

from flask import Flask, Response, jsonify, request
from testapp import Controls, build_app

from flask_idempotent import idempotent

#: What ``/export`` streams, over and over: 1 MiB.
EXPORT_CHUNK = bytes(range(256)) * 4096


def create_app() -> Flask:
    config: dict[str, Any] = {}
    if os.environ.get("INPUTAPP_MAX_BODY_BYTES"):
        config["IDEMPOTENCY_MAX_BODY_BYTES"] = int(os.environ["INPUTAPP_MAX_BODY_BYTES"])
    app = build_app(os.environ["INPUTAPP_DATABASE_URL"], clock=lambda: timedelta(0), controls=Controls(), **config)
    ext = app.extensions["test"]

    @app.get("/health")
    def health() -> Any:
        return jsonify(pid=os.getpid())

    @app.post("/echo")
    @idempotent
    def echo() -> Any:
        data = request.get_data()
        ext["db"].session.add(ext["Charge"](amount=len(data), route="echo"))
        ext["db"].session.commit()
        return jsonify(length=len(data), sha256=hashlib.sha256(data).hexdigest()), 201

    @app.post("/export")
    @idempotent(atomic=True)
    def export() -> Any:
        ext["db"].session.add(ext["Charge"](amount=1, route="export"))
        mib = int(request.get_json()["mib"])

        def chunks() -> Iterator[bytes]:
            for _ in range(mib):
                yield EXPORT_CHUNK

        return Response(chunks(), 200, mimetype="text/csv")

    @app.post("/notes/<name>")
    @idempotent(describe=lambda: (request.get_json(silent=True) or {}).get("summary"))
    def note(name: str) -> Any:
        ext["db"].session.add(ext["Charge"](amount=len(name), route="notes"))
        ext["db"].session.commit()
        return jsonify(name=name), 201

    return app
