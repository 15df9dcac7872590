"""The Idempotency-Key header: a bare token or an RFC 8941 sf-string, one key either way."""

from __future__ import annotations

import pytest
from flask import Flask
from flask.testing import FlaskClient
from helpers import charges, post, problem_code, records

from flask_idempotent.keys import MAX_KEY_LENGTH, KeyFormatError, parse_key


@pytest.mark.parametrize(
    ("raw", "key"),
    [
        ("abc", "abc"),
        ('"abc"', "abc"),
        ("  abc\t", "abc"),
        ('"a\\"b"', 'a"b'),
        ('"a\\\\b"', "a\\b"),
        ("x" * MAX_KEY_LENGTH, "x" * MAX_KEY_LENGTH),
        ("!~", "!~"),
        ("9f1c-uuid-like_key.1", "9f1c-uuid-like_key.1"),
        ('"a;b=c"', "a;b=c"),
    ],
)
def test_valid_keys_parse(raw: str, key: str) -> None:
    assert parse_key([raw]) == key


@pytest.mark.parametrize(
    "lines",
    [
        [""],
        ["   "],
        ['""'],
        ["x" * (MAX_KEY_LENGTH + 1)],
        ['"' + "x" * (MAX_KEY_LENGTH + 1) + '"'],
        ["a b"],
        ["caf\u00e9"],
        ["tab\tinside"],
        ['"unterminated'],
        ['"'],
        ['"a"b"'],
        ['"bad\\escape"'],
        ['"trailing\\"'],
        ['"a b"'],
        ["a,b"],  # two header lines, joined by the server (gunicorn, werkzeug) before the app sees them
        ["a, b"],
        [","],
        ["key,"],
        [",key"],
        ['"a,b"'],  # an sf-string's content obeys the bare key's rule: no comma
        ['"a",b'],
        ['"a","b"'],
        ['"a", "b"'],
        ["one", "two"],
        [],
    ],
)
def test_invalid_keys_are_rejected(lines: list[str]) -> None:
    with pytest.raises(KeyFormatError):
        parse_key(lines)


def test_bare_and_quoted_spellings_name_one_key(app: Flask, client: FlaskClient) -> None:
    first = post(client, "/payments", key="abc", json={"amount": 1})
    second = post(client, "/payments", key='"abc"', json={"amount": 1})
    assert first.status_code == 201
    assert second.headers["Idempotent-Replayed"] == "true"
    assert charges(app) == 1
    assert [r["key"] for r in records(app)] == ["abc"]


@pytest.mark.parametrize("value", ["", "a b", "x" * 256, '"broken', '"a b"', "caf\u00e9"])
def test_malformed_key_is_rejected_with_400_before_the_view(app: Flask, client: FlaskClient, value: str) -> None:
    response = client.post("/payments", headers={"Idempotency-Key": value}, json={"amount": 1})
    assert response.status_code == 400
    assert problem_code(response) == "invalid-key"
    assert charges(app) == 0
    assert records(app) == []


def test_two_key_header_lines_are_rejected(app: Flask, client: FlaskClient) -> None:
    response = client.post("/payments", headers=[("Idempotency-Key", "a"), ("Idempotency-Key", "b")], json={})
    assert response.status_code == 400
    assert problem_code(response) == "invalid-key"
    assert records(app) == []


@pytest.mark.parametrize("value", ["a,b", '"a,b"', '"a","b"'])
def test_a_comma_is_two_joined_header_lines_and_rejected(app: Flask, client: FlaskClient, value: str) -> None:
    """Servers join repeated header lines with a comma before the app sees them: ``a,b`` is two keys."""
    response = client.post("/payments", headers={"Idempotency-Key": value}, json={"amount": 1})
    assert response.status_code == 400
    assert problem_code(response) == "invalid-key"
    assert "comma" in response.get_json()["detail"]
    assert charges(app) == 0
    assert records(app) == []
    retry = post(client, "/payments", key="a", json={"amount": 1})  # one line: the key is free and runs once
    assert retry.status_code == 201
    assert charges(app) == 1


@pytest.mark.parametrize("app_config", [{"IDEMPOTENCY_HEADER": "X-Request-Key"}])
def test_header_name_is_configurable(app: Flask, client: FlaskClient) -> None:
    assert post(client, "/payments", key="k", json={}).status_code == 400  # the default name is not read
    response = client.post("/payments", headers={"X-Request-Key": "k"}, json={"amount": 2})
    assert response.status_code == 201
    assert [r["key"] for r in records(app)] == ["k"]


def test_a_key_from_a_callable_keeps_its_whitespace_and_is_refused_for_it() -> None:
    # A header's optional whitespace is not part of its value (RFC 9110); a key= callable's value is all key.
    assert parse_key([" k\t"]) == "k"
    for value in (" k", "k ", "k\t"):
        with pytest.raises(KeyFormatError, match="visible ASCII"):
            parse_key([value], header=False)
    assert parse_key(['"k"'], header=False) == "k"
