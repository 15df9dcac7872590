"""The extension's tables: ``idempotency_records``, ``idempotency_events`` and ``idempotency_outbox``.

They are defined on the metadata of the records' bind (the application's own ``db.metadata``, or
``db.metadatas[IDEMPOTENCY_BIND_KEY]``) so ``db.create_all()``, Flask-Migrate and Alembic's
autogenerate see them like the app's own tables (and never try to drop them). Times are naive UTC.

Schema version 2 (version 1 plus ``version``, ``kind``, ``summary``, ``acknowledged_at`` and
``acknowledged_by``). A released schema is never edited in place: a change adds a new version and a migration
(:mod:`flask_idempotent.migrations`; the docs' "Upgrading from schema version 1 to 2").
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import mysql
from sqlalchemy.ext.compiler import compiles

SCHEMA_VERSION = 2

RECORDS_TABLE = "idempotency_records"
EVENTS_TABLE = "idempotency_events"
#: Jobs staged with ``idempotency.stage()`` (docs: "The outbox"). A table of its own, added beside the records'
#: schema version 2: installations that never stage a job need nothing; the others create it (a migration that
#: calls ``flask_idempotent.migrations.create_outbox``, or ``flask idempotency upgrade-schema``).
OUTBOX_TABLE = "idempotency_outbox"

_BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")  # SQLite autoincrements INTEGER only

# MySQL and MariaDB (never supported before these variants, so no installed table changes with them):
# DATETIME keeps whole seconds unless told otherwise, and leases, ordering and expiry need microseconds.
_Time = sa.DateTime().with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb")
# A BLOB holds 64 KiB; a stored response may be up to IDEMPOTENCY_MAX_RESPONSE_BYTES.
_Body = sa.LargeBinary().with_variant(mysql.LONGBLOB(), "mysql", "mariadb")


def storable_text(text: str, length: int | None = None) -> str:
    """``text`` in a form every store holds, cut to ``length`` characters (docs: "The record", stored text).

    A client can put any character in a path (``%00``), a ``describe=`` summary or an error message. PostgreSQL's
    text cannot hold NUL, and no store's UTF-8 can hold a lone surrogate (``"\\ud800"`` in a JSON body): those
    are stored escaped, in Python's spelling (NUL as the four characters ``\\x00``, a surrogate as
    ``\\udXXX``), the same on every store. Every other character is stored as it is, control characters
    included (the CLI and the dashboard escape them when they show them). The escape is one-way: stored text is
    for people, and nothing compares it (commands compare by their hash, records by scope and key).
    """
    if "\x00" not in text and (text.isascii() or _encodes(text)):
        return text if length is None else text[:length]
    pieces = [_ESCAPES.get(ch) or (f"\\u{ord(ch):04x}" if "\ud800" <= ch <= "\udfff" else ch) for ch in text]
    if length is not None:
        total = 0
        for count, piece in enumerate(pieces):
            total += len(piece)
            if total > length:  # cut before the piece that does not fit: never half an escape
                pieces = pieces[:count]
                break
    return "".join(pieces)


_ESCAPES = {"\x00": "\\x00"}


def _encodes(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


#: The models' NO PAD binary collation of scopes and keys, in MariaDB's name (MySQL's: :data:`MYSQL_NO_PAD`).
NO_PAD = "utf8mb4_nopad_bin"
MYSQL_NO_PAD = "utf8mb4_0900_bin"


def no_pad_collation(dialect: sa.Dialect) -> str:
    """The MySQL-family collation that compares byte for byte, trailing spaces included (NO PAD).

    ``utf8mb4_bin`` is PAD SPACE: it would make the scopes ``"tenant-7 "`` and ``"tenant-7"`` one. MariaDB names
    its NO PAD binary collation ``utf8mb4_nopad_bin``; MySQL 8.0.17+ ``utf8mb4_0900_bin``.
    """
    return NO_PAD if dialect.is_mariadb else MYSQL_NO_PAD  # type: ignore[attr-defined]


@compiles(mysql.VARCHAR, "mysql")
def _no_pad_by_server(type_: mysql.VARCHAR, compiler: Any, **kw: Any) -> str:
    """``VARCHAR ... COLLATE utf8mb4_nopad_bin`` as the connected server names that collation.

    The models say ``utf8mb4_nopad_bin`` (plain SQLAlchemy types, so that a revision Alembic generates from them
    needs no import of this package); a ``mysql://`` URL may reach MariaDB or MySQL, and only the connection
    tells which (DDL always runs on one). On MySQL, which has no collation of that name, it is spelt
    ``utf8mb4_0900_bin``; every other VARCHAR compiles as SQLAlchemy compiles it.
    """
    if type_.collation == NO_PAD and not compiler.dialect.is_mariadb:
        type_ = copy.copy(type_)
        type_.collation = MYSQL_NO_PAD
    return compiler.visit_VARCHAR(type_, **kw)  # type: ignore[no-any-return]


def _name(length: int) -> sa.types.TypeEngine[str]:
    """A scope or key: compared byte for byte (the servers' default collations ignore case and accents, which
    would make ``Key-1`` and ``key-1`` one key, and ``utf8mb4_bin`` ignores trailing spaces)."""
    return sa.String(length).with_variant(mysql.VARCHAR(length, collation=NO_PAD), "mysql", "mariadb")


def v2_columns() -> list[sa.Column[Any]]:
    """The columns schema version 2 added, as a migration adds them to a version-1 table.

    ``version`` and ``kind`` have server defaults so that existing rows (and a version-1 process still running
    during a rolling deploy) get valid values.
    """
    return [
        # +1 on every write of the record: every change is a compare-and-set on (id, version).
        sa.Column("version", sa.Integer(), nullable=False, server_default=sa.text("1")),
        sa.Column("kind", sa.String(16), nullable=False, server_default="http"),
        sa.Column("summary", sa.String(255), nullable=True),
        sa.Column("acknowledged_at", _Time, nullable=True),
        sa.Column("acknowledged_by", sa.String(255), nullable=True),
    ]


@dataclass(frozen=True)
class Tables:
    """The two tables, as SQLAlchemy Core ``Table`` objects."""

    records: sa.Table
    events: sa.Table
    outbox: sa.Table


def define_tables(metadata: sa.MetaData, bind_key: str | None = None) -> Tables:
    """Add the extension's tables to ``metadata`` (once) and return them.

    ``metadata`` is the one of the bind that holds them (Flask-SQLAlchemy's ``db.metadatas[bind_key]``), so that
    ``db.create_all()`` and Flask-Migrate's multi-database template put them on that bind; ``info["bind_key"]``
    says the same for tools that read it from the table (docs: "Where records live").
    """
    if RECORDS_TABLE in metadata.tables:
        return Tables(metadata.tables[RECORDS_TABLE], metadata.tables[EVENTS_TABLE], metadata.tables[OUTBOX_TABLE])
    info = {"bind_key": bind_key}
    records = sa.Table(
        RECORDS_TABLE,
        metadata,
        sa.Column("id", _BigId, primary_key=True, autoincrement=True),
        sa.Column("scope", _name(255), nullable=False),
        sa.Column("key", _name(255), nullable=False),
        sa.Column("request_hash", sa.String(80), nullable=False),
        sa.Column("method", sa.String(16), nullable=False),
        sa.Column("path", sa.Text(), nullable=False),
        sa.Column("endpoint", sa.String(255), nullable=True),
        *v2_columns(),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("retryable", sa.Boolean(), nullable=False, default=False),
        sa.Column("attempts", sa.Integer(), nullable=False, default=1),
        sa.Column("lease_token", sa.String(64), nullable=True),
        sa.Column("locked_until", _Time, nullable=True),
        sa.Column("recovery_point", sa.String(255), nullable=True),
        sa.Column("recovery_data", sa.JSON(), nullable=True),
        sa.Column("response_status", sa.Integer(), nullable=True),
        sa.Column("response_headers", sa.JSON(), nullable=True),
        sa.Column("response_body", _Body, nullable=True),
        sa.Column("resource_ref", sa.JSON(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        # Events stored or suppressed for this record: the cap on events a client can cause reads it.
        sa.Column("event_count", sa.Integer(), nullable=False, default=0),
        sa.Column("created_at", _Time, nullable=False),
        sa.Column("updated_at", _Time, nullable=False),
        sa.Column("expires_at", _Time, nullable=False),
        sa.UniqueConstraint("scope", "key", name="uq_idempotency_records_scope_key"),
        # Stuck records: IN_PROGRESS ordered by lease; FAILED lists by state and age.
        sa.Index("ix_idempotency_records_state_locked_until", "state", "locked_until"),
        sa.Index("ix_idempotency_records_state_updated_at", "state", "updated_at"),
        sa.Index("ix_idempotency_records_expires_at", "expires_at"),
        # Dashboard search by key or by scope, newest first: each walks its index in id order and stops at the
        # page (the unique (scope, key) index cannot give a scope's records in id order).
        sa.Index("ix_idempotency_records_key", "key", "id"),
        sa.Index("ix_idempotency_records_scope_id", "scope", "id"),
        info=info,
    )
    events = sa.Table(
        EVENTS_TABLE,
        metadata,
        sa.Column("id", _BigId, primary_key=True, autoincrement=True),
        # No foreign key: the audit trail outlives a released (deleted) record.
        sa.Column("record_id", sa.BigInteger(), nullable=True),
        sa.Column("scope", _name(255), nullable=False),
        sa.Column("key", _name(255), nullable=False),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("actor", sa.String(255), nullable=True),
        sa.Column("detail", sa.JSON(), nullable=True),
        sa.Column("created_at", _Time, nullable=False),
        sa.Index("ix_idempotency_events_record_id", "record_id", "id"),
        sa.Index("ix_idempotency_events_kind_created_at", "kind", "created_at"),
        sa.Index("ix_idempotency_events_scope_key", "scope", "key"),
        info=dict(info),
    )
    return Tables(records, events, define_outbox(metadata, bind_key))


def define_outbox(metadata: sa.MetaData, bind_key: str | None = None) -> sa.Table:
    """The outbox table on ``metadata``, next to the records (it commits with an atomic view's record): one row
    per staged job (docs: "The outbox")."""
    return sa.Table(
        OUTBOX_TABLE,
        metadata,
        *outbox_columns(),
        *(sa.Index(name, *columns) for name, columns in OUTBOX_INDEXES),
        info={"bind_key": bind_key},
    )


#: The outbox's indexes: what a drainer takes (PENDING jobs that are due, in staging order); the earlier PENDING
#: ordered jobs of a scope, which an ordered job waits for; delivered jobs to purge.
OUTBOX_INDEXES = (
    ("ix_idempotency_outbox_state_available_at", ("state", "available_at")),
    ("ix_idempotency_outbox_scope_id", ("scope", "id")),
    ("ix_idempotency_outbox_expires_at", ("expires_at",)),
)


def outbox_columns() -> list[Any]:
    """The outbox's columns and unique constraint, new objects on each call (a migration creates them)."""
    return [
        sa.Column("id", _BigId, primary_key=True, autoincrement=True),
        sa.Column("scope", _name(255), nullable=False),
        # The job's key (``outbox:<uuid>``): the Celery task id of its delivery, the once() key of a handler's.
        sa.Column("key", _name(255), nullable=False),
        sa.Column("target", sa.String(255), nullable=False),  # the Celery task's or the handler's name
        sa.Column("kind", sa.String(16), nullable=False),  # celery | handler
        sa.Column("args", sa.JSON(), nullable=False),
        sa.Column("kwargs", sa.JSON(), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),  # PENDING | DELIVERED | DEAD
        sa.Column("attempts", sa.Integer(), nullable=False, default=0),
        # +1 on every write: every change is a compare-and-set on (id, version), a delivery's also on its lease.
        sa.Column("version", sa.Integer(), nullable=False, default=1),
        sa.Column("lease_token", sa.String(64), nullable=True),
        sa.Column("locked_until", _Time, nullable=True),
        sa.Column("available_at", _Time, nullable=False),  # countdown/eta and backoff: not delivered before
        sa.Column("ordered", sa.Boolean(), nullable=False, default=False),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("created_at", _Time, nullable=False),
        sa.Column("updated_at", _Time, nullable=False),
        sa.Column("delivered_at", _Time, nullable=True),
        sa.Column("expires_at", _Time, nullable=True),  # set on delivery: purged after the ttl
        sa.UniqueConstraint("key", name="uq_idempotency_outbox_key"),
    ]
