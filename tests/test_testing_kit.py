"""The testing kit (``flask_idempotent.testing``) and the ``IDEMPOTENCY_ENABLED`` switch.

Each helper runs against a correct route, where it passes and the database holds what it should, and against
deliberately broken routes, where it must fail with a message naming the mistake: ``@idempotent`` above the
route decorator, an atomic view that commits, no ``scope_loader`` with two clients, no ``@idempotent`` at all.
"""

from __future__ import annotations

import subprocess
import sys
import threading
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from faultapp import create_app as faultapp_create_app
from faultapp import drop_tables, reset_database, snapshot
from flask import Flask, jsonify, request, request_finished
from flask_sqlalchemy import SQLAlchemy
from procs import Gunicorn
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from werkzeug.serving import make_server

from flask_idempotent import ConfigurationError, Idempotency, current_record, idempotent, operations
from flask_idempotent.testing import (
    LeaseClock,
    assert_idempotent,
    crash_after_effect,
    duplicate_burst,
    store_outage,
    view_runs,
)

ALICE = {"X-User": "alice"}
BOB = {"X-User": "bob"}


def make_app(
    database_url: str, *, scope_loader: bool = True, misplaced: bool = False, **config: Any
) -> tuple[Flask, SQLAlchemy]:
    """An app with correct routes and the broken ones the kit must catch."""
    app = Flask(__name__)
    app.config.update({"SQLALCHEMY_DATABASE_URI": database_url, "TESTING": True, **config})

    class Base(DeclarativeBase):
        pass

    db = SQLAlchemy(model_class=Base)

    class Effect(db.Model):  # type: ignore[name-defined,misc]
        __tablename__ = "effects"
        id: Mapped[int] = mapped_column(primary_key=True)
        route: Mapped[str] = mapped_column(sa.String(64))
        amount: Mapped[int]

    db.init_app(app)
    idempotency = Idempotency()
    idempotency.init_app(app, db)
    app.extensions["kit-test"] = {"db": db, "hold": None}
    if scope_loader:

        @idempotency.scope_loader
        def scope() -> str | None:
            return request.headers.get("X-User")

    def effect(route: str, *, commit: bool) -> Any:
        hold = app.extensions["kit-test"]["hold"]
        if hold is not None:
            hold()
        row = Effect(route=route, amount=int((request.get_json(silent=True) or {}).get("amount", 0)))
        db.session.add(row)
        if commit:
            db.session.commit()
        else:
            db.session.flush()
        return jsonify(id=row.id, route=route, key=current_record.key), 201, {"Location": f"/effects/{row.id}"}

    @app.post("/payments")
    @idempotent
    def payments() -> Any:
        return effect("payments", commit=True)

    @app.post("/transfers")
    @idempotent(atomic=True)
    def transfers() -> Any:
        return effect("transfers", commit=False)

    @app.post("/resumable")
    @idempotent(on_stale="takeover", lease=30)
    def resumable() -> Any:
        return effect("resumable", commit=True)

    @app.post("/committing")
    @idempotent(atomic=True)
    def committing() -> Any:  # broken: an atomic view must not commit
        return effect("committing", commit=True)

    @app.post("/unprotected")
    def unprotected() -> Any:  # broken: no @idempotent
        return effect("unprotected", commit=True)

    if misplaced:

        @idempotent  # broken: above the route decorator
        @app.post("/above")
        def above() -> Any:
            return effect("above", commit=True)

    with app.app_context():
        db.create_all()
    return app, db


@pytest.fixture
def kit_app(database_url: str) -> Iterator[Flask]:
    app, db = make_app(database_url)
    yield app
    with app.app_context():
        db.drop_all()
        db.engine.dispose()


@pytest.fixture
def make(database_url: str) -> Iterator[Any]:
    """Build a variant of the app (``scope_loader=False``, ``misplaced=True``, config...)."""
    built: list[tuple[Flask, SQLAlchemy]] = []

    def build(**options: Any) -> Flask:
        built.append(make_app(database_url, **options))
        return built[-1][0]

    yield build
    for app, db in built:
        with app.app_context():
            db.drop_all()
            db.engine.dispose()


