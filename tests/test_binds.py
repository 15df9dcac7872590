"""``IDEMPOTENCY_BIND_KEY``: the records live on a Flask-SQLAlchemy bind, and atomic mode refuses writes that
reach another bind than the records' (docs: configuration, record "Where records live", modes).

Each test runs on two SQLite files and on two throwaway PostgreSQL databases: the app's default database holds
its ``charges``, the bind ``records`` its ``payments`` and (with ``IDEMPOTENCY_BIND_KEY = "records"``) the
extension's tables.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any

import pytest
import sqlalchemy as sa
from conftest import throwaway_database
from flask import Flask, jsonify, request
from flask_sqlalchemy import SQLAlchemy
from helpers import problem_code
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from flask_idempotent import ConfigurationError, Idempotency, idempotent
from flask_idempotent import operations as ops

TABLES = {"idempotency_records", "idempotency_events", "idempotency_outbox"}


@pytest.fixture(params=["sqlite", "postgresql"])
def urls(request: pytest.FixtureRequest, tmp_path: Any) -> Iterator[tuple[str, str]]:
    """Two databases: the app's default one and the one of the bind ``records``."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'default.db'}", f"sqlite:///{tmp_path / 'records.db'}"
        return
    with throwaway_database() as default, throwaway_database() as records:
        yield default, records


class Offset:
    """The database's clock as the layer sees it, moved by the test (``clock_offset``)."""

    def __init__(self) -> None:
        self.value = timedelta(0)

    def __call__(self) -> timedelta:
        return self.value


def build(urls: tuple[str, str], *, create: bool = True, **config: Any) -> Flask:
    default, records = urls
    app = Flask(__name__)
    app.config.update(
        SQLALCHEMY_DATABASE_URI=default,
        SQLALCHEMY_BINDS={"records": records},
        TESTING=True,
        SECRET_KEY="test",
    )
    app.config.update({"IDEMPOTENCY_BIND_KEY": "records", **config})

    class Base(DeclarativeBase):
        pass

    db = SQLAlchemy(model_class=Base)

    class Charge(db.Model):  # type: ignore[name-defined,misc]
        __tablename__ = "charges"  # the default bind
        id: Mapped[int] = mapped_column(primary_key=True)
        amount: Mapped[int]

    class Payment(db.Model):  # type: ignore[name-defined,misc]
        __tablename__ = "payments"
        __bind_key__ = "records"
        id: Mapped[int] = mapped_column(primary_key=True)
        amount: Mapped[int]

    db.init_app(app)

    @app.teardown_request
    def end_session(exc: BaseException | None) -> None:
        db.session.remove()

    clock = Offset()
    idempotency = Idempotency(app, db, clock_offset=clock)
    app.extensions["test"] = {"db": db, "idempotency": idempotency, "clock": clock}

    def amount() -> int:
        return int((request.get_json(silent=True) or {}).get("amount", 0))

    @app.post("/charges")
    @idempotent
    def charge() -> Any:  # leased: the view commits its own writes, on the default bind
        row = Charge(amount=amount())
        db.session.add(row)
        db.session.commit()
        return jsonify(id=row.id), 201

    @app.post("/atomic/payments")
    @idempotent(atomic=True)
    def atomic_payment() -> Any:  # writes on the bind "records"
        row = Payment(amount=amount())
        db.session.add(row)
        db.session.flush()
        return jsonify(id=row.id), 201

    @app.post("/atomic/charges")
    @idempotent(atomic=True)
    def atomic_charge() -> Any:  # writes on the default bind; how it writes is the query argument
        how = request.args.get("how", "add")
        if how == "update":
            db.session.execute(sa.update(Charge).values(amount=Charge.amount + 1))
        elif how == "both":  # a payment next to the records as well: it is not committed either
            db.session.add_all([Payment(amount=amount()), Charge(amount=amount())])
        else:
            db.session.add(Charge(amount=amount()))
            if how == "flush":
                db.session.flush()  # already sent when the layer looks: noted at the flush
        return jsonify(ok=True), 201

    @app.post("/atomic/reads")
    @idempotent(atomic=True)
    def atomic_read() -> Any:  # reads the default bind, writes on the bind "records": one database is written
        count = db.session.query(Charge).count()
        db.session.add(Payment(amount=count))
        return jsonify(count=count), 201

    if create:
        with app.app_context():
            db.create_all()
    return app


