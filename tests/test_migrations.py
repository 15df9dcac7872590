"""Flask-Migrate: the example app's migrations create the extension's tables with the app's own, and autogenerate
stays clean afterwards, on SQLite, PostgreSQL and MariaDB.

The schema decision under test: the extension's tables live on the app's ``db.metadata`` as versioned models
(``flask_idempotent.models.SCHEMA_VERSION``), so the app's own migrations carry them and the app's autogenerate
sees them as its own: it never proposes to drop them.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import flask_migrate
import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata, produce_migrations, render_python_code
from alembic.migration import MigrationContext
from flask import Flask
from sqlalchemy.dialects import mysql
from sqlalchemy.dialects.mysql import mariadb
from sqlalchemy.schema import CreateTable

import example_app
from example_app import MIGRATIONS_DIR, create_app
from flask_idempotent.models import EVENTS_TABLE, OUTBOX_TABLE, RECORDS_TABLE, SCHEMA_VERSION, define_tables

EXTENSION_TABLES = {RECORDS_TABLE, EVENTS_TABLE, OUTBOX_TABLE}
APP_TABLES = {"users", "api_tokens", "accounts", "payments", "transfers", "provider_charges", "receipts"}


def reset_database(url: str) -> None:
    """Leave the database empty, alembic_version included (the PostgreSQL and MariaDB test databases are shared
    per session)."""
    if url.startswith("sqlite"):
        return  # a fresh SQLite file per test
    engine = sa.create_engine(url, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        if url.startswith("postgresql"):
            conn.execute(sa.text("DROP SCHEMA public CASCADE"))
            conn.execute(sa.text("CREATE SCHEMA public"))
        else:
            everything = sa.MetaData()
            everything.reflect(conn)
            everything.drop_all(conn)
    engine.dispose()


@pytest.fixture
def empty(database_url: str) -> Iterator[Flask]:
    """The example app on an empty database (nothing migrated yet)."""
    reset_database(database_url)
    app = create_app({"TESTING": True, "DATABASE_URL": database_url, "SECRET_KEY": "test"})
    yield app
    with app.app_context():
        example_app.db.engine.dispose()
    reset_database(database_url)


@pytest.fixture
def upgraded(empty: Flask) -> Flask:
    with empty.app_context():
        flask_migrate.upgrade()
    return empty


def table_names(app: Flask) -> set[str]:
    with app.app_context():
        return set(sa.inspect(example_app.db.engine).get_table_names())


def autogenerate_diff(app: Flask, metadata: sa.MetaData | None = None) -> list[Any]:
    """What ``flask db migrate`` would put in a new revision, with the options the app's env.py uses."""
    with app.app_context():
        options = dict(app.extensions["migrate"].configure_args)
        options.pop("process_revision_directives", None)
        with example_app.db.engine.connect() as conn:
            context = MigrationContext.configure(conn, opts={"compare_type": True, **options})
            return list(compare_metadata(context, metadata if metadata is not None else example_app.db.metadata))


def test_upgrade_from_an_empty_database_creates_the_app_and_extension_tables(empty: Flask) -> None:
    assert table_names(empty) == set()

    with empty.app_context():
        flask_migrate.upgrade()
        with example_app.db.engine.connect() as conn:
            current = MigrationContext.configure(conn).get_current_heads()

    assert table_names(empty) == APP_TABLES | EXTENSION_TABLES | {"alembic_version"}
    assert current == ("0006",)
    with empty.app_context():
        inspector = sa.inspect(example_app.db.engine)
        unique = {tuple(c["column_names"]) for c in inspector.get_unique_constraints(RECORDS_TABLE)}
        assert ("scope", "key") in unique  # the constraint correctness rests on


@pytest.mark.parametrize("database_url", ["mariadb"], indirect=True)
def test_revision_0004_gives_pad_space_scopes_and_keys_the_no_pad_collation(empty: Flask) -> None:
    with empty.app_context():
        flask_migrate.upgrade(revision="0003")
        with example_app.db.engine.begin() as conn:  # what 0003 of the releases before this one left
            for table in (RECORDS_TABLE, EVENTS_TABLE):
                for column in ("scope", "key"):
                    conn.execute(
                        sa.text(f"ALTER TABLE {table} MODIFY `{column}` VARCHAR(255) NOT NULL COLLATE utf8mb4_bin")
                    )
            conn.execute(
                sa.text(
                    f"INSERT INTO {RECORDS_TABLE} (scope, `key`, request_hash, method, path, state, retryable,"
                    " attempts, event_count, created_at, updated_at, expires_at) VALUES ('tenant-7', 'k-1', 'v1:x',"
                    " 'POST', '/payments', 'COMPLETED', 0, 1, 0, NOW(6), NOW(6), NOW(6) + INTERVAL 1 DAY)"
                )
            )
    diff = [change for change in autogenerate_diff(empty) if isinstance(change, list)]  # not 0005's outbox
    changes = [(change[0][0], change[0][3]) for change in diff]  # it sees the collation
    assert sorted(changes) == [("modify_type", "key")] * 2 + [("modify_type", "scope")] * 2
    with empty.app_context():
        flask_migrate.upgrade()
        with example_app.db.engine.begin() as conn:
            collations = conn.execute(
                sa.text(
                    "SELECT DISTINCT collation_name FROM information_schema.columns WHERE table_schema = DATABASE()"
                    " AND table_name LIKE 'idempotency%' AND column_name IN ('scope', 'key')"
                )
            ).scalars()
            assert list(collations) == ["utf8mb4_nopad_bin"]
            # The record written before the upgrade keeps its scope; a padded scope is another one now.
            conn.execute(
                sa.text(
                    f"INSERT INTO {RECORDS_TABLE} (scope, `key`, request_hash, method, path, state, retryable,"
                    " attempts, event_count, created_at, updated_at, expires_at) VALUES ('tenant-7 ', 'k-1', 'v1:x',"
                    " 'POST', '/payments', 'COMPLETED', 0, 1, 0, NOW(6), NOW(6), NOW(6) + INTERVAL 1 DAY)"
                )
            )
            scopes = conn.execute(sa.text(f"SELECT scope FROM {RECORDS_TABLE} ORDER BY id")).scalars()
            assert list(scopes) == ["tenant-7", "tenant-7 "]
    assert autogenerate_diff(empty) == []


