"""What real servers hand the app: repeated header lines joined with a comma, chunked bodies of any size, and
characters no store holds as they are (``%00`` in a path, NUL and lone surrogates in a summary).

Requests are written byte for byte on raw sockets to gunicorn (sync worker, serving ``inputapp``) and to
Werkzeug's own server (in a thread), both on 127.0.0.1, on SQLite and on PostgreSQL. Nothing sleeps to wait for an
ordering: servers are polled until ready and always stopped; a reader thread collects the response while the
body is still being sent, so a server that answers early (413) and closes is heard.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import io
import json
import os
import re
import socket
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from helpers import charges, records
from procs import Gunicorn, Reply
from werkzeug.serving import make_server

MiB = 1024 * 1024


# Servers ------------------------------------------------------------------------------------------------------


def InputGunicorn(env: dict[str, str], log_path: Path) -> Gunicorn:  # noqa: N802 - it builds a server
    """:class:`procs.Gunicorn` serving ``inputapp:create_app()`` (any database URL) instead of the fault app."""
    return Gunicorn(env, log_path, app="inputapp:create_app()")


@contextmanager
def gunicorn(database_url: str, tmp_path: Path, **env: str) -> Iterator[Gunicorn]:
    server = InputGunicorn({"INPUTAPP_DATABASE_URL": database_url, **env}, tmp_path / "gunicorn.log")
    with server:
        yield server


@contextmanager
def werkzeug_server(app: Flask) -> Iterator[int]:
    """``app`` served by Werkzeug's threaded development server on 127.0.0.1; yields the port."""
    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_port
    finally:
        server.shutdown()
        thread.join(10)
        server.server_close()


@pytest.fixture(params=["gunicorn", "werkzeug"])
def server_port(request: pytest.FixtureRequest, app: Flask, database_url: str, tmp_path: Path) -> Iterator[int]:
    """The test app behind a real server, on the ``app`` fixture's database (tables already created)."""
    if request.param == "gunicorn":
        with gunicorn(database_url, tmp_path) as server:
            yield server.port
    else:
        with werkzeug_server(app) as port:
            yield port


# Raw HTTP/1.1 -------------------------------------------------------------------------------------------------


class _Bytes:
    def __init__(self, data: bytes) -> None:
        self.data = data

    def makefile(self, *args: Any, **kwargs: Any) -> io.BytesIO:
        return io.BytesIO(self.data)


def exchange(port: int, head: bytes, body: Iterable[bytes] = (), *, timeout: float = 60) -> Reply:
    """Write ``head`` then each piece of ``body`` on one connection; return the response the server sent.

    A reader thread collects the response while the body is written: a server that refuses the body midway
    answers and closes, and the rest of the body then fails to send (that is expected, not an error).
    """
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    received = bytearray()
    closed = threading.Event()

    def read() -> None:
        try:
            while chunk := sock.recv(65536):
                received.extend(chunk)
        except OSError:
            pass  # reset after the response: the server closed with the rest of the body unread
        finally:
            closed.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        try:
            sock.sendall(head)
            for piece in body:
                if closed.is_set():
                    break
                sock.sendall(piece)
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # the server stopped reading and closed: its answer is already in ``received``
        assert closed.wait(timeout), "the server neither answered nor closed the connection"
    finally:
        sock.close()
        reader.join(timeout)
    assert received, "the server closed the connection without an answer"
    response = http.client.HTTPResponse(_Bytes(bytes(received)))  # type: ignore[arg-type]
    response.begin()
    return Reply(response.status, {k.lower(): v for k, v in response.getheaders()}, response.read())


def request_head(path: str, headers: list[tuple[str, str]]) -> bytes:
    lines = [f"POST {path} HTTP/1.1", "Host: 127.0.0.1", "Connection: close", *(f"{k}: {v}" for k, v in headers)]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def fixed(path: str, headers: list[tuple[str, str]], body: bytes) -> tuple[bytes, list[bytes]]:
    return request_head(path, [*headers, ("Content-Length", str(len(body)))]), [body]


def chunked(pieces: Iterable[bytes]) -> Iterator[bytes]:
    """``Transfer-Encoding: chunked`` framing of ``pieces``, then the last chunk."""
    for piece in pieces:
        yield b"%x\r\n" % len(piece) + piece + b"\r\n"
    yield b"0\r\n\r\n"


def multipart(boundary: str, name: str, filename: str, content: Iterable[bytes]) -> Iterator[bytes]:
    yield (
        f'--{boundary}\r\nContent-Disposition: form-data; name="note"\r\n\r\nreceipt\r\n'
        f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{filename}"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n"
    ).encode()
    yield from content
    yield f"\r\n--{boundary}--\r\n".encode()


def repeat(piece: bytes, total: int) -> Iterator[bytes]:
    """``total`` bytes as repeats of ``piece`` (the same object each time: the sender holds one piece only)."""
    sent = 0
    while sent < total:
        part = piece[: total - sent]
        sent += len(part)
        yield part


