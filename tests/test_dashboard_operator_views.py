"""What tells records apart on the dashboard: scope labels (shown and searchable), clickable Location and
resource links, lists that fit their content, grouped repeats in the events timeline and the overview's
charts of the last 24 h. Each runs on SQLite and PostgreSQL (the ``app`` fixture)."""

from __future__ import annotations

import logging
import re
from datetime import timedelta
from typing import Any

import pytest
import sqlalchemy as sa
from flask import Flask
from flask.testing import FlaskClient
from helpers import ext
from test_dashboard import PREFIX, allow, get, insert, insert_stuck

from flask_idempotent import operations as ops
from flask_idempotent.dashboard import SECURITY_HEADERS, group_events, plural, safe_link

USERS = {"1": "alice", "2": "bob"}


def labels(app: Flask) -> None:
    idempotency = ext(app)["idempotency"]

    @idempotency.scope_label
    def label(scope: str) -> str | None:
        return USERS.get(scope)

    @idempotency.scope_search
    def find(text: str) -> list[str]:
        return [scope for scope, name in USERS.items() if name == text.strip().lower()]


def insert_event(app: Flask, clock: Any, record_id: int | None, kind: str, **values: Any) -> None:
    row: dict[str, Any] = {
        "record_id": record_id,
        "scope": "",
        "key": "k",
        "kind": kind,
        "actor": None,
        "detail": None,
        "created_at": clock.now,
    }
    row.update(values)
    with app.app_context():
        db = ext(app)["db"]
        with db.engine.begin() as conn:
            conn.execute(sa.insert(db.metadata.tables["idempotency_events"]).values(**row))


@pytest.fixture(autouse=True)
def _forget_warnings() -> None:
    ops._WARNED.clear()


# 1. Scope labels --------------------------------------------------------------------------------------------


def test_scope_labels_are_shown_in_every_list_and_on_the_record_page(
    app: Flask, client: FlaskClient, clock: Any
) -> None:
    allow(app)
    labels(app)
    final = insert(app, clock, "final-1", scope="1")
    insert(app, clock, "retry-1", scope="2", retryable=True)
    stuck = insert_stuck(app, clock, "stuck-1", scope="1")
    insert_event(app, clock, final, "conflict", scope="1", key="final-1", detail={"method": "POST", "path": "/x"})
    label_alice = '<span class="fi-scope-label" data-fi-scope-label="1">alice</span>'
    for path in ["/", "/stuck", "/failed", "/conflicts", f"/records/{final}", f"/records/{stuck}", "/search?q=1"]:
        assert label_alice in get(client, path), path
    assert 'data-fi-scope-label="2">bob</span>' in get(client, "/failed")
    assert '<code class="fi-code fi-scope">1</code>' in get(client, f"/records/{final}")  # the raw scope stays


def test_search_finds_records_by_the_scope_label(app: Flask, client: FlaskClient, clock: Any) -> None:
    allow(app)
    labels(app)
    insert(app, clock, "a-1", scope="1")
    insert(app, clock, "a-2", scope="1")
    insert(app, clock, "b-1", scope="2")
    insert(app, clock, "alice", scope="3")  # a key equal to the text is found too
    page = get(client, "/search?q=alice")
    assert all(f">{key}</code>" in page for key in ("a-1", "a-2", "alice")), page
    assert ">b-1</code>" not in page
    assert "3 records" in page and "it names:" in page
    assert 'placeholder="Key, scope or name"' in page
    assert "1 record " in get(client, "/search?q=bob")
    assert "0 records" in get(client, "/search?q=nobody")


@pytest.mark.parametrize("bad", ["raises", "returns-int", "returns-bytes-list"])
def test_a_broken_label_callback_falls_back_to_the_raw_scope_and_logs_once(
    app: Flask, client: FlaskClient, clock: Any, caplog: pytest.LogCaptureFixture, bad: str
) -> None:
    allow(app)
    idempotency = ext(app)["idempotency"]

    @idempotency.scope_label
    def label(scope: str) -> Any:
        if bad == "raises":
            raise RuntimeError("directory down")
        return 42

    @idempotency.scope_search
    def find(text: str) -> Any:
        if bad == "raises":
            raise RuntimeError("directory down")
        return "1" if bad == "returns-int" else [b"1", None]

    insert(app, clock, "k-1", scope="1")
    insert(app, clock, "k-2", scope="2")
    with caplog.at_level(logging.WARNING, logger="flask_idempotent"):
        for _ in range(2):
            assert '<code class="fi-code fi-scope">1</code>' in get(client, "/failed")
            assert "fi-scope-label" not in get(client, "/failed")
            assert ">k-1</code>" not in get(client, "/search?q=alice")  # search still answers
    label_warnings = [r for r in caplog.records if "scope_label" in r.getMessage()]
    assert len(label_warnings) == 1
    assert len([r for r in caplog.records if "scope_search" in r.getMessage()]) <= 1


