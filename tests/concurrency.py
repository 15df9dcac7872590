"""Running a request in a thread while the test holds it inside the view (no sleeps: events)."""

from __future__ import annotations

import threading
from typing import Any

from flask import Flask
from werkzeug.test import TestResponse


class Background:
    """Send one request from a thread; ``result()`` joins and returns the response (or raises its error)."""

    def __init__(self, app: Flask, path: str, key: str | None = "k-1", **kwargs: Any) -> None:
        self._response: TestResponse | None = None
        self._error: BaseException | None = None
        headers = dict(kwargs.pop("headers", {}))
        if key is not None:
            headers["Idempotency-Key"] = key

        def run() -> None:
            try:
                self._response = app.test_client().post(path, headers=headers, **kwargs)
            except BaseException as exc:  # reported by result()
                self._error = exc

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()

    def result(self, timeout: float = 30) -> TestResponse:
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "background request did not finish"
        if self._error is not None:
            raise self._error
        assert self._response is not None
        return self._response