# Item: two Idempotency-Key lines ------------------------------------------------------------------------------


def test_two_key_header_lines_are_refused_by_a_real_server(app: Flask, server_port: int) -> None:
    """gunicorn and Werkzeug join the two lines into ``a,b`` before the app sees them: 400, not a key ``a,b``."""
    body = json.dumps({"amount": 5}).encode()
    two_lines = [("Content-Type", "application/json"), ("Idempotency-Key", "a"), ("Idempotency-Key", "b")]
    reply = exchange(server_port, *fixed("/payments", two_lines, body))
    assert reply.status == 400, reply.body
    assert reply.problem == "invalid-key"
    assert "comma" in reply.json()["detail"]
    assert charges(app) == 0
    assert records(app) == []

    one_line = [("Content-Type", "application/json"), ("Idempotency-Key", "a")]
    first = exchange(server_port, *fixed("/payments", one_line, body))
    again = exchange(server_port, *fixed("/payments", one_line, body))
    assert first.status == 201 and not first.replayed
    assert again.status == 201 and again.replayed and again.body == first.body
    assert charges(app) == 1
    assert [(r["key"], r["state"]) for r in records(app)] == [("a", "COMPLETED")]


# Item: stored text ---------------------------------------------------------------------------------------------


def test_a_nul_in_the_path_and_the_summary_is_stored_escaped_behind_gunicorn(
    app: Flask, database_url: str, tmp_path: Path
) -> None:
    """``%00`` reaches the app as NUL (PostgreSQL's text cannot hold it), a JSON ``\\ud800`` as a lone surrogate."""
    body = b'{"summary": "10 EUR \\u0000 to \\ud800ACME"}'
    headers = [("Content-Type", "application/json"), ("Idempotency-Key", "n-1")]
    with gunicorn(database_url, tmp_path) as server:
        first = exchange(server.port, *fixed("/notes/a%00b", headers, body))
        again = exchange(server.port, *fixed("/notes/a%00b", headers, body))
    assert first.status == 201 and first.json() == {"name": "a\x00b"} and not first.replayed
    assert again.status == 201 and again.replayed and again.body == first.body
    assert charges(app, "notes") == 1
    [row] = records(app)
    assert (row["path"], row["summary"], row["state"]) == ("/notes/a\\x00b", "10 EUR \\x00 to \\ud800ACME", "COMPLETED")


# Item: the body limit -----------------------------------------------------------------------------------------


def rss_kib(pid: int, field: str) -> int:
    """``VmRSS`` (resident now) or ``VmHWM`` (the peak) of ``pid`` in KiB, from ``/proc/<pid>/status``."""
    status = Path(f"/proc/{pid}/status").read_text()
    match = re.search(rf"^{field}:\s+(\d+) kB$", status, re.MULTILINE)
    assert match, status
    return int(match.group(1))


def reset_peak_rss(pid: int) -> None:
    """Start ``VmHWM`` afresh at the current RSS (Linux 4.0+), so the peak measured is this request's."""
    # Without it VmHWM is the lifetime peak: the growth measured can then only be larger, never smaller.
    with contextlib.suppress(OSError):
        Path(f"/proc/{pid}/clear_refs").write_text("5")


def test_a_chunked_body_over_the_limit_is_refused_while_read_without_holding_it(
    app: Flask, database_url: str, tmp_path: Path
) -> None:
    """200 MiB chunked, the default 10 MiB limit: 413 once the limit is passed; the worker's RSS stays flat."""
    with gunicorn(database_url, tmp_path) as server:
        pid = server.worker_pid
        reset_peak_rss(pid)
        before = rss_kib(pid, "VmRSS")
        head = request_head(
            "/payments",
            [
                ("Idempotency-Key", "big-1"),
                ("Content-Type", "application/octet-stream"),
                ("Transfer-Encoding", "chunked"),
            ],
        )
        reply = exchange(server.port, head, chunked(repeat(b"x" * MiB, 200 * MiB)))
        growth_mib = (rss_kib(pid, "VmHWM") - before) / 1024
        assert reply.status == 413, reply.body
        assert reply.problem == "body-too-large"
        assert growth_mib < 50, f"the worker's RSS grew by {growth_mib:.0f} MiB for a refused body"
        assert server.worker_pids() == {pid}  # the same worker, alive
        assert charges(app) == 0
        assert records(app) == []

        # The key stays free: the same key with a body within the limit runs once.
        small = json.dumps({"amount": 3}).encode()
        retry_head = request_head(
            "/payments",
            [("Idempotency-Key", "big-1"), ("Content-Type", "application/json"), ("Transfer-Encoding", "chunked")],
        )
        retry = exchange(server.port, retry_head, chunked([small]))
        assert retry.status == 201 and retry.json()["amount"] == 3
        assert charges(app) == 1


