"""The extension instances the example app shares across its modules (bound to an app in ``create_app``)."""

from __future__ import annotations

import sqlalchemy as sa
from flask_migrate import Migrate
from flask_sqlalchemy import SQLAlchemy
from sqlalchemy.orm import DeclarativeBase

from flask_idempotent import Idempotency

# Named constraints: Alembic's batch mode (SQLite) can only alter or drop a constraint it can name.
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = sa.MetaData(naming_convention=NAMING_CONVENTION)


db = SQLAlchemy(model_class=Base)
migrate = Migrate()
#: ``init_app`` adds the extension's tables to ``db.metadata``, so the app's migrations carry them.
idempotency = Idempotency()
