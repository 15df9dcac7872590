"""The clients against gunicorn serving ``faultapp`` on PostgreSQL, through a proxy that loses responses.

The proxy (:class:`procs.ResponseDroppingProxy`) sits between the client and gunicorn. When armed, it lets a
request through, reads the server's whole response (the view ran and its outcome is stored) and closes the
connection without forwarding a byte, or holds the response back until the client's own timeout gives up. The
proofs are read in PostgreSQL: one row in ``fault_effects`` per logical call or delivery, whatever the network
did, and the caller gets the original answer, marked as a replay.
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from clients import FLAVOURS, Answer, Flavour
from procs import ResponseDroppingProxy, ServedApp

pytestmark = pytest.mark.postgresql_only

FAST = {"backoff": 0.05, "max_backoff": 0.2}


class ClientRig(ServedApp):
    """Two gunicorn workers behind a proxy that drops the responses a test asks it to (``url`` is the proxy's)."""

    def __init__(self, url: str, tmp: Path) -> None:
        super().__init__(url, {"FAULTAPP_LEASE": "30", "FAULTAPP_CONNECT_TIMEOUT": "2"}, tmp, workers=2)
        self.proxy: ResponseDroppingProxy | None = None

    def start(self) -> None:
        super().start()
        self.proxy = ResponseDroppingProxy("127.0.0.1", self.server.port)

    @property
    def url(self) -> str:
        assert self.proxy is not None
        return f"http://127.0.0.1:{self.proxy.port}"

    def effects_by_key(self, route: str) -> Counter[str]:
        with self.engine.connect() as conn:
            rows = conn.execute(sa.text("SELECT key FROM fault_effects WHERE route = :route"), {"route": route})
            return Counter(row.key for row in rows)

    def stop(self) -> None:
        if self.proxy is not None:
            self.proxy.close()
        super().stop()


@pytest.fixture(scope="module")
def rig(postgres_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClientRig]:
    with ClientRig(postgres_url, tmp_path_factory.mktemp("client")) as rig:
        yield rig


@pytest.fixture
def proxy(rig: ClientRig) -> Iterator[ResponseDroppingProxy]:
    assert rig.proxy is not None
    lost = len(rig.proxy.lost)
    yield rig.proxy
    assert rig.proxy.armed == 0, "a fault the test armed never fired"
    del rig.proxy.lost[lost:]


@pytest.fixture(params=FLAVOURS, ids=repr)
def flavour(request: pytest.FixtureRequest) -> Flavour:
    return request.param  # type: ignore[no-any-return]


def test_a_response_lost_after_the_server_answered_is_replayed_and_the_effect_happens_once(
    rig: ClientRig, proxy: ResponseDroppingProxy, flavour: Flavour
) -> None:
    proxy.arm()
    answer = flavour.call("POST", f"{rig.url}/payments", FAST, json={"amount": 5})

    [lost] = proxy.lost
    assert lost.status == 201 and b"Idempotency-Key: " + (answer.key or "").encode() in lost.request
    assert (answer.status, answer.replayed) == (201, True)
    assert answer.body == lost.body  # the original answer (faultapp's answers carry a nonce: never two alike)
    state = rig.state(answer.key or "")
    assert state["effects"] == [answer.json()["effect"]]  # one effect in PostgreSQL
    assert (state["record"]["state"], state["record"]["attempts"]) == ("COMPLETED", 1)


def test_a_key_reused_with_another_body_is_answered_422_without_a_retry(
    rig: ClientRig, proxy: ResponseDroppingProxy, flavour: Flavour
) -> None:
    key = {"Idempotency-Key": f"client-422-{flavour}"}
    with flavour.client(FAST) as call:
        first = call("POST", f"{rig.url}/payments", json={"amount": 1}, headers=key)
        before = proxy.accepted
        reused = call("POST", f"{rig.url}/payments", json={"amount": 2}, headers=key)
    assert first.status == 201
    assert (reused.status, reused.problem, reused.replayed) == (422, "key-reused", False)
    assert proxy.accepted - before == 1  # one connection, one request: gunicorn's sync worker closes each
    assert rig.state(key["Idempotency-Key"])["effects"] == [first.json()["effect"]]


@dataclass(frozen=True)
class Event:
    delivery: str
    amount: int


def send_webhooks(call: Any, url: str, events: list[Event], lost: tuple[type[BaseException], ...]) -> dict[str, Any]:
    """A webhook sender's loop: deliver each event; a delivery the client gave up on goes back in the queue.

    Every attempt of a delivery, by the client's own retries or by this loop's redelivery, carries the event's
    delivery id: the receiver keys on it, so a delivery runs its effect once however often it is sent.
    """
    queue = deque(events)
    answers: dict[str, Answer] = {}
    redelivered: Counter[str] = Counter()
    budget = 3 * len(events)  # bounded: a receiver that never answers fails the test instead of hanging it
    while queue and budget:
        budget -= 1
        event = queue.popleft()
        try:
            answer = call(
                "POST", url, json={"amount": event.amount}, headers={"X-Delivery": event.delivery}, timeout=1.0
            )
        except lost:
            redelivered[event.delivery] += 1
            queue.append(event)
            continue
        assert answer.status == 201, (event, answer)
        answers[event.delivery] = answer
    assert not queue, f"undelivered after the budget: {list(queue)}"
    return {"answers": answers, "redelivered": redelivered}


def test_a_webhook_sender_retrying_on_timeouts_delivers_each_event_exactly_once(
    rig: ClientRig, proxy: ResponseDroppingProxy, flavour: Flavour
) -> None:
    events = [Event(f"evt-{flavour}-{i:02d}", 100 + i) for i in range(12)]
    marker = {e.delivery: f"{e.delivery}\r\n".encode() for e in events}  # the end of its X-Delivery header line
    proxy.arm(marker[events[2].delivery])  # answered, then the connection is closed: a lost connection
    proxy.arm(marker[events[5].delivery], withhold=True)  # held back: the sender's 1 s timeout expires
    proxy.arm(marker[events[9].delivery], withhold=True)  # and both attempts of this one are lost:
    proxy.arm(marker[events[9].delivery])  # the client gives up, the loop redelivers it later

    with flavour.client({**FAST, "attempts": 2}) as call:
        sent = send_webhooks(call, f"{rig.url}/webhooks/sender", events, flavour.lost)

    assert [lost.marker for lost in proxy.lost] == [marker[events[i].delivery] for i in (2, 5, 9, 9)]
    assert sent["redelivered"] == {events[9].delivery: 1}
    faulted = {events[i].delivery for i in (2, 5, 9)}
    answers = sent["answers"]
    assert {d for d, a in answers.items() if a.replayed} == faulted  # the others ran on their first attempt
    assert answers[events[2].delivery].body == proxy.lost[0].body  # the original answer, replayed

    effects = rig.effects_by_key("webhooks-sender")
    assert {e.delivery: effects[e.delivery] for e in events} == {e.delivery: 1 for e in events}
    for event in events:
        state = rig.state(event.delivery, scope="sender")
        assert state["effects"] == [answers[event.delivery].json()["effect"]], event
        assert (state["record"]["state"], state["record"]["attempts"]) == ("COMPLETED", 1), event
