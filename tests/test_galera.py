"""A real 3-node MariaDB Galera cluster (``tests/galera.py``): one key, many nodes, one effect.

Every node is written to (multi-primary), each through its own gunicorn serving ``faultapp``. Galera has no
lock across nodes: two nodes both accept an INSERT of the same key, and the loser finds out at COMMIT
(certification, error 1213), not at the INSERT. The layer must treat that as a lost race: the loser answers as
a duplicate would (a replay or 409), never with a 500, and the view's write is never doubled. A node killed in
the middle of a request loses nothing that committed; the surviving nodes serve the key's record.

Each test checks the HTTP answers and the rows on every live node (read with ``wsrep_sync_wait``, so a node
has applied everything committed before the read). The cluster starts once per session (~10 s).
"""

from __future__ import annotations

import contextlib
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from faultapp import HOLD_HEADER, create_app
from galera import GaleraCluster, Node
from procs import FileClock, Gunicorn, Reply, poll, send

LEASE = 30  # seconds; only the test's clock runs it out
ROUNDS = 12  # races per concurrent test: each sends one key to every node at once
PER_NODE = 2  # concurrent requests per node and round (each server runs as many sync workers)
LOST_RACE = 1213  # ER_LOCK_DEADLOCK: how Galera fails the COMMIT of a transaction that lost certification


class GaleraRig:
    """A database on the cluster with the fault app's tables, one gunicorn per node and setting, the lease clock."""

    def __init__(self, cluster: GaleraCluster, tmp: Path) -> None:
        self.cluster = cluster
        self.tmp = tmp
        self.database = f"flask_idempotent_galera_{uuid.uuid4().hex[:8]}"
        cluster.create_database(self.database)
        engine = sa.create_engine(cluster.nodes[0].url(self.database))
        try:
            create_app({"FAULTAPP_DATABASE_URL": self.url(cluster.nodes[0])}).extensions["faultapp"][
                "db"
            ].metadata.create_all(engine)
        finally:
            engine.dispose()
        cluster.sync_wait()
        self.signals = tmp / "signals"
        self.signals.mkdir()
        self.clock = FileClock(tmp / "clock")
        self.servers: dict[tuple[int, bool], Gunicorn] = {}

    def url(self, node: Node) -> str:
        return node.url(self.database)

    def server(self, node: Node, *, advisory_locks: bool = True) -> Gunicorn:
        """The gunicorn whose app writes through ``node`` (started on first use)."""
        name = (node.number, advisory_locks)
        if name not in self.servers:
            env = {
                "FAULTAPP_DATABASE_URL": self.url(node),
                "FAULTAPP_CLOCK_FILE": str(self.clock.path),
                "FAULTAPP_LEASE": str(LEASE),
                "FAULTAPP_SIGNAL_DIR": str(self.signals),
                "FAULTAPP_CONNECT_TIMEOUT": "2",
                "FAULTAPP_ADVISORY_LOCKS": "1" if advisory_locks else "0",
                "FAULTAPP_LOG_LEVEL": "INFO",  # the layer's "lost a race" lines, counted by lost_races()
            }
            log = self.tmp / f"gunicorn-node{node.number}-locks{int(advisory_locks)}.log"
            self.servers[name] = Gunicorn(env, log, workers=PER_NODE).start()
        return self.servers[name]

    def post(self, node: Node, path: str, key: str, *, advisory_locks: bool = True, **kwargs: Any) -> Reply:
        port = self.server(node, advisory_locks=advisory_locks).port
        return send(port, "POST", path, key=key, body={"amount": 7}, **kwargs)

    def state(self, node: Node, key: str) -> dict[str, Any]:
        """The key's record and the effects written under it, as ``node`` has them."""
        records = self.cluster.query(
            node,
            self.database,
            "SELECT id, state, retryable, attempts, lease_token, response_status, response_body"
            " FROM idempotency_records WHERE scope = '' AND `key` = %s",
            (key,),
        )
        effects = self.cluster.query(node, self.database, "SELECT id FROM fault_effects WHERE `key` = %s", (key,))
        record = records[0] if records else None
        if record is not None and record["response_body"] is not None:
            record["response_body"] = bytes(record["response_body"])
        return {"record": record, "effects": sorted(e["id"] for e in effects)}

    def state_everywhere(self, key: str) -> dict[str, Any]:
        """The key's rows, the same on every live node (asserted); the cluster must be whole or say which died."""
        states = {node.number: self.state(node, key) for node in self.cluster.nodes if node.alive}
        first = next(iter(states.values()))
        assert all(s == first for s in states.values()), f"the nodes disagree on {key}: {states}"
        return first

    def lost_races(self) -> int:
        """How many times the servers' layer logged a statement or COMMIT that lost a race with error 1213."""
        count = 0
        for server in self.servers.values():
            text = server.log_path.read_text(errors="replace")
            count += sum(1 for line in text.splitlines() if "lost a race" in line and str(LOST_RACE) in line)
        return count

    def close(self) -> None:
        for server in self.servers.values():
            server.stop()
        self.cluster.heal()
        with contextlib.closing(self.cluster.nodes[0].connect()) as conn, conn.cursor() as cur:
            cur.execute(f"DROP DATABASE IF EXISTS `{self.database}`")


