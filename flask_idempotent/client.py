"""HTTP clients that use idempotency keys the way the server expects: one key per logical call, reused on retry.

``import flask_idempotent`` never imports this module, and this module needs neither client library to import:
install the ``[client]`` extra (``requests`` and ``httpx``) or just the library you use.

- :class:`IdempotentSession` is a :class:`requests.Session`;
- :class:`IdempotentTransport` wraps an :class:`httpx.BaseTransport` (``httpx.Client(transport=...)``), and
  :class:`AsyncIdempotentTransport` an :class:`httpx.AsyncBaseTransport` (``httpx.AsyncClient``).

What they do with an **unsafe** request (POST, PUT, PATCH, DELETE):

- It carries one ``Idempotency-Key`` per logical call: the caller's, if the request has that header, else a
  fresh ``uuid4``. Every retry of the call sends the same key (and the same body), so the server runs the
  command at most once and answers a retry from its record.
- It is retried when the answer is unknown or says "not yet": a lost connection (refused, reset, closed
  before the response came, a timeout waiting for it), ``409`` whose problem ``type`` ends with
  ``in-progress`` (the first attempt is still running), and ``503`` (the store is unavailable, a transient
  error). ``Retry-After`` (seconds, or an HTTP date) is honoured: the next attempt is never sooner.
- Anything else is the final answer and is returned at once: ``400`` (a malformed key), ``422`` (the key was
  used for another command), ``409 stuck`` (an operator must decide), ``202`` (an ``in-progress`` the server is
  configured to answer with 202: the caller asked for asynchronous work), and every other status.
- Retries are bounded: at most ``attempts`` attempts, waits of exponential backoff with jitter (before retry
  *n*, a random time between half and all of ``min(max_backoff, backoff * 2 ** (n - 1))``, or ``Retry-After``
  if that is longer), and a total ``deadline`` in seconds for the whole call: each attempt's timeouts are
  capped by the time left, and a retry that could not start before the deadline is not made. When retries run
  out, the caller gets the last answer: the last response (``409``/``503``) or the last connection error,
  raised as the library raises it.

Safe methods (GET, HEAD, OPTIONS, ...) pass through untouched: no key is added and nothing is retried.

:func:`was_replayed` says whether a response is the server's replay of an earlier outcome
(``Idempotent-Replayed: true``): after a lost connection, the original answer arrives as a replay.
:func:`sent_key` returns the key a response's request carried.

A followed redirect that keeps an unsafe method (``307``/``308``, or ``301``/``302`` for a PUT) is another
command at another address: it is sent with a key of its own, :func:`redirect_key` of the key the redirected
request carried and the new URL, so every retry of the call derives the same key for the same hop (and the
server at the new address never sees the old key with its new command, which would be ``422 key-reused``).

``Retry-After`` is read as RFC 9110 writes it: ASCII digits (delay-seconds) or an HTTP date; any other value
is ignored. A ``Retry-After`` longer than ``max_retry_after`` (default 60 s), like one that would end past the
deadline, is not waited for: the call ends with that answer.

A body the library cannot send twice (a generator) is read into memory once, before the first attempt, so
that every attempt sends the same bytes; a file body is rewound (``requests``) or re-read (``httpx``
multipart). A file body that cannot be rewound (a pipe, a socket) is refused before anything is sent
(``requests.exceptions.UnrewindableBodyError``), unless retries are off (``attempts=1``). With ``requests``'
``stream=True``, only failures before the response headers are retried.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import random
import ssl
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from .constants import REPLAYED_HEADER, UNSAFE_METHODS

try:
    import requests
    import requests.utils
except ModuleNotFoundError:  # the [client] extra is not installed: IdempotentSession says so when used
    HAVE_REQUESTS = False
else:
    HAVE_REQUESTS = True

try:
    import httpx
except ModuleNotFoundError:  # the [client] extra is not installed: the transports say so when used
    HAVE_HTTPX = False
else:
    HAVE_HTTPX = True

__all__ = [
    "DEFAULT_ATTEMPTS",
    "DEFAULT_BACKOFF",
    "DEFAULT_DEADLINE",
    "DEFAULT_MAX_BACKOFF",
    "DEFAULT_MAX_RETRY_AFTER",
    "KEY_HEADER",
    "UNSAFE_METHODS",
    "AsyncIdempotentTransport",
    "IdempotentSession",
    "IdempotentTransport",
    "RetryPolicy",
    "redirect_key",
    "sent_key",
    "was_replayed",
]

logger = logging.getLogger(__name__)

#: The header that carries the key (``key_header=`` changes it).
KEY_HEADER = "Idempotency-Key"
#: How many attempts a call makes at most, the first included.
DEFAULT_ATTEMPTS = 5
#: Seconds for the whole call, retries and waits included.
DEFAULT_DEADLINE = 60.0
#: Seconds: the base of the exponential backoff.
DEFAULT_BACKOFF = 0.5
#: Seconds: the longest wait between two attempts (a longer ``Retry-After`` still wins).
DEFAULT_MAX_BACKOFF = 10.0
#: Seconds: the longest ``Retry-After`` waited for; a longer one ends the call with that answer.
DEFAULT_MAX_RETRY_AFTER = 60.0
#: Statuses whose ``Location`` a client follows; a followed one that keeps an unsafe method gets its own key.
_REDIRECTS = frozenset({301, 302, 303, 307, 308})
#: A 409 body larger than this is not a problem document of the layer's: it is not parsed, and not retried.
_MAX_PROBLEM_BYTES = 64 * 1024

R = TypeVar("R")


class _HasHeaders(Protocol):
    @property
    def headers(self) -> Mapping[str, str]: ...


class _HasRequest(Protocol):
    @property
    def request(self) -> _HasHeaders: ...


def was_replayed(response: _HasHeaders) -> bool:
    """Whether ``response`` (``requests`` or ``httpx``) replays a stored outcome (``Idempotent-Replayed: true``).

    After a lost connection the server had already run the command: the answer to the retry is the original
    outcome, replayed. ``False`` means this attempt's request ran the view (or was answered without a record).
    """
    return response.headers.get(REPLAYED_HEADER, "").strip().lower() == "true"


def sent_key(response: _HasRequest, header: str = KEY_HEADER) -> str | None:
    """The idempotency key the request of ``response`` carried (``None`` for a request without one)."""
    return response.request.headers.get(header)


@dataclass(frozen=True)
class RetryPolicy:
    """How long and how often a logical call is retried; the clients' keyword arguments build one.

    ``attempts`` (int >= 1, default 5) counts the first attempt; ``deadline`` (seconds > 0, default 60) bounds
    the whole call, waits and attempts; ``backoff`` (seconds >= 0, default 0.5) and ``max_backoff`` (default 10)
    shape the exponential backoff; ``max_retry_after`` (seconds >= 0, default 60) is the longest ``Retry-After``
    waited for (a longer one ends the call with that answer); ``key_header`` names the key's header (default
    ``Idempotency-Key``).
    Bad values are a ``ValueError`` (a ``TypeError`` for a non-number) when the policy is made.
    """

    attempts: int = DEFAULT_ATTEMPTS
    deadline: float = DEFAULT_DEADLINE
    backoff: float = DEFAULT_BACKOFF
    max_backoff: float = DEFAULT_MAX_BACKOFF
    key_header: str = KEY_HEADER
    max_retry_after: float = DEFAULT_MAX_RETRY_AFTER

    def __post_init__(self) -> None:
        if isinstance(self.attempts, bool) or not isinstance(self.attempts, int):
            raise TypeError(f"attempts must be an int, not {type(self.attempts).__name__}")
        if self.attempts < 1:
            raise ValueError(f"attempts must be at least 1 (the first attempt counts), not {self.attempts}")
        for name in ("deadline", "backoff", "max_backoff", "max_retry_after"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"{name} must be a number of seconds, not {type(value).__name__}")
            if not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number of seconds, not {value}")
        if self.deadline <= 0:
            raise ValueError(f"deadline must be a positive number of seconds, not {self.deadline}")
        if self.backoff < 0 or self.max_backoff < 0 or self.max_retry_after < 0:
            raise ValueError("backoff, max_backoff and max_retry_after must not be negative")
        if not isinstance(self.key_header, str) or not self.key_header or not self.key_header.isascii():
            raise ValueError(f"key_header must be a non-empty ASCII header name, not {self.key_header!r}")

    def delay(self, retry: int, retry_after: float | None = None) -> float:
        """The wait before retry number ``retry`` (1 for the second attempt): jittered backoff or Retry-After."""
        cap = min(self.max_backoff, self.backoff * 2 ** (retry - 1))
        wait = random.uniform(cap / 2, cap)
        return wait if retry_after is None else max(wait, retry_after)


def new_key() -> str:
    """A fresh key for one logical call: a random UUID (36 visible ASCII characters)."""
    return str(uuid.uuid4())


def redirect_key(key: str, url: str) -> str:
    """The key a followed redirect to ``url`` is sent with, when the redirected request carried ``key``.

    A UUID (version 5) of both: another command gets another key, and every retry of the call derives the same
    one for the same hop, so the server at the new address replays it like any retry.
    """
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"{key} {url}"))


def retry_after_seconds(value: str | None, now: datetime | None = None) -> float | None:
    """``Retry-After`` in seconds from now: delay-seconds or an HTTP date; ``None`` if absent or unreadable.

    Only what RFC 9110 allows is read: ASCII digits, or an HTTP date. Anything else (``²``, ``-1``, ``1.5``, a
    date out of range) is ignored, never an exception.
    """
    if value is None:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return max(0.0, (when - (now or datetime.now(timezone.utc))).total_seconds())


def problem_code(body: bytes) -> str | None:
    """The ``type`` of a problem document (RFC 9457) in ``body``, or ``None`` if it is not one."""
    if len(body) > _MAX_PROBLEM_BYTES:
        return None
    try:
        document = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None
    kind = document.get("type") if isinstance(document, dict) else None
    return kind if isinstance(kind, str) else None


@dataclass(frozen=True)
class _Verdict:
    retry: bool
    retry_after: float | None = None
    reason: str = ""


_FINAL = _Verdict(False)


def _judge(status: int, headers: Mapping[str, str], body: Callable[[], bytes]) -> _Verdict:
    """Whether an answer is worth another attempt: 503, or 409 ``in-progress``; nothing else."""
    if status == 503:
        return _Verdict(True, retry_after_seconds(headers.get("Retry-After")), "503")
    if status == 409:
        code = problem_code(body())
        if code is not None and code.endswith("in-progress"):
            return _Verdict(True, retry_after_seconds(headers.get("Retry-After")), "409 in-progress")
    return _FINAL


def _certificate_problem(exc: BaseException) -> bool:
    """A TLS failure (a bad certificate) is not a lost connection: another attempt fails the same way."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, ssl.SSLError):
            return True
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return False


