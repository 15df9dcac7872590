"""flask_idempotent: idempotency keys for Flask as concurrency control for effects, not a response cache.

See the docs' "Behaviour" table for what each request gets.
"""

from __future__ import annotations

import os
import sys

from .context import RecordView, current_record
from .dashboard import ReadOnly
from .decorator import idempotent
from .errors import (
    AtomicViewCommitted,
    CommitConflict,
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
from .outbox import outbox_key

__all__ = [
    "AtomicViewCommitted",
    "CommitConflict",
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
    "outbox_key",
]


def _refuse_a_second_flask_idempotent() -> None:
    """Fail the import when a module ``flask_idempotent.py`` is on ``sys.path`` too (docs/publishing.md).

    The unrelated ``Flask-Idempotent`` distribution on PyPI ships a top-level ``flask_idempotent.py``. Installed
    next to this package (same site-packages), the package wins and that module is unreachable; in a later
    ``sys.path`` entry it waits for this package to go. Either way one name means two things, so the import
    stops here, naming both files. In an *earlier* entry the module wins and this code never runs: Python's
    own ``ImportError`` then names that file. One ``stat`` per ``sys.path`` entry.
    """
    for entry in sys.path:
        if not isinstance(entry, str):
            continue
        stray = os.path.join(entry or os.getcwd(), "flask_idempotent.py")
        if os.path.isfile(stray):
            raise ImportError(
                f"Two things are named flask_idempotent: this package ({os.path.dirname(__file__)}) and the module"
                f" {stray}, which the unrelated Flask-Idempotent distribution installs. Remove that one"
                " (`pip uninstall Flask-Idempotent`, or delete the file) so that `import flask_idempotent` always"
                " means this package."
            )


_refuse_a_second_flask_idempotent()
