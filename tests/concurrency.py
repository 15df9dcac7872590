"""Running a request in a thread while the test holds it inside the view (no sleeps: events)."""

from __future__ import annotations

import threading
import time
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


def make_stuck(app: Flask, clock: Any, key: str = "stuck-1", amount: int = 1) -> Background:
    """A real request that claimed ``key`` and hangs in the view while the test clock runs its lease out."""
    controls = app.extensions["test"]["controls"]
    controls.hold_at = "payments"
    owner = Background(app, "/payments", key=key, json={"amount": amount})
    assert controls.entered.wait(10)
    clock.advance(minutes=12)
    return owner


def finish(app: Flask, owner: Background) -> None:
    """Let a held request go and wait for its answer."""
    app.extensions["test"]["controls"].release.set()
    owner.result()


def observe_polling(monkeypatch: Any) -> threading.Event:
    """An event set once a duplicate finds its key in flight and starts polling (it sleeps between reads)."""
    polling = threading.Event()
    real_sleep = time.sleep

    def observed_sleep(seconds: float) -> None:
        polling.set()
        real_sleep(seconds)

    monkeypatch.setattr("flask_idempotent.pipeline.time.sleep", observed_sleep)
    return polling
