"""A 3-node MariaDB Galera cluster on loopback, started and stopped by the tests (a rig, not a test module).

Each node is a ``mariadbd`` of its own (Debian's ``mariadb-server`` with ``galera-4``) run as ``mysql``, with
its own data directory, option file, error log, socket and pid file under one temporary directory that
``mysql`` can traverse, and its own ports, all picked free at start on 127.0.0.1: the client port, Galera's
group-communication port (``base_port``), IST's and rsync SST's receive ports. Node 1 bootstraps the cluster
(``--wsrep-new-cluster``); nodes 2 and 3 join it through ``gcomm://`` and receive its state by rsync SST.

Root logs in over TCP without a password (``mariadb-install-db --auth-root-authentication-method=normal``).
The shared MariaDB on 3306 is never touched: every node starts with ``--defaults-file`` (its own option file,
which the SST scripts read too), so no system option file applies.

Durability: ``innodb_flush_log_at_trx_commit=2`` writes the log at each COMMIT to the operating system (a
SIGKILLed ``mariadbd`` loses none of it; only a crash of the machine would) and flushes it once a second, as
Galera deployments usually run: a committed write is on every node's log before COMMIT returns anyway.

Failure detection is shortened (``evs.*``: a silent node is suspected after 2 s and dropped after 4 s instead of
5 s and 15 s) so that a SIGKILLed node leaves the cluster quickly. Everything here waits by bounded polling.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pymysql
from procs import free_port, poll

GALERA_LIBRARY = Path(os.environ.get("IDEMPOTENCY_TEST_GALERA_LIBRARY", "/usr/lib/galera/libgalera_smm.so"))
CLUSTER_NAME = "flask_idempotent_test"
SIZE = 3
START_TIMEOUT = 120.0  # seconds for one node to start and sync (an SST included)
STOP_TIMEOUT = 30.0
#: Shorter than Galera's defaults (PT5S, PT15S...), so that a killed node is dropped within seconds.
FAILURE_DETECTION = (
    "evs.keepalive_period=PT0.5S;evs.inactive_check_period=PT0.5S;"
    "evs.suspect_timeout=PT2S;evs.inactive_timeout=PT4S;evs.install_timeout=PT4S"
)


def _which(*names: str) -> str | None:
    for name in names:
        found = shutil.which(name, path=f"{os.environ.get('PATH', '')}:/usr/sbin:/usr/bin")
        if found:
            return found
    return None


def missing() -> str | None:
    """Why a Galera cluster cannot be started here (the packages to install), or ``None``."""
    wanted = []
    if _which("mariadbd", "mysqld") is None or _which("mariadb-install-db", "mysql_install_db") is None:
        wanted.append("mariadb-server")
    if not GALERA_LIBRARY.exists():
        wanted.append("galera-4")
    if _which("rsync") is None or _which("wsrep_sst_rsync") is None:
        wanted.append("rsync")
    if not wanted:
        try:
            import pwd

            pwd.getpwnam("mysql")
        except KeyError:
            return "Galera: no 'mysql' user to run mariadbd as (apt-get install mariadb-server)"
        if os.geteuid() != 0:
            return "Galera: the rig starts mariadbd --user=mysql and needs root"
        return None
    what = " and ".join(w for w in wanted)
    return f"Galera: {what} not installed (apt-get install {' '.join(wanted)})"


@dataclass
class Node:
    """One ``mariadbd`` of the cluster."""

    number: int
    home: Path
    port: int = 0
    galera_port: int = 0
    ist_port: int = 0
    sst_port: int = 0
    proc: subprocess.Popen[bytes] | None = None
    starts: int = 0
    log_offset: int = 0  # where the error log stood at the node's last start

    @property
    def datadir(self) -> Path:
        return self.home / "data"

    @property
    def option_file(self) -> Path:
        return self.home / "my.cnf"

    @property
    def error_log(self) -> Path:
        return self.home / "error.log"

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def url(self, database: str, driver: str = "mysql+pymysql") -> str:
        return f"{driver}://root@127.0.0.1:{self.port}/{database}"

    def connect(self, database: str | None = None, timeout: int = 5) -> pymysql.connections.Connection[Any]:
        return pymysql.connect(
            host="127.0.0.1",
            port=self.port,
            user="root",
            password="",
            database=database,
            connect_timeout=timeout,
            read_timeout=30,
            write_timeout=30,
            autocommit=True,
        )

    def status(self) -> dict[str, str]:
        """``SHOW STATUS LIKE 'wsrep_%'`` of this node."""
        with contextlib.closing(self.connect(timeout=2)) as conn, conn.cursor() as cur:
            cur.execute("SHOW STATUS LIKE 'wsrep_%'")
            return {str(name): str(value) for name, value in cur.fetchall()}

    def certification_failures(self) -> int:
        """Transactions this node aborted for another node's: certification failures and brute-force aborts."""
        status = self.status()
        return int(status["wsrep_local_cert_failures"]) + int(status["wsrep_local_bf_aborts"])

    def log_tail(self, lines: int = 40) -> str:
        """The end of this node's error log (what it wrote since its last start, at most ``lines``)."""
        try:
            with open(self.error_log, "rb") as log:
                log.seek(self.log_offset)
                text = log.read().decode(errors="replace")
        except FileNotFoundError:
            return f"(node {self.number}: no error log)"
        return f"node {self.number} error log ({self.error_log}):\n" + "\n".join(text.splitlines()[-lines:])


