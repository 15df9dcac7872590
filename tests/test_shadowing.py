"""The old, unrelated ``Flask-Idempotent`` ships a top-level ``flask_idempotent.py``: installed with this package,
``import flask_idempotent`` fails loudly wherever this package's code gets to run (docs/publishing.md).

Each case runs in a fresh interpreter with a stray ``flask_idempotent.py`` somewhere on ``sys.path``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import flask_idempotent

PACKAGE = Path(flask_idempotent.__file__).parent
# What Flask-Idempotent 0.1 (2015) exports: a Redis-backed ``Idempotent`` extension.
STRAY_MODULE = "class Idempotent:\n    pass\n"


def run(code: str, cwd: Path, pythonpath: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a fresh interpreter from ``cwd``, a directory that holds neither module (``-c`` puts the
    working directory first on ``sys.path``)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=cwd, timeout=60)


@pytest.fixture
def stray(tmp_path: Path) -> Path:
    """A directory holding a stray ``flask_idempotent.py``."""
    (tmp_path / "old").mkdir()
    module = tmp_path / "old" / "flask_idempotent.py"
    module.write_text(STRAY_MODULE)
    return module


def test_without_a_stray_module_the_import_works(tmp_path: Path) -> None:
    done = run("import flask_idempotent; print(flask_idempotent.Idempotency.__name__)", tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "Idempotency"


def test_a_stray_module_later_on_sys_path_fails_the_import_naming_both_files(stray: Path) -> None:
    done = run(f"import sys; sys.path.append({str(stray.parent)!r}); import flask_idempotent", stray.parent.parent)
    assert done.returncode == 1
    message = done.stderr.strip().splitlines()[-1]
    assert message.startswith("ImportError: Two things are named flask_idempotent")
    assert str(stray) in message and str(PACKAGE) in message
    assert "pip uninstall Flask-Idempotent" in message


def test_a_stray_module_beside_the_package_fails_the_import(stray: Path) -> None:
    # pip puts both into one site-packages; there a package directory wins over a module of the same name.
    (stray.parent / "flask_idempotent").symlink_to(PACKAGE, target_is_directory=True)
    done = run("import flask_idempotent", stray.parent.parent, pythonpath=stray.parent)
    assert done.returncode == 1
    message = done.stderr.strip().splitlines()[-1]
    assert message.startswith("ImportError: Two things are named flask_idempotent")
    assert str(stray) in message and str(stray.parent / "flask_idempotent") in message


def test_a_stray_module_earlier_on_sys_path_wins_and_python_names_it(stray: Path) -> None:
    # Not detectable by this package: its code never runs. Python's own error names the file that won.
    done = run("from flask_idempotent import Idempotency", stray.parent.parent, pythonpath=stray.parent)
    assert done.returncode == 1
    message = done.stderr.strip().splitlines()[-1]
    assert message.startswith("ImportError: cannot import name 'Idempotency' from 'flask_idempotent'")
    assert str(stray) in message


def test_the_check_costs_one_stat_per_sys_path_entry(tmp_path: Path) -> None:
    done = run(
        "import os, sys\n"
        "checked = []\n"
        "real = os.path.isfile\n"
        "os.path.isfile = lambda p: (checked.append(p) if p.endswith('flask_idempotent.py') else None) or real(p)\n"
        "import flask_idempotent\n"
        "print(len(checked), len(sys.path))\n",
        tmp_path,
    )
    assert done.returncode == 0, done.stderr
    checked, entries = map(int, done.stdout.split())
    assert checked == entries
