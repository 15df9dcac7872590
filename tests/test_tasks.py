"""Idempotent tasks and code paths (``idempotency.task`` and ``idempotency.once``), on SQLite and PostgreSQL:
the same records, leases, operator actions as requests, with ``kind = task``."""

from __future__ import annotations

import threading
from decimal import Decimal
from typing import Any

import pytest
from flask import Flask
from helpers import ext, in_app, record, records

from flask_idempotent import KeyReused, RecordStuck, RequestFailed, RequestInProgress, TransientError
from flask_idempotent import operations as ops


class Provider:
    """Counts charges; can fail or block on demand."""

    def __init__(self) -> None:
        self.charges: list[tuple[int, int]] = []
        self.fail: BaseException | None = None
        self.entered = threading.Event()
        self.release = threading.Event()
        self.block = False

    def charge(self, order_id: int, amount: int) -> dict[str, Any]:
        if self.block:
            self.entered.set()
            assert self.release.wait(10)
        if self.fail is not None:
            raise self.fail
        self.charges.append((order_id, amount))
        return {"charge": f"ch_{order_id}", "amount": amount}


@pytest.fixture
def provider() -> Provider:
    return Provider()


@pytest.fixture
def charge(app: Flask, provider: Provider) -> Any:
    idempotency = ext(app)["idempotency"]

    @idempotency.task(key=lambda order_id, amount: f"charge:{order_id}", scope="billing", lease=60)
    def charge_order(order_id: int, amount: int) -> dict[str, Any]:
        return provider.charge(order_id, amount)

    return charge_order


def test_a_task_called_twice_runs_once_and_returns_the_stored_result(
    app: Flask, charge: Any, provider: Provider
) -> None:
    first = charge(7, 1000)  # no app context of the caller's: the task pushes the app's
    second = charge(7, 1000)
    assert first == second == {"charge": "ch_7", "amount": 1000}
    assert provider.charges == [(7, 1000)]
    row = record(app, "charge:7", "billing")
    assert (row["kind"], row["method"], row["state"], row["attempts"]) == ("task", "TASK", "COMPLETED", 1)
    assert row["path"].endswith("charge_order")


def test_the_same_key_with_other_arguments_is_refused(app: Flask, charge: Any, provider: Provider) -> None:
    charge(7, 1000)
    before = records(app)
    with pytest.raises(KeyReused):
        charge(7, 9999)
    assert provider.charges == [(7, 1000)]
    assert [{k: v for k, v in r.items() if k != "event_count"} for r in records(app)] == [
        {k: v for k, v in r.items() if k != "event_count"} for r in before
    ]


def test_a_final_failure_is_stored_and_never_run_again(app: Flask, charge: Any, provider: Provider) -> None:
    provider.fail = RuntimeError("card declined")
    with pytest.raises(RuntimeError, match="card declined"):
        charge(7, 1000)
    provider.fail = None
    with pytest.raises(RequestFailed, match="card declined"):
        charge(7, 1000)
    assert provider.charges == []
    row = record(app, "charge:7", "billing")
    assert (row["state"], row["retryable"]) == ("FAILED", False)


def test_a_transient_failure_is_retried_by_the_next_call(app: Flask, charge: Any, provider: Provider) -> None:
    provider.fail = TransientError("provider timeout")
    with pytest.raises(TransientError):
        charge(7, 1000)
    assert record(app, "charge:7", "billing")["retryable"] is True
    provider.fail = None
    assert charge(7, 1000)["charge"] == "ch_7"
    row = record(app, "charge:7", "billing")
    assert (row["state"], row["attempts"]) == ("COMPLETED", 2) and provider.charges == [(7, 1000)]


def test_a_call_while_another_holds_the_lease_says_when_to_retry(app: Flask, charge: Any, provider: Provider) -> None:
    provider.block = True
    result: dict[str, Any] = {}
    owner = threading.Thread(target=lambda: result.update(value=charge(7, 1000)), daemon=True)
    owner.start()
    assert provider.entered.wait(10)
    provider.block = False
    with pytest.raises(RequestInProgress) as busy:
        charge(7, 1000)
    assert busy.value.retry_after == 1  # what a Celery task passes to self.retry(countdown=...)
    provider.release.set()
    owner.join(10)
    assert result["value"]["charge"] == "ch_7" and provider.charges == [(7, 1000)]


