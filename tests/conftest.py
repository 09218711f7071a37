"""Session fixtures shared by every test: a real, temporary Postgres.

Set ``PGBROKER_TEST_DSN=postgresql://user:pass@host:port/db`` to use an existing server
instead (tests that restart or reconfigure the server are skipped then).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from urllib.parse import urlsplit

import pg8000.native
import pytest
from support import connect

from devtools.localpg import LocalPostgres


@dataclass
class ExternalPostgres:
    """The same attributes as `LocalPostgres`, for a server this session did not start."""

    dsn: str
    host: str
    port: int
    user: str
    database: str
    password: str | None = None
    pid: int | None = None

    @classmethod
    def from_dsn(cls, dsn: str) -> ExternalPostgres:
        url = urlsplit(dsn)
        return cls(
            dsn=dsn,
            host=url.hostname or "127.0.0.1",
            port=url.port or 5432,
            user=url.username or "postgres",
            database=url.path.lstrip("/") or "postgres",
            password=url.password,
        )


@pytest.fixture(scope="session")
def postgres() -> Iterator[LocalPostgres | ExternalPostgres]:
    """A running Postgres for the whole session (max_connections 100)."""
    if dsn := os.environ.get("PGBROKER_TEST_DSN"):
        yield ExternalPostgres.from_dsn(dsn)
        return
    server = LocalPostgres(max_connections=100).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def own_postgres() -> Iterator[LocalPostgres]:
    """A private Postgres for one test that restarts or reconfigures its server."""
    if os.environ.get("PGBROKER_TEST_DSN"):
        pytest.skip("needs a Postgres this session starts itself")
    server = LocalPostgres(max_connections=50).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def admin(postgres: LocalPostgres | ExternalPostgres) -> Iterator[pg8000.native.Connection]:
    """A direct pg8000 connection to the test Postgres (not through the broker)."""
    conn = connect(postgres)
    yield conn
    conn.close()
