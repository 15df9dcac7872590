"""How the package is put together: layers without import circles, errors an app's handlers catch."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest
from flask import Flask
from flask.testing import FlaskClient
from helpers import post
from werkzeug.exceptions import (
    BadRequest,
    Conflict,
    InternalServerError,
    RequestEntityTooLarge,
    ServiceUnavailable,
    UnprocessableEntity,
)

import flask_idempotent
from flask_idempotent import errors

PACKAGE = Path(flask_idempotent.__file__).parent


def package_imports() -> dict[str, set[str]]:
    """Each module of the package and the package modules it imports (relative imports, anywhere in it)."""
    graph: dict[str, set[str]] = {}
    for path in PACKAGE.glob("*.py"):
        imported: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                imported.update([node.module.split(".")[0]] if node.module else [a.name for a in node.names])
        graph[path.stem] = imported
    return graph


def test_no_module_imports_one_that_imports_it_back() -> None:
    graph = package_imports()

    def reaches(start: str, goal: str, seen: set[str]) -> bool:
        for module in graph.get(start, ()):
            if module == goal or (module not in seen and reaches(module, goal, seen | {module})):
                return True
        return False

    circles = sorted(module for module in graph if reaches(module, module, set()))
    assert circles == []
    assert "extension" not in graph["operations"] | graph["cli"] | graph["dashboard"] | graph["pipeline"]


def test_every_import_sits_at_the_top_of_its_module() -> None:
    late = []
    for path in PACKAGE.glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                late += [
                    f"{path.name}:{n.lineno}" for n in ast.walk(node) if isinstance(n, (ast.Import, ast.ImportFrom))
                ]
    assert late == []
    # Each module imports on its own, in a fresh interpreter (no order of imports hides a circle).
    for path in sorted(PACKAGE.glob("*.py")):
        name = "flask_idempotent" if path.stem == "__init__" else f"flask_idempotent.{path.stem}"
        done = subprocess.run([sys.executable, "-c", f"import {name}"], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, (name, done.stderr)


#: What a Flask app's own test suite loads anyway, and a project that merely has the package installed should not.
HEAVY_MODULES = ("flask", "sqlalchemy", "flask_sqlalchemy", "flask_idempotent")


def test_loading_the_pytest_plugin_imports_neither_flask_nor_sqlalchemy() -> None:
    """The ``pytest11`` entry point loads into every pytest run of the environment: it must cost nothing there."""
    script = (
        "import importlib.metadata, json, sys\n"
        "[plugin] = [e for e in importlib.metadata.entry_points(group='pytest11') if e.name == 'flask_idempotent']\n"
        "module = plugin.load()\n"
        f"print(json.dumps([sorted(m for m in {HEAVY_MODULES!r} if m in sys.modules), hasattr(module, 'lease_clock')]))"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == [[], True]


def test_the_testing_kit_does_not_import_pytest() -> None:
    """``flask_idempotent.testing`` is usable from any test runner; only the plugin module imports pytest."""
    script = "import sys, flask_idempotent.testing; print('pytest' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False)
    assert (done.returncode, done.stdout.strip()) == (0, "False"), done.stderr


@pytest.mark.parametrize(
    ("error", "werkzeug_class"),
    [
        (errors.MissingKey, BadRequest),
        (errors.InvalidKey, BadRequest),
        (errors.BodyTooLargeToFingerprint, RequestEntityTooLarge),
        (errors.KeyReused, UnprocessableEntity),
        (errors.RequestInProgress, Conflict),
        (errors.RecordStuck, Conflict),
        (errors.StoreUnavailable, ServiceUnavailable),
        (errors.TransientError, ServiceUnavailable),
        (errors.RequestFailed, InternalServerError),
        (errors.ResponseNotStored, InternalServerError),
    ],
)
def test_each_error_is_the_matching_werkzeug_exception(error: type, werkzeug_class: type) -> None:
    assert issubclass(error, werkzeug_class)
    assert error.code == werkzeug_class.code


def test_an_apps_handler_for_422_catches_key_reuse(app: Flask, client: FlaskClient) -> None:
    @app.errorhandler(UnprocessableEntity)
    def unprocessable(exc: UnprocessableEntity) -> tuple[dict[str, str], int]:
        return {"error": "the app's own 422", "kind": type(exc).__name__}, 422

    assert post(client, "/payments", json={"amount": 1}).status_code == 201
    reused = post(client, "/payments", json={"amount": 2})
    assert reused.status_code == 422
    assert reused.get_json() == {"error": "the app's own 422", "kind": "KeyReused"}
