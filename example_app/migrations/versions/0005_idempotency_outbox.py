"""flask_idempotent's outbox: the idempotency_outbox table (jobs staged with idempotency.stage)

A table of its own beside the records' schema version 2; the records and events tables do not change.
Released: never edit it.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-08 04:00:00

"""

from alembic import op

from flask_idempotent.migrations import create_outbox, drop_outbox

# revision identifiers, used by Alembic.
revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade():
    create_outbox(op)


def downgrade():
    drop_outbox(op)