# 2. Links ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("location", "linked"),
    [
        ("/payments/7", True),
        ("https://shop.example/payments/7", True),
        ("http://shop.example", True),
        ("javascript:alert(1)", False),
        ("JavaScript:alert(1)", False),
        ("data:text/html,x", False),
        ("//evil.example/x", False),
        ("https:///nohost", False),
        ("/a b", False),
        ("/a\\b", False),
        ("payments/7", False),
    ],
)
def test_a_location_header_is_a_link_only_when_safe(
    app: Flask, client: FlaskClient, clock: Any, location: str, linked: bool
) -> None:
    allow(app)
    record_id = insert(app, clock, "k", state="COMPLETED", response_status=201, error=None,
                       response_headers=[["Content-Type", "application/json"], ["Location", location]])  # fmt: skip
    page = get(client, f"/records/{record_id}")
    assert ('data-fi-link="location"' in page) is linked
    if linked:
        assert f'data-fi-link="location" href="{location}"' in page
    assert 'href="javascript' not in page.lower() and 'href="//' not in page and 'href="data:' not in page


def test_resource_url_hook_links_the_resource_reference(app: Flask, client: FlaskClient, clock: Any) -> None:
    allow(app)
    calls: list[Any] = []

    @ext(app)["idempotency"].resource_url
    def url(ref: Any) -> Any:
        calls.append(ref)
        if ref.get("boom"):
            raise KeyError("boom")
        return ref.get("url")

    good = insert(app, clock, "good", state="COMPLETED", error=None, resource_ref={"url": "/charges/9"})
    evil = insert(app, clock, "evil", state="COMPLETED", error=None, resource_ref={"url": "javascript:alert(1)"})
    boom = insert(app, clock, "boom", state="COMPLETED", error=None, resource_ref={"boom": True})
    none = insert(app, clock, "none", state="COMPLETED", error=None)
    assert 'data-fi-link="resource" href="/charges/9"' in get(client, f"/records/{good}")
    for record_id in (evil, boom, none):
        assert 'data-fi-link="resource"' not in get(client, f"/records/{record_id}")
    assert {"url": "/charges/9"} in calls and len(calls) == 3  # never called without a reference


def test_safe_link() -> None:
    assert safe_link("/x?y=1#z") == "/x?y=1#z"
    assert safe_link("HTTPS://a.example") == "HTTPS://a.example"
    for value in [None, 7, "", "\x00/x", "/x\n", "vbscript:x", "https://", "ftp://a.example", "/" * 3000]:
        assert safe_link(value) is None, value


# 3. Lists fit their content ---------------------------------------------------------------------------------


def test_long_keys_stay_on_one_line_and_errors_are_truncated(app: Flask, client: FlaskClient, clock: Any) -> None:
    allow(app)
    long_key = "order-" + "x" * 80
    error = "ProviderError: " + "the provider said no. " * 20
    record_id = insert(app, clock, long_key, error=error)
    page = get(client, "/failed")
    assert f'title="{long_key}"' in page and f">{long_key[:39]}…</code>" in page
    assert f">{long_key}</code>" not in page
    cell = re.search(r'<td class="fi-error-cell">(.*?)</td>', page, re.S)
    assert cell and len(re.sub(r"<[^>]+>", "", cell.group(1))) <= 60
    assert 'class="fi-nowrap"' in page
    detail = get(client, f"/records/{record_id}")
    assert error in detail and f">{long_key}</code>" in detail  # the full text on the record page
    response = client.get(PREFIX + "/static/flask_idempotent/dashboard.css")
    css = response.get_data(as_text=True)
    response.close()
    assert ".fi-nowrap, .fi-nowrap .fi-code { white-space: nowrap;" in css


def test_counts_are_pluralized(app: Flask, client: FlaskClient, clock: Any) -> None:
    allow(app)
    insert(app, clock, "one")
    assert "1 record ·" in get(client, "/failed") and "1 records" not in get(client, "/failed")
    insert(app, clock, "two")
    assert "2 records ·" in get(client, "/failed")
    assert "0 records ·" in get(client, "/stuck")
    assert "0 conflicts ·" in get(client, "/conflicts")
    assert plural(1, "conflict") == "1 conflict" and plural(3, "entry", "entries") == "3 entries"


# 4. Events timeline -----------------------------------------------------------------------------------------


def test_the_timeline_groups_consecutive_repeats(app: Flask, client: FlaskClient, clock: Any) -> None:
    allow(app)
    record_id = insert_stuck(app, clock, "k")
    start = clock.now - timedelta(minutes=10)
    insert_event(app, clock, record_id, "conflict", detail={"method": "POST", "path": "/x"}, created_at=start)
    for i in range(6):
        insert_event(app, clock, record_id, "in_progress_hit", detail={"status": 409},
                     created_at=start + timedelta(minutes=1 + i))  # fmt: skip
    insert_event(
        app, clock, record_id, "in_progress_hit", detail={"status": 425}, created_at=start + timedelta(minutes=8)
    )
    page = get(client, f"/records/{record_id}")
    kinds = re.findall(r'data-fi-event="([a-z_]+)" data-fi-repeats="(\d+)"', page)
    assert kinds == [  # oldest first: the claim, the lease's expiry, the events, where it stands now
        ("claim", "1"),
        ("lease_expired", "1"),
        ("conflict", "1"),
        ("in_progress_hit", "6"),
        ("in_progress_hit", "1"),
        ("now", "1"),
    ]
    last = (start + timedelta(minutes=6)).strftime("%H:%M")
    assert "×6" in page and f"last {last}" in page


