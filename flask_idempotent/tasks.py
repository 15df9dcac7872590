"""Idempotent tasks and code paths: ``idempotency.task(...)`` and ``idempotency.once(...)``.

The same records, leases, fencing, dashboard and CLI as requests; the record's ``kind`` is ``task``. A call
claims its (scope, key) like a request does (docs: "Tasks and other code paths"):

- claimed (new, retryable failure, expired): the function runs; its return value is stored as JSON and
  returned as its replays will return it (round-tripped through JSON); an exception is a FAILED outcome
  (retryable for ``TransientError``, the ``transient=`` types and Celery's retries -- see
  :func:`celery_retries` -- final otherwise: the effect may have happened) and is raised again;
- COMPLETED: the stored value is returned without running anything (a redelivered Celery task, a retry);
- FAILED final: :class:`~flask_idempotent.RequestFailed` with the stored error;
- another call holds the lease: :class:`~flask_idempotent.RequestInProgress`, whose ``retry_after`` a Celery
  task can turn into ``self.retry(countdown=exc.retry_after)``;
- the lease ended without an outcome: :class:`~flask_idempotent.RecordStuck` (an operator decides);
- the same key with other arguments: :class:`~flask_idempotent.KeyReused`.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import json
import sys
from collections.abc import Callable, Iterator, Mapping
from typing import Any, cast

from .constants import State
from .context import RequestContext
from .decorator import RouteOptions
from .errors import RequestFailed, problem_class
from .fingerprint import hash_command
from .keys import KeyFormatError, parse_key
from .machine import ANSWERS, Command, Decision, classify_exception, outcome
from .models import storable_text
from .pipeline import Answered, claim_key, describe_error, store_outcome
from .state import AppState

#: ``method`` of task records (``path`` holds the task's name).
TASK_METHOD = "TASK"
_JSON = [["Content-Type", "application/json"]]


def checked_key(value: Any, where: str) -> str:
    """A task's key: a ``str`` obeying the key header's rules, else a clear error before any effect."""
    if not isinstance(value, str):
        raise TypeError(f"{where} must give the key as a str, got {type(value).__name__}")
    try:
        return parse_key([value], header=False)
    except KeyFormatError as exc:
        raise ValueError(f"{where} gave an unusable key: {exc}") from None


def command_of(name: str, arguments: Mapping[str, Any]) -> dict[str, Any]:
    """The command a task call stands for: its name and its arguments, each JSON (``TypeError`` names the one
    that is not)."""
    for argument, value in arguments.items():
        try:
            json.dumps(value)  # NaN and int keys too: hash_command spells every value json.dumps accepts
        except (TypeError, ValueError):
            raise TypeError(
                f"argument {argument!r} of {name} is a {type(value).__name__}, which is not JSON-serialisable:"
                " an idempotent task's arguments are its command and must be stored as JSON"
            ) from None
    return {"task": name, "arguments": dict(arguments)}


class _Refused(TypeError):
    """The ``TypeError`` naming a value of the result that JSON cannot encode."""


def encode_result(value: Any, name: str) -> bytes:
    """``value`` as the JSON a replay decodes: anything ``json.dumps`` accepts (NaN included, as for arguments),
    else a ``TypeError`` naming the type that is not."""

    def refuse(obj: Any) -> Any:
        raise _Refused(
            f"the result of {name} holds a {type(obj).__name__}, which is not JSON-serialisable:"
            " an idempotent operation's result is stored as JSON"
        )

    try:
        return json.dumps(value, default=refuse).encode()
    except _Refused:
        raise
    except (TypeError, ValueError) as exc:  # a key json cannot write (a tuple), a circular reference
        raise TypeError(f"the result of {name} is not JSON-serialisable: {exc}") from None


def celery_retries(exc: BaseException, task: Any = None) -> bool:
    """Whether Celery runs the task again after ``exc`` (SPEC "Beyond views"), which makes the failure transient:

    - ``celery.exceptions.Retry`` (what ``self.retry()`` raises);
    - any exception that Celery's ``Task.retry`` itself raised: once ``max_retries`` is spent it raises the
      ``exc=`` it was given or ``MaxRetriesExceededError`` (Celery gave up: the record stays FAILED retryable,
      for an operator or a later call to run again);
    - an instance of the task's ``autoretry_for`` that is not in its ``dont_autoretry_for``.

    ``task`` is the Celery task (``self`` under ``bind=True``); without it, ``celery.current_task``: the task the
    worker is running, whose ``autoretry_for`` decides what happens to an exception leaving the function. Celery
    is never imported here: when it is not loaded, no exception can be Celery's.
    """
    exceptions = sys.modules.get("celery.exceptions")
    if exceptions is None:
        return False
    if isinstance(exc, exceptions.Retry) or _raised_by_celery_retry(exc):
        return True
    if task is None:
        task = _current_celery_task()
    autoretry = tuple(getattr(task, "autoretry_for", None) or ())
    dont = (exceptions.Ignore, *(getattr(task, "dont_autoretry_for", None) or ()))
    return isinstance(exc, autoretry) and not isinstance(exc, dont)


def _raised_by_celery_retry(exc: BaseException) -> bool:
    module = sys.modules.get("celery.app.task")
    if module is None:
        return False
    code = module.Task.retry.__code__
    tb = exc.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code is code:
            return True
        tb = tb.tb_next
    return False


def _current_celery_task() -> Any:
    celery = sys.modules.get("celery")
    return None if celery is None else celery.current_task._get_current_object()


class Operation:
    """What ``idempotency.once(...)`` gives the block: ``done``, ``result`` and :meth:`complete`.

    ``done`` is true when the operation already completed under this key (then ``result`` is its stored value
    and the block must not repeat the effect). Otherwise the block owns the key: it does the work and calls
    ``complete(value)`` with a JSON-serialisable result; ``result`` is then that value round-tripped through
    JSON, as every replay returns it. Leaving the block without ``complete`` completes with ``None``; leaving it
    with an exception stores a FAILED outcome and lets the exception through.
    """

    def __init__(self, ctx: RequestContext | None, *, done: bool = False, result: Any = None, task: Any = None) -> None:
        self._ctx = ctx
        self._task = task
        self.done = done
        self.result = result

    def complete(self, value: Any = None) -> None:
        """Store ``value`` (JSON) as the outcome: later calls with this key get it as ``result``.

        A value that JSON cannot encode is a ``TypeError`` naming its type, and a FAILED final outcome: the
        work is done, but its result cannot be kept, so running it again is an operator's decision."""
        ctx = self._ctx
        if self.done or ctx is None or ctx.settled:
            raise RuntimeError("this operation already has its outcome")
        try:
            body = encode_result(value, ctx.command.path)
        except TypeError as exc:
            self._fail(exc, retryable=False)
            raise
        ctx.settle()
        store_outcome(
            ctx, outcome(State.COMPLETED, False, status=200, headers=_JSON, body=body, resource_ref=None, error=None)
        )
        self.done, self.result = True, json.loads(body)

    def _fail(self, exc: BaseException, *, retryable: bool | None = None) -> None:
        """Store the FAILED outcome of ``exc``: retryable as classified (SPEC's transient types and Celery's
        retries) unless ``retryable`` says."""
        ctx = self._ctx
        assert ctx is not None
        ctx.settle()
        if retryable is None:
            retryable = classify_exception(
                exc, ctx.options.transient, atomic=False, runs_again=lambda e: celery_retries(e, self._task)
            )
        values = outcome(
            State.FAILED, retryable, status=500, headers=_JSON, body=None, resource_ref=None, error=describe_error(exc)
        )
        store_outcome(ctx, values)


