"""Webhooks: the key comes from the request (a delivery-id header or the body's event id), the scope is fixed
per sender. A redelivery is answered from the record and runs once; the same id with another payload is 422."""

from __future__ import annotations

import hashlib
import hmac
from typing import Any

import pytest
from flask import Flask, abort, jsonify, request
from flask.testing import FlaskClient
from helpers import ext, problem_code, record, records

from flask_idempotent import idempotent

SECRET = b"whsec_test"


def signature(body: bytes) -> str:
    return hmac.new(SECRET, body, hashlib.sha256).hexdigest()


def add_webhooks(app: Flask) -> None:
    controls = ext(app)["controls"]
    db, charge_model = ext(app)["db"], ext(app)["Charge"]

    @app.before_request
    def verify_signature() -> None:  # registered after init_app: runs after the claim, withdrawn if it rejects
        if request.path.startswith("/webhooks/"):
            sent = request.headers.get("X-Signature", "")
            if not hmac.compare_digest(sent, signature(request.get_data())):
                abort(401)

    @app.post("/webhooks/github")
    @idempotent(key=lambda: request.headers.get("X-GitHub-Delivery"), scope="github")
    def github() -> Any:
        controls.ran("github")
        return jsonify(received=True), 200

    @app.post("/webhooks/stripe")
    @idempotent(
        key=lambda: (request.get_json(silent=True) or {}).get("id"),
        scope="stripe",
        describe=lambda: f"{request.get_json()['type']} {request.get_json()['amount'] / 100:.2f} EUR",
    )
    def stripe() -> Any:
        controls.ran("stripe")
        row = charge_model(amount=request.get_json()["amount"], route="stripe")
        db.session.add(row)
        db.session.commit()
        return jsonify(received=True, charge=row.id), 200


def deliver(client: FlaskClient, path: str, body: bytes, **headers: str) -> Any:
    return client.post(
        path,
        data=body,
        headers={"Content-Type": "application/json", "X-Signature": signature(body), **headers},
    )


def test_a_redelivered_webhook_runs_once_and_the_sender_sees_success(app: Flask, client: FlaskClient) -> None:
    add_webhooks(app)
    body = b'{"action": "opened"}'
    first = deliver(client, "/webhooks/github", body, **{"X-GitHub-Delivery": "d-1"})
    again = deliver(client, "/webhooks/github", body, **{"X-GitHub-Delivery": "d-1"})
    assert (first.status_code, again.status_code) == (200, 200)
    assert again.headers["Idempotent-Replayed"] == "true" and again.data == first.data
    assert ext(app)["controls"].runs["github"] == 1
    assert [(r["scope"], r["key"], r["kind"]) for r in records(app)] == [("github", "d-1", "http")]


def test_the_same_delivery_id_with_another_payload_is_422(app: Flask, client: FlaskClient) -> None:
    add_webhooks(app)
    deliver(client, "/webhooks/github", b'{"action": "opened"}', **{"X-GitHub-Delivery": "d-1"})
    other = deliver(client, "/webhooks/github", b'{"action": "closed"}', **{"X-GitHub-Delivery": "d-1"})
    assert other.status_code == 422 and problem_code(other) == "key-reused"
    assert ext(app)["controls"].runs["github"] == 1


def test_the_key_from_the_body_and_a_summary_for_operators(app: Flask, client: FlaskClient) -> None:
    add_webhooks(app)
    body = b'{"id": "evt_1", "type": "charge.succeeded", "amount": 1000}'
    assert deliver(client, "/webhooks/stripe", body).status_code == 200
    assert deliver(client, "/webhooks/stripe", body).headers["Idempotent-Replayed"] == "true"
    row = record(app, "evt_1", "stripe")
    assert row is not None and row["summary"] == "charge.succeeded 10.00 EUR"
    assert ext(app)["controls"].runs["stripe"] == 1


def test_a_bad_signature_is_rejected_and_never_claims(app: Flask, client: FlaskClient) -> None:
    add_webhooks(app)
    body = b'{"action": "opened"}'
    forged = client.post("/webhooks/github", data=body, headers={"X-GitHub-Delivery": "d-1", "X-Signature": "0" * 64})
    assert forged.status_code == 401 and records(app) == []
    assert deliver(client, "/webhooks/github", body, **{"X-GitHub-Delivery": "d-1"}).status_code == 200


@pytest.mark.parametrize(
    ("headers", "status", "code"),
    [({}, 400, "missing-key"), ({"X-GitHub-Delivery": "a b"}, 400, "invalid-key")],
)
def test_a_webhook_without_a_usable_id_is_400(
    app: Flask, client: FlaskClient, headers: dict[str, str], status: int, code: str
) -> None:
    add_webhooks(app)
    response = deliver(client, "/webhooks/github", b"{}", **headers)
    assert response.status_code == status and problem_code(response) == code
    assert records(app) == [] and ext(app)["controls"].runs["github"] == 0


@pytest.mark.parametrize(
    ("body", "code"),
    [
        (b'{"id": 12345}', "invalid-key"),
        (b'{"id": ["evt_1", "evt_2"]}', "invalid-key"),
        (b'{"id": {"value": "evt_1"}}', "invalid-key"),
        (b'{"id": true}', "invalid-key"),
        (b'{"id": "evt 1"}', "invalid-key"),
        (b'{"id": "evt_1 "}', "invalid-key"),  # not "evt_1": an id is the sender's, whitespace and all
        (b'{"id": null}', "missing-key"),
    ],
)
def test_a_key_callable_returning_anything_but_a_valid_string_is_400_like_the_header(
    app: Flask, client: FlaskClient, body: bytes, code: str
) -> None:
    add_webhooks(app)  # the documented example: key=lambda: (request.get_json(silent=True) or {}).get("id")
    response = deliver(client, "/webhooks/stripe", body)
    assert response.status_code == 400 and problem_code(response) == code
    assert records(app) == [] and ext(app)["controls"].runs["stripe"] == 0


def test_route_options_are_checked_when_the_view_is_decorated() -> None:
    with pytest.raises(TypeError, match="key="):
        idempotent(key="X-Delivery")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="scope="):
        idempotent(scope="x" * 256)


def test_a_routes_runbook_is_shown_with_its_records(app: Flask, client: FlaskClient, clock: Any) -> None:
    controls = ext(app)["controls"]

    @app.post("/payouts")
    @idempotent(runbook="https://wiki.example/runbooks/payouts", describe=lambda: "payout 5.00 EUR")
    def payout() -> Any:
        controls.ran("payouts")
        return jsonify(ok=True), 201

    from concurrency import Background

    held = controls.hold("payouts")
    owner = Background(app, "/payouts", key="p-1", json={})
    assert held.entered.wait(10)
    clock.advance(seconds=61)
    row = record(app, "p-1")
    ext(app)["idempotency"].dashboard_access(lambda: "oncall")
    page = client.get(f"/idempotency/records/{row['id']}").get_data(as_text=True)
    assert 'href="https://wiki.example/runbooks/payouts"' in page and "payout 5.00 EUR" in page
    shown = app.test_cli_runner().invoke(args=["idempotency", "show", "", "p-1", "--json"])
    assert '"runbook": "https://wiki.example/runbooks/payouts"' in shown.output
    held.release.set()
    owner.result()
