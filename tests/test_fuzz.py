"""Fuzzing the parsers and canonicalizers: the layer answers with its documented 4xx or lets the view run;
it never crashes, never answers a 500 of its own, and never lets two different commands share a fingerprint."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import pytest
import rfc8785
from flask import Flask
from helpers import code_of
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flask_idempotent.fingerprint import canonical_json, hash_command, request_fingerprint
from flask_idempotent.keys import MAX_KEY_LENGTH, KeyFormatError, parse_key

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
visible = st.characters(min_codepoint=0x21, max_codepoint=0x7E, exclude_characters=",")


@FUZZ
@given(st.lists(st.text(), max_size=3))
def test_parse_key_returns_a_valid_key_or_a_key_format_error(lines: list[str]) -> None:
    try:
        key = parse_key(lines)
    except KeyFormatError:
        return
    assert 1 <= len(key) <= MAX_KEY_LENGTH
    assert all(0x21 <= ord(c) <= 0x7E for c in key)
    assert "," not in key  # two header lines joined by the server


@FUZZ
@given(st.text(visible, max_size=40), st.text(visible, max_size=40))
def test_a_comma_is_refused_in_either_spelling(before: str, after: str) -> None:
    key = f"{before},{after}"
    quoted = '"' + key.replace("\\", "\\\\").replace('"', '\\"') + '"'
    for raw in (key, quoted, f"{before}, {after}"):
        with pytest.raises(KeyFormatError, match="comma"):
            parse_key([raw])


@FUZZ
@given(st.text(visible, min_size=1, max_size=MAX_KEY_LENGTH))
def test_bare_and_sf_string_spellings_of_any_key_agree(key: str) -> None:
    quoted = '"' + key.replace("\\", "\\\\").replace('"', '\\"') + '"'
    assert parse_key([quoted]) == key
    if not key.startswith('"'):
        assert parse_key([key]) == key


@pytest.mark.parametrize("length", [MAX_KEY_LENGTH - 1, MAX_KEY_LENGTH, MAX_KEY_LENGTH + 1])
def test_key_length_limit(length: int) -> None:
    for raw in ("k" * length, '"' + "k" * length + '"'):
        if length <= MAX_KEY_LENGTH:
            assert parse_key([raw]) == "k" * length
        else:
            with pytest.raises(KeyFormatError):
                parse_key([raw])


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(
        -(2**53) + 1, 2**53 - 1
    )  # I-JSON range; beyond it bytes are compared | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=4), children, max_size=4),
    max_leaves=12,
)


def same_json(a: Any, b: Any) -> bool:
    """JSON equality: numbers by value (1 == 1.0), but true is not 1 and keys are unordered."""
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return float(a) == float(b)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same_json(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same_json(x, y) for x, y in zip(a, b, strict=True))
    return type(a) is type(b) and a == b


# The C encoder's fast path against the reference implementation: the same bytes, always --------------------

json_numbers = (
    st.integers(-(2**53) + 1, 2**53 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.sampled_from(
        [0.1, 1e-4, 9.99e-5, 1e-6, 1e-7, 1e15, 1e16, 1e20, 1e21, 1e22, 2.0**53, 2.0**53 + 2, 123e-20, -0.0]
    )
)
json_text = st.text(max_size=6) | st.sampled_from(["\U0001f600", "\ue000", "\uffff", "\x7f", "\u2028", "a\x00b"])
any_json = st.recursive(
    st.none() | st.booleans() | json_numbers | json_text,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(json_text, children, max_size=5),
    max_leaves=16,
)


@FUZZ
@given(any_json, st.sampled_from([None, 1]), st.booleans())
def test_canonical_json_is_the_reference_rfc8785_form(document: Any, indent: Any, ascii_only: bool) -> None:
    raw = json.dumps(document, indent=indent, ensure_ascii=ascii_only).encode()
    try:
        expected: bytes | None = rfc8785.dumps(json.loads(raw))
    except rfc8785.CanonicalizationError:
        expected = None
    assert canonical_json(raw) == expected


@FUZZ
@given(
    st.recursive(json_text | st.integers(-(2**53) + 1, 2**53 - 1) | st.none() | st.booleans(), st.lists, max_leaves=12)
)
def test_hash_command_is_the_sha256_of_the_reference_rfc8785_form(command: Any) -> None:
    assert hash_command(command) == "v1:" + hashlib.sha256(rfc8785.dumps(command)).hexdigest()


@FUZZ
@given(any_json)
def test_hash_command_of_any_value_rfc8785_spells_is_its_rfc8785_hash(value: Any) -> None:
    """Objects, fractions and exponents included: the fast path writes what the reference implementation writes
    (records stored before it was fast still match their retries)."""
    try:
        expected = "v1:" + hashlib.sha256(rfc8785.dumps(value)).hexdigest()
    except rfc8785.CanonicalizationError:
        return  # a lone surrogate: RFC 8785 has no spelling (hash_command has one, tested elsewhere)
    assert hash_command(value) == expected


@FUZZ
@given(st.floats(allow_nan=False, allow_infinity=False) | st.sampled_from([5e-324, 1.7976931348623157e308, 1e21, 1e-7]))
def test_numbers_are_spelled_as_rfc8785_spells_them(value: float) -> None:
    assert canonical_json(json.dumps([value, -value]).encode()) == rfc8785.dumps([value, -value])


@FUZZ
@given(st.from_regex(r"-?(0|[1-9][0-9]{0,9})\.[0-9]{1,9}([eE][-+]?[0-9]{1,3})?", fullmatch=True))
def test_any_spelling_of_a_number_is_canonicalized_as_rfc8785_does(token: str) -> None:
    try:
        expected: bytes | None = rfc8785.dumps(json.loads(f"[{token}]"))
    except rfc8785.CanonicalizationError:
        expected = None  # beyond a double (1e400)
    assert canonical_json(f"[{token}]".encode()) == expected


def fingerprint_of(app: Flask, body: bytes, content_type: str = "application/json") -> str:
    with app.test_request_context("/f", method="POST", data=body, content_type=content_type):
        from flask import request

        return hash_command(request_fingerprint(request))


@pytest.fixture(scope="module")
def plain_app() -> Flask:
    return Flask(__name__)


@FUZZ
@given(json_values, json_values, st.sampled_from([None, 2]))
def test_json_commands_share_a_fingerprint_only_when_equal(plain_app: Flask, a: Any, b: Any, indent: Any) -> None:
    fa = fingerprint_of(plain_app, json.dumps(a).encode())
    fb = fingerprint_of(plain_app, json.dumps(b, indent=indent, sort_keys=True).encode())
    assert (fa == fb) == same_json(a, b)


@FUZZ
@given(
    st.binary(max_size=300),
    st.binary(max_size=300),
    st.sampled_from(
        [
            "application/json",
            "text/plain",
            "application/x-www-form-urlencoded",
            "application/octet-stream",
            "application/vnd.x+json",
            "",
        ]
    ),
)
def test_any_bytes_fingerprint_without_crashing_and_differ_from_other_bytes(
    plain_app: Flask, a: bytes, b: bytes, content_type: str
) -> None:
    fa, fb = fingerprint_of(plain_app, a, content_type), fingerprint_of(plain_app, b, content_type)
    assert fa.startswith("v1:")
    if fa == fb and a != b:
        # Only allowed when both are documents with the same canonical form.
        if content_type == "application/x-www-form-urlencoded":
            from urllib.parse import unquote_to_bytes

            def fields(raw: bytes) -> list[list[bytes]]:
                pairs = [p.partition(b"=") for p in raw.split(b"&") if p]
                return sorted(
                    [unquote_to_bytes(n.replace(b"+", b" ")), unquote_to_bytes(v.replace(b"+", b" "))]
                    for n, _, v in pairs
                )

            assert fields(a) == fields(b)
        else:
            ca, cb = canonical_json(a), canonical_json(b)
            assert ca is not None and ca == cb


def test_hostile_json_bodies_never_crash(plain_app: Flask) -> None:
    hostile = [
        b"[" * 50000 + b"]" * 50000,
        b'{"n": 1' + b"0" * 5000 + b"}",
        b'{"a": NaN}',
        b'{"a": Infinity}',
        b'{"a":1,"a":1}',
        b"\xef\xbb\xbf{}",
        b'"\\ud800"',
        b"",
        b"null",
        b"1e400",
    ]
    hashes = [fingerprint_of(plain_app, body) for body in hostile]
    assert len(set(hashes)) == len(hashes)  # all different commands, all different fingerprints


# Through the whole app: never a 500 of the layer's own ------------------------------------------------------

header_text = st.text(st.characters(min_codepoint=0x20, max_codepoint=0xFF, exclude_characters="\r\n"), max_size=300)


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    key=header_text,
    body=st.binary(max_size=200),
    content_type=st.sampled_from(
        [
            "application/json",
            "application/x-www-form-urlencoded",
            "multipart/form-data; boundary=x",
            "multipart/form-data",
            "text/plain; charset=utf-8",
            "application/json; charset=latin-1",
            "x/y",
            "",
        ]
    ),
)
def test_any_key_and_body_get_a_documented_answer(fuzz_app: Flask, key: str, body: bytes, content_type: str) -> None:
    client = fuzz_app.test_client()
    headers = {"Idempotency-Key": key}
    if content_type:
        headers["Content-Type"] = content_type
    response = client.post("/fuzz", data=body, headers=headers)
    assert response.status_code in (200, 400, 413, 422), response.data
    if response.status_code != 200:
        assert response.mimetype == "application/problem+json"
        assert (
            code_of(response.get_json()["type"]) in {"invalid-key", "body-too-large", "key-reused"}
            or response.status_code == 400
        )  # a 400 of the view's own form parsing


@pytest.fixture(scope="module")
def fuzz_app(tmp_path_factory: pytest.TempPathFactory) -> Flask:
    from flask_sqlalchemy import SQLAlchemy

    from flask_idempotent import Idempotency, idempotent

    app = Flask(__name__)
    app.config.update(
        SQLALCHEMY_DATABASE_URI=f"sqlite:///{tmp_path_factory.mktemp('fuzz') / 'f.db'}", IDEMPOTENCY_MAX_BODY_BYTES=150
    )
    db = SQLAlchemy()
    db.init_app(app)
    idempotency = Idempotency(app, db)

    @app.post("/fuzz")
    @idempotent
    def fuzz() -> Any:
        return {"ok": True}

    with app.app_context():
        idempotency.create_all()
    return app


@pytest.mark.parametrize("padding", ["", "x" * 100_000])
def test_numbers_are_spelled_alike_where_exponents_abound_and_where_they_are_rare(padding: str) -> None:
    numbers = [1e-7, 1.5e-5, 0.5, 12.25, 1e16, 1e21, 10.0, -0.0, 2.0**60, 123456789.125, 5e-324] * 50
    document = [padding, numbers]
    assert canonical_json(json.dumps(document).encode()) == rfc8785.dumps(document)
