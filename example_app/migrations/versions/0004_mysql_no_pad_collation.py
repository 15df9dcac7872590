"""flask_idempotent on MySQL and MariaDB: scopes and keys compared byte for byte (nothing changes elsewhere)

0003 gave scope and key utf8mb4_bin, which ignores trailing spaces (PAD SPACE): the scopes "tenant-7 " and
"tenant-7" were one. This gives them the NO PAD binary collation (MariaDB: utf8mb4_nopad_bin, MySQL 8:
utf8mb4_0900_bin), in both tables. On SQLite and PostgreSQL it does nothing.
Released: never edit it.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-08 03:00:00

"""

from alembic import op

from flask_idempotent.migrations import mysql_no_pad_collation

# revision identifiers, used by Alembic.
revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade():
    mysql_no_pad_collation(op)


def downgrade():
    pass  # the NO PAD collation tells apart everything utf8mb4_bin did