def test_group_events_keeps_actors_apart() -> None:
    t = [clock_time(i) for i in range(4)]
    events = [
        {"kind": "mark_failed", "actor": "bob", "detail": {"a": 1}, "created_at": t[3]},
        {"kind": "mark_failed", "actor": "alice", "detail": {"a": 1}, "created_at": t[2]},
        {"kind": "mark_failed", "actor": "alice", "detail": {"a": 1}, "created_at": t[1]},
        {"kind": "mark_failed", "actor": "alice", "detail": {"a": 2}, "created_at": t[0]},
    ]
    groups = group_events(events)
    assert [(g["event"]["actor"], g["count"]) for g in groups] == [("bob", 1), ("alice", 2), ("alice", 1)]
    assert (groups[1]["last"], groups[1]["first"]) == (t[2], t[1])


def clock_time(minutes: int) -> Any:
    from datetime import datetime

    return datetime(2026, 1, 1, 13, 40) + timedelta(minutes=minutes)


# 5. Overview charts -----------------------------------------------------------------------------------------


def bars(page: str, chart: str) -> dict[str, int]:
    figure = re.search(rf'data-fi-chart="{chart}">(.*?)</figure>', page, re.S)
    assert figure, chart
    return {hour: int(n) for hour, n in re.findall(r'data-fi-hour="([0-9:]+)" data-fi-value="(\d+)"', figure.group(1))}


def test_overview_charts_count_the_last_24_hours_per_hour(app: Flask, client: FlaskClient, clock: Any) -> None:
    allow(app)
    now = clock.now
    hour = now.replace(minute=0, second=0, microsecond=0)

    def at(hours_ago: int) -> Any:  # in the clock hour ``hours_ago`` before the current one
        return hour - timedelta(hours=hours_ago) + timedelta(minutes=1)

    for i in range(3):
        insert(app, clock, f"done-{i}", state="COMPLETED", error=None, created_at=at(3), updated_at=at(3))
    insert(app, clock, "old", state="COMPLETED", error=None, created_at=now - timedelta(hours=30))
    failed = insert(app, clock, "failed", created_at=at(5), updated_at=at(1))
    insert(app, clock, "failed-old", created_at=now - timedelta(hours=40), updated_at=now - timedelta(hours=40))
    insert_stuck(app, clock, "stuck")
    for _ in range(2):
        insert_event(app, clock, failed, "conflict", key="failed", created_at=at(2))
    insert_event(app, clock, failed, "conflict", key="failed", created_at=now - timedelta(hours=26))
    insert_event(app, clock, failed, "in_progress_hit", key="failed", created_at=at(2))

    response = client.get(PREFIX + "/")
    assert response.status_code == 200
    page = response.get_data(as_text=True)
    label = {n: (hour - timedelta(hours=n)).strftime("%H:00") for n in range(24)}
    created, conflicts, failures = bars(page, "created"), bars(page, "conflicts"), bars(page, "failed")
    assert len(created) == len(conflicts) == len(failures) == 24
    assert list(created)[-1] == label[0] and list(created)[0] == label[23]
    # first requests: 3 in the hour 3 h ago, "failed" 5 h ago, the stuck one 12 min ago; "old" not at all
    assert {h: n for h, n in created.items() if n} == {
        label[3]: 3,
        label[5]: 1,
        (now - timedelta(minutes=12)).strftime("%H:00"): 1,
    }
    assert {h: n for h, n in conflicts.items() if n} == {label[2]: 2}
    assert {h: n for h, n in failures.items() if n} == {label[1]: 1}
    assert 'data-fi-total="created">5<' in page and 'data-fi-total="conflicts">2<' in page
    assert 'data-fi-total="failed">1<' in page and 'data-fi-total="stuck">1<' in page
    # server-rendered: no script, no inline style (the CSP forbids it), the CSP unchanged
    assert "<script" not in page and "style=" not in page
    assert response.headers["Content-Security-Policy"] == SECURITY_HEADERS["Content-Security-Policy"]
    assert "<svg" in page and "<title>" in page


def test_overview_charts_are_capped(app: Flask, client: FlaskClient, clock: Any, monkeypatch: Any) -> None:
    allow(app)
    from flask_idempotent import operations

    monkeypatch.setattr(operations, "ACTIVITY_LIMIT", 2)
    monkeypatch.setattr(operations.activity, "__defaults__", (24, 2))
    for i in range(4):
        insert(app, clock, f"f-{i}")
    page = get(client, "/")
    assert 'data-fi-total="created">2+<' in page and 'data-fi-total="failed">2+<' in page
    assert 'data-fi-total="conflicts">0<' in page


def test_empty_overview_charts(app: Flask, client: FlaskClient) -> None:
    allow(app)
    page = get(client, "/")
    assert all(v == 0 for v in bars(page, "created").values())
    assert 'data-fi-total="stuck">0<' in page