def effects(app: Flask, route: str | None = None) -> int:
    db = app.extensions["kit-test"]["db"]
    with app.app_context(), db.engine.connect() as conn:
        table = db.metadata.tables["effects"]
        query = sa.select(sa.func.count()).select_from(table)
        if route is not None:
            query = query.where(table.c.route == route)
        return int(conn.execute(query).scalar_one())


def records(app: Flask, key: str | None = None) -> list[dict[str, Any]]:
    db = app.extensions["kit-test"]["db"]
    with app.app_context(), db.engine.connect() as conn:
        table = db.metadata.tables["idempotency_records"]
        query = sa.select(table).order_by(table.c.id)
        if key is not None:
            query = query.where(table.c.key == key)
        return [dict(r._mapping) for r in conn.execute(query)]


# assert_idempotent ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/payments", "/transfers"])
def test_assert_idempotent_passes_on_a_correct_route_and_the_effect_happens_once_per_client(
    kit_app: Flask, path: str
) -> None:
    client = kit_app.test_client()
    check = assert_idempotent(client, "POST", path, json={"amount": 5}, headers=ALICE, other_headers=BOB)

    assert check.first.status_code == 201 and check.replay.headers["Idempotent-Replayed"] == "true"
    assert check.conflict.status_code == 422 and check.missing_key is not None
    assert check.missing_key.status_code == 400
    assert check.other_client is not None and check.other_client.status_code == 201
    assert (check.record["state"], check.record["attempts"], check.record["scope"]) == ("COMPLETED", 1, "alice")
    stored = records(kit_app, check.key)
    assert [(r["scope"], r["state"], r["attempts"]) for r in stored] == [
        ("alice", "COMPLETED", 1),
        ("bob", "COMPLETED", 1),
    ]
    assert effects(kit_app, path.strip("/")) == 2  # alice's and bob's: never the replay's or the 422's
    assert view_runs(kit_app, path.strip("/")) == 2


def test_assert_idempotent_proves_an_atomic_route_whose_answer_is_a_4xx(kit_app: Flask) -> None:
    db = kit_app.extensions["kit-test"]["db"]
    effects_table = db.metadata.tables["effects"]

    @kit_app.post("/refused")
    @idempotent(atomic=True)
    def refused() -> Any:
        db.session.execute(effects_table.insert().values(route="refused", amount=request.get_json()["amount"]))
        return jsonify(error="over the limit"), 422

    check = assert_idempotent(kit_app.test_client(), "POST", "/refused", json={"amount": 5}, headers=ALICE)

    assert check.first.status_code == 422 and check.replay.headers["Idempotent-Replayed"] == "true"
    assert (check.record["state"], check.record["response_status"]) == ("COMPLETED", 422)
    assert effects(kit_app, "refused") == 0  # atomic mode rolled back what the 4xx wrote; the record stands alone
    assert view_runs(kit_app, "refused") == 1


def test_assert_idempotent_names_a_decorator_above_the_route(make: Any) -> None:
    app = make(misplaced=True)
    with pytest.raises(AssertionError, match=r"@idempotent is placed above the route decorator on above"):
        assert_idempotent(app.test_client(), "POST", "/above", json={"amount": 5}, headers=ALICE)
    assert effects(app) == 0


def test_assert_idempotent_names_an_atomic_view_that_commits(kit_app: Flask) -> None:
    with pytest.raises(AssertionError, match=r"commits db.session in atomic mode"):
        assert_idempotent(kit_app.test_client(), "POST", "/committing", json={"amount": 5}, headers=ALICE)
    assert effects(kit_app) == 0  # nothing of it was persisted
    (stored,) = records(kit_app)
    assert (stored["state"], stored["retryable"]) == ("FAILED", True)


