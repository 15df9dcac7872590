"""Fixtures: every test that takes ``app`` runs on SQLite and on PostgreSQL, once per PostgreSQL driver.

PostgreSQL: a throwaway database is created on the server named by ``IDEMPOTENCY_TEST_PG_ADMIN_URL`` (default
``postgresql+psycopg2://root@127.0.0.1:5432/postgres``) and dropped afterwards. If the server is unreachable the
PostgreSQL half is skipped, loudly; with ``IDEMPOTENCY_REQUIRE_POSTGRES=1`` (CI) that is a failure instead.

Drivers: ``IDEMPOTENCY_TEST_PG_DRIVERS`` (default ``psycopg2``; ``psycopg2,psycopg`` adds psycopg 3, as CI does)
lists the drivers the ``database_url`` fixture runs on. Its params are ``sqlite``, ``postgresql`` (psycopg2) and
``postgresql-psycopg`` (psycopg 3): every PostgreSQL id starts with ``postgresql``, so ``-k postgresql`` selects
both drivers, ``-k postgresql-psycopg`` only psycopg 3, and ``url.startswith("postgresql")`` holds for both URLs.
Tests that start real processes from ``postgres_url`` (gunicorn, Celery) stay on the admin URL's driver,
psycopg2. psycopg 3 warns when an open connection is garbage-collected (an engine nobody disposed):
this file's ``pytest_runtest_teardown`` makes a test that left one open fail itself, not a random later one.

Distributed-SQL emulation: ``IDEMPOTENCY_TEST_PG_VARIANTS`` (default none; CI: all) lists PostgreSQL databases
configured like CockroachDB or YugabyteDB would behave, each a throwaway database of its own (psycopg2):

- ``serializable``: ``default_transaction_isolation = serializable``: every conflict is a 40001 to retry;
- ``nolocks``: serializable, and no advisory locks: ``pg_try_advisory_xact_lock`` raises "undefined function"
  (a stub ahead of ``pg_catalog`` on the ``search_path``), and the app runs with
  ``IDEMPOTENCY_ADVISORY_LOCKS = False`` (CockroachDB);
- ``grantall``: read committed, and ``pg_try_advisory_xact_lock`` always grants (a stub): correctness may not
  rest on the lock.

Their ``database_url`` params are ``postgresql-serializable`` and so on; they run only in the modules that opt
in with ``PG_VARIANTS = True`` (the concurrency, lease, atomic, model, crash, storm and serializable tests), and
``database_config`` is the config a variant's app needs (``app`` applies it).

MariaDB: the param ``mariadb`` runs the same tests on a throwaway database of the server named by
``IDEMPOTENCY_TEST_MARIADB_ADMIN_URL`` (default ``mysql+pymysql://root@127.0.0.1:3306/mysql``), skipped loudly
when unreachable and failed instead with ``IDEMPOTENCY_REQUIRE_MARIADB=1`` (CI). ``IDEMPOTENCY_TEST_DATABASES``
(default ``sqlite,postgresql,mariadb``) lists the families ``database_url`` runs on: ``-k mariadb`` or
``IDEMPOTENCY_TEST_DATABASES=mariadb`` selects MariaDB only.

Galera: ``galera_cluster`` (session) starts a 3-node MariaDB Galera cluster on loopback (``tests/galera.py``)
the first time a test asks for it, and stops it at the end of the session. Skipped loudly when ``galera-4``,
``rsync`` or ``mariadb-server`` is missing; failed instead with ``IDEMPOTENCY_REQUIRE_GALERA=1`` (CI).
"""

from __future__ import annotations

import contextlib
import fnmatch
import gc
import os
import uuid
import warnings
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pytest
import sqlalchemy as sa
from flask import Flask
from testapp import Controls, build_app

from flask_idempotent.testing import LeaseClock

if TYPE_CHECKING:
    from galera import GaleraCluster

PG_ADMIN_URL = os.environ.get("IDEMPOTENCY_TEST_PG_ADMIN_URL", "postgresql+psycopg2://root@127.0.0.1:5432/postgres")
REQUIRE_POSTGRES = os.environ.get("IDEMPOTENCY_REQUIRE_POSTGRES") == "1"
#: ``database_url`` param -> SQLAlchemy driver name, for the drivers ``IDEMPOTENCY_TEST_PG_DRIVERS`` lists.
PG_DRIVER_PARAMS = {"psycopg2": "postgresql", "psycopg": "postgresql-psycopg"}
PG_DRIVERS = [d.strip() for d in os.environ.get("IDEMPOTENCY_TEST_PG_DRIVERS", "psycopg2").split(",") if d.strip()]
if unknown := set(PG_DRIVERS) - set(PG_DRIVER_PARAMS):
    raise ValueError(
        f"IDEMPOTENCY_TEST_PG_DRIVERS: unknown driver(s) {sorted(unknown)}; known: {list(PG_DRIVER_PARAMS)}"
    )
