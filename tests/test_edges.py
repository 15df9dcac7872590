"""Real traffic's edges: only what the view produced is an outcome; a misplaced decorator is an error.

On SQLite and PostgreSQL. Hooks that answer before the view (a blueprint's auth check, Flask-WTF's
CSRFProtect, any app hook registered after ``init_app``) run after the layer's claim; their answer is never
stored and the claim is withdrawn, so the corrected retry runs.
"""

from __future__ import annotations

import gzip
import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from flask import Blueprint, Flask, Response, abort, jsonify, request, send_file
from flask.testing import FlaskClient
from flask_sqlalchemy import SQLAlchemy
from flask_wtf.csrf import CSRFProtect, generate_csrf
from helpers import charges, events, ext, post, problem_code, record, records
from sqlalchemy.exc import IntegrityError

from flask_idempotent import Idempotency, idempotent


def add_guarded_blueprint(app: Flask) -> None:
    """``POST /guarded/payments``: a blueprint whose before_request demands ``X-Auth: ok`` (401 otherwise)."""
    controls = ext(app)["controls"]
    db, charge_model = ext(app)["db"], ext(app)["Charge"]
    guarded = Blueprint("guarded", __name__, url_prefix="/guarded")

    @guarded.before_request
    def authenticate() -> None:
        if request.headers.get("X-Auth") != "ok":
            abort(401)

    @guarded.post("/payments")
    @idempotent
    def pay() -> Any:
        controls.ran("guarded")
        if controls.status is not None:
            return jsonify(error="provider down"), controls.status
        row = charge_model(amount=request.get_json()["amount"], route="guarded")
        db.session.add(row)
        db.session.commit()
        return jsonify(id=row.id), 201

    app.register_blueprint(guarded)


def test_a_blueprint_auth_rejection_is_not_stored_and_the_key_stays_free(app: Flask, client: FlaskClient) -> None:
    add_guarded_blueprint(app)
    rejected = post(client, "/guarded/payments", json={"amount": 5})
    assert rejected.status_code == 401 and "Idempotent-Replayed" not in rejected.headers
    assert records(app) == [] and ext(app)["controls"].runs["guarded"] == 0

    ok = post(client, "/guarded/payments", json={"amount": 5}, headers={"X-Auth": "ok"})
    assert ok.status_code == 201 and "Idempotent-Replayed" not in ok.headers
    replay = post(client, "/guarded/payments", json={"amount": 5}, headers={"X-Auth": "ok"})
    assert replay.status_code == 201 and replay.headers["Idempotent-Replayed"] == "true"
    assert ext(app)["controls"].runs["guarded"] == 1 and charges(app, "guarded") == 1
    assert record(app, "k-1")["state"] == "COMPLETED"


def test_a_rejected_retry_puts_the_record_back_as_it_was(app: Flask, client: FlaskClient) -> None:
    add_guarded_blueprint(app)
    controls = ext(app)["controls"]
    controls.status = 503  # the first attempt fails, retryable
    assert post(client, "/guarded/payments", json={"amount": 5}, headers={"X-Auth": "ok"}).status_code == 503
    before = record(app, "k-1")
    assert (before["state"], before["retryable"], before["attempts"]) == ("FAILED", True, 1)

    assert post(client, "/guarded/payments", json={"amount": 5}).status_code == 401  # its retry lacks auth
    assert record(app, "k-1") == before  # exactly as it was, version included: as if the claim never happened
    controls.status = None
    retry = post(client, "/guarded/payments", json={"amount": 5}, headers={"X-Auth": "ok"})
    assert retry.status_code == 201
    assert (record(app, "k-1")["state"], record(app, "k-1")["attempts"]) == ("COMPLETED", 2)
    assert controls.runs["guarded"] == 2


def test_a_rejected_takeover_leaves_the_stuck_record_for_the_operator(
    app: Flask, client: FlaskClient, clock: Any
) -> None:
    controls = ext(app)["controls"]
    held = controls.hold("phases-after-charge")

    @app.before_request
    def maintenance() -> Any:  # an app hook registered after init_app: it runs after the claim
        if request.headers.get("X-Maintenance"):
            return jsonify(error="maintenance"), 503
        return None

    from concurrency import Background

    owner = Background(app, "/phases", json={"order": 1})
    assert held.entered.wait(10)
    clock.advance(seconds=31)
    stuck = record(app, "k-1")
    refused = post(client, "/phases", json={"order": 1}, headers={"X-Maintenance": "1"})
    assert refused.status_code == 503 and refused.get_json() == {"error": "maintenance"}
    after = record(app, "k-1")
    assert (after["state"], after["attempts"], after["lease_token"]) == ("IN_PROGRESS", 1, stuck["lease_token"])
    assert after["locked_until"] == stuck["locked_until"] and after["recovery_point"] == "charged"
    assert [e["kind"] for e in events(app)] == ["checkpoint", "takeover"]  # the takeover was tried, then undone
    held.release.set()
    assert owner.result().status_code == 201  # the first owner still holds its lease token: it completes
    assert record(app, "k-1")["state"] == "COMPLETED"