def test_assert_idempotent_names_two_clients_sharing_a_record_without_a_scope_loader(make: Any) -> None:
    app = make(scope_loader=False)
    with pytest.raises(AssertionError, match=r"two clients share one record \(scope ''\) because no scope_loader"):
        assert_idempotent(app.test_client(), "POST", "/payments", json={"amount": 5}, headers=ALICE, other_headers=BOB)
    assert effects(app) == 1  # bob got alice's payment back instead of his own
    assert len(records(app)) == 1


def test_assert_idempotent_names_a_route_without_the_decorator(kit_app: Flask) -> None:
    with pytest.raises(AssertionError, match=r"'unprotected' has no @idempotent"):
        assert_idempotent(kit_app.test_client(), "POST", "/unprotected", json={"amount": 5})
    assert effects(kit_app) == 0


# duplicate_burst --------------------------------------------------------------------------------------------


@pytest.fixture
def served() -> Iterator[Any]:
    """Serve an app with Werkzeug's threaded server on 127.0.0.1 (a real socket per request)."""
    servers: list[Any] = []

    def serve(app: Flask) -> str:
        server = make_server("127.0.0.1", 0, app, threaded=True)
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        servers.append((server, thread))
        return f"http://127.0.0.1:{server.server_port}"

    yield serve
    for server, thread in servers:
        server.shutdown()
        thread.join(10)
        server.server_close()


def hold_until_duplicates_answered(app: Flask, duplicates: int) -> None:
    """The first request's view waits until ``duplicates`` other requests were answered (no sleeps)."""
    answered = threading.Semaphore(0)

    def count(sender: Any, response: Any, **_: Any) -> None:
        if response.status_code in (409, 503):  # in progress; or SQLite's write lock was busy: not run either
            answered.release()

    def hold() -> None:
        app.extensions["kit-test"]["hold"] = None  # only the first request holds
        for _ in range(duplicates):
            assert answered.acquire(timeout=30), "the duplicates were never answered"

    request_finished.connect(count, app, weak=False)
    app.extensions["kit-test"]["hold"] = hold


def test_duplicate_burst_against_a_served_app_sees_one_execution(kit_app: Flask, served: Any) -> None:
    url = served(kit_app) + "/payments"
    hold_until_duplicates_answered(kit_app, 5)

    burst = duplicate_burst(url, json={"amount": 5}, headers=ALICE, n=6, app=kit_app)

    statuses = sorted(r.status_code for r in burst.replies)
    assert statuses[0] == 201 and set(statuses[1:]) <= {409, 503} and 409 in statuses
    assert effects(kit_app, "payments") == 1
    (stored,) = records(kit_app, burst.key)
    assert (stored["state"], stored["attempts"]) == ("COMPLETED", 1)


def test_duplicate_burst_gives_each_client_its_own_execution(kit_app: Flask, served: Any) -> None:
    url = served(kit_app) + "/payments"
    burst = duplicate_burst(url, json={"amount": 5}, clients=[ALICE, BOB], n=3, app=kit_app)
    assert set(burst.originals) == {0, 1}
    assert sorted(r["scope"] for r in records(kit_app, burst.key)) == ["alice", "bob"]
    assert effects(kit_app, "payments") == 2


def test_duplicate_burst_names_two_clients_sharing_a_record_without_a_scope_loader(make: Any, served: Any) -> None:
    app = make(scope_loader=False)
    url = served(app) + "/payments"
    with pytest.raises(AssertionError, match=r"two clients share one record .*no scope_loader"):
        duplicate_burst(url, json={"amount": 5}, clients=[ALICE, BOB], n=3, app=app)
    assert effects(app, "payments") == 1


def test_duplicate_burst_without_the_app_still_names_two_clients_sharing_a_record(make: Any, served: Any) -> None:
    app = make(scope_loader=False)
    url = served(app) + "/payments"
    with pytest.raises(AssertionError, match=r"Two clients share one record \(one scope\)"):
        duplicate_burst(url, json={"amount": 5}, clients=[ALICE, BOB], n=3)


