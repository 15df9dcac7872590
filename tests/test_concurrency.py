"""Many clients, one key: the effect runs exactly once. Ordering comes from events, not sleeps."""

from __future__ import annotations

import queue
import threading

from flask import Flask
from helpers import charges, ext, record
from werkzeug.test import TestResponse

#: Also on the distributed-SQL emulations of ``IDEMPOTENCY_TEST_PG_VARIANTS`` (conftest).
PG_VARIANTS = True

THREADS = 12


def test_storm_of_one_key_runs_the_view_once_and_answers_409_to_the_rest(app: Flask) -> None:
    controls = ext(app)["controls"]
    held = controls.hold("payments")  # whoever claims first blocks inside the view
    answers: queue.Queue[TestResponse] = queue.Queue()
    barrier = threading.Barrier(THREADS)

    def send() -> None:
        client = app.test_client()
        barrier.wait(10)
        answers.put(client.post("/payments", headers={"Idempotency-Key": "storm"}, json={"amount": 10}))

    threads = [threading.Thread(target=send, daemon=True) for _ in range(THREADS)]
    for t in threads:
        t.start()
    # Everyone but the owner is answered while the owner is still held inside the view.
    early = [answers.get(timeout=30) for _ in range(THREADS - 1)]
    assert held.entered.is_set()
    assert record(app, "storm")["state"] == "IN_PROGRESS"
    held.release.set()
    for t in threads:
        t.join(30)
    owner = answers.get(timeout=5)
    assert owner.status_code == 201
    assert [r.status_code for r in early] == [409] * (THREADS - 1)
    assert all(r.headers["Retry-After"] == "1" for r in early)
    assert all(r.get_json()["type"].endswith("in-progress") for r in early)
    assert controls.runs["payments"] == 1
    assert charges(app) == 1
    row = record(app, "storm")
    assert (row["state"], row["attempts"]) == ("COMPLETED", 1)
