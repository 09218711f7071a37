"""Helpers shared by the test folders (import as ``tests.support``): polling, a direct Postgres
connection, a throwaway table, a port free on several loopback addresses, ExecuteRequests built
from SQL with their results decoded, the rich status of a failed call, and a Broker servicer
base for tests that serve Execute only.

Fixtures live in the `tests.fixtures` plugins; these are plain functions."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from typing import Any

import grpc
import pg8000.native
import pytest

from lambda_client import codec
from lambda_client._proto.pgbroker.v1 import broker_pb2 as pb
from lambda_client._proto.pgbroker.v1 import broker_pb2_grpc as pb_grpc
from lambda_client._status import StatusDetails, unpack

__all__ = [
    "ExecuteOnly",
    "calling_in_a_loop",
    "connect",
    "port_free_on",
    "request",
    "rows",
    "status_of",
    "temp_table",
    "wait_until",
]


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


def status_of(error: grpc.RpcError) -> StatusDetails:
    """What a failed call (blocking or ``grpc.aio``) says beyond its code: the ErrorInfo reason
    and metadata, RetryInfo's delay, the DatabaseError; read by the client's own reader
    (`lambda_client._status.unpack`), so the tests see exactly what callers see."""
    return unpack(error.trailing_metadata())  # type: ignore[attr-defined]


@contextlib.contextmanager
def calling_in_a_loop(
    call: Callable[[], Any], threads: int = 4
) -> Iterator[tuple[dict[Any, int], list[BaseException]]]:
    """*threads* threads calling *call* over and over while the block runs (a load to reload,
    stop or fail something under); yields how many calls answered each value, and what the
    failed ones raised. The threads are stopped and joined when the block ends."""
    answers: dict[Any, int] = {}
    failures: list[BaseException] = []
    stop = threading.Event()

    def loop() -> None:
        while not stop.is_set():
            try:
                answer = call()
            except Exception as exc:
                failures.append(exc)
            else:
                answers[answer] = answers.get(answer, 0) + 1

    workers = [threading.Thread(target=loop) for _ in range(threads)]
    for worker in workers:
        worker.start()
    try:
        yield answers, failures
    finally:
        stop.set()
        for worker in workers:
            worker.join(20)


async def _unimplemented(context: grpc.aio.ServicerContext[Any, Any]) -> None:
    await context.abort(grpc.StatusCode.UNIMPLEMENTED, "Method not implemented!")


class ExecuteOnly(pb_grpc.BrokerServicer):
    """A ``pgbroker.v1.Broker`` servicer (for grpc.aio) whose subclass defines ``Execute``;
    every other method answers UNIMPLEMENTED, as the generated base class's do at run time,
    but declared, so that mypy sees a class it can instantiate."""

    async def GetStats(
        self, request: pb.GetStatsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.GetStatsResponse:
        await _unimplemented(context)
        raise AssertionError("unreachable")  # abort raises

    async def Transact(
        self,
        request_iterator: AsyncIterator[pb.TransactRequest],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> AsyncIterator[pb.TransactResponse]:
        await _unimplemented(context)
        yield pb.TransactResponse()  # unreachable: a generator, as a streaming handler is

    async def Stream(
        self, request: pb.StreamRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[pb.RowChunk]:
        await _unimplemented(context)
        yield pb.RowChunk()  # unreachable: a generator, as a streaming handler is
