"""``@idempotent``: marks a view as protected and carries its options.

The enforcing happens in the extension's request hooks (docs: "Behaviour"); the decorator only registers
the options on the view and notes an exception the view raised, so the outcome can tell a transient error
from any other.
"""

from __future__ import annotations

import functools
import types
import weakref
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Literal, Protocol, TypeVar, overload

from flask import current_app, request
from flask.views import MethodView, View, http_method_funcs

from .constants import REQUEST_CONTEXT_KEY

F = TypeVar("F", bound=Callable[..., Any])

OPTIONS_ATTRIBUTE = "_flask_idempotent_options"
_WATCHED_ATTRIBUTE = "_flask_idempotent_watched"
#: The functions ``@idempotent`` wrapped: if one of them is registered as a view itself, the decorator was
#: placed above the route decorator (see :func:`misplaced`).
_DECORATED: weakref.WeakSet[Callable[..., Any]] = weakref.WeakSet()
#: The wrappers ``@idempotent`` returned: the first request looks for them inside the app's views (see
#: :func:`hidden`).
_MARKED: weakref.WeakSet[Callable[..., Any]] = weakref.WeakSet()
#: How many objects :func:`hidden` looks at per endpoint, and how long a ``__wrapped__`` chain may be.
_SCAN_BUDGET = 256


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

    Class-based views: put it on a ``MethodView``'s method (``def post(self)``; each method has its own
    options) or in ``View.decorators`` (every unsafe method). Other decorators may sit on top of it if they
    use ``functools.wraps``; one written without it hides the marked function, so the app's first request
    raises ``RuntimeError`` naming it (docs: "Behaviour", "Class-based views and stacked decorators").

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
        _MARKED.add(wrapper)
        return wrapper

    if view is not None:
        return decorate(view)
    return decorate


class _Watcher(Protocol):
    """What :func:`watch` tells the protected request's context (``context.RequestContext``)."""

    def view_began(self) -> None: ...

    def view_raised(self, exc: BaseException) -> None: ...


def watch(view: F) -> F:
    """Wrap ``view`` so the request hooks know that its body started, and which exception it raised.

    ``@idempotent`` does it; so does the layer itself for views that ``IDEMPOTENCY_PROTECT_ALL`` protects.
    Only a response the view body produced is an outcome: anything answered before it (an auth or CSRF hook)
    is not stored, and the claim is withdrawn.
    """

    @functools.wraps(view)
    def watched(*args: Any, **kwargs: Any) -> Any:
        watcher: _Watcher | None = request.environ.get(REQUEST_CONTEXT_KEY)  # None: not a protected request
        if watcher is not None:
            watcher.view_began()
        try:
            return current_app.ensure_sync(view)(*args, **kwargs)
        except BaseException as exc:
            # Error handlers may turn the exception into a response before after_request sees it.
            if watcher is not None:
                watcher.view_raised(exc)
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


def route_options(view: Callable[..., Any] | None, method: str) -> RouteOptions | None:
    """The options that protect ``method`` requests to the registered view ``view``, if any.

    ``@idempotent`` on the view itself or on a function it wraps with ``functools.wraps`` (along its
    ``__wrapped__`` chain); for a class-based view (``View.as_view``), else on the method that serves the
    request: its ``dispatch_request``, or a ``MethodView``'s ``post``, ``put``... (each along its own chain).
    """
    options = options_of(view)  # the common case: on the view, or copied onto it by functools.wraps
    if options is None:
        options = _options_along(view)
    if options is None:
        for handler in _handlers(view, method):
            options = _options_along(handler)
            if options is not None:
                break
    return options


def hidden(views: Mapping[str, Callable[..., Any]]) -> list[str]:
    """``@idempotent`` functions that the app's views run but that protect none of its endpoints.

    A wrapper decorator written without ``functools.wraps`` on top of ``@idempotent`` (or on a class-based
    view's method) hides the marked function from :func:`route_options`: the route would run it unprotected.
    Each is named with the endpoints that lead to it. Only what the app's own views lead to is looked at
    (``__wrapped__``, closures, ``functools.partial``, a decorator class's attributes, a class-based view's
    methods), so marked functions of other apps in the process never count; one marked function registered on
    several endpoints is fine as long as one of them is protected by it (``@idempotent`` above the route
    decorator is :func:`misplaced`'s).
    """
    protected: set[int] = set()
    inside: dict[int, tuple[Any, list[str]]] = {}
    for endpoint, view in sorted(views.items()):
        protected.update(id(f) for f in _along(view) if _is_marked(f))
        for method in http_method_funcs:
            for handler in _handlers(view, method):
                protected.update(id(f) for f in _along(handler) if _is_marked(f))
        for marked in _marked_inside(view):
            inside.setdefault(id(marked), (marked, []))[1].append(endpoint)
    return sorted(
        f"{marked.__module__}.{marked.__qualname__} (run by {', '.join(repr(e) for e in endpoints)})"
        for key, (marked, endpoints) in inside.items()
        if key not in protected
    )


def marked_twice(views: Mapping[str, Callable[..., Any]]) -> list[str]:
    """Class-based views marked as a whole (``View.decorators``) and on a method too: which one applies?"""
    return sorted(
        endpoint
        for endpoint, view in views.items()
        if _options_along(view) is not None
        and any(_options_along(h) is not None for m in http_method_funcs for h in _handlers(view, m))
    )


def _along(f: Any) -> Iterator[Any]:
    """``f`` and what it wraps, following ``__wrapped__`` (what ``functools.wraps`` sets)."""
    for _ in range(_SCAN_BUDGET):
        if f is None:
            return
        yield f
        f = getattr(f, "__wrapped__", None)


def _is_marked(f: Any) -> bool:
    return isinstance(f, types.FunctionType) and f in _MARKED


def _options_along(f: Any) -> RouteOptions | None:
    return next((options for g in _along(f) if (options := options_of(g)) is not None), None)


def _handlers(view: Any, method: str) -> Iterator[Any]:
    """What a class-based view's ``view_class`` runs for ``method`` (nothing for a plain view function)."""
    view_class = getattr(view, "view_class", None)
    if not isinstance(view_class, type):
        return
    yield getattr(view_class, "dispatch_request", None)
    if issubclass(view_class, MethodView):
        yield getattr(view_class, method.lower(), None)


def _marked_inside(view: Any) -> Iterator[Any]:
    """The ``@idempotent`` wrappers reachable from ``view`` through what a wrapper keeps of the function."""
    todo: list[Any] = [view]
    visited: set[int] = set()
    while todo and len(visited) < _SCAN_BUDGET:
        f = todo.pop()
        if id(f) in visited:
            continue
        visited.add(id(f))
        if isinstance(f, functools.partial):
            todo.append(f.func)
        elif isinstance(f, types.MethodType):
            todo.append(f.__func__)
        elif isinstance(f, types.FunctionType):
            if _is_marked(f):
                yield f
            for cell in f.__closure__ or ():
                try:
                    todo.append(cell.cell_contents)
                except ValueError:  # an empty cell
                    continue
            todo.extend(f.__dict__.values())  # __wrapped__, view_class
        elif isinstance(f, type):
            if issubclass(f, View):
                todo.extend(getattr(f, name, None) for name in ("dispatch_request", *http_method_funcs))
        elif callable(f):
            # A decorator written as a class keeps the function as an attribute of its instance. (Anything
            # else callable is looked at no further: a proxy such as ``request`` may raise on any attribute.)
            try:
                attributes = list(vars(f).values())
            except Exception:
                continue
            todo.extend(v for v in attributes if isinstance(v, (types.FunctionType, types.MethodType)))