def test_flask_wtf_csrf_rejection_is_not_stored(app: Flask, client: FlaskClient) -> None:
    CSRFProtect(app)  # registered after init_app, like most apps do

    @app.get("/token")
    def token() -> str:
        return generate_csrf()

    rejected = post(client, "/payments", json={"amount": 5})
    assert rejected.status_code == 400 and records(app) == []
    csrf = client.get("/token").get_data(as_text=True)
    ok = post(client, "/payments", json={"amount": 5}, headers={"X-CSRFToken": csrf})
    assert ok.status_code == 201
    again = post(client, "/payments", json={"amount": 5}, headers={"X-CSRFToken": csrf})
    assert again.headers["Idempotent-Replayed"] == "true"
    assert ext(app)["controls"].runs["payments"] == 1


@pytest.mark.parametrize("app_config", [{"IDEMPOTENCY_PROTECT_ALL": True}])
def test_protect_all_routes_also_withdraw_rejected_claims(app: Flask, client: FlaskClient) -> None:
    db, charge_model = ext(app)["db"], ext(app)["Charge"]

    @app.post("/plain")
    def plain() -> Any:  # no decorator: protected by IDEMPOTENCY_PROTECT_ALL
        row = charge_model(amount=1, route="plain")
        db.session.add(row)
        db.session.commit()
        return jsonify(id=row.id), 201

    @app.before_request
    def authenticate() -> None:
        if request.path == "/plain" and request.headers.get("X-Auth") != "ok":
            abort(401)

    assert post(client, "/plain", json={}).status_code == 401 and records(app) == []
    assert post(client, "/plain", json={}, headers={"X-Auth": "ok"}).status_code == 201
    assert post(client, "/plain", json={}, headers={"X-Auth": "ok"}).headers["Idempotent-Replayed"] == "true"
    assert charges(app, "plain") == 1


def test_idempotent_above_the_route_decorator_is_an_error_on_the_first_request(database_url: str) -> None:
    app = Flask(__name__)
    app.config.update(SQLALCHEMY_DATABASE_URI=database_url, TESTING=True)
    db = SQLAlchemy()
    db.init_app(app)
    Idempotency(app, db)
    runs: list[int] = []

    @idempotent
    @app.post("/misplaced")
    def misplaced() -> Any:
        runs.append(1)
        return "charged", 201

    with app.app_context():
        db.create_all()
    with pytest.raises(RuntimeError, match=r"above the route decorator on misplaced"):
        app.test_client().post("/misplaced", headers={"Idempotency-Key": "k"})
    with pytest.raises(RuntimeError, match="above the route decorator"):
        app.test_client().get("/anything")  # any first request: the app is refused until it is fixed
    assert runs == []
    with app.app_context():
        db.drop_all()
        db.engine.dispose()


def test_idempotent_twice_is_a_type_error() -> None:
    def view() -> str:
        return ""

    with pytest.raises(TypeError, match="applied twice"):
        idempotent(idempotent(view))


def test_a_view_that_aborts_itself_is_an_outcome(app: Flask, client: FlaskClient) -> None:
    @app.post("/refuses")
    @idempotent
    def refuses() -> Any:
        ext(app)["controls"].ran("refuses")
        abort(403)

    first = post(client, "/refuses", json={})
    assert first.status_code == 403 and record(app, "k-1")["state"] == "COMPLETED"
    replay = post(client, "/refuses", json={})
    assert replay.status_code == 403 and replay.headers["Idempotent-Replayed"] == "true"
    assert problem_code(post(client, "/refuses", json={"other": 1})) == "key-reused"
    assert ext(app)["controls"].runs["refuses"] == 1


# Responses: replayed as they were sent ---------------------------------------------------------------------