class GaleraCluster:
    """Three nodes on 127.0.0.1; :meth:`start` bootstraps and waits until all are synced, :meth:`stop` ends
    them and removes their directories. :meth:`kill` SIGKILLs one node; :meth:`restart` brings it back in."""

    def __init__(self, size: int = SIZE) -> None:
        # Under /tmp, mode 0755: mariadbd runs as mysql and must reach its directory (not under /root).
        self.home = Path(tempfile.mkdtemp(prefix="flask-idempotent-galera-", dir="/tmp"))
        os.chmod(self.home, 0o755)
        self.nodes = [Node(n, self.home / f"node{n}") for n in range(1, size + 1)]

    # setup ------------------------------------------------------------------------------------------------------

    def _pick_ports(self) -> None:
        taken: set[int] = set()
        for node in self.nodes:
            ports: list[int] = []
            while len(ports) < 4:
                port = free_port()
                if port not in taken and port + 1 not in taken:
                    taken.add(port)
                    ports.append(port)
            node.port, node.galera_port, node.ist_port, node.sst_port = ports

    def _write_option_file(self, node: Node) -> None:
        address = ",".join(f"127.0.0.1:{n.galera_port}" for n in self.nodes)
        provider = (
            f"base_port={node.galera_port};gmcast.listen_addr=tcp://127.0.0.1:{node.galera_port};"
            f"ist.recv_addr=127.0.0.1:{node.ist_port};gcache.size=32M;{FAILURE_DETECTION}"
        )
        node.option_file.write_text(
            "\n".join(
                [
                    "[mysqld]",
                    "user=mysql",
                    f"datadir={node.datadir}",
                    f"socket={node.home / 'mysqld.sock'}",
                    f"pid-file={node.home / 'mysqld.pid'}",
                    f"log-error={node.error_log}",
                    f"port={node.port}",
                    "bind-address=127.0.0.1",
                    "skip-name-resolve",
                    "performance_schema=OFF",
                    "innodb_buffer_pool_size=64M",
                    "innodb_log_file_size=32M",
                    "innodb_flush_log_at_trx_commit=2",
                    "binlog_format=ROW",
                    "default_storage_engine=InnoDB",
                    "innodb_autoinc_lock_mode=2",
                    "max_connections=200",
                    "wsrep_on=ON",
                    f"wsrep_provider={GALERA_LIBRARY}",
                    f"wsrep_cluster_name={CLUSTER_NAME}",
                    f"wsrep_cluster_address=gcomm://{address}",
                    f"wsrep_node_name=node{node.number}",
                    "wsrep_node_address=127.0.0.1",
                    f'wsrep_provider_options="{provider}"',
                    "wsrep_sst_method=rsync",
                    f"wsrep_sst_receive_address=127.0.0.1:{node.sst_port}",
                    # A statement that fails certification reaches the client as 1213 instead of being run again
                    # by the server (default 1): the layer's own handling of the lost race is what is tested.
                    "wsrep_retry_autocommit=0",
                    "",
                ]
            )
        )

    def _install(self) -> None:
        """Initialise node 1's data directory; the others start from a copy and receive node 1's state by SST."""
        first = self.nodes[0]
        for node in self.nodes:
            node.home.mkdir(mode=0o755)
            shutil.chown(node.home, "mysql", "mysql")
        install = _which("mariadb-install-db", "mysql_install_db")
        assert install is not None
        done = subprocess.run(
            [
                install,
                "--no-defaults",
                "--user=mysql",
                f"--datadir={first.datadir}",
                "--auth-root-authentication-method=normal",
                "--skip-test-db",
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
        if done.returncode != 0:
            raise AssertionError(f"mariadb-install-db failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
        for node in self.nodes[1:]:
            shutil.copytree(first.datadir, node.datadir, symlinks=True)
            subprocess.run(["chown", "-R", "mysql:mysql", str(node.datadir)], check=True)

    # processes --------------------------------------------------------------------------------------------------

    def _launch(self, node: Node, *, bootstrap: bool = False) -> None:
        mariadbd = _which("mariadbd", "mysqld")
        assert mariadbd is not None
        self._write_option_file(node)
        node.log_offset = node.error_log.stat().st_size if node.error_log.exists() else 0
        node.proc = subprocess.Popen(
            [mariadbd, f"--defaults-file={node.option_file}", *(["--wsrep-new-cluster"] if bootstrap else [])],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # its own process group: the SST scripts' rsync daemons die with it
        )
        node.starts += 1

    def wait_synced(self, node: Node, size: int, timeout: float = START_TIMEOUT) -> None:
        """Wait until ``node`` is ready (``wsrep_ready=ON``, synced) in a cluster of ``size`` nodes."""

        def synced() -> bool:
            if not node.alive:
                raise AssertionError(f"node {node.number} exited ({node.proc and node.proc.returncode})")
            try:
                status = node.status()
            except pymysql.err.MySQLError:
                return False
            return (
                status.get("wsrep_ready") == "ON"
                and status.get("wsrep_cluster_size") == str(size)
                and status.get("wsrep_local_state_comment") == "Synced"
            )

        try:
            poll(synced, timeout=timeout, what=f"node {node.number} to be synced in a cluster of {size}", interval=0.2)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{node.log_tail()}") from None

    def start(self) -> GaleraCluster:
        try:
            self._pick_ports()
            self._install()
            for number, node in enumerate(self.nodes, 1):
                self._launch(node, bootstrap=number == 1)
                self.wait_synced(node, size=number)  # one joiner at a time: SST from a synced donor
            for node in self.nodes:
                self.wait_synced(node, size=len(self.nodes))
        except BaseException:
            self.stop()
            raise
        return self

    def kill(self, node: Node) -> None:
        """SIGKILL ``node`` (its whole process group) and wait until the others have dropped it."""
        assert node.proc is not None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(node.proc.pid, signal.SIGKILL)
        node.proc.wait(STOP_TIMEOUT)
        survivors = [n for n in self.nodes if n.alive]
        for other in survivors:
            self.wait_synced(other, size=len(survivors), timeout=60)

    def restart(self, node: Node) -> None:
        """Start a killed ``node`` again: it rejoins through ``gcomm://`` and receives the state it missed."""
        assert not node.alive
        self._launch(node)
        for other in self.nodes:
            self.wait_synced(other, size=len(self.nodes))

    def heal(self) -> None:
        """Restart every node that is down (after a test that killed one)."""
        for node in self.nodes:
            if not node.alive:
                self.restart(node)

    def stop(self) -> None:
        """Stop every node (SIGTERM, SIGKILL past a timeout), then remove their directories."""
        for node in reversed(self.nodes):
            proc, node.proc = node.proc, None
            if proc is None:
                continue
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(STOP_TIMEOUT)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)  # the node if it hung, and any SST helper left behind
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(10)
        shutil.rmtree(self.home, ignore_errors=True)

    # databases ---------------------------------------------------------------------------------------------------

    def create_database(self, name: str) -> None:
        with contextlib.closing(self.nodes[0].connect()) as conn, conn.cursor() as cur:
            cur.execute(f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4")
        self.sync_wait()

    def sync_wait(self) -> None:
        """Return once every live node has applied everything committed anywhere before the call."""
        for node in self.nodes:
            if node.alive:
                with contextlib.closing(node.connect()) as conn, conn.cursor() as cur:
                    cur.execute("SET SESSION wsrep_sync_wait = 15")
                    cur.execute("SELECT 1")

    def certification_failures(self) -> int:
        """The live nodes' :meth:`Node.certification_failures`, added up (they count since each node started)."""
        return sum(node.certification_failures() for node in self.nodes if node.alive)

    def query(self, node: Node, database: str, sql: str, params: Any = None) -> list[dict[str, Any]]:
        """``sql`` on ``node`` after it applied everything committed before (``wsrep_sync_wait``)."""
        with contextlib.closing(node.connect(database)) as conn, conn.cursor(pymysql.cursors.DictCursor) as cur:
            cur.execute("SET SESSION wsrep_sync_wait = 15")
            cur.execute(sql, params)
            return list(cur.fetchall())


@contextlib.contextmanager
def running_cluster() -> Iterator[GaleraCluster]:
    cluster = GaleraCluster().start()
    try:
        yield cluster
    finally:
        cluster.stop()