#: Variant -> (SQL run in its fresh database, the app config it needs).
PG_VARIANT_SETUP: dict[str, tuple[tuple[str, ...], dict[str, object]]] = {
    "serializable": (("ALTER DATABASE {db} SET default_transaction_isolation = 'serializable'",), {}),
    "nolocks": (
        (
            "ALTER DATABASE {db} SET default_transaction_isolation = 'serializable'",
            "CREATE SCHEMA no_advisory_locks",
            "CREATE FUNCTION no_advisory_locks.pg_try_advisory_xact_lock(bigint) RETURNS boolean LANGUAGE plpgsql"
            " AS $$ BEGIN RAISE EXCEPTION 'function pg_try_advisory_xact_lock(bigint) does not exist'"
            " USING ERRCODE = '42883'; END $$",
            "ALTER DATABASE {db} SET search_path = public, no_advisory_locks, pg_catalog",
        ),
        {"IDEMPOTENCY_ADVISORY_LOCKS": False},
    ),
    "grantall": (
        (
            "CREATE SCHEMA always_granting",
            "CREATE FUNCTION always_granting.pg_try_advisory_xact_lock(bigint) RETURNS boolean LANGUAGE sql"
            " AS 'SELECT true'",
            "ALTER DATABASE {db} SET search_path = public, always_granting, pg_catalog",
        ),
        {},
    ),
}
PG_VARIANTS = [v.strip() for v in os.environ.get("IDEMPOTENCY_TEST_PG_VARIANTS", "").split(",") if v.strip()]
if unknown := set(PG_VARIANTS) - set(PG_VARIANT_SETUP):
    raise ValueError(
        f"IDEMPOTENCY_TEST_PG_VARIANTS: unknown variant(s) {sorted(unknown)}; known: {list(PG_VARIANT_SETUP)}"
    )