def add_response_routes(app: Flask) -> None:
    controls = ext(app)["controls"]

    @app.post("/gzipped")
    @idempotent
    def gzipped() -> Any:
        controls.ran("gzipped")
        body = gzip.compress(b'{"charged": true}', mtime=0)
        return Response(body, 201, {"Content-Encoding": "gzip", "Content-Type": "application/json"})

    @app.post("/report")
    @idempotent
    def report() -> Any:
        controls.ran("report")
        return Response(b"a,b\n1,2\n", 201, {"Content-Disposition": 'attachment; filename="r.csv"'})

    @app.post("/stream")
    @idempotent
    def stream() -> Any:
        controls.ran("stream")
        size = int(request.get_json()["chunks"])

        def chunks() -> Iterator[bytes]:
            for i in range(size):
                if controls.exception is not None and i == 2:
                    raise controls.exception
                yield b"x" * 1000

        return Response(chunks(), 201, mimetype="text/plain")


def test_a_compressed_response_replays_with_its_encoding(app: Flask, client: FlaskClient) -> None:
    add_response_routes(app)
    first = post(client, "/gzipped", json={})
    replay = post(client, "/gzipped", json={})
    assert replay.headers["Idempotent-Replayed"] == "true" and replay.headers["Content-Encoding"] == "gzip"
    assert replay.data == first.data and gzip.decompress(replay.data) == b'{"charged": true}'
    assert ext(app)["controls"].runs["gzipped"] == 1


def test_a_compressing_hook_never_compresses_a_replay_twice(app: Flask, client: FlaskClient) -> None:
    @app.after_request
    def compress(response: Response) -> Response:  # what Flask-Compress does, registered after init_app
        if "Content-Encoding" not in response.headers and not response.direct_passthrough:
            response.set_data(gzip.compress(response.get_data(), mtime=0))
            response.headers["Content-Encoding"] = "gzip"
        return response

    first = post(client, "/payments", json={"amount": 5})
    replay = post(client, "/payments", json={"amount": 5})
    assert replay.headers["Content-Encoding"] == "gzip" and replay.data == first.data
    assert json.loads(gzip.decompress(replay.data))["amount"] == 5


def test_content_disposition_replays(app: Flask, client: FlaskClient) -> None:
    add_response_routes(app)
    post(client, "/report", json={})
    replay = post(client, "/report", json={})
    assert replay.headers["Content-Disposition"] == 'attachment; filename="r.csv"' and replay.data == b"a,b\n1,2\n"


def test_a_stream_is_stored_while_it_is_sent(app: Flask, client: FlaskClient) -> None:
    add_response_routes(app)
    first = post(client, "/stream", json={"chunks": 5})
    assert first.data == b"x" * 5000
    row = record(app, "k-1")
    assert (row["state"], row["response_body"]) == ("COMPLETED", b"x" * 5000)
    replay = post(client, "/stream", json={"chunks": 5})
    assert replay.data == first.data and replay.headers["Idempotent-Replayed"] == "true"


@pytest.mark.parametrize("app_config", [{"IDEMPOTENCY_MAX_RESPONSE_BYTES": 2500}])
def test_a_stream_over_the_limit_is_sent_whole_and_never_stored(app: Flask, client: FlaskClient) -> None:
    add_response_routes(app)
    first = post(client, "/stream", json={"chunks": 300})  # 300 kB through a 2.5 kB limit
    assert first.status_code == 201 and first.data == b"x" * 300_000
    row = record(app, "k-1")
    assert (row["state"], row["response_body"]) == ("COMPLETED", None)
    assert "exceeds IDEMPOTENCY_MAX_RESPONSE_BYTES" in row["error"]
    replay = post(client, "/stream", json={"chunks": 300})
    assert replay.status_code == 500 and problem_code(replay) == "response-not-stored"
    assert ext(app)["controls"].runs["stream"] == 1


def test_a_stream_that_breaks_midway_is_a_failed_outcome(app: Flask, client: FlaskClient) -> None:
    add_response_routes(app)
    controls = ext(app)["controls"]
    controls.exception = RuntimeError("provider connection reset")
    with pytest.raises(RuntimeError, match="connection reset"):
        post(client, "/stream", json={"chunks": 5}).get_data()
    row = record(app, "k-1")
    assert (row["state"], row["retryable"], row["response_status"]) == ("FAILED", False, 500)
    assert "connection reset" in row["error"] and row["response_body"] is None
    controls.exception = None
    again = post(client, "/stream", json={"chunks": 5})
    assert again.status_code == 500 and problem_code(again) == "failed"
    assert controls.runs["stream"] == 1


