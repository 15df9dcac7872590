"""Atomic mode: the claim, the view's writes and the outcome commit together, or not at all."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from concurrency import Background, observe_polling
from flask import Flask, Response, abort, jsonify, request, send_file
from flask.testing import FlaskClient
from helpers import charges, ext, post, problem_code, reads, record

from flask_idempotent import idempotent

#: Also on the distributed-SQL emulations of ``IDEMPOTENCY_TEST_PG_VARIANTS`` (conftest).
PG_VARIANTS = True


def test_atomic_success_commits_writes_and_outcome_together(app: Flask, client: FlaskClient) -> None:
    first = post(client, "/transfers", json={"amount": 30})
    assert first.status_code == 201
    assert charges(app, "transfers") == 1
    row = record(app, "k-1")
    assert (row["state"], row["attempts"], row["response_status"]) == ("COMPLETED", 1, 201)
    again = post(client, "/transfers", json={"amount": 30})
    assert again.headers["Idempotent-Replayed"] == "true" and again.data == first.data
    assert charges(app, "transfers") == 1


@pytest.mark.parametrize("status", [500, 409, 503])
def test_atomic_failed_status_rolls_back_the_view_and_stays_retryable(
    app: Flask, client: FlaskClient, status: int
) -> None:
    controls = ext(app)["controls"]
    controls.status = status
    assert post(client, "/transfers", json={"amount": 30}).status_code == status
    assert charges(app, "transfers") == 0
    row = record(app, "k-1")
    assert (row["state"], row["retryable"], row["attempts"]) == ("FAILED", True, 1)
    controls.status = None
    retry = post(client, "/transfers", json={"amount": 30})
    assert retry.status_code == 201 and retry.get_json()["attempt"] == 2
    assert charges(app, "transfers") == 1
    assert record(app, "k-1")["state"] == "COMPLETED"


@pytest.mark.parametrize("app_config", [{"PROPAGATE_EXCEPTIONS": False}])
def test_atomic_exception_rolls_back_everything_and_stays_retryable(app: Flask, client: FlaskClient) -> None:
    controls = ext(app)["controls"]
    controls.exception = RuntimeError("ledger invariant violated")
    assert post(client, "/transfers", json={"amount": 30}).status_code == 500
    assert charges(app) == 0
    row = record(app, "k-1")
    assert (row["state"], row["retryable"]) == ("FAILED", True)
    assert "RuntimeError" in row["error"]
    controls.exception = None
    assert post(client, "/transfers", json={"amount": 30}).status_code == 201
    assert charges(app) == 1


def test_atomic_exception_propagating_is_rolled_back_in_teardown(app: Flask, client: FlaskClient) -> None:
    ext(app)["controls"].exception = RuntimeError("boom")
    with pytest.raises(RuntimeError):
        post(client, "/transfers", json={"amount": 30})
    assert charges(app) == 0
    assert (record(app, "k-1")["state"], record(app, "k-1")["retryable"]) == ("FAILED", True)


@pytest.mark.parametrize("app_config", [{"PROPAGATE_EXCEPTIONS": False}])
def test_atomic_view_that_commits_gets_a_clear_error_and_nothing_is_persisted(app: Flask, client: FlaskClient) -> None:
    ext(app)["controls"].commit_in_view = True
    assert post(client, "/transfers", json={"amount": 30}).status_code == 500
    assert charges(app) == 0
    row = record(app, "k-1")
    assert (row["state"], row["retryable"]) == ("FAILED", True)
    assert "AtomicViewCommitted" in row["error"]


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_atomic_duplicate_in_flight_gets_409_without_running(app: Flask, client: FlaskClient) -> None:
    controls = ext(app)["controls"]
    held = controls.hold("transfers")
    first = Background(app, "/transfers", json={"amount": 30})
    assert held.entered.wait(10)
    duplicate = post(client, "/transfers", json={"amount": 30})
    assert duplicate.status_code == 409 and problem_code(duplicate) == "in-progress"
    assert duplicate.headers["Retry-After"] == "1"
    held.release.set()
    assert first.result().status_code == 201
    assert controls.runs["transfers"] == 1 and charges(app) == 1


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
@pytest.mark.parametrize("app_config", [{"IDEMPOTENCY_WAIT": 10}])
def test_atomic_duplicate_waits_for_the_first_commit_and_replays(app: Flask, monkeypatch: pytest.MonkeyPatch) -> None:
    waiting = observe_polling(monkeypatch)
    controls = ext(app)["controls"]
    held = controls.hold("transfers")
    first = Background(app, "/transfers", json={"amount": 30})
    assert held.entered.wait(10)
    duplicate = Background(app, "/transfers", json={"amount": 30})
    assert waiting.wait(10)
    held.release.set()
    original, replay = first.result(), duplicate.result()
    assert replay.status_code == 201 and replay.headers["Idempotent-Replayed"] == "true"
    assert replay.data == original.data
    assert controls.runs["transfers"] == 1 and charges(app) == 1


def test_atomic_failure_after_replacing_an_expired_record_keeps_the_new_command(
    app: Flask, client: FlaskClient, clock
) -> None:
    post(client, "/transfers", json={"amount": 30})
    old = record(app, "k-1")
    clock.advance(hours=25)
    controls = ext(app)["controls"]
    controls.status = 409
    assert post(client, "/transfers", json={"amount": 99}).status_code == 409
    failed = record(app, "k-1")
    assert (failed["state"], failed["retryable"], failed["attempts"]) == ("FAILED", True, 1)
    assert failed["request_hash"] != old["request_hash"]
    assert reads(clock, failed["created_at"])
    controls.status = None
    assert post(client, "/transfers", json={"amount": 99}).status_code == 201  # the same command, not a conflict
    assert charges(app, "transfers") == 2


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_replay_never_waits_for_a_concurrent_reader_of_the_same_key(app: Flask, client: FlaskClient) -> None:
    import sqlalchemy as sa

    from flask_idempotent.store import advisory_key

    first = post(client, "/transfers", json={"amount": 30})
    with app.app_context():
        engine = ext(app)["db"].engine
    # What another request for this key holds for an instant while it reads the record.
    with engine.connect() as conn, conn.begin():
        conn.execute(sa.text("SELECT pg_advisory_xact_lock(:k)"), {"k": advisory_key("", "k-1")})
        replay = post(client, "/transfers", json={"amount": 30})
        conflict = post(client, "/transfers", json={"amount": 31})
    assert replay.status_code == 201 and replay.headers["Idempotent-Replayed"] == "true"
    assert replay.data == first.data
    assert conflict.status_code == 422
    assert charges(app, "transfers") == 1


# A 4xx: COMPLETED and replayed; the view's writes are rolled back unless the route keeps them (commit_4xx) --


def add_ledger_routes(app: Flask, **pay_options: Any) -> None:
    """``/debit`` takes an amount off the one balance row (and refuses to overdraw it with 422, after the write);
    ``/pay`` records a declined payment with its 402 (``pay_options``: its ``@idempotent`` options)."""
    db, charge, controls = ext(app)["db"], ext(app)["Charge"], ext(app)["controls"]

    @app.post("/debit")
    @idempotent(atomic=True)
    def debit() -> Any:
        controls.ran("debit")
        balance = db.session.execute(sa.select(charge).where(charge.route == "balance")).scalar_one()
        balance.amount -= int(request.get_json()["amount"])  # debit first, check after: the write is flushed
        db.session.flush()
        if controls.status is not None:
            return jsonify(error="ledger busy"), controls.status
        if balance.amount < 0:
            abort(422, "insufficient funds")
        return jsonify(balance=balance.amount), 201

    @app.post("/pay")
    @idempotent(atomic=True, **pay_options)
    def pay() -> Any:
        controls.ran("pay")
        db.session.add(charge(amount=int(request.get_json()["amount"]), route="declined"))
        db.session.flush()
        return jsonify(declined="card declined"), 402

    with app.app_context():
        db.session.add(charge(amount=100, route="balance"))
        db.session.commit()


def balance(app: Flask) -> int:
    with app.app_context():
        table = ext(app)["db"].metadata.tables["charges"]
        with ext(app)["db"].engine.connect() as conn:
            return int(conn.execute(sa.select(table.c.amount).where(table.c.route == "balance")).scalar_one())


def test_an_atomic_4xx_rolls_the_views_writes_back_and_is_replayed(app: Flask, client: FlaskClient) -> None:
    add_ledger_routes(app)
    refused = post(client, "/debit", json={"amount": 500})
    assert refused.status_code == 422 and b"insufficient funds" in refused.data
    assert balance(app) == 100  # the debit the view wrote before it answered 422 is gone
    row = record(app, "k-1")
    assert row is not None
    assert (row["state"], row["response_status"], row["attempts"]) == ("COMPLETED", 422, 1)
    assert row["response_body"] == refused.data and row["locked_until"] is None
    retry = post(client, "/debit", json={"amount": 500})
    assert retry.status_code == 422 and retry.headers["Idempotent-Replayed"] == "true"
    assert retry.data == refused.data
    assert ext(app)["controls"].runs["debit"] == 1 and balance(app) == 100
    # A 2xx still commits its writes with the outcome.
    assert post(client, "/debit", key="k-2", json={"amount": 30}).status_code == 201
    assert balance(app) == 70


def test_an_atomic_4xx_after_a_retryable_failure_is_stored_alone_at_its_attempt(
    app: Flask, client: FlaskClient
) -> None:
    add_ledger_routes(app)
    controls = ext(app)["controls"]
    controls.status = 503
    assert post(client, "/debit", json={"amount": 500}).status_code == 503
    controls.status = None
    refused = post(client, "/debit", json={"amount": 500})
    assert refused.status_code == 422
    row = record(app, "k-1")
    assert row is not None
    assert (row["state"], row["response_status"], row["attempts"]) == ("COMPLETED", 422, 2)
    assert balance(app) == 100
    assert post(client, "/debit", json={"amount": 500}).headers["Idempotent-Replayed"] == "true"
    assert controls.runs["debit"] == 2


@pytest.mark.parametrize(
    ("app_config", "pay_options"),
    [({}, {"commit_4xx": True}), ({"IDEMPOTENCY_ATOMIC_COMMIT_4XX": True}, {})],
    ids=["route-option", "config-default"],
)
def test_commit_4xx_keeps_the_writes_of_a_declined_payment(
    app: Flask, client: FlaskClient, pay_options: dict[str, Any]
) -> None:
    add_ledger_routes(app, **pay_options)
    declined = post(client, "/pay", json={"amount": 40})
    assert declined.status_code == 402
    assert charges(app, "declined") == 1  # recorded with its 402, in the same commit as the outcome
    row = record(app, "k-1")
    assert row is not None and (row["state"], row["response_status"]) == ("COMPLETED", 402)
    retry = post(client, "/pay", json={"amount": 40})
    assert retry.status_code == 402 and retry.headers["Idempotent-Replayed"] == "true"
    assert retry.data == declined.data
    assert ext(app)["controls"].runs["pay"] == 1 and charges(app, "declined") == 1


@pytest.mark.parametrize(
    ("app_config", "pay_options"),
    [({}, {}), ({"IDEMPOTENCY_ATOMIC_COMMIT_4XX": True}, {"commit_4xx": False})],
    ids=["default", "route-overrides-config"],
)
def test_without_commit_4xx_a_declined_payment_leaves_only_its_record(
    app: Flask, client: FlaskClient, pay_options: dict[str, Any]
) -> None:
    add_ledger_routes(app, **pay_options)
    assert post(client, "/pay", json={"amount": 40}).status_code == 402
    assert charges(app, "declined") == 0
    row = record(app, "k-1")
    assert row is not None and (row["state"], row["response_status"]) == ("COMPLETED", 402)


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_commit_4xx_is_refused_outside_atomic_mode_and_the_config_must_be_a_bool(database_url: str) -> None:
    with pytest.raises(ValueError, match=r"commit_4xx=True\) applies to atomic mode only"):
        idempotent(atomic=False, commit_4xx=True)
    with pytest.raises(TypeError, match=r"commit_4xx=...\) must be True or False"):
        idempotent(atomic=True, commit_4xx="yes")  # type: ignore[arg-type]
    from testapp import Controls, build_app

    with pytest.raises(ValueError, match=r"IDEMPOTENCY_ATOMIC_COMMIT_4XX must be True or False"):
        build_app(database_url, clock=lambda: 0, controls=Controls(), IDEMPOTENCY_ATOMIC_COMMIT_4XX="off")


# Streams: held only up to IDEMPOTENCY_MAX_RESPONSE_BYTES before the commit, the rest streamed through --------


class Export:
    """What ``/export`` produced so far: how many chunks the view's generator yielded."""

    def __init__(self) -> None:
        self.yielded = 0
        self.break_at: int | None = None


