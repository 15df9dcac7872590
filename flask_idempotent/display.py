"""Stored text as operators see it: every character visible, none sent raw to a terminal or a page.

A record's key, scope, path, summary, error and event details hold whatever a client sent (``%1B`` in a path
decodes to ESC). Printed raw, ESC, BEL or CR would let a client retitle an operator's terminal or overwrite the
line above; an invisible character makes two different keys look the same. :func:`visible` writes each such
character as an escape (``\\x1b``, ``\\r``, ``\\u202e``): C0 and C1 control characters, DEL, and the Unicode
format characters (bidirectional overrides, zero-width spaces). The CLI's text output and the dashboard show
stored text through it; ``--json`` escapes by itself.

Times are UTC (the tables store naive UTC): :func:`iso_time` gives ISO 8601 with ``Z``.
"""

from __future__ import annotations

import json
import unicodedata
from datetime import date, datetime
from typing import Any

__all__ = ["EVENT_WORDS", "event_words", "iso_time", "json_text", "visible"]

_HIDDEN = frozenset({"Cc", "Cf", "Zl", "Zp", "Cs"})
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape(char: str) -> str:
    if char in _NAMED:
        return _NAMED[char]
    code = ord(char)
    return f"\\x{code:02x}" if code <= 0xFF else f"\\u{code:04x}" if code <= 0xFFFF else f"\\U{code:08x}"


def _hidden(char: str) -> bool:
    """A control (Cc: C0, DEL, C1), format (Cf: bidi overrides, zero-width space), line or paragraph separator
    (Zl, Zp), or a lone surrogate (Cs: no terminal can even be sent one)."""
    return unicodedata.category(char) in _HIDDEN


def visible(value: Any, *, lines: bool = False) -> str:
    """``value`` as text with every control and format character escaped (``"a\\x1b]0;x\\x07"`` shows as
    ``a\\x1b]0;x\\x07``); ``None`` is ``""``. With ``lines``, newlines and tabs stay (a multi-line error on the
    record page), CR does not."""
    if value is None:
        return ""
    text = value if isinstance(value, str) else str(value)
    if text.isprintable():  # the common case: nothing to do (isprintable is False for every Cc and Cf)
        return text
    return "".join(_escape(char) if _hidden(char) and not (lines and char in "\n\t") else char for char in text)


def iso_time(value: datetime | date) -> str:
    """A stored time (naive UTC) as ISO 8601 with its zone: ``2026-12-08T01:24:18.037000Z``."""
    if isinstance(value, datetime):
        if value.tzinfo is None:
            return value.isoformat() + "Z"
        return value.isoformat()
    return value.isoformat()


def json_text(value: Any) -> str:
    """Compact JSON for one line of text output (recovery data, event details), escaped like :func:`visible`.

    ``ensure_ascii=False`` keeps names readable; JSON itself escapes C0 controls, :func:`visible` the rest.
    """
    return visible(json.dumps(value, sort_keys=True, ensure_ascii=False, default=_default, separators=(", ", ": ")))


def _default(value: Any) -> Any:
    if isinstance(value, (datetime, date)):
        return iso_time(value)
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    raise TypeError(f"cannot serialize {type(value).__name__}")


#: Event kinds in words (``idempotency_events.kind``): the dashboard's timeline and ``flask idempotency show``.
EVENT_WORDS = {
    "conflict": "key reused with another request (answered 422)",
    "in_progress_hit": "retried while in progress (answered 409 or 202)",
    "stale_hit": "retried while stuck (answered 409 stuck)",
    "takeover": "a new attempt took over the expired lease",
    "checkpoint": "reached a recovery point",
    "mark_retryable": "marked retryable",
    "mark_failed": "marked failed (final)",
    "acknowledge": "acknowledged",
    "release": "released",
    "replays": "replays counted",
}


def event_words(kind: str) -> str:
    """``"stale_hit"`` → ``"retried while stuck (answered 409 stuck)"``; an unknown kind as it is, escaped."""
    return EVENT_WORDS.get(kind) or visible(kind).replace("_", " ")
