"""The example app in real processes: ``gunicorn 'example_app:create_app()'`` with two sync workers, where the
provider's ``hang`` switch must be released from another worker than the one the hung request holds; and the
app's own logging as a process without any logging set up sees it (one line per event, with time and level).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from procs import Gunicorn, Reply, poll, send
from test_example_app import ALICE, LOG_LINE, OPERATOR_PASSWORD, reset_database, unreachable_url

import example_app
from example_app import create_app

CHECKOUT = Path(__file__).resolve().parent.parent


def ExampleGunicorn(env: dict[str, str], log_path: Path, *, workers: int) -> Gunicorn:  # noqa: N802
    """``gunicorn 'example_app:create_app()'`` from the checkout, ready once its home page answers 200."""
    return Gunicorn(env, log_path, workers=workers, app="example_app:create_app()", chdir=CHECKOUT, health=None)


@pytest.fixture
def served(database_url: str, tmp_path: Path) -> Iterator[tuple[Gunicorn, Path]]:
    """Two sync workers on a fresh database (migrated, demo users), sharing a hang directory."""
    reset_database(database_url)
    hang_dir = tmp_path / "provider-hang"
    app = create_app({"TESTING": True, "DATABASE_URL": database_url, "SECRET_KEY": "k", "OPERATOR_PASSWORD": "pw"})
    result = app.test_cli_runner().invoke(args=["init-db", "--demo"])
    assert result.exit_code == 0, result.output
    with app.app_context():
        example_app.db.engine.dispose()
    env = {
        "DATABASE_URL": database_url,
        "SECRET_KEY": "test-secret",
        "OPERATOR_PASSWORD": OPERATOR_PASSWORD,
        "FLASK_PROVIDER_SIMULATION": "true",
        "FLASK_PROVIDER_HANG_DIR": str(hang_dir),
        "FLASK_PROVIDER_HANG_TIMEOUT": "30",
    }
    server = ExampleGunicorn(env, tmp_path / "gunicorn.log", workers=2)
    with server:
        yield server, hang_dir
    reset_database(database_url)


def pay(port: int, key: str, simulate: str | None = None) -> Reply:
    headers = {"Authorization": f"Bearer {ALICE}"}
    if simulate:
        headers["X-Simulate"] = simulate
    return send(port, "POST", "/payments", key=key, body={"amount": 1200, "currency": "EUR"}, headers=headers)


def test_the_hang_switch_is_released_from_another_gunicorn_worker(served: tuple[Gunicorn, Path]) -> None:
    server, hang_dir = served
    outcome: list[Reply] = []
    hung = threading.Thread(target=lambda: outcome.append(pay(server.port, "order-hang", "hang")), daemon=True)
    hung.start()
    poll(lambda: len(list((hang_dir / "waiting").glob("*"))) == 1, timeout=20, what="the hung provider call")

    # The hung request holds one sync worker: everything below is served by the other one.
    duplicate = pay(server.port, "order-hang")
    assert duplicate.status == 409 and duplicate.problem == "in-progress"
    released = send(server.port, "POST", "/provider/release", headers={"Authorization": f"Bearer {ALICE}"})
    assert released.status == 200 and released.json() == {"released": 1}

    hung.join(20)
    assert not hung.is_alive(), "the hung call was not released"
    (first,) = outcome
    assert first.status == 201, first.body
    again = pay(server.port, "order-hang")
    assert again.status == 201 and again.replayed and again.json() == first.json()
    app_lines = [
        line
        for line in server.log_path.read_text().splitlines()
        if re.search(r" (example_app|flask_idempotent)[\w.]*: ", line)
    ]
    assert all(LOG_LINE.match(line) for line in app_lines), app_lines


SCRIPT = """
import json, sys
from example_app import create_app

app = create_app({"TESTING": True, "DATABASE_URL": sys.argv[1], "SECRET_KEY": "k", "OPERATOR_PASSWORD": "pw",
                  "PROPAGATE_EXCEPTIONS": False})

@app.get("/boom")
def boom():
    try:
        raise ValueError("the cause\\nover two lines")
    except ValueError as exc:
        raise RuntimeError("the failure\\n[SQL: SELECT 1]") from exc

client = app.test_client()
headers = {"Authorization": "Bearer alice-demo-token", "Idempotency-Key": "k1"}
outage = client.post("/payments", json={"amount": 1}, headers=headers)
failure = client.get("/boom")
print(json.dumps([outage.status_code, failure.status_code]))
"""


@pytest.mark.parametrize("level", ["INFO", "DEBUG"])
def test_a_process_without_logging_setup_logs_one_line_per_event(database_url: str, tmp_path: Path, level: str) -> None:
    """What ``flask run`` or gunicorn get: nobody configured the root logger, so the app installs its handler."""
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, unreachable_url(database_url, tmp_path)],
        cwd=CHECKOUT,
        env={"PATH": "/usr/bin:/bin", "FLASK_LOG_LEVEL": level, "PYTHONPATH": str(CHECKOUT)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == [503, 500]
    lines = done.stderr.splitlines()
    events = [line for line in lines if LOG_LINE.match(line)]
    assert any(" ERROR example_app: database unavailable during POST /payments" in e for e in events), lines
    assert any(" ERROR example_app: Exception on /boom [GET]" in e for e in events), lines
    if level == "INFO":
        assert lines == events, lines  # every line is an event: no traceback, no SQL, no second line
        assert len(lines) <= 4, lines
        boom = next(e for e in events if "/boom" in e)
        assert boom.endswith("[RuntimeError: the failure]")
    else:
        assert any("Traceback" in line for line in lines)  # DEBUG: the tracebacks follow their event line
