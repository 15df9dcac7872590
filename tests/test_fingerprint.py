"""The request fingerprint: which retries are the same command and which are not."""

from __future__ import annotations

import gzip
import io
import zlib
from decimal import Decimal
from typing import Any

import pytest
from flask import Flask, request
from flask.testing import FlaskClient
from helpers import charges, ext, post, problem_code, record
from werkzeug.datastructures import MultiDict
from werkzeug.routing import BaseConverter

from flask_idempotent import KeyReused, idempotent
from flask_idempotent.fingerprint import BodyTooLarge, canonical_json, hash_command, limit_body, request_fingerprint


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
        b"{not json",
        b'{"s":"\xff"}',  # invalid UTF-8
        b"[" * 100000 + b"]" * 100000,  # nesting beyond the parser's recursion limit
    ],
)
def test_bodies_without_a_canonical_form_fall_back_to_bytes(raw: bytes) -> None:
    assert canonical_json(raw) is None


def test_integers_beyond_a_double_are_compared_by_their_digits() -> None:
    """RFC 8785 refuses integers beyond 2**53; they are spelled by their digits, so each equals itself only."""
    big = canonical_json(b'{ "n" : 12345678901234567890 }')
    assert big == b'{"n":12345678901234567890}'
    assert canonical_json(b'{"n":12345678901234567891}') != big
    assert canonical_json(b'{"n":9007199254740993}') != canonical_json(b'{"n":9007199254740992}')
    assert canonical_json(b'{"n":1e16}') == canonical_json(b'{"n":10000000000000000}')  # the same number


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


# Repeated values, media type parameters, +json, Content-Encoding ---------------------------------------------


def test_repeated_query_values_keep_their_order(app: Flask, client: FlaskClient) -> None:
    post(client, "/payments?a=1&a=2&b=3", json={})
    assert replayed(post(client, "/payments?b=3&a=1&a=2", json={}))  # names in any order
    assert post(client, "/payments?a=2&a=1&b=3", json={}).status_code == 422  # a=1&a=2 is not a=2&a=1
    assert charges(app) == 1


def test_repeated_form_values_keep_their_order(app: Flask, client: FlaskClient) -> None:
    form = "application/x-www-form-urlencoded"
    post(client, "/upload", data="to=alice&to=bob&amount=1", content_type=form)
    assert replayed(post(client, "/upload", data="amount=1&to=alice&to=bob", content_type=form))
    assert post(client, "/upload", data="to=bob&to=alice&amount=1", content_type=form).status_code == 422
    assert charges(app, "upload") == 1


def test_repeated_multipart_fields_and_files_keep_their_order(app: Flask, client: FlaskClient) -> None:
    def send(first: str, second: str, files: tuple[bytes, bytes]):  # type: ignore[no-untyped-def]
        data = MultiDict(
            [
                ("to", first),
                ("to", second),
                ("doc", (io.BytesIO(files[0]), "a.txt", "text/plain")),
                ("doc", (io.BytesIO(files[1]), "b.txt", "text/plain")),
            ]
        )
        return post(client, "/upload", data=data, content_type="multipart/form-data")

    assert send("alice", "bob", (b"1", b"2")).status_code == 201
    assert replayed(send("alice", "bob", (b"1", b"2")))  # a new boundary, the same parts
    assert send("bob", "alice", (b"1", b"2")).status_code == 422
    assert send("alice", "bob", (b"2", b"1")).status_code == 422
    assert charges(app, "upload") == 1


def test_the_charset_is_part_of_the_command(app: Flask, client: FlaskClient) -> None:
    post(client, "/payments", data="caf\u00e9".encode("latin-1"), content_type="text/plain; charset=iso-8859-1")
    same = post(client, "/payments", data="caf\u00e9".encode("latin-1"), content_type="text/plain; Charset=ISO-8859-1")
    assert replayed(same)  # parameter names and the charset's value are case-insensitive
    assert post(client, "/payments", data="caf\u00e9".encode("latin-1"), content_type="text/plain").status_code == 422
    assert (
        post(client, "/payments", data="caf\u00e9".encode("latin-1"), content_type="text/plain; charset=utf-8")
    ).status_code == 422
    assert charges(app) == 1


