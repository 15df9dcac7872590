"""A retry storm against gunicorn worker processes sharing one PostgreSQL database.

Two servers in turn: three sync workers, and two gthread workers with eight threads each. Sixteen client
threads send 40 distinct keys (20 to a leased route, 20 to an atomic one), each several times: a burst of
simultaneous duplicates released by a barrier, a client that retries until it gets an answer, and later
sequential retries. Whatever the interleaving, each key's view body runs exactly once, and every response is
the original 201, a byte-identical replay, or 409 ``in-progress`` with ``Retry-After`` (on a SERIALIZABLE
database also 503 ``commit-conflict``: an atomic request that lost a race, wrote nothing, and is retried).
"""

from __future__ import annotations

import random
import threading
from collections import defaultdict
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import sqlalchemy as sa
from conftest import faultapp_env
from faultapp import drop_tables, reset_database
from procs import Gunicorn, Reply, poll, send

#: Also on the distributed-SQL emulations of ``IDEMPOTENCY_TEST_PG_VARIANTS`` (conftest).
PG_VARIANTS = True

ROUTES = ("/payments", "/transfers")  # leased, atomic
KEYS_PER_ROUTE = 20
BURST = 4  # simultaneous duplicates per key
SEQUENTIAL_RETRIES = 2
CLIENT_THREADS = 16


@pytest.fixture(
    scope="module",
    params=[
        pytest.param({"workers": 3, "worker_class": "sync"}, id="3-sync-workers"),
        # Threads too: requests of one process share the extension's per-app state and engine pool.
        pytest.param({"workers": 2, "worker_class": "gthread", "threads": 8}, id="2-gthread-workers-8-threads"),
    ],
)
def server(
    request: pytest.FixtureRequest,
    pg_database: tuple[str, dict[str, object]],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Gunicorn]:
    url, config = pg_database
    reset_database(url)
    tmp: Path = tmp_path_factory.mktemp("storm")
    env = {"FAULTAPP_DATABASE_URL": url, "FAULTAPP_VIEW_WORK_MS": "20", **faultapp_env(config)}  # a slow view
    server = Gunicorn(env, tmp / "gunicorn.log", **request.param)
    try:
        server.start()
        yield server
    finally:
        server.stop()
        drop_tables(url)


