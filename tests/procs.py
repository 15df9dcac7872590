"""Real processes for the fault tests: gunicorn serving ``faultapp``, an HTTP client, a cuttable TCP proxy.

Everything listens on and talks to 127.0.0.1 only. Nothing here sleeps to wait for an ordering: waiting is
bounded polling of a readiness condition (:func:`poll`), and every process is stopped by :meth:`Gunicorn.stop`.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import sqlalchemy as sa
from faultapp import drop_tables, reset_database, snapshot
from helpers import problem_body_code

TESTS_DIR = Path(__file__).resolve().parent
T = TypeVar("T")
Served = TypeVar("Served", bound="ServedApp")


def _gunicorn_extra_args() -> list[str]:
    """gunicorn 24+ opens a control socket at one fixed path per user: two servers at once would share it."""
    from gunicorn.config import KNOWN_SETTINGS

    known = {flag for setting in KNOWN_SETTINGS for flag in (setting.cli or [])}
    return ["--no-control-socket"] if "--no-control-socket" in known else []


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def poll(check: Callable[[], T | None], *, timeout: float, what: str, interval: float = 0.05) -> T:
    """Call ``check`` until it returns something truthy, for at most ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)  # a polling interval, not a guess at an ordering


# HTTP ---------------------------------------------------------------------------------------------------------


@dataclass
class Reply:
    """One HTTP response, read completely."""

    status: int
    headers: dict[str, str]  # lower-cased names
    body: bytes

    @property
    def replayed(self) -> bool:
        return self.headers.get("idempotent-replayed") == "true"

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def problem(self) -> str | None:
        """The problem code (``in-progress``, ``stuck``...) of an ``application/problem+json`` response."""
        if not self.headers.get("content-type", "").startswith("application/problem+json"):
            return None
        return problem_body_code(self.json(), self.status)


#: What a client sees when the server process died under its request.
CONNECTION_LOST = (ConnectionError, http.client.HTTPException)


def send(
    port: int,
    method: str,
    path: str,
    *,
    key: str | None = None,
    body: Any = None,
    headers: Mapping[str, str] | None = None,
    timeout: float = 30,
) -> Reply:
    """Send one request on a fresh connection (sync workers close it anyway)."""
    all_headers = dict(headers or {})
    data = None
    if key is not None:
        all_headers["Idempotency-Key"] = key
    if body is not None:
        data = json.dumps(body).encode()
        all_headers["Content-Type"] = "application/json"
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path, body=data, headers=all_headers)
        response = conn.getresponse()
        payload = response.read()
        return Reply(response.status, {k.lower(): v for k, v in response.getheaders()}, payload)
    finally:
        conn.close()


# gunicorn -----------------------------------------------------------------------------------------------------


class Gunicorn:
    """``gunicorn APP`` (default ``faultapp:create_app()``) on a free 127.0.0.1 port, in its own session (process
    group). ``chdir`` is where the app's module is found; the app answers ``GET /health`` with its worker's pid,
    or, with ``health=None``, its ``GET /`` with 200 (the worker pid is then unknown: -1)."""

    def __init__(
        self,
        env: Mapping[str, str],
        log_path: Path,
        *,
        workers: int = 1,
        worker_class: str = "sync",
        threads: int = 1,
        app: str = "faultapp:create_app()",
        chdir: Path = TESTS_DIR,
        health: str | None = "/health",
    ) -> None:
        self.env = {**os.environ, **env}
        self.log_path = log_path
        self.workers = workers
        self.worker_class = worker_class
        self.threads = threads
        self.app, self.chdir, self.health = app, chdir, health
        self.port = 0
        self.worker_pid = 0
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 60) -> Gunicorn:
        for _ in range(3):  # another process may take the free port between our probe and gunicorn's bind
            self.port = free_port()
            with open(self.log_path, "ab") as log:
                self.proc = subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "gunicorn",
                        "--chdir",
                        str(self.chdir),
                        "--bind",
                        f"127.0.0.1:{self.port}",
                        "--workers",
                        str(self.workers),
                        "--worker-class",
                        self.worker_class,
                        "--threads",
                        str(self.threads),
                        "--timeout",
                        "60",
                        "--graceful-timeout",
                        "5",
                        *_gunicorn_extra_args(),
                        self.app,
                    ],
                    cwd=self.chdir,
                    env=self.env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            try:
                self.worker_pid = self.wait_ready(timeout)
                return self
            except _Exited:
                self.stop()
        raise AssertionError(f"gunicorn did not start:\n{self.log_tail()}")

    def wait_ready(self, timeout: float = 30) -> int:
        """Poll the health path until a worker answers; return that worker's pid (-1 without a health path)."""

        def answered() -> int | None:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise _Exited
            try:
                if self.health is None:
                    return -1 if send(self.port, "GET", "/", timeout=2).status == 200 else None
                return int(send(self.port, "GET", self.health, timeout=2).json()["pid"])
            except (OSError, http.client.HTTPException):
                return None

        try:
            return poll(answered, timeout=timeout, what=f"gunicorn to answer GET {self.health or '/'}")
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{self.log_tail()}") from None

    def worker_pids(self) -> set[int]:
        """The master's live child processes (Linux ``/proc``)."""
        assert self.proc is not None
        children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text().split()
        return {int(pid) for pid in children}

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return "(no gunicorn log)"

    def stop(self) -> None:
        """SIGTERM the master (it stops its workers); SIGKILL its process group if it does not exit in time."""
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            # The master is not reaped yet, so its pid still names the group we created (start_new_session).
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)

    def __enter__(self) -> Gunicorn:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class _Exited(Exception):
    """gunicorn exited while we waited for it (e.g. the port was taken)."""


