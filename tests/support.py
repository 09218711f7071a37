"""Helpers shared by the test folders (importable as ``support``: pytest puts ``tests/``, the
root conftest's folder, on sys.path): polling, a direct Postgres connection, a port free on
several loopback addresses, ExecuteRequests built from SQL with their results decoded, and a
real broker server in this process."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import pg8000.native
import pytest

from broker.config import Settings
from broker.front.server import BrokerServer
from lambda_client import codec
from lambda_client._proto.pgbroker.v1 import broker_pb2 as pb

__all__ = ["InProcessServer", "connect", "port_free_on", "request", "rows", "wait_until"]


def wait_until(predicate: Callable[[], Any], timeout: float = 10.0, what: str = "") -> Any:
    """Poll *predicate* until it returns something truthy; fail the test after *timeout*."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what or predicate}")
        time.sleep(0.01)


def connect(postgres: Any) -> pg8000.native.Connection:
    """A direct pg8000 connection to *postgres* (the ``postgres`` fixture's server), as its
    superuser and not through a broker; the caller closes it."""
    return pg8000.native.Connection(
        postgres.user,
        host=postgres.host,
        port=postgres.port,
        database=postgres.database,
        password=getattr(postgres, "password", None),
    )


@contextlib.contextmanager
def temp_table(postgres: Any, prefix: str, columns: str) -> Iterator[str]:
    """A table ``<prefix>_<random>`` with *columns*, created and dropped over a direct
    connection to *postgres* (the test server, not through the broker)."""
    name = f"{prefix}_{uuid.uuid4().hex[:8]}"
    admin = connect(postgres)
    admin.run(f"CREATE TABLE {name} ({columns})")
    try:
        yield name
    finally:
        admin.run(f"DROP TABLE IF EXISTS {name}")
        admin.close()


def port_free_on(hosts: list[str]) -> int:
    """A port that can be bound on every one of *hosts* (loopback addresses 127.0.0.N);
    RuntimeError if 50 tries found none."""
    for _ in range(50):
        with socket.socket() as probe:
            probe.bind((hosts[0], 0))
            port = int(probe.getsockname()[1])
        try:
            for host in hosts[1:]:
                with socket.socket() as other:
                    other.bind((host, port))
        except OSError:
            continue
        return port
    raise RuntimeError("no port free on every loopback address")


def request(*statements: str | tuple[str, Sequence[object]], **options: Any) -> pb.ExecuteRequest:
    """An ExecuteRequest from SQL strings or (sql, params) pairs."""
    out = pb.ExecuteRequest(options=pb.TransactionOptions(**options))
    for item in statements:
        sql, params = (item, ()) if isinstance(item, str) else item
        out.statements.add(sql=sql, params=codec.encode_params(list(params)))
    return out


def rows(result: pb.StatementResult) -> list[tuple[Any, ...]]:
    """The decoded rows of one statement's result."""
    return [codec.decode_row(r.values) for r in result.rows]


class InProcessServer:
    """A started `BrokerServer` for *settings* (``listen`` on port 0), its event loop on a
    background thread; `close()` stops it (its shutdown grace: *grace* seconds). If it does not
    start, everything is stopped and the error is raised."""

    def __init__(self, settings: Settings, *, grace: float) -> None:
        self.settings = settings
        self.grace = grace
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server = BrokerServer(settings)
        try:
            self.port: int = self.call(self.server.start())
        except BaseException:
            InProcessServer.close(self)  # not a subclass' close: its own parts do not exist yet
            raise
        self.target = f"127.0.0.1:{self.port}"

    def call(self, coro: Any, timeout: float = 60) -> Any:
        """Run *coro* on the server's loop and return its result (TimeoutError after
        *timeout* seconds)."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        """Stop the server, then its loop and thread."""
        with contextlib.suppress(Exception):
            self.call(self.server.stop(grace=self.grace))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()
