"""Names used across the extension: every ``IDEMPOTENCY_*`` config key is spelled once, here."""

from __future__ import annotations

import enum
from datetime import timedelta

#: Where a protected request's context (``context.RequestContext``) is kept: in its WSGI environ, since an app
#: context can outlive a request. ``decorator.watch`` tells it that the view started, and what it raised.
REQUEST_CONTEXT_KEY = "flask_idempotent.request"


class ConfigKey:
    """The ``IDEMPOTENCY_*`` config keys. Constructor arguments of :class:`Idempotency` win over them."""

    HEADER = "IDEMPOTENCY_HEADER"
    REQUIRED = "IDEMPOTENCY_REQUIRED"
    ATOMIC = "IDEMPOTENCY_ATOMIC"
    ATOMIC_COMMIT_4XX = "IDEMPOTENCY_ATOMIC_COMMIT_4XX"
    TTL = "IDEMPOTENCY_TTL"
    LEASE = "IDEMPOTENCY_LEASE"
    WAIT = "IDEMPOTENCY_WAIT"
    IN_PROGRESS_STATUS = "IDEMPOTENCY_IN_PROGRESS_STATUS"
    ON_STALE = "IDEMPOTENCY_ON_STALE"
    PROTECT_ALL = "IDEMPOTENCY_PROTECT_ALL"
    FINGERPRINT_HEADERS = "IDEMPOTENCY_FINGERPRINT_HEADERS"
    REPLAY_HEADERS = "IDEMPOTENCY_REPLAY_HEADERS"
    RETRY_AFTER = "IDEMPOTENCY_RETRY_AFTER"
    PROBLEM_TYPE_BASE = "IDEMPOTENCY_PROBLEM_TYPE_BASE"
    DOCS_URL = "IDEMPOTENCY_DOCS_URL"
    MAX_BODY_BYTES = "IDEMPOTENCY_MAX_BODY_BYTES"
    MAX_RESPONSE_BYTES = "IDEMPOTENCY_MAX_RESPONSE_BYTES"
    DASHBOARD_URL_PREFIX = "IDEMPOTENCY_DASHBOARD_URL_PREFIX"
    DASHBOARD_SHOW_BODIES = "IDEMPOTENCY_DASHBOARD_SHOW_BODIES"
    ADVISORY_LOCKS = "IDEMPOTENCY_ADVISORY_LOCKS"
    REPLAY_TALLY_SECONDS = "IDEMPOTENCY_REPLAY_TALLY_SECONDS"
    OUTCOME_SYNCHRONOUS_COMMIT = "IDEMPOTENCY_OUTCOME_SYNCHRONOUS_COMMIT"
    ENABLED = "IDEMPOTENCY_ENABLED"
    BIND_KEY = "IDEMPOTENCY_BIND_KEY"
    OUTBOX_MAX_ATTEMPTS = "IDEMPOTENCY_OUTBOX_MAX_ATTEMPTS"
    OUTBOX_HANDOFF_SECONDS = "IDEMPOTENCY_OUTBOX_HANDOFF_SECONDS"


#: Defaults applied with ``app.config.setdefault`` in ``init_app``.
DEFAULTS: dict[str, object] = {
    ConfigKey.HEADER: "Idempotency-Key",
    ConfigKey.REQUIRED: True,
    ConfigKey.ATOMIC: False,
    # Atomic mode: a 4xx outcome rolls the view's writes back (the record is stored alone) unless this is True.
    ConfigKey.ATOMIC_COMMIT_4XX: False,
    ConfigKey.TTL: timedelta(hours=24),
    ConfigKey.LEASE: timedelta(seconds=60),
    ConfigKey.WAIT: 0.0,
    ConfigKey.IN_PROGRESS_STATUS: 409,
    ConfigKey.ON_STALE: "hold",
    ConfigKey.PROTECT_ALL: False,
    ConfigKey.FINGERPRINT_HEADERS: (),
    ConfigKey.REPLAY_HEADERS: (),
    ConfigKey.RETRY_AFTER: 1,
    ConfigKey.PROBLEM_TYPE_BASE: "urn:flask-idempotent:problem:",
    ConfigKey.DOCS_URL: None,
    ConfigKey.MAX_BODY_BYTES: 10 * 1024 * 1024,
    ConfigKey.MAX_RESPONSE_BYTES: 1024 * 1024,
    ConfigKey.DASHBOARD_URL_PREFIX: "/idempotency",
    ConfigKey.DASHBOARD_SHOW_BODIES: False,
    # PostgreSQL only: an atomic duplicate answers at once instead of waiting for the owner's row. False for
    # databases without working advisory locks (CockroachDB); correctness never rests on them.
    ConfigKey.ADVISORY_LOCKS: True,
    ConfigKey.REPLAY_TALLY_SECONDS: 60,
    # PostgreSQL only: False commits a leased outcome without waiting for its WAL flush. A database crash can
    # then turn a recent completion back into a stuck record (never a second effect: the claim stays durable).
    ConfigKey.OUTCOME_SYNCHRONOUS_COMMIT: True,
    ConfigKey.ENABLED: True,
    # The Flask-SQLAlchemy bind (a key of SQLALCHEMY_BINDS) that holds the records; None: the default engine.
    ConfigKey.BIND_KEY: None,
    # The outbox (docs: "The outbox"): failed deliveries of a job before it is dead (an operator decides), and the
    # most a commit waits for its own jobs' hand-off before the response goes on (the rest is the drainer's).
    ConfigKey.OUTBOX_MAX_ATTEMPTS: 10,
    ConfigKey.OUTBOX_HANDOFF_SECONDS: 2.0,
}

#: Methods the layer protects; the key is ignored on every other method.
UNSAFE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})

#: Headers a replay always carries when the original response had them.
BASE_REPLAY_HEADERS = ("Content-Type", "Content-Encoding", "Content-Disposition", "Location", "ETag")

REPLAYED_HEADER = "Idempotent-Replayed"


class State(str, enum.Enum):
    """The state of a record. Stored as its name."""

    IN_PROGRESS = "IN_PROGRESS"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"


class EventKind(str, enum.Enum):
    """What an ``idempotency_events`` row records: everything besides a record's normal path."""

    CONFLICT = "conflict"
    IN_PROGRESS_HIT = "in_progress_hit"
    STALE_HIT = "stale_hit"
    TAKEOVER = "takeover"
    #: A view reached a recovery point (``current_record.checkpoint``): the record page's timeline shows each.
    CHECKPOINT = "checkpoint"
    MARK_RETRYABLE = "mark_retryable"
    MARK_FAILED = "mark_failed"
    ACKNOWLEDGE = "acknowledge"
    RELEASE = "release"
    #: Operator actions on an outbox job (``record_id`` is NULL; ``detail["job"]`` is the job's id).
    OUTBOX_REDELIVER = "outbox_redeliver"
    OUTBOX_DISCARD = "outbox_discard"
    #: Not about one record: how many replays a process answered (``detail["count"]``), for the overview's chart.
    REPLAYS = "replays"
