"""Helpers shared by the test folders (importable as ``support``: pytest puts ``tests/``, the
root conftest's folder, on sys.path): polling, a direct Postgres connection, a port free on
several loopback addresses, and ExecuteRequests built from SQL with their results decoded."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable, Sequence
from typing import Any

import pg8000.native
import pytest

from lambda_client import codec
from lambda_client._proto.pgbroker.v1 import broker_pb2 as pb

__all__ = ["connect", "port_free_on", "request", "rows", "wait_until"]


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
