"""Errors the layer answers with: RFC 9457 ``application/problem+json``.

Each subclasses the matching werkzeug exception (``KeyReused`` is an ``UnprocessableEntity``, ``StoreUnavailable``
a ``ServiceUnavailable``, ...), so an app's handler for that status catches it, and an app can restyle any of
them with ``@app.errorhandler(KeyReused)``.
The problem ``type`` is ``IDEMPOTENCY_PROBLEM_TYPE_BASE`` + the code (``urn:flask-idempotent:problem:key-reused``
by default). With ``IDEMPOTENCY_DOCS_URL`` set, that URL wins: ``type`` is the documentation URL + the code, and
every problem response links to it with ``Link: <type>; rel="describedby"`` (docs/publishing.md).
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any
from urllib.parse import urlsplit

from flask import current_app, has_app_context
from werkzeug.exceptions import (
    BadRequest,
    Conflict,
    Gone,
    HTTPException,
    InternalServerError,
    RequestEntityTooLarge,
    ServiceUnavailable,
    UnprocessableEntity,
)
from werkzeug.sansio.response import Response as SansIOResponse
from werkzeug.wrappers import Response

from .constants import DEFAULTS, ConfigKey

PROBLEM_MEDIA_TYPE = "application/problem+json"


class IdempotencyError(HTTPException):
    """Base class of the layer's problem responses."""

    code = 400
    problem_code = "error"
    title = "Idempotency error"
    retry_after: datetime | int | None

    def __init__(self, detail: str | None = None, *, retry_after: int | None = None, status: int | None = None):
        super().__init__(description=detail or self.title)
        self.detail = detail or self.title
        self.args = (self.detail,)  # so that the message survives pickling (a Celery result backend, a log)
        self.retry_after = retry_after
        if status is not None:
            self.code = status

    @property
    def problem_type(self) -> str:
        return problem_type(self.problem_code)

    def problem(self) -> dict[str, Any]:
        """The problem details object (RFC 9457)."""
        return {"type": self.problem_type, "title": self.title, "status": self.code, "detail": self.detail}

    def get_response(self, environ: Any = None, scope: Any = None) -> SansIOResponse:  # type: ignore[override]
        response = Response(json.dumps(self.problem()), status=self.code, mimetype=PROBLEM_MEDIA_TYPE)
        if self.retry_after is not None:
            response.headers["Retry-After"] = str(self.retry_after)
        if _config(ConfigKey.DOCS_URL):
            response.headers["Link"] = f'<{self.problem_type}>; rel="describedby"'
        return response


def _config(name: str) -> Any:
    if has_app_context():
        return current_app.config.get(name, DEFAULTS[name])
    return DEFAULTS[name]


def problem_type(code: str) -> str:
    """The problem ``type`` URI of ``code`` (``missing-key``...) in the current app.

    ``IDEMPOTENCY_DOCS_URL`` + ``code`` when that is set, else ``IDEMPOTENCY_PROBLEM_TYPE_BASE`` + ``code``.
    """
    return f"{_config(ConfigKey.DOCS_URL) or _config(ConfigKey.PROBLEM_TYPE_BASE)}{code}"


#: Characters a URL cannot carry as they are inside ``Link: <...>`` (RFC 3986 excludes them; percent-encode them).
_NOT_IN_URL = frozenset('<>"{}|\\^`')


def _is_http_url(value: str) -> bool:
    if not all("\x21" <= ch <= "\x7e" and ch not in _NOT_IN_URL for ch in value):
        return False
    try:
        parts = urlsplit(value)
    except ValueError:  # an unclosed IPv6 bracket, say
        return False
    return parts.scheme in ("http", "https") and bool(parts.hostname)


def check_docs_url(value: object) -> str | None:
    """Validate an ``IDEMPOTENCY_DOCS_URL`` value (``init_app`` calls it); ``None`` or ``""`` means unset.

    It must be an absolute ``http(s)`` URL of visible ASCII characters, because it becomes the problem ``type``
    (RFC 9457 asks for an absolute URI) and the target of a ``Link`` header. The code is appended as it is, so
    the URL ends where a code can follow: ``https://example.com/docs/errors#`` or ``.../errors/``.
    Anything else raises ``ValueError`` naming the key.
    """
    if value is None or value == "":
        return None
    if not (isinstance(value, str) and _is_http_url(value)):
        raise ValueError(
            f"{ConfigKey.DOCS_URL} must be an absolute http(s) URL of visible ASCII characters (percent-encode the"
            f" rest), such as 'https://example.com/docs/errors#'; got {value!r}"
        )
    return value


class MissingKey(IdempotencyError, BadRequest):
    """400: the route requires an ``Idempotency-Key`` and the request has none. Nothing is stored."""

    code = 400
    problem_code = "missing-key"
    title = "Idempotency key required"


class InvalidKey(IdempotencyError, BadRequest):
    """400: the key is empty, too long, has characters outside 0x21-0x7E, repeats, or is a broken sf-string."""

    code = 400
    problem_code = "invalid-key"
    title = "Invalid idempotency key"


class BodyTooLargeToFingerprint(IdempotencyError, RequestEntityTooLarge):
    """413: the body exceeds ``IDEMPOTENCY_MAX_BODY_BYTES``; the view does not run and nothing is stored."""

    code = 413
    problem_code = "body-too-large"
    title = "Request body too large for an idempotent request"


