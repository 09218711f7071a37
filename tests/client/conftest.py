"""Fixtures for the client's tests: real brokers (``python -m broker run`` children) on a real
Postgres, and a direct admin connection to look at ``pg_stat_activity``."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pg8000.native
import pytest

from devtools.brokerproc import BrokerProcess


@pytest.fixture
def start_broker(postgres: Any) -> Iterator[Callable[..., BrokerProcess]]:
    """Factory: start a broker child process on *postgres*; settings become flags."""
    started: list[BrokerProcess] = []

    def start(listen: str = "127.0.0.1:0", **settings: Any) -> BrokerProcess:
        settings = {"pool_size": 2, "auth": "none", "shutdown_grace": 2, **settings}
        broker = BrokerProcess(postgres.dsn + "?sslmode=disable", listen=listen, **settings)
        started.append(broker)
        return broker.start()

    yield start
    for broker in started:
        broker.close()


@pytest.fixture(scope="module")
def broker(postgres: Any) -> Iterator[BrokerProcess]:
    """One broker (pool of 2) shared by a module's tests that do not disturb it."""
    with BrokerProcess(
        postgres.dsn + "?sslmode=disable", pool_size=2, auth="none", shutdown_grace=2
    ) as process:
        yield process


@pytest.fixture
def admin(postgres: Any) -> Iterator[pg8000.native.Connection]:
    """A direct pg8000 connection to the test Postgres (not through the broker)."""
    conn = pg8000.native.Connection(
        postgres.user,
        host=postgres.host,
        port=postgres.port,
        database=postgres.database,
        password=getattr(postgres, "password", None),
    )
    yield conn
    conn.close()
