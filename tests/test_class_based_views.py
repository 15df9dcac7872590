"""Class-based views and stacked decorators are protected like function views.

``@idempotent`` on a ``MethodView``'s method, in ``View.decorators``, or under another decorator that uses
``functools.wraps``: a keyless request is 400, a retry replays, a changed body is 422, and only the method's
body produces an outcome. A decorator written without ``functools.wraps`` on top of ``@idempotent`` would hide
it (the route would run unprotected): the app's first request is a ``RuntimeError`` naming the function.
On SQLite, PostgreSQL and MariaDB through the test client; once through gunicorn on PostgreSQL.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from faultapp import snapshot
from flask import Flask, abort, jsonify, request
from flask.testing import FlaskClient
from flask.views import MethodView
from flask_sqlalchemy import SQLAlchemy
from helpers import charges, ext, post, problem_code, record, records
from procs import Gunicorn, ServedApp, send
from testapp import Controls

from flask_idempotent import Idempotency, current_record, idempotent
from flask_idempotent.openapi import protected_routes


def charge(app: Flask, route: str, *, commit: bool = True) -> Any:
    """The testapp's effect: one charges row (committed, or only flushed for an atomic view)."""
    controls: Controls = ext(app)["controls"]
    controls.ran(route)
    db, charge_model = ext(app)["db"], ext(app)["Charge"]
    row = charge_model(amount=int((request.get_json(silent=True) or {}).get("amount", 0)), route=route)
    db.session.add(row)
    if commit:
        db.session.commit()
    else:
        db.session.flush()
    try:
        attempt = current_record.attempt
    except RuntimeError:  # an unprotected method
        attempt = None
    response = jsonify(id=row.id, amount=row.amount, attempt=attempt)
    response.status_code = controls.status or 201
    return response


def authenticated(view: Callable[..., Any]) -> Callable[..., Any]:
    """A login_required-style decorator that uses ``functools.wraps``: 401 without ``X-Auth: ok``."""

    @functools.wraps(view)
    def check(*args: Any, **kwargs: Any) -> Any:
        if request.headers.get("X-Auth") != "ok":
            abort(401)
        return view(*args, **kwargs)

    return check


def without_wraps(view: Callable[..., Any]) -> Callable[..., Any]:
    """A decorator written without ``functools.wraps``: its wrapper hides what it wraps."""

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        return view(*args, **kwargs)

    return wrapper


def assert_protected(app: Flask, client: FlaskClient, path: str, route: str, *, method: str = "POST") -> None:
    """The route's contract: keyless 400, first 201, replay, changed body 422; one effect, one record."""
    send_ = client.open
    keyless = send_(path, method=method, json={"amount": 5}, headers={"X-Auth": "ok"})
    assert keyless.status_code == 400 and problem_code(keyless) == "missing-key"
    before = records(app)
    assert ext(app)["controls"].runs[route] == 0

    headers = {"Idempotency-Key": f"{route}-1", "X-Auth": "ok"}
    first = send_(path, method=method, json={"amount": 5}, headers=headers)
    assert first.status_code == 201, first.data
    assert "Idempotent-Replayed" not in first.headers and first.get_json()["attempt"] == 1
    replay = send_(path, method=method, json={"amount": 5}, headers=headers)
    assert replay.status_code == 201 and replay.headers["Idempotent-Replayed"] == "true"
    assert replay.get_json() == first.get_json()
    conflict = send_(path, method=method, json={"amount": 6}, headers=headers)
    assert conflict.status_code == 422 and problem_code(conflict) == "key-reused"

    assert ext(app)["controls"].runs[route] == 1 and charges(app, route) == 1
    assert len(records(app)) == len(before) + 1  # the keyless request stored nothing
    row = record(app, f"{route}-1")
    assert row is not None
    assert (row["state"], row["attempts"], row["method"], row["path"]) == ("COMPLETED", 1, method, path)
    assert row["response_status"] == 201


def test_idempotent_on_a_method_views_post_protects_the_route(app: Flask, client: FlaskClient) -> None:
    class Payments(MethodView):
        def get(self) -> Any:
            return jsonify(count=charges(app, "class"))

        @idempotent
        def post(self) -> Any:
            return charge(app, "class")

    app.add_url_rule("/class-payments", view_func=Payments.as_view("class_payments"))

    assert_protected(app, client, "/class-payments", "class")
    assert record(app, "class-1")["endpoint"] == "class_payments"
    assert client.get("/class-payments").get_json() == {"count": 1}  # safe methods are not protected
    assert len(records(app)) == 1
    assert [(rule, method) for rule, method, _ in protected_routes(app) if rule == "/class-payments"] == [
        ("/class-payments", "POST")
    ]


