"""docs/behaviour.md's HTTP table, row by row: the response and the record left in the database."""

from __future__ import annotations

from flask import Flask
from flask.testing import FlaskClient
from helpers import charges, events, post, problem_code, reads, record, records


def test_missing_key_is_rejected_with_400_and_nothing_is_stored(app: Flask, client: FlaskClient) -> None:
    response = post(client, "/payments", key=None, json={"amount": 10})
    assert response.status_code == 400
    assert problem_code(response) == "missing-key"
    assert charges(app) == 0
    assert records(app) == []


def test_missing_key_on_optional_route_runs_the_view_unprotected(app: Flask, client: FlaskClient) -> None:
    assert post(client, "/optional", key=None, json={"amount": 10}).status_code == 201
    assert post(client, "/optional", key=None, json={"amount": 10}).status_code == 201
    assert charges(app, "optional") == 2
    assert records(app) == []


def test_key_on_optional_route_protects_it(app: Flask, client: FlaskClient) -> None:
    first = post(client, "/optional", json={"amount": 10})
    second = post(client, "/optional", json={"amount": 10})
    assert second.headers["Idempotent-Replayed"] == "true"
    assert second.get_json() == first.get_json()
    assert charges(app, "optional") == 1


def test_new_key_runs_the_view_and_records_completed(app: Flask, client: FlaskClient, clock) -> None:
    response = post(client, "/payments", json={"amount": 10})
    assert response.status_code == 201
    assert "Idempotent-Replayed" not in response.headers
    assert charges(app, "payments") == 1
    row = record(app, "k-1")
    assert row is not None
    assert row["state"] == "COMPLETED"
    assert row["attempts"] == 1
    assert row["method"] == "POST" and row["path"] == "/payments" and row["endpoint"] == "create_payment"
    assert row["request_hash"].startswith("v1:") and len(row["request_hash"]) == 3 + 64
    assert row["response_status"] == 201
    assert row["locked_until"] is None
    assert reads(clock, row["created_at"])
    assert row["expires_at"] - row["updated_at"] == app.config["IDEMPOTENCY_TTL"]  # the ttl counts from the outcome


def test_same_key_same_command_replays_status_headers_and_body(app: Flask, client: FlaskClient) -> None:
    first = post(client, "/payments", json={"amount": 10})
    second = post(client, "/payments", json={"amount": 10})
    assert second.status_code == 201
    assert second.headers["Idempotent-Replayed"] == "true"
    assert second.data == first.data
    assert second.headers["Location"] == first.headers["Location"]
    assert second.headers["Content-Type"] == first.headers["Content-Type"]
    assert charges(app, "payments") == 1
    assert record(app, "k-1")["attempts"] == 1


def test_set_cookie_and_unlisted_headers_are_never_replayed(app: Flask, client: FlaskClient) -> None:
    first = post(client, "/payments", json={"amount": 10})
    assert "session_hint" in first.headers["Set-Cookie"]
    second = post(client, "/payments", json={"amount": 10})
    assert "Set-Cookie" not in second.headers
    assert "X-Not-Replayed" not in second.headers
    stored = {name.lower() for name, _ in record(app, "k-1")["response_headers"]}
    assert stored == {"content-type", "location"}


def test_same_key_different_amount_is_rejected_with_422(app: Flask, client: FlaskClient) -> None:
    post(client, "/payments", json={"amount": 10})
    before = record(app, "k-1")
    response = post(client, "/payments", json={"amount": 100})
    assert response.status_code == 422
    assert problem_code(response) == "key-reused"
    assert charges(app, "payments") == 1
    after = record(app, "k-1")
    assert {k: v for k, v in after.items() if k != "event_count"} == {
        k: v for k, v in before.items() if k != "event_count"
    }
    [event] = events(app, "conflict")
    assert event["record_id"] == before["id"]
    assert event["detail"]["path"] == "/payments"
    assert event["detail"]["request_hash"] != before["request_hash"]


def test_same_key_on_another_route_is_a_different_command(app: Flask, client: FlaskClient) -> None:
    post(client, "/payments", json={"amount": 10})
    response = post(client, "/other", json={"amount": 10})
    assert response.status_code == 422
    assert problem_code(response) == "key-reused"
    assert charges(app, "other") == 0
    assert events(app, "conflict")[0]["detail"]["path"] == "/other"