@pytest.fixture
def make_app(urls: tuple[str, str]) -> Iterator[Callable[..., Flask]]:
    apps: list[Flask] = []

    def make(**config: Any) -> Flask:
        app = build(urls, **config)
        apps.append(app)
        return app

    yield make
    for app in apps:
        with app.app_context():
            db = app.extensions["test"]["db"]
            db.drop_all()
            for engine in db.engines.values():
                engine.dispose()


def tables(url: str) -> set[str]:
    engine = sa.create_engine(url)
    try:
        return set(sa.inspect(engine).get_table_names())
    finally:
        engine.dispose()


def rows(url: str, table: str) -> list[dict[str, Any]]:
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            return [dict(r._mapping) for r in conn.execute(sa.text(f"SELECT * FROM {table} ORDER BY id"))]
    finally:
        engine.dispose()


def post(client: Any, path: str, key: str, amount: int = 5) -> Any:
    return client.post(path, json={"amount": amount}, headers={"Idempotency-Key": key})


def test_records_and_events_live_on_the_bind_only(make_app: Callable[..., Flask], urls: tuple[str, str]) -> None:
    default, records = urls
    app = make_app()
    client = app.test_client()

    first = post(client, "/charges", "k-1")
    assert first.status_code == 201
    replay = post(client, "/charges", "k-1")
    assert replay.status_code == 201 and replay.headers["Idempotent-Replayed"] == "true"
    assert replay.get_json() == first.get_json()
    conflict = post(client, "/charges", "k-1", amount=6)
    assert conflict.status_code == 422 and problem_code(conflict) == "key-reused"

    assert tables(default) == {"charges"}
    assert tables(records) == {"payments", *TABLES}
    assert len(rows(default, "charges")) == 1  # the view ran once
    (stored,) = rows(records, "idempotency_records")
    assert (stored["key"], stored["state"], stored["response_status"]) == ("k-1", "COMPLETED", 201)
    assert [e["kind"] for e in rows(records, "idempotency_events")] == ["conflict"]


def test_create_all_creates_the_tables_on_the_bind_only(urls: tuple[str, str]) -> None:
    default, records = urls
    app = build(urls, create=False)
    try:
        with app.app_context():
            app.extensions["test"]["idempotency"].create_all()
        assert tables(default) == set()
        assert tables(records) == TABLES
        with app.app_context():
            db = app.extensions["test"]["db"]
            db.create_all(bind_key=None)  # the default bind's metadata does not hold them
            assert tables(default) == {"charges"}
            assert tables(records) == TABLES
            db.create_all(bind_key="records")
            assert tables(records) == {"payments", *TABLES}
            # Flask-Migrate's multi-database template reads them per bind, from db.metadatas.
            assert set(db.metadatas["records"].tables) >= TABLES
            assert not TABLES & set(db.metadatas[None].tables)
            assert db.metadatas["records"].tables["idempotency_records"].info == {"bind_key": "records"}
    finally:
        with app.app_context():
            db = app.extensions["test"]["db"]
            db.drop_all()
            for engine in db.engines.values():
                engine.dispose()


def test_the_cli_and_the_operations_read_and_purge_the_bind(
    make_app: Callable[..., Flask], urls: tuple[str, str]
) -> None:
    default, records = urls
    app = make_app()
    assert post(app.test_client(), "/charges", "k-1").status_code == 201
    (stored,) = rows(records, "idempotency_records")
    runner = app.test_cli_runner()

    stats = runner.invoke(args=["idempotency", "stats", "--json"])
    assert stats.exit_code == 0, stats.output
    assert json.loads(stats.output)["by_state"]["COMPLETED"] == 1
    shown = runner.invoke(args=["idempotency", "show", str(stored["id"]), "--json"])
    assert shown.exit_code == 0, shown.output
    assert json.loads(shown.output)["key"] == "k-1"
    with app.app_context():
        assert ops.get(stored["id"])["key"] == "k-1"
        assert [r["key"] for r in ops.search("k-1").items] == ["k-1"]

    app.extensions["test"]["clock"].value = timedelta(days=2)  # past the 24 h ttl
    purged = runner.invoke(args=["idempotency", "purge", "--json"])
    assert purged.exit_code == 0, purged.output
    assert json.loads(purged.output) == {"deleted": 1, "outbox_deleted": 0}
    assert rows(records, "idempotency_records") == []
    assert len(rows(default, "charges")) == 1

    # An operator action writes there too, with its audit event.
    assert post(app.test_client(), "/charges", "k-2").status_code == 201
    (second,) = rows(records, "idempotency_records")
    released = runner.invoke(args=["idempotency", "release", str(second["id"]), "--yes", "--json"])
    assert released.exit_code == 0, released.output
    assert rows(records, "idempotency_records") == []
    assert [e["kind"] for e in rows(records, "idempotency_events")] == ["release"]