class ServedApp:
    """``faultapp`` served on ``database_url``: the rig of the real-server tests.

    Entering it makes the app's tables afresh and starts ``server`` (by default a :class:`Gunicorn` of the fault
    app with ``gunicorn``'s options; anything with ``start``, ``stop`` and ``port`` will do); leaving it stops the
    server, disposes of the test's own engine and drops the tables. ``env`` is the app's environment
    (``FAULTAPP_DATABASE_URL`` defaults to ``database_url``; a proxy's URL may replace it); ``state(key)`` is the
    key's record and effects as the test's own connection sees them.
    """

    def __init__(
        self, database_url: str, env: Mapping[str, str], tmp: Path, *, server: Any = None, **gunicorn: Any
    ) -> None:
        self.database_url = database_url
        self.env = {"FAULTAPP_DATABASE_URL": database_url, **env}
        self.server: Any = server if server is not None else Gunicorn(self.env, tmp / "gunicorn.log", **gunicorn)
        self.engine = sa.create_engine(database_url)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.port}"

    def start(self) -> None:
        self.server.start()

    def stop(self) -> None:
        self.server.stop()

    def state(self, key: str, scope: str = "") -> dict[str, Any]:
        with self.engine.connect() as conn:
            return snapshot(conn, key, scope)

    def __enter__(self: Served) -> Served:
        reset_database(self.database_url)
        try:
            self.start()
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.stop()
        finally:
            self.engine.dispose()
            drop_tables(self.database_url)


def flask_cli(env: Mapping[str, str], *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run ``flask --app faultapp:create_app ARGS`` in a subprocess, as an operator would."""
    return subprocess.run(
        [sys.executable, "-m", "flask", "--app", "faultapp:create_app", *args],
        cwd=TESTS_DIR,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


class FileClock:
    """The lease clock of ``faultapp`` (``FAULTAPP_CLOCK_FILE``): real time plus an offset the test moves."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0.0
        self._write()

    def advance(self, seconds: float) -> None:
        self.offset += seconds
        self._write()

    def _write(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(repr(self.offset))
        tmp.replace(self.path)  # readers see the old or the new offset, never a torn write


# TCP proxy ----------------------------------------------------------------------------------------------------


class TcpProxy:
    """Forwards 127.0.0.1:``port`` to ``target``; :meth:`cut` drops every connection and refuses new ones.

    While cut, a new connection is accepted and closed at once, before any byte of the PostgreSQL handshake:
    the client fails immediately, as on a refused connection, and the proxy keeps its port for :meth:`restore`.
    """

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self._listener = socket.socket()
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(64)
        self.port = int(self._listener.getsockname()[1])
        self._lock = threading.Lock()
        self._pairs: set[tuple[socket.socket, socket.socket]] = set()
        self._cut = False
        self._stopping = threading.Event()
        self.accepted = 0
        self.refused = 0
        self._thread = threading.Thread(target=self._accept_loop, name="tcp-proxy", daemon=True)
        self._thread.start()

    def cut(self) -> None:
        """Close every open connection (both sides) and refuse new ones until :meth:`restore`."""
        with self._lock:
            self._cut = True
            pairs = list(self._pairs)
        for pair in pairs:
            self._drop(pair)

    def restore(self) -> None:
        with self._lock:
            self._cut = False

    @property
    def open_connections(self) -> int:
        with self._lock:
            return len(self._pairs)

    def close(self) -> None:
        self._stopping.set()
        self._thread.join(5)
        self.cut()
        self._listener.close()

    def __enter__(self) -> TcpProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _accept_loop(self) -> None:
        while not self._stopping.is_set():
            ready, _, _ = select.select([self._listener], [], [], 0.1)
            if not ready:
                continue
            try:
                client, _ = self._listener.accept()
            except OSError:
                continue
            with self._lock:
                refuse = self._cut
            if refuse:
                self.refused += 1
                client.close()
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=5)
                upstream.settimeout(None)
            except OSError:
                client.close()
                continue
            pair = (client, upstream)
            with self._lock:
                if self._cut:  # cut while we connected upstream
                    self.refused += 1
                    client.close()
                    upstream.close()
                    continue
                self._pairs.add(pair)
                self.accepted += 1
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(pair, src, dst), daemon=True).start()

    def _pump(self, pair: tuple[socket.socket, socket.socket], src: socket.socket, dst: socket.socket) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                dst.sendall(data)
        except OSError:
            pass  # the other pump or cut() closed the pair
        finally:
            self._drop(pair)

    def _drop(self, pair: tuple[socket.socket, socket.socket]) -> None:
        with self._lock:
            if pair not in self._pairs:
                return
            self._pairs.discard(pair)
        for s in pair:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)  # wakes the pump blocked in recv() on it
            s.close()


