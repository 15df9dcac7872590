"""The README's start command, run the way a newcomer runs it: a fresh copy of the checkout, a fresh virtual
environment, the example app served on SQLite, and a page fetched from it.

Slow-ish (it installs the project into a new virtual environment, about a minute with a warm pip cache) but
part of the default run: it is the only test that catches a start command that no longer works. The server is
killed (its whole process group) in teardown.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from procs import free_port

CHECKOUT = Path(__file__).resolve().parent.parent

#: The README's "run the example" command, verbatim (``test_readme_shows_the_start_command`` keeps them equal); the
#: docs' Quickstart includes that part of the README.
START_COMMAND = (
    "python3 -m venv .venv && .venv/bin/pip install -e '.[migrate]'"
    " && .venv/bin/flask --app example_app --debug init-db"
    " && .venv/bin/flask --app example_app --debug run"
)
#: The README's "run the tests" command.
TEST_COMMAND = "bash .ci/run"

SETUP_TIMEOUT = 600.0  # pip downloads on a cold cache
REQUEST_TIMEOUT = 30.0


def fresh_copy(destination: Path) -> Path:
    """What a clone of this checkout holds, uncommitted work included: tracked and untracked, minus ignored."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=CHECKOUT,
        capture_output=True,
        check=False,
    )
    if listed.returncode != 0:  # not a git checkout (an sdist): copy it, minus what .gitignore would skip
        ignore = shutil.ignore_patterns(".venv", ".git", "__pycache__", "*.pyc", "instance", ".*_cache", "dist")
        shutil.copytree(CHECKOUT, destination, ignore=ignore)
        return destination
    for name in filter(None, listed.stdout.decode().split("\0")):
        source = CHECKOUT / name
        if source.is_file():
            target = destination / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
    return destination


def newcomer_environment(port: int) -> dict[str, str]:
    """A shell as a newcomer has it: no virtualenv active, no Flask or app settings, the port to serve on."""
    env = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith(("FLASK_", "PYTHON", "VIRTUAL_ENV", "PIP_", "OPERATOR_", "IDEMPOTENCY_"))
        and name not in ("DATABASE_URL", "SECRET_KEY")
    }
    bin_dir = str(Path(sys.prefix) / "bin")
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if p != bin_dir)
    env["FLASK_RUN_PORT"] = str(port)  # Flask's own variable: the command line stays the README's
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    return env


