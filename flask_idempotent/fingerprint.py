"""The request fingerprint: what "the same command" means.

A fingerprint covers the method, the URL rule and view arguments, the query parameters (sorted by name, repeated
values in their order), the body in canonical form with its media type and parameters, and the configured
headers. It is hashed into a versioned string (``v1:`` + sha256 hex) so the canonical form can change in a later
version without old records matching new requests by accident.

The body is read within ``IDEMPOTENCY_MAX_BODY_BYTES``, in bounded chunks, whether it has a ``Content-Length`` or
is chunked: a larger body is refused (:class:`BodyTooLarge`) as soon as its first byte past the limit arrives,
never read whole. A body within the limit stays readable by the view as if nobody had read it.

Canonical forms (the shapes are part of ``v1``; a change that alters the hash of a request which already had one
needs a new version):

- no body: ``["empty"]``;
- JSON (``application/json`` and any ``+json`` type): ``["json", <RFC 8785 text>]``, plus ``[media type,
  parameters]`` unless the media type is plain ``application/json``;
- ``application/x-www-form-urlencoded``: ``["form", fields]``, plus ``parameters`` if there are any;
- ``multipart/form-data``: ``["form", fields and file digests]``, plus ``parameters`` (never the boundary);
- anything else: ``["bytes", media type, sha256]``, plus ``parameters`` if there are any.

Fields are sorted by name with repeated names in the order sent; parameters are ``[[name, value], ...]`` sorted
by name (the charset's value lower-cased: it is case-insensitive). A body with ``Content-Encoding`` (gzip,
x-gzip, deflate) is decoded first, within the same limit; one in another encoding, or that does not decode, is
compared as sent, its encoding included.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from typing import IO, Any, cast
from urllib.parse import unquote_to_bytes

import rfc8785
from flask import Request
from werkzeug.datastructures import FileStorage, MultiDict

VERSION = "v1"

#: How much of a body is read at a time.
READ_CHUNK = 64 * 1024

_ENVIRON_KEY = "flask_idempotent.body"
_URLENCODED = "application/x-www-form-urlencoded"


class BodyTooLarge(ValueError):
    """The request body is larger than ``IDEMPOTENCY_MAX_BODY_BYTES``; it is not read into memory."""


# JSON: RFC 8785 -------------------------------------------------------------------------------------------------

_INT_LIMIT = 2**53 - 1  # I-JSON: integers an IEEE 754 double holds exactly
_COMPACT = (",", ":")
_ASTRAL = re.compile("[\U00010000-\U0010ffff]")


class _NotIJson(ValueError):
    pass


def _reject_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # Two bodies that differ only in a duplicated key would otherwise parse to the same object and share a
    # fingerprint; such bodies are compared byte for byte instead.
    obj = dict(pairs)
    if len(obj) != len(pairs):
        raise _NotIJson
    return obj


def _i_json_int(text: str) -> int:
    value = int(text)
    if -_INT_LIMIT <= value <= _INT_LIMIT:
        return value
    raise _NotIJson


def _refuse_constant(text: str) -> Any:
    raise _NotIJson(text)  # NaN, Infinity, -Infinity: not JSON


def canonical_json(raw: bytes) -> bytes | None:
    """Return the RFC 8785 form of the JSON document ``raw``, or ``None`` if it has none.

    ``None`` means: not I-JSON (invalid JSON or UTF-8, duplicate keys, integers beyond 2**53, NaN), so the
    caller compares the body byte for byte, which can only make a benign re-spelling a conflict, never let two
    different commands share a fingerprint.

    The result is the bytes ``rfc8785.dumps`` gives for the parsed document. That reference implementation is
    pure Python (about 2 s for a 9.5 MB document); the standard library's C encoder spells most documents the
    same way, several times faster, and is used when it provably does: all its numbers are integers or
    plainly spelled fractions, and no object key needs UTF-16 ordering (no character beyond U+FFFF).
    """
    plain = True  # every number is spelled by the C encoder exactly as RFC 8785 spells it

    def parse_float(text: str) -> float | int:
        nonlocal plain
        value = float(text)
        if value.is_integer():
            if -_INT_LIMIT <= value <= _INT_LIMIT:
                return int(value)  # RFC 8785 spells 10.0, 1e1 and 10 alike: "10"
            plain = False
        elif not 1e-4 <= abs(value) < 1e16:  # where repr() uses an exponent and RFC 8785 may not (NaN, inf too)
            plain = False
        return value

    try:
        document = json.loads(
            raw,
            object_pairs_hook=_reject_duplicate_keys,
            parse_int=_i_json_int,
            parse_float=parse_float,
            parse_constant=_refuse_constant,
        )
        if plain:
            text = json.dumps(document, ensure_ascii=False, separators=_COMPACT, sort_keys=True, allow_nan=False)
            if text.isascii() or _ASTRAL.search(text) is None:
                return text.encode("utf-8")  # a lone surrogate fails here: UnicodeEncodeError, a ValueError
        return rfc8785.dumps(document)
    except (ValueError, RecursionError, rfc8785.CanonicalizationError):
        return None


def _plain(value: Any) -> bool:
    """Whether ``value`` holds only lists, strings, booleans, ``None`` and I-JSON integers: the shapes whose
    compact JSON spelling is already their RFC 8785 form."""
    if isinstance(value, (list, tuple)):
        return all(_plain(item) for item in value)
    kind = type(value)
    return value is None or kind is str or kind is bool or (kind is int and -_INT_LIMIT <= value <= _INT_LIMIT)


def _jcs(value: Any) -> bytes:
    """``rfc8785.dumps(value)``, through the C encoder for the plain shapes commands have."""
    if _plain(value):
        try:
            return json.dumps(value, ensure_ascii=False, separators=_COMPACT).encode("utf-8")
        except UnicodeEncodeError:
            pass  # a lone surrogate: the reference implementation refuses it with its own error
    return rfc8785.dumps(value)


# Reading the body within the limit --------------------------------------------------------------------------


class _LimitedStream(io.RawIOBase):
    """Reads ``stream`` up to ``limit`` bytes; the byte after raises :class:`BodyTooLarge` (and so does every
    read after it). It reads at most ``limit + 1`` bytes of ``stream``, and hashes what it passes on."""

    def __init__(self, stream: IO[bytes], limit: int) -> None:
        super().__init__()
        self._stream = stream
        self.limit = limit
        self.count = 0
        self.exceeded = False
        self.digest = hashlib.sha256()

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        if self.exceeded:
            raise BodyTooLarge
        data = self._stream.read(min(len(buffer), self.limit + 1 - self.count))
        self.count += len(data)
        if self.count > self.limit:
            self.exceeded = True
            raise BodyTooLarge
        memoryview(buffer).cast("B")[: len(data)] = data
        self.digest.update(data)
        return len(data)

    def drain(self) -> None:
        """Read whatever is left (within the limit), so that it counts."""
        while self.read(READ_CHUNK):
            pass


@dataclass(frozen=True)
class _Body:
    """The body as the limit let it through: read whole (``raw``), or parsed by werkzeug as it streamed in
    (a multipart form: ``size`` bytes, hashing to ``digest``; ``size`` is ``None`` when a hook before ours had
    parsed the form already)."""

    raw: bytes | None = None
    size: int | None = None
    digest: str = ""


def _is_multipart(request: Request) -> bool:
    return request.mimetype == "multipart/form-data"


def _content_codings(request: Request) -> list[str]:
    codings = (c.strip().lower() for line in request.headers.getlist("Content-Encoding") for c in line.split(","))
    return [c for c in codings if c and c != "identity"]


def limit_body(request: Request, *, max_body_bytes: int) -> None:
    """Read the body of ``request`` within ``max_body_bytes``, or raise :class:`BodyTooLarge`.

    Call it before anything else reads the body (a route's ``fingerprint=`` callable, say): what it read stays
    readable through ``request.get_data()``, ``request.get_json()``, ``request.stream``, ``request.form`` and
    ``request.files``. Calling it again costs nothing.
    """
    _load_body(request, max_body_bytes)


def _load_body(request: Request, max_bytes: int) -> _Body:
    loaded = request.environ.get(_ENVIRON_KEY)
    if isinstance(loaded, _Body):
        return loaded
    length = request.content_length
    if length is not None and length > max_bytes:
        raise BodyTooLarge  # refused before reading a byte
    cached = getattr(request, "_cached_data", None)  # werkzeug's get_data(cache=True) ran before us
    if isinstance(cached, bytes):
        if len(cached) > max_bytes:
            raise BodyTooLarge
        body = _Body(raw=cached)
    elif "form" in request.__dict__ and (_is_multipart(request) or request.mimetype == _URLENCODED):
        body = _Body()  # a hook before ours parsed the form: the stream is spent, the parsed form is what is left
    elif _is_multipart(request) and not _content_codings(request):
        body = _stream_multipart(request, max_bytes)
    else:
        body = _Body(raw=_read_whole(request, max_bytes))
    request.environ[_ENVIRON_KEY] = body
    return body


def _read_whole(request: Request, max_bytes: int) -> bytes:
    stream = _LimitedStream(request.stream, max_bytes)
    buffer = io.BytesIO()
    while chunk := stream.read(READ_CHUNK):
        buffer.write(chunk)
    raw = buffer.getvalue()  # shares the buffer: the body is held once
    buffer.seek(0)
    # werkzeug's cached_property: the view (get_data, get_json, form, stream) reads the body from the start.
    request.stream = buffer
    return raw


def _stream_multipart(request: Request, max_bytes: int) -> _Body:
    # werkzeug parses the form as it streams in, through the limit: uploads beyond 500 KB go to temporary
    # files, not memory. Its parser swallows a ValueError (BodyTooLarge is one) into an empty form, so the
    # limit is checked again afterwards, while the rest of the body (an epilogue, or what a malformed body left
    # unparsed) is read and counted.
    limited = _LimitedStream(request.stream, max_bytes)
    request.stream = cast(IO[bytes], limited)
    request.form  # noqa: B018 - parses form and files
    limited.drain()
    return _Body(size=limited.count, digest=limited.digest.hexdigest())


# Content-Encoding -----------------------------------------------------------------------------------------------


def _inflate(data: bytes, wbits: int, max_bytes: int) -> bytes:
    out = io.BytesIO()
    while True:  # gzip: a body may be several members, one after the other
        decoder = zlib.decompressobj(wbits)
        pending = data
        while not decoder.eof:
            # max_length bounds what one call may produce: a small bomb never inflates beyond the limit + 1.
            chunk = decoder.decompress(pending, max_bytes + 1 - out.tell())
            pending = decoder.unconsumed_tail
            if not chunk and not pending:
                raise zlib.error("truncated")
            out.write(chunk)
            if out.tell() > max_bytes:
                raise BodyTooLarge
        data = decoder.unused_data
        if not data:
            return out.getvalue()
        if wbits != _GZIP:  # bytes after the end of a deflate stream: not a body we can compare decoded
            raise zlib.error("trailing data")


_GZIP = 16 + zlib.MAX_WBITS


def _decode(raw: bytes, codings: list[str], max_bytes: int) -> bytes | None:
    """``raw`` with its content codings undone (the last applied first), or ``None`` if one is unknown or the
    body does not decode. The decoded body is held to the same limit: a compression bomb is a body too large."""
    data = raw
    try:
        for coding in reversed(codings):
            if coding in ("gzip", "x-gzip"):
                data = _inflate(data, _GZIP, max_bytes)
            elif coding == "deflate":
                try:  # RFC 9110: the zlib format; some clients send raw deflate
                    data = _inflate(data, zlib.MAX_WBITS, max_bytes)
                except zlib.error:
                    data = _inflate(data, -zlib.MAX_WBITS, max_bytes)
            else:
                return None
    except zlib.error:
        return None
    return data


# Canonical forms --------------------------------------------------------------------------------------------


def _parameters(params: dict[str, str], *, drop: Iterable[str] = ()) -> list[list[str]]:
    """Media type parameters as ``[[name, value], ...]`` sorted by name; the charset's value lower-cased."""
    skip = set(drop)
    return sorted(
        [name, value.lower() if name == "charset" else value] for name, value in params.items() if name not in skip
    )


def _by_name(fields: list[list[str]]) -> list[list[str]]:
    # Stable: sorted by name, repeated names in the order sent (a=1&a=2 is not a=2&a=1).
    return sorted(fields, key=lambda field: field[0])


def _urlencoded_fields(raw: bytes) -> list[list[str]]:
    # Decoded to bytes, not text: two bodies whose bytes differ (even in invalid UTF-8, which a text decoder
    # would replace) never share a fingerprint. Bytes map to str through latin-1, losslessly.
    fields = []
    for pair in raw.split(b"&"):
        if pair:
            name, _, value = pair.partition(b"=")
            fields.append([unquote_to_bytes(part.replace(b"+", b" ")).decode("latin-1") for part in (name, value)])
    return _by_name(fields)


def _multipart_fields(form: MultiDict[str, str], files: MultiDict[str, FileStorage]) -> list[list[Any]]:
    fields: list[list[Any]] = [["field", name, value] for name, value in form.items(multi=True)]
    for name, upload in files.items(multi=True):
        digest = hashlib.sha256()
        while chunk := upload.stream.read(READ_CHUNK):
            digest.update(chunk)
        upload.stream.seek(0)  # the view reads the file after us
        entry: list[Any] = ["file", name, upload.filename or "", upload.mimetype, digest.hexdigest()]
        if params := _parameters(upload.mimetype_params):
            entry.append(params)
        fields.append(entry)
    return sorted(fields, key=lambda field: (field[0], field[1]))  # stable: repeated names keep their order


def _multipart_body(request: Request, body: _Body, decoded: bytes | None) -> list[Any]:
    form: MultiDict[str, str]
    files: MultiDict[str, FileStorage]
    size: int | None
    if decoded is None:  # werkzeug's own parse of the request (from the stream, or from the cached body)
        form, files = request.form, request.files
        if body.raw is not None:
            size, digest = len(body.raw), hashlib.sha256(body.raw).hexdigest()
        else:
            size, digest = body.size, body.digest
    else:  # a multipart body with a Content-Encoding: werkzeug parses what was sent; we parse it decoded
        parser = request.make_form_data_parser()
        _, form, files = parser.parse(io.BytesIO(decoded), request.mimetype, len(decoded), request.mimetype_params)
        size, digest = len(decoded), hashlib.sha256(decoded).hexdigest()
    try:
        fields = _multipart_fields(form, files)
    finally:
        if decoded is not None:
            for upload in files.values():
                upload.close()
    if not fields and size:
        # werkzeug found no part in a body that has bytes: a malformed body (its parser says nothing). Compare
        # the bytes, boundary included, so that two different bodies never share a fingerprint.
        return ["bytes", request.mimetype, digest, _parameters(request.mimetype_params)]
    result: list[Any] = ["form", fields]
    if params := _parameters(request.mimetype_params, drop=("boundary",)):
        result.append(params)
    return result


def _body(request: Request, max_bytes: int) -> list[Any]:
    body = _load_body(request, max_bytes)
    media_type = request.mimetype
    multipart = _is_multipart(request)
    params = _parameters(request.mimetype_params, drop=("boundary",) if multipart else ())
    extra = [params] if params else []
    raw = body.raw
    codings = _content_codings(request) if raw is not None else []
    if codings:
        assert raw is not None
        decoded = _decode(raw, codings, max_bytes)
        if decoded is None:  # an encoding we cannot undo: compared as sent
            return ["bytes", media_type, hashlib.sha256(raw).hexdigest(), ["content-encoding", codings], params]
        if multipart:
            return _multipart_body(request, body, decoded)
        raw = decoded
    if multipart:
        return _multipart_body(request, body, None)
    if raw is None:  # a hook before ours parsed the urlencoded form: what it parsed is what is left
        return ["form", _by_name([[name, value] for name, value in request.form.items(multi=True)]), *extra]
    if not raw:
        return ["empty"]
    if media_type == _URLENCODED:
        return ["form", _urlencoded_fields(raw), *extra]
    if request.is_json:
        canonical = canonical_json(raw)
        if canonical is not None:
            media = [[media_type, params]] if media_type != "application/json" or params else []
            return ["json", canonical.decode("utf-8"), *media]
    return ["bytes", media_type, hashlib.sha256(raw).hexdigest(), *extra]


def request_fingerprint(
    request: Request, *, headers: Iterable[str] = (), max_body_bytes: int = 10 * 1024 * 1024
) -> list[Any]:
    """Return the canonical command of ``request`` as a JSON-serializable list.

    Raises :class:`BodyTooLarge` when the body (chunked or not, multipart included, decoded or not) is larger
    than ``max_body_bytes``; it is read no further than the byte past the limit.
    """
    rule = request.url_rule.rule if request.url_rule is not None else request.path
    view_args = sorted((name, str(value)) for name, value in (request.view_args or {}).items())
    query = sorted(request.args.items(multi=True), key=lambda item: item[0])  # stable: repeated values keep order
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
    return f"{VERSION}:{hashlib.sha256(_jcs(command)).hexdigest()}"
