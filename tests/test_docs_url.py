"""``IDEMPOTENCY_DOCS_URL``: problem ``type``s point at the app's documentation, and each problem links to it."""

from __future__ import annotations

from typing import Any

import pytest
from concurrency import Background, finish, make_stuck
from flask import Flask
from flask.testing import FlaskClient
from helpers import charges, events, ext, post, records
from testapp import Controls, build_app

from flask_idempotent.client import _judge

DOCS = "https://payments.example/docs/idempotency#"


@pytest.fixture
def app_config() -> dict[str, object]:
    return {"IDEMPOTENCY_DOCS_URL": DOCS, "IDEMPOTENCY_MAX_BODY_BYTES": 64}


def assert_documented(response: Any, status: int, code: str) -> None:
    assert response.status_code == status
    assert response.mimetype == "application/problem+json"
    body = response.get_json()
    assert body["type"] == DOCS + code and body["status"] == status and body["title"] and body["detail"]
    assert response.headers.getlist("Link") == [f'<{DOCS}{code}>; rel="describedby"']


def test_missing_key_links_its_documentation_and_stores_nothing(app: Flask, client: FlaskClient) -> None:
    assert_documented(post(client, "/payments", key=None, json={"amount": 1}), 400, "missing-key")
    assert records(app) == [] and charges(app) == 0


def test_invalid_key_links_its_documentation_and_stores_nothing(app: Flask, client: FlaskClient) -> None:
    assert_documented(post(client, "/payments", key="a,b", json={"amount": 1}), 400, "invalid-key")
    assert records(app) == [] and charges(app) == 0


def test_body_too_large_links_its_documentation_and_stores_nothing(app: Flask, client: FlaskClient) -> None:
    assert_documented(post(client, "/payments", json={"note": "x" * 100}), 413, "body-too-large")
    assert records(app) == [] and charges(app) == 0


def test_key_reused_links_its_documentation_and_leaves_the_record(app: Flask, client: FlaskClient) -> None:
    assert post(client, "/payments", json={"amount": 1}).status_code == 201
    [before] = records(app)
    assert_documented(post(client, "/payments", json={"amount": 2}), 422, "key-reused")
    [after] = records(app)
    assert {**after, "event_count": None} == {**before, "event_count": None} and charges(app) == 1
    assert len(events(app, "conflict")) == 1


def test_in_progress_links_its_documentation_with_retry_after(app: Flask, client: FlaskClient) -> None:
    controls: Controls = ext(app)["controls"]
    held = controls.hold("payments")
    owner = Background(app, "/payments", json={"amount": 1}, held=held)
    assert held.entered.wait(10)
    response = post(client, "/payments", json={"amount": 1})
    assert_documented(response, 409, "in-progress")
    assert response.headers["Retry-After"] == "1"
    assert [r["state"] for r in records(app)] == ["IN_PROGRESS"]
    finish(owner)
    assert controls.runs["payments"] == 1 and charges(app) == 1


def test_stuck_links_its_documentation(app: Flask, client: FlaskClient, clock: Any) -> None:
    owner = make_stuck(app, clock)
    assert_documented(post(client, "/payments", key="stuck-1", json={"amount": 1}), 409, "stuck")
    assert ext(app)["controls"].runs["payments"] == 1
    assert [r["state"] for r in records(app)] == ["IN_PROGRESS"]
    finish(owner)


def test_store_unavailable_links_its_documentation(app: Flask, client: FlaskClient) -> None:
    with app.app_context():
        db = ext(app)["db"]
        db.metadata.tables["idempotency_records"].drop(db.engine)
    response = post(client, "/payments", json={"amount": 1})
    assert_documented(response, 503, "store-unavailable")
    assert response.headers["Retry-After"] == "1"
    assert ext(app)["controls"].runs["payments"] == 0
    with app.app_context():
        db.metadata.tables["idempotency_records"].create(db.engine)


def test_a_replayed_problem_links_its_documentation_too(app: Flask, client: FlaskClient) -> None:
    assert post(client, "/resources", json={"amount": 1}).status_code == 201
    with app.app_context():
        ext(app)["db"].session.query(ext(app)["Charge"]).delete()
        ext(app)["db"].session.commit()
    response = post(client, "/resources", json={"amount": 1})
    assert_documented(response, 410, "resource-gone")
    assert response.headers["Idempotent-Replayed"] == "true"
    assert [r["state"] for r in records(app)] == ["COMPLETED"]


def test_docs_url_wins_over_the_problem_type_base(database_url: str, clock: Any) -> None:
    app = build_app(
        database_url,
        clock=clock,
        controls=Controls(),
        IDEMPOTENCY_DOCS_URL=DOCS,
        IDEMPOTENCY_PROBLEM_TYPE_BASE="urn:mine:",
    )
    assert_documented(post(app.test_client(), "/payments", key=None), 400, "missing-key")


@pytest.mark.parametrize("unset", [None, ""])
def test_without_docs_url_problems_carry_no_link(database_url: str, clock: Any, unset: str | None) -> None:
    app = build_app(database_url, clock=clock, controls=Controls(), IDEMPOTENCY_DOCS_URL=unset)
    response = post(app.test_client(), "/payments", key=None)
    assert response.status_code == 400
    assert response.get_json()["type"] == "urn:flask-idempotent:problem:missing-key"
    assert "Link" not in response.headers


@pytest.mark.parametrize(
    "bad",
    [
        "docs/errors#",  # relative: a problem type should be an absolute URI
        "ftp://example.com/errors/",
        "https:///errors/",  # no host
        "https://example.com/errors with space/",
        "https://example.com/é/",
        "https://example.com/<x>/",  # would end the Link header's target
        "https://[::1/errors/",
        42,
    ],
)
def test_a_docs_url_that_cannot_be_a_link_is_refused_at_init_app(bad: object, clock: Any) -> None:
    with pytest.raises(ValueError, match="IDEMPOTENCY_DOCS_URL must be an absolute http"):
        build_app("sqlite://", clock=clock, controls=Controls(), IDEMPOTENCY_DOCS_URL=bad)


def test_the_client_still_recognises_in_progress_under_a_docs_url() -> None:
    # IdempotentSession retries 409 by the end of the problem type: a docs URL keeps the code at the end.
    body = ('{"type": "' + DOCS + 'in-progress", "title": "t", "status": 409, "detail": "d"}').encode()
    assert _judge(409, {"Retry-After": "1"}, lambda: body).retry