def test_duplicate_burst_names_a_decorator_above_the_route(make: Any, served: Any) -> None:
    app = make(misplaced=True)
    url = served(app) + "/above"
    with pytest.raises(AssertionError, match=r"@idempotent is placed above the route decorator on above"):
        duplicate_burst(url, json={"amount": 5}, headers=ALICE, n=4, app=app)
    assert effects(app) == 0


def test_duplicate_burst_names_an_atomic_view_that_commits(kit_app: Flask, served: Any) -> None:
    url = served(kit_app) + "/committing"
    with pytest.raises(AssertionError, match=r"commits db.session in atomic mode"):
        duplicate_burst(url, json={"amount": 5}, headers=ALICE, n=4, app=kit_app)
    assert effects(kit_app, "committing") == 0


def test_duplicate_burst_names_an_unprotected_route(kit_app: Flask, served: Any) -> None:
    url = served(kit_app) + "/unprotected"
    with pytest.raises(AssertionError, match=r"4 of 4 requests were executed.*No record was stored"):
        duplicate_burst(url, json={"amount": 5}, headers=ALICE, n=4, app=kit_app)
    assert effects(kit_app, "unprotected") == 4


# crash_after_effect -----------------------------------------------------------------------------------------


def test_crash_after_effect_leased_route_is_in_progress_then_stuck(kit_app: Flask) -> None:
    clock = LeaseClock()
    try:
        crash = crash_after_effect(
            kit_app.test_client(), "POST", "/payments", clock=clock, json={"amount": 5}, headers=ALICE
        )
    finally:
        clock.uninstall()
    assert crash.left is not None and crash.left["state"] == "IN_PROGRESS"
    assert crash.while_live is not None and crash.while_live.status_code == 409
    assert crash.after_expiry.status_code == 409
    assert crash.after_expiry.get_json()["type"].endswith("stuck")
    (stored,) = records(kit_app, crash.key)
    assert (stored["state"], stored["attempts"]) == ("IN_PROGRESS", 1)
    assert effects(kit_app, "payments") == 1  # the crashed request's effect, never repeated


def test_crash_after_effect_takeover_route_runs_again_after_the_lease(kit_app: Flask, lease_clock: LeaseClock) -> None:
    crash = crash_after_effect(
        kit_app.test_client(), "POST", "/resumable", clock=lease_clock, json={"amount": 5}, headers=ALICE
    )
    assert crash.after_expiry.status_code == 201
    (stored,) = records(kit_app, crash.key)
    assert (stored["state"], stored["attempts"]) == ("COMPLETED", 2)
    assert effects(kit_app, "resumable") == 2  # a takeover route must resume from its checkpoints; this one has none


def test_crash_after_effect_atomic_route_leaves_nothing_and_the_retry_runs(
    kit_app: Flask, lease_clock: LeaseClock
) -> None:
    crash = crash_after_effect(
        kit_app.test_client(), "POST", "/transfers", clock=lease_clock, json={"amount": 5}, headers=ALICE
    )
    assert crash.left is None and crash.after_expiry.status_code == 201
    (stored,) = records(kit_app, crash.key)
    assert (stored["state"], stored["attempts"]) == ("COMPLETED", 1)
    assert effects(kit_app, "transfers") == 1  # the crashed transaction was rolled back


@pytest.mark.parametrize("path", ["/payments", "/transfers"])
def test_crash_after_effect_another_clients_same_key_runs_on_its_own(
    kit_app: Flask, lease_clock: LeaseClock, path: str
) -> None:
    crash = crash_after_effect(
        kit_app.test_client(), "POST", path, clock=lease_clock, json={"amount": 5}, headers=ALICE, other_headers=BOB
    )
    assert crash.other_client is not None and crash.other_client.status_code == 201
    bobs = [r for r in records(kit_app, crash.key) if r["scope"] == "bob"]
    assert [(r["state"], r["attempts"]) for r in bobs] == [("COMPLETED", 1)]


