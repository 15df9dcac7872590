"""The request fingerprint: what "the same command" means.

A fingerprint covers the method, the URL rule and view arguments, the query parameters (sorted), the body in
canonical form and the configured headers. It is hashed into a versioned string (``v1:`` + sha256 hex) so the
canonical form can change in a later version without old records matching new requests by accident.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from typing import Any
from urllib.parse import unquote_to_bytes

import rfc8785
from flask import Request

VERSION = "v1"


class BodyTooLarge(ValueError):
    """The request body is larger than ``IDEMPOTENCY_MAX_BODY_BYTES``; it is not read into memory."""


class _DuplicateKey(ValueError):
    pass


def _reject_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # Two bodies that differ only in a duplicated key would otherwise parse to the same object and share a
    # fingerprint; such bodies are compared byte for byte instead.
    obj = dict(pairs)
    if len(obj) != len(pairs):
        raise _DuplicateKey
    return obj


def canonical_json(raw: bytes) -> bytes | None:
    """Return the RFC 8785 form of the JSON document ``raw``, or ``None`` if it has none.

    ``None`` means: not I-JSON (invalid JSON or UTF-8, duplicate keys, integers beyond 2**53, NaN), so the
    caller compares the body byte for byte, which can only make a benign re-spelling a conflict, never let two
    different commands share a fingerprint.
    """
    try:
        document = json.loads(raw, object_pairs_hook=_reject_duplicate_keys)
        return rfc8785.dumps(document)
    except (ValueError, RecursionError, rfc8785.CanonicalizationError):
        return None


def _urlencoded_fields(raw: bytes) -> list[list[str]]:
    # Decoded to bytes, not text: two bodies whose bytes differ (even in invalid UTF-8, which a text decoder
    # would replace) never share a fingerprint. Bytes map to str through latin-1, losslessly.
    fields = []
    for pair in raw.split(b"&"):
        if pair:
            name, _, value = pair.partition(b"=")
            fields.append([unquote_to_bytes(part.replace(b"+", b" ")).decode("latin-1") for part in (name, value)])
    return sorted(fields)


def _multipart_fields(request: Request) -> list[list[str]]:
    fields = [["field", name, value] for name, value in request.form.items(multi=True)]
    for name, upload in request.files.items(multi=True):
        digest = hashlib.sha256()
        while chunk := upload.stream.read(65536):
            digest.update(chunk)
        upload.stream.seek(0)  # the view reads the file after us
        fields.append(["file", name, upload.filename or "", upload.mimetype, digest.hexdigest()])
    return sorted(fields)


def _body(request: Request, max_bytes: int) -> list[Any]:
    length = request.content_length
    if length is not None and length > max_bytes:
        raise BodyTooLarge
    media_type = request.mimetype
    if media_type == "multipart/form-data":
        # The multipart boundary is drawn afresh by clients on every retry: compare fields, not bytes.
        return ["form", _multipart_fields(request)]
    raw = request.get_data(cache=True)
    if len(raw) > max_bytes:  # chunked bodies carry no Content-Length
        raise BodyTooLarge
    if not raw:
        return ["empty"]
    if media_type == "application/x-www-form-urlencoded":
        return ["form", _urlencoded_fields(raw)]
    if request.is_json:
        canonical = canonical_json(raw)
        if canonical is not None:
            return ["json", canonical.decode("utf-8")]
    return ["bytes", media_type, hashlib.sha256(raw).hexdigest()]


def request_fingerprint(
    request: Request, *, headers: Iterable[str] = (), max_body_bytes: int = 10 * 1024 * 1024
) -> list[Any]:
    """Return the canonical command of ``request`` as a JSON-serializable list."""
    rule = request.url_rule.rule if request.url_rule is not None else request.path
    view_args = sorted((name, str(value)) for name, value in (request.view_args or {}).items())
    query = sorted(request.args.items(multi=True))
    header_values = sorted((name.lower(), request.headers.getlist(name)) for name in headers)
    return [
        request.method,
        rule,
        view_args,
        query,
        _body(request, max_body_bytes),
        header_values,
    ]


def custom_command(request: Request, value: Any) -> list[Any]:
    """Wrap the result of a route's ``fingerprint=`` callable.

    The method and URL rule stay part of the command, so the same key sent to another route is still a
    different command even when the callable returns the same value there.
    """
    rule = request.url_rule.rule if request.url_rule is not None else request.path
    if isinstance(value, bytes):
        value = ["bytes", hashlib.sha256(value).hexdigest()]
    return ["custom", request.method, rule, value]


def hash_command(command: Any) -> str:
    """Hash a canonical command into ``v1:`` + sha256 hex. ``command`` must be JSON-serializable."""
    return f"{VERSION}:{hashlib.sha256(rfc8785.dumps(command)).hexdigest()}"