class _Call:
    """One logical call's clock and attempt count; decides whether (and after how long) to try again."""

    def __init__(self, policy: RetryPolicy, method: str, url: str) -> None:
        self.policy = policy
        self.what = f"{method} {url}"
        self.ends = time.monotonic() + policy.deadline
        self.attempt = 0

    def remaining(self) -> float:
        return max(0.0, self.ends - time.monotonic())

    def next_wait(self, retry_after: float | None, reason: str) -> float | None:
        """The wait before the next attempt, or ``None`` when attempts or the deadline have run out."""
        if self.attempt >= self.policy.attempts:
            logger.warning("%s: giving up after %d attempts (%s)", self.what, self.attempt, reason)
            return None
        if retry_after is not None and retry_after > self.policy.max_retry_after:
            logger.warning(
                "%s: giving up after %d attempts (%s): Retry-After %.0f s is longer than max_retry_after (%.1f s)",
                self.what,
                self.attempt,
                reason,
                retry_after,
                self.policy.max_retry_after,
            )
            return None
        wait = self.policy.delay(self.attempt, retry_after)
        if wait >= self.remaining():
            logger.warning(
                "%s: giving up after %d attempts (%s): the next one would start past the %.1f s deadline",
                self.what,
                self.attempt,
                reason,
                self.policy.deadline,
            )
            return None
        logger.info(
            "%s: attempt %d of %d in %.2f s (%s)", self.what, self.attempt + 1, self.policy.attempts, wait, reason
        )
        return wait


