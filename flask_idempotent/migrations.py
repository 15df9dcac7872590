"""Schema migrations of the extension's tables (docs: "Upgrading from schema version 1 to 2").

A released schema version is never edited: each later version comes with a function here that upgrades an
existing installation from the version before it, usable two ways:

- in an Alembic (Flask-Migrate) revision of the app: ``upgrade_1_to_2(op)`` with Alembic's ``op``;
- without migrations: ``flask idempotency upgrade-schema`` (:func:`upgrade_schema`).

Version 1 → 2 adds ``version``, ``kind``, ``summary``, ``acknowledged_at`` and ``acknowledged_by`` to
``idempotency_records``. Existing rows get ``version = 1`` and ``kind = 'http'`` from the columns' server
defaults; nothing else changes, so records written by version 1 replay, conflict and show as stuck as before.

MySQL and MariaDB: :func:`mysql_column_types` gives tables that a migration written before MySQL was supported
created there the column types the models now carry for it, and :func:`mysql_no_pad_collation` scopes and keys
compared byte for byte where an older release created them ``utf8mb4_bin`` (no schema version of their own:
elsewhere nothing changes). ``upgrade_schema`` does the latter too.

The outbox (docs: "The outbox") is a table of its own beside schema version 2: :func:`create_outbox` in a
revision, or ``upgrade_schema``, creates ``idempotency_outbox`` where it is missing.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import sqlalchemy as sa
from sqlalchemy.schema import CreateColumn

from .models import (
    OUTBOX_INDEXES,
    OUTBOX_TABLE,
    RECORDS_TABLE,
    define_outbox,
    define_tables,
    no_pad_collation,
    outbox_columns,
    v2_columns,
)

#: SQLAlchemy's names for a MySQL or MariaDB server.
_MYSQL_DIALECTS = ("mysql", "mariadb")


def upgrade_1_to_2(op: Any) -> None:
    """Call from an Alembic revision's ``upgrade()`` with its ``op``: adds the version-2 columns."""
    for column in v2_columns():
        op.add_column(RECORDS_TABLE, column)


def downgrade_2_to_1(op: Any) -> None:
    """Call from an Alembic revision's ``downgrade()``: drops the version-2 columns again."""
    with op.batch_alter_table(RECORDS_TABLE) as batch:
        for column in reversed(v2_columns()):
            batch.drop_column(column.name)


def create_outbox(op: Any) -> None:
    """Call from an Alembic revision's ``upgrade()``: creates the ``idempotency_outbox`` table and its indexes."""
    op.create_table(OUTBOX_TABLE, *outbox_columns())
    for name, columns in OUTBOX_INDEXES:
        op.create_index(name, OUTBOX_TABLE, list(columns))


def drop_outbox(op: Any) -> None:
    """Call from an Alembic revision's ``downgrade()``: drops the outbox table (its jobs with it)."""
    op.drop_table(OUTBOX_TABLE)


def mysql_column_types(op: Any) -> None:
    """Call from an Alembic revision's ``upgrade()``: on MySQL and MariaDB, the models' column types there.

    A migration generated from the models before they carried MySQL variants created ``DATETIME`` (whole
    seconds), ``BLOB`` (64 KiB) and scopes and keys in the server's case-insensitive collation. This modifies
    those columns to ``DATETIME(6)``, ``LONGBLOB`` and ``utf8mb4_bin``; on any other database it does nothing.
    Run it before the tables hold records: rows that differ only in case would collide on the unique index.
    """
    _modify_to_model(op, lambda column: isinstance(column.type, (sa.DateTime, sa.LargeBinary)) or _is_name(column))


def mysql_no_pad_collation(op: Any) -> None:
    """Call from an Alembic revision's ``upgrade()``: on MySQL and MariaDB, scopes and keys compared byte for byte.

    Tables created before this release hold ``scope`` and ``key`` in ``utf8mb4_bin``, which ignores trailing
    spaces (PAD SPACE): the scopes ``"tenant-7 "`` and ``"tenant-7"`` were one. This modifies them, in both
    tables, to the NO PAD binary collation (:func:`~flask_idempotent.models.no_pad_collation`: MariaDB's
    ``utf8mb4_nopad_bin``, MySQL 8's ``utf8mb4_0900_bin``). Safe on a table in use: rows unique under the old
    collation are unique under the new one. On any other database it does nothing.
    """
    _modify_to_model(op, _is_name)


def _is_name(column: sa.Column[Any]) -> bool:
    return column.name in ("scope", "key")


def _modify_to_model(op: Any, which: Callable[[sa.Column[Any]], bool]) -> None:
    """On MySQL and MariaDB, restate the columns ``which`` picks with the models' types (elsewhere: nothing)."""
    dialect = op.get_bind().dialect
    if dialect.name not in _MYSQL_DIALECTS:
        return
    tables = define_tables(sa.MetaData())
    for table in (tables.records, tables.events):
        for column in table.c:
            if which(column):
                # The model's type: Alembic compiles its MySQL variant. MODIFY restates the whole column.
                op.alter_column(table.name, column.name, type_=column.type, existing_nullable=column.nullable)


def upgrade_schema(engine: sa.Engine) -> list[str]:
    """Bring the records table of ``engine``'s database to the current schema; return the columns added.

    For apps without migrations (``create_all``). Each missing column of a later version is added with
    ``ALTER TABLE ... ADD COLUMN`` in one transaction; a table already current is left alone. On MySQL and
    MariaDB, scopes and keys in another collation get the NO PAD binary one (as :func:`mysql_no_pad_collation`),
    listed as ``table.column COLLATE name``. A missing outbox table is created (listed as its name).
    """
    with engine.begin() as conn:
        inspector = sa.inspect(conn)
        if not inspector.has_table(RECORDS_TABLE):
            raise LookupError(f"there is no {RECORDS_TABLE} table to upgrade: create it with create_all()")
        present = {column["name"] for column in inspector.get_columns(RECORDS_TABLE)}
        added = []
        for column in v2_columns():
            if column.name in present:
                continue
            sa.Table(RECORDS_TABLE, sa.MetaData(), column)  # binds the column to a table for its DDL
            ddl = CreateColumn(column).compile(dialect=conn.dialect)
            table = conn.dialect.identifier_preparer.quote(RECORDS_TABLE)
            conn.execute(sa.text(f"ALTER TABLE {table} ADD COLUMN {ddl}"))
            added.append(column.name)
        if conn.dialect.name in _MYSQL_DIALECTS:
            added += _no_pad_names(conn)
        if not inspector.has_table(OUTBOX_TABLE):
            define_outbox(sa.MetaData()).create(conn)
            added.append(OUTBOX_TABLE)
    return added


def _no_pad_names(conn: sa.Connection) -> list[str]:
    """``ALTER TABLE ... MODIFY`` each scope and key column not yet in the NO PAD binary collation."""
    wanted = no_pad_collation(conn.dialect)
    quote = conn.dialect.identifier_preparer.quote
    changed = []
    tables = define_tables(sa.MetaData())
    for table in (tables.records, tables.events):
        present = {c["name"]: c for c in sa.inspect(conn).get_columns(table.name)}
        for column in filter(_is_name, table.c):
            if getattr(present[column.name]["type"], "collation", None) == wanted:
                continue
            ddl = column.type.compile(dialect=conn.dialect)
            conn.execute(sa.text(f"ALTER TABLE {quote(table.name)} MODIFY {quote(column.name)} {ddl} NOT NULL"))
            changed.append(f"{table.name}.{column.name} COLLATE {wanted}")
    return changed
