"""docs/operating.md as an operator pastes it: the CLI command run from the checkout, and the metrics snippet."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import types
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask_sqlalchemy import SQLAlchemy

from flask_idempotent import Idempotency

CHECKOUT = Path(__file__).resolve().parent.parent
OPERATING = (CHECKOUT / "docs" / "operating.md").read_text()
FLASK = str(Path(sys.executable).parent / "flask")


def test_the_cli_block_runs_from_the_checkout_as_written(tmp_path: Path) -> None:
    command = re.search(r"\$ \.venv/bin/flask (--app example_app --debug idempotency stuck)\n", OPERATING)
    assert command, "the walk-through's CLI line is gone"
    env = {**os.environ, "DATABASE_URL": f"sqlite:///{tmp_path}/example.db"}
    env.pop("FLASK_APP", None)
    run: dict[str, Any] = {"cwd": CHECKOUT, "env": env, "capture_output": True, "text": True, "timeout": 120}
    init = subprocess.run([FLASK, "--app", "example_app", "--debug", "init-db"], check=False, **run)
    assert init.returncode == 0, init.stderr
    listed = subprocess.run([FLASK, *command.group(1).split()], check=False, **run)
    assert (listed.returncode, listed.stdout, listed.stderr) == (0, "(none)\n", "")  # no warning on stderr


def test_the_metrics_snippet_runs_as_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("prometheus_client")
    snippet = next(
        block for block in re.findall(r"```python\n(.*?)```", OPERATING, re.S) if "FlaskInstrumentor" in block
    )
    instrumented: list[Flask] = []
    stub = types.ModuleType("opentelemetry.instrumentation.flask")  # its own extra: stand in for it

    class FlaskInstrumentor:
        def instrument_app(self, app: Flask) -> None:
            instrumented.append(app)

    stub.FlaskInstrumentor = FlaskInstrumentor  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "opentelemetry.instrumentation", types.ModuleType("opentelemetry.instrumentation"))
    monkeypatch.setitem(sys.modules, "opentelemetry.instrumentation.flask", stub)
    app = Flask(__name__)
    app.config.update(SQLALCHEMY_DATABASE_URI=f"sqlite:///{tmp_path}/m.db", METRICS_TOKEN="s3cret")
    db = SQLAlchemy()
    db.init_app(app)
    idempotency = Idempotency()
    namespace: dict[str, Any] = {"app": app, "db": db, "idempotency": idempotency}
    exec(compile(snippet, "docs/operating.md", "exec"), namespace)  # noqa: S102 - the documented snippet itself
    with app.app_context():
        idempotency.create_all()
    client = app.test_client()
    assert instrumented == [app]
    assert client.get("/metrics").status_code == 401
    scraped = client.get("/metrics", headers={"Authorization": "Bearer s3cret"})
    assert scraped.status_code == 200
    assert "idempotency_awaiting_decision_records 0.0" in scraped.get_data(as_text=True)