@pytest.fixture(scope="module")
def rig(galera_cluster: GaleraCluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GaleraRig]:
    rig = GaleraRig(galera_cluster, tmp_path_factory.mktemp("galera"))
    try:
        yield rig
    finally:
        rig.close()


@pytest.fixture(autouse=True)
def whole_cluster(rig: GaleraRig) -> Iterator[None]:
    """Every test starts with all three nodes: one that killed a node and failed before restarting it is healed."""
    yield
    rig.cluster.heal()


def race(rig: GaleraRig, path: str, key: str, *, advisory_locks: bool = True) -> list[Reply]:
    """Send ``key`` to every node at once (``PER_NODE`` requests each, released by one barrier)."""
    ports = [rig.server(node, advisory_locks=advisory_locks).port for node in rig.cluster.nodes] * PER_NODE
    start = threading.Barrier(len(ports))
    replies: list[Reply | BaseException] = [RuntimeError("no reply")] * len(ports)

    def one(i: int) -> None:
        try:
            start.wait(10)
            replies[i] = send(ports[i], "POST", path, key=key, body={"amount": 7})
        except BaseException as exc:  # reported below, with the others
            replies[i] = exc

    threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(len(ports))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads), "a request never finished"
    errors = [r for r in replies if isinstance(r, BaseException)]
    assert not errors, errors
    return [r for r in replies if isinstance(r, Reply)]


def assert_one_effect(
    rig: GaleraRig, key: str, replies: list[Reply], *, atomic: bool, advisory_locks: bool = True
) -> Reply:
    """One original 201; every other answer a byte-identical replay or a duplicate's answer; one effect on
    every node, and the record COMPLETED with it. Returns the original."""
    originals = [r for r in replies if r.status == 201 and not r.replayed]
    assert len(originals) == 1, [(r.status, r.replayed, r.problem) for r in replies]
    original = originals[0]
    for reply in replies:
        if reply is original:
            continue
        if reply.status == 201:
            assert reply.replayed and reply.body == original.body, reply
        elif reply.status == 409:
            assert reply.problem == "in-progress", reply
        else:
            # Atomic only: the loser's transaction aborted and its node had not applied the winner's record yet
            # when it looked, so nobody seemed to hold the key (deployment.md). Nothing of it was written.
            assert atomic and (reply.status, reply.problem) == (503, "commit-conflict"), reply
    state = rig.state_everywhere(key)
    assert state["effects"] == [original.json()["effect"]], state
    record = state["record"]
    assert (record["state"], record["attempts"], record["response_status"]) == ("COMPLETED", 1, 201)
    assert record["response_body"] == original.body
    # Whatever a loser answered, a retry now, through any node, is the replay.
    for node in rig.cluster.nodes:
        again = rig.post(node, "/transfers" if atomic else "/payments", key, advisory_locks=advisory_locks)
        assert (again.status, again.replayed, again.body) == (201, True, original.body), again
    return original