def test_autogenerate_after_upgrade_finds_nothing_to_change(upgraded: Flask) -> None:
    assert autogenerate_diff(upgraded) == []


def test_flask_db_migrate_after_upgrade_writes_no_revision(upgraded: Flask, tmp_path: Path) -> None:
    # Into a copy of the migrations, so a wrongly generated revision never lands in the package.
    directory = tmp_path / "migrations"
    shutil.copytree(MIGRATIONS_DIR, directory, ignore=shutil.ignore_patterns("__pycache__"))
    before = sorted(p.name for p in (directory / "versions").glob("*.py"))

    result = upgraded.test_cli_runner().invoke(args=["db", "migrate", "-d", str(directory), "-m", "nothing"])

    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (directory / "versions").glob("*.py")) == before


def test_an_apps_autogenerate_never_drops_the_extension_tables(upgraded: Flask) -> None:
    # The app adds a model: its next revision adds that table and touches nothing of the extension's.
    metadata = sa.MetaData()
    for table in example_app.db.metadata.tables.values():
        table.to_metadata(metadata)
    sa.Table("refunds", metadata, sa.Column("id", sa.Integer, primary_key=True), sa.Column("amount", sa.BigInteger))

    diff = autogenerate_diff(upgraded, metadata)

    assert [(op[0], op[1].name) for op in diff] == [("add_table", "refunds")]


def test_without_the_extension_on_the_metadata_autogenerate_would_drop_its_tables(upgraded: Flask) -> None:
    # Why init_app must run before env.py reads the metadata (it does: create_app calls it).
    metadata = sa.MetaData()
    for table in example_app.db.metadata.tables.values():
        if table.name not in EXTENSION_TABLES:
            table.to_metadata(metadata)

    dropped = {op[1].name for op in autogenerate_diff(upgraded, metadata) if op[0] == "remove_table"}

    assert dropped == EXTENSION_TABLES


def test_downgrade_to_base_leaves_an_empty_database(upgraded: Flask, database_url: str) -> None:
    if database_url.startswith("mysql"):
        # The example's released 0001 (as Alembic generated it) drops the transfers' indexes before the table,
        # and MySQL refuses to drop an index a foreign key needs. The extension's own downgrades run above.
        pytest.skip("the example app's 0001 downgrade is refused by MySQL/MariaDB (error 1553)")
    with upgraded.app_context():
        flask_migrate.downgrade(revision="base")
    assert table_names(upgraded) <= {"alembic_version"}


def test_a_revision_autogenerated_from_the_models_needs_only_sqlalchemy() -> None:
    # An app's first `flask db migrate` renders the extension's tables into its revision: a type of this package
    # would render as `flask_idempotent.models.X(...)`, which the revision does not import (a NameError).
    metadata = sa.MetaData()
    define_tables(metadata)
    engine = sa.create_engine("sqlite://")
    with engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"target_metadata": metadata})
        imports: set[str] = set()
        code = render_python_code(produce_migrations(context, metadata).upgrade_ops, imports=imports)
    engine.dispose()
    assert "flask_idempotent" not in code and "collation='utf8mb4_nopad_bin'" in code
    assert imports <= {"from sqlalchemy.dialects import mysql"}, imports


def test_scopes_and_keys_get_each_servers_no_pad_collation_and_other_columns_theirs() -> None:
    metadata = sa.MetaData()
    tables = define_tables(metadata)
    own = sa.Table("own", metadata, sa.Column("name", mysql.VARCHAR(40, collation="utf8mb4_bin")))
    on_mysql = str(CreateTable(tables.records).compile(dialect=mysql.dialect()))
    on_mariadb = str(CreateTable(tables.records).compile(dialect=mariadb.MariaDBDialect()))
    assert on_mysql.count("COLLATE utf8mb4_0900_bin") == 2 and "nopad" not in on_mysql  # MySQL 8's name
    assert on_mariadb.count("COLLATE utf8mb4_nopad_bin") == 2
    assert "COLLATE utf8mb4_bin" in str(CreateTable(own).compile(dialect=mysql.dialect()))  # an app's own: as is


def test_the_migrations_match_the_extensions_schema_version() -> None:
    # A new schema version of flask_idempotent ships upgrade notes; the example gets a new revision for it
    # (0001 and 0002 are released and never edited). This test fails first, as a reminder.
    revisions = sorted(p.stem for p in (Path(MIGRATIONS_DIR) / "versions").glob("*.py"))
    assert SCHEMA_VERSION == 2, "a new schema version needs a new revision here"
    assert revisions == [
        "0001_initial",
        "0002_idempotency_schema_2",
        "0003_mysql_column_types",
        "0004_mysql_no_pad_collation",
        "0005_idempotency_outbox",
        "0006_receipts",
    ], revisions
    text = (Path(MIGRATIONS_DIR) / "versions" / "0001_initial.py").read_text()
    assert f"'{RECORDS_TABLE}'" in text or f'"{RECORDS_TABLE}"' in text
    assert "render_as_batch" not in text  # batch mode comes from env.py's configure args, not from the revision
