"""Parsing the ``Idempotency-Key`` header.

Two spellings name the same key: a bare token (``abc``) and an RFC 8941 sf-string (``"abc"``). The key itself
is 1..255 visible ASCII characters (0x21-0x7E) in either spelling.
"""

from __future__ import annotations

MAX_KEY_LENGTH = 255


class KeyFormatError(ValueError):
    """The header value is not a valid key; the message says why (shown in the 400 ``invalid-key`` problem)."""


def _is_visible_ascii(text: str) -> bool:
    return all("\x21" <= ch <= "\x7e" for ch in text)


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


def parse_key(values: list[str]) -> str:
    """Return the key carried by the header lines ``values`` (all lines with the header's name).

    Raises :class:`KeyFormatError` for two or more lines, an empty or over-long key, characters outside
    0x21-0x7E, or a broken sf-string.
    """
    if len(values) != 1:
        raise KeyFormatError("the key header must appear exactly once")
    # Optional whitespace around a field value is not part of it (RFC 9110 section 5.5).
    value = values[0].strip(" \t")
    if value.startswith('"'):
        value = _unquote_sf_string(value)
    if not value:
        raise KeyFormatError("the key is empty")
    if len(value) > MAX_KEY_LENGTH:
        raise KeyFormatError(f"the key is longer than {MAX_KEY_LENGTH} characters")
    if not _is_visible_ascii(value):
        raise KeyFormatError("the key may only contain visible ASCII characters (0x21-0x7E)")
    return value