def add_export_route(app: Flask) -> Export:
    """``/export``: an atomic view that writes a charge row, then streams ``chunks`` chunks of 1000 bytes."""
    db, charge, controls = ext(app)["db"], ext(app)["Charge"], ext(app)["controls"]
    export = Export()

    @app.post("/export")
    @idempotent(atomic=True)
    def run_export() -> Any:
        controls.ran("export")
        db.session.add(charge(amount=1, route="export"))
        db.session.flush()
        size = int(request.get_json()["chunks"])

        def chunks() -> Iterator[bytes]:
            for i in range(size):
                if export.break_at == i:
                    raise RuntimeError("the export's source went away")
                export.yielded += 1
                yield b"%03d" % (i % 1000) + b"x" * 997

        return Response(chunks(), 200, mimetype="text/csv")

    return export


@pytest.mark.parametrize("app_config", [{"IDEMPOTENCY_MAX_RESPONSE_BYTES": 2500}])
def test_an_atomic_stream_longer_than_the_limit_commits_unstored_then_streams_the_rest(
    app: Flask, client: FlaskClient
) -> None:
    export = add_export_route(app)
    response = post(client, "/export", json={"chunks": 300}, buffered=False)
    # Committed before the rest was produced: only what fits the limit (and the chunk past it) was read.
    assert export.yielded == 3
    row = record(app, "k-1")
    assert row is not None
    assert (row["state"], row["response_status"], row["response_body"]) == ("COMPLETED", 200, None)
    assert "exceeds IDEMPOTENCY_MAX_RESPONSE_BYTES" in row["error"]
    assert charges(app, "export") == 1
    body = response.get_data()
    assert export.yielded == 300
    assert body == b"".join(b"%03d" % i + b"x" * 997 for i in range(300))  # every byte, in order
    replay = post(client, "/export", json={"chunks": 300})
    assert replay.status_code == 500 and problem_code(replay) == "response-not-stored"
    assert replay.headers["Idempotent-Replayed"] == "true"
    assert ext(app)["controls"].runs["export"] == 1 and charges(app, "export") == 1


