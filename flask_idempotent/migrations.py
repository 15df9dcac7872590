"""Schema migrations of the extension's tables (docs: "Upgrading from schema version 1 to 2").

A released schema version is never edited: each later version comes with a function here that upgrades an
existing installation from the version before it, usable two ways:

- in an Alembic (Flask-Migrate) revision of the app: ``upgrade_1_to_2(op)`` with Alembic's ``op``;
- without migrations: ``flask idempotency upgrade-schema`` (:func:`upgrade_schema`).

Version 1 → 2 adds ``version``, ``kind``, ``summary``, ``acknowledged_at`` and ``acknowledged_by`` to
``idempotency_records``. Existing rows get ``version = 1`` and ``kind = 'http'`` from the columns' server
defaults; nothing else changes, so records written by version 1 replay, conflict and show as stuck as before.
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from sqlalchemy.schema import CreateColumn

from .models import RECORDS_TABLE, v2_columns


def upgrade_1_to_2(op: Any) -> None:
    """Call from an Alembic revision's ``upgrade()`` with its ``op``: adds the version-2 columns."""
    for column in v2_columns():
        op.add_column(RECORDS_TABLE, column)


def downgrade_2_to_1(op: Any) -> None:
    """Call from an Alembic revision's ``downgrade()``: drops the version-2 columns again."""
    with op.batch_alter_table(RECORDS_TABLE) as batch:
        for column in reversed(v2_columns()):
            batch.drop_column(column.name)


def upgrade_schema(engine: sa.Engine) -> list[str]:
    """Bring the records table of ``engine``'s database to the current schema; return the columns added.

    For apps without migrations (``create_all``). Each missing column of a later version is added with
    ``ALTER TABLE ... ADD COLUMN`` in one transaction; a table already current is left alone.
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
    return added
