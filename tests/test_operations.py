"""The operations API and the ``flask idempotency`` CLI: what an on-call operator can see and do."""

from __future__ import annotations

import json
from typing import Any

import pytest
from concurrency import Background, finish, make_stuck
from flask import Flask
from flask.testing import FlaskClient
from helpers import charges, events, ext, in_app, post, problem_code, record, records

from flask_idempotent import operations as ops
from flask_idempotent import reports


def test_stats_lists_and_search_show_what_needs_a_decision(app: Flask, client: FlaskClient, clock: Any) -> None:
    controls = ext(app)["controls"]
    post(client, "/payments", key="ok", json={"amount": 1})
    post(client, "/payments", key="ok", json={"amount": 2})  # conflict
    controls.status = 500
    post(client, "/payments", key="final", json={"amount": 1})
    controls.status = 503
    post(client, "/payments", key="retry", json={"amount": 1})
    controls.status = None
    owner = make_stuck(app, clock)
    try:
        s = in_app(app, ops.stats)
        assert s["by_state"] == {"IN_PROGRESS": 1, "COMPLETED": 1, "FAILED": 2}
        assert s["stuck"] == 1 and s["oldest_stuck_seconds"] == pytest.approx(11 * 60, abs=2)  # lease 60 s, 12 min ago
        assert (s["failed_final"], s["failed_retryable"], s["conflicts_24h"]) == (1, 1, 1)

        stuck = in_app(app, ops.list_stuck)
        assert [r["key"] for r in stuck.items] == ["stuck-1"] and stuck.total == 1
        assert stuck.items[0]["stuck_for_seconds"] == pytest.approx(11 * 60, abs=2)
        assert "lease_token" not in stuck.items[0]
        assert {r["key"] for r in in_app(app, ops.list_failed).items} == {"final", "retry"}
        assert [r["key"] for r in in_app(app, ops.list_failed, retryable=False).items] == ["final"]
        assert [r["key"] for r in in_app(app, ops.list_failed, retryable=True).items] == ["retry"]
        [conflict] = in_app(app, ops.list_conflicts).items
        assert conflict["record"]["key"] == "ok" and conflict["detail"]["path"] == "/payments"
        assert conflict["record"]["request_hash"] != conflict["detail"]["request_hash"]
        assert [r["key"] for r in in_app(app, ops.search, "final").items] == ["final"]
        assert in_app(app, ops.search, "nothing").total == 0
        shown = in_app(app, ops.show, "", "ok", body_limit=None)
        assert json.loads(shown["response_body"])["amount"] == 1
        assert [e["kind"] for e in shown["events"]] == ["conflict"]
    finally:
        finish(owner)


def test_search_matches_key_or_scope_exactly_newest_first_across_pages(app: Flask, client: FlaskClient) -> None:
    sent = [("alice", "x"), ("x", "k1"), ("bob", "y"), ("x", "x"), ("bob", "x"), ("x", "k2"), ("carol", "xx")]
    for user, key in sent:
        assert post(client, "/payments", key=key, user=user, json={"amount": 1}).status_code == 201
    newest_first = [(r["scope"], r["key"]) for r in sorted(records(app), key=lambda r: -r["id"])]
    expected = [(scope, key) for scope, key in newest_first if "x" in (scope, key)]
    assert len(expected) == 5  # the record with scope "x" and key "x" counts once; "xx" is no match

    pages = [in_app(app, ops.search, "x", page=n, per_page=2) for n in (1, 2, 3)]
    assert [(r["scope"], r["key"]) for p in pages for r in p.items] == expected
    assert [len(p.items) for p in pages] == [2, 2, 1] and {p.total for p in pages} == {5}
    assert in_app(app, ops.search, "x", page=4, per_page=2).items == []
    assert [(r["scope"], r["key"]) for r in in_app(app, ops.search, "bob").items] == [("bob", "x"), ("bob", "y")]


@pytest.mark.parametrize(
    ("page", "per_page", "expected"),
    [
        (0, 10, (1, 10)),
        (-3, 10, (1, 10)),
        ("abc", "xyz", (1, 50)),
        (2, 100000, (2, 200)),
        (1, 0, (1, 1)),
        (10**20, 10**20, (ops.MAX_PAGE, 200)),  # the row offset must fit a 64-bit integer
        ("9" * 5000, "1_0", (1, 10)),
    ],
)
def test_paging_values_are_bounded(page: Any, per_page: Any, expected: tuple[int, int]) -> None:
    assert ops.bounds(page, per_page) == expected


