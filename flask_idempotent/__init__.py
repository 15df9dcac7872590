"""flask_idempotent: idempotency keys for Flask as concurrency control for effects, not a response cache.

See the docs' "Behaviour" table for what each request gets.
"""

from __future__ import annotations

from .context import RecordView, current_record
from .dashboard import ReadOnly
from .decorator import idempotent
from .errors import (
    AtomicViewCommitted,
    CommitFailed,
    ConfigurationError,
    IdempotencyError,
    InvalidKey,
    KeyReused,
    LeaseLost,
    MissingKey,
    RecordStuck,
    RequestFailed,
    RequestInProgress,
    ResourceGone,
    ResponseNotStored,
    SchemaVersionError,
    ScopeError,
    StoreUnavailable,
    TransientError,
)
from .extension import Idempotency

__all__ = [
    "AtomicViewCommitted",
    "CommitFailed",
    "ConfigurationError",
    "Idempotency",
    "IdempotencyError",
    "InvalidKey",
    "KeyReused",
    "LeaseLost",
    "MissingKey",
    "ReadOnly",
    "RecordStuck",
    "RecordView",
    "RequestFailed",
    "RequestInProgress",
    "ResourceGone",
    "ResponseNotStored",
    "ScopeError",
    "SchemaVersionError",
    "StoreUnavailable",
    "TransientError",
    "current_record",
    "idempotent",
]
