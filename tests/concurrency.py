"""Running a request in a thread while the test holds it inside the view (no sleeps: events)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from flask import Flask
from testapp import Hold
from werkzeug.test import TestResponse


class InThread:
    """Run ``call`` in a thread; ``result()`` joins it and returns what it returned (or raises what it raised)."""

    def __init__(self, call: Callable[[], Any]) -> None:
        self._outcome: list[Any] = []
        self._error: BaseException | None = None

        def run() -> None:
            try:
                self._outcome.append(call())
            except BaseException as exc:  # handed to the test by result()
                self._error = exc

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()

    def result(self, timeout: float = 30) -> Any:
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "the background call never finished"
        if self._error is not None:
            raise self._error
        return self._outcome[0]


class Background(InThread):
    """POST one request to ``app`` from a thread (``key`` in ``Idempotency-Key``); ``held``: the hold it will
    meet in the view, which :func:`finish` releases."""

    def __init__(
        self, app: Flask, path: str, key: str | None = "k-1", *, held: Hold | None = None, **kwargs: Any
    ) -> None:
        self.held = held
        headers = dict(kwargs.pop("headers", {}))
        if key is not None:
            headers["Idempotency-Key"] = key
        super().__init__(lambda: app.test_client().post(path, headers=headers, **kwargs))

    def result(self, timeout: float = 30) -> TestResponse:
        response: TestResponse = super().result(timeout)
        return response


def make_stuck(app: Flask, clock: Any, key: str = "stuck-1", amount: int = 1) -> Background:
    """A real request that claimed ``key`` and hangs in the view while the test clock runs its lease out."""
    held = app.extensions["test"]["controls"].hold("payments")
    owner = Background(app, "/payments", key=key, json={"amount": amount}, held=held)
    assert held.entered.wait(10)
    clock.advance(minutes=12)
    return owner


def finish(owner: Background) -> None:
    """Let a held request go and wait for its answer."""
    assert owner.held is not None, "finish() is for a request started with held="
    owner.held.release.set()
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