def test_a_form_charset_is_part_of_the_command(app: Flask, client: FlaskClient) -> None:
    form = "application/x-www-form-urlencoded"
    post(client, "/upload", data="name=caf%E9", content_type=f"{form}; charset=latin-1")
    assert replayed(post(client, "/upload", data="name=caf%E9", content_type=f"{form}; charset=latin-1"))
    assert post(client, "/upload", data="name=caf%E9", content_type=form).status_code == 422
    assert charges(app, "upload") == 1


@pytest.mark.parametrize("media_type", ["application/merge-patch+json", "application/vnd.api+json"])
def test_plus_json_bodies_are_canonical_json_and_their_media_type_counts(
    app: Flask, client: FlaskClient, media_type: str
) -> None:
    post(client, "/payments", data=b'{"amount":10,"currency":"EUR"}', content_type=media_type)
    assert replayed(post(client, "/payments", data=b'{ "currency": "EUR", "amount": 1e1 }', content_type=media_type))
    assert post(client, "/payments", data=b'{"amount":11,"currency":"EUR"}', content_type=media_type).status_code == 422
    assert (
        post(client, "/payments", data=b'{"amount":10,"currency":"EUR"}', content_type="application/json")
    ).status_code == 422
    assert charges(app) == 1


def test_a_json_charset_parameter_is_part_of_the_command(app: Flask, client: FlaskClient) -> None:
    post(client, "/payments", data=b'{"amount":10}', content_type="application/json; charset=utf-8")
    assert replayed(
        post(client, "/payments", data=b'{ "amount": 10.0 }', content_type="application/json; charset=UTF-8")
    )
    assert post(client, "/payments", data=b'{"amount":10}', content_type="application/json").status_code == 422
    assert charges(app) == 1


def gzipped(data: bytes, mtime: int, level: int = 9) -> bytes:
    return gzip.compress(data, compresslevel=level, mtime=mtime)


def test_a_gzip_body_recompressed_by_a_retry_is_the_same_command(app: Flask, client: FlaskClient) -> None:
    body = b'{"amount":10,"currency":"EUR"}'
    encoded = {"Content-Encoding": "gzip"}
    first = post(client, "/payments", data=gzipped(body, mtime=1), content_type="application/json", headers=encoded)
    assert first.status_code == 201
    # A retry compresses again: another mtime in the gzip header, another level, the JSON spelled otherwise.
    retry = post(
        client, "/payments", data=gzipped(body, mtime=2, level=1), content_type="application/json", headers=encoded
    )
    assert replayed(retry) and retry.data == first.data
    respelled = gzipped(b'{"currency": "EUR", "amount": 10.0}', mtime=3)
    assert replayed(post(client, "/payments", data=respelled, content_type="application/json", headers=encoded))
    assert replayed(post(client, "/payments", data=body, content_type="application/json"))  # compared decoded
    other = gzipped(b'{"amount":11,"currency":"EUR"}', mtime=1)
    assert post(client, "/payments", data=other, content_type="application/json", headers=encoded).status_code == 422
    assert charges(app) == 1


@pytest.mark.parametrize("coding", ["gzip", "x-gzip", "deflate", "raw-deflate", "gzip, gzip"])
def test_encoded_bytes_and_forms_are_compared_decoded(app: Flask, client: FlaskClient, coding: str) -> None:
    def encode(data: bytes, salt: int) -> tuple[bytes, str]:
        if coding == "deflate":
            return zlib.compress(data, salt), coding
        if coding == "raw-deflate":
            compressor = zlib.compressobj(salt, zlib.DEFLATED, -zlib.MAX_WBITS)
            return compressor.compress(data) + compressor.flush(), "deflate"
        if coding == "gzip, gzip":
            return gzipped(gzipped(data, salt), salt + 1), coding
        return gzipped(data, salt), coding

    def send(data: bytes, salt: int, content_type: str, path: str = "/payments"):  # type: ignore[no-untyped-def]
        encoded, header = encode(data, salt)
        return post(
            client, path, key=f"k-{path}", data=encoded, content_type=content_type, headers={"Content-Encoding": header}
        )

    raw = bytes(range(256)) * 8
    assert send(raw, 1, "application/octet-stream").status_code == 201
    assert replayed(send(raw, 9, "application/octet-stream"))
    assert send(raw[::-1], 1, "application/octet-stream").status_code == 422
    form = "application/x-www-form-urlencoded"
    assert send(b"b=2&a=1", 1, form, "/upload").status_code == 201
    assert replayed(send(b"a=1&b=2", 9, form, "/upload"))
    assert send(b"a=1&b=3", 1, form, "/upload").status_code == 422
    assert charges(app, "payments") == 1 and charges(app, "upload") == 1