@contextlib.contextmanager
def run_once(
    state: AppState,
    *,
    scope: str,
    key: str,
    command: Any,
    name: str,
    lease: float | None = None,
    ttl: float | None = None,
    transient: tuple[type[BaseException], ...] = (),
    summary: str | None = None,
    task: Any = None,
) -> Iterator[Operation]:
    """Claim ``(scope, key)`` for ``command`` and yield the :class:`Operation` (see the module docstring).
    ``task``: the Celery task running it, when known (else :func:`celery_retries` asks Celery)."""
    if not isinstance(scope, str) or len(scope) > 255 or storable_text(scope) != scope:
        raise ValueError("the scope must be a str of at most 255 characters, without NUL or lone surrogates")
    options = state.resolve(RouteOptions(atomic=False, wait=0, lease=lease, ttl=ttl, transient=transient))
    ctx, answered = claim_key(
        state,
        options,
        Command(
            scope=scope,
            key=checked_key(key, name),
            request_hash=hash_command(command),
            method=TASK_METHOD,
            path=name,
            endpoint=name,
            kind="task",
            summary=summary,
        ),
    )
    if answered is not None:
        yield _answer(ctx, answered)
        return
    operation = Operation(ctx, task=task)
    try:
        yield operation
    except BaseException as exc:
        if not ctx.settled:
            operation._fail(exc)
        raise
    if not operation.done:
        operation.complete(None)