@pytest.mark.parametrize("database_url", ["sqlite", "postgresql"], indirect=True)
def test_an_atomic_streamed_export_is_sent_through_without_holding_it(
    app: Flask, database_url: str, tmp_path: Path
) -> None:
    """300 MiB streamed by an atomic view: held only up to the response limit before the commit, then streamed
    through. The worker's RSS stays flat; the record is COMPLETED without a body; the client got every byte."""
    from inputapp import EXPORT_CHUNK

    total = 300
    with gunicorn(database_url, tmp_path) as server:
        pid = server.worker_pid
        reset_peak_rss(pid)
        before = rss_kib(pid, "VmRSS")
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
        try:
            conn.request(
                "POST",
                "/export",
                body=json.dumps({"mib": total}),
                headers={"Idempotency-Key": "export-1", "Content-Type": "application/json"},
            )
            response = conn.getresponse()
            assert response.status == 200
            received, digest = 0, hashlib.sha256()
            while piece := response.read(MiB):
                received += len(piece)
                digest.update(piece)
        finally:
            conn.close()
        growth_mib = (rss_kib(pid, "VmHWM") - before) / 1024
        expected = hashlib.sha256()
        for _ in range(total):
            expected.update(EXPORT_CHUNK)
        assert received == total * MiB and digest.hexdigest() == expected.hexdigest()
        assert growth_mib < 50, f"the worker's RSS grew by {growth_mib:.0f} MiB streaming {total} MiB"
        assert server.worker_pids() == {pid}

        [row] = records(app)
        assert (row["state"], row["response_status"], row["response_body"]) == ("COMPLETED", 200, None)
        assert charges(app, "export") == 1  # the view's write committed with the outcome
        replay = exchange(
            server.port,
            *fixed(
                "/export",
                [("Idempotency-Key", "export-1"), ("Content-Type", "application/json")],
                json.dumps({"mib": total}).encode(),
            ),
        )
        assert replay.status == 500 and replay.problem == "response-not-stored" and replay.replayed
        assert charges(app, "export") == 1


def test_a_chunked_multipart_upload_over_the_limit_is_refused_before_the_view(
    app: Flask, database_url: str, tmp_path: Path
) -> None:
    limit = 1 * MiB
    boundary = "b0undary7MA4YWxkTrZu0gW"
    headers = [
        ("Idempotency-Key", "upload-1"),
        ("Content-Type", f"multipart/form-data; boundary={boundary}"),
        ("Transfer-Encoding", "chunked"),
    ]
    with gunicorn(database_url, tmp_path, INPUTAPP_MAX_BODY_BYTES=str(limit)) as server:
        big = multipart(boundary, "file", "scan.bin", repeat(b"y" * 65536, 3 * MiB))
        reply = exchange(server.port, request_head("/upload", headers), chunked(big))
        assert reply.status == 413, reply.body
        assert reply.problem == "body-too-large"
        assert charges(app) == 0
        assert records(app) == []

        # Within the limit, chunked: the view reads the whole file from request.files, once.
        content = b"".join(b"receipt line %06d\n" % i for i in range(30000))  # 570 KiB of text
        small = multipart(boundary, "file", "scan.bin", [content[:100_000], content[100_000:]])
        first = exchange(server.port, request_head("/upload", headers), chunked(small))
        assert first.status == 201, first.body
        assert first.json()["form"] == {"note": "receipt"}
        assert first.json()["files"] == {"file": content.decode()}
        again = multipart(boundary.upper(), "file", "scan.bin", [content])  # a retry draws a new boundary
        retry_headers = [*headers[:1], ("Content-Type", f"multipart/form-data; boundary={boundary.upper()}")]
        retry = exchange(server.port, *fixed("/upload", retry_headers, b"".join(again)))
        assert retry.status == 201 and retry.replayed
        assert charges(app, "upload") == 1


@pytest.mark.parametrize("framing", ["chunked", "content-length"])
def test_a_body_within_the_limit_reaches_the_view_whole(
    app: Flask, database_url: str, tmp_path: Path, framing: str
) -> None:
    limit = 2 * MiB
    body = os.urandom(limit)  # exactly the limit: allowed
    headers = [("Idempotency-Key", f"echo-{framing}"), ("Content-Type", "application/octet-stream")]
    with gunicorn(database_url, tmp_path, INPUTAPP_MAX_BODY_BYTES=str(limit)) as server:
        if framing == "chunked":
            head = request_head("/echo", [*headers, ("Transfer-Encoding", "chunked")])
            reply = exchange(server.port, head, chunked([body[: limit // 3], body[limit // 3 :]]))
        else:
            reply = exchange(server.port, *fixed("/echo", headers, body))
        assert reply.status == 201, reply.body
        assert reply.json() == {"length": limit, "sha256": hashlib.sha256(body).hexdigest()}
        over = exchange(server.port, *fixed("/echo", [*headers[1:], ("Idempotency-Key", "over")], body + b"!"))
        assert over.status == 413 and over.problem == "body-too-large"
    assert charges(app, "echo") == 1
    assert [r["key"] for r in records(app)] == [f"echo-{framing}"]