def test_a_gzip_multipart_body_is_compared_by_its_decoded_parts(app: Flask, client: FlaskClient) -> None:
    def send(content: bytes, boundary: str, mtime: int):  # type: ignore[no-untyped-def]
        body = (
            (
                f'--{boundary}\r\nContent-Disposition: form-data; name="doc"; filename="a.txt"\r\n'
                "Content-Type: text/plain\r\n\r\n"
            ).encode()
            + content
            + f"\r\n--{boundary}--\r\n".encode()
        )
        return post(
            client,
            "/payments",
            data=gzipped(body, mtime),
            content_type=f"multipart/form-data; boundary={boundary}",
            headers={"Content-Encoding": "gzip"},
        )

    assert send(b"hello", "one", 1).status_code == 201
    assert replayed(send(b"hello", "two", 2))  # another boundary, recompressed
    assert send(b"hellO", "three", 3).status_code == 422
    assert charges(app) == 1


@pytest.mark.parametrize("app_config", [{"IDEMPOTENCY_MAX_BODY_BYTES": 64 * 1024}])
def test_a_body_that_decodes_beyond_the_limit_is_too_large(app: Flask, client: FlaskClient) -> None:
    bomb = gzipped(b"\0" * (32 * 1024 * 1024), mtime=0)  # 32 KB that inflate to 32 MiB
    assert len(bomb) < 64 * 1024
    response = post(
        client, "/payments", data=bomb, content_type="application/octet-stream", headers={"Content-Encoding": "gzip"}
    )
    assert response.status_code == 413
    assert problem_code(response) == "body-too-large"
    assert charges(app) == 0
    assert record(app, "k-1") is None


@pytest.mark.parametrize(("coding", "body"), [("br", b"\x8b\x03\x80hello\x03"), ("gzip", b"\x1f\x8bnot gzip at all")])
def test_a_body_that_cannot_be_decoded_is_compared_as_sent(
    app: Flask, client: FlaskClient, coding: str, body: bytes
) -> None:
    headers = {"Content-Encoding": coding}
    assert post(client, "/payments", data=body, content_type="application/json", headers=headers).status_code == 201
    assert replayed(post(client, "/payments", data=body, content_type="application/json", headers=headers))
    assert (
        post(client, "/payments", data=body + b"!", content_type="application/json", headers=headers).status_code == 422
    )
    assert post(client, "/payments", data=body, content_type="application/json").status_code == 422
    assert charges(app) == 1


def test_a_form_parsed_by_a_hook_before_the_extension_still_counts(app: Flask, client: FlaskClient) -> None:
    """A hook registered before the extension's (CSRF protection, say) may parse the form first: the stream is
    spent by then, and the fingerprint is taken from the parsed form, never from an empty body."""

    def read_form() -> None:
        request.form.get("csrf_token")

    app.before_request_funcs.setdefault(None, []).insert(0, read_form)
    form = "application/x-www-form-urlencoded"
    assert post(client, "/upload", data="to=alice&amount=1", content_type=form).status_code == 201
    assert replayed(post(client, "/upload", data="amount=1&to=alice", content_type=form))
    assert post(client, "/upload", data="to=mallory&amount=1", content_type=form).status_code == 422
    assert charges(app, "upload") == 1


# The v1 hash of a request without any of those features is what it was ------------------------------------------