class Server:
    """The README command running in its own process group, its output collected line by line."""

    def __init__(self, command: str, cwd: Path, env: dict[str, str]) -> None:
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.output: list[str] = []
        self.process = subprocess.Popen(
            ["bash", "-c", command],
            cwd=cwd,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,  # one group: the reloader's child dies with it
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def wait_for(self, text: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            try:
                line = self.lines.get(timeout=max(remaining, 0.01))
            except queue.Empty:
                pytest.fail(f"no {text!r} within {timeout:.0f} s; output:\n{''.join(self.output)}")
            if line is None:
                pytest.fail(f"the command ended ({self.process.wait()}) before {text!r}:\n{''.join(self.output)}")
            self.output.append(line)
            if text in line:
                return

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(10)
        with contextlib.suppress(ProcessLookupError):  # the reloader's child may outlive its parent for a moment
            os.killpg(self.process.pid, signal.SIGKILL)
        self._reader.join(10)  # EOF once every process of the group is gone
        assert self.process.stdout is not None
        self.process.stdout.close()


@pytest.fixture
def served(tmp_path: Path) -> Iterator[str]:
    checkout = fresh_copy(tmp_path / "checkout")
    port = free_port()
    server = Server(START_COMMAND, checkout, newcomer_environment(port))
    try:
        # The werkzeug banner: the socket is bound, so requests queue until the app answers them.
        server.wait_for("Running on http://127.0.0.1", SETUP_TIMEOUT)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


def request(url: str, *, method: str = "GET", body: object = None, headers: dict[str, str] | None = None) -> tuple:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    if data is not None:
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=REQUEST_TIMEOUT) as response:
            return response.status, dict(response.headers), response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read().decode()


def test_readme_start_command_serves_the_example_app_from_a_fresh_virtualenv(served: str) -> None:
    status, _, page = request(served + "/")
    assert status == 200 and "Payments example" in page

    headers = {"Authorization": "Bearer alice-demo-token", "Idempotency-Key": "readme-1"}
    status, first_headers, first = request(served + "/payments", method="POST", body={"amount": 1000}, headers=headers)
    assert status == 201, first
    status, again_headers, again = request(served + "/payments", method="POST", body={"amount": 1000}, headers=headers)
    assert status == 201 and again_headers.get("Idempotent-Replayed") == "true" and again == first
    assert "Idempotent-Replayed" not in first_headers

    status, _, login = request(served + "/idempotency/")  # the dashboard sends a browser to the login
    assert status == 200 and "Operator login" in login


def included_part(page: str, source: str) -> str:
    """The part of ``source`` that the docs ``page`` includes (MyST's ``{include}`` between two marker lines)."""
    text = (CHECKOUT / "docs" / page).read_text()
    match = re.search(r'```\{include\} \.\./(\S+)\n:start-after: "(.+)"\n:end-before: "(.+)"\n', text)
    assert match, f"docs/{page} must include a part of {source} between two markers"
    assert match[1] == source
    whole = (CHECKOUT / source).read_text()
    assert whole.count(match[2]) == 1 and whole.count(match[3]) == 1, f"the markers of docs/{page} in {source}"
    return whole.split(match[2])[1].split(match[3])[0]


def test_readme_shows_the_start_command() -> None:
    readme = (CHECKOUT / "README.md").read_text()
    assert START_COMMAND in readme, "README.md must show the example's start command exactly as this test runs it"
    assert TEST_COMMAND in readme


def test_the_docs_show_the_same_commands() -> None:
    quickstart = included_part("quickstart.md", "README.md")
    assert START_COMMAND in quickstart and TEST_COMMAND in quickstart
    assert TEST_COMMAND in (CHECKOUT / "docs" / "running-tests.md").read_text()


def github_anchor(heading: str) -> str:
    """The anchor GitHub (and MyST, with ``myst_heading_anchors``) gives a Markdown heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_readme_links_reach_files_and_headings_of_the_checkout() -> None:
    readme = (CHECKOUT / "README.md").read_text()
    links = re.findall(r"\]\(([^)\s]+)\)", readme)
    local = [link for link in links if not link.startswith(("http://", "https://"))]
    assert "docs/behaviour.md" in local  # the table into the docs
    for link in local:
        path, _, anchor = link.partition("#")
        target = CHECKOUT / path
        assert target.is_file(), f"README.md links to {link}, which is not a file of the checkout"
        if anchor:
            headings = re.findall(r"^#{1,6} (.+)$", target.read_text(), flags=re.MULTILINE)
            assert anchor in map(github_anchor, headings), f"README.md links to {link}: no such heading"


def ci_run_dry(tmp_path: Path, **env: str) -> list[str]:
    """``bash .ci/run --dry-run`` with every service looking down and this user root: the machine changes it names."""
    stubs = tmp_path / "stubs"
    stubs.mkdir(exist_ok=True)
    down = {"pg_isready": "exit 1", "mysqladmin": "exit 1", "mysql": "exit 1", "redis-cli": "echo", "id": "echo 0"}
    for name, script in down.items():
        (stubs / name).write_text(f"#!/bin/sh\n{script}\n")
    for stub in stubs.iterdir():
        stub.chmod(0o755)
    base = {k: v for k, v in os.environ.items() if k not in ("CI", "IDEMPOTENCY_SYSTEM_SETUP")}
    base["PATH"] = os.pathsep.join([str(stubs), base.get("PATH", "")])
    done = subprocess.run(
        ["bash", str(CHECKOUT / ".ci" / "run"), "--dry-run"],
        env=base | env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout.splitlines()


def test_ci_run_changes_the_machine_only_under_ci_or_the_opt_in(tmp_path: Path) -> None:
    script = (CHECKOUT / ".ci" / "run").read_text()
    assert "--dry-run" in script and "IDEMPOTENCY_SYSTEM_SETUP" in script  # (else running it would change things)
    apt_calls = re.findall(r"apt-get (?:update|install)[^\n]*", script)
    assert apt_calls and [call for call in apt_calls if "-qq" in call or "/dev/null" in call] == []  # output shows

    def changes(lines: list[str], prefix: str) -> list[str]:
        return [line.removeprefix(prefix) for line in lines if line.startswith(prefix)]

    developer = ci_run_dry(tmp_path)
    ci = ci_run_dry(tmp_path, CI="true")
    opted_in = ci_run_dry(tmp_path, IDEMPOTENCY_SYSTEM_SETUP="1")

    assert any("System setup is OFF" in line for line in developer)
    assert changes(developer, "would run: ") == [] and changes(developer, "+ ") == []
    skipped = changes(developer, "would skip (system setup off): ")
    if not skipped:
        pytest.skip("nothing on this machine that .ci/run could install or start")
    # CI and the opt-in do exactly what the developer's run only names, and each command is announced first.
    assert changes(ci, "would run: ") == changes(opted_in, "would run: ") == skipped
    assert changes(ci, "would skip (system setup off): ") == []
    for lines in (developer, ci):
        for i, line in enumerate(lines):
            if line.startswith("would ") and "apt-get update" not in line:
                assert lines[i - 1].startswith(("about to ", "would ")), lines[i - 1 : i + 1]