def _run(call: _Call, attempt: Callable[[], tuple[R, _Verdict]], lost: Callable[[BaseException], bool]) -> R:
    """Make attempts until one is final, or attempts or the deadline run out (then the last answer stands)."""
    while True:
        call.attempt += 1
        try:
            answer, verdict = attempt()
        except Exception as exc:
            if not lost(exc):
                raise
            wait = call.next_wait(None, f"connection lost: {type(exc).__name__}")
            if wait is None:
                raise
        else:
            if not verdict.retry:
                return answer
            wait = call.next_wait(verdict.retry_after, verdict.reason)
            if wait is None:
                return answer
            _close(answer)
        time.sleep(wait)


async def _run_async(
    call: _Call, attempt: Callable[[], Awaitable[tuple[R, _Verdict]]], lost: Callable[[BaseException], bool]
) -> R:
    """:func:`_run` for ``async`` attempts."""
    while True:
        call.attempt += 1
        try:
            answer, verdict = await attempt()
        except Exception as exc:
            if not lost(exc):
                raise
            wait = call.next_wait(None, f"connection lost: {type(exc).__name__}")
            if wait is None:
                raise
        else:
            if not verdict.retry:
                return answer
            wait = call.next_wait(verdict.retry_after, verdict.reason)
            if wait is None:
                return answer
            aclose = getattr(answer, "aclose", None)
            if aclose is not None:
                await aclose()
        await asyncio.sleep(wait)