def test_a_task_whose_lease_ran_out_is_stuck_until_an_operator_decides(
    app: Flask, charge: Any, provider: Provider, clock: Any
) -> None:
    provider.block = True
    late: dict[str, Any] = {}
    owner = threading.Thread(target=lambda: late.update(value=charge(7, 1000)), daemon=True)
    owner.start()
    assert provider.entered.wait(10)
    clock.advance(seconds=61)
    with pytest.raises(RecordStuck):
        charge(7, 1000)
    row = record(app, "charge:7", "billing")
    in_app(app, ops.mark_retryable, row["id"], actor="oncall")
    provider.block = False
    provider.release.set()
    owner.join(10)  # the presumed-dead call finishes: its caller gets its value, its outcome is fenced out
    assert late["value"]["charge"] == "ch_7"
    assert record(app, "charge:7", "billing")["state"] == "FAILED"  # as the operator left it
    assert charge(7, 1000)["charge"] == "ch_7"  # the operator said retry: it runs again
    after = record(app, "charge:7", "billing")
    assert (after["state"], after["attempts"]) == ("COMPLETED", 2) and len(provider.charges) == 2
    with app.app_context():
        assert [r["kind"] for r in ops.search("charge:7").items] == ["task"]


def test_bad_keys_and_arguments_are_clear_errors_before_any_effect(app: Flask, provider: Provider) -> None:
    idempotency = ext(app)["idempotency"]

    @idempotency.task(key=lambda order: order["id"])
    def by_number(order: dict[str, Any]) -> None:
        provider.charge(1, 1)

    @idempotency.task(key=lambda order_id: f"k:{order_id}")
    def with_decimal(order_id: int, amount: Any = None) -> None:
        provider.charge(order_id, 1)

    with pytest.raises(TypeError, match="must give the key as a str, got int"):
        by_number({"id": 5})
    with pytest.raises(ValueError, match="key callable of task .* raised KeyError"):
        by_number({})
    with pytest.raises(TypeError, match="argument 'amount' of .* is a Decimal"):
        with_decimal(1, Decimal("1.5"))
    assert provider.charges == [] and records(app) == []
    with pytest.raises(TypeError, match="task\\(key=...\\) takes a callable"):
        idempotency.task(key="fixed")


def test_once_runs_a_block_at_most_once(app: Flask, provider: Provider) -> None:
    idempotency = ext(app)["idempotency"]

    def refund(refund_id: str) -> Any:
        with idempotency.once("refunds", refund_id, command={"amount": 500}) as op:
            if op.done:
                return op.result
            op.complete(provider.charge(1, -500))
            return op.result

    assert refund("rf_1") == refund("rf_1") == {"charge": "ch_1", "amount": -500}
    assert provider.charges == [(1, -500)]
    with pytest.raises(KeyReused), idempotency.once("refunds", "rf_1", command={"amount": 600}):
        pass
    with pytest.raises(RuntimeError, match="boom"), idempotency.once("refunds", "rf_2", command={}) as op:
        assert not op.done
        raise RuntimeError("boom")
    assert record(app, "rf_2", "refunds")["state"] == "FAILED"
    with idempotency.once("refunds", "rf_3", command={}) as op:
        pass  # leaving without complete() completes with None
    with idempotency.once("refunds", "rf_3", command={}) as again:
        assert again.done and again.result is None


def test_task_records_are_listed_and_filtered_by_kind(
    app: Flask, client: Any, charge: Any, provider: Provider, clock: Any
) -> None:
    from concurrency import finish, make_stuck

    provider.block = True
    owner = threading.Thread(target=lambda: charge(7, 1000), daemon=True)
    owner.start()
    assert provider.entered.wait(10)
    http_owner = make_stuck(app, clock)  # a stuck request too; the clock moves 12 minutes
    try:
        with app.app_context():
            assert {r["kind"] for r in ops.list_stuck().items} == {"http", "task"}
            assert [r["key"] for r in ops.list_stuck(kind="task").items] == ["charge:7"]
            assert [r["key"] for r in ops.list_stuck(kind="http").items] == ["stuck-1"]
            with pytest.raises(ValueError, match="kind must be one of"):
                ops.list_stuck(kind="cron")
        ext(app)["idempotency"].dashboard_access(lambda: "oncall")
        page = client.get("/idempotency/stuck?record_kind=task").get_data(as_text=True)
        assert "charge:7" in page and "stuck-1" not in page and 'data-fi-kind="task"' in page
        cli = app.test_cli_runner().invoke(args=["idempotency", "stuck", "--kind", "task"])
        assert cli.exit_code == 0 and "charge:7" in cli.output and "task " in cli.output and "stuck-1" not in cli.output
    finally:
        provider.release.set()
        owner.join(10)
        finish(http_owner)