class ReplyDroppingProxy(TcpProxy):
    """A :class:`TcpProxy` that can lose the reply to one statement: it runs on the server, the client never
    hears back.

    After :meth:`arm`, the next client-to-server bytes containing ``marker`` are forwarded as usual; the
    server's reply on that connection is read up to the end of its ReadyForQuery message (so the statement's
    implicit transaction has committed), dropped, and both sockets of that connection are closed: the client
    sees the connection end while it waits for the reply. It fires once per :meth:`arm`; :attr:`dropped` is set
    when it did. The marker must reach the proxy as plain text (PostgreSQL's simple query protocol,
    ``sslmode=disable``).
    """

    READY_FOR_QUERY = b"Z\x00\x00\x00\x05"  # message type, then its length: 4 bytes of length + 1 of status

    def __init__(self, target_host: str, target_port: int) -> None:
        self._marker: bytes | None = None
        self._doomed: set[tuple[socket.socket, socket.socket]] = set()
        self.dropped = threading.Event()
        self.statement = b""  # the client bytes that carried the marker
        self.dropped_reply = b""  # the server's reply that never reached the client
        super().__init__(target_host, target_port)

    def arm(self, marker: bytes) -> None:
        with self._lock:
            self._marker = marker
            self.statement = self.dropped_reply = b""
            self.dropped.clear()

    def _pump(self, pair: tuple[socket.socket, socket.socket], src: socket.socket, dst: socket.socket) -> None:
        to_server = src is pair[0]
        seen = b""  # the tail of the previous read (a marker split over two reads) or the reply held back
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if to_server:
                    with self._lock:
                        marker = self._marker
                        if marker is not None and marker in seen + data:
                            self._marker = None
                            self._doomed.add(pair)  # before forwarding: the reply may come back at once
                            self.statement = data
                    seen = data[-len(marker) :] if marker else b""
                    dst.sendall(data)
                    continue
                with self._lock:
                    doomed = pair in self._doomed
                if not doomed:
                    dst.sendall(data)
                    continue
                src.settimeout(10)  # bounded: a reply that never ends closes the connection all the same
                seen += data
                if self.READY_FOR_QUERY in seen:
                    self.dropped_reply = seen
                    break  # never forwarded; finally closes both sockets
        except OSError:
            pass  # the other pump or cut() closed the pair
        finally:
            self._drop(pair)
            with self._lock:
                if pair in self._doomed:
                    self._doomed.discard(pair)
                    if self.dropped_reply:
                        self.dropped.set()


@dataclass
class LostReply:
    """A response :class:`ResponseDroppingProxy` kept from its client: the request it answered, and its bytes."""

    marker: bytes
    withheld: bool
    request: bytes  # the client bytes that matched the marker
    reply: bytes  # what the server answered (possibly nothing, if the client gave up first)

    @property
    def status(self) -> int | None:
        line = self.reply.split(b"\r\n", 1)[0].split()
        return int(line[1]) if len(line) > 1 and line[1].isdigit() else None

    @property
    def body(self) -> bytes:
        return self.reply.partition(b"\r\n\r\n")[2]