def test_the_dashboard_reads_the_bind(make_app: Callable[..., Flask], urls: tuple[str, str]) -> None:
    app = make_app()
    app.extensions["test"]["idempotency"].dashboard_access(lambda: "ops")
    client = app.test_client()
    assert post(client, "/charges", "k-dash").status_code == 201
    (stored,) = rows(urls[1], "idempotency_records")
    page = client.get(f"/idempotency/records/{stored['id']}")
    assert page.status_code == 200 and "k-dash" in page.get_data(as_text=True)
    found = client.get("/idempotency/search?q=k-dash")
    assert found.status_code == 200 and f"/records/{stored['id']}" in found.get_data(as_text=True)


def test_once_keeps_its_record_on_the_bind(make_app: Callable[..., Flask], urls: tuple[str, str]) -> None:
    default, records = urls
    app = make_app()
    idempotency = app.extensions["test"]["idempotency"]
    runs = []
    for _ in range(2):
        with app.app_context(), idempotency.once("refunds", "r-1", command={"amount": 3}) as op:
            if not op.done:
                runs.append(1)
                op.complete({"refunded": 3})
            result = op.result
    assert runs == [1] and result == {"refunded": 3}
    assert [(r["scope"], r["key"], r["state"]) for r in rows(records, "idempotency_records")] == [
        ("refunds", "r-1", "COMPLETED")
    ]
    assert "idempotency_records" not in tables(default)


def test_a_task_keeps_its_record_on_the_bind(make_app: Callable[..., Flask], urls: tuple[str, str]) -> None:
    app = make_app()
    runs = []

    @app.extensions["test"]["idempotency"].task(key=lambda refund_id: f"refund-{refund_id}", scope="tasks")
    def refund(refund_id: int) -> dict[str, int]:
        runs.append(refund_id)
        return {"refunded": refund_id}

    with app.app_context():
        assert refund(7) == refund(7) == {"refunded": 7}
    assert runs == [7]
    assert [(r["kind"], r["key"]) for r in rows(urls[1], "idempotency_records")] == [("task", "refund-7")]


def test_an_atomic_view_writing_on_the_records_bind_commits_once(
    make_app: Callable[..., Flask], urls: tuple[str, str]
) -> None:
    app = make_app()
    client = app.test_client()
    first = post(client, "/atomic/payments", "a-1")
    assert first.status_code == 201
    replay = post(client, "/atomic/payments", "a-1")
    assert replay.headers["Idempotent-Replayed"] == "true" and replay.get_json() == first.get_json()
    assert len(rows(urls[1], "payments")) == 1
    assert [r["state"] for r in rows(urls[1], "idempotency_records")] == ["COMPLETED"]
    # Reading the default bind is no write there.
    assert post(client, "/atomic/reads", "a-2").status_code == 201
    assert len(rows(urls[1], "payments")) == 2


@pytest.mark.parametrize("how", ["add", "flush", "update", "both"])
def test_an_atomic_view_writing_on_another_bind_is_refused_and_nothing_is_committed(
    make_app: Callable[..., Flask], urls: tuple[str, str], how: str
) -> None:
    default, records = urls
    app = make_app()
    client = app.test_client()
    if how == "update":  # something for the UPDATE to change
        assert post(client, "/charges", "seed").status_code == 201
    before = rows(default, "charges")
    records_before = rows(records, "idempotency_records")

    for _ in range(2):  # a retry is refused the same way: nothing was stored
        response = post(client, f"/atomic/charges?how={how}", "x-1")
        assert response.status_code == 500
        assert problem_code(response) == "commit-failed"
        detail = response.get_json()["detail"]
        assert "the default bind" in detail and "'records'" in detail

    assert rows(default, "charges") == before
    assert rows(records, "payments") == []
    assert rows(records, "idempotency_records") == records_before
    assert not any(r["key"] == "x-1" for r in rows(records, "idempotency_events"))