V1_HASHES = {
    # Computed with the fingerprint as it was before repeated values kept their order, media type parameters
    # counted and bodies were decoded: records stored then still match their retries.
    "json": "v1:51a29a3d0cec1155d37ce624b48ac2680c2cc441768f42460b3c143c8e52f6c8",
    "form": "v1:bdbc0a4a3083cd49fe8fefa25701fa08dd0bb38c828cbc6f75417acb7eff95ac",
    "bytes": "v1:4fb4a7d43a40c74612b3ff6773a2a27b55a3d7ba73476fecb8150b8e3fcaec64",
    "empty": "v1:8107319c85fab74222988e4d989c50b6df1ba74a7801ab55e69062a36a9ec179",
    "multipart": "v1:ecdd2f4759e80f155ac635b41cdcdb5611f194093d477b3738e2d5c189ffd726",
}


@pytest.mark.parametrize("kind", sorted(V1_HASHES))
def test_the_v1_hash_of_a_plain_request_is_unchanged(kind: str) -> None:
    bodies: dict[str, dict[str, Any]] = {
        "json": {
            "data": b'{"currency":"EUR","amount":10.50,"items":[1,2.0,"x\\u00e9"]}',
            "content_type": "application/json",
        },
        "form": {"data": b"b=2&a=1&c=%FF", "content_type": "application/x-www-form-urlencoded"},
        "bytes": {"data": b"raw-bytes", "content_type": "application/octet-stream"},
        "empty": {},
        "multipart": {
            "data": {"note": "x", "file": (io.BytesIO(b"hello"), "r.txt", "text/plain")},
            "content_type": "multipart/form-data",
        },
    }
    plain = Flask(__name__)
    plain.add_url_rule("/payments/<int:n>", "p", lambda n: "", methods=["POST"])
    with plain.test_request_context("/payments/7?z=1&y=2", method="POST", headers={"X-Account": "a"}, **bodies[kind]):
        assert hash_command(request_fingerprint(request, headers=["X-Account"])) == V1_HASHES[kind]


# The body limit, read in bounded chunks ----------------------------------------------------------------------


class Source(io.RawIOBase):
    """A chunked body as a server hands it over (no Content-Length): ``total`` bytes, counting what was read."""

    def __init__(self, total: int, prefix: bytes = b"") -> None:
        super().__init__()
        self.remaining = total
        self.prefix = prefix
        self.read_bytes = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        size = min(len(buffer), self.remaining)
        data = (self.prefix + b" " * size)[:size]
        self.prefix = self.prefix[size:]
        memoryview(buffer)[:size] = data
        self.remaining -= size
        self.read_bytes += size
        return size


def chunked(client: FlaskClient, path: str, source: Source, content_type: str, key: str = "k-1"):  # type: ignore[no-untyped-def]
    return client.post(
        path,
        headers={"Idempotency-Key": key, "Content-Type": content_type, "Transfer-Encoding": "chunked"},
        environ_overrides={"wsgi.input": source, "wsgi.input_terminated": True},
    )


@pytest.mark.parametrize("app_config", [{"IDEMPOTENCY_MAX_BODY_BYTES": 1000}])
@pytest.mark.parametrize(
    "content_type", ["application/json", "application/octet-stream", "multipart/form-data; boundary=x"]
)
def test_a_chunked_body_is_read_no_further_than_the_byte_past_the_limit(
    app: Flask, client: FlaskClient, content_type: str
) -> None:
    source = Source(50 * 1024 * 1024)
    response = chunked(client, "/payments", source, content_type)
    assert response.status_code == 413
    assert problem_code(response) == "body-too-large"
    assert source.read_bytes == 1001  # the limit, then one byte more: never the rest
    assert charges(app) == 0
    assert record(app, "k-1") is None


@pytest.mark.parametrize("app_config", [{"IDEMPOTENCY_MAX_BODY_BYTES": 1000}])
def test_a_chunked_body_within_the_limit_reaches_the_view_whole(app: Flask, client: FlaskClient) -> None:
    body = b'{"amount": 42, "note": "' + b"n" * 900 + b'"}'
    source = Source(len(body), prefix=body)
    response = chunked(client, "/payments", source, "application/json")
    assert response.status_code == 201 and response.get_json()["amount"] == 42  # the view parsed the whole body
    again = chunked(client, "/payments", Source(len(body), prefix=body), "application/json")
    assert replayed(again)
    assert charges(app) == 1


