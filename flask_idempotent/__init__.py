"""flask_idempotent: idempotency keys for Flask as concurrency control for effects, not a response cache.

See SPEC's HTTP table (README) for what each request gets.
"""

from __future__ import annotations

from .context import current_record
from .dashboard import ReadOnly
from .decorator import TransientError, idempotent
from .errors import (
    AtomicViewCommitted,
    IdempotencyError,
    InvalidKey,
    KeyReused,
    LeaseLost,
    MissingKey,
    RecordStuck,
    RequestFailed,
    RequestInProgress,
    ResponseNotStored,
    StoreUnavailable,
)
from .extension import Idempotency

__all__ = [
    "AtomicViewCommitted",
    "Idempotency",
    "IdempotencyError",
    "InvalidKey",
    "KeyReused",
    "LeaseLost",
    "MissingKey",
    "ReadOnly",
    "RecordStuck",
    "RequestFailed",
    "RequestInProgress",
    "ResponseNotStored",
    "StoreUnavailable",
    "TransientError",
    "current_record",
    "idempotent",
]
