"""docs/operating.md's operator table, the same from the Python API, the CLI and the dashboard; and the guards every
transition rests on: versioned compare-and-set, the lease owner's fence, the database's clock.

Each row of the table is tried on a record in each state, through each interface: an allowed action has its
effect, bumps ``version`` once and is audited with the actor; a refused one names the rule and changes
nothing (the row is byte-identical, no event).
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
import sqlalchemy as sa
from concurrency import Background
from flask import Flask
from flask.testing import FlaskClient
from helpers import charges, events, ext, post, problem_code, record, records
from test_dashboard import PREFIX, allow, form_fields
from test_dashboard import insert as insert_row

from flask_idempotent import operations as ops
from flask_idempotent.machine import Action
from flask_idempotent.models import RECORDS_TABLE

#: A time written by hand or by another tool: no fractional seconds (on SQLite, text that never equals a time
#: the layer writes). Every scenario's decisive time is written like this.
HAND_WRITTEN_PAST = "2000-01-01 00:00:00"

SCENARIOS: dict[str, dict[str, Any]] = {
    "completed": {"state": "COMPLETED", "response_status": 201},
    "failed_retryable": {"state": "FAILED", "retryable": True, "response_status": 503},
    "failed_final": {"state": "FAILED", "response_status": 500},
    "acknowledged": {"state": "FAILED", "response_status": 500, "acknowledged_by": "bob"},
    "live": {"state": "IN_PROGRESS", "lease_token": "owner", "locked_until": "+10 minutes"},
    "stuck": {"state": "IN_PROGRESS", "lease_token": "owner", "locked_until": HAND_WRITTEN_PAST},
}

LIVE = "lease is still live"
#: (action, scenario) -> the rule that refuses it; absent pairs are allowed.
REFUSED = {
    **{(action, "live"): LIVE for action in Action},
    **{(action, "completed"): "COMPLETED record is replayed" for action in Action if action is not Action.RELEASE},
    (Action.MARK_RETRYABLE, "failed_retryable"): "already retryable",
    (Action.MARK_FAILED, "failed_final"): "already failed for good",
    (Action.MARK_FAILED, "acknowledged"): "already failed for good",
    (Action.ACKNOWLEDGE, "failed_retryable"): "only a final failure",
    (Action.ACKNOWLEDGE, "stuck"): "only a final failure",
    (Action.ACKNOWLEDGE, "acknowledged"): "already acknowledged by bob",
}


def insert(app: Flask, clock: Any, key: str, scenario: str) -> int:
    """A record in ``scenario``'s state (the dashboard tests' row). Decisive times go in as SQL text:
    hand-written, or the DB's clock."""
    values: dict[str, Any] = {"response_status": None, "response_body": None, "error": None, **SCENARIOS[scenario]}
    locked_until = values.pop("locked_until", None)
    if values.get("acknowledged_by"):
        values["acknowledged_at"] = clock.now
    record_id = insert_row(app, clock, key, **values)
    with app.app_context(), ext(app)["db"].engine.begin() as conn:
        table = ext(app)["db"].metadata.tables[RECORDS_TABLE]
        if locked_until == "+10 minutes":
            conn.execute(sa.update(table).values(locked_until=clock.now + timedelta(minutes=10)))
        elif locked_until is not None:
            conn.execute(sa.text(f"UPDATE {RECORDS_TABLE} SET locked_until = '{locked_until}'"))
    return record_id


def via_api(app: Flask, client: FlaskClient, action: Action, record_id: int) -> tuple[bool, str]:
    with app.app_context():
        try:
            ops.act(action, record_id, actor="alice")
        except ops.TransitionError as exc:
            return False, str(exc)
    return True, ""


def via_cli(app: Flask, client: FlaskClient, action: Action, record_id: int) -> tuple[bool, str]:
    yes = ["--yes"] if action is Action.RELEASE else []  # release asks first; its refusals come before the question
    result = app.test_cli_runner().invoke(args=["idempotency", action.value, str(record_id), "--actor", "alice", *yes])
    assert result.exit_code in (0, 1), result.output
    assert "Traceback" not in result.output
    return result.exit_code == 0, result.output


def via_dashboard(app: Flask, client: FlaskClient, action: Action, record_id: int) -> tuple[bool, str]:
    allow(app, "alice")
    page = client.get(f"{PREFIX}/records/{record_id}").get_data(as_text=True)
    # Every form carries the CSRF token and the version the operator saw; release's is on its confirmation
    # page, which shows the refusal instead of a form: post what a stale page would have posted.
    data = form_fields(page, f"/records/{record_id}/mark-retryable")
    if action is Action.RELEASE:
        data["confirm"] = "release"
    response = client.post(f"{PREFIX}/records/{record_id}/{action.value}", data=data)
    assert response.status_code in (303, 409), response.status_code
    return response.status_code == 303, response.get_data(as_text=True)