class KeyReused(IdempotencyError, UnprocessableEntity):
    """422: the key was used before with a different command. The record is untouched; an event is stored."""

    code = 422
    problem_code = "key-reused"
    title = "Idempotency key reused with a different request"


class RequestInProgress(IdempotencyError, Conflict):
    """409 (or 202 when configured): a request with this key is still running. Retry after ``Retry-After``."""

    code = 409
    problem_code = "in-progress"
    title = "A request with this idempotency key is in progress"


class RecordStuck(IdempotencyError, Conflict):
    """409: the request with this key stopped without an outcome (lease expired). An operator decides."""

    code = 409
    problem_code = "stuck"
    title = "The request with this idempotency key did not finish"


class StoreUnavailable(IdempotencyError, ServiceUnavailable):
    """503: the record store cannot be reached; the view does not run (fail closed)."""

    code = 503
    problem_code = "store-unavailable"
    title = "Idempotency store unavailable"


class TransientError(IdempotencyError, ServiceUnavailable):
    """Raise from a view to say "this failed, and trying again is safe" (FAILED, retryable).

    Unhandled, it answers 503 ``transient-error`` with ``Retry-After``. Other exception types get the same
    treatment when listed in ``transient=``.
    """

    code = 503
    problem_code = "transient-error"
    title = "Temporary failure, retry later"

    def __init__(self, detail: str | None = None, *, retry_after: int | None = 1) -> None:
        super().__init__(detail, retry_after=retry_after)


class SchemaVersionError(RuntimeError):
    """The extension's tables are at an older schema version than this release needs.

    The message names the migration to run (docs: "Upgrading from schema version 1 to 2"); requests fail until it
    has run.
    """


class ConfigurationError(ValueError):
    """``init_app`` refuses the app's configuration; the message names the ``IDEMPOTENCY_*`` key to change, or,
    for a database the record store has no statements for, the supported dialects."""


class AtomicViewCommitted(RuntimeError):
    """An ``atomic=True`` view committed or rolled back ``db.session`` itself.

    The layer owns that transaction: it commits the view's writes together with the outcome. The request ends
    as a 500 and nothing of it is persisted.
    """


class LeaseLost(RuntimeError):
    """Raised by ``current_record.checkpoint`` when this request no longer owns its record.

    Another request took over after the lease expired, or an operator acted on the record; the view should
    stop, because its outcome will not be recorded.
    """


class CommitFailed(IdempotencyError, InternalServerError):
    """500: an atomic request's final commit was refused by the database (a constraint its writes break).

    Nothing of the request was written; the record is FAILED and retryable (a retry runs again, and fails the
    same way unless the conflicting data changed).
    """

    code = 500
    problem_code = "commit-failed"
    title = "The request's changes could not be committed"


class CommitConflict(IdempotencyError, ServiceUnavailable):
    """503: an atomic request's final commit lost a race with a concurrent transaction (a serialization failure
    under SERIALIZABLE, a deadlock, a Galera certification failure), and no other request holds its key.

    Nothing of the request was written and the key is free: retrying with the same key after ``Retry-After``
    runs it again. (When another request holds the key by then, the answer is that duplicate's: 409 or a
    replay.) Unlike ``commit-failed`` the retry is expected to succeed.
    """

    code = 503
    problem_code = "commit-conflict"
    title = "The request's changes conflicted with a concurrent transaction"


class ScopeError(IdempotencyError, InternalServerError):
    """500: the app's ``scope_loader`` raised, or returned something other than ``str``, ``int``, ``UUID`` or
    ``None``. Nothing is claimed and the view does not run; the log names the problem."""

    code = 500
    problem_code = "scope-error"
    title = "The idempotency scope could not be determined"


class ResourceGone(IdempotencyError, Gone):
    """410: the request with this key completed, but the resource its ``replay=`` callable rebuilds the
    response from is gone (the callable returned ``None`` or raised ``LookupError`` or ``NotFound``).

    The command is not run again; the original's allow-listed headers (such as ``Location``) come with it.
    """

    code = 410
    problem_code = "resource-gone"
    title = "The resource this request created is gone"


class RequestFailed(IdempotencyError, InternalServerError):
    """500: the request with this key failed for good and no response of it was stored.

    This is what a retry sees after an operator marked a stuck record failed (final): the outcome is known to
    be a failure, and the command must not run again under this key.
    """

    code = 500
    problem_code = "failed"
    title = "The request with this idempotency key failed"


class ResponseNotStored(IdempotencyError, InternalServerError):
    """500: the request with this key completed, but its response exceeded ``IDEMPOTENCY_MAX_RESPONSE_BYTES``.

    The layer never replays a truncated body and never runs the command again; the original's allow-listed
    headers (such as ``Location``) come with this problem so the client can fetch the result. Routes with large
    responses should store a resource reference (``replay=`` and ``current_record.set_resource``).
    """

    code = 500
    problem_code = "response-not-stored"
    title = "The original response was too large to replay"


def problem_class(code: str) -> type[IdempotencyError]:
    """The problem response class whose ``problem_code`` is ``code`` (as ``machine.ANSWERS`` names them)."""
    return _BY_CODE[code]


_BY_CODE = {cls.problem_code: cls for cls in (KeyReused, RecordStuck, RequestInProgress)}
