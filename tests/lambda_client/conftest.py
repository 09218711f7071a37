"""Fixtures for the client's tests: real brokers (``python -m broker run`` children) on a real
Postgres (``admin``, a direct connection, comes from the root conftest)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

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
