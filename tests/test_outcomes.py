"""docs/behaviour.md's outcome table: what the view produced decides the record's state, and what a retry gets."""

from __future__ import annotations

import pytest
from flask import Flask
from flask.testing import FlaskClient
from helpers import charges, ext, post, record


@pytest.mark.parametrize("status", [200, 201, 204, 302, 400, 404, 422])
def test_success_redirect_and_client_errors_complete_and_replay(app: Flask, client: FlaskClient, status: int) -> None:
    ext(app)["controls"].status = status
    first = post(client, "/payments", json={"amount": 1})
    assert first.status_code == status
    row = record(app, "k-1")
    assert row["state"] == "COMPLETED" and row["response_status"] == status
    again = post(client, "/payments", json={"amount": 1})
    assert again.status_code == status and again.headers["Idempotent-Replayed"] == "true"
    assert again.data == first.data
    assert ext(app)["controls"].runs["payments"] == 1


@pytest.mark.parametrize("status", [408, 409, 425, 429, 502, 503, 504])
def test_retryable_statuses_leave_failed_retryable_and_run_again(app: Flask, client: FlaskClient, status: int) -> None:
    controls = ext(app)["controls"]
    controls.status = status
    assert post(client, "/payments", json={"amount": 1}).status_code == status
    row = record(app, "k-1")
    assert (row["state"], row["retryable"], row["attempts"]) == ("FAILED", True, 1)
    controls.status = None
    retry = post(client, "/payments", json={"amount": 1})
    assert retry.status_code == 201 and "Idempotent-Replayed" not in retry.headers
    assert retry.get_json()["attempt"] == 2
    row = record(app, "k-1")
    assert (row["state"], row["attempts"]) == ("COMPLETED", 2)
    assert controls.runs["payments"] == 2


def test_transient_error_is_503_and_retryable(app: Flask, client: FlaskClient) -> None:
    response = post(client, "/transient", json={})
    assert response.status_code == 503
    assert response.get_json()["type"].endswith("transient-error")
    assert response.headers["Retry-After"] == "1"
    row = record(app, "k-1")
    assert (row["state"], row["retryable"]) == ("FAILED", True)
    assert "TransientError" in row["error"]
    post(client, "/transient", json={})
    assert record(app, "k-1")["attempts"] == 2
    assert ext(app)["controls"].runs["transient"] == 2


@pytest.mark.parametrize("app_config", [{"PROPAGATE_EXCEPTIONS": False}])
def test_exception_of_a_listed_transient_type_is_retryable(app: Flask, client: FlaskClient) -> None:
    controls = ext(app)["controls"]
    controls.exception = ConnectionError("provider unreachable")
    assert post(client, "/flaky", json={}).status_code == 500
    row = record(app, "k-1")
    assert (row["state"], row["retryable"]) == ("FAILED", True)
    controls.exception = None
    assert post(client, "/flaky", json={}).status_code == 201
    assert charges(app, "flaky") == 1


def test_5xx_in_leased_mode_is_a_final_failure_replayed_as_it_was(app: Flask, client: FlaskClient) -> None:
    controls = ext(app)["controls"]
    controls.status = 500
    first = post(client, "/payments", json={"amount": 1})
    assert first.status_code == 500
    row = record(app, "k-1")
    assert (row["state"], row["retryable"]) == ("FAILED", False)
    controls.status = None
    again = post(client, "/payments", json={"amount": 1})
    assert again.status_code == 500 and again.headers["Idempotent-Replayed"] == "true"
    assert again.data == first.data
    assert controls.runs["payments"] == 1
    # The charge committed before the 500: exactly the ambiguity an operator must resolve.
    assert charges(app, "payments") == 1


@pytest.mark.parametrize("app_config", [{"PROPAGATE_EXCEPTIONS": False}])
def test_unhandled_exception_in_leased_mode_is_final(app: Flask, client: FlaskClient) -> None:
    controls = ext(app)["controls"]
    controls.exception = RuntimeError("card network said something odd")
    assert post(client, "/payments", json={}).status_code == 500
    row = record(app, "k-1")
    assert (row["state"], row["retryable"], row["response_status"]) == ("FAILED", False, 500)
    assert "RuntimeError" in row["error"]
    controls.exception = None
    again = post(client, "/payments", json={})
    assert again.status_code == 500 and again.headers["Idempotent-Replayed"] == "true"
    assert controls.runs["payments"] == 1


def test_exception_propagating_past_the_app_is_settled_in_teardown(app: Flask, client: FlaskClient) -> None:
    # TESTING propagates exceptions: after_request never sees a response; teardown settles the record.
    controls = ext(app)["controls"]
    controls.exception = RuntimeError("boom")
    with pytest.raises(RuntimeError):
        post(client, "/payments", json={})
    row = record(app, "k-1")
    assert (row["state"], row["retryable"], row["response_status"]) == ("FAILED", False, 500)
    assert row["locked_until"] is None


@pytest.mark.parametrize("app_config", [{"IDEMPOTENCY_MAX_RESPONSE_BYTES": 16}])
def test_response_beyond_the_storage_limit_is_never_replayed_truncated(app: Flask, client: FlaskClient) -> None:
    first = post(client, "/payments", json={"amount": 1})
    assert first.status_code == 201 and len(first.data) > 16
    row = record(app, "k-1")
    assert (row["state"], row["response_body"]) == ("COMPLETED", None)
    assert "IDEMPOTENCY_MAX_RESPONSE_BYTES" in row["error"]
    again = post(client, "/payments", json={"amount": 1})
    assert again.status_code == 500
    assert again.get_json()["type"].endswith("response-not-stored")
    assert again.headers["Location"] == first.headers["Location"]
    assert again.headers["Idempotent-Replayed"] == "true"
    assert ext(app)["controls"].runs["payments"] == 1
