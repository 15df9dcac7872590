"""Parsing the ``Idempotency-Key`` header.

Two spellings name the same key: a bare token (``abc``) and an RFC 8941 sf-string (``"abc"``). The key itself
is 1..255 visible ASCII characters (0x21-0x7E) other than the comma, in either spelling.

The comma is refused because servers (gunicorn, Werkzeug, most WSGI servers) join repeated header lines with a
comma before the app sees them: ``Idempotency-Key: a`` and ``Idempotency-Key: b`` arrive as the one value
``a,b``, which must not become a key of its own.
"""

from __future__ import annotations

MAX_KEY_LENGTH = 255


class KeyFormatError(ValueError):
    """The header value is not a valid key; the message says why (shown in the 400 ``invalid-key`` problem)."""


def _is_visible_ascii(text: str) -> bool:
    return all("\x21" <= ch <= "\x7e" for ch in text)


_COMMA = "a key may not contain a comma (servers join two key header lines with one: send the header once)"


def _unquote_sf_string(value: str) -> str:
    # RFC 8941 section 4.2.5: DQUOTE *( unescaped / "\" ( DQUOTE / "\" ) ) DQUOTE
    if len(value) < 2 or not value.endswith('"'):
        raise KeyFormatError("the quoted key has no closing quote")
    out: list[str] = []
    chars = iter(value[1:-1])
    for ch in chars:
        if ch == "\\":
            escaped = next(chars, None)
            if escaped not in ('"', "\\"):
                raise KeyFormatError("the quoted key has an invalid escape")
            out.append(escaped)
        elif ch == '"':
            raise KeyFormatError("the quoted key has an unescaped quote inside")
        else:
            out.append(ch)
    return "".join(out)


def parse_key(values: list[str], *, header: bool = True) -> str:
    """Return the key carried by the header lines ``values`` (all lines with the header's name).

    Raises :class:`KeyFormatError` for two or more lines (given apart, or joined by the server with a comma),
    an empty or over-long key, characters outside 0x21-0x7E, a comma, or a broken sf-string. ``header=False``
    (a ``key=`` callable's value): no whitespace around it is dropped, so ``"k "`` is refused, never ``"k"``.
    """
    if len(values) != 1:
        raise KeyFormatError("the key header must appear exactly once")
    if "," in values[0]:
        # Before unquoting: a comma joins two lines whatever their spelling (``a,b``, ``"a","b"``), and the
        # content of an sf-string obeys the bare key's rule, so ``"a,b"`` is refused too.
        raise KeyFormatError(_COMMA)
    # Optional whitespace around a field value is not part of it (RFC 9110 section 5.5).
    value = values[0].strip(" \t") if header else values[0]
    if value.startswith('"'):
        value = _unquote_sf_string(value)
    if not value:
        raise KeyFormatError("the key is empty")
    if len(value) > MAX_KEY_LENGTH:
        raise KeyFormatError(f"the key is longer than {MAX_KEY_LENGTH} characters")
    if not _is_visible_ascii(value):
        raise KeyFormatError("the key may only contain visible ASCII characters (0x21-0x7E)")
    return value
