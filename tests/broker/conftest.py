"""Fixtures for the broker's tests: a real broker on port 0 and a fresh table name (``admin``,
a direct connection, comes from the root conftest)."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pg8000.native
import pytest
from brokertest import InProcessBroker

from broker.config import load_settings


@pytest.fixture
def start_broker(postgres: Any) -> Iterator[Callable[..., InProcessBroker]]:
    """Factory: start an in-process broker on *postgres* with setting overrides."""
    started: list[InProcessBroker] = []

    def start(dsn: str | None = None, **overrides: Any) -> InProcessBroker:
        flags = {
            "database_url": (dsn or postgres.dsn) + "?sslmode=disable",
            "listen": "127.0.0.1:0",
            "pool_size": 2,
            "connect_timeout": 5,
            "shutdown_grace": 2,
        }
        flags.update(overrides)
        broker = InProcessBroker(load_settings(flags, environ={}))
        started.append(broker)
        return broker

    yield start
    for broker in started:
        broker.close()


@pytest.fixture
def table(admin: pg8000.native.Connection) -> Iterator[str]:
    """A fresh table name (dropped afterwards)."""
    name = "t_" + uuid.uuid4().hex[:12]
    yield name
    admin.run(f"DROP TABLE IF EXISTS {name}")
