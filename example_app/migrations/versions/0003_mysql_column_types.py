"""flask_idempotent on MySQL and MariaDB: the models' column types there (nothing changes elsewhere)

0001 was generated before the extension supported MySQL: there it created DATETIME (whole seconds), BLOB
(64 KiB) and case-insensitive scopes and keys. This gives those columns the types the models carry for MySQL
and MariaDB (DATETIME(6), LONGBLOB, utf8mb4_bin). On SQLite and PostgreSQL it does nothing.
Released: never edit it.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-28 18:00:00

"""

from alembic import op

from flask_idempotent.migrations import mysql_column_types

# revision identifiers, used by Alembic.
revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade():
    mysql_column_types(op)


def downgrade():
    pass  # the MySQL types hold everything the older ones did