@pytest.mark.parametrize("path", ["/payments", "/transfers"])
def test_crash_after_effect_names_two_clients_sharing_a_record_without_a_scope_loader(
    make: Any, lease_clock: LeaseClock, path: str
) -> None:
    app = make(scope_loader=False)
    with pytest.raises(AssertionError, match=r"two clients share one record \(scope ''\) because no scope_loader"):
        crash_after_effect(
            app.test_client(), "POST", path, clock=lease_clock, json={"amount": 5}, headers=ALICE, other_headers=BOB
        )


def test_crash_after_effect_names_an_atomic_view_that_commits(kit_app: Flask, lease_clock: LeaseClock) -> None:
    with pytest.raises(AssertionError, match=r"commits db.session in atomic mode"):
        crash_after_effect(
            kit_app.test_client(), "POST", "/committing", clock=lease_clock, json={"amount": 5}, headers=ALICE
        )
    assert effects(kit_app) == 0


def test_crash_after_effect_names_a_decorator_above_the_route(make: Any, lease_clock: LeaseClock) -> None:
    app = make(misplaced=True)
    with pytest.raises(AssertionError, match=r"@idempotent is placed above the route decorator on above"):
        crash_after_effect(app.test_client(), "POST", "/above", clock=lease_clock, json={"amount": 5})
    assert effects(app) == 0


# store_outage -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/payments", "/transfers"])
def test_store_outage_fails_closed_on_a_protected_route_and_recovers(kit_app: Flask, path: str) -> None:
    client = kit_app.test_client()
    with store_outage(kit_app) as outage:
        response = client.post(path, json={"amount": 5}, headers={**ALICE, "Idempotency-Key": "k-1"})
    assert response.status_code == 503 and len(outage.responses) == 1
    assert effects(kit_app) == 0 and records(kit_app) == []

    after = client.post(path, json={"amount": 5}, headers={**ALICE, "Idempotency-Key": "k-1"})
    assert after.status_code == 201  # the cut is gone with the block
    assert effects(kit_app) == 1


def test_store_outage_names_a_route_without_the_decorator(kit_app: Flask) -> None:
    client = kit_app.test_client()
    with pytest.raises(AssertionError, match=r"1 view\(s\) ran while the store was cut off"):  # noqa: SIM117
        with store_outage(kit_app):
            client.post("/unprotected", json={"amount": 5}, headers={"Idempotency-Key": "k-1"})


def test_store_outage_names_a_decorator_above_the_route(make: Any) -> None:
    app = make(misplaced=True)
    with pytest.raises(AssertionError, match=r"@idempotent is placed above the route decorator on above"):  # noqa: SIM117
        with store_outage(app):
            pass


def test_store_outage_without_a_request_fails(kit_app: Flask) -> None:
    with pytest.raises(AssertionError, match=r"saw no POST/PUT/PATCH/DELETE request"):  # noqa: SIM117
        with store_outage(kit_app):
            kit_app.test_client().get("/payments")


# The lease clock fixture ------------------------------------------------------------------------------------


@pytest.fixture
def app(kit_app: Flask) -> Flask:
    """pytest-flask's convention: the ``lease_clock`` fixture installs itself on ``app``."""
    return kit_app


def test_lease_clock_fixture_moves_the_layers_clock_on_the_app_fixture(app: Flask, lease_clock: LeaseClock) -> None:
    with app.app_context():
        before = operations.now()
        lease_clock.advance(minutes=5)
        moved = operations.now()
    assert 299 <= (moved - before).total_seconds() <= 330


def test_a_lease_clock_is_a_clock_offset_and_installing_it_there_adds_nothing(database_url: str) -> None:
    """``Idempotency(clock_offset=clock)``: the app reads the clock from the start; ``now`` is what it reads."""
    clock = LeaseClock()
    app = Flask(__name__)
    app.config.update(SQLALCHEMY_DATABASE_URI=database_url)
    db = SQLAlchemy()
    db.init_app(app)
    Idempotency(app, db, clock_offset=clock)
    try:
        with app.app_context():
            before = operations.now()
            clock.install(app)  # it reads the clock already: the offset must not count twice
            clock.advance(minutes=5)
            moved = operations.now()
            assert 299 <= (moved - before).total_seconds() <= 330
            assert abs((moved.replace(tzinfo=None) - clock.now).total_seconds()) <= 30
    finally:
        clock.uninstall()
        with app.app_context():
            db.engine.dispose()