MARIADB_ADMIN_URL = os.environ.get("IDEMPOTENCY_TEST_MARIADB_ADMIN_URL", "mysql+pymysql://root@127.0.0.1:3306/mysql")
REQUIRE_MARIADB = os.environ.get("IDEMPOTENCY_REQUIRE_MARIADB") == "1"
REQUIRE_GALERA = os.environ.get("IDEMPOTENCY_REQUIRE_GALERA") == "1"
DATABASE_FAMILIES = {
    "sqlite": ["sqlite"],
    "postgresql": [*(PG_DRIVER_PARAMS[d] for d in PG_DRIVERS), *(f"postgresql-{v}" for v in PG_VARIANTS)],
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
GALERA_SKIP_REASON = "Galera: "  # every reason galera.missing() gives starts so


@dataclass(frozen=True)
class Server:
    """Where the throwaway databases of one kind of server are made, and how."""

    admin_url: str
    skip_reason: str
    require: str  # the env var that turns an unreachable server from a skip into a failure
    required: bool
    quote: str
    create: str
    drop: str


SERVERS = {
    "postgresql": Server(
        PG_ADMIN_URL,
        PG_SKIP_REASON,
        "IDEMPOTENCY_REQUIRE_POSTGRES",
        REQUIRE_POSTGRES,
        '"',
        "CREATE DATABASE {db}",
        "DROP DATABASE IF EXISTS {db} WITH (FORCE)",
    ),
    "mariadb": Server(
        MARIADB_ADMIN_URL,
        MARIADB_SKIP_REASON,
        "IDEMPOTENCY_REQUIRE_MARIADB",
        REQUIRE_MARIADB,
        "`",
        "CREATE DATABASE {db} CHARACTER SET utf8mb4",  # the server's default collation: the models set theirs
        "DROP DATABASE IF EXISTS {db}",
    ),
}


@contextlib.contextmanager
def throwaway_database(setup: tuple[str, ...] = (), server: str = "postgresql") -> Iterator[str]:
    """A fresh database on ``server`` (its URL), with ``setup`` run in it (``{db}``: its quoted name); dropped
    after. An unreachable server skips the test, loudly (fails it when its ``IDEMPOTENCY_REQUIRE_*`` is set)."""
    kind = SERVERS[server]
    admin = sa.create_engine(kind.admin_url, isolation_level="AUTOCOMMIT")
    try:
        conn = admin.connect()
    except sa.exc.OperationalError as exc:
        admin.dispose()
        message = f"{kind.skip_reason} at {kind.admin_url}: {str(exc).splitlines()[0]}"
        if kind.required:
            pytest.fail(f"{kind.require}=1 but {message}")
        pytest.skip(message)
    name = f"flask_idempotent_test_{uuid.uuid4().hex[:12]}"
    quoted = f"{kind.quote}{name}{kind.quote}"
    conn.execute(sa.text(kind.create.replace("{db}", quoted)))
    url = admin.url.set(database=name).render_as_string(hide_password=False)
    try:
        if setup:
            engine = sa.create_engine(url, isolation_level="AUTOCOMMIT")
            with engine.connect() as own:
                for statement in setup:
                    own.execute(sa.text(statement.replace("{db}", quoted)))
            engine.dispose()
        yield url
    finally:
        conn.execute(sa.text(kind.drop.replace("{db}", quoted)))
        conn.close()
        admin.dispose()


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    with throwaway_database() as url:
        yield url


@pytest.fixture(scope="session")
def mariadb_url() -> Iterator[str]:
    """A throwaway database on the MariaDB (or MySQL) server of ``IDEMPOTENCY_TEST_MARIADB_ADMIN_URL``."""
    with throwaway_database(server="mariadb") as url:
        yield url


@pytest.fixture(scope="session")
def galera_cluster() -> Iterator[GaleraCluster]:
    """A 3-node MariaDB Galera cluster on 127.0.0.1 (``tests/galera.py``), started once per session."""
    import galera  # here, not at the top: it imports PyMySQL, which a SQLite-only run never needs

    reason = galera.missing()
    if reason is not None:
        if REQUIRE_GALERA:
            pytest.fail(f"IDEMPOTENCY_REQUIRE_GALERA=1 but {reason}")
        pytest.skip(reason)
    with galera.running_cluster() as cluster:
        yield cluster


@pytest.fixture(scope="session")
def pg_variant_urls() -> Iterator[Callable[[str], str]]:
    """Variant name -> the URL of its database (made on first use, one per session)."""
    with contextlib.ExitStack() as stack:
        urls: dict[str, str] = {}

        def url_of(variant: str) -> str:
            if variant not in urls:
                urls[variant] = stack.enter_context(throwaway_database(PG_VARIANT_SETUP[variant][0]))
            return urls[variant]

        yield url_of


@pytest.fixture(scope="module", params=["postgresql", *PG_VARIANTS])
def pg_database(request: pytest.FixtureRequest) -> tuple[str, dict[str, object]]:
    """For tests that serve real processes: the shared PostgreSQL test database (``postgres_url``), then each
    variant's, with the app config it needs."""
    if request.param == "postgresql":
        return str(request.getfixturevalue("postgres_url")), {}
    return str(request.getfixturevalue("pg_variant_urls")(request.param)), dict(PG_VARIANT_SETUP[request.param][1])


def faultapp_env(config: dict[str, object]) -> dict[str, str]:
    """The fault app's environment for a variant's app config (``tests/faultapp.py``)."""
    return {"FAULTAPP_ADVISORY_LOCKS": "1" if config.get("IDEMPOTENCY_ADVISORY_LOCKS", True) else "0"}


#: Test modules that start other processes (gunicorn, Celery workers, a Galera cluster, faketime'd hosts),
#: browsers or virtual environments: marked ``slow``, so ``pytest -m "not slow"`` is the inner loop
#: (docs/running-tests.md). CI runs everything.
SLOW_MODULES = (
    "test_galera",
    "test_wheel",
    "test_readme_commands",
    "test_readme_example",
    "test_*browser*",
    "test_*real_servers*",
    "test_*processes*",
    "test_faults_*",
    "test_celery_tasks",
    "test_two_hosts_clock",
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark the slow modules' tests ``slow``; variant databases only for the modules that opt in
    (``PG_VARIANTS = True``): the rest would only cost time."""
    for item in items:
        if any(fnmatch.fnmatch(item.path.stem, pattern) for pattern in SLOW_MODULES):
            item.add_marker(pytest.mark.slow)
    if not PG_VARIANTS:
        return
    variants = {f"postgresql-{v}" for v in PG_VARIANTS} | set(PG_VARIANTS)
    keep, drop = [], []
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        on_variant = params.get("database_url") in variants or params.get("pg_database") in variants
        opted_in = getattr(getattr(item, "module", None), "PG_VARIANTS", False)
        (drop if on_variant and not opted_in else keep).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


def with_driver(url: str, driver: str) -> str:
    """``url`` (any PostgreSQL URL) on the SQLAlchemy driver ``driver`` (``psycopg2`` or ``psycopg``)."""
    return sa.make_url(url).set(drivername=f"postgresql+{driver}").render_as_string(hide_password=False)


@pytest.fixture(params=DATABASE_PARAMS)
def database_url(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A database URL per param: ``sqlite``, ``postgresql`` (psycopg2), ``postgresql-psycopg`` (psycopg 3),
    ``mariadb`` (PyMySQL), the PostgreSQL variants.

    Tests may also pick one by indirect parametrization (``["postgresql"]``): that one runs whatever the env says.
    """
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path_factory.mktemp('db') / 'test.db'}"
    if request.param == "mariadb":
        return str(request.getfixturevalue("mariadb_url"))
    variant = request.param.removeprefix("postgresql-")
    if variant in PG_VARIANT_SETUP:
        return str(request.getfixturevalue("pg_variant_urls")(variant))
    url = str(request.getfixturevalue("postgres_url"))
    driver = {"postgresql": "psycopg2", "postgresql-psycopg": "psycopg"}[request.param]
    return with_driver(url, driver)


@pytest.fixture
def database_config(request: pytest.FixtureRequest) -> dict[str, object]:
    """The app config the test's database needs: a variant's (``nolocks``: advisory locks off), else none."""
    param = getattr(request.node, "callspec", None) and request.node.callspec.params.get("database_url")
    variant = str(param or "").removeprefix("postgresql-")
    return dict(PG_VARIANT_SETUP[variant][1]) if variant in PG_VARIANT_SETUP else {}


#: Weak references to the psycopg 3 connections the suite's pools opened that were still open at the last check.
_psycopg_connections: list[weakref.ref[Any]] = []


@sa.event.listens_for(sa.pool.Pool, "connect")
def _track_psycopg_connection(dbapi_connection: Any, _record: Any) -> None:
    if type(dbapi_connection).__module__.partition(".")[0] == "psycopg":  # psycopg.Connection, not psycopg2
        _psycopg_connections.append(weakref.ref(dbapi_connection))


def _still_open(ref: weakref.ref[Any]) -> bool:
    conn = ref()
    return conn is not None and not conn.closed


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item: pytest.Item) -> Iterator[None]:
    """A test that leaves a psycopg 3 connection open fails itself, instead of a random later test.

    psycopg 3 warns (``ResourceWarning``) when an open connection is garbage-collected, e.g. one still in the
    pool of an engine nobody disposed; under ``filterwarnings = error`` that warning fails whichever test runs
    when the collector gets to it. So after each test's teardown (its fixtures', pytest-flask's included), if a
    psycopg 3 connection that any pool opened is still open, the collector runs here and a warning it raises
    fails this test's teardown. When every connection was closed (engines disposed) there is nothing to
    collect, and the collection (about 0.1 s) is skipped. psycopg2 closes such connections silently.
    """
    result = yield
    _psycopg_connections[:] = filter(_still_open, _psycopg_connections)
    if not _psycopg_connections:
        return result
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        gc.collect()
    _psycopg_connections[:] = filter(_still_open, _psycopg_connections)
    left_open = [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)]
    if left_open:
        pytest.fail(f"{len(left_open)} psycopg 3 connection(s) left open (dispose the engine): {left_open}")
    return result


@pytest.fixture
def clock() -> LeaseClock:
    """The shipped lease clock; ``app`` reads it from the start (its ``clock_offset``)."""
    return LeaseClock()


@pytest.fixture
def controls() -> Controls:
    return Controls()


@pytest.fixture
def app_config() -> dict[str, object]:
    """Override in a test module (or parametrize) to change the app's config."""
    return {}


@pytest.fixture
def app(
    database_url: str,
    clock: LeaseClock,
    controls: Controls,
    app_config: dict[str, object],
    database_config: dict[str, object],
) -> Iterator[Flask]:
    app = build_app(database_url, clock=clock, controls=controls, **{**database_config, **app_config})
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
    skipped = [r for r in terminalreporter.stats.get("skipped", []) if GALERA_SKIP_REASON in str(r.longrepr)]
    if skipped:
        terminalreporter.write_sep("!", f"the MariaDB Galera cluster was SKIPPED for {len(skipped)} tests")
        reason = str(skipped[0].longrepr[-1]).removeprefix("Skipped: ")
        terminalreporter.write_line(f"  {reason}; IDEMPOTENCY_REQUIRE_GALERA=1 fails instead")