def test_paging_walks_a_listing(app: Flask, client: FlaskClient) -> None:
    ext(app)["controls"].status = 500
    for i in range(5):
        post(client, "/payments", key=f"f{i}", json={})
    first, last = in_app(app, ops.list_failed, page=1, per_page=2), in_app(app, ops.list_failed, page=3, per_page=2)
    assert (first.total, first.pages, first.has_next, first.has_prev) == (5, 3, True, False)
    assert len(last.items) == 1 and not last.has_next
    seen = {r["key"] for p in (1, 2, 3) for r in in_app(app, ops.list_failed, page=p, per_page=2).items}
    assert seen == {f"f{i}" for i in range(5)}


def test_transitions_the_state_does_not_allow_are_refused(app: Flask, client: FlaskClient, clock: Any) -> None:
    post(client, "/payments", key="done", json={})
    done = record(app, "done")
    with pytest.raises(ops.TransitionError):
        in_app(app, ops.mark_retryable, done["id"], actor="alice")
    with pytest.raises(ops.TransitionError):
        in_app(app, ops.mark_failed, done["id"], actor="alice")
    controls = ext(app)["controls"]
    held = controls.hold("payments")
    owner = Background(app, "/payments", key="live", json={}, held=held)
    assert held.entered.wait(10)
    try:
        with pytest.raises(ops.TransitionError, match="still live"):
            in_app(app, ops.mark_retryable, record(app, "live")["id"], actor="alice")
    finally:
        finish(owner)
    with pytest.raises(ops.RecordNotFound):
        in_app(app, ops.release, 999999, actor="alice")
    assert record(app, "done") == done
    assert events(app) == []


def test_mark_failed_on_a_stuck_record_answers_retries_with_500_failed(
    app: Flask, client: FlaskClient, clock: Any
) -> None:
    owner = make_stuck(app, clock)
    row = record(app, "stuck-1")
    marked = in_app(app, ops.mark_failed, row["id"], actor="bob")
    assert (marked["state"], marked["retryable"]) == ("FAILED", False)
    response = post(client, "/payments", key="stuck-1", json={"amount": 1})
    assert response.status_code == 500 and problem_code(response) == "failed"
    assert ext(app)["controls"].runs["payments"] == 1
    [event] = events(app, "mark_failed")
    assert event["actor"] == "bob" and event["detail"]["from_state"] == "IN_PROGRESS"
    finish(owner)
    assert record(app, "stuck-1")["state"] == "FAILED"  # the late owner cannot overwrite the decision


def test_release_frees_the_key_and_keeps_the_audit_event(app: Flask, client: FlaskClient) -> None:
    post(client, "/payments", key="r", json={"amount": 1})
    row = record(app, "r")
    in_app(app, ops.release, row["id"], actor="carol")
    assert record(app, "r") is None
    assert post(client, "/payments", key="r", json={"amount": 2}).status_code == 201
    assert charges(app) == 2
    [event] = events(app, "release")
    assert (event["actor"], event["record_id"], event["key"]) == ("carol", row["id"], "r")