def race_rounds(rig: GaleraRig, path: str, *, atomic: bool, advisory_locks: bool = True) -> tuple[int, int]:
    """``ROUNDS`` races of a fresh key each (:func:`race`), each checked by :func:`assert_one_effect`.

    Returns how many lost races (1213) the servers' layer logged, and how many transactions the nodes aborted
    for another node's (``wsrep_local_cert_failures`` + ``wsrep_local_bf_aborts``), during the rounds.
    """
    before, aborted = rig.lost_races(), rig.cluster.certification_failures()
    answers: dict[tuple[int, bool, str | None], int] = {}
    for n in range(ROUNDS):
        key = f"race-{path.strip('/')}-{int(advisory_locks)}-{n}"
        replies = race(rig, path, key, advisory_locks=advisory_locks)
        assert_one_effect(rig, key, replies, atomic=atomic, advisory_locks=advisory_locks)
        for r in replies:
            answers[(r.status, r.replayed, r.problem)] = answers.get((r.status, r.replayed, r.problem), 0) + 1
    lost, aborted = rig.lost_races() - before, rig.cluster.certification_failures() - aborted
    print(f"{path}: answers over {ROUNDS} rounds {answers}; lost races the layer logged: {lost}; aborted: {aborted}")
    return lost, aborted


@pytest.mark.parametrize("advisory_locks", [True, False], ids=["advisory-locks-on", "advisory-locks-off"])
def test_the_same_key_sent_to_every_node_at_once_runs_once(rig: GaleraRig, advisory_locks: bool) -> None:
    # IDEMPOTENCY_ADVISORY_LOCKS changes nothing on MariaDB (the layer takes no GET_LOCK: it would be node-local
    # under Galera); run both ways to show that no answer depends on it.
    _, aborted = race_rounds(rig, "/payments", atomic=False, advisory_locks=advisory_locks)
    # The nodes aborted transactions for another node's: the race between nodes was real. The layer met some of
    # them as 1213 (it logs the claims that lost; duplicates' event counts and outcome writes are not logged).
    assert aborted >= 1, "no node aborted a transaction for another's: the race was not real"


def test_atomic_requests_of_one_key_on_every_node_at_once_run_once(rig: GaleraRig) -> None:
    lost, aborted = race_rounds(rig, "/transfers", atomic=True)
    # Two nodes both take an atomic claim (nothing locks across nodes): all but one must lose at COMMIT.
    assert aborted >= 1 and lost >= 1, "no atomic transaction lost certification: the race was not real"


