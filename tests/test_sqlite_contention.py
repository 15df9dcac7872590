"""SQLite under write contention: an atomic request holds SQLite's one write lock while its view runs.

SQLite is the embedded store for development and one host. While an atomic view holds the write lock past the
busy timeout, a brand-new key is answered 503 ``store-unavailable`` with ``Retry-After`` (never ``in-progress``:
nothing is in progress under that key), and a leased request whose view already ran waits the lock out to
store its outcome instead of leaving the record stuck.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from concurrency import Background
from flask import Flask
from helpers import ext, post, problem_code, record
from testapp import Controls, build_app

from flask_idempotent.testing import LeaseClock

BUSY_TIMEOUT = 0.2  # seconds pysqlite waits for the write lock before "database is locked"


@pytest.fixture
def sqlite_app(tmp_path: Path) -> Iterator[Flask]:
    app = build_app(
        f"sqlite:///{tmp_path / 'contention.db'}",
        clock=LeaseClock(),
        controls=Controls(),
        SQLALCHEMY_ENGINE_OPTIONS={"connect_args": {"timeout": BUSY_TIMEOUT}},
    )
    with app.app_context():
        ext(app)["db"].create_all()
    yield app
    with app.app_context():
        ext(app)["db"].engine.dispose()


def hold_atomic(app: Flask) -> tuple[Any, Background]:
    """An atomic request parked in its view: its transaction holds SQLite's write lock."""
    held = ext(app)["controls"].hold("transfers")
    owner = Background(app, "/transfers", key="atomic-1", json={"amount": 1})
    assert held.entered.wait(10)
    return held, owner


def test_a_new_key_while_the_write_lock_is_held_is_503_not_in_progress(sqlite_app: Flask) -> None:
    held, owner = hold_atomic(sqlite_app)
    try:
        busy = post(sqlite_app.test_client(), "/payments", key="new-key", json={"amount": 5})
        assert busy.status_code == 503 and problem_code(busy) == "store-unavailable"
        assert busy.headers["Retry-After"] == "1"
        assert ext(sqlite_app)["controls"].runs["payments"] == 0
    finally:
        held.release.set()
    assert owner.result().status_code == 201
    assert record(sqlite_app, "new-key") is None  # nothing was claimed: the retry runs as new
    assert post(sqlite_app.test_client(), "/payments", key="new-key", json={"amount": 5}).status_code == 201


def test_an_outcome_waits_out_the_write_lock_instead_of_leaving_the_record_stuck(
    sqlite_app: Flask, monkeypatch: pytest.MonkeyPatch
) -> None:
    controls = ext(sqlite_app)["controls"]
    leased_held = controls.hold("phases-after-charge")
    leased = Background(sqlite_app, "/phases", key="leased-1", json={"order": 5})
    assert leased_held.entered.wait(10)  # claimed, its effect written and committed, its view still running

    waiting = threading.Event()
    real_sleep = __import__("time").sleep

    def observed_sleep(seconds: float) -> None:
        waiting.set()  # the outcome write met the lock and is waiting it out
        real_sleep(seconds)

    monkeypatch.setattr("flask_idempotent.pipeline.time.sleep", observed_sleep)
    atomic_held, atomic = hold_atomic(sqlite_app)
    leased_held.release.set()  # the leased view returns 201 while the atomic one holds the lock
    assert waiting.wait(10)
    assert record(sqlite_app, "leased-1")["state"] == "IN_PROGRESS"
    atomic_held.release.set()
    assert atomic.result().status_code == 201
    assert leased.result().status_code == 201
    row = record(sqlite_app, "leased-1")
    assert (row["state"], row["response_status"]) == ("COMPLETED", 201)  # stored, not stuck
    replay = post(sqlite_app.test_client(), "/phases", key="leased-1", json={"order": 5})
    assert replay.headers["Idempotent-Replayed"] == "true" and controls.runs["phases"] == 1