class ResponseDroppingProxy(TcpProxy):
    """An HTTP client-to-app :class:`TcpProxy` that loses the response to chosen requests.

    :meth:`arm` queues one fault: the next request whose bytes contain ``marker`` (any request for ``b""``) is
    forwarded as usual, and its response is never delivered:

    - by default the server's whole response is read (up to its ``Content-Length``, the end of a chunked body,
      or the server closing the connection): the view ran and the outcome was stored. Then both sockets are
      closed, so the client sees its connection end without a response;
    - with ``withhold=True`` the response is held back and the connection left open until the client gives up
      (its own timeout) and closes it, bounded by 30 s: a response that never came.

    Each fault fires once; every other request and response passes through. :attr:`lost` lists the faults that
    fired, in order.
    """

    WITHHOLD_LIMIT = 30.0

    def __init__(self, target_host: str, target_port: int) -> None:
        self._faults: list[tuple[bytes, bool]] = []
        self._doomed: dict[tuple[socket.socket, socket.socket], tuple[bytes, bool, bytes]] = {}
        self._closed: dict[tuple[socket.socket, socket.socket], threading.Event] = {}
        self.lost: list[LostReply] = []
        super().__init__(target_host, target_port)

    def arm(self, marker: bytes = b"", *, withhold: bool = False) -> None:
        with self._lock:
            self._faults.append((marker, withhold))

    @property
    def armed(self) -> int:
        """Faults queued that have not fired yet."""
        with self._lock:
            return len(self._faults)

    @staticmethod
    def _starts_request(data: bytes) -> bool:
        """Whether ``data`` begins with a request line (``POST /path HTTP/1.1``): a new request on the connection."""
        line = data.split(b"\r\n", 1)[0].split(b" ")
        return len(line) == 3 and line[0].isalpha() and line[0].isupper() and line[2].startswith(b"HTTP/1.")

    @staticmethod
    def _complete(reply: bytes, *, head: bool = False) -> bool:
        """Whether ``reply`` holds a whole response (``head``: one to a HEAD request, which has no body)."""
        start, sep, body = reply.partition(b"\r\n\r\n")
        if not sep:
            return False
        if head:
            return True
        lines = start.decode("latin-1").split("\r\n")
        status = lines[0].split()[1] if len(lines[0].split()) > 1 else ""
        fields = {name.strip().lower(): value.strip() for name, _, value in (line.partition(":") for line in lines[1:])}
        if status in ("204", "304"):
            return True
        if "content-length" in fields:
            return len(body) >= int(fields["content-length"])
        if "chunked" in fields.get("transfer-encoding", "").lower():
            return body.endswith(b"0\r\n\r\n")
        return False  # delimited by the server closing the connection

    def _pump(self, pair: tuple[socket.socket, socket.socket], src: socket.socket, dst: socket.socket) -> None:
        to_server = src is pair[0]
        with self._lock:
            self._closed.setdefault(pair, threading.Event())
        request = b""
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if to_server:
                    request = data if self._starts_request(data) else (request + data)[-65536:]
                    with self._lock:
                        for fault in [] if pair in self._doomed else self._faults:  # one fault per request
                            if fault[0] in request:
                                self._faults.remove(fault)
                                self._doomed[pair] = (*fault, request)  # before forwarding: the reply may be quick
                                request = b""
                                break
                    dst.sendall(data)
                    continue
                with self._lock:
                    doomed = self._doomed.get(pair)
                if doomed is None:
                    dst.sendall(data)
                    continue
                self._lose(pair, src, doomed, data)
                return
        except OSError:
            pass  # the other pump or cut() closed the pair
        finally:
            self._drop(pair)
            with self._lock:
                doomed = None if to_server else self._doomed.pop(pair, None)
                if doomed is not None:  # the client hung up before the server's first byte: lost all the same
                    self.lost.append(LostReply(doomed[0], doomed[1], doomed[2], b""))

    def _lose(
        self,
        pair: tuple[socket.socket, socket.socket],
        src: socket.socket,
        doomed: tuple[bytes, bool, bytes],
        reply: bytes,
    ) -> None:
        """Read the doomed response to its end without forwarding it; then drop it, or wait for the client."""
        marker, withheld, request = doomed
        src.settimeout(10)  # bounded: a response that never ends is lost all the same
        try:
            while not self._complete(reply, head=request.startswith(b"HEAD ")):
                data = src.recv(65536)
                if not data:
                    break
                reply += data
        except OSError:
            pass
        with self._lock:
            closed = self._closed.get(pair)
        if withheld and closed is not None:
            closed.wait(self.WITHHOLD_LIMIT)  # the client's pump drops the pair when it hangs up
        with self._lock:
            self._doomed.pop(pair, None)
            self.lost.append(LostReply(marker, withheld, request, reply))

    def _drop(self, pair: tuple[socket.socket, socket.socket]) -> None:
        super()._drop(pair)
        with self._lock:
            closed = self._closed.pop(pair, None)
        if closed is not None:
            closed.set()