# IDEMPOTENCY_ENABLED ----------------------------------------------------------------------------------------


def test_switched_off_the_view_runs_unprotected_and_nothing_is_stored(make: Any) -> None:
    app = make(IDEMPOTENCY_ENABLED=False)
    client = app.test_client()
    first = client.post("/payments", json={"amount": 5}, headers={"Idempotency-Key": "k-1"})
    again = client.post("/payments", json={"amount": 5}, headers={"Idempotency-Key": "k-1"})
    keyless = client.post("/transfers", json={"amount": 5})

    assert [r.status_code for r in (first, again, keyless)] == [201, 201, 201]
    assert "Idempotent-Replayed" not in again.headers
    assert first.get_json()["key"] == "k-1" and keyless.get_json()["key"] == ""  # current_record's stand-in
    assert records(app) == []
    # Both payments; not the transfer: an atomic view never commits, the layer does, and it is switched off.
    assert effects(app, "payments") == 2 and effects(app) == 2


def test_the_kit_refuses_an_app_with_the_layer_switched_off(make: Any) -> None:
    app = make(IDEMPOTENCY_ENABLED=False)
    with pytest.raises(AssertionError, match=r"IDEMPOTENCY_ENABLED is False on this app"):
        assert_idempotent(app.test_client(), "POST", "/payments", json={"amount": 5})


def test_switching_off_is_refused_outside_testing_and_debug(database_url: str) -> None:
    with pytest.raises(ConfigurationError, match=r"IDEMPOTENCY_ENABLED = False .* refused unless app.testing"):
        make_app(database_url, TESTING=False, IDEMPOTENCY_ENABLED=False)


def test_switching_off_is_allowed_in_debug(database_url: str) -> None:
    app, db = make_app(database_url, TESTING=False, DEBUG=True, IDEMPOTENCY_ENABLED=False)
    try:
        response = app.test_client().post("/payments", json={"amount": 5})
        assert response.status_code == 201 and records(app) == []
    finally:
        with app.app_context():
            db.drop_all()
            db.engine.dispose()


@pytest.mark.postgresql_only
def test_duplicate_burst_against_gunicorn_workers_sees_one_execution(postgres_url: str, tmp_path: Any) -> None:
    """A real multi-process server: two gunicorn workers, a view slow enough for the duplicates to overlap."""
    reset_database(postgres_url)
    env = {"FAULTAPP_DATABASE_URL": postgres_url, "FAULTAPP_VIEW_WORK_MS": "2000", "FAULTAPP_SIGNAL_DIR": str(tmp_path)}
    app = faultapp_create_app(env)  # the served app's twin in this process: the kit reads the records with it
    try:
        with Gunicorn(env, tmp_path / "gunicorn.log", workers=2) as server:
            burst = duplicate_burst(f"http://127.0.0.1:{server.port}/payments", json={"amount": 5}, n=6, app=app)
        assert burst.originals[0].status_code == 201
        assert any(r.status_code == 409 for r in burst.replies)  # they overlapped the 2 s view
        engine = sa.create_engine(postgres_url)
        with engine.connect() as conn:
            assert len(snapshot(conn, burst.key)["effects"]) == 1
        engine.dispose()
    finally:
        with app.app_context():
            app.extensions["sqlalchemy"].engine.dispose()
        drop_tables(postgres_url)


def test_pytest_loads_the_kit_as_a_plugin_in_a_users_project(tmp_path: Any) -> None:
    """The ``pytest11`` entry point: a project without any conftest gets ``lease_clock``, with warnings as errors."""
    (tmp_path / "test_user.py").write_text(
        "def test_lease_clock(lease_clock):\n"
        "    lease_clock.advance(seconds=61)\n"
        "    assert lease_clock.offset.total_seconds() == 61\n"
    )
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-W", "error", "-p", "no:cacheprovider", str(tmp_path)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "1 passed" in done.stdout
