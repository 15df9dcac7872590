"""``@idempotent``: marks a view as protected and carries its options.

The enforcing happens in the extension's request hooks (docs: "Behaviour"); the decorator only registers
the options on the view and notes an exception the view raised, so the outcome can tell a transient error
from any other.
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Literal, TypeVar, overload

from flask import current_app, request

F = TypeVar("F", bound=Callable[..., Any])

OPTIONS_ATTRIBUTE = "_flask_idempotent_options"
# Per request, in the WSGI environ (an app context, and so ``g``, can outlive a request: tests push one).
_EXCEPTION_KEY = "flask_idempotent.view_exception"
_STARTED_KEY = "flask_idempotent.view_started"
_WATCHED_ATTRIBUTE = "_flask_idempotent_watched"
#: The functions ``@idempotent`` wrapped: if one of them is registered as a view itself, the decorator was
#: placed above the route decorator (see :func:`misplaced`).
_DECORATED: weakref.WeakSet[Callable[..., Any]] = weakref.WeakSet()


def seconds(name: str, value: float | timedelta | None) -> float | None:
    """Read a duration option: a non-negative number of seconds or a ``timedelta`` (``None`` passes)."""
    if value is None:
        return None
    if isinstance(value, timedelta):
        value = value.total_seconds()
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise ValueError(f"{name} must be a non-negative number of seconds or a timedelta, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class RouteOptions:
    """Options of one protected view; ``None`` means "use the ``IDEMPOTENCY_*`` config default"."""

    required: bool | None = None
    atomic: bool | None = None
    ttl: float | None = None
    lease: float | None = None
    wait: float | None = None
    in_progress_status: int | None = None
    on_stale: Literal["hold", "takeover"] | None = None
    fingerprint: Callable[[], Any] | None = None
    replay: Callable[[Any], Any] | None = None
    transient: tuple[type[BaseException], ...] = ()
    exempt: bool = False
    key: Callable[[], str | None] | None = None
    scope: str | None = None
    describe: Callable[[], str | None] | None = None
    runbook: str | None = None
    commit_4xx: bool | None = None

    def __post_init__(self) -> None:
        if self.key is not None and not callable(self.key):
            raise TypeError("idempotent(key=...) takes a callable returning the key (or None when there is none)")
        if self.scope is not None and (not isinstance(self.scope, str) or len(self.scope) > 255):
            raise ValueError("idempotent(scope=...) must be a string of at most 255 characters")
        if self.describe is not None and not callable(self.describe):
            raise TypeError("idempotent(describe=...) takes a callable returning a short summary")
        if self.commit_4xx is not None and not isinstance(self.commit_4xx, bool):
            raise TypeError("idempotent(commit_4xx=...) must be True or False")
        if self.in_progress_status not in (None, 409, 202):
            raise ValueError("idempotent(in_progress_status=...) must be 409 or 202")
        if self.on_stale not in (None, "hold", "takeover"):
            raise ValueError('idempotent(on_stale=...) must be "hold" or "takeover"')
        if self.lease is not None and self.lease <= 0:
            raise ValueError("idempotent(lease=...) must be positive")
        if self.ttl is not None and self.ttl <= 0:
            raise ValueError("idempotent(ttl=...) must be positive")
        for exc_type in self.transient:
            if not (isinstance(exc_type, type) and issubclass(exc_type, BaseException)):
                raise TypeError("idempotent(transient=...) takes exception types")


@overload
def idempotent(view: F, /) -> F: ...


@overload
def idempotent(
    view: None = None,
    /,
    *,
    required: bool | None = None,
    atomic: bool | None = None,
    ttl: float | timedelta | None = None,
    lease: float | timedelta | None = None,
    wait: float | timedelta | None = None,
    in_progress_status: int | None = None,
    on_stale: Literal["hold", "takeover"] | None = None,
    fingerprint: Callable[[], Any] | None = None,
    replay: Callable[[Any], Any] | None = None,
    transient: tuple[type[BaseException], ...] | type[BaseException] = (),
    exempt: bool = False,
    key: Callable[[], str | None] | None = None,
    scope: str | None = None,
    describe: Callable[[], str | None] | None = None,
    runbook: str | None = None,
    commit_4xx: bool | None = None,
) -> Callable[[F], F]: ...


def idempotent(
    view: F | None = None,
    /,
    *,
    required: bool | None = None,
    atomic: bool | None = None,
    ttl: float | timedelta | None = None,
    lease: float | timedelta | None = None,
    wait: float | timedelta | None = None,
    in_progress_status: int | None = None,
    on_stale: Literal["hold", "takeover"] | None = None,
    fingerprint: Callable[[], Any] | None = None,
    replay: Callable[[Any], Any] | None = None,
    transient: tuple[type[BaseException], ...] | type[BaseException] = (),
    exempt: bool = False,
    key: Callable[[], str | None] | None = None,
    scope: str | None = None,
    describe: Callable[[], str | None] | None = None,
    runbook: str | None = None,
    commit_4xx: bool | None = None,
) -> F | Callable[[F], F]:
    """Protect a view: unsafe requests to it need an ``Idempotency-Key`` and run at most once per command.

    Use bare (``@idempotent``) or with keyword options; each option defaults to its ``IDEMPOTENCY_*`` config
    key. Place it below the route decorator: above it, the route would register the unprotected function, so
    the first request to the app raises ``RuntimeError`` naming the view instead. ``exempt=True`` opts a view
    out of ``IDEMPOTENCY_PROTECT_ALL``.

    Webhooks and other senders that name the operation themselves: ``key=`` is a callable returning the key
    from the request (a delivery-id header, the body's event id; ``None`` when there is none), and ``scope=``
    a fixed scope for the route (``"stripe"``) instead of the ``scope_loader``'s. ``describe=`` returns a
    short, PII-free summary of the command for operators (``"10.00 EUR to ACME"``), stored with the record;
    ``runbook=`` is operator guidance for the route's stuck records (text or URL).

    Atomic mode (``atomic=True``): the view's ``db.session`` writes commit with a 2xx or 3xx outcome only; a 4xx
    (COMPLETED, replayed) rolls them back and stores the record alone, unless ``commit_4xx=True`` (config
    ``IDEMPOTENCY_ATOMIC_COMMIT_4XX``) keeps them, for routes that record what they refused (a declined payment
    with its 402).

    See the docs' "Behaviour" table for the responses it causes.
    """
    if commit_4xx and atomic is False:
        # A leased view commits its own writes: there is nothing for the layer to keep or roll back.
        raise ValueError("idempotent(commit_4xx=True) applies to atomic mode only: it has no meaning with atomic=False")
    options = RouteOptions(
        required=required,
        atomic=atomic,
        ttl=seconds("idempotent(ttl=...)", ttl),
        lease=seconds("idempotent(lease=...)", lease),
        wait=seconds("idempotent(wait=...)", wait),
        in_progress_status=in_progress_status,
        on_stale=on_stale,
        fingerprint=fingerprint,
        replay=replay,
        transient=transient if isinstance(transient, tuple) else (transient,),
        exempt=exempt,
        key=key,
        scope=scope,
        describe=describe,
        runbook=runbook,
        commit_4xx=commit_4xx,
    )

    def decorate(f: F) -> F:
        if options_of(f) is not None:
            raise TypeError(f"@idempotent is applied twice to {f.__qualname__}")
        wrapper = watch(f)
        setattr(wrapper, OPTIONS_ATTRIBUTE, options)
        _DECORATED.add(f)
        return wrapper

    if view is not None:
        return decorate(view)
    return decorate


def watch(view: F) -> F:
    """Wrap ``view`` so the request hooks know that its body started, and which exception it raised.

    ``@idempotent`` does it; so does the layer itself for views that ``IDEMPOTENCY_PROTECT_ALL`` protects.
    Only a response the view body produced is an outcome: anything answered before it (an auth or CSRF hook)
    is not stored, and the claim is withdrawn.
    """

    @functools.wraps(view)
    def watched(*args: Any, **kwargs: Any) -> Any:
        request.environ[_STARTED_KEY] = True
        try:
            return current_app.ensure_sync(view)(*args, **kwargs)
        except BaseException as exc:
            # Error handlers may turn the exception into a response before after_request sees it.
            request.environ[_EXCEPTION_KEY] = exc
            raise

    setattr(watched, _WATCHED_ATTRIBUTE, True)
    return watched  # type: ignore[return-value]


def is_watched(view: Callable[..., Any]) -> bool:
    return bool(getattr(view, _WATCHED_ATTRIBUTE, False))


def misplaced(views: Mapping[str, Callable[..., Any]]) -> list[str]:
    """Endpoints whose registered view is a function ``@idempotent`` wrapped *after* it was registered.

    That happens when ``@idempotent`` sits above the route decorator: the route registered the plain
    function, so the protection would silently not apply.
    """
    return sorted(endpoint for endpoint, view in views.items() if view in _DECORATED)


def options_of(view: Callable[..., Any] | None) -> RouteOptions | None:
    """The options ``@idempotent`` attached to ``view``, if any."""
    return getattr(view, OPTIONS_ATTRIBUTE, None)


def view_exception() -> BaseException | None:
    """The exception the protected view raised during this request, if any."""
    exc: BaseException | None = request.environ.get(_EXCEPTION_KEY)
    return exc


def view_started() -> bool:
    """Whether the protected view's body started during this request."""
    return bool(request.environ.get(_STARTED_KEY, False))