@pytest.mark.parametrize("app_config", [{"IDEMPOTENCY_MAX_BODY_BYTES": 1000}])
def test_a_multipart_body_past_the_limit_after_its_last_part_is_too_large(app: Flask, client: FlaskClient) -> None:
    """werkzeug stops parsing at the closing boundary; what follows (an epilogue) still counts."""
    body = b'--x\r\nContent-Disposition: form-data; name="a"\r\n\r\n1\r\n--x--\r\n' + b"e" * 2000
    response = post(client, "/upload", data=body, content_type="multipart/form-data; boundary=x")
    assert response.status_code == 413
    source = Source(len(body), prefix=body)
    assert chunked(client, "/upload", source, "multipart/form-data; boundary=x").status_code == 413
    assert charges(app, "upload") == 0


def test_malformed_multipart_bodies_never_share_a_fingerprint(app: Flask, client: FlaskClient) -> None:
    """werkzeug's parser answers an empty form for a body it cannot parse; such bodies are compared as bytes."""
    post(client, "/upload", data=b"garbage one", content_type="multipart/form-data; boundary=x")
    assert replayed(post(client, "/upload", data=b"garbage one", content_type="multipart/form-data; boundary=x"))
    assert (
        post(client, "/upload", data=b"garbage two", content_type="multipart/form-data; boundary=x").status_code == 422
    )
    assert charges(app, "upload") == 1


def test_limit_body_reads_once_within_the_limit_and_leaves_the_body_readable() -> None:
    """For a route's ``fingerprint=`` callable: the body is read within the limit before the callable reads it."""
    plain = Flask(__name__)
    body = b'{"amount": 7}'
    source = Source(len(body), prefix=body)
    environ = {"wsgi.input": source, "wsgi.input_terminated": True}
    with plain.test_request_context("/", method="POST", content_type="application/json", environ_overrides=environ):
        limit_body(request, max_body_bytes=100)
        limit_body(request, max_body_bytes=100)  # again: nothing more is read
        assert request.get_json() == {"amount": 7}
        assert source.read_bytes == len(body)
    source = Source(10 * 1024 * 1024)
    environ = {"wsgi.input": source, "wsgi.input_terminated": True}
    with plain.test_request_context("/", method="POST", content_type="text/plain", environ_overrides=environ):
        with pytest.raises(BodyTooLarge):
            limit_body(request, max_body_bytes=100)
        assert source.read_bytes == 101


@pytest.mark.parametrize("app_config", [{"IDEMPOTENCY_MAX_BODY_BYTES": 1000}])
def test_a_route_with_its_own_fingerprint_holds_the_body_limit_too(app: Flask, client: FlaskClient) -> None:
    source = Source(50 * 1024 * 1024, prefix=b'{"amount": 1, "pad": "')
    response = chunked(client, "/custom", source, "application/json")
    assert response.status_code == 413
    assert problem_code(response) == "body-too-large"
    assert source.read_bytes == 1001
    assert charges(app) == 0


# An empty multipart form, view arguments, any JSON value ---------------------------------------------------


@pytest.mark.parametrize(
    "retry",
    [
        b"--two--\r\n",  # another boundary
        b"a preamble clients may send\r\n--two--\r\n",
        b"--two--\r\nan epilogue\r\n",
        b"--two--",  # no line break after the closing delimiter
    ],
)
def test_an_empty_multipart_form_is_the_same_form_on_every_retry(app: Flask, client: FlaskClient, retry: bytes) -> None:
    """A form without fields is a body that is only the closing delimiter: its boundary is not the command."""
    first = post(client, "/upload", data=b"--one--\r\n", content_type="multipart/form-data; boundary=one")
    assert first.status_code == 201
    again = post(client, "/upload", data=retry, content_type="multipart/form-data; boundary=two")
    assert again.status_code == 201 and replayed(again) and again.data == first.data
    assert charges(app, "upload") == 1
    stored = record(app, "k-1")
    assert stored is not None and stored["state"] == "COMPLETED" and stored["attempts"] == 1
    # Still a different command from a form with a field, and a malformed body is still not an empty form.
    field = b'--two\r\nContent-Disposition: form-data; name="a"\r\n\r\n1\r\n--two--\r\n'
    assert post(client, "/upload", data=field, content_type="multipart/form-data; boundary=two").status_code == 422
    assert post(client, "/upload", data=b"--two", content_type="multipart/form-data; boundary=two").status_code == 422
    assert charges(app, "upload") == 1