def test_purge_deletes_expired_records_in_batches_but_never_in_progress(
    app: Flask, client: FlaskClient, clock: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    pauses: list[float] = []
    monkeypatch.setattr(ops.time, "sleep", pauses.append)
    for i in range(5):
        post(client, "/payments", key=f"old{i}", json={})
    owner = make_stuck(app, clock)
    try:
        clock.advance(hours=25)
        post(client, "/payments", key="fresh", json={})
        assert in_app(app, ops.purge, batch_size=2) == 5
        assert sorted(r["key"] for r in records(app)) == ["fresh", "stuck-1"]
        assert pauses == [ops.PURGE_PAUSE] * 2  # between the three batches (2 + 2 + 1), not after the last
        assert in_app(app, ops.purge, batch_size=2) == 0
    finally:
        finish(owner)


def test_purge_pause_is_configurable_and_validated(
    app: Flask, client: FlaskClient, clock: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    pauses: list[float] = []
    monkeypatch.setattr(ops.time, "sleep", pauses.append)
    for i in range(3):
        post(client, "/payments", key=f"old{i}", json={})
    clock.advance(hours=25)
    with pytest.raises(ValueError, match="pause"):
        in_app(app, ops.purge, pause=-1)
    assert in_app(app, ops.purge, batch_size=1, pause=0) == 3 and pauses == []
    for i in range(3):
        post(client, "/payments", key=f"new{i}", json={})
    clock.advance(hours=25)
    result = cli(app, "purge", "--batch-size", "2", "--pause", "0.5", "--json")
    assert result.exit_code == 0 and json.loads(result.output)["deleted"] == 3 and pauses == [0.5]
    assert cli(app, "purge", "--pause", "-1").exit_code == 2 and records(app) == []


def test_purge_can_stop_after_some_batches(app: Flask, client: FlaskClient, clock: Any) -> None:
    for i in range(5):
        post(client, "/payments", key=f"old{i}", json={})
    clock.advance(hours=25)
    assert in_app(app, ops.purge, batch_size=2, max_batches=1) == 2
    assert len(records(app)) == 3


def cli(app: Flask, *args: str) -> Any:
    result = app.test_cli_runner().invoke(args=["idempotency", *args])
    return result


def test_cli_commands_with_json(app: Flask, client: FlaskClient, clock: Any) -> None:
    post(client, "/payments", key="a", json={"amount": 1})
    owner = make_stuck(app, clock)
    try:
        result = cli(app, "stats", "--json")
        assert result.exit_code == 0, result.output
        assert json.loads(result.output)["stuck"] == 1
        stuck = json.loads(cli(app, "stuck", "--json").output)
        assert [r["key"] for r in stuck["items"]] == ["stuck-1"]
        record_id = stuck["items"][0]["id"]
        shown = json.loads(cli(app, "show", "", "stuck-1", "--json").output)
        assert shown["state"] == "IN_PROGRESS" and shown["stuck"] is True
        result = cli(app, "mark-retryable", str(record_id), "--actor", "oncall", "--json")
        assert result.exit_code == 0, result.output
        assert json.loads(result.output)["retryable"] is True
        assert events(app, "mark_retryable")[0]["actor"] == "oncall"
        assert "COMPLETED" in cli(app, "stats").output
    finally:
        finish(owner)
    bad = cli(app, "mark-failed", str(record(app, "a")["id"]))
    assert bad.exit_code != 0 and "COMPLETED" in bad.output
    missing = cli(app, "release", "424242")
    assert missing.exit_code != 0 and "no idempotency record" in missing.output
    assert cli(app, "show", "", "nope").exit_code != 0
    clock.advance(hours=25)
    purged = cli(app, "purge", "--batch-size", "1", "--json")
    assert purged.exit_code == 0 and json.loads(purged.output)["deleted"] == 2
    assert records(app) == []


def test_stats_counts_run_on_indexes_and_estimate_completed_on_large_tables(
    app: Flask, client: FlaskClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    post(client, "/payments", key="a", json={})
    post(client, "/payments", key="b", json={})
    s = in_app(app, ops.stats)
    assert s["by_state"]["COMPLETED"] == 2 and s["completed_estimated"] is False
    seen: list[str] = []
    import sqlalchemy as sa

    with app.app_context():
        engine = ext(app)["db"].engine
    listener = lambda conn, cursor, statement, *a: seen.append(statement)  # noqa: E731
    sa.event.listen(engine, "before_cursor_execute", listener)
    try:
        in_app(app, ops.stats)
    finally:
        sa.event.remove(engine, "before_cursor_execute", listener)
    assert not any("GROUP BY idempotency_records.state" in s for s in seen)
    if engine.dialect.name == "postgresql":
        monkeypatch.setattr(reports, "EXACT_COUNT_LIMIT", 0)
        with app.app_context(), engine.begin() as conn:
            conn.execute(sa.text("ANALYZE idempotency_records"))
        s = in_app(app, ops.stats)
        assert s["completed_estimated"] is True and s["by_state"]["COMPLETED"] == 2


def test_counts_stop_at_the_limit_and_say_so(app: Flask, client: FlaskClient, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(reports, "COUNT_LIMIT", 3)
    post(client, "/payments", key="c", json={"amount": 1})
    for amount in range(2, 5):
        post(client, "/payments", key="c", json={"amount": amount})
    s = in_app(app, ops.stats)
    assert (s["conflicts_24h"], s["conflicts_24h_capped"]) == (3, False)  # exactly the limit: exact
    post(client, "/payments", key="c", json={"amount": 5})
    s = in_app(app, ops.stats)
    assert (s["conflicts_24h"], s["conflicts_24h_capped"]) == (3, True)
    assert "conflicts   3+ in the last 24 h" in cli(app, "stats").output
    page = in_app(app, ops.list_conflicts, per_page=2)
    assert (page.total, page.total_capped, len(page.items), page.has_next) == (3, True, 2, True)
    last = in_app(app, ops.list_conflicts, page=2, per_page=2)  # the 4 conflicts end on page 2
    assert (len(last.items), last.has_next, last.pages) == (2, True, 2)
    assert in_app(app, ops.list_conflicts, page=3, per_page=2).items == []
    for i in range(4):
        post(client, "/payments", key=f"s{i}", json={"amount": 1})
    listed = json.loads(cli(app, "stuck", "--json").output)
    assert (listed["total"], listed["total_capped"]) == (0, False)
    assert len(events(app, "conflict")) == 4


def test_cli_lists_failed_conflicts_and_search_like_the_dashboard(app: Flask, client: FlaskClient) -> None:
    controls = ext(app)["controls"]
    post(client, "/payments", key="ok", json={"amount": 1})
    post(client, "/payments", key="ok", json={"amount": 2})  # a conflict
    controls.status = 500
    post(client, "/payments", key="final", json={"amount": 1})
    controls.status = 503
    post(client, "/payments", key="retry", json={"amount": 1})
    controls.status = None

    def keys(*args: str) -> list[str]:
        result = cli(app, *args, "--json")
        assert result.exit_code == 0, result.output
        return [item["key"] for item in json.loads(result.output)["items"]]

    assert keys("failed") == ["retry", "final"]
    assert keys("failed", "--which", "awaiting") == ["final"] == keys("failed", "--which", "final")
    assert keys("failed", "--which", "retryable") == ["retry"]
    assert keys("failed", "--kind", "task") == []
    assert keys("conflicts") == ["ok"] == keys("conflicts", "--hours", "1")
    assert keys("search", "ok") == ["ok"] and keys("search", "nope") == []
    human = cli(app, "conflicts")
    assert human.exit_code == 0 and 'key "ok"' in human.output and "first: record 1 POST /payments" in human.output
    assert "final" in cli(app, "failed", "--which", "final").output


def test_cli_show_takes_an_id_or_a_scope_and_key(app: Flask, client: FlaskClient) -> None:
    post(client, "/payments", key="k", json={"amount": 1})
    row = record(app, "k")
    by_id = json.loads(cli(app, "show", str(row["id"]), "--json").output)
    by_key = json.loads(cli(app, "show", "", "k", "--json").output)
    assert by_id["id"] == by_key["id"] == row["id"] and by_id["version"] == 2
    bad = cli(app, "show", "x1")
    assert bad.exit_code == 2 and "give a record ID" in bad.output


def test_cli_release_asks_first_and_refuses_before_asking(app: Flask, client: FlaskClient, clock: Any) -> None:
    post(client, "/payments", key="k", json={"amount": 1})
    row = record(app, "k")
    declined = app.test_cli_runner().invoke(args=["idempotency", "release", str(row["id"])], input="n\n")
    assert declined.exit_code == 1 and "Release record" in declined.output and record(app, "k") is not None
    accepted = app.test_cli_runner().invoke(args=["idempotency", "release", str(row["id"])], input="y\n")
    assert accepted.exit_code == 0, accepted.output
    assert record(app, "k") is None and [e["kind"] for e in events(app)] == ["release"]
    owner = make_stuck(app, clock)  # a stuck record whose owner is still alive
    clock.advance(minutes=-12)  # ... and back: its lease is live again
    live = record(app, "stuck-1")
    refused = app.test_cli_runner().invoke(args=["idempotency", "release", str(live["id"])])
    assert refused.exit_code == 1 and "lease is still live" in refused.output and "Release record" not in refused.output
    finish(owner)