def test_each_method_of_a_method_view_has_its_own_options(app: Flask, client: FlaskClient) -> None:
    class Orders(MethodView):
        @idempotent
        def post(self) -> Any:
            return charge(app, "orders-post")

        @idempotent(required=False)
        def put(self) -> Any:
            return charge(app, "orders-put")

        @idempotent
        async def patch(self) -> Any:
            return charge(app, "orders-patch")

        def delete(self) -> Any:  # not marked: not protected
            return charge(app, "orders-delete")

    app.add_url_rule("/orders", view_func=Orders.as_view("orders"))

    assert problem_code(client.post("/orders", json={"amount": 1})) == "missing-key"
    assert client.put("/orders", json={"amount": 1}).status_code == 201  # required=False: runs unprotected
    assert client.delete("/orders", json={"amount": 1}, headers={"Idempotency-Key": "d"}).status_code == 201
    assert client.delete("/orders", json={"amount": 1}, headers={"Idempotency-Key": "d"}).status_code == 201
    assert records(app) == [] and charges(app, "orders-delete") == 2
    assert problem_code(client.patch("/orders", json={"amount": 1})) == "missing-key"  # an async method
    assert client.patch("/orders", json={"amount": 1}, headers={"Idempotency-Key": "p"}).status_code == 201
    replay = client.patch("/orders", json={"amount": 1}, headers={"Idempotency-Key": "p"})
    assert replay.headers["Idempotent-Replayed"] == "true"
    assert charges(app, "orders-patch") == 1 and record(app, "p")["method"] == "PATCH"


def test_idempotent_in_view_decorators_protects_every_unsafe_method(app: Flask, client: FlaskClient) -> None:
    class Refunds(MethodView):
        decorators = [idempotent]

        def post(self) -> Any:
            return charge(app, "refund-post")

        def put(self) -> Any:
            return charge(app, "refund-put")

    app.add_url_rule("/refunds", view_func=Refunds.as_view("refunds"))

    assert_protected(app, client, "/refunds", "refund-post")
    assert_protected(app, client, "/refunds", "refund-put", method="PUT")