def test_a_bound_celery_task_passes_itself_through_outside_the_key_and_command(app: Flask, provider: Provider) -> None:
    idempotency = ext(app)["idempotency"]
    seen: list[Any] = []

    class FakeTask:  # what Celery passes as ``self`` with bind=True: not JSON, never part of the command
        def retry(self, countdown: int) -> None: ...

    @idempotency.task(key=lambda order_id: f"bound:{order_id}", bind=True)
    def bound_charge(self: Any, order_id: int) -> dict[str, Any]:
        seen.append(self)
        return provider.charge(order_id, 1)

    first, second = FakeTask(), FakeTask()
    assert bound_charge(first, 3) == bound_charge(second, 3) == {"charge": "ch_3", "amount": 1}
    assert seen == [first] and provider.charges == [(3, 1)]


def test_the_errors_keep_their_message_when_pickled() -> None:
    import pickle

    error = pickle.loads(pickle.dumps(RecordStuck("the charge of order 7 stopped without an outcome")))
    assert isinstance(error, RecordStuck) and "order 7" in str(error) and error.code == 409


class ProviderBusy(Exception):
    """The provider cannot take the charge now: nothing happened."""


def busy_for(runs: list[int], times: int, provider: Provider, order_id: int, amount: int) -> dict[str, Any]:
    """The provider, busy for the first ``times`` runs (each run is counted in ``runs``)."""
    runs.append(order_id)
    if len(runs) <= times:
        raise ProviderBusy(f"busy (run {len(runs)})")
    return provider.charge(order_id, amount)


def celery_task(app: Flask, provider: Provider, how: str, busy: int) -> tuple[Any, list[int]]:
    """A real Celery task retried by Celery (``raise self.retry`` or ``autoretry_for``), max_retries=2, that runs
    in-process with ``task.apply()`` (Celery runs its retries eagerly there, through the same ``Task.retry``)."""
    celery = pytest.importorskip("celery")
    celery_app = celery.Celery("test_tasks", set_as_current=False)
    idempotency = ext(app)["idempotency"]
    runs: list[int] = []
    if how == "self.retry":

        @celery_app.task(bind=True, max_retries=2, name="charge")
        @idempotency.task(key=lambda order_id, amount: f"charge:{order_id}", scope="billing", bind=True, name="charge")
        def retried(self: Any, order_id: int, amount: int) -> dict[str, Any]:
            try:
                return busy_for(runs, busy, provider, order_id, amount)
            except ProviderBusy as exc:
                raise self.retry(exc=exc, countdown=0) from exc

        return retried, runs

    @celery_app.task(autoretry_for=(ProviderBusy,), max_retries=2, retry_kwargs={"countdown": 0}, name="charge")
    @idempotency.task(key=lambda order_id, amount: f"charge:{order_id}", scope="billing", name="charge")
    def autoretried(order_id: int, amount: int) -> dict[str, Any]:
        return busy_for(runs, busy, provider, order_id, amount)

    return autoretried, runs


@pytest.mark.parametrize("how", ["self.retry", "autoretry_for"])
def test_celery_retries_run_the_task_again_until_it_succeeds(app: Flask, provider: Provider, how: str) -> None:
    task, runs = celery_task(app, provider, how, busy=2)
    result = task.apply(args=(7, 1000))
    assert (result.state, result.result) == ("SUCCESS", {"charge": "ch_7", "amount": 1000})
    assert runs == [7, 7, 7] and provider.charges == [(7, 1000)]  # three runs, one effect
    row = record(app, "charge:7", "billing")
    assert (row["kind"], row["state"], row["retryable"], row["attempts"]) == ("task", "COMPLETED", False, 3)
    assert task.apply(args=(7, 1000)).result == result.result and runs == [7, 7, 7]  # sent again: the stored value


@pytest.mark.parametrize("how", ["self.retry", "autoretry_for"])
def test_when_celery_gives_up_the_record_stays_failed_retryable(app: Flask, provider: Provider, how: str) -> None:
    task, runs = celery_task(app, provider, how, busy=3)
    result = task.apply(args=(7, 1000))
    assert result.state == "FAILURE" and isinstance(result.result, ProviderBusy)
    assert runs == [7, 7, 7] and provider.charges == []
    row = record(app, "charge:7", "billing")
    assert (row["state"], row["retryable"], row["attempts"]) == ("FAILED", True, 3)
    with app.app_context():
        assert [r["key"] for r in ops.list_failed(True, kind="task").items] == ["charge:7"]
        assert ops.list_failed(False, awaiting=True).items == []  # nothing awaits an operator's decision
    again = task.apply(args=(7, 1000))  # sent again once the provider answers: it runs
    assert (again.state, again.result) == ("SUCCESS", {"charge": "ch_7", "amount": 1000})
    row = record(app, "charge:7", "billing")
    assert (row["state"], row["attempts"]) == ("COMPLETED", 4) and provider.charges == [(7, 1000)]