INTERFACES = {"api": via_api, "cli": via_cli, "dashboard": via_dashboard}


@pytest.mark.parametrize("interface", list(INTERFACES))
@pytest.mark.parametrize("scenario", list(SCENARIOS))
@pytest.mark.parametrize("action", list(Action), ids=[a.value for a in Action])
def test_the_operator_table_holds_from_every_interface(
    app: Flask, client: FlaskClient, clock: Any, interface: str, scenario: str, action: Action
) -> None:
    record_id = insert(app, clock, "k-1", scenario)
    before = record(app, "k-1")
    assert before is not None and before["version"] == 1

    applied, said = INTERFACES[interface](app, client, action, record_id)

    rule = REFUSED.get((action, scenario))
    if rule is not None:
        assert not applied and rule in said
        assert records(app) == [before] and events(app) == []
        return
    assert applied, said
    [event] = events(app)
    assert (event["kind"], event["actor"], event["record_id"]) == (action.event.value, "alice", record_id)
    after = record(app, "k-1")
    if action is Action.RELEASE:
        assert after is None
        return
    assert after is not None and after["version"] == 2
    assert after["lease_token"] is None and after["locked_until"] is None
    if action is Action.ACKNOWLEDGE:
        assert (after["state"], after["retryable"], after["acknowledged_by"]) == ("FAILED", False, "alice")
        assert after["acknowledged_at"] is not None
    else:
        assert (after["state"], after["retryable"]) == ("FAILED", action is Action.MARK_RETRYABLE)
        if action is Action.MARK_RETRYABLE:
            assert after["acknowledged_at"] is None  # a new decision replaces the acknowledgement


def test_acknowledged_failures_leave_the_awaiting_list_and_the_overview(
    app: Flask, client: FlaskClient, clock: Any
) -> None:
    first = insert(app, clock, "final-1", "failed_final")
    insert(app, clock, "final-2", "failed_final")
    with app.app_context():
        assert ops.stats()["awaiting_decision"] == 2
        ops.acknowledge(first, actor="alice")
        assert [r["key"] for r in ops.list_failed(awaiting=True).items] == ["final-2"]
        assert {r["key"] for r in ops.list_failed(retryable=False).items} == {"final-1", "final-2"}
        assert (ops.stats()["awaiting_decision"], ops.stats()["failed_final"]) == (1, 2)
    allow(app)
    overview = client.get(f"{PREFIX}/").get_data(as_text=True)
    assert 'data-fi-count="awaiting_decision">1<' in overview


def test_two_operators_on_the_same_version_only_the_first_acts(app: Flask, client: FlaskClient, clock: Any) -> None:
    record_id = insert(app, clock, "k-1", "stuck")
    with app.app_context():
        ops.mark_failed(record_id, actor="alice", version=1)
        with pytest.raises(ops.RecordChanged, match="changed since you looked"):
            ops.mark_retryable(record_id, actor="bob", version=1)
    after = record(app, "k-1")
    assert (after["state"], after["retryable"], after["version"]) == ("FAILED", False, 2)
    assert [e["actor"] for e in events(app)] == ["alice"]
    # The CLI takes the version the operator looked at, too.
    stale = app.test_cli_runner().invoke(
        args=["idempotency", "acknowledge", str(record_id), "--expect-version", "1", "--actor", "bob"]
    )
    assert stale.exit_code == 1 and "changed since you looked" in stale.output
    # The dashboard: two operators loaded the page at version 2; the second one's form is refused with 409.
    allow(app, "alice")
    page = client.get(f"{PREFIX}/records/{record_id}").get_data(as_text=True)
    fields = form_fields(page, f"/records/{record_id}/acknowledge")
    assert client.post(f"{PREFIX}/records/{record_id}/acknowledge", data=fields).status_code == 303
    again = client.post(f"{PREFIX}/records/{record_id}/mark-retryable", data=fields)
    assert again.status_code == 409 and "changed since you loaded the page" in again.get_data(as_text=True)
    assert record(app, "k-1")["version"] == 3 and len(events(app)) == 2


