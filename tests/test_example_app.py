"""The example app end to end, through its HTTP API: every step of the README walk-through, on SQLite and PostgreSQL.

Each test builds the app with ``create_app``, brings an empty database up with ``flask init-db`` (the
migrations plus the demo users), and drives it with the test client. Concurrency is ordered with events, and
time is the database's clock as the extension sees it, which the test moves; nothing sleeps.
"""

from __future__ import annotations

import contextlib
import html
import json
import logging
import re
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from concurrency import InThread
from flask import Flask
from flask.testing import FlaskClient
from helpers import problem_code
from test_migrations import reset_database
from werkzeug.test import TestResponse

import example_app
from example_app import ConfigurationError, create_app, normalize_database_url
from example_app.config import DEV_OPERATOR_PASSWORD
from example_app.extensions import db as example_db
from flask_idempotent.testing import LeaseClock, assert_idempotent, crash_after_effect, store_outage

OPERATOR_PASSWORD = "s3cret-operator-password"
ALICE = "alice-demo-token"
BOB = "bob-demo-token"
# The demo ledger init-db creates: alice's checking and savings, bob's checking (cents).
ALICE_CHECKING, ALICE_SAVINGS, BOB_CHECKING = 1, 2, 3


# Fixtures and helpers ---------------------------------------------------------------------------------------


@pytest.fixture
def example_config() -> dict[str, Any]:
    """Override (parametrize) to change the example app's config."""
    return {}


@pytest.fixture
def example(
    database_url: str,
    clock: Any,
    monkeypatch: pytest.MonkeyPatch,
    example_config: dict[str, Any],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Flask]:
    reset_database(database_url)
    monkeypatch.setattr(example_app.idempotency, "clock_offset", clock)
    app = create_app(
        {
            "TESTING": True,
            "DATABASE_URL": database_url,
            "SECRET_KEY": "test-secret",
            "OPERATOR_PASSWORD": OPERATOR_PASSWORD,
            "PROVIDER_HANG_DIR": str(tmp_path_factory.mktemp("provider-hang")),
            **example_config,
        }
    )
    result = app.test_cli_runner().invoke(args=["init-db", "--demo"])
    assert result.exit_code == 0, result.output
    yield app
    with app.app_context():
        example_app.db.engine.dispose()
    reset_database(database_url)


def pay(
    client: FlaskClient,
    key: str,
    amount: int = 1000,
    *,
    token: str = ALICE,
    simulate: str | None = None,
    **body: Any,
) -> TestResponse:
    headers = {"Authorization": f"Bearer {token}", "Idempotency-Key": key}
    if simulate is not None:
        headers["X-Simulate"] = simulate
    return client.post("/payments", json={"amount": amount, "currency": "EUR", **body}, headers=headers)


def transfer(
    client: FlaskClient,
    key: str,
    amount: int,
    source: int = ALICE_CHECKING,
    target: int = BOB_CHECKING,
    *,
    simulate: str | None = None,
) -> TestResponse:
    headers = {"Authorization": f"Bearer {ALICE}", "Idempotency-Key": key}
    if simulate is not None:
        headers["X-Simulate"] = simulate
    return client.post(
        "/transfers", json={"from_account": source, "to_account": target, "amount": amount}, headers=headers
    )


def rows(app: Flask, table: str, **where: Any) -> list[dict[str, Any]]:
    with app.app_context():
        t = example_app.db.metadata.tables[table]
        query = sa.select(t).where(*(t.c[name] == value for name, value in where.items()))
        with example_app.db.engine.connect() as conn:
            return [dict(r._mapping) for r in conn.execute(query.order_by(*t.primary_key.columns))]


def record(app: Flask, key: str, user: str = "alice") -> dict[str, Any]:
    (found,) = rows(app, "idempotency_records", key=key, scope=str(user_id(app, user)))
    return found


def user_id(app: Flask, name: str) -> int:
    (user,) = rows(app, "users", name=name)
    return int(user["id"])


def balances(app: Flask) -> dict[int, int]:
    return {r["id"]: r["balance"] for r in rows(app, "accounts")}


def hidden(page: str, name: str, action: str | None = None) -> str:
    """The value of hidden input ``name`` (inside the form posting to ``action``, if given)."""
    if action is not None:
        form = re.search(rf'action="{re.escape(action)}">(.*?)</form>', page, re.S)
        assert form, f"no form posting to {action}"
        page = form.group(1)
    found = re.search(rf'name="{re.escape(name)}" value="([^"]*)"', page)
    assert found, f"no hidden {name}"
    return html.unescape(found.group(1))


def login(client: FlaskClient, password: str = OPERATOR_PASSWORD, next_url: str | None = None) -> TestResponse:
    token = hidden(client.get("/login").text, "csrf_token")
    data = {"csrf_token": token, "username": "operator", "password": password}
    if next_url is not None:
        data["next"] = next_url
    return client.post("/login", data=data)


