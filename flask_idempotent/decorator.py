"""``@idempotent``: marks a view as protected and carries its options.

The enforcing happens in the extension's request hooks (README: "How it works"); the decorator only registers
the options on the view and notes an exception the view raised, so the outcome can tell a transient error
from any other.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Literal, TypeVar, overload

from flask import current_app, g

F = TypeVar("F", bound=Callable[..., Any])

OPTIONS_ATTRIBUTE = "_flask_idempotent_options"
_EXCEPTION_ATTRIBUTE = "_flask_idempotent_view_exception"


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

    def __post_init__(self) -> None:
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
) -> F | Callable[[F], F]:
    """Protect a view: unsafe requests to it need an ``Idempotency-Key`` and run at most once per command.

    Use bare (``@idempotent``) or with keyword options; each option defaults to its ``IDEMPOTENCY_*`` config
    key. Place it below the route decorator. ``exempt=True`` opts a view out of ``IDEMPOTENCY_PROTECT_ALL``.
    See the README's "Behaviour" table for the responses it causes.
    """
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
    )

    def decorate(f: F) -> F:
        @functools.wraps(f)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            try:
                return current_app.ensure_sync(f)(*args, **kwargs)
            except BaseException as exc:
                # Error handlers may turn the exception into a response before after_request sees it.
                setattr(g, _EXCEPTION_ATTRIBUTE, exc)
                raise

        setattr(wrapper, OPTIONS_ATTRIBUTE, options)
        return wrapper  # type: ignore[return-value]

    if view is not None:
        return decorate(view)
    return decorate


def options_of(view: Callable[..., Any] | None) -> RouteOptions | None:
    """The options ``@idempotent`` attached to ``view``, if any."""
    return getattr(view, OPTIONS_ATTRIBUTE, None)


def view_exception() -> BaseException | None:
    """The exception the protected view raised during this request, if any."""
    exc: BaseException | None = g.get(_EXCEPTION_ATTRIBUTE)
    return exc
