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
  parameters]`` unless the media type is plain ``application/json`` (the text is the ``rfc8785`` library's
  output, computed at the speed of the C parser: :func:`canonical_json`);
- ``application/x-www-form-urlencoded``: ``["form", fields]``, plus ``parameters`` if there are any;
- ``multipart/form-data``: ``["form", fields and file digests]``, plus ``parameters`` (never the boundary);
- anything else: ``["bytes", media type, sha256]``, plus ``parameters`` if there are any.

View arguments are ``[[name, text], ...]`` sorted by name, the text as the URL spells it (never what a
converter makes of it). Fields are sorted by name with repeated names in the order sent; parameters are
``[[name, value], ...]`` sorted by name (the charset's value lower-cased: it is case-insensitive). A body with
``Content-Encoding`` (gzip, x-gzip, deflate) is decoded first, within the same limit; one in another encoding,
or that does not decode, is compared as sent, its encoding included.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import math
import re
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from operator import itemgetter
from typing import IO, Any, cast
from urllib.parse import unquote

from flask import Request
from flask.globals import request_ctx
from werkzeug.datastructures import FileStorage, MultiDict
from werkzeug.exceptions import HTTPException
from werkzeug.formparser import FormDataParser
from werkzeug.routing import BaseConverter, Map, MapAdapter, Rule
from werkzeug.routing.exceptions import RoutingException

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
_SURROGATE = re.compile("[\ud800-\udfff]")
_MARK = "\x7f"  # see _canonical_text: ASCII, which keeps an ASCII document's encoding on the fast path
_SPARE_MARK = "\udc00"  # for a document whose strings hold the first: a lone surrogate, never in a canonical one
_SPELLINGS = 4096  # distinct number spellings remembered per document


class _NotIJson(ValueError):
    pass


class _DuplicateKey(ValueError):
    pass


def _spell_float(value: float) -> str:
    """RFC 8785's spelling of a float (ECMAScript's ``Number.prototype.toString``): ``repr``'s shortest
    round-trip digits, laid out as ECMAScript lays them out (``1e-7``, ``0.000015``, ``1e+21``, ``10``)."""
    if value == 0:
        return "0"  # -0 too
    text = repr(value)
    if "e" not in text:
        return text[:-2] if text.endswith(".0") else text
    mantissa, _, exponent = text.partition("e")
    power = int(exponent)
    if -7 < power < 21:  # repr writes 1.5e-05 and 1e+16; ECMAScript writes 0.000015 and 10000000000000000
        sign = "-" if mantissa[0] == "-" else ""
        digits = mantissa.lstrip("-").replace(".", "")
        if power > 0:
            return sign + digits + "0" * (power + 1 - len(digits))
        return sign + "0." + "0" * (-power - 1) + digits
    return f"{mantissa}e{'+' if power > 0 else '-'}{abs(power)}"


def _is_spelled_canonically(token: str) -> bool:
    """Whether a fraction token of the parser is already RFC 8785's spelling of its double, judged from its text
    alone (cheaper than spelling it): written without an exponent, with at most 15 digits (fewer than any other
    decimal rounding to the same double, so they are its shortest digits), not ending in 0 (so no integer), and
    at least 1e-6 (below, ECMAScript writes an exponent)."""
    return (
        len(token) <= 16
        and token[-1] != "0"
        and "e" not in token
        and "E" not in token
        and not token.lstrip("-").startswith("0.000000")
    )


def _object(pairs: list[tuple[str, Any]], dict: type[dict[str, Any]] = dict, len: Any = len) -> dict[str, Any]:
    # Two bodies that differ only in a duplicated key would otherwise parse to the same object and share a
    # fingerprint; such bodies are compared byte for byte instead. (Called for every object: the builtins are
    # bound as defaults.)
    obj = dict(pairs)
    if len(obj) != len(pairs):
        raise _DuplicateKey(next(key for key in obj if sum(1 for name, _ in pairs if name == key) > 1))
    return obj


def _utf16_key(pair: tuple[str, Any]) -> bytes:
    return pair[0].encode("utf-16-be", "surrogatepass")


def _utf16_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # RFC 8785 orders keys by their UTF-16 code units; code point order (sort_keys) differs from it only for
    # keys with characters beyond U+FFFF, so documents holding such characters sort each object here.
    _object(pairs)  # no duplicate key
    pairs.sort(key=_utf16_key)
    return dict(pairs)


def _has_astral(text: str, escaped: bool) -> bool:
    # A \\uXXXX escape may spell a surrogate pair, which the parser joins into a character beyond U+FFFF.
    if escaped and ("\\ud" in text or "\\uD" in text):
        return True
    return not text.isascii() and _ASTRAL.search(text) is not None  # isascii() is O(1): a str knows


def _number_speller(text: str, mark: str) -> tuple[Callable[[str], Any], Callable[[], int]]:
    """The parser's hook for fractions and exponents in ``text``, and a count of the marked spellings it gave.

    Two ways, chosen by the document: where exponents abound (``[1e-7, 1e-7, ...]``) spellings are likely to
    repeat, and a C-level cache makes each repeat cost no Python call; elsewhere numbers are likely distinct
    (prices, coordinates), a cache would only add to each, and a fraction whose ``repr`` is RFC 8785's spelling
    (at least 1e-4 and below 1e16, not an integer) is handed back as the float for the C encoder to write.
    """

    def spell(token: str) -> str:
        if _is_spelled_canonically(token):
            return f"{mark}{token}{mark}"
        value = float(token)
        if not math.isfinite(value):
            raise _NotIJson(token)  # 1e400: beyond a double
        return f"{mark}{_spell_float(value)}{mark}"

    if (text.count("e-") + text.count("e+") + text.count("E")) * 100 > len(text):
        cached = functools.lru_cache(maxsize=_SPELLINGS)(spell)

        def calls() -> int:
            info = cached.cache_info()
            return info.hits + info.misses

        return cached, calls
    marked = 0

    def direct(token: str) -> Any:
        nonlocal marked
        value = float(token)
        if 1e-4 <= abs(value) < 1e16 and not value.is_integer():
            return value
        if value.is_integer() and abs(value) <= _INT_LIMIT:
            return int(value)  # RFC 8785 spells 10.0, 1e1 and 10 alike: "10"
        marked += 1
        return spell(token)

    return direct, lambda: marked


def _canonical_text(text: str, mark: str, *, constants: bool) -> str | None:
    """The RFC 8785 text of the JSON document ``text``, built at the speed of the C parser and encoder.

    Numbers are the expensive part of RFC 8785: each is spelled as ECMAScript spells its double. Where Python's
    ``repr`` (which the C encoder writes) spells a number otherwise, the parser's hook (``_number_speller``)
    returns the spelling wrapped in ``mark``; the encoder writes it as the string ``"<mark>1e-7<mark>"``, and
    removing ``"<mark>`` and ``<mark>"`` afterwards leaves the bare number. That is sound only when no string of
    the document holds ``mark``: the encoder's output must hold exactly two marks per number spelled, else
    ``None``. Integers are the parser's own (exact, of any size); ``constants`` admits NaN and the infinities
    (spelled as ``json.dumps`` spells them), which RFC 8785 has no spelling for.
    """
    number, spelled_numbers = _number_speller(text, mark)

    @functools.cache
    def constant(token: str) -> str:
        if not constants:
            raise _NotIJson(token)  # NaN, Infinity, -Infinity: not JSON
        return f"{mark}{token}{mark}"

    astral = _has_astral(text, "\\u" in text)
    document = json.loads(
        text, parse_float=number, parse_constant=constant, object_pairs_hook=_utf16_object if astral else _object
    )
    spelled = spelled_numbers() + constant.cache_info().hits + constant.cache_info().misses
    out = json.dumps(document, ensure_ascii=False, separators=_COMPACT, sort_keys=not astral, check_circular=False)
    del document
    if out.count(mark) != 2 * spelled:
        return None
    return out.replace(f'"{mark}', "").replace(f'{mark}"', "") if spelled else out


def _canonical_json_text(raw: bytes) -> str | None:
    try:
        document = raw.decode(json.detect_encoding(raw), "surrogatepass")
        # A string holding the mark (DEL, raw or escaped) would make _canonical_text give up: take the spare.
        escaped = "\\u" in document  # one scan spares three in the usual document, which has no \\u escape
        marked = _MARK in document or (escaped and ("\\u007f" in document or "\\u007F" in document))
        mark = _SPARE_MARK if marked else _MARK
        text = _canonical_text(document, mark, constants=False)
    except (ValueError, RecursionError):
        return None
    if text is None or (not text.isascii() and _SURROGATE.search(text) is not None):
        return None  # a lone surrogate: not UTF-8, RFC 8785 has no spelling for it
    return text


def canonical_json(raw: bytes) -> bytes | None:
    """Return the RFC 8785 form of the JSON document ``raw``, or ``None`` if it has none.

    ``None`` means: not a JSON text RFC 8785 can spell (invalid JSON or UTF-8, duplicate keys, NaN or a number
    beyond a double, a lone surrogate), so the caller compares the body byte for byte, which can only make a
    benign re-spelling a conflict, never let two different commands share a fingerprint. Integers beyond 2**53,
    which RFC 8785 refuses, are spelled by their digits: each is equal to itself only.

    It costs about what ``json.loads`` and ``json.dumps`` of the document cost (see ``_canonical_text``).
    """
    text = _canonical_json_text(raw)
    return None if text is None else text.encode("utf-8")


def canonical_value(value: Any) -> bytes:
    """The canonical bytes of a command: RFC 8785, extended to every value ``json.dumps`` accepts.

    Values RFC 8785 spells are spelled as it does. Beyond it: integers of any size by their digits; NaN,
    Infinity and -Infinity as ``json.dumps`` writes them; dict keys as ``json.dumps`` converts them (``7`` and
    ``True`` are the keys ``"7"`` and ``"true"``); tuples as lists; lone surrogates in strings as their
    surrogate-escaped UTF-8. Anything else is the ``TypeError`` of ``json.dumps`` (it names the type); a dict
    whose keys ``json.dumps`` spells alike (``7`` and ``"7"``) is a ``TypeError`` too.
    """
    text = json.dumps(value, ensure_ascii=False, separators=_COMPACT)
    mark = _MARK
    while mark in text:  # a command's strings may hold any character: pick a mark they do not hold
        mark += mark
    try:
        canonical = _canonical_text(text, mark, constants=True)
    except _DuplicateKey as exc:
        raise TypeError(f"a dict in the command has two keys that JSON spells {exc.args[0]!r}") from None
    assert canonical is not None  # the mark is in none of its strings
    return canonical.encode("utf-8", "surrogatepass")


# Reading the body within the limit --------------------------------------------------------------------------


class _LimitedStream(io.RawIOBase):
    """Reads ``stream`` up to ``limit`` bytes; the byte after raises :class:`BodyTooLarge` (and so does every
    read after it). It reads at most ``limit + 1`` bytes of ``stream``; with ``keep``, it hashes what it passes
    on and keeps the first READ_CHUNK bytes of it (enough to tell an empty multipart form)."""

    def __init__(self, stream: IO[bytes], limit: int, *, keep: bool = False) -> None:
        super().__init__()
        self._stream = stream
        self.limit = limit
        self.count = 0
        self.exceeded = False
        self.keep = keep
        self.digest = hashlib.sha256()
        self.head = bytearray()

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
        if self.keep:
            self.digest.update(data)
            if len(self.head) < READ_CHUNK:
                self.head += data[: READ_CHUNK - len(self.head)]
        return len(data)

    def drain(self) -> None:
        """Read whatever is left (within the limit), so that it counts."""
        while self.read(READ_CHUNK):
            pass


@dataclass(frozen=True)
class _Body:
    """The body as the limit let it through: read whole (``raw``), or parsed by werkzeug as it streamed in
    (a multipart form: ``size`` bytes, hashing to ``digest``, the first of them in ``head``; ``size`` is
    ``None`` when a hook before ours had parsed the form already)."""

    raw: bytes | None = None
    size: int | None = None
    digest: str = ""
    head: bytes = b""


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
    limited = _LimitedStream(request.stream, max_bytes, keep=True)
    request.stream = cast(IO[bytes], limited)
    request.form  # noqa: B018 - parses form and files
    limited.drain()
    return _Body(size=limited.count, digest=limited.digest.hexdigest(), head=bytes(limited.head))


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


def _urlencoded_fields(raw: bytes) -> list[tuple[str, str]]:
    # Decoded to bytes, not text: two bodies whose bytes differ (even in invalid UTF-8, which a text decoder
    # would replace) never share a fingerprint. Bytes map to str through latin-1, losslessly, and percent
    # escapes decode through latin-1 too. The work per field is a few C calls (werkzeug's own parse does more):
    # the body is split a slice at a time, so that the split pieces of all of it are never held at once.
    text = raw.decode("latin-1").replace("+", " ")
    escaped = "%" in text
    fields: list[tuple[str, str]] = []
    start = 0
    while start < len(text):
        end = text.find("&", start + READ_CHUNK)
        end = len(text) if end < 0 else end
        pairs = [pair.partition("=")[::2] for pair in text[start:end].split("&") if pair]
        if escaped:
            pairs = [(unquote(name, "latin-1"), unquote(value, "latin-1")) for name, value in pairs]
        fields += pairs
        start = end + 1
    fields.sort(key=itemgetter(0))  # stable: repeated names keep their order (a=1&a=2 is not a=2&a=1)
    return fields


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
    # Stable: repeated names keep their order. A part without a name (werkzeug's name None) sorts first.
    return sorted(fields, key=lambda field: (field[0], field[1] is not None, field[1] or ""))


def _empty_form(data: bytes, params: dict[str, str]) -> bool:
    """Whether ``data`` is a well-formed multipart body without a part: the closing delimiter, with any
    preamble and epilogue (what clients send for a form without fields). werkzeug's parse of the request says
    nothing about it (it answers an empty form for a malformed body too), so ask its parser outright."""
    parser = FormDataParser(silent=False)
    try:
        _, form, files = parser.parse(io.BytesIO(data), "multipart/form-data", len(data), params)
    except ValueError:
        return False
    return not form and not files


def _multipart_body(request: Request, body: _Body, decoded: bytes | None) -> list[Any]:
    form: MultiDict[str, str]
    files: MultiDict[str, FileStorage]
    size: int | None
    whole: bytes | None  # the body, when it is at hand
    if decoded is None:  # werkzeug's own parse of the request (from the stream, or from the cached body)
        form, files = request.form, request.files
        if body.raw is not None:
            size, digest, whole = len(body.raw), hashlib.sha256(body.raw).hexdigest(), body.raw
        else:
            size, digest = body.size, body.digest
            whole = body.head if size is not None and size <= len(body.head) else None
    else:  # a multipart body with a Content-Encoding: werkzeug parses what was sent; we parse it decoded
        parser = request.make_form_data_parser()
        _, form, files = parser.parse(io.BytesIO(decoded), request.mimetype, len(decoded), request.mimetype_params)
        size, digest, whole = len(decoded), hashlib.sha256(decoded).hexdigest(), decoded
    try:
        fields = _multipart_fields(form, files)
    finally:
        if decoded is not None:
            for upload in files.values():
                upload.close()
    if not fields and size and (whole is None or not _empty_form(whole, request.mimetype_params)):
        # werkzeug found no part in a body that has bytes and is not an empty form: a malformed body (or an
        # empty form with more than READ_CHUNK bytes of preamble and epilogue). Compare the bytes, boundary
        # included, so that two different bodies never share a fingerprint.
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
        canonical = _canonical_json_text(raw)
        if canonical is not None:
            media = [[media_type, params]] if media_type != "application/json" or params else []
            return ["json", canonical, *media]
    return ["bytes", media_type, hashlib.sha256(raw).hexdigest(), *extra]


# View arguments as the URL spells them ----------------------------------------------------------------------


class _MatchedText(Rule):
    """A copy of a route's rule whose converters keep the text they match (``to_python`` is ``str``)."""

    def get_converter(
        self, variable_name: str, converter_name: str, args: tuple[Any, ...], kwargs: Any
    ) -> BaseConverter:
        converter = super().get_converter(variable_name, converter_name, args, kwargs)
        converter.to_python = str  # type: ignore[method-assign,assignment]  # the text matched is already a str
        return converter


_TEXT_MAP = "_flask_idempotent_matched_text"  # the rule's one-rule map of _MatchedText, built once per rule


def _matched_text(request: Request) -> dict[str, str]:
    """The view arguments of ``request`` as its URL spells them, before any converter ran: the request is
    matched again, with the same adapter, against a copy of its rule whose converters return what they match.
    Empty when the rule has no variables or the copy does not match (then the converted values are used)."""
    rule = request.url_rule
    if rule is None or not rule.arguments or rule.map is None:
        return {}
    text_map = rule.__dict__.get(_TEXT_MAP)
    if text_map is None:
        source = rule.map
        copy = _MatchedText(
            rule.rule,
            endpoint="matched-text",
            subdomain=rule.subdomain,
            host=rule.host,
            strict_slashes=rule.strict_slashes,
            merge_slashes=rule.merge_slashes,
            websocket=rule.websocket,
        )
        text_map = Map(
            [copy],
            default_subdomain=source.default_subdomain,
            strict_slashes=source.strict_slashes,
            merge_slashes=source.merge_slashes,
            redirect_defaults=False,
            converters=source.converters,
            host_matching=source.host_matching,
        )
        rule.__dict__[_TEXT_MAP] = text_map
    adapter = request_ctx.url_adapter
    if adapter is None:
        return {}
    again = MapAdapter(
        text_map,
        adapter.server_name,
        adapter.script_name,
        adapter.subdomain,
        adapter.url_scheme,
        adapter.path_info,
        adapter.default_method,
    )
    try:
        _, values = again.match(method=request.method, websocket=adapter.websocket)
    except (HTTPException, RoutingException):
        return {}
    return dict(values)


def _view_arguments(request: Request) -> list[tuple[str, str]]:
    # The names are the view's (a url_value_preprocessor may have taken some); each value is the URL's text
    # for it, so that a converter returning an object (whose str() may be a memory address) cannot make every
    # retry another command. A value the URL does not spell (a rule's default) is its str().
    view_args = request.view_args or {}
    matched = _matched_text(request) if view_args else {}
    return sorted((name, matched.get(name, str(value))) for name, value in view_args.items())


# The command ------------------------------------------------------------------------------------------------


class RequestCommand(list[Any]):
    """A request's default command: lists of strings (and ``None``) only, so its compact JSON is already its
    RFC 8785 form and :func:`hash_command` hashes it as it is, at the speed of the C encoder."""


def request_fingerprint(
    request: Request, *, headers: Iterable[str] = (), max_body_bytes: int = 10 * 1024 * 1024
) -> RequestCommand:
    """Return the canonical command of ``request`` as a JSON-serializable list.

    Raises :class:`BodyTooLarge` when the body (chunked or not, multipart included, decoded or not) is larger
    than ``max_body_bytes``; it is read no further than the byte past the limit.
    """
    rule = request.url_rule.rule if request.url_rule is not None else request.path
    view_args = _view_arguments(request)
    query = sorted(request.args.items(multi=True), key=lambda item: item[0])  # stable: repeated values keep order
    header_values = sorted((name.lower(), request.headers.getlist(name)) for name in headers)
    return RequestCommand(
        [
            request.method,
            rule,
            view_args,
            query,
            _body(request, max_body_bytes),
            header_values,
        ]
    )


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
    """Hash a command into ``v1:`` + the sha256 hex of its canonical bytes (:func:`canonical_value`).

    ``command`` may be any value ``json.dumps`` accepts; anything else is a ``TypeError`` naming the type.
    """
    digest = hashlib.sha256()
    if isinstance(command, RequestCommand):
        for chunk in _plain_chunks(command):
            digest.update(chunk.encode("utf-8", "surrogatepass"))
    else:
        digest.update(canonical_value(command))
    return f"{VERSION}:{digest.hexdigest()}"


def _plain_chunks(value: Any) -> Iterator[str]:
    """The compact JSON of ``value`` (lists, tuples, strings, ``None``), a slice at a time: a body's thousands
    of fields, or its canonical text, are never written out as one more copy of the body."""
    if isinstance(value, str) and len(value) > READ_CHUNK:
        yield '"'
        for start in range(0, len(value), READ_CHUNK):
            yield json.dumps(value[start : start + READ_CHUNK], ensure_ascii=False)[1:-1]
        yield '"'
    elif isinstance(value, (list, tuple)) and len(value) > 64:
        yield "["
        for start in range(0, len(value), 1024):
            yield ("," if start else "") + json.dumps(
                value[start : start + 1024], ensure_ascii=False, separators=_COMPACT
            )[1:-1]
        yield "]"
    elif isinstance(value, (list, tuple)):
        yield "["
        for index, item in enumerate(value):
            if index:
                yield ","
            yield from _plain_chunks(item)
        yield "]"
    else:
        yield json.dumps(value, ensure_ascii=False, separators=_COMPACT)