def test_a_retry_raised_by_hand_is_transient_and_other_exceptions_are_not(app: Flask, provider: Provider) -> None:
    exceptions = pytest.importorskip("celery.exceptions")
    idempotency = ext(app)["idempotency"]
    fail: list[BaseException] = [exceptions.Retry("later"), RuntimeError("card declined")]

    @idempotency.task(key=lambda order_id: f"hand:{order_id}")
    def charge_by_hand(order_id: int) -> dict[str, Any]:
        raise fail.pop(0)

    with pytest.raises(exceptions.Retry):
        charge_by_hand(1)
    assert (record(app, "hand:1")["state"], record(app, "hand:1")["retryable"]) == ("FAILED", True)
    with pytest.raises(RuntimeError):  # no Celery task, no autoretry_for: final, as without Celery
        charge_by_hand(1)
    row = record(app, "hand:1")
    assert (row["state"], row["retryable"], row["attempts"]) == ("FAILED", False, 2)


def test_a_result_is_returned_as_its_replays_return_it(app: Flask, provider: Provider) -> None:
    idempotency = ext(app)["idempotency"]

    @idempotency.task(key=lambda order_id: f"shape:{order_id}")
    def shaped(order_id: int) -> dict[Any, Any]:
        provider.charge(order_id, 1)
        return {7: "seven", "pair": (1, 2), "big": 1469956200427438080, "limit": float("inf")}

    first, replay = shaped(1), shaped(1)
    assert first == replay == {"7": "seven", "pair": [1, 2], "big": 1469956200427438080, "limit": float("inf")}
    assert provider.charges == [(1, 1)]
    with idempotency.once("shapes", "s1", command={}) as op:
        op.complete({1: (2, 3)})
        assert op.result == {"1": [2, 3]}
    with idempotency.once("shapes", "s1", command={}) as again:
        assert again.done and again.result == {"1": [2, 3]}


def test_a_result_json_cannot_encode_is_a_type_error_and_a_final_failure(app: Flask, provider: Provider) -> None:
    idempotency = ext(app)["idempotency"]

    @idempotency.task(key=lambda order_id: f"dec:{order_id}")
    def decimal_result(order_id: int) -> dict[str, Any]:
        provider.charge(order_id, 1)
        return {"amount": Decimal("1.5")}

    with pytest.raises(TypeError, match="result of .*decimal_result holds a Decimal, which is not JSON"):
        decimal_result(1)
    row = record(app, "dec:1")
    assert (row["state"], row["retryable"], row["attempts"]) == ("FAILED", False, 1)  # the effect happened
    assert "Decimal" in row["error"]
    with pytest.raises(RequestFailed, match="Decimal"):
        decimal_result(1)  # never run again: an operator decides
    assert provider.charges == [(1, 1)]

    for key, value, named in [("set", {1, 2}, "holds a set"), ("tuple-key", {(1, 2): 3}, "not tuple")]:
        with pytest.raises(TypeError, match=named), idempotency.once("results", key, command={}) as op:
            op.complete(value)
        row = record(app, key, "results")
        assert (row["state"], row["retryable"]) == ("FAILED", False)


def test_a_result_json_cannot_encode_stays_final_under_autoretry_for_exception(app: Flask, provider: Provider) -> None:
    celery = pytest.importorskip("celery")
    celery_app = celery.Celery("test_tasks", set_as_current=False)
    idempotency = ext(app)["idempotency"]

    @celery_app.task(autoretry_for=(Exception,), max_retries=2, retry_kwargs={"countdown": 0}, name="decimal")
    @idempotency.task(key=lambda order_id: f"dec:{order_id}", name="decimal")
    def decimal_task(order_id: int) -> dict[str, Any]:
        provider.charge(order_id, 1)
        return {"amount": Decimal("1.5")}

    result = decimal_task.apply(args=(1,))  # Celery retries the TypeError: its retries get RequestFailed
    assert result.state == "FAILURE" and isinstance(result.result, RequestFailed)
    assert provider.charges == [(1, 1)]
    row = record(app, "dec:1")
    assert (row["state"], row["retryable"], row["attempts"]) == ("FAILED", False, 1)


def test_celery_is_never_imported_by_the_layer() -> None:
    import subprocess
    import sys

    code = (
        "import sys, flask_idempotent; from flask_idempotent.tasks import celery_retries;"
        " assert not celery_retries(RuntimeError('x')); assert 'celery' not in sys.modules, 'celery imported'"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


def test_a_task_key_with_trailing_whitespace_is_refused_not_trimmed(app: Flask, provider: Provider) -> None:
    idempotency = ext(app)["idempotency"]

    @idempotency.task(key=lambda order_id: f"charge:{order_id}")
    def charge(order_id: str) -> None:
        provider.charge(1, 1)

    with pytest.raises(ValueError, match="unusable key"):
        charge("7 ")  # would otherwise share "charge:7"'s record
    assert provider.charges == [] and records(app) == []