@pytest.mark.parametrize("app_config", [{"IDEMPOTENCY_MAX_RESPONSE_BYTES": 1024}])
def test_send_file_is_streamed_not_buffered_and_replays_only_if_it_fits(
    app: Flask, client: FlaskClient, tmp_path: Path
) -> None:
    big, small = tmp_path / "big.bin", tmp_path / "small.bin"
    big.write_bytes(b"b" * 200_000)
    small.write_bytes(b"s" * 100)

    @app.post("/files/<name>")
    @idempotent
    def download(name: str) -> Any:
        return send_file(tmp_path / f"{name}.bin", mimetype="application/octet-stream")

    def download_once(name: str) -> tuple[bytes, Any]:
        with post(client, f"/files/{name}", key=name, json={}) as response:  # closing it closes the file
            return response.get_data(), response

    assert download_once("big")[0] == big.read_bytes()
    assert record(app, "big", "")["response_body"] is None
    assert problem_code(download_once("big")[1]) == "response-not-stored"
    assert download_once("small")[0] == small.read_bytes()
    data, replay = download_once("small")
    assert data == small.read_bytes() and replay.headers["Idempotent-Replayed"] == "true"


# Atomic mode: savepoints, and a commit the database refuses -------------------------------------------------


def add_atomic_routes(app: Flask) -> None:
    db, charge_model, controls = ext(app)["db"], ext(app)["Charge"], ext(app)["controls"]

    @app.post("/atomic/savepoint")
    @idempotent(atomic=True)
    def savepoint() -> Any:
        controls.ran("savepoint")
        with db.session.begin_nested():  # a savepoint the view releases itself
            db.session.add(charge_model(amount=1, route="savepoint"))
        try:
            with db.session.begin_nested():
                db.session.add(charge_model(id=db.session.query(charge_model.id).scalar(), amount=2, route="dup"))
        except IntegrityError:
            pass  # rolled back to the savepoint: the first write stays
        return jsonify(ok=True), 201

    @app.post("/atomic/duplicate")
    @idempotent(atomic=True)
    def duplicate() -> Any:
        controls.ran("duplicate")
        db.session.add(charge_model(id=int(request.get_json()["id"]), amount=1, route="duplicate"))
        return jsonify(ok=True), 201  # the primary key clash shows only at the layer's commit


def test_savepoints_are_allowed_in_an_atomic_view(app: Flask, client: FlaskClient) -> None:
    add_atomic_routes(app)
    response = post(client, "/atomic/savepoint", json={})
    assert response.status_code == 201
    assert charges(app, "savepoint") == 1 and charges(app, "dup") == 0
    assert record(app, "k-1")["state"] == "COMPLETED"


def test_a_commit_the_database_refuses_is_500_commit_failed_with_a_retryable_record(
    app: Flask, client: FlaskClient
) -> None:
    add_atomic_routes(app)
    assert post(client, "/payments", key="first", json={"amount": 1}).status_code == 201  # charge id 1
    refused = post(client, "/atomic/duplicate", json={"id": 1})
    assert refused.status_code == 500 and problem_code(refused) == "commit-failed"
    assert "Retry-After" not in refused.headers
    row = record(app, "k-1")
    assert (row["state"], row["retryable"], row["response_status"]) == ("FAILED", True, 500)
    assert "the commit was refused" in row["error"] and charges(app, "duplicate") == 0
    with app.app_context():
        from flask_idempotent import operations as ops

        assert [r["key"] for r in ops.list_failed(retryable=True).items] == ["k-1"]
    ok = post(client, "/atomic/duplicate", json={"id": 99})  # another command: the key was used for id 1
    assert problem_code(ok) == "key-reused"
    again = post(client, "/atomic/duplicate", json={"id": 1})  # the same command runs again: refused again
    assert problem_code(again) == "commit-failed" and record(app, "k-1")["attempts"] == 2


# The scope loader and resource references ------------------------------------------------------------------


class User:
    def __init__(self, user_id: int) -> None:
        self.id = user_id


@pytest.mark.parametrize(
    ("returned", "scope"), [("alice", "alice"), (42, "42"), (uuid.UUID(int=7), str(uuid.UUID(int=7))), (None, "")]
)
def test_the_scope_loader_may_name_a_str_int_or_uuid(
    app: Flask, client: FlaskClient, returned: Any, scope: str
) -> None:
    ext(app)["idempotency"].scope_loader(lambda: returned)
    assert post(client, "/payments", json={"amount": 1}).status_code == 201
    assert post(client, "/payments", json={"amount": 1}).headers["Idempotent-Replayed"] == "true"
    assert [r["scope"] for r in records(app)] == [scope]


