"""Text the layer stores holds any character a client can send: NUL (which PostgreSQL's text cannot hold) and lone
surrogates (which no store's UTF-8 can) are stored escaped, on every store and both PostgreSQL drivers; the
request is answered as any other, never 500 or 503 (docs: "The record", stored text).

Run with ``IDEMPOTENCY_TEST_PG_DRIVERS=psycopg2,psycopg`` for psycopg 3 too. The same through gunicorn:
``tests/test_real_servers_input.py``.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from flask import Flask, jsonify, request
from flask.testing import FlaskClient
from helpers import events, ext, post, problem_code, record, records

from flask_idempotent import idempotent
from flask_idempotent import operations as ops
from flask_idempotent.models import storable_text


def add_notes(app: Flask) -> None:
    controls = ext(app)["controls"]

    @app.post("/notes/<name>")
    @idempotent(describe=lambda: (request.get_json(silent=True) or {}).get("summary"))
    def note(name: str) -> Any:
        controls.ran("notes")
        body = request.get_json(silent=True) or {}
        if "fail" in body:
            raise ValueError(body["fail"])
        return jsonify(name=name), 201


@pytest.mark.parametrize(
    ("text", "stored"),
    [
        ("plain text, é and 🎉", "plain text, é and 🎉"),
        ("a\x00b", "a\\x00b"),
        ("lone \ud800 and \udfff", "lone \\ud800 and \\udfff"),
        ("\x1b[2J\x07\r", "\x1b[2J\x07\r"),  # storable as it is: the CLI and dashboard escape it when shown
        ("\\x00 as four characters", "\\x00 as four characters"),
    ],
)
def test_storable_text_escapes_only_what_no_store_can_hold(text: str, stored: str) -> None:
    assert storable_text(text) == stored


def test_storable_text_cuts_to_the_column_length_between_escapes() -> None:
    assert storable_text("ab\x00cd", 4) == "ab"  # never half an escape
    assert storable_text("ab\x00cd", 7) == "ab\\x00c"
    assert storable_text("x" * 300, 255) == "x" * 255


def test_a_nul_in_a_path_variable_is_stored_escaped_and_the_request_replays(app: Flask, client: FlaskClient) -> None:
    add_notes(app)
    first = post(client, "/notes/a%00b", json={})
    again = post(client, "/notes/a%00b", json={})
    assert first.status_code == 201 and first.get_json() == {"name": "a\x00b"}
    assert again.status_code == 201 and again.headers["Idempotent-Replayed"] == "true" and again.data == first.data
    other = post(client, "/notes/a%00c", json={})  # the same key, another command
    assert other.status_code == 422 and problem_code(other) == "key-reused"
    assert ext(app)["controls"].runs["notes"] == 1
    [row] = records(app)
    assert (row["path"], row["state"]) == ("/notes/a\\x00b", "COMPLETED")
    [event] = events(app, "conflict")
    assert event["detail"]["path"] == "/notes/a\\x00c"  # the event's path reads like the record's


def test_a_summary_with_nul_and_lone_surrogates_is_stored_escaped(app: Flask, client: FlaskClient) -> None:
    add_notes(app)
    summary = "10.00 EUR\x00 to \ud800ACME " + "x" * 300  # also longer than the column, once escaped
    response = post(client, "/notes/n", data=json.dumps({"summary": summary}), content_type="application/json")
    assert response.status_code == 201
    [row] = records(app)
    assert row["summary"] == storable_text(summary, 255)
    assert row["summary"].startswith("10.00 EUR\\x00 to \\ud800ACME xxx") and len(row["summary"]) == 255


@pytest.mark.parametrize("app_config", [{"PROPAGATE_EXCEPTIONS": False}])
def test_an_error_message_with_nul_and_lone_surrogates_is_stored_escaped(app: Flask, client: FlaskClient) -> None:
    add_notes(app)
    response = post(
        client, "/notes/n", data=b'{"fail": "card \\u0000 \\udc80 refused"}', content_type="application/json"
    )
    assert response.status_code == 500  # the view's own failure, stored: a final FAILED record
    again = post(client, "/notes/n", data=b'{"fail": "card \\u0000 \\udc80 refused"}', content_type="application/json")
    assert again.status_code == 500 and again.headers["Idempotent-Replayed"] == "true"
    row = record(app, "k-1")
    assert row is not None and (row["state"], row["retryable"]) == ("FAILED", False)
    assert row["error"] == "ValueError: card \\x00 \\udc80 refused"
    assert ext(app)["controls"].runs["notes"] == 1


@pytest.mark.parametrize("app_config", [{"PROPAGATE_EXCEPTIONS": False}])
def test_an_operators_name_is_stored_escaped(app: Flask, client: FlaskClient) -> None:
    add_notes(app)
    assert post(client, "/notes/a%00b", json={"fail": "no"}).status_code == 500
    [row] = records(app)
    with app.app_context():
        ops.acknowledge(row["id"], actor="ops \x00 \ud800")
    after = record(app, "k-1")
    assert after is not None and after["acknowledged_by"] == "ops \\x00 \\ud800"
    [event] = [e for e in events(app) if e["actor"]]
    assert event["actor"] == "ops \\x00 \\ud800"


@pytest.mark.parametrize("scope", ["tenant\x00-7", "\x00"])
def test_a_scope_holding_a_nul_is_refused_as_a_set_up_error_and_nothing_runs(
    app: Flask, client: FlaskClient, scope: str
) -> None:
    # Scopes compare byte for byte, so they cannot be stored escaped: "a\x00" would meet the scope "a\\x00".
    add_notes(app)
    response = post(client, "/notes/n", user=scope, json={})
    assert response.status_code == 500 and problem_code(response) == "scope-error"
    assert records(app) == [] and ext(app)["controls"].runs["notes"] == 0


def test_once_with_a_scope_holding_a_nul_is_refused_before_any_claim(app: Flask) -> None:
    once = ext(app)["idempotency"].once
    with app.app_context(), pytest.raises(ValueError, match="without NUL"), once("refunds\x00", "r-1", command={}):
        pass
    assert records(app) == []


def test_a_task_whose_error_holds_a_nul_is_stored_escaped(app: Flask) -> None:
    idempotency = ext(app)["idempotency"]

    @idempotency.task(key=lambda order_id: f"charge:{order_id}", scope="billing")
    def charge(order_id: int) -> None:
        raise ValueError("provider said \x00")

    with app.app_context(), pytest.raises(ValueError):
        charge(7)
    row = record(app, "charge:7", "billing")
    assert row is not None and (row["state"], row["error"]) == ("FAILED", "ValueError: provider said \\x00")
