"""The request fingerprint: which retries are the same command and which are not."""

from __future__ import annotations

import io

import pytest
from flask import Flask
from flask.testing import FlaskClient
from helpers import charges, post, record

from flask_idempotent.fingerprint import canonical_json


def replayed(response) -> bool:  # type: ignore[no-untyped-def]
    return response.headers.get("Idempotent-Replayed") == "true"


@pytest.mark.parametrize(
    "retry_body",
    [
        b'{"currency":"EUR","amount":10}',
        b'{ "amount" : 10 ,\n "currency" : "EUR" }',
        b'{"amount":10.0,"currency":"EUR"}',
        b'{"amount":1e1,"currency":"EUR"}',
        b'{"amount":10,"currency":"\\u0045UR"}',
    ],
)
def test_json_spelling_does_not_change_the_command(app: Flask, client: FlaskClient, retry_body: bytes) -> None:
    post(client, "/payments", data=b'{"amount":10,"currency":"EUR"}', content_type="application/json")
    retry = post(client, "/payments", data=retry_body, content_type="application/json")
    assert retry.status_code == 201 and replayed(retry)
    assert charges(app) == 1


@pytest.mark.parametrize(
    "retry_body",
    [
        b'{"amount":100,"currency":"EUR"}',
        b'{"amount":"10","currency":"EUR"}',
        b'{"amount":10,"currency":"EUR","extra":null}',
        b'{"amount":10}',
        b'[{"amount":10,"currency":"EUR"}]',
    ],
)
def test_json_values_change_the_command(app: Flask, client: FlaskClient, retry_body: bytes) -> None:
    post(client, "/payments", data=b'{"amount":10,"currency":"EUR"}', content_type="application/json")
    retry = post(client, "/payments", data=retry_body, content_type="application/json")
    assert retry.status_code == 422
    assert charges(app) == 1


def test_query_order_does_not_matter_but_values_do(app: Flask, client: FlaskClient) -> None:
    post(client, "/payments?a=1&b=2", json={})
    assert replayed(post(client, "/payments?b=2&a=1", json={}))
    assert post(client, "/payments?a=1&b=3", json={}).status_code == 422
    assert post(client, "/payments?a=1", json={}).status_code == 422
    assert charges(app) == 1


def test_form_fields_are_compared_sorted(app: Flask, client: FlaskClient) -> None:
    post(client, "/upload", data="a=1&b=2", content_type="application/x-www-form-urlencoded")
    assert replayed(post(client, "/upload", data="b=2&a=1", content_type="application/x-www-form-urlencoded"))
    assert post(client, "/upload", data="a=1&b=9", content_type="application/x-www-form-urlencoded").status_code == 422


def test_multipart_retry_with_a_new_boundary_is_the_same_command(app: Flask, client: FlaskClient) -> None:
    def send(content: bytes, name: str = "receipt.txt"):  # type: ignore[no-untyped-def]
        # The test client draws a fresh random boundary for each request, as real clients do.
        return post(
            client,
            "/upload",
            data={"note": "x", "file": (io.BytesIO(content), name, "text/plain")},
            content_type="multipart/form-data",
        )

    first = send(b"hello")
    assert first.status_code == 201 and first.get_json()["files"] == {"file": "hello"}
    again = send(b"hello")
    assert replayed(again) and again.data == first.data
    assert send(b"hellO").status_code == 422
    assert send(b"hello", name="other.txt").status_code == 422
    assert charges(app, "upload") == 1


def test_other_bodies_are_compared_byte_for_byte_with_media_type(app: Flask, client: FlaskClient) -> None:
    post(client, "/payments", data=b"raw-bytes", content_type="application/octet-stream")
    assert replayed(post(client, "/payments", data=b"raw-bytes", content_type="application/octet-stream"))
    assert post(client, "/payments", data=b"raw-bytes", content_type="text/plain").status_code == 422
    assert post(client, "/payments", data=b"raw-byteS", content_type="application/octet-stream").status_code == 422


@pytest.mark.parametrize("app_config", [{"IDEMPOTENCY_FINGERPRINT_HEADERS": ["X-Account"]}])
def test_configured_headers_are_part_of_the_command(app: Flask, client: FlaskClient) -> None:
    post(client, "/payments", json={"amount": 1}, headers={"X-Account": "a"})
    assert replayed(post(client, "/payments", json={"amount": 1}, headers={"X-Account": "a"}))
    assert post(client, "/payments", json={"amount": 1}, headers={"X-Account": "b"}).status_code == 422
    assert record(app, "k-1")["state"] == "COMPLETED"


@pytest.mark.parametrize(
    "raw",
    [
        b'{"a":1,"a":2}',  # duplicate keys: compared as bytes, never equal to {"a":2}
        b'{"n":12345678901234567890}',  # beyond I-JSON's integer range
        b"{not json",
        b'{"s":"\xff"}',  # invalid UTF-8
        b"[" * 100000 + b"]" * 100000,  # nesting beyond the parser's recursion limit
    ],
)
def test_bodies_without_a_canonical_form_fall_back_to_bytes(raw: bytes) -> None:
    assert canonical_json(raw) is None


def test_duplicate_json_keys_never_share_a_fingerprint_with_the_deduplicated_body(
    app: Flask, client: FlaskClient
) -> None:
    post(client, "/payments", data=b'{"amount":2}', content_type="application/json")
    response = post(client, "/payments", data=b'{"amount":1,"amount":2}', content_type="application/json")
    assert response.status_code == 422
    assert charges(app) == 1


@pytest.mark.parametrize("app_config", [{"IDEMPOTENCY_MAX_BODY_BYTES": 64}])
def test_body_beyond_the_limit_is_rejected_with_413_and_nothing_stored(app: Flask, client: FlaskClient) -> None:
    response = post(client, "/payments", data=b"x" * 65, content_type="application/octet-stream")
    assert response.status_code == 413
    assert response.get_json()["type"].endswith("body-too-large")
    assert charges(app) == 0
    assert record(app, "k-1") is None