def test_an_atomic_stream_within_the_limit_is_stored_and_replayed(app: Flask, client: FlaskClient) -> None:
    add_export_route(app)
    first = post(client, "/export", json={"chunks": 5})
    assert first.status_code == 200 and len(first.data) == 5000
    row = record(app, "k-1")
    assert row is not None and (row["state"], row["response_body"]) == ("COMPLETED", first.data)
    replay = post(client, "/export", json={"chunks": 5})
    assert replay.data == first.data and replay.headers["Idempotent-Replayed"] == "true"
    assert replay.mimetype == "text/csv"
    assert ext(app)["controls"].runs["export"] == 1 and charges(app, "export") == 1


@pytest.mark.parametrize("app_config", [{"IDEMPOTENCY_MAX_RESPONSE_BYTES": 2500}])
def test_an_atomic_stream_that_breaks_before_the_commit_rolls_back_and_stays_retryable(
    app: Flask, client: FlaskClient
) -> None:
    export = add_export_route(app)
    export.break_at = 1
    with pytest.raises(RuntimeError, match="went away"):
        post(client, "/export", json={"chunks": 300})
    assert charges(app, "export") == 0
    row = record(app, "k-1")
    assert row is not None
    assert (row["state"], row["retryable"], row["response_status"]) == ("FAILED", True, 500)
    assert "went away" in row["error"]
    export.break_at = None
    retry = post(client, "/export", json={"chunks": 300})
    assert retry.status_code == 200 and len(retry.data) == 300_000
    assert charges(app, "export") == 1 and record(app, "k-1")["attempts"] == 2  # type: ignore[index]


