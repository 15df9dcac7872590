"""Logging: one line per event, with its time (UTC) and level.

``create_app`` calls :func:`configure_logging`. Like ``logging.basicConfig`` it leaves an already configured
root logger alone (gunicorn's ``--log-config``, a test runner, an app embedding the example): only when nobody
set up logging does it add one handler to the root, so the app's, the layer's (``flask_idempotent``) and
werkzeug's lines all come out the same way. ``LOG_LEVEL`` (default ``INFO``) sets the level.

A failure is one line: the exception's type and first line of its message come after the message. Tracebacks
(with SQLAlchemy's statement and parameters, and chained causes: ~150 lines for a lost database) are only written
when the level is ``DEBUG``.
"""

from __future__ import annotations

import logging
import time

from flask import Flask
from flask.logging import default_handler

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class OneLineFormatter(logging.Formatter):
    """``2026-01-31T12:00:00.123Z ERROR flask_idempotent: message [OperationalError: first line]``.

    Newlines inside a message are escaped, so every event is exactly one line. With ``tracebacks=True`` (the
    ``DEBUG`` level) the traceback follows on the next lines, as Python's default formatter writes it.
    """

    def converter(self, secs: float | None) -> time.struct_time:
        return time.gmtime(secs)  # UTC, whatever the server's time zone

    default_time_format = "%Y-%m-%dT%H:%M:%S"
    default_msec_format = "%s.%03dZ"

    def __init__(self, *, tracebacks: bool = False) -> None:
        super().__init__(LOG_FORMAT)
        self.tracebacks = tracebacks

    def format(self, record: logging.LogRecord) -> str:
        line = super().formatMessage(self._prepared(record)).replace("\r", "").replace("\n", " \\n ")
        if record.exc_info and record.exc_info[1] is not None:
            exc = record.exc_info[1]
            if self.tracebacks:
                return f"{line}\n{self.formatException(record.exc_info)}"
            first = (str(exc).strip().splitlines() or [""])[0][:300]
            line = f"{line} [{type(exc).__name__}: {first}]" if first else f"{line} [{type(exc).__name__}]"
        if record.stack_info and self.tracebacks:
            line = f"{line}\n{self.formatStack(record.stack_info)}"
        return line

    def _prepared(self, record: logging.LogRecord) -> logging.LogRecord:
        record.message = record.getMessage()
        record.asctime = self.formatTime(record, self.datefmt)
        return record


def configure_logging(app: Flask) -> logging.Handler | None:
    """Set up one-line logging unless the root logger is already configured; return the handler it added."""
    level = logging.getLevelName(str(app.config.get("LOG_LEVEL", "INFO")).upper())
    if not isinstance(level, int):
        level = logging.INFO
    root = logging.getLogger()
    # Flask's own handler on app.logger would write the app's lines a second time, in its multi-line format.
    app.logger.removeHandler(default_handler)
    if root.handlers:
        return None  # someone configured logging: theirs wins (like logging.basicConfig)
    handler = logging.StreamHandler()
    handler.setFormatter(OneLineFormatter(tracebacks=level <= logging.DEBUG))
    root.addHandler(handler)
    root.setLevel(level)
    return handler