# The walk-through -------------------------------------------------------------------------------------------


def test_payment_is_idempotent_per_user_as_the_testing_kit_proves_it(example: Flask) -> None:
    """The kit's ``assert_idempotent``: charge, replay, another amount (422), no key (400), Bob's own payment."""
    client = example.test_client()
    body = {"amount": 1000, "currency": "EUR", "description": "coffee beans"}
    check = assert_idempotent(
        client,
        "POST",
        "/payments",
        json=body,
        headers={"Authorization": f"Bearer {ALICE}"},
        other_json={**body, "amount": 2000},
        other_headers={"Authorization": f"Bearer {BOB}"},
        key="order-1001",
    )

    payment = check.first.get_json()
    assert check.first.status_code == 201
    assert payment["amount"] == 1000 and payment["status"] == "succeeded"
    assert check.first.headers["Location"] == f"/payments/{payment['id']}"
    assert "Idempotent-Replayed" not in check.first.headers
    assert check.replay.get_json() == payment  # byte-identical, marked (checked by the kit)
    assert check.replay.headers["Location"] == check.first.headers["Location"]
    assert problem_code(check.conflict) == "key-reused"
    assert check.missing_key is not None and problem_code(check.missing_key) == "missing-key"
    assert check.other_client is not None and check.other_client.get_json()["id"] != payment["id"]

    rec = record(example, "order-1001")
    assert (rec["state"], rec["attempts"], rec["response_status"]) == ("COMPLETED", 1, 201)
    assert rec["recovery_point"] == "provider-charged"
    assert rec["event_count"] == 1  # the 422, counted: the cap on client-caused events reads it
    (conflict,) = rows(example, "idempotency_events", kind="conflict")
    assert conflict["record_id"] == rec["id"]
    scopes = sorted(r["scope"] for r in rows(example, "idempotency_records", key="order-1001"))
    assert scopes == sorted([str(user_id(example, "alice")), str(user_id(example, "bob"))])
    charges = rows(example, "provider_charges")
    assert [c["amount"] for c in charges] == [1000, 1000]  # Alice's and Bob's; never the replay's or the 422's
    alices = [p for p in rows(example, "payments") if p["user_id"] == user_id(example, "alice")]
    assert [p["charge_id"] for p in alices] == [payment["charge_id"]]
    assert len(rows(example, "payments")) == 2

    read = client.get(check.first.headers["Location"], headers={"Authorization": f"Bearer {ALICE}"})
    assert read.status_code == 200 and read.get_json() == payment


def test_the_readmes_five_line_kit_test_passes_on_the_example_app(example: Flask) -> None:
    readme = (Path(example_app.__file__).resolve().parent.parent / "README.md").read_text()
    section = readme.split("## Testing your own routes", 1)[1]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    namespace: dict[str, Any] = {}
    exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102 - the README's own example
    namespace["test_create_payment_is_idempotent"](example.test_client())
    assert len(rows(example, "payments")) == 2  # Alice's and Bob's


def test_crash_after_the_payment_leaves_it_in_progress_then_stuck_as_the_testing_kit_proves_it(
    example: Flask, lease_clock: LeaseClock
) -> None:
    crash = crash_after_effect(
        example.test_client(),
        "POST",
        "/payments",
        clock=lease_clock,
        json={"amount": 1000, "currency": "EUR"},
        headers={"Authorization": f"Bearer {ALICE}"},
    )
    assert problem_code(crash.after_expiry) == "stuck"
    rec = record(example, crash.key)
    assert (rec["state"], rec["recovery_point"], rec["attempts"]) == ("IN_PROGRESS", "provider-charged", 1)
    assert len(rows(example, "provider_charges")) == len(rows(example, "payments")) == 1  # never charged twice


def test_crash_after_a_transfer_leaves_nothing_and_the_retry_moves_the_money_once(
    example: Flask, lease_clock: LeaseClock
) -> None:
    before = balances(example)
    crash = crash_after_effect(
        example.test_client(),
        "POST",
        "/transfers",
        clock=lease_clock,
        json={"from_account": ALICE_CHECKING, "to_account": BOB_CHECKING, "amount": 300},
        headers={"Authorization": f"Bearer {ALICE}"},
    )
    assert crash.left is None and crash.after_expiry.status_code == 201
    after = balances(example)
    assert after[ALICE_CHECKING] == before[ALICE_CHECKING] - 300 and after[BOB_CHECKING] == before[BOB_CHECKING] + 300
    assert len(rows(example, "transfers")) == 1


