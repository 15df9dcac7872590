"""The built wheel carries the dashboard: templates and static files render from an installed package.

Builds the wheel, installs it into a fresh virtual environment (its dependencies come from the package index),
and renders the overview page and the stylesheet there, from a directory outside the checkout, so a packaging
mistake (a template or stylesheet left out of the wheel, a folder resolved against the checkout) fails here.
"""

from __future__ import annotations

import email
import email.message
import importlib.util
import json
import os
import subprocess
import sys
import textwrap
import venv
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

SCRIPT = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path

    from flask import Flask, template_rendered
    from flask_sqlalchemy import SQLAlchemy

    import flask_idempotent
    from flask_idempotent import Idempotency

    package = Path(flask_idempotent.__file__).resolve().parent
    app = Flask(__name__)
    app.config.update(SQLALCHEMY_DATABASE_URI="sqlite:///" + sys.argv[1], SECRET_KEY="wheel")
    db = SQLAlchemy()
    db.init_app(app)
    idempotency = Idempotency(app, db)
    idempotency.dashboard_access(lambda: "wheel-operator")
    with app.app_context():
        idempotency.create_all()

    rendered = []

    def note(sender, template, context, **extra):
        rendered.append(template.filename)

    template_rendered.connect(note, app)
    client = app.test_client()
    page = client.get("/idempotency/")
    with client.get("/idempotency/static/flask_idempotent/dashboard.css") as css:
        css_body = css.get_data()
        css_status, css_type = css.status_code, css.mimetype
    blueprint = app.blueprints["idempotency_dashboard"]
    print(json.dumps({
        "package": str(package),
        "page_status": page.status_code,
        "page_has_operator": "wheel-operator" in page.get_data(as_text=True),
        "templates": rendered,
        "template_folder": str(Path(blueprint.root_path, blueprint.template_folder).resolve()),
        "static_folder": str(Path(blueprint.static_folder).resolve()),
        "css_status": css_status,
        "css_type": css_type,
        "css_from_package": css_body == (package / "static/flask_idempotent/dashboard.css").read_bytes(),
    }))
    """
)


def wheel_metadata(wheel: Path) -> tuple[email.message.Message, str, str]:
    """The wheel's METADATA, its license text and its entry_points.txt."""
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        [metadata] = [n for n in names if n.endswith(".dist-info/METADATA")]
        [license_file] = [n for n in names if ".dist-info/" in n and n.endswith("/LICENSE")]
        [entry_points] = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
        return (
            email.message_from_bytes(archive.read(metadata)),
            archive.read(license_file).decode(),
            archive.read(entry_points).decode(),
        )


def run(args: list[str], *, timeout: float, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in {"PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV"}}
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False)
    assert result.returncode == 0, f"{' '.join(args)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def test_installed_wheel_renders_the_dashboard_from_its_own_templates_and_static_files(tmp_path: Path) -> None:
    dist = tmp_path / "dist"
    build = [sys.executable, "-m", "build", "--wheel", "--outdir", str(dist)]
    if importlib.util.find_spec("hatchling") is not None:
        build.append("--no-isolation")  # no download of the build backend when it is already here
    run([*build, str(ROOT)], timeout=300)
    [wheel] = dist.glob("*.whl")

    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
    expected = {
        "flask_idempotent/dashboard.py",
        "flask_idempotent/py.typed",
        "flask_idempotent/templates/flask_idempotent/base.html",
        "flask_idempotent/templates/flask_idempotent/overview.html",
        "flask_idempotent/templates/flask_idempotent/record.html",
        "flask_idempotent/static/flask_idempotent/dashboard.css",
    }
    assert expected <= names, sorted(expected - names)
    assert "flask_idempotent_pytest.py" in names  # the pytest11 entry point's module
    assert [name for name in names if name.endswith("/LICENSE")], "the LICENSE file is not in the wheel"
    assert [name for name in names if name.endswith(".gitkeep")] == []

    metadata, license_text, entry_points = wheel_metadata(wheel)
    assert license_text.startswith("BSD 3-Clause License") and "flask_idempotent developers" in license_text
    assert "BSD-3-Clause" in (metadata.get("License-Expression") or metadata.get("License") or "")
    # Extras are for users; the project's own test, docs and bench tools are dependency groups, not published.
    extras = set(metadata.get_all("Provides-Extra") or [])
    assert {"postgresql", "psycopg", "mysql", "async", "migrate", "client"} <= extras
    assert extras & {"test", "docs", "bench"} == set(), sorted(extras)
    assert "flask_idempotent = flask_idempotent_pytest" in entry_points

    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True, clear=True).create(env_dir)
    python = env_dir / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    run(
        [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", str(wheel)],
        timeout=600,
    )

    work = tmp_path / "elsewhere"  # not the checkout: nothing of /work/main on sys.path
    work.mkdir()
    (work / "render.py").write_text(SCRIPT)
    result = run([str(python), "render.py", str(tmp_path / "wheel.db")], timeout=120, cwd=work)
    report = json.loads(result.stdout.strip().splitlines()[-1])

    package = Path(report["package"])
    assert package.is_relative_to(env_dir.resolve()) and not package.is_relative_to(ROOT), package
    assert report["page_status"] == 200 and report["page_has_operator"]
    assert report["templates"], "no template was rendered"
    for filename in report["templates"]:
        assert Path(filename).is_relative_to(package / "templates" / "flask_idempotent"), filename
    assert Path(report["template_folder"]) == package / "templates"
    assert Path(report["static_folder"]) == package / "static"
    assert (report["css_status"], report["css_type"], report["css_from_package"]) == (200, "text/css", True)


@pytest.mark.parametrize("folder", ["templates", "static"])
def test_a_checkout_finds_the_top_level_folders(folder: str) -> None:
    from flask_idempotent import dashboard

    if (Path(dashboard.__file__).resolve().parent / folder).is_dir():
        pytest.skip("flask_idempotent is installed from a wheel here")
    assert Path(dashboard._assets(folder)) == ROOT / folder
