"""Processes the benchmark starts (PgBouncer, load generators) and /proc figures.

The broker runs as a `devtools.brokerproc.BrokerProcess`, which stops itself the same way.

Every process goes through `Processes`, which remembers its pid and stops it (SIGTERM, then
SIGKILL) when the harness ends, on an error or on Ctrl-C. Children run in their own session
so a Ctrl-C in the terminal reaches only the harness, which then stops them in order.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from devtools.runas import as_user, raise_fd_limit

CLK_TCK = os.sysconf("SC_CLK_TCK")
ROOT = Path(__file__).resolve().parent.parent


class Processes:
    """Starts processes and stops every one of them by pid; see the module docstring."""

    def __init__(self) -> None:
        self._procs: list[subprocess.Popen[bytes]] = []
        raise_fd_limit()  # PgBouncer's 2000 clients and the load generators inherit it

    def start(
        self,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        user: str | None = None,
        stdout: int | None = subprocess.DEVNULL,
        stderr: int | None = subprocess.DEVNULL,
        stdin: int | None = subprocess.DEVNULL,
        cwd: str | Path | None = None,
    ) -> subprocess.Popen[bytes]:
        """Start *argv* (as *user* when we are root) and remember it for `stop_all`."""
        command, run_as = as_user(user, list(argv))
        proc = subprocess.Popen(
            command,
            env=dict(env) if env is not None else None,
            stdout=stdout,
            stderr=stderr,
            stdin=stdin,
            cwd=cwd,
            start_new_session=True,
            **run_as,
        )
        self._procs.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
        """SIGTERM *proc*, SIGKILL it if it has not exited within *timeout* seconds."""
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGKILL)
                proc.wait(5)
        with contextlib.suppress(ValueError):
            self._procs.remove(proc)

    def forget(self, proc: subprocess.Popen[bytes]) -> None:
        """*proc* has been waited for by its caller."""
        with contextlib.suppress(ValueError):
            self._procs.remove(proc)

    def stop_all(self) -> None:
        for proc in reversed(list(self._procs)):
            self.stop(proc)


def _with_children(pid: int) -> list[int]:
    """*pid* and its live child processes (a ``--workers N`` broker's workers)."""
    pids = [pid]
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            pids += [int(p) for p in (task / "children").read_text().split()]
    return pids


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of *pid* and its child processes (all their threads), or None
    if *pid* is gone."""
    total = 0.0
    for index, one in enumerate(_with_children(pid)):
        try:
            fields = Path(f"/proc/{one}/stat").read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError, IndexError):
            if index == 0:
                return None
            continue
        total += (int(fields[11]) + int(fields[12])) / CLK_TCK
    return total


def rss_bytes(pid: int) -> int | None:
    """Resident set size of *pid* and its child processes now, or None if *pid* is gone."""
    total: int | None = None
    for one in _with_children(pid):
        try:
            for line in Path(f"/proc/{one}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total = (total or 0) + int(line.split()[1]) * 1024
        except (FileNotFoundError, ProcessLookupError):
            continue
    return total


def wait_for_port(host: str, port: int, timeout: float, proc: subprocess.Popen[bytes]) -> None:
    """Return once *host:port* accepts TCP; raise RuntimeError if *proc* exits or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args!r} exited with {proc.returncode} before listening")
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=1):
            return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listening on {host}:{port} after {timeout:.0f} s")


# -- PgBouncer --------------------------------------------------------------------------------


def find_pgbouncer(install: bool = True) -> str:
    """Path of the ``pgbouncer`` binary, installing Debian's package with apt when missing.

    Raise RuntimeError when it is missing and cannot be installed (not root, no apt).
    """
    for candidate in (shutil.which("pgbouncer"), "/usr/sbin/pgbouncer", "/usr/bin/pgbouncer"):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    if not install or os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise RuntimeError(
            "pgbouncer is not installed; install it (Debian: apt-get install -y pgbouncer)"
        )
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for argv in (["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", "pgbouncer"]):
        done = subprocess.run(argv, env=env, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} failed: {done.stderr.strip()[-500:]}")
    return find_pgbouncer(install=False)


class PgBouncer:
    """PgBouncer in transaction mode in front of *pg*, run as the ``postgres`` account.

    Its config, log and socket live in a temporary directory owned by that account;
    authentication is ``any`` (loopback benchmark, every client is ``postgres``).
    """

    def __init__(
        self,
        procs: Processes,
        *,
        pg_host: str,
        pg_port: int,
        port: int,
        pool_size: int = 20,
        max_client_conn: int = 2000,
        server_user: str = "postgres",
        os_user: str = "postgres",
    ) -> None:
        self.procs = procs
        self.host = "127.0.0.1"
        self.port = port
        self.pool_size = pool_size
        self.max_client_conn = max_client_conn
        self.pg_host, self.pg_port = pg_host, pg_port
        self.server_user = server_user
        self.os_user = os_user if os.geteuid() == 0 else None
        self.proc: subprocess.Popen[bytes] | None = None
        self.workdir: Path | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> PgBouncer:
        binary = find_pgbouncer()
        self.workdir = Path(tempfile.mkdtemp(prefix="pgbroker-bench-pgbouncer-"))
        config = self.workdir / "pgbouncer.ini"
        config.write_text(self._config())
        if self.os_user is not None:
            entry = pwd.getpwnam(self.os_user)
            for path in (self.workdir, config):
                os.chown(path, entry.pw_uid, entry.pw_gid)
        self.proc = self.procs.start([binary, str(config)], user=self.os_user, cwd="/")
        wait_for_port(self.host, self.port, 15, self.proc)
        return self

    def stop(self) -> None:
        if self.proc is not None:
            self.procs.stop(self.proc)
            self.proc = None
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None

    def log(self) -> str:
        path = self.workdir / "pgbouncer.log" if self.workdir else None
        return path.read_text(errors="replace") if path and path.exists() else ""

    def _config(self) -> str:
        assert self.workdir is not None
        return f"""\
[databases]
postgres = host={self.pg_host} port={self.pg_port} dbname=postgres user={self.server_user}

[pgbouncer]
listen_addr = {self.host}
listen_port = {self.port}
unix_socket_dir =
auth_type = any
pool_mode = transaction
default_pool_size = {self.pool_size}
min_pool_size = 0
reserve_pool_size = 0
max_client_conn = {self.max_client_conn}
; a burst of 2000 connects overflows the default backlog (128): dropped SYNs retry after 1 s
listen_backlog = 4096
max_db_connections = 0
server_tls_sslmode = disable
ignore_startup_parameters = extra_float_digits,options,search_path
logfile = {self.workdir}/pgbouncer.log
log_connections = 0
log_disconnections = 0
log_pooler_errors = 1
stats_period = 60
"""