def test_releasing_a_running_request_is_refused_so_its_retry_never_runs_twice(
    app: Flask, client: FlaskClient, clock: Any
) -> None:
    controls = ext(app)["controls"]
    held = controls.hold("payments")
    first = Background(app, "/payments", json={"amount": 5})
    assert held.entered.wait(10)
    row = record(app, "k-1")
    with app.app_context(), pytest.raises(ops.TransitionError, match=LIVE):
        ops.release(row["id"], actor="alice")
    cli = app.test_cli_runner().invoke(args=["idempotency", "release", str(row["id"])])
    assert cli.exit_code == 1 and LIVE in cli.output
    allow(app)
    confirm = client.get(f"{PREFIX}/records/{row['id']}/release").get_data(as_text=True)
    assert 'data-fi-refused="release"' in confirm and LIVE in confirm
    assert record(app, "k-1") == row
    duplicate = post(client, "/payments", json={"amount": 5})
    assert duplicate.status_code == 409 and problem_code(duplicate) == "in-progress"
    held.release.set()
    assert first.result().status_code == 201
    assert post(client, "/payments", json={"amount": 5}).headers["Idempotent-Replayed"] == "true"
    assert controls.runs["payments"] == 1 and charges(app, "payments") == 1


def test_an_old_owner_finishing_while_the_new_owner_runs_is_fenced_out(
    app: Flask, client: FlaskClient, clock: Any
) -> None:
    controls = ext(app)["controls"]
    old_held = controls.hold("phases-after-charge")
    old = Background(app, "/phases", json={"order": 1})
    assert old_held.entered.wait(10)  # A charged and checkpointed; then it stalls past its lease
    clock.advance(seconds=31)
    new_held = controls.hold("phases-resumed")
    new = Background(app, "/phases", json={"order": 1})
    assert new_held.entered.wait(10)  # B took over and is resuming
    taken = record(app, "k-1")
    assert (taken["state"], taken["attempts"]) == ("IN_PROGRESS", 2)

    old_held.release.set()  # A finishes while B still runs
    old.result()
    still = record(app, "k-1")
    assert still == taken  # A's outcome was refused: the record is B's, untouched

    new_held.release.set()
    assert new.result().status_code == 201
    done = record(app, "k-1")
    assert (done["state"], done["attempts"], done["version"]) == ("COMPLETED", 2, taken["version"] + 1)
    replay = post(client, "/phases", json={"order": 1})
    assert replay.headers["Idempotent-Replayed"] == "true" and replay.get_json()["attempt"] == 2
    assert [e["kind"] for e in events(app)] == ["checkpoint", "takeover"]


def test_an_owners_write_needs_its_lease_token_even_at_the_right_version(app: Flask, clock: Any) -> None:
    record_id = insert(app, clock, "k-1", "live")
    with app.app_context():
        state = app.extensions["idempotency"].state(app)
        values = {"state": "COMPLETED", "retryable": False, "locked_until": None, "response_status": 201}
        with state.engine.connect() as conn:
            assert not state.store.settle(conn, record_id, 1, "someone-else", values, ttl=60)
            assert not state.store.checkpoint(conn, record_id, 1, "someone-else", {"recovery_point": "x"}, 60, ttl=60)
            assert not state.store.settle(conn, record_id, 2, "owner", values, ttl=60)  # right token, other version
            assert record(app, "k-1")["state"] == "IN_PROGRESS"
            assert state.store.settle(conn, record_id, 1, "owner", values, ttl=60)
    assert (record(app, "k-1")["state"], record(app, "k-1")["version"]) == ("COMPLETED", 2)


def test_hand_written_times_decide_like_any_other(app: Flask, client: FlaskClient, clock: Any) -> None:
    post(client, "/payments", key="old", json={"amount": 1})
    post(client, "/payments", key="null-lease", json={"amount": 1})
    with app.app_context(), ext(app)["db"].engine.begin() as conn:
        key = conn.dialect.identifier_preparer.quote("key")  # a reserved word in MySQL
        conn.execute(sa.text(f"UPDATE {RECORDS_TABLE} SET expires_at = '{HAND_WRITTEN_PAST}' WHERE {key} = 'old'"))
        conn.execute(
            sa.text(f"UPDATE {RECORDS_TABLE} SET state = 'IN_PROGRESS', locked_until = NULL WHERE {key} = 'null-lease'")
        )
    # Expired by a hand-written time: the record counts as absent, so another command runs in its place.
    replaced = post(client, "/payments", key="old", json={"amount": 2})
    assert replaced.status_code == 201 and "Idempotent-Replayed" not in replaced.headers
    assert (record(app, "old")["attempts"], record(app, "old")["version"]) == (1, 4)
    # IN_PROGRESS without a lease is stuck for requests, listings and operators alike.
    stuck = post(client, "/payments", key="null-lease", json={"amount": 1})
    assert stuck.status_code == 409 and problem_code(stuck) == "stuck"
    with app.app_context():
        assert [r["key"] for r in ops.list_stuck().items] == ["null-lease"]
        assert ops.stats()["stuck"] == 1
        ops.mark_retryable(record(app, "null-lease")["id"], actor="alice")
    assert post(client, "/payments", key="null-lease", json={"amount": 1}).status_code == 201
    assert charges(app, "payments") == 4
