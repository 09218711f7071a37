"""The pool driven directly: it keeps reconnecting whatever a connect fails with, not only
network errors, and a server connection is in one state the pool checks."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from broker.config import parse_database_url
from broker.pooling.pool import Pool, ServerState
from broker.postgres.pg import PgConnection, connect


def test_connect_failing_with_any_error_is_retried_until_the_pool_fills(postgres: Any) -> None:
    target = parse_database_url(postgres.dsn + "?sslmode=disable")
    failures = {"left": 3}

    def flaky_connect() -> PgConnection:
        # E.g. Secrets Manager throttling while the credentials are re-read: not an OSError.
        if failures["left"] > 0:
            failures["left"] -= 1
            raise RuntimeError("ThrottlingException: Rate exceeded")
        return connect(target, timeout=5, statement_timeout=30)

    async def fill() -> dict[str, int]:
        pool = Pool(flaky_connect, size=2, max_waiting=10, queue_timeout=5, max_lifetime=3600)
        try:
            await pool.open(wait="first", timeout=10)
            await asyncio.wait_for(pool.wait_filled(), timeout=10)
            return pool.get_stats()
        finally:
            await pool.close()

    stats = asyncio.run(fill())
    assert stats["pool_size"] == 2
    assert stats["connections_errors"] == 3


def test_idle_connection_on_a_high_descriptor_is_not_taken_for_dead(postgres: Any) -> None:
    """A broker serving a thousand clients has descriptors above 1023, where select() fails."""
    import os
    import resource

    from broker.pooling.pool import _has_pending_input

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 4096)), hard))
    filler = [os.open("/dev/null", os.O_RDONLY) for _ in range(1100)]
    try:
        conn = connect(parse_database_url(postgres.dsn + "?sslmode=disable"), 5, 30)
        try:
            assert conn.socket is not None and conn.socket.fileno() > 1023
            assert not _has_pending_input(conn)
        finally:
            conn.close_quietly()
    finally:
        for fd in filler:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_a_connection_returned_twice_is_refused_not_pooled_twice(postgres: Any) -> None:
    target = parse_database_url(postgres.dsn + "?sslmode=disable")

    async def return_twice() -> dict[str, int]:
        pool = Pool(
            lambda: connect(target, timeout=5, statement_timeout=30),
            size=1,
            max_waiting=10,
            queue_timeout=5,
            max_lifetime=3600,
        )
        try:
            await pool.open(timeout=10)
            conn = await pool.getconn()
            assert conn.state is ServerState.SV_ACTIVE
            pool.putconn(conn)
            assert conn.state is ServerState.SV_IDLE
            with pytest.raises(RuntimeError, match="returned while SV_IDLE"):
                pool.putconn(conn)
            return pool.get_stats()
        finally:
            await pool.close()

    stats = asyncio.run(return_twice())
    assert (stats["pool_size"], stats["pool_available"], stats["pool_active"]) == (1, 1, 0)