def test_view_arguments_are_part_of_the_command(app: Flask, client: FlaskClient) -> None:
    assert post(client, "/accounts/1/refunds", json={"amount": 5}).status_code == 201
    assert post(client, "/accounts/2/refunds", json={"amount": 5}).status_code == 422
    assert post(client, "/accounts/1/refunds", json={"amount": 5}).headers["Idempotent-Replayed"] == "true"
    assert charges(app) == 1


def test_same_key_in_another_scope_is_independent(app: Flask, client: FlaskClient) -> None:
    alice = post(client, "/payments", user="alice", json={"amount": 10})
    bob = post(client, "/payments", user="bob", json={"amount": 99})
    assert alice.status_code == bob.status_code == 201
    assert "Idempotent-Replayed" not in bob.headers
    assert bob.get_json()["amount"] == 99
    assert charges(app, "payments") == 2
    assert {r["scope"] for r in records(app)} == {"alice", "bob"}
    # Bob replaying his key gets his own response, never Alice's.
    assert post(client, "/payments", user="bob", json={"amount": 99}).get_json()["amount"] == 99


def test_key_on_get_is_ignored(app: Flask, client: FlaskClient) -> None:
    response = client.get("/payments", headers={"Idempotency-Key": "k-1"})
    assert response.status_code == 200
    assert client.get("/payments", headers={"Idempotency-Key": ""}).status_code == 200
    assert records(app) == []


def test_expired_record_is_replaced_by_a_new_execution(app: Flask, client: FlaskClient, clock) -> None:
    post(client, "/payments", json={"amount": 10})
    old = record(app, "k-1")
    clock.advance(hours=24, seconds=1)
    response = post(client, "/payments", json={"amount": 100})
    assert response.status_code == 201
    assert "Idempotent-Replayed" not in response.headers
    assert response.get_json()["amount"] == 100
    assert charges(app, "payments") == 2
    new = record(app, "k-1")
    assert new["id"] == old["id"]  # replaced in place, the unique key never free for a third request
    assert new["state"] == "COMPLETED" and new["attempts"] == 1
    assert new["request_hash"] != old["request_hash"]
    assert reads(clock, new["created_at"])


def test_async_view_is_protected(app: Flask, client: FlaskClient) -> None:
    first = post(client, "/async", json={"amount": 3})
    second = post(client, "/async", json={"amount": 3})
    assert first.status_code == 201
    assert second.headers["Idempotent-Replayed"] == "true"
    assert second.data == first.data
    assert charges(app, "async") == 1
    assert record(app, "k-1")["state"] == "COMPLETED"


def test_resource_reference_is_replayed_through_replay_callable(app: Flask, client: FlaskClient) -> None:
    first = post(client, "/resources", json={"amount": 7})
    row = record(app, "k-1")
    assert row["resource_ref"] == {"charge": first.get_json()["id"]}
    assert row["response_body"] is None
    second = post(client, "/resources", json={"amount": 7})
    assert second.status_code == 201
    assert second.get_json() == {"id": first.get_json()["id"], "amount": 7, "rebuilt": True}
    assert second.headers["Location"] == first.headers["Location"]
    assert second.headers["Idempotent-Replayed"] == "true"
    assert charges(app, "resources") == 1


def test_custom_fingerprint_replaces_the_default(app: Flask, client: FlaskClient) -> None:
    post(client, "/custom", json={"amount": 7, "note": "first"})
    # Only the amount is the command here: another note is the same command.
    assert post(client, "/custom", json={"amount": 7, "note": "retry"}).headers["Idempotent-Replayed"] == "true"
    assert post(client, "/custom", json={"amount": 8}).status_code == 422
    assert charges(app, "custom") == 1


def test_problem_type_base_is_configurable(app: Flask, client: FlaskClient) -> None:
    app.config["IDEMPOTENCY_PROBLEM_TYPE_BASE"] = "https://errors.example/"
    response = post(client, "/payments", key=None)
    assert response.get_json()["type"] == "https://errors.example/missing-key"