def test_a_wraps_decorator_on_top_of_idempotent_keeps_the_route_protected(app: Flask, client: FlaskClient) -> None:
    @app.post("/stacked")
    @authenticated
    @idempotent
    def stacked() -> Any:
        return charge(app, "stacked")

    def keeps_only_wrapped(view: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(view, updated=())  # copies no attributes, but sets __wrapped__
        def thin(*args: Any, **kwargs: Any) -> Any:
            return view(*args, **kwargs)

        return thin

    @app.post("/thin")
    @keeps_only_wrapped
    @idempotent
    def thin() -> Any:
        return charge(app, "thin")

    class Transfers(MethodView):
        @authenticated
        @idempotent
        def post(self) -> Any:
            return charge(app, "stacked-method")

    app.add_url_rule("/stacked-method", view_func=Transfers.as_view("stacked_method"))

    assert_protected(app, client, "/stacked", "stacked")
    assert_protected(app, client, "/thin", "thin")
    assert_protected(app, client, "/stacked-method", "stacked-method")


def test_a_decorator_answering_before_the_method_view_runs_is_not_stored(app: Flask, client: FlaskClient) -> None:
    """``View.decorators`` run around the whole view: their 401 comes before the marked method, so it is not an
    outcome; the claim is withdrawn and the authenticated retry runs."""

    class Guarded(MethodView):
        decorators = [authenticated]

        @idempotent
        def post(self) -> Any:
            return charge(app, "guarded-class")

    app.add_url_rule("/guarded-class", view_func=Guarded.as_view("guarded_class"))

    rejected = post(client, "/guarded-class", json={"amount": 5})
    assert rejected.status_code == 401 and "Idempotent-Replayed" not in rejected.headers
    assert records(app) == [] and ext(app)["controls"].runs["guarded-class"] == 0
    ok = post(client, "/guarded-class", json={"amount": 5}, headers={"X-Auth": "ok"})
    assert ok.status_code == 201 and "Idempotent-Replayed" not in ok.headers
    replay = post(client, "/guarded-class", json={"amount": 5}, headers={"X-Auth": "ok"})
    assert replay.status_code == 201 and replay.headers["Idempotent-Replayed"] == "true"
    assert charges(app, "guarded-class") == 1
    row = record(app, "k-1")
    assert row is not None and (row["state"], row["attempts"]) == ("COMPLETED", 1)


def test_an_atomic_method_view_commits_its_writes_with_the_outcome(app: Flask, client: FlaskClient) -> None:
    controls: Controls = ext(app)["controls"]

    class Transfers(MethodView):
        @idempotent(atomic=True)
        def post(self) -> Any:
            return charge(app, "class-transfers", commit=False)

    app.add_url_rule("/class-transfers", view_func=Transfers.as_view("class_transfers"))

    controls.status = 503  # the view's writes are rolled back with the failure: retrying is safe
    failed = post(client, "/class-transfers", json={"amount": 9})
    assert failed.status_code == 503
    assert charges(app, "class-transfers") == 0
    row = record(app, "k-1")
    assert row is not None and (row["state"], row["retryable"], row["attempts"]) == ("FAILED", True, 1)

    controls.status = None
    retry = post(client, "/class-transfers", json={"amount": 9})
    assert retry.status_code == 201 and retry.get_json()["attempt"] == 2
    replay = post(client, "/class-transfers", json={"amount": 9})
    assert replay.headers["Idempotent-Replayed"] == "true" and replay.get_json() == retry.get_json()
    assert controls.runs["class-transfers"] == 2 and charges(app, "class-transfers") == 1
    row = record(app, "k-1")
    assert row is not None and (row["state"], row["attempts"]) == ("COMPLETED", 2)


def test_one_marked_function_on_several_endpoints_protects_each(app: Flask, client: FlaskClient) -> None:
    @idempotent
    def shared() -> Any:
        return charge(app, "shared")

    app.add_url_rule("/shared-a", "shared_a", shared, methods=["POST"])
    app.add_url_rule("/shared-b", "shared_b", shared, methods=["POST"])

    assert problem_code(client.post("/shared-b", json={})) == "missing-key"
    assert post(client, "/shared-a", "a", json={"amount": 1}).status_code == 201
    assert post(client, "/shared-b", "b", json={"amount": 1}).status_code == 201
    assert post(client, "/shared-b", "b", json={"amount": 1}).headers["Idempotent-Replayed"] == "true"
    assert charges(app, "shared") == 2
    assert [(r["key"], r["endpoint"]) for r in records(app)] == [("a", "shared_a"), ("b", "shared_b")]


@pytest.mark.parametrize("app_config", [{"IDEMPOTENCY_PROTECT_ALL": True}])
def test_protect_all_covers_method_views_and_their_exempt_methods(app: Flask, client: FlaskClient) -> None:
    class Webhooks(MethodView):
        def post(self) -> Any:  # unmarked: protected with the defaults
            return charge(app, "hooks-post")

        @idempotent(exempt=True)
        def put(self) -> Any:
            return charge(app, "hooks-put")

    app.add_url_rule("/hooks", view_func=Webhooks.as_view("hooks"))

    assert problem_code(client.post("/hooks", json={})) == "missing-key"
    assert post(client, "/hooks", json={"amount": 1}).status_code == 201
    assert post(client, "/hooks", json={"amount": 1}).headers["Idempotent-Replayed"] == "true"
    assert client.put("/hooks", json={"amount": 1}).status_code == 201  # exempt: no key needed
    assert charges(app, "hooks-post") == 1 and charges(app, "hooks-put") == 1
    assert [r["endpoint"] for r in records(app)] == ["hooks"]


# A marked function no endpoint reaches ----------------------------------------------------------------------


def unreachable_app(database_url: str) -> tuple[Flask, SQLAlchemy, list[str]]:
    """An app whose POST /hidden and a MethodView's post are wrapped without functools.wraps."""
    app = Flask(__name__)
    app.config.update(SQLALCHEMY_DATABASE_URI=database_url, TESTING=True)
    db = SQLAlchemy()
    db.init_app(app)
    Idempotency(app, db)
    runs: list[str] = []

    @app.post("/hidden")
    @without_wraps
    @idempotent
    def hidden_payment() -> Any:
        runs.append("hidden")
        return "charged", 201

    class Hidden(MethodView):
        @without_wraps
        @idempotent
        def post(self) -> Any:
            runs.append("method")
            return "charged", 201

    app.add_url_rule("/hidden-method", view_func=Hidden.as_view("hidden_method"))

    @app.get("/health")
    def health() -> str:
        return "ok"

    with app.app_context():
        db.create_all()
    return app, db, runs


@pytest.fixture
def broken(database_url: str) -> Iterator[tuple[Flask, list[str]]]:
    app, db, runs = unreachable_app(database_url)
    yield app, runs
    with app.app_context():
        db.drop_all()
        db.engine.dispose()


def test_a_wrapper_without_wraps_is_an_error_on_the_first_request_naming_the_function(
    broken: tuple[Flask, list[str]],
) -> None:
    app, runs = broken
    client = app.test_client()
    with pytest.raises(RuntimeError) as raised:
        client.post("/hidden", headers={"Idempotency-Key": "k"})
    message = str(raised.value)
    assert "no registered endpoint reaches" in message and "functools.wraps" in message
    assert f"{__name__}.unreachable_app.<locals>.hidden_payment (run by 'wrapper')" in message  # the wrapper's name
    assert f"{__name__}.unreachable_app.<locals>.Hidden.post (run by 'hidden_method')" in message
    with pytest.raises(RuntimeError, match="no registered endpoint reaches"):
        client.get("/health")  # any first request: the app is refused until it is fixed
    with pytest.raises(RuntimeError, match="no registered endpoint reaches"):
        client.post("/hidden-method", headers={"Idempotency-Key": "k"})
    assert runs == []


def test_marked_functions_of_other_apps_do_not_count(
    app: Flask, client: FlaskClient, broken: tuple[Flask, list[str]]
) -> None:
    """The check looks only at what this app's views lead to: another app's hidden view is that app's error."""
    assert post(client, "/payments", json={"amount": 5}).status_code == 201
    with pytest.raises(RuntimeError, match="hidden_payment"):
        broken[0].test_client().get("/health")


def test_idempotent_on_the_view_and_on_its_method_is_an_error(database_url: str) -> None:
    app = Flask(__name__)
    app.config.update(SQLALCHEMY_DATABASE_URI=database_url, TESTING=True)
    db = SQLAlchemy()
    db.init_app(app)
    Idempotency(app, db)

    class Twice(MethodView):
        decorators = [idempotent(atomic=True)]

        @idempotent
        def post(self) -> Any:
            return "charged", 201

    app.add_url_rule("/twice", view_func=Twice.as_view("twice"))
    try:
        with pytest.raises(RuntimeError, match=r"class-based view of twice .* keep one"):
            app.test_client().post("/twice", headers={"Idempotency-Key": "k"})
    finally:
        with app.app_context():
            db.engine.dispose()


# Through gunicorn -----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def served(postgres_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gunicorn]:
    """faultapp (its class-based views included) on one gunicorn sync worker, on PostgreSQL."""
    tmp = tmp_path_factory.mktemp("class-views")
    with ServedApp(postgres_url, {"FAULTAPP_SIGNAL_DIR": str(tmp)}, tmp) as rig:
        yield rig.server


@pytest.mark.postgresql_only
@pytest.mark.parametrize("path", ["/class-payments", "/class-transfers"])
def test_class_based_views_are_protected_through_gunicorn(served: Gunicorn, postgres_url: str, path: str) -> None:
    """A MethodView's ``@idempotent`` post (leased) and one with ``View.decorators = [idempotent(atomic=True)]``."""
    key = f"gunicorn{path.replace('/', '-')}"
    keyless = send(served.port, "POST", path, body={"amount": 4})
    assert keyless.status == 400 and keyless.problem == "missing-key"
    first = send(served.port, "POST", path, key=key, body={"amount": 4})
    assert first.status == 201 and not first.replayed, first.body
    assert first.json()["attempt"] == 1
    replay = send(served.port, "POST", path, key=key, body={"amount": 4})
    assert replay.status == 201 and replay.replayed and replay.body == first.body
    conflict = send(served.port, "POST", path, key=key, body={"amount": 5})
    assert conflict.status == 422 and conflict.problem == "key-reused"

    engine = sa.create_engine(postgres_url)
    try:
        with engine.connect() as conn:
            state = snapshot(conn, key)
    finally:
        engine.dispose()
    assert state["record"]["state"] == "COMPLETED" and state["record"]["attempts"] == 1
    assert state["record"]["response_status"] == 201
    assert state["effects"] == [first.json()["effect"]]  # the view body ran once