def test_records_on_the_default_bind_refuse_an_atomic_write_on_another_bind(
    make_app: Callable[..., Flask], urls: tuple[str, str]
) -> None:
    default, records = urls
    app = make_app(IDEMPOTENCY_BIND_KEY=None)
    response = post(app.test_client(), "/atomic/payments", "p-1")
    assert response.status_code == 500 and problem_code(response) == "commit-failed"
    assert "the bind 'records'" in response.get_json()["detail"]
    assert rows(records, "payments") == []
    assert rows(default, "idempotency_records") == []
    assert tables(default) >= TABLES and not TABLES & tables(records)


def test_a_leased_view_writing_on_another_bind_is_served(make_app: Callable[..., Flask], urls: tuple[str, str]) -> None:
    default, records = urls
    app = make_app()
    client = app.test_client()
    for key in ("l-1", "l-2"):
        assert post(client, "/charges", key).status_code == 201
    assert post(client, "/charges", "l-1").headers["Idempotent-Replayed"] == "true"
    assert len(rows(default, "charges")) == 2
    assert [r["key"] for r in rows(records, "idempotency_records")] == ["l-1", "l-2"]


@pytest.mark.parametrize("value", ["missing", "", 7])
def test_a_bind_key_missing_from_sqlalchemy_binds_is_refused_at_init_app(tmp_path: Any, value: Any) -> None:
    app = Flask(__name__)
    app.config.update(
        SQLALCHEMY_DATABASE_URI=f"sqlite:///{tmp_path / 'a.db'}",
        SQLALCHEMY_BINDS={"records": f"sqlite:///{tmp_path / 'b.db'}"},
        IDEMPOTENCY_BIND_KEY=value,
    )
    db = SQLAlchemy()
    db.init_app(app)
    with pytest.raises(ConfigurationError, match="IDEMPOTENCY_BIND_KEY") as caught:
        Idempotency(app, db)
    assert repr(value) in str(caught.value)
    assert "idempotency" not in app.extensions
    with app.app_context():
        for engine in db.engines.values():
            engine.dispose()


# The template's env.py tries Flask-SQLAlchemy 2's get_engine() first (deprecated in 3.x), then engines[key].
@contextlib.contextmanager
def logging_restored() -> Iterator[None]:
    """Undo what ``logging.config.fileConfig`` (Flask-Migrate's ``env.py``) does to this process's logging: it
    disables every logger that exists (``flask_idempotent`` among them) and replaces the root's handlers, which
    would silence the log assertions of every later test in the session."""
    loggers = [lg for lg in logging.Logger.manager.loggerDict.values() if isinstance(lg, logging.Logger)]
    saved = [(lg, lg.disabled, lg.level, list(lg.handlers), lg.propagate) for lg in [logging.root, *loggers]]
    try:
        yield
    finally:
        for lg, disabled, level, handlers, propagate in saved:
            lg.disabled, lg.propagate = disabled, propagate
            lg.setLevel(level)
            lg.handlers[:] = handlers


@pytest.mark.filterwarnings("ignore:'get_engine' is deprecated:DeprecationWarning")
def test_flask_db_upgrade_of_a_multi_database_set_up_creates_them_on_the_bind_only(
    urls: tuple[str, str], tmp_path: Any
) -> None:
    """Flask-Migrate's multi-database template (``flask db init --multidb``): autogenerate, then upgrade."""
    import flask_migrate

    default, records = urls
    app = build(urls, create=False)
    flask_migrate.Migrate(app, app.extensions["test"]["db"])
    directory = str(tmp_path / "migrations")
    try:
        with app.app_context(), logging_restored():  # env.py's fileConfig() disables every existing logger
            flask_migrate.init(directory, multidb=True)
            flask_migrate.migrate(directory, message="initial")
            flask_migrate.upgrade(directory)
        assert tables(default) == {"alembic_version", "charges"}
        assert tables(records) == {"alembic_version", "payments", *TABLES}
        assert post(app.test_client(), "/charges", "m-1").status_code == 201
        assert [r["key"] for r in rows(records, "idempotency_records")] == ["m-1"]
    finally:
        with app.app_context():
            db = app.extensions["test"]["db"]
            db.drop_all()
            for url in urls:
                engine = sa.create_engine(url)
                with engine.begin() as conn:
                    conn.execute(sa.text("DROP TABLE IF EXISTS alembic_version"))
                engine.dispose()
            for engine in db.engines.values():
                engine.dispose()
