"""Fixtures: every test that takes ``app`` runs on SQLite and on PostgreSQL, once per PostgreSQL driver.

PostgreSQL: a throwaway database is created on the server named by ``IDEMPOTENCY_TEST_PG_ADMIN_URL`` (default
``postgresql+psycopg2://root@127.0.0.1:5432/postgres``) and dropped afterwards. If the server is unreachable the
PostgreSQL half is skipped, loudly; with ``IDEMPOTENCY_REQUIRE_POSTGRES=1`` (CI) that is a failure instead.

Drivers: ``IDEMPOTENCY_TEST_PG_DRIVERS`` (default ``psycopg2``; ``psycopg2,psycopg`` adds psycopg 3 — not yet
in CI: one psycopg 3 connection of the suite is left open and its ResourceWarning fails a random test) lists the
drivers the ``database_url``
fixture runs on. Its params are ``sqlite``, ``postgresql`` (psycopg2) and ``postgresql-psycopg`` (psycopg 3):
every PostgreSQL id starts with ``postgresql``, so ``-k postgresql`` selects both drivers, ``-k psycopg`` only
psycopg 3, and ``url.startswith("postgresql")`` holds for both URLs. Tests that start real processes from
``postgres_url`` (gunicorn, Celery) stay on the admin URL's driver, psycopg2.

MariaDB: the param ``mariadb`` runs the same tests on a throwaway database of the server named by
``IDEMPOTENCY_TEST_MARIADB_ADMIN_URL`` (default ``mysql+pymysql://root@127.0.0.1:3306/mysql``), skipped loudly
when unreachable and failed instead with ``IDEMPOTENCY_REQUIRE_MARIADB=1`` (CI). ``IDEMPOTENCY_TEST_DATABASES``
(default ``sqlite,postgresql,mariadb``) lists the families ``database_url`` runs on: ``-k mariadb`` or
``IDEMPOTENCY_TEST_DATABASES=mariadb`` selects MariaDB only.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone

import pytest
import sqlalchemy as sa
from flask import Flask
from testapp import Controls, build_app

PG_ADMIN_URL = os.environ.get("IDEMPOTENCY_TEST_PG_ADMIN_URL", "postgresql+psycopg2://root@127.0.0.1:5432/postgres")
REQUIRE_POSTGRES = os.environ.get("IDEMPOTENCY_REQUIRE_POSTGRES") == "1"
#: ``database_url`` param -> SQLAlchemy driver name, for the drivers ``IDEMPOTENCY_TEST_PG_DRIVERS`` lists.
PG_DRIVER_PARAMS = {"psycopg2": "postgresql", "psycopg": "postgresql-psycopg"}
PG_DRIVERS = [d.strip() for d in os.environ.get("IDEMPOTENCY_TEST_PG_DRIVERS", "psycopg2").split(",") if d.strip()]
if unknown := set(PG_DRIVERS) - set(PG_DRIVER_PARAMS):
    raise ValueError(
        f"IDEMPOTENCY_TEST_PG_DRIVERS: unknown driver(s) {sorted(unknown)}; known: {list(PG_DRIVER_PARAMS)}"
    )
MARIADB_ADMIN_URL = os.environ.get("IDEMPOTENCY_TEST_MARIADB_ADMIN_URL", "mysql+pymysql://root@127.0.0.1:3306/mysql")
REQUIRE_MARIADB = os.environ.get("IDEMPOTENCY_REQUIRE_MARIADB") == "1"
DATABASE_FAMILIES = {
    "sqlite": ["sqlite"],
    "postgresql": [PG_DRIVER_PARAMS[d] for d in PG_DRIVERS],
    "mariadb": ["mariadb"],
}
TEST_DATABASES = [
    d.strip() for d in os.environ.get("IDEMPOTENCY_TEST_DATABASES", ",".join(DATABASE_FAMILIES)).split(",") if d.strip()
]
if unknown := set(TEST_DATABASES) - set(DATABASE_FAMILIES):
    raise ValueError(f"IDEMPOTENCY_TEST_DATABASES: unknown {sorted(unknown)}; known: {list(DATABASE_FAMILIES)}")
DATABASE_PARAMS = [param for family in TEST_DATABASES for param in DATABASE_FAMILIES[family]]
PG_SKIP_REASON = "PostgreSQL not reachable"
MARIADB_SKIP_REASON = "MariaDB not reachable"


class Clock:
    """Moves the database's clock as the layer sees it: the offset ``Idempotency(clock_offset=...)`` adds.

    The database decides every lease and expiry with its own clock; a test moves that clock forward by hand
    (``advance``) instead of waiting. ``now`` is the host's reading of it (the same machine's clock), for
    stored times a test writes or compares within a margin.
    """

    def __init__(self) -> None:
        self.offset = timedelta(0)

    def __call__(self) -> timedelta:
        return self.offset

    def advance(self, **kwargs: float) -> None:
        self.offset += timedelta(**kwargs)

    @property
    def now(self) -> datetime:
        return datetime.now(timezone.utc).replace(tzinfo=None) + self.offset

    def reads(self, stored: datetime, plus: timedelta = timedelta(0), margin: float = 5.0) -> bool:
        """Whether ``stored`` is this clock's time (plus ``plus``) when written: within ``margin`` seconds."""
        return abs((stored - plus - self.now).total_seconds()) <= margin


