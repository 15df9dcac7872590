"""flask_idempotent schema version 2: version, kind, summary and acknowledgement columns

Adds the columns of flask_idempotent.models SCHEMA_VERSION 2 to idempotency_records with the extension's own
migration function, so the columns are exactly the model's. Existing records get version 1 and kind 'http'.
Released: never edit it.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-28 15:00:00

"""

from alembic import op

from flask_idempotent.migrations import downgrade_2_to_1, upgrade_1_to_2

# revision identifiers, used by Alembic.
revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade():
    upgrade_1_to_2(op)


def downgrade():
    downgrade_2_to_1(op)