def _answer(ctx: RequestContext, answered: Answered) -> Operation:
    """A call that does not run (``machine.ANSWERS``): the stored result, or the exception that says why not."""
    decision, row = answered.decision, cast(Any, answered.row)  # a row, but for an in-progress answer
    assert row is not None or decision is Decision.IN_PROGRESS
    rule = ANSWERS[decision]
    if rule.problem is None:
        if row.state == State.COMPLETED and row.response_body is not None:
            return Operation(None, done=True, result=json.loads(row.response_body))
        raise RequestFailed(f"The operation {row.path} with this key failed for good: {row.error or 'no detail'}.")
    if decision is Decision.CONFLICT:
        detail = f"The key {row.key!r} was first used for {row.path} with other arguments."
    elif decision is Decision.STUCK:
        detail = f"The operation {row.path} with this key stopped without an outcome; an operator decides."
    else:
        detail = "Another call holds this key's lease and is still running. Retry after retry_after seconds."
    raise problem_class(rule.problem)(detail, retry_after=ctx.state.retry_after if rule.retry_later else None)


def task_decorator(
    state_of: Callable[[], tuple[AppState, Callable[[], contextlib.AbstractContextManager[Any]]]],
    *,
    key: Callable[..., str],
    scope: str = "",
    lease: float | None = None,
    ttl: float | None = None,
    transient: tuple[type[BaseException], ...] = (),
    name: str | None = None,
    bind: bool = False,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Build ``idempotency.task(...)``: ``state_of()`` gives the app state and a context manager that pushes
    the app's context when the caller has none (a Celery worker). ``bind``: the first positional argument is the
    task object (Celery's ``bind=True``): passed through to the function, but neither in the key nor the command."""
    if not callable(key):
        raise TypeError("task(key=...) takes a callable computing the key from the call's arguments")

    def decorate(func: Callable[..., Any]) -> Callable[..., Any]:
        signature = inspect.signature(func)
        if bind:
            parameters = list(signature.parameters.values())
            if not parameters:
                raise TypeError(f"task(bind=True) needs a first parameter for the task object in {func.__qualname__}")
            signature = signature.replace(parameters=parameters[1:])
        task_name = name or f"{func.__module__}.{func.__qualname__}"

        @functools.wraps(func)
        def call(*all_args: Any, **kwargs: Any) -> Any:
            passed, args = (all_args[:1], all_args[1:]) if bind else ((), all_args)
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            command = command_of(task_name, bound.arguments)  # TypeError before any effect
            try:
                computed = key(*args, **kwargs)
            except Exception as exc:
                raise ValueError(f"the key callable of task {task_name} raised {type(exc).__name__}: {exc}") from exc
            state, app_context = state_of()
            with (
                app_context(),
                run_once(
                    state,
                    scope=scope,
                    key=checked_key(computed, f"the key callable of task {task_name}"),
                    command=command,
                    name=task_name,
                    lease=lease,
                    ttl=ttl,
                    transient=transient,
                    task=passed[0] if bind else None,
                ) as operation,
            ):
                if operation.done:
                    return operation.result
                operation.complete(func(*passed, *args, **kwargs))
                return operation.result  # as JSON gives it back: what every replay returns

        return call

    return decorate