def test_concurrent_duplicate_gets_409_while_the_first_waits_on_the_provider(example: Flask) -> None:
    gate = example.extensions["payment_provider"].gate
    first = InThread(lambda: pay(example.test_client(), "order-1003", simulate="hang"))
    assert gate.wait_for_waiters(1, timeout=10), "the first request never reached the provider"

    duplicate = pay(example.test_client(), "order-1003")

    assert duplicate.status_code == 409 and problem_code(duplicate) == "in-progress"
    assert duplicate.headers["Retry-After"]
    assert record(example, "order-1003")["state"] == "IN_PROGRESS"
    assert rows(example, "provider_charges") == []
    assert len(rows(example, "idempotency_events", kind="in_progress_hit")) == 1

    released = example.test_client().post("/provider/release", headers={"Authorization": f"Bearer {ALICE}"})
    assert released.get_json() == {"released": 1}
    response = first.result()
    assert response.status_code == 201

    again = pay(example.test_client(), "order-1003")
    assert again.status_code == 201 and again.headers["Idempotent-Replayed"] == "true"
    assert again.get_json() == response.get_json()
    assert len(rows(example, "provider_charges")) == 1 and len(rows(example, "payments")) == 1


def test_transient_provider_failure_is_retryable_and_the_retry_succeeds(example: Flask) -> None:
    client = example.test_client()
    failed = pay(client, "order-1004", simulate="transient")
    assert failed.status_code == 503 and problem_code(failed) == "provider-unavailable"
    assert failed.headers["Retry-After"] == "1"
    rec = record(example, "order-1004")
    assert (rec["state"], rec["retryable"], rec["attempts"]) == ("FAILED", True, 1)
    assert rows(example, "provider_charges") == []

    retry = pay(client, "order-1004")

    assert retry.status_code == 201 and "Idempotent-Replayed" not in retry.headers
    rec = record(example, "order-1004")
    assert (rec["state"], rec["attempts"]) == ("COMPLETED", 2)
    assert len(rows(example, "provider_charges")) == 1 and len(rows(example, "payments")) == 1


def test_final_provider_failure_is_replayed_and_never_rerun(example: Flask) -> None:
    client = example.test_client()
    failed = pay(client, "order-1005", simulate="fail")
    assert failed.status_code == 500 and problem_code(failed) == "provider-error"

    retry = pay(client, "order-1005")

    assert retry.status_code == 500 and retry.headers["Idempotent-Replayed"] == "true"
    assert problem_code(retry) == "provider-error"
    rec = record(example, "order-1005")
    assert (rec["state"], rec["retryable"], rec["attempts"]) == ("FAILED", False, 1)
    assert rows(example, "payments") == []