class Account:
    """What a converter may return: an object whose str() is a memory address."""

    def __init__(self, number: str) -> None:
        self.number = number


class AccountConverter(BaseConverter):
    regex = r"[A-Z]{2}[0-9]+"

    def to_python(self, value: str) -> Account:
        return Account(value)

    def to_url(self, value: Account) -> str:
        return value.number


def test_view_arguments_are_the_urls_text_not_the_converters_objects(app: Flask, client: FlaskClient) -> None:
    app.url_map.converters["account"] = AccountConverter

    @app.post("/accounts/<account:account>/debits/<int:cents>")
    @idempotent
    def debit(account: Account, cents: int) -> Any:
        row = ext(app)["Charge"](amount=cents, route=f"debit-{account.number}")
        ext(app)["db"].session.add(row)
        ext(app)["db"].session.commit()
        return {"account": account.number, "cents": cents}, 201

    first = post(client, "/accounts/DE42/debits/500")
    assert first.status_code == 201 and first.get_json() == {"account": "DE42", "cents": 500}
    again = post(client, "/accounts/DE42/debits/500")
    assert again.status_code == 201 and replayed(again)
    assert charges(app, "debit-DE42") == 1
    assert post(client, "/accounts/DE43/debits/500").status_code == 422  # another account: another command
    assert post(client, "/accounts/DE42/debits/501").status_code == 422
    assert charges(app) == 1
    stored = record(app, "k-1")
    assert stored is not None and stored["state"] == "COMPLETED" and stored["path"] == "/accounts/DE42/debits/500"


def test_the_matched_text_is_what_a_url_value_preprocessor_leaves() -> None:
    plain = Flask(__name__)
    plain.url_map.converters["account"] = AccountConverter

    @plain.url_value_preprocessor
    def take_lang(endpoint: str | None, values: dict[str, Any] | None) -> None:
        if values is not None:
            values.pop("lang", None)

    plain.add_url_rule("/<lang>/accounts/<account:account>", "a", lambda account: "", methods=["POST"])
    hashes = set()
    for lang in ("en", "fr"):
        with plain.test_request_context(f"/{lang}/accounts/DE42", method="POST"):
            plain.preprocess_request()
            command = request_fingerprint(request)
            assert command[2] == [("account", "DE42")]
            hashes.add(hash_command(command))
    assert len(hashes) == 1  # the view never sees lang: as before, it is not part of the command


@pytest.mark.parametrize(
    "body",
    [
        b'{"id": 18446744073709551615}',
        b'{"ratio": NaN}',
        b'{"big": 1e999}',
        b'{"small": -Infinity}',
        b'{"ok": [1, 2.5, "x"]}',
    ],
)
def test_a_fingerprint_callable_may_return_any_json_value(app: Flask, client: FlaskClient, body: bytes) -> None:
    @app.post("/as-parsed")
    @idempotent(fingerprint=lambda: request.get_json())
    def as_parsed() -> Any:
        row = ext(app)["Charge"](amount=1, route="as-parsed")
        ext(app)["db"].session.add(row)
        ext(app)["db"].session.commit()
        return {"ok": True}, 201

    first = post(client, "/as-parsed", data=body, content_type="application/json")
    assert first.status_code == 201
    again = post(client, "/as-parsed", data=body.replace(b": ", b":"), content_type="application/json")
    assert again.status_code == 201 and replayed(again)
    assert post(client, "/as-parsed", data=b'{"id": 1}', content_type="application/json").status_code == 422
    assert charges(app, "as-parsed") == 1
    stored = record(app, "k-1")
    assert stored is not None and stored["state"] == "COMPLETED" and stored["request_hash"].startswith("v1:")


