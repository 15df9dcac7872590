"""``current_record``: the record the current protected request owns."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from flask import g
from werkzeug.local import LocalProxy

from .errors import LeaseLost

if TYPE_CHECKING:
    from sqlalchemy.engine import Row

    from .extension import AppState, Resolved

_G_ATTRIBUTE = "_flask_idempotent_record"
UNSET: Any = object()


@dataclass(eq=False)
class ClaimedRecord:
    """The record of one protected request, from its claim to its outcome.

    Inside the view it is ``current_record``: ``key``, ``scope``, ``attempt``, ``recovery_point``,
    ``recovery_data``, :meth:`checkpoint` and :meth:`set_resource`.
    """

    state: AppState
    options: Resolved
    scope: str
    key: str
    request_hash: str
    method: str
    path: str
    endpoint: str | None
    record_id: int | None = None
    lease_token: str | None = None
    attempt: int = 0
    recovery_point: str | None = None
    recovery_data: Any = None
    #: The row this request took over (retry, takeover, expiry), ``None`` for a fresh insert.
    previous: Row[Any] | None = None
    #: The values this request's claim wrote (atomic mode writes them again with a failure after a rollback).
    claim_values: dict[str, Any] = field(default_factory=dict)
    resource_ref: Any = field(default=UNSET)
    settled: bool = False

    @property
    def claimed(self) -> bool:
        return self.lease_token is not None

    @property
    def atomic(self) -> bool:
        return self.options.atomic

    def checkpoint(self, name: str, data: Any = None) -> None:
        """Durably record recovery point ``name`` (with JSON ``data``) and extend the lease.

        In leased mode it commits at once, so an attempt that takes over after a crash resumes from it. In atomic
        mode it is written in the view's transaction (all or nothing anyway). Raises :class:`LeaseLost` if this
        request no longer owns the record; the view should stop.
        """
        if not self.claimed or self.record_id is None:
            raise RuntimeError("checkpoint() needs a claimed record")
        now = self.state.clock()
        values = {
            "recovery_point": name,
            "recovery_data": data,
            "locked_until": now + timedelta(seconds=self.options.lease),
            "updated_at": now,
        }
        if not self.state.write_fenced(self, values):
            raise LeaseLost(f"record {self.record_id} is no longer owned by this request")
        self.recovery_point = name
        self.recovery_data = data

    def set_resource(self, ref: Any) -> None:
        """Store ``ref`` (JSON) as the outcome's resource reference.

        With the route's ``replay=`` callable, replays call ``replay(ref)`` to rebuild the response from the
        resource's current state, and the response body is not stored.
        """
        if not self.claimed:
            raise RuntimeError("set_resource() needs a claimed record")
        self.resource_ref = ref


def _current() -> ClaimedRecord:
    record: ClaimedRecord | None = g.get(_G_ATTRIBUTE)
    if record is None or not record.claimed:
        raise RuntimeError("current_record is only available inside a view protected by @idempotent")
    return record


def set_current(record: ClaimedRecord) -> None:
    setattr(g, _G_ATTRIBUTE, record)


def get_current() -> ClaimedRecord | None:
    record: ClaimedRecord | None = g.get(_G_ATTRIBUTE)
    return record


current_record: ClaimedRecord = LocalProxy(_current)  # type: ignore[assignment]