def test_crash_after_the_charge_is_stuck_until_an_operator_marks_it_retryable(
    example: Flask, clock: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SIGKILL after the provider charged, in process: the request stops dead at the crash point.

    The test stands in for the kill: the "dead" request blocks where the process would have died, so the
    database holds exactly what a killed process leaves (charge made, checkpoint written, record IN_PROGRESS,
    no payment); the lease then runs out on the test's clock. The real SIGKILL is covered by the fault tests.
    """

    class ProcessDied(BaseException):
        pass

    died, buried = threading.Event(), threading.Event()

    def crash() -> None:
        died.set()
        assert buried.wait(30)
        raise ProcessDied  # after the test is done: nothing this request does afterwards may count

    monkeypatch.setattr(example.extensions["payment_provider"], "crash", crash)
    dead = InThread(lambda: pay(example.test_client(), "order-1006", simulate="crash"))
    assert died.wait(10), "the request never reached the crash point"

    rec = record(example, "order-1006")
    assert (rec["state"], rec["recovery_point"], rec["attempts"]) == ("IN_PROGRESS", "provider-charged", 1)
    (charge,) = rows(example, "provider_charges")
    assert rows(example, "payments") == []

    client = example.test_client()
    live = pay(client, "order-1006")
    assert live.status_code == 409 and problem_code(live) == "in-progress"

    clock.advance(seconds=61)  # past the 60 s lease: the owner is presumed dead
    stuck = pay(client, "order-1006")
    assert stuck.status_code == 409 and problem_code(stuck) == "stuck"
    assert record(example, "order-1006")["state"] == "IN_PROGRESS"

    operator = example.test_client()
    assert login(operator, next_url="/idempotency/stuck").status_code == 303
    listing = operator.get("/idempotency/stuck")
    assert listing.status_code == 200 and "order-1006" in listing.text
    assert "1000 EUR (minor units)" in listing.text and "alice" in listing.text  # summary and scope label
    page = operator.get(f"/idempotency/records/{rec['id']}")
    assert page.status_code == 200 and "provider-charged" in page.text
    assert "the provider charged (see recovery data: charge_id)" in html.unescape(page.text)  # the route's runbook
    found = operator.get("/idempotency/search?q=alice")
    assert found.status_code == 200 and "order-1006" in found.text  # search by the user's name
    action = f"/idempotency/records/{rec['id']}/mark-retryable"
    marked = operator.post(
        action,
        data={"csrf_token": hidden(page.text, "csrf_token", action), "version": hidden(page.text, "version", action)},
    )
    assert marked.status_code == 303
    rec = record(example, "order-1006")
    assert (rec["state"], rec["retryable"]) == ("FAILED", True)
    (event,) = rows(example, "idempotency_events", kind="mark_retryable")
    assert event["actor"] == "operator"

    retry = pay(client, "order-1006")

    assert retry.status_code == 201
    assert retry.get_json()["charge_id"] == charge["id"]  # the provider answered the reference: no second charge
    assert rows(example, "provider_charges") == [charge]
    assert len(rows(example, "payments")) == 1
    rec = record(example, "order-1006")
    assert (rec["state"], rec["attempts"]) == ("COMPLETED", 2)

    buried.set()  # the "dead" request wakes up: its late outcome is fenced off by the newer lease
    with pytest.raises(ProcessDied):
        dead.result()
    rec = record(example, "order-1006")
    assert (rec["state"], rec["attempts"], rec["response_status"]) == ("COMPLETED", 2, 201)


def test_transfer_moves_money_once_in_one_transaction(example: Flask) -> None:
    client = example.test_client()
    before = balances(example)

    moved = transfer(client, "transfer-1", 2500)

    assert moved.status_code == 201
    body = moved.get_json()
    assert body["from_account"]["balance"] == before[ALICE_CHECKING] - 2500
    after = balances(example)
    assert after[ALICE_CHECKING] == before[ALICE_CHECKING] - 2500
    assert after[BOB_CHECKING] == before[BOB_CHECKING] + 2500
    (row,) = rows(example, "transfers")
    assert (row["amount"], row["idempotency_key"]) == (2500, "transfer-1")
    assert record(example, "transfer-1")["state"] == "COMPLETED"

    retry = transfer(client, "transfer-1", 2500)
    assert retry.status_code == 201 and retry.headers["Idempotent-Replayed"] == "true"
    assert retry.get_json() == body
    assert balances(example) == after
    assert len(rows(example, "transfers")) == 1


def test_transfer_failing_after_its_writes_is_rolled_back_and_the_retry_applies_once(example: Flask) -> None:
    client = example.test_client()
    before = balances(example)

    failed = transfer(client, "transfer-2", 700, simulate="transient")

    assert failed.status_code == 503 and problem_code(failed) == "transient-error"
    assert balances(example) == before  # the layer rolled the view's writes back
    assert rows(example, "transfers") == []
    rec = record(example, "transfer-2")
    assert (rec["state"], rec["retryable"]) == ("FAILED", True)

    retry = transfer(client, "transfer-2", 700)

    assert retry.status_code == 201
    after = balances(example)
    assert after[ALICE_CHECKING] == before[ALICE_CHECKING] - 700
    assert after[BOB_CHECKING] == before[BOB_CHECKING] + 700
    assert len(rows(example, "transfers")) == 1
    rec = record(example, "transfer-2")
    assert (rec["state"], rec["attempts"]) == ("COMPLETED", 2)


def test_transfer_beyond_the_balance_changes_nothing_and_its_answer_is_kept(example: Flask) -> None:
    client = example.test_client()
    before = balances(example)

    refused = transfer(client, "transfer-3", before[ALICE_SAVINGS] + 1, source=ALICE_SAVINGS)

    assert refused.status_code == 422 and problem_code(refused) == "insufficient-funds"
    assert balances(example) == before and rows(example, "transfers") == []
    rec = record(example, "transfer-3")
    assert (rec["state"], rec["response_status"]) == ("COMPLETED", 422)  # an answer: replayed from now on
    again = transfer(client, "transfer-3", before[ALICE_SAVINGS] + 1, source=ALICE_SAVINGS)
    assert again.status_code == 422 and again.headers["Idempotent-Replayed"] == "true"
    assert again.data == refused.data and balances(example) == before  # the view debited first: rolled back


# Scope and authentication -----------------------------------------------------------------------------------


def test_request_without_a_valid_token_is_401_and_claims_no_key(example: Flask) -> None:
    client = example.test_client()
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic YTpi"}):
        response = client.post("/payments", json={"amount": 1000}, headers={"Idempotency-Key": "order-x", **headers})
        assert response.status_code == 401 and problem_code(response) == "unauthorized"
        assert response.headers["WWW-Authenticate"].startswith("Bearer")
    assert rows(example, "idempotency_records") == []
    assert rows(example, "provider_charges") == []


def test_a_user_cannot_read_another_users_payment(example: Flask) -> None:
    client = example.test_client()
    location = pay(client, "order-2").headers["Location"]
    response = client.get(location, headers={"Authorization": f"Bearer {BOB}"})
    assert response.status_code == 404 and problem_code(response) == "not-found"


@pytest.mark.parametrize("example_config", [{"PROVIDER_SIMULATION": False}])
def test_simulation_switches_are_refused_when_simulation_is_off(example: Flask) -> None:
    client = example.test_client()
    response = pay(client, "order-3", simulate="crash")
    assert response.status_code == 400 and problem_code(response) == "simulation-disabled"
    assert rows(example, "idempotency_records") == []
    release = client.post("/provider/release", headers={"Authorization": f"Bearer {ALICE}"})
    assert release.status_code == 404


# Operator login and the dashboard ---------------------------------------------------------------------------


def test_dashboard_sends_browsers_to_the_login_and_then_back(example: Flask) -> None:
    client = example.test_client()
    closed = client.get("/idempotency/stuck")
    assert closed.status_code == 302
    assert closed.headers["Location"].startswith("/login?next=")

    logged_in = login(client, next_url="/idempotency/stuck")

    assert logged_in.status_code == 303 and logged_in.headers["Location"] == "/idempotency/stuck"
    page = client.get("/idempotency/")
    assert page.status_code == 200 and "operator" in page.text

    logout = client.post("/logout", data={"csrf_token": hidden(client.get("/").text, "csrf_token")})
    assert logout.status_code == 303
    assert client.get("/idempotency/").status_code == 302


def test_wrong_operator_password_is_refused(example: Flask) -> None:
    client = example.test_client()
    refused = login(client, password="guess")
    assert refused.status_code == 401 and "Wrong username or password" in refused.text
    assert client.get("/idempotency/").status_code == 302


def test_login_never_redirects_to_another_site(example: Flask) -> None:
    response = login(example.test_client(), next_url="//evil.example/phish")
    assert response.status_code == 303 and response.headers["Location"] == "/idempotency/"


def test_dashboard_action_without_login_is_403_and_changes_nothing(example: Flask) -> None:
    client = example.test_client()
    pay(client, "order-4", simulate="fail")
    rec = record(example, "order-4")
    response = client.post(f"/idempotency/records/{rec['id']}/mark-retryable", data={"version": "x"})
    assert response.status_code == 403
    assert record(example, "order-4") == rec


def test_home_page_is_served(example: Flask) -> None:
    page = example.test_client().get("/")
    assert page.status_code == 200 and "POST /payments" in page.text


# Configuration ----------------------------------------------------------------------------------------------


@pytest.fixture
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in ("FLASK_DEBUG", "DATABASE_URL", "SECRET_KEY", "OPERATOR_USERNAME", "OPERATOR_PASSWORD"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_production_mode_refuses_to_start_without_an_operator_password(
    clean_environment: pytest.MonkeyPatch, tmp_path: Any
) -> None:
    with pytest.raises(ConfigurationError, match="OPERATOR_PASSWORD"):
        create_app({"DATABASE_URL": f"sqlite:///{tmp_path}/x.db", "SECRET_KEY": "k"})


def test_production_mode_refuses_to_start_without_a_secret_key(
    clean_environment: pytest.MonkeyPatch, tmp_path: Any
) -> None:
    with pytest.raises(ConfigurationError, match="SECRET_KEY"):
        create_app({"DATABASE_URL": f"sqlite:///{tmp_path}/x.db", "OPERATOR_PASSWORD": "pw"})


def test_production_mode_takes_its_settings_from_the_environment(
    clean_environment: pytest.MonkeyPatch, tmp_path: Any
) -> None:
    clean_environment.setenv("DATABASE_URL", "postgres://app@db.internal:5432/payments")
    clean_environment.setenv("SECRET_KEY", "from-env")
    clean_environment.setenv("OPERATOR_USERNAME", "ops")
    clean_environment.setenv("OPERATOR_PASSWORD", "pw")
    app = create_app()
    assert app.config["SQLALCHEMY_DATABASE_URI"] == "postgresql+psycopg2://app@db.internal:5432/payments"
    assert app.secret_key == "from-env" and app.config["OPERATOR_USERNAME"] == "ops"
    assert app.config["PROVIDER_SIMULATION"] is False  # no kill switch in production
    assert app.config["SESSION_COOKIE_SECURE"] is True


def test_debug_mode_uses_the_documented_development_password(
    clean_environment: pytest.MonkeyPatch, tmp_path: Any
) -> None:
    app = create_app({"DEBUG": True, "DATABASE_URL": f"sqlite:///{tmp_path}/x.db"})
    assert app.config["OPERATOR_PASSWORD"] == DEV_OPERATOR_PASSWORD
    assert app.secret_key  # generated for the process
    assert app.config["PROVIDER_SIMULATION"] is True


def test_the_development_login_is_announced_by_the_server_not_by_every_cli_command(
    clean_environment: pytest.MonkeyPatch, tmp_path: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    app = create_app({"DEBUG": True, "DATABASE_URL": f"sqlite:///{tmp_path}/x.db"})
    with app.app_context():
        example_db.create_all()
    stuck = app.test_cli_runner().invoke(args=["idempotency", "stuck"])
    assert stuck.exit_code == 0 and stuck.stderr == "" and stuck.stdout == "(none)\n"
    assert not [r for r in caplog.records if "dev-password" in r.getMessage()]
    app.test_client().get("/")
    app.test_client().get("/")
    announced = [r for r in caplog.records if "dev-password" in r.getMessage()]
    assert len(announced) == 1 and announced[0].levelname == "WARNING"  # once, when it serves


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("postgres://u:p@h:5432/d", "postgresql+psycopg2://u:p@h:5432/d"),
        ("postgresql://u@h/d", "postgresql+psycopg2://u@h/d"),
        ("postgresql+psycopg2://u@h/d", "postgresql+psycopg2://u@h/d"),
        ("sqlite:////var/lib/app.db", "sqlite:////var/lib/app.db"),
    ],
)
def test_database_url_is_mapped_to_the_psycopg2_driver(url: str, expected: str) -> None:
    assert normalize_database_url(url) == expected


# Webhooks: the provider's payout events ---------------------------------------------------------------------

WEBHOOK_SECRET = "whsec-test"


def deliver(client: FlaskClient, event: dict[str, Any], *, secret: str = WEBHOOK_SECRET) -> TestResponse:
    from example_app.webhooks import SIGNATURE_HEADER, sign

    body = json.dumps(event).encode()
    return client.post(
        "/webhooks/provider",
        data=body,
        headers={"Content-Type": "application/json", SIGNATURE_HEADER: sign(body, secret)},
    )


@pytest.mark.parametrize("example_config", [{"PROVIDER_WEBHOOK_SECRET": WEBHOOK_SECRET}])
def test_a_redelivered_payout_webhook_credits_once(example: Flask) -> None:
    client = example.test_client()
    before = balances(example)[BOB_CHECKING]
    event = {"id": "evt_1", "type": "payout.paid", "account": BOB_CHECKING, "amount": 700}
    first = deliver(client, event)
    again = deliver(client, event)  # the sender did not see the first 200 and retries
    assert (first.status_code, again.status_code) == (200, 200)
    assert again.headers["Idempotent-Replayed"] == "true" and again.get_json() == first.get_json()
    assert balances(example)[BOB_CHECKING] == before + 700
    (rec,) = rows(example, "idempotency_records", scope="provider", key="evt_1")
    assert rec["state"] == "COMPLETED" and rec["summary"] == f"payout.paid 700 to account {BOB_CHECKING}"
    changed = deliver(client, {**event, "amount": 7000})
    assert changed.status_code == 422 and problem_code(changed) == "key-reused"
    assert balances(example)[BOB_CHECKING] == before + 700


@pytest.mark.parametrize("example_config", [{"PROVIDER_WEBHOOK_SECRET": WEBHOOK_SECRET}])
def test_a_forged_webhook_is_401_and_claims_nothing(example: Flask) -> None:
    client = example.test_client()
    before = balances(example)
    forged = deliver(client, {"id": "evt_2", "type": "payout.paid", "account": 1, "amount": 5}, secret="guess")
    assert forged.status_code == 401 and problem_code(forged) == "bad-signature"
    assert rows(example, "idempotency_records", scope="provider") == [] and balances(example) == before


# Operating it: outages, logs, releasing a completed payment -------------------------------------------------


def unreachable_url(database_url: str, tmp_path: Any) -> str:
    """A URL of the same kind whose database cannot be reached (as in test_store_unavailable)."""
    if database_url.startswith("sqlite"):
        return f"sqlite:///{tmp_path / 'missing-dir' / 'db.sqlite'}"  # cannot be opened
    return "postgresql+psycopg2://root@127.0.0.1:1/nowhere?connect_timeout=2"  # nothing listens on port 1


@pytest.fixture
def down(database_url: str, tmp_path: Any, example_config: dict[str, Any]) -> Flask:
    """The example app whose database cannot be reached (the server is gone, or refuses connections)."""
    return create_app(
        {
            "TESTING": True,
            "DATABASE_URL": unreachable_url(database_url, tmp_path),
            "SECRET_KEY": "test-secret",
            "OPERATOR_PASSWORD": OPERATOR_PASSWORD,
            "PROVIDER_HANG_DIR": str(tmp_path / "provider-hang"),
            **example_config,
        }
    )


@pytest.mark.parametrize("cut", ["never-reachable", "cut-while-running"])
def test_a_database_outage_answers_every_api_route_with_503_store_unavailable(
    cut: str, database_url: str, request: pytest.FixtureRequest, caplog: pytest.LogCaptureFixture
) -> None:
    """The token lookup runs before the layer's hook: it meets the outage first, and must answer like the layer.

    Two outages: a database that was never reachable, and a running app cut off its database by the testing
    kit's ``store_outage`` (which also asserts that every POST answered 503 store-unavailable and no view ran).
    """
    app: Flask = request.getfixturevalue("down" if cut == "never-reachable" else "example")
    client = app.test_client()
    auth = {"Authorization": f"Bearer {ALICE}"}
    with store_outage(app) if cut == "cut-while-running" else contextlib.nullcontext():
        answers = [
            pay(client, "order-outage"),
            transfer(client, "transfer-outage", 100),
            client.get("/payments/1", headers=auth),
            client.get("/accounts", headers=auth),
            client.post("/payments", json={"amount": 1}, headers=auth),  # no key: the outage answer all the same
            client.post("/provider/release", headers=auth),
        ]
    for response in answers:
        assert response.status_code == 503, response.data
        assert response.mimetype == "application/problem+json"
        body = response.get_json(force=True)
        assert body["type"] == "urn:flask-idempotent:problem:store-unavailable"
        assert body["status"] == 503 and body["title"] and body["detail"]
        assert response.headers["Retry-After"] == "1"
    outage = [r for r in caplog.records if "database unavailable" in r.getMessage()]
    assert len(outage) == len(answers)  # one line per failed request, without a traceback
    assert all(r.exc_info is None and "\n" not in r.getMessage() for r in outage)


@pytest.mark.parametrize("example_config", [{"PROVIDER_WEBHOOK_SECRET": "whsec-test"}])
def test_a_database_outage_answers_a_webhook_with_503_so_the_sender_retries(down: Flask) -> None:
    response = deliver(down.test_client(), {"id": "evt_9", "type": "payout.paid", "account": 1, "amount": 5})
    assert response.status_code == 503 and problem_code(response) == "store-unavailable"
    assert response.headers["Retry-After"] == "1"


def test_releasing_a_completed_payment_and_retrying_answers_the_existing_payment(example: Flask) -> None:
    """The provider deduplicates by ``scope:key``: the retry gets the old charge, and the view its payment."""
    client = example.test_client()
    first = pay(client, "order-2001", 1500, description="books")
    assert first.status_code == 201
    rec = record(example, "order-2001")

    operator = example.test_client()
    assert login(operator).status_code == 303
    confirm = operator.get(f"/idempotency/records/{rec['id']}/release")  # the confirmation step
    assert confirm.status_code == 200
    action = f"/idempotency/records/{rec['id']}/release"
    released = operator.post(
        action,
        data={
            "csrf_token": hidden(confirm.text, "csrf_token", action),
            "version": hidden(confirm.text, "version", action),
            "confirm": "release",
        },
    )
    assert released.status_code == 303
    assert rows(example, "idempotency_records", key="order-2001") == []

    retry = pay(client, "order-2001", 1500, description="books")

    assert retry.status_code == 201, retry.data
    assert "Idempotent-Replayed" not in retry.headers  # the view ran again...
    assert retry.get_json() == first.get_json()  # ...and answered with the payment it had booked
    assert retry.headers["Location"] == first.headers["Location"]
    assert len(rows(example, "provider_charges")) == 1 and len(rows(example, "payments")) == 1
    rec = record(example, "order-2001")
    assert (rec["state"], rec["response_status"]) == ("COMPLETED", 201)
    again = pay(client, "order-2001", 1500, description="books")
    assert again.headers["Idempotent-Replayed"] == "true" and again.get_json() == first.get_json()


LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z (DEBUG|INFO|WARNING|ERROR|CRITICAL) [\w.]+: \S")


def test_log_lines_carry_time_and_level_and_a_failure_is_one_line() -> None:
    """The formatter the app installs when nobody configured logging (``example_app.logs``)."""
    import logging

    from example_app.logs import OneLineFormatter

    try:
        try:
            raise ValueError("inner\nsecond line")
        except ValueError as inner:
            raise RuntimeError("could not store the outcome\n[SQL: INSERT ...]") from inner
    except RuntimeError:
        import sys

        exc_info = sys.exc_info()
    entry = logging.LogRecord("flask_idempotent", logging.ERROR, __file__, 1, "failed: %s", ("x\ny",), exc_info)

    line = OneLineFormatter().format(entry)

    assert "\n" not in line and LOG_LINE.match(line), line
    assert line.endswith("[RuntimeError: could not store the outcome]")
    verbose = OneLineFormatter(tracebacks=True).format(entry)  # DEBUG: the traceback follows
    assert LOG_LINE.match(verbose) and "Traceback" in verbose and "ValueError: inner" in verbose


@pytest.mark.parametrize("example_config", [{"METRICS_TOKEN": "scrape-token"}])
def test_metrics_are_served_to_operators_and_the_scraper_only(example: Flask) -> None:
    client = example.test_client()
    assert pay(client, "order-m1").status_code == 201
    assert pay(client, "order-m1").status_code == 201  # a replay
    assert client.get("/metrics").status_code == 401
    scraped = client.get("/metrics", headers={"Authorization": "Bearer scrape-token"})
    assert scraped.status_code == 200
    text = scraped.get_data(as_text=True)
    assert 'idempotency_requests_total{endpoint="api.create_payment",outcome="executed"} 1.0' in text
    assert 'idempotency_requests_total{endpoint="api.create_payment",outcome="replayed"} 1.0' in text
    assert "idempotency_stuck_records 0.0" in text
    operator = example.test_client()
    assert login(operator).status_code == 303
    assert operator.get("/metrics").status_code == 200


# The payment's receipt: staged in the payment's transaction, delivered by the outbox ----------------------------


def drain(app: Flask) -> dict[str, int]:
    """``flask idempotency drain --once --json``, as the walk-through and a cron entry run it."""
    result = app.test_cli_runner().invoke(args=["idempotency", "drain", "--once", "--json"])
    assert result.exit_code == 0, result.output
    return dict(json.loads(result.output))


def test_a_payment_commits_its_receipt_job_and_the_hand_off_sends_it_at_once(example: Flask) -> None:
    client = example.test_client()
    paid = pay(client, "order-2000", 1500)
    assert paid.status_code == 201
    (payment,) = rows(example, "payments")
    (job,) = rows(example, "idempotency_outbox")
    assert (job["target"], job["kind"], job["args"], job["state"]) == (
        "payment-receipt",
        "handler",
        [payment["id"]],
        "DELIVERED",
    )
    (receipt,) = rows(example, "receipts")
    assert (receipt["payment_id"], receipt["amount"], receipt["job_key"]) == (payment["id"], 1500, job["key"])
    got = client.get(f"/payments/{payment['id']}/receipt", headers={"Authorization": f"Bearer {ALICE}"})
    assert got.status_code == 200 and got.get_json()["job"] == job["key"]
    assert pay(client, "order-2000", 1500).headers.get("Idempotent-Replayed") == "true"
    assert len(rows(example, "receipts")) == 1 and len(rows(example, "idempotency_outbox")) == 1  # no new job
    assert drain(example) == {"delivered": 0, "failed": 0, "dead": 0}

    failed = pay(client, "order-2001", 700, simulate="transient")  # the provider charged nothing: no payment
    assert failed.status_code == 503
    assert len(rows(example, "idempotency_outbox")) == 1  # and no receipt job


def test_a_crash_between_the_payments_commit_and_its_hand_off_leaves_the_receipt_to_the_drainer(
    example: Flask, clock: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``X-Simulate: crash-after-commit``, in process: the request stops dead where the process would die (after
    the commit, before the hand-off), as in the crash test above; the real SIGKILL is tests/test_outbox_processes."""

    class ProcessDied(BaseException):
        pass

    died, buried = threading.Event(), threading.Event()

    def crash() -> None:
        died.set()
        assert buried.wait(30)
        raise ProcessDied

    monkeypatch.setattr(example.extensions["payment_provider"], "crash", crash)
    dead = InThread(lambda: pay(example.test_client(), "order-2002", 4200, simulate="crash-after-commit"))
    assert died.wait(10), "the request never reached the crash point"

    (payment,) = rows(example, "payments")  # committed, with its job
    (job,) = rows(example, "idempotency_outbox")
    assert (job["state"], job["args"], job["attempts"]) == ("PENDING", [payment["id"]], 0)
    assert rows(example, "receipts") == []
    client = example.test_client()
    auth = {"Authorization": f"Bearer {ALICE}"}
    assert client.get(f"/payments/{payment['id']}/receipt", headers=auth).status_code == 404

    assert drain(example) == {"delivered": 0, "failed": 0, "dead": 0}  # the dead hand-off's lease is live
    clock.advance(seconds=61)  # past the 60 s lease
    assert drain(example) == {"delivered": 1, "failed": 0, "dead": 0}
    (receipt,) = rows(example, "receipts")
    assert (receipt["payment_id"], receipt["job_key"]) == (payment["id"], job["key"])
    assert client.get(f"/payments/{payment['id']}/receipt", headers=auth).status_code == 200

    # Delivered twice by hand (an operator's redeliver): the handler's once() sends no second receipt.
    runner = example.test_cli_runner()
    redo = runner.invoke(args=["idempotency", "outbox", "redeliver", str(job["id"]), "--json"])
    assert redo.exit_code == 0, redo.output
    assert drain(example) == {"delivered": 1, "failed": 0, "dead": 0}
    assert len(rows(example, "receipts")) == 1

    buried.set()  # the "dead" request wakes up and dies: nothing it does afterwards may count
    with pytest.raises(ProcessDied):
        dead.result()
    assert len(rows(example, "receipts")) == 1
    assert [j["state"] for j in rows(example, "idempotency_outbox")] == ["DELIVERED"]