@pytest.mark.postgresql_only
def test_retry_storm_over_worker_processes_runs_each_key_once_and_replays_byte_for_byte(
    server: Gunicorn, pg_database: tuple[str, dict[str, object]]
) -> None:
    keys = [(route, f"storm-{route.strip('/')}-{i}") for route in ROUTES for i in range(KEYS_PER_ROUTE)]
    amounts = {key: 100 + i for i, (_, key) in enumerate(keys)}
    replies: dict[str, list[Reply]] = defaultdict(list)
    lock = threading.Lock()

    def post(route: str, key: str) -> Reply:
        reply = send(server.port, "POST", route, key=key, body={"amount": amounts[key]})
        with lock:
            replies[key].append(reply)
        return reply

    def burst(route: str, key: str, barrier: threading.Barrier) -> None:
        barrier.wait(30)  # all duplicates of this key leave together
        post(route, key)

    def until_answered(route: str, key: str) -> None:
        """A client that honours 409 in-progress (and 503 commit-conflict) by retrying, until it has the outcome."""
        poll(lambda: (r := post(route, key)).status not in (409, 503) and r, timeout=60, what=f"an answer for {key}")

    # Phase 1: per key, BURST simultaneous sends and one retrying client, keys in a random order. The tasks
    # of one burst are queued together, so the pool's threads always complete a barrier (no deadlock).
    tasks: list[Callable[[], None]] = []
    order = list(keys)
    random.Random(20260101).shuffle(order)
    for route, key in order:
        barrier = threading.Barrier(BURST)
        tasks += [lambda r=route, k=key, b=barrier: burst(r, k, b) for _ in range(BURST)]
        tasks.append(lambda r=route, k=key: until_answered(r, k))
    with ThreadPoolExecutor(CLIENT_THREADS) as pool:
        for future in [pool.submit(task) for task in tasks]:
            future.result()
    first_phase = {key: len(replies[key]) for _, key in keys}

    # Phase 2, once every key has its outcome: retries one after another per key (keys in parallel), all replays.
    def sequential(route: str, key: str) -> None:
        for _ in range(SEQUENTIAL_RETRIES):
            post(route, key)

    with ThreadPoolExecutor(CLIENT_THREADS) as pool:
        for future in [pool.submit(sequential, route, key) for route, key in order]:
            future.result()

    # HTTP: per key one original 201, replays equal to it byte for byte, or 409 in-progress; no 5xx but 503
    # commit-conflict (SERIALIZABLE: an atomic transaction lost a race and wrote nothing; the retry runs it).
    everything = [reply for key_replies in replies.values() for reply in key_replies]
    assert [r for r in everything if r.status >= 500 and r.problem != "commit-conflict"] == []
    worker_pids = set()
    for _, key in keys:
        originals = [r for r in replies[key] if r.status == 201 and not r.replayed]
        assert len(originals) == 1, (key, [(r.status, r.problem) for r in replies[key]])
        original = originals[0]
        assert original.json()["key"] == key and original.json()["amount"] == amounts[key]
        worker_pids.add(original.json()["pid"])
        for reply in replies[key]:
            if reply is original:
                continue
            if reply.status in (409, 503):
                assert reply.problem == ("in-progress" if reply.status == 409 else "commit-conflict"), reply
                assert int(reply.headers["retry-after"]) >= 1
            else:
                assert (reply.status, reply.replayed) == (201, True), reply
                assert reply.body == original.body
                assert reply.headers["location"] == original.headers["location"]
        assert all(r.replayed for r in replies[key][first_phase[key] :])
    # The storm really was one: duplicates overlapped, and with sync workers (one request at a time each) they
    # were spread over processes. A gthread worker may take every connection itself: threads race there.
    assert any(r.status == 409 for r in everything), "no duplicate ever met its key in progress"
    if server.worker_class == "sync":
        assert len(worker_pids) > 1, "the storm never reached more than one worker process"

    # Database: one effect per distinct key, every record COMPLETED after a single attempt.
    engine = sa.create_engine(pg_database[0])
    try:
        with engine.connect() as conn:
            effects = dict(
                conn.execute(
                    sa.text("SELECT key, count(*) FROM fault_effects WHERE key LIKE 'storm-%' GROUP BY key")
                ).all()
            )
            records = {
                r.key: r
                for r in conn.execute(
                    sa.text(
                        "SELECT key, state, attempts, response_body FROM idempotency_records WHERE key LIKE 'storm-%'"
                    )
                )
            }
    finally:
        engine.dispose()
    assert effects == {key: 1 for _, key in keys}
    assert set(records) == {key for _, key in keys}
    for _, key in keys:
        assert (records[key].state, records[key].attempts) == ("COMPLETED", 1)
        originals = [r for r in replies[key] if r.status == 201 and not r.replayed]
        assert bytes(records[key].response_body) == originals[0].body


@pytest.mark.postgresql_only
@pytest.mark.parametrize("route", ROUTES)
def test_simultaneous_retries_of_a_completed_key_all_replay(server: Gunicorn, route: str) -> None:
    """docs/behaviour.md: same key, same command, COMPLETED -> the stored outcome, however many retries at once."""
    key = f"completed-burst-{route.strip('/')}"
    original = send(server.port, "POST", route, key=key, body={"amount": 1})
    assert (original.status, original.replayed) == (201, False), original
    barrier = threading.Barrier(CLIENT_THREADS)

    def retry() -> Reply:
        barrier.wait(30)
        return send(server.port, "POST", route, key=key, body={"amount": 1})

    replies: list[Reply] = []
    with ThreadPoolExecutor(CLIENT_THREADS) as pool:
        for _ in range(5):
            barrier.reset()
            replies += [f.result() for f in [pool.submit(retry) for _ in range(CLIENT_THREADS)]]
    answers = sorted({(r.status, r.replayed, r.problem) for r in replies}, key=str)
    assert answers == [(201, True, None)], answers
    assert all(r.body == original.body for r in replies)
