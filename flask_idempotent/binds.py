"""Which binds an atomic view's ``db.session`` writes reach (docs: "Modes", atomic mode needs one database).

Atomic mode commits the record with the view's writes in one transaction. A session spanning two binds commits
each bind's connection on its own, one after the other: two commits are not one transaction, and a crash
between them keeps half. So before the commit the layer asks which binds the view wrote to, and refuses when one
is not the records' bind (:func:`refusal`).

What counts as a write through ``db.session``: the ORM objects a flush wrote or will write (added, changed,
deleted: each on ``session.get_bind(mapper)``, the bind its model's ``__bind_key__`` names) and the
INSERT/UPDATE/DELETE statements run with ``session.execute`` (on the bind their table or model names). They are
noted as they happen, per root transaction, in ``session.info``; reads are not writes and never count. Raw SQL
text (``session.execute(text("INSERT ..."))``) and statements run on a connection taken from the session are
not seen.
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy.orm import ORMExecuteState, Session

from .context import get_current

if TYPE_CHECKING:
    from .state import AppState

_WRITTEN = "flask_idempotent.written_engines"


def _noted(session: Session) -> set[sa.Engine] | None:
    """The set to note this session's writes in, or ``None`` when nobody will ask (not an atomic request, or
    an app with one engine)."""
    ctx = get_current()
    if ctx is None or not ctx.atomic or not ctx.claimed or ctx.settled or len(ctx.state.db.engines) < 2:
        return None
    written: set[sa.Engine] = session.info.setdefault(_WRITTEN, set())
    return written


def _pending(session: Session) -> set[sa.Engine]:
    """The engines the session's next flush writes to."""
    objects = [*session.new, *session.deleted, *(o for o in session.dirty if session.is_modified(o))]
    return {_engine(session.get_bind(mapper=sa.inspect(o).mapper)) for o in objects}


def _engine(bind: sa.Engine | sa.Connection) -> sa.Engine:
    return bind.engine


def _before_flush(session: Session, _flush_context: Any, _instances: Any) -> None:
    written = _noted(session)
    if written is not None:
        written |= _pending(session)


def _do_orm_execute(state: ORMExecuteState) -> None:
    if not (state.is_insert or state.is_update or state.is_delete):
        return
    written = _noted(state.session)
    if written is not None:
        bind = state.bind_arguments.get("bind")
        if bind is None:
            clause = state.statement if isinstance(state.statement, sa.ClauseElement) else None
            bind = state.session.get_bind(mapper=state.bind_mapper, clause=clause)
        written.add(_engine(bind))


def _after_transaction_end(session: Session, transaction: Any) -> None:
    if transaction.parent is None:  # the root transaction: its writes are committed or gone
        session.info.pop(_WRITTEN, None)


class WriteBinds:
    """Notes the binds ``db.session`` writes to during atomic requests (installed once per ``db``)."""

    def __init__(self) -> None:
        self._installed: weakref.WeakSet[Any] = weakref.WeakSet()

    def install(self, db: Any) -> None:
        if db in self._installed:
            return
        self._installed.add(db)
        sa.event.listen(db.session, "before_flush", _before_flush)
        sa.event.listen(db.session, "do_orm_execute", _do_orm_execute)
        sa.event.listen(db.session, "after_transaction_end", _after_transaction_end)


WRITE_BINDS = WriteBinds()


def refusal(state: AppState, session: Any) -> str | None:
    """Why this atomic request cannot commit: its view wrote to another bind than the records' (or ``None``)."""
    engines = state.db.engines
    if len(engines) < 2:
        return None
    own = state.records_engine
    written = set(session.info.get(_WRITTEN, ())) | _pending(session)
    elsewhere = sorted({_bind_name(engines, e) for e in written if e is not own})
    if not elsewhere:
        return None
    return (
        f"this atomic view's db.session writes reach {', '.join(elsewhere)}, but its idempotency record lives on"
        f" {_bind_name(engines, own)}: two commits are not one transaction, so nothing was committed. Keep the"
        " view's writes and the records on one bind (IDEMPOTENCY_BIND_KEY), or make the view leased."
    )


def _bind_name(engines: Any, engine: sa.Engine) -> str:
    for key, known in engines.items():
        if known is engine:
            return "the default bind" if key is None else f"the bind {key!r}"
    return f"an engine outside SQLALCHEMY_BINDS ({engine.url.render_as_string(hide_password=True)})"