@pytest.mark.parametrize(
    ("value", "same", "other"),
    [
        (1469956200427438080, 1469956200427438080, 1469956200427438081),  # a 64-bit id
        (18446744073709551615, 18446744073709551615, 18446744073709551614),
        ({7: "seven", "pair": (1, 2)}, {"pair": [1, 2], "7": "seven"}, {8: "seven", "pair": (1, 2)}),
        ({True: 1, None: 2, 1.5: 3}, {"true": 1, "null": 2, "1.5": 3}, {"true": 1, "null": 2, "1.5": 4}),
        (float("nan"), float("nan"), float("inf")),
        (float("inf"), float("1e999"), float("-inf")),
        ([1.0, 10.0, 1e-7], [1, 10, 0.0000001], [1, 10, 1e-8]),
        ("\ud800 lone", "\ud800 lone", "\udc00 lone"),
        ("\x7f and \udc00", "\x7f and \udc00", "\x7f and \udc01"),  # the marks of the fast path, in a string
        ([1e-7, "\x7f", "\udc00", "\udc00\udc00"], [1e-7, "\x7f", "\udc00", "\udc00\udc00"], [1e-7, "\x7f"]),
    ],
)
def test_every_json_value_has_a_deterministic_fingerprint(value: Any, same: Any, other: Any) -> None:
    assert hash_command(value) == hash_command(same)
    assert hash_command(value) != hash_command(other)
    assert hash_command(["task", value]) == hash_command(["task", same])


def test_a_value_json_cannot_spell_is_a_type_error_naming_it() -> None:
    with pytest.raises(TypeError, match="Decimal"):
        hash_command({"amount": Decimal("1.5")})
    with pytest.raises(TypeError, match="set"):
        hash_command([{1, 2}])
    with pytest.raises(TypeError, match="'7'"):
        hash_command({7: "a", "7": "b"})  # two keys JSON spells alike


def test_tasks_and_once_blocks_take_any_json_value_as_their_command(app: Flask) -> None:
    idempotency = ext(app)["idempotency"]
    runs: list[int] = []

    @idempotency.task(key=lambda order_id, lines, ratio: f"order:{order_id}", scope="billing")
    def ship(order_id: int, lines: dict[int, Any], ratio: float) -> dict[str, bool]:
        runs.append(order_id)
        return {"shipped": True}

    order = 1469956200427438080  # a 64-bit id (a snowflake), beyond a double's integers
    assert ship(order, {7: "seven", "pair": (1, 2)}, float("nan")) == {"shipped": True}
    assert ship(order, {"pair": [1, 2], "7": "seven"}, float("nan")) == {"shipped": True}  # the same, as JSON
    assert runs == [order]
    with pytest.raises(KeyReused):
        ship(order, {7: "seven", "pair": (1, 3)}, float("nan"))
    stored = record(app, f"order:{order}", "billing")
    assert stored is not None and (stored["state"], stored["attempts"]) == ("COMPLETED", 1)

    with idempotency.once("refunds", "rf-1", command={"id": 18446744073709551615, 3: float("inf")}) as op:
        op.complete({"refunded": True})
    with idempotency.once("refunds", "rf-1", command={"id": 18446744073709551615, "3": float("inf")}) as again:
        assert again.done and again.result == {"refunded": True}
    with pytest.raises(KeyReused), idempotency.once("refunds", "rf-1", command={"id": 18446744073709551614}):
        pass
    assert record(app, "rf-1", "refunds")["state"] == "COMPLETED"  # type: ignore[index]


def test_a_multipart_part_without_a_name_is_compared_not_a_500(app: Flask, client: FlaskClient) -> None:
    def send(boundary: str, value: bytes):  # type: ignore[no-untyped-def]
        body = (
            (
                f'--{boundary}\r\nContent-Disposition: form-data; name="a"\r\n\r\n1\r\n'
                f"--{boundary}\r\nContent-Disposition: form-data\r\n\r\n"
            ).encode()
            + value
            + f"\r\n--{boundary}--\r\n".encode()
        )
        return post(client, "/payments", data=body, content_type=f"multipart/form-data; boundary={boundary}")

    assert send("one", b"nameless").status_code == 201
    assert replayed(send("two", b"nameless"))
    assert send("three", b"other").status_code == 422
    assert charges(app) == 1
    assert record(app, "k-1")["state"] == "COMPLETED"  # type: ignore[index]
