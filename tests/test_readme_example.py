"""The README's minimal example, run the way a reader runs it: its code blocks saved as files, its commands pasted.

The ``python`` blocks become ``app.py``, ``conftest.py`` and ``test_app.py`` (each block names its file in its
first line, the minimal example in the sentence before it); the ``bash`` blocks' ``flask`` and ``curl`` lines run
in a shell with this environment's ``flask`` on ``PATH`` (as after ``pip install``), the port the only change.
Every ``curl`` line is preceded by a comment that starts with the status it answers; the test holds the README to
it, and checks the database the example wrote: the records and the example's own table.
"""

from __future__ import annotations

import json
import os
import re
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from procs import free_port
from test_readme_commands import CHECKOUT, Server, newcomer_environment

README = (CHECKOUT / "README.md").read_text()
START_TIMEOUT = 60.0


def code_blocks(language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```$", README, flags=re.MULTILINE | re.DOTALL)


def python_files() -> dict[str, str]:
    """The README's Python blocks by the file each one is: the minimal example is ``app.py``."""
    files = {}
    for block in code_blocks("python"):
        named = re.match(r"# (\w+\.py)\b", block)
        if named:
            files[named[1]] = block
        elif "def create_app" in block:
            files["app.py"] = block
    return files


def command_lines() -> list[tuple[str, str]]:
    """Each ``flask`` and ``curl`` line of the README's bash blocks, with the comment line before it."""
    lines = []
    for block in code_blocks("bash"):
        comment = ""
        for line in block.splitlines():
            if line.startswith("#"):
                comment = line
            elif line.startswith(("curl ", "flask --app app ")):
                lines.append((line, comment))
                comment = ""
    return lines


def reader_environment(port: int) -> dict[str, str]:
    """A newcomer's shell after ``pip install flask-idempotency``: this environment's ``flask`` on ``PATH``."""
    env = newcomer_environment(port)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env


class Reader:
    """Pastes the README's commands into a shell in ``directory``, against the server on ``port``."""

    def __init__(self, directory: Path, port: int) -> None:
        self.directory, self.port, self.env = directory, port, reader_environment(port)
        self.commands = command_lines()

    def find(self, text: str) -> tuple[str, str]:
        [found] = [(line, comment) for line, comment in self.commands if text in line]
        return found

    def shell(self, line: str) -> str:
        line = line.replace("127.0.0.1:5000", f"127.0.0.1:{self.port}")
        done = subprocess.run(
            ["bash", "-c", line], cwd=self.directory, env=self.env, capture_output=True, text=True, timeout=120
        )
        assert done.returncode == 0, f"{line}\n{done.stdout}\n{done.stderr}"
        return done.stdout

    def curl(self, line: str, comment: str) -> tuple[int, dict[str, str], str]:
        """Runs a README ``curl -i`` line; its status must be the one its comment promises."""
        assert line.startswith("curl -i "), line
        expected = re.match(r"# (\d{3})\b", comment)
        assert expected, f"the README's comment before {line!r} must start with the status it answers"
        head, _, body = self.shell(line).replace("\r\n", "\n").partition("\n\n")
        status_line, *header_lines = head.splitlines()
        status = int(status_line.split()[1])
        assert status == int(expected[1]), f"{line}\nanswers {status}, the README says {comment!r}\n{body}"
        headers = dict(h.split(": ", 1) for h in header_lines)
        return status, headers, body


def database(directory: Path, query: str) -> list[tuple[object, ...]]:
    with sqlite3.connect(directory / "instance" / "app.db") as conn:
        return conn.execute(query).fetchall()


@pytest.fixture
def example(tmp_path: Path) -> Iterator[Reader]:
    files = python_files()
    assert "app.py" in files, "the README's minimal example (the block with create_app) is gone"
    (tmp_path / "app.py").write_text(files["app.py"])
    reader = Reader(tmp_path, free_port())
    [(run, _)] = [(line, comment) for line, comment in reader.commands if line.startswith("flask --app app run")]
    server = Server(run, tmp_path, reader.env)
    try:
        server.wait_for("Running on http://127.0.0.1", START_TIMEOUT)
        yield reader
    finally:
        server.stop()


def test_readme_example_runs_as_pasted_and_answers_each_curl_as_its_comment_says(example: Reader) -> None:
    payments = [(line, comment) for line, comment in example.commands if "/payments" in line and "'{}'" not in line]
    first, replay, reused, bob, keyless = (example.curl(line, comment) for line, comment in payments)
    transfer = example.curl(*example.find("/transfers"))

    assert json.loads(first[2])["amount"] == 10 and "Idempotent-Replayed" not in first[1]
    assert replay[2] == first[2] and replay[1].get("Idempotent-Replayed") == "true"  # the provider was not called
    assert json.loads(reused[2])["type"].endswith(":key-reused")
    assert json.loads(bob[2])["id"] != json.loads(first[2])["id"]  # bob's key is his own operation
    assert json.loads(keyless[2])["type"].endswith(":missing-key")
    assert json.loads(transfer[2]) == {"amount": 25, "id": 1}

    records = database(example.directory, "SELECT scope, path, state, attempts FROM idempotency_records ORDER BY id")
    assert records == [
        ("alice", "/payments", "COMPLETED", 1),
        ("bob", "/payments", "COMPLETED", 1),
        ("alice", "/transfers", "COMPLETED", 1),
    ]
    assert database(example.directory, "SELECT id, amount FROM transfer") == [(1, 25)]


def test_readme_release_frees_a_key_whose_view_raised(example: Reader) -> None:
    """The README's way out of a stored final failure: ``failed`` lists it, ``release`` frees the key."""
    failing, comment = example.find("-d '{}'")
    status, _, failure = example.curl(failing, comment)
    again = example.curl(failing, comment)
    assert again[1].get("Idempotent-Replayed") == "true" and again[2] == failure
    key = re.search(r"Idempotency-Key: ([\w-]+)", failing)[1]  # type: ignore[index]
    assert database(example.directory, "SELECT state, retryable FROM idempotency_records") == [("FAILED", 0)]

    listed, _ = example.find("idempotency failed")
    assert key in example.shell(listed)
    [item] = json.loads(example.shell(listed + " --json"))["items"]
    release, _ = example.find("idempotency release ID")
    example.shell(release.replace(" ID ", f" {item['id']} "))
    assert database(example.directory, "SELECT count(*) FROM idempotency_records") == [(0,)]

    fixed = failing.replace("-d '{}'", "-d '{\"amount\": 10}'")
    status, headers, body = example.curl(fixed, "# 201")
    assert json.loads(body)["amount"] == 10 and "Idempotent-Replayed" not in headers
    assert database(example.directory, "SELECT state FROM idempotency_records") == [("COMPLETED",)]


def test_readme_testing_example_passes_against_the_minimal_example(tmp_path: Path) -> None:
    files = python_files()
    assert {"app.py", "conftest.py", "test_app.py"} <= set(files), sorted(files)
    for name in ("app.py", "conftest.py", "test_app.py"):
        (tmp_path / name).write_text(files[name])
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-W", "error", "-p", "no:cacheprovider"],
        cwd=tmp_path,
        env=reader_environment(free_port()),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "1 passed" in done.stdout
    records = database(tmp_path, "SELECT scope, state FROM idempotency_records WHERE path = '/payments' ORDER BY id")
    assert records == [("alice", "COMPLETED"), ("bob", "COMPLETED")]