def test_a_scope_loader_returning_an_object_is_a_clear_500_and_nothing_runs(
    app: Flask, client: FlaskClient, caplog: pytest.LogCaptureFixture
) -> None:
    ext(app)["idempotency"].scope_loader(lambda: User(1))  # the user object instead of its id
    for _ in range(3):
        response = post(client, "/payments", json={"amount": 1})
        assert response.status_code == 500 and problem_code(response) == "scope-error"
        assert "returned a User" in response.get_json()["detail"]
    assert records(app) == [] and ext(app)["controls"].runs["payments"] == 0
    assert "return an id (str, int or UUID) or None" in caplog.text


def test_a_scope_loader_that_raises_answers_500_problem_json(app: Flask, client: FlaskClient) -> None:
    def broken() -> str:
        raise KeyError("session")

    ext(app)["idempotency"].scope_loader(broken)
    response = post(client, "/payments", json={"amount": 1})
    assert response.status_code == 500 and response.mimetype == "application/problem+json"
    assert problem_code(response) == "scope-error" and records(app) == []


def test_a_replay_whose_resource_is_gone_is_410_with_the_original_headers(app: Flask, client: FlaskClient) -> None:
    first = post(client, "/resources", json={"amount": 3})
    assert first.status_code == 201
    with app.app_context():
        db = ext(app)["db"]
        db.session.query(ext(app)["Charge"]).delete()
        db.session.commit()
    gone = post(client, "/resources", json={"amount": 3})
    assert gone.status_code == 410 and problem_code(gone) == "resource-gone"
    assert gone.headers["Idempotent-Replayed"] == "true" and gone.headers["Location"] == first.headers["Location"]
    assert ext(app)["controls"].runs["resources"] == 1


def test_set_resource_with_something_not_json_is_a_type_error_at_the_call(app: Flask, client: FlaskClient) -> None:
    @app.post("/bad-resource")
    @idempotent
    def bad_resource() -> Any:
        from flask_idempotent import current_record

        current_record.set_resource(uuid.uuid4())
        return "created", 201

    with pytest.raises(TypeError):
        post(client, "/bad-resource", json={})
    row = record(app, "k-1")
    assert row["state"] == "FAILED" and "TypeError" in row["error"]  # settled, never left IN_PROGRESS


def test_request_outcome_tells_what_each_protected_request_came_to(app: Flask, client: FlaskClient, clock: Any) -> None:
    from concurrency import Background

    from flask_idempotent import signals

    add_guarded_blueprint(app)
    seen: list[tuple[str, str | None]] = []

    def receiver(sender: Flask, **kw: Any) -> None:
        seen.append((kw["outcome"], kw["endpoint"]))
        assert kw["claim_seconds"] >= 0 and kw["kind"] == "http"

    controls = ext(app)["controls"]
    with signals.request_outcome.connected_to(receiver, app):
        post(client, "/payments", json={"amount": 1})
        post(client, "/payments", json={"amount": 1})
        post(client, "/payments", json={"amount": 2})
        post(client, "/guarded/payments", key="g", json={"amount": 1})
        held = controls.hold("payments")
        owner = Background(app, "/payments", key="k-2", json={"amount": 1})
        assert held.entered.wait(10)
        post(client, "/payments", key="k-2", json={"amount": 1})
        clock.advance(seconds=61)
        post(client, "/payments", key="k-2", json={"amount": 1})
        held.release.set()
        owner.result()
    assert seen == [
        ("executed", "create_payment"),
        ("replayed", "create_payment"),
        ("key_reused", "create_payment"),
        ("rejected", "guarded.pay"),
        ("in_progress", "create_payment"),
        ("stuck", "create_payment"),
        ("executed", "create_payment"),  # the held owner, reported once its view ran
    ]


def test_a_worker_stopped_by_its_server_is_described_as_such(app: Flask, client: FlaskClient) -> None:
    controls = ext(app)["controls"]
    controls.exception = SystemExit(1)  # what gunicorn's worker timeout raises inside the request
    with pytest.raises(SystemExit):
        post(client, "/payments", json={"amount": 1})
    row = record(app, "k-1")
    assert row["state"] == "FAILED" and "stopped mid-request by its server" in row["error"]