def test_an_atomic_request_that_fails_certification_at_commit_replays_the_winner(rig: GaleraRig) -> None:
    """Deterministic: the loser (an app in this process, on node 2) has written its claim and its effect, not
    committed; the winner (a real request through node 1) then runs whole and commits; the loser's COMMIT fails
    certification (1213), and it answers as a duplicate would.

    Leased mode has no such test: each of its statements is autocommit, so its COMMIT is inside the statement
    and nothing can run between the two. Its lost races are the real ones of the race tests above (counted).
    """
    path, key = "/transfers", "certification-atomic"
    node1, node2 = rig.cluster.nodes[0], rig.cluster.nodes[1]
    app = create_app(
        {
            "FAULTAPP_DATABASE_URL": rig.url(node2),
            "FAULTAPP_CLOCK_FILE": str(rig.clock.path),
            "FAULTAPP_LEASE": str(LEASE),
        }
    )
    with app.app_context():
        engine = app.extensions["faultapp"]["db"].engine
    claimed = threading.Event()
    winner: list[Reply] = []
    errors: list[object] = []

    def on_statement(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if statement.lstrip().upper().startswith("INSERT INTO IDEMPOTENCY_RECORDS"):
            claimed.set()

    def before_commit(conn: Any) -> None:
        if claimed.is_set() and not winner:
            winner.append(rig.post(node1, path, key))  # committed through node 1 while ours is still open
            rig.cluster.sync_wait()  # node 2 applied it (and aborted our transaction): the loser reads it

    def on_error(context: Any) -> None:
        errors.append(getattr(context.original_exception, "args", (None,))[0])

    sa.event.listen(engine, "before_cursor_execute", on_statement)
    sa.event.listen(engine, "commit", before_commit)
    sa.event.listen(engine, "handle_error", on_error)
    try:
        loser = app.test_client().post(path, headers={"Idempotency-Key": key}, json={"amount": 7})
    finally:
        with app.app_context():
            engine.dispose()
    assert winner, "the loser never reached the COMMIT of its claim"
    original = winner[0]
    assert (original.status, original.replayed) == (201, False), original
    assert LOST_RACE in errors, f"the loser's COMMIT did not fail certification: {errors}"
    # The loser answers as a duplicate arriving now would: the winner's response, replayed byte for byte.
    assert loser.status_code == 201 and loser.headers["Idempotent-Replayed"] == "true", loser.data
    assert loser.data == original.body
    state = rig.state_everywhere(key)
    assert state["effects"] == [original.json()["effect"]]  # the loser's effect (atomic) was never written
    assert (state["record"]["state"], state["record"]["attempts"]) == ("COMPLETED", 1)


def held(rig: GaleraRig, node: Node, path: str, key: str) -> tuple[threading.Thread, dict[str, Any]]:
    """A request through ``node`` parked right after its view's effect (leased: committed; atomic: not yet)."""
    result: dict[str, Any] = {}

    def run() -> None:
        try:
            result["reply"] = rig.post(node, path, key, headers={HOLD_HEADER: "effect"})
        except BaseException as exc:  # reported by the test
            result["reply"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    poll(lambda: (rig.signals / f"{key}.effect.held").exists(), timeout=30, what=f"{key} to reach its effect")
    return thread, result


@pytest.mark.parametrize("path", ["/payments", "/transfers"], ids=["leased", "atomic"])
def test_a_node_killed_mid_request_loses_nothing_committed(rig: GaleraRig, path: str) -> None:
    key = f"killed-{path.strip('/')}"
    node1, node2, node3 = rig.cluster.nodes
    rig.server(node1), rig.server(node2)  # started while the cluster is whole
    thread, result = held(rig, node3, path, key)
    rig.cluster.kill(node3)  # SIGKILL; returns once nodes 1 and 2 form the cluster without it
    (rig.signals / f"{key}.effect.go").touch()
    thread.join(60)
    assert not thread.is_alive(), "the held request never finished"
    reply = result["reply"]
    assert isinstance(reply, Reply), reply
    survivors = rig.state_everywhere(key)  # nodes 1 and 2
    if path == "/payments":
        # Leased: the view's effect committed (so it is on every node) before the kill; its outcome could not be
        # stored. The client gets the view's answer; the record stays IN_PROGRESS, never re-executed, and is
        # held as stuck once its lease ends.
        assert reply.status == 201 and not reply.replayed, reply
        assert survivors["effects"] == [reply.json()["effect"]]
        assert survivors["record"]["state"] == "IN_PROGRESS"
        again = rig.post(node1, path, key)
        assert (again.status, again.problem) == (409, "in-progress"), again
        rig.clock.advance(LEASE + 1)
        stuck = rig.post(node2, path, key)
        assert (stuck.status, stuck.problem) == (409, "stuck"), stuck
        expected = {"effects": survivors["effects"], "state": "IN_PROGRESS"}
    else:
        # Atomic: the claim and the effect were one transaction on the dead node, never committed: nothing of it
        # anywhere. Its client gets 503 store-unavailable; the retry, through a surviving node, runs once.
        assert (reply.status, reply.problem) == (503, "store-unavailable"), reply
        assert survivors == {"record": None, "effects": []}
        retry = rig.post(node1, path, key)
        assert (retry.status, retry.replayed) == (201, False), retry
        replay = rig.post(node2, path, key)
        assert (replay.status, replay.replayed, replay.body) == (201, True, retry.body), replay
        expected = {"effects": [retry.json()["effect"]], "state": "COMPLETED"}
    rig.cluster.restart(node3)  # it rejoins and receives what it missed
    whole = rig.state_everywhere(key)  # all three nodes
    assert {"effects": whole["effects"], "state": whole["record"]["state"]} == expected
    late = rig.post(node3, path, key)  # its server reconnects by itself
    if path == "/payments":
        assert (late.status, late.problem) == (409, "stuck"), late
    else:
        assert (late.status, late.replayed, late.body) == (201, True, retry.body), late