def _close(answer: object) -> None:
    close = getattr(answer, "close", None)
    if close is not None:
        close()


def _missing(library: str, name: str) -> ModuleNotFoundError:
    return ModuleNotFoundError(
        f"flask_idempotent.client.{name} needs {library}: pip install 'flask-idempotency[client]' (or {library})"
    )


# requests -----------------------------------------------------------------------------------------------------

if TYPE_CHECKING or HAVE_REQUESTS:

    def _requests_lost(exc: BaseException) -> bool:
        if isinstance(exc, requests.exceptions.SSLError) or _certificate_problem(exc):
            return False
        return isinstance(exc, (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError))

    def _cap_timeout(timeout: Any, remaining: float) -> Any:
        """The caller's ``timeout`` (None, seconds, or a (connect, read) pair), capped by the time left."""
        remaining = max(remaining, 0.001)
        if timeout is None:
            return remaining
        if isinstance(timeout, (int, float)):
            return min(float(timeout), remaining)
        if isinstance(timeout, tuple) and len(timeout) == 2:
            return tuple(remaining if part is None else min(float(part), remaining) for part in timeout)
        return timeout  # a urllib3 Timeout object: the caller's choice, left as it is

    class IdempotentSession(requests.Session):
        """A :class:`requests.Session` whose unsafe requests carry one idempotency key per call and are retried.

        ``IdempotentSession(attempts=5, deadline=60.0, backoff=0.5, max_backoff=10.0, key_header=
        "Idempotency-Key", max_retry_after=60.0)``: see :class:`RetryPolicy` and the module's documentation for
        what is retried. A logical call is one ``session.post(...)`` (``request``/``send``): a redirect it follows
        belongs to it (a retry starts again from the first URL, with the same key); a followed redirect that keeps
        an unsafe method is sent with :func:`redirect_key` of the redirected request's key and the new URL. A key
        set in ``session.headers`` would be shared by every call: pass a caller's key per call, in that call's
        ``headers``.
        """

        def __init__(
            self,
            *,
            attempts: int = DEFAULT_ATTEMPTS,
            deadline: float = DEFAULT_DEADLINE,
            backoff: float = DEFAULT_BACKOFF,
            max_backoff: float = DEFAULT_MAX_BACKOFF,
            key_header: str = KEY_HEADER,
            max_retry_after: float = DEFAULT_MAX_RETRY_AFTER,
        ) -> None:
            self.policy = RetryPolicy(attempts, deadline, backoff, max_backoff, key_header, max_retry_after)
            super().__init__()

        __attrs__ = [*requests.Session.__attrs__, "policy"]  # what pickling keeps

        @property
        def _calls(self) -> threading.local:
            """The depth of our own ``send()`` on this thread: a redirect it follows re-enters it."""
            calls: threading.local = self.__dict__.setdefault("_calls_local", threading.local())
            return calls

        def send(self, request: requests.PreparedRequest, **kwargs: Any) -> requests.Response:
            """Send ``request``; an unsafe one gets a key (unless it has one) and retries, safe ones pass through."""
            depth: int = getattr(self._calls, "depth", 0)
            if (request.method or "").upper() not in UNSAFE_METHODS:
                return super().send(request, **kwargs)
            header = self.policy.key_header
            if depth:
                # A redirect this call follows (our own send() re-entered by resolve_redirects): another
                # command, so its own key, derived from the redirected request's key and the new URL.
                key = request.headers.get(header)
                if key is not None:
                    request = request.copy()
                    request.headers[header] = redirect_key(key, request.url or "")
                return super().send(request, **kwargs)
            request = request.copy()
            if header not in request.headers:
                request.headers[header] = new_key()
            rewind = _replayable_body(request, retries=self.policy.attempts > 1)
            call = _Call(self.policy, request.method or "", request.url or "")
            timeout = kwargs.pop("timeout", None)
            send_once = super().send

            def attempt() -> tuple[requests.Response, _Verdict]:
                if call.attempt > 1:
                    rewind()
                response = send_once(request, timeout=_cap_timeout(timeout, call.remaining()), **kwargs)
                return response, _judge(response.status_code, response.headers, lambda: response.content)

            self._calls.depth = depth + 1
            try:
                return _run(call, attempt, _requests_lost)
            finally:
                self._calls.depth = depth

    def _replayable_body(request: requests.PreparedRequest, *, retries: bool) -> Callable[[], None]:
        """Make the body sendable again; return what to do before each retry (rewind a file body).

        A file body that cannot be rewound (a pipe: ``tell()`` fails, or it is not seekable) is refused before
        anything is sent, unless there are no retries: a retry could not send it again.
        """
        body: Any = request.body
        if body is None or isinstance(body, (bytes, str)):
            return lambda: None
        if hasattr(body, "read"):
            position = getattr(request, "_body_position", None)
            seekable = getattr(body, "seekable", None)
            if isinstance(position, int) and (seekable is None or seekable()):
                return lambda: requests.utils.rewind_body(request)
            if retries:
                raise requests.exceptions.UnrewindableBodyError(
                    f"the body of {request.method} {request.url} is a file that cannot be rewound (a pipe or a"
                    " socket), so a retry could not send it again: nothing was sent. Pass bytes or a seekable file,"
                    " or make the session with attempts=1 to send it once without retries."
                )
            return lambda: None
        # A generator or another one-shot iterable: read it once, send the same bytes every time.
        data = b"".join(chunk.encode() if isinstance(chunk, str) else bytes(chunk) for chunk in body)
        request.headers.pop("Transfer-Encoding", None)
        request.body = data
        request.prepare_content_length(data)
        return lambda: None