@pytest.mark.parametrize("app_config", [{"IDEMPOTENCY_MAX_RESPONSE_BYTES": 2500}])
def test_an_atomic_stream_that_breaks_after_the_commit_stays_completed(app: Flask, client: FlaskClient) -> None:
    """Past the commit the writes are durable: the record stays COMPLETED (not stored), never run again."""
    export = add_export_route(app)
    export.break_at = 10
    response = post(client, "/export", json={"chunks": 300}, buffered=False)
    with pytest.raises(RuntimeError, match="went away"):
        response.get_data()
    assert charges(app, "export") == 1
    row = record(app, "k-1")
    assert row is not None and (row["state"], row["response_body"]) == ("COMPLETED", None)
    export.break_at = None
    retry = post(client, "/export", json={"chunks": 300})
    assert retry.status_code == 500 and problem_code(retry) == "response-not-stored"
    assert ext(app)["controls"].runs["export"] == 1


@pytest.mark.parametrize("app_config", [{"IDEMPOTENCY_MAX_RESPONSE_BYTES": 1024}])
def test_send_file_in_an_atomic_view_streams_and_replays_only_if_it_fits(
    app: Flask, client: FlaskClient, tmp_path: Path
) -> None:
    db, charge = ext(app)["db"], ext(app)["Charge"]
    (tmp_path / "big.bin").write_bytes(bytes(range(256)) * 800)
    (tmp_path / "small.bin").write_bytes(b"s" * 100)

    @app.post("/files/<name>")
    @idempotent(atomic=True)
    def download(name: str) -> Any:
        db.session.add(charge(amount=1, route=name))
        return send_file(tmp_path / f"{name}.bin", mimetype="application/octet-stream")

    def download_once(name: str) -> tuple[bytes, Any]:
        with post(client, f"/files/{name}", key=name, json={}) as response:  # closing it closes the file
            return response.get_data(), response

    assert download_once("big")[0] == (tmp_path / "big.bin").read_bytes()
    assert record(app, "big")["response_body"] is None  # type: ignore[index]
    assert problem_code(download_once("big")[1]) == "response-not-stored"
    assert download_once("small")[0] == b"s" * 100
    data, replay = download_once("small")
    assert data == b"s" * 100 and replay.headers["Idempotent-Replayed"] == "true"
    assert (charges(app, "big"), charges(app, "small")) == (1, 1)