def throwaway_database(admin_url: str, skip_reason: str, require: str | None, create: str, drop: str) -> Iterator[str]:
    """Create a database on the server of ``admin_url`` (``create``/``drop`` format ``{name}``), yield its URL,
    drop it. An unreachable server skips the test, loudly; fails it instead when the env var ``require`` is set.
    """
    admin = sa.create_engine(admin_url, isolation_level="AUTOCOMMIT")
    try:
        conn = admin.connect()
    except sa.exc.OperationalError as exc:
        admin.dispose()
        message = f"{skip_reason} at {admin_url}: {str(exc).splitlines()[0]}"
        if require:
            pytest.fail(f"{require}=1 but {message}")
        pytest.skip(message)
    name = f"flask_idempotent_test_{uuid.uuid4().hex[:12]}"
    conn.execute(sa.text(create.format(name=name)))
    try:
        yield admin.url.set(database=name).render_as_string(hide_password=False)
    finally:
        conn.execute(sa.text(drop.format(name=name)))
        conn.close()
        admin.dispose()


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    yield from throwaway_database(
        PG_ADMIN_URL,
        PG_SKIP_REASON,
        "IDEMPOTENCY_REQUIRE_POSTGRES" if REQUIRE_POSTGRES else None,
        'CREATE DATABASE "{name}"',
        'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)',
    )


@pytest.fixture(scope="session")
def mariadb_url() -> Iterator[str]:
    """A throwaway database on the MariaDB (or MySQL) server of ``IDEMPOTENCY_TEST_MARIADB_ADMIN_URL``."""
    yield from throwaway_database(
        MARIADB_ADMIN_URL,
        MARIADB_SKIP_REASON,
        "IDEMPOTENCY_REQUIRE_MARIADB" if REQUIRE_MARIADB else None,
        "CREATE DATABASE `{name}` CHARACTER SET utf8mb4",  # the server's default collation: the models set theirs
        "DROP DATABASE IF EXISTS `{name}`",
    )


def with_driver(url: str, driver: str) -> str:
    """``url`` (any PostgreSQL URL) on the SQLAlchemy driver ``driver`` (``psycopg2`` or ``psycopg``)."""
    return sa.make_url(url).set(drivername=f"postgresql+{driver}").render_as_string(hide_password=False)


@pytest.fixture(params=DATABASE_PARAMS)
def database_url(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A database URL per param: ``sqlite``, ``postgresql`` (psycopg2), ``postgresql-psycopg`` (psycopg 3),
    ``mariadb`` (PyMySQL).

    Tests may also pick one by indirect parametrization (``["postgresql"]``): that one runs whatever the env says.
    """
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path_factory.mktemp('db') / 'test.db'}"
    if request.param == "mariadb":
        return str(request.getfixturevalue("mariadb_url"))
    url = str(request.getfixturevalue("postgres_url"))
    driver = {"postgresql": "psycopg2", "postgresql-psycopg": "psycopg"}[request.param]
    return with_driver(url, driver)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def controls() -> Controls:
    return Controls()


@pytest.fixture
def app_config() -> dict[str, object]:
    """Override in a test module (or parametrize) to change the app's config."""
    return {}


@pytest.fixture
def app(database_url: str, clock: Clock, controls: Controls, app_config: dict[str, object]) -> Iterator[Flask]:
    app = build_app(database_url, clock=clock, controls=controls, **app_config)
    with app.app_context():
        db = app.extensions["sqlalchemy"]
        db.drop_all()
        db.create_all()
    yield app
    with app.app_context():
        db.drop_all()
        db.engine.dispose()


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    skipped = [r for r in terminalreporter.stats.get("skipped", []) if PG_SKIP_REASON in str(r.longrepr)]
    if skipped:
        terminalreporter.write_sep("!", f"PostgreSQL was SKIPPED for {len(skipped)} tests: only SQLite was tested")
        terminalreporter.write_line(f"  {PG_SKIP_REASON} at {PG_ADMIN_URL}; set IDEMPOTENCY_TEST_PG_ADMIN_URL")
    skipped = [r for r in terminalreporter.stats.get("skipped", []) if MARIADB_SKIP_REASON in str(r.longrepr)]
    if skipped:
        terminalreporter.write_sep("!", f"MariaDB was SKIPPED for {len(skipped)} tests")
        where = f"{MARIADB_SKIP_REASON} at {MARIADB_ADMIN_URL}"
        terminalreporter.write_line(f"  {where}; set IDEMPOTENCY_TEST_MARIADB_ADMIN_URL")