else:

    class IdempotentSession:  # pragma: no cover - exercised only without requests installed
        """Needs ``requests``: ``pip install 'flask-idempotency[client]'``."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            raise _missing("requests", "IdempotentSession")


# httpx --------------------------------------------------------------------------------------------------------

if TYPE_CHECKING or HAVE_HTTPX:

    def _httpx_lost(exc: BaseException) -> bool:
        if _certificate_problem(exc):
            return False
        return isinstance(exc, (httpx.TimeoutException, httpx.NetworkError, httpx.RemoteProtocolError))

    class _Redirects:
        """The redirects a transport answered to unsafe requests, so that it knows the request following one.

        httpx follows a redirect with a new request through the transport, carrying the redirected request's
        headers (its key among them). A request whose key and URL match a redirect answered before is that
        hop: it gets :func:`redirect_key` instead. Bounded: the oldest entries go first.
        """

        LIMIT = 1024

        def __init__(self) -> None:
            self._pending: dict[tuple[str, str], None] = {}
            self._lock = threading.Lock()

        def answered(self, request: httpx.Request, response: httpx.Response, header: str) -> None:
            key, location = request.headers.get(header), response.headers.get("Location")
            if response.status_code not in _REDIRECTS or key is None or location is None:
                return
            try:
                target = str(request.url.join(location).copy_with(fragment=None))
            except (httpx.InvalidURL, ValueError):
                return
            with self._lock:
                self._pending[(key, target)] = None
                while len(self._pending) > self.LIMIT:
                    del self._pending[next(iter(self._pending))]

        def rekey(self, request: httpx.Request, header: str) -> None:
            key = request.headers.get(header)
            if key is None:
                return
            entry = (key, str(request.url.copy_with(fragment=None)))
            with self._lock:
                followed = entry in self._pending
                if followed:
                    del self._pending[entry]
            if followed:
                request.headers[header] = redirect_key(key, entry[1])

    def _add_key(request: httpx.Request, policy: RetryPolicy, redirects: _Redirects) -> None:
        if policy.key_header not in request.headers:
            request.headers[policy.key_header] = new_key()
        else:
            redirects.rekey(request, policy.key_header)

    def _one_shot(request: httpx.Request) -> bool:
        """Whether the body is a one-shot stream (a generator), to be read once so every attempt sends it.

        A bytes body is a ``ByteStream``; httpx's multipart stream re-reads (and rewinds) its files on every
        iteration, so both can be sent again as they are.
        """
        return not isinstance(request.stream, httpx.ByteStream) and type(request.stream).__name__ != "MultipartStream"

    def _with_timeouts(request: httpx.Request, remaining: float) -> None:
        """Cap each of the request's timeouts (connect, read, write, pool) by the time left."""
        remaining = max(remaining, 0.001)
        timeouts = dict(request.extensions.get("timeout") or {})
        for name in ("connect", "read", "write", "pool"):
            value = timeouts.get(name)
            timeouts[name] = remaining if value is None else min(float(value), remaining)
        request.extensions = {**request.extensions, "timeout": timeouts}

    def _rebuilt(response: httpx.Response, raw: bytes) -> tuple[httpx.Response, _Verdict]:
        """A fresh response over the already-read ``raw`` body, and whether its answer is worth a retry."""
        fresh = httpx.Response(
            response.status_code, headers=response.headers, stream=httpx.ByteStream(raw), extensions=response.extensions
        )

        def decoded() -> bytes:
            probe = httpx.Response(response.status_code, headers=response.headers, stream=httpx.ByteStream(raw))
            try:
                return probe.read()
            except httpx.DecodingError:
                return b""

        return fresh, _judge(response.status_code, response.headers, decoded)

    class IdempotentTransport(httpx.BaseTransport):
        """An httpx transport adding one idempotency key per unsafe request and retrying it (sync).

        ``httpx.Client(transport=IdempotentTransport())`` wraps a fresh ``httpx.HTTPTransport()``; pass
        ``transport=`` to wrap another one. The options are :class:`RetryPolicy`'s. A logical call is one
        request through the transport; each redirect httpx follows is a request of its own, sent with
        :func:`redirect_key` of the redirected request's key and its URL (another address, another command).
        The deadline caps each attempt's connect/read/write/pool timeouts.
        """

        def __init__(
            self,
            transport: httpx.BaseTransport | None = None,
            *,
            attempts: int = DEFAULT_ATTEMPTS,
            deadline: float = DEFAULT_DEADLINE,
            backoff: float = DEFAULT_BACKOFF,
            max_backoff: float = DEFAULT_MAX_BACKOFF,
            key_header: str = KEY_HEADER,
            max_retry_after: float = DEFAULT_MAX_RETRY_AFTER,
        ) -> None:
            self.policy = RetryPolicy(attempts, deadline, backoff, max_backoff, key_header, max_retry_after)
            self.transport = transport if transport is not None else httpx.HTTPTransport()
            self._redirects = _Redirects()

        def handle_request(self, request: httpx.Request) -> httpx.Response:
            if request.method.upper() not in UNSAFE_METHODS:
                return self.transport.handle_request(request)
            _add_key(request, self.policy, self._redirects)
            if _one_shot(request):
                request.read()
            call = _Call(self.policy, request.method, str(request.url))

            def attempt() -> tuple[httpx.Response, _Verdict]:
                _with_timeouts(request, call.remaining())
                response = self.transport.handle_request(request)
                if response.status_code != 409:  # only a 409's body decides: no need to read another
                    return response, _judge(response.status_code, response.headers, lambda: b"")
                try:
                    raw = b"".join(response.iter_raw())
                finally:
                    response.close()
                return _rebuilt(response, raw)

            response = _run(call, attempt, _httpx_lost)
            self._redirects.answered(request, response, self.policy.key_header)
            return response

        def close(self) -> None:
            self.transport.close()

    class AsyncIdempotentTransport(httpx.AsyncBaseTransport):
        """:class:`IdempotentTransport` for ``httpx.AsyncClient``; wraps ``httpx.AsyncHTTPTransport()`` by default.

        Waits between attempts are ``asyncio.sleep``: other tasks run meanwhile.
        """

        def __init__(
            self,
            transport: httpx.AsyncBaseTransport | None = None,
            *,
            attempts: int = DEFAULT_ATTEMPTS,
            deadline: float = DEFAULT_DEADLINE,
            backoff: float = DEFAULT_BACKOFF,
            max_backoff: float = DEFAULT_MAX_BACKOFF,
            key_header: str = KEY_HEADER,
            max_retry_after: float = DEFAULT_MAX_RETRY_AFTER,
        ) -> None:
            self.policy = RetryPolicy(attempts, deadline, backoff, max_backoff, key_header, max_retry_after)
            self.transport = transport if transport is not None else httpx.AsyncHTTPTransport()
            self._redirects = _Redirects()

        async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
            if request.method.upper() not in UNSAFE_METHODS:
                return await self.transport.handle_async_request(request)
            _add_key(request, self.policy, self._redirects)
            if _one_shot(request):
                await request.aread()
            call = _Call(self.policy, request.method, str(request.url))

            async def attempt() -> tuple[httpx.Response, _Verdict]:
                _with_timeouts(request, call.remaining())
                response = await self.transport.handle_async_request(request)
                if response.status_code != 409:  # only a 409's body decides: no need to read another
                    return response, _judge(response.status_code, response.headers, lambda: b"")
                try:
                    raw = b"".join([chunk async for chunk in response.aiter_raw()])
                finally:
                    await response.aclose()
                return _rebuilt(response, raw)

            response = await _run_async(call, attempt, _httpx_lost)
            self._redirects.answered(request, response, self.policy.key_header)
            return response

        async def aclose(self) -> None:
            await self.transport.aclose()

else:

    class IdempotentTransport:  # pragma: no cover - exercised only without httpx installed
        """Needs ``httpx``: ``pip install 'flask-idempotency[client]'``."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            raise _missing("httpx", "IdempotentTransport")

    class AsyncIdempotentTransport:  # pragma: no cover - exercised only without httpx installed
        """Needs ``httpx``: ``pip install 'flask-idempotency[client]'``."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            raise _missing("httpx", "AsyncIdempotentTransport")
