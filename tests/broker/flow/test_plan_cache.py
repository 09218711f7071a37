"""Prepared statements after DDL (a real in-process broker, pool of 3, real Postgres): DDL
through the broker drops every connection's statements (no request sees 0A000 "cached plan
must not change result type"); DDL from elsewhere is absorbed by re-running a batch once;
streams never meet it (their DECLARE has no result type to change: the cursor's query is planned
afresh each time); inside an interactive transaction it still fails once per connection
(docs/broker.md, "Statement cache")."""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from typing import Any

import grpc
import pg8000.native
import pytest

from broker.postgres.audit import CLEANUP
from lambda_client._proto.pgbroker.v1 import broker_pb2 as pb
from tests.fixtures.brokers import InProcessBroker
from tests.support import request, rows, status_of

POOL = 3
RERUN = "re-running after a plan change"


@pytest.fixture
def broker(start_inproc_broker: Callable[..., InProcessBroker]) -> InProcessBroker:
    return start_inproc_broker(pool_size=POOL)


@pytest.fixture
def ints(admin: pg8000.native.Connection, table: str) -> str:
    admin.run(f"CREATE TABLE {table} (id int PRIMARY KEY, v int)")
    admin.run(f"INSERT INTO {table} VALUES (1, 10), (2, 20)")
    return table


def on_every_connection(broker: InProcessBroker, sql: str) -> list[BaseException | list[Any]]:
    """Run *sql* twice on each pooled connection, so it is prepared there (a text's first run
    on a connection is the unnamed statement, its second prepares it): twice POOL batches at
    once, each holding its connection a moment first so no two share one. The second
    round's rows or errors."""
    _on_every_connection_once(broker, sql)
    return _on_every_connection_once(broker, sql)


def _on_every_connection_once(broker: InProcessBroker, sql: str) -> list[BaseException | list[Any]]:
    out: list[BaseException | list[Any]] = []

    def one() -> None:
        try:
            reply = broker.execute(request("SELECT pg_sleep(0.3)", sql), timeout=20)
            out.append(rows(reply.results[1]))
        except grpc.RpcError as exc:
            out.append(exc)

    threads = [threading.Thread(target=one) for _ in range(POOL)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    return out


def select_many(broker: InProcessBroker, sql: str, times: int = 20) -> list[Any]:
    """*sql* alone (autocommit) *times* times in a row, then on every connection at once:
    every result (an error fails the test)."""
    results = [rows(broker.execute(request(sql)).results[0]) for _ in range(times)]
    for result in on_every_connection(broker, sql):
        assert not isinstance(result, BaseException), status_of(result)  # type: ignore[arg-type]
        results.append(result)
    return results


class Lease:
    """One Transact stream, step by step."""

    def __init__(self, broker: InProcessBroker) -> None:
        self.requests: queue.SimpleQueue[pb.TransactRequest | None] = queue.SimpleQueue()
        self.call = broker.stub().Transact(iter(self.requests.get, None), timeout=20)
        self.step(begin=pb.TransactionOptions())

    def step(self, **fields: Any) -> pb.TransactResponse:
        self.requests.put(pb.TransactRequest(**fields))
        return next(self.call)

    def execute(self, sql: str) -> pb.TransactExecuted:
        out = pb.TransactRequest.Execute()
        out.statements.add(sql=sql)
        return self.step(execute=out).executed

    def end(self, commit: bool) -> None:
        if commit:
            assert self.step(commit=pb.TransactRequest.Commit()).HasField("ended")
        else:
            assert self.step(rollback=pb.TransactRequest.Rollback()).HasField("ended")
        self.requests.put(None)


def test_ddl_through_execute_drops_every_connections_statements(
    broker: InProcessBroker, ints: str, caplog: pytest.LogCaptureFixture
) -> None:
    select = f"SELECT v FROM {ints} ORDER BY id"
    assert on_every_connection(broker, select) == [[(10,), (20,)]] * POOL
    broker.execute(
        request(
            f"DROP TABLE {ints}",
            f"CREATE TABLE {ints} (id int PRIMARY KEY, v text)",
            f"INSERT INTO {ints} VALUES (1, 'a'), (2, 'b')",
        )
    )
    with caplog.at_level(logging.INFO, logger="pgbroker.execute"):
        results = select_many(broker, select)
    assert results == [[("a",), ("b",)]] * (20 + POOL)
    assert RERUN not in caplog.text  # no statement met a stale plan: none needed a re-run
    # DEALLOCATE ALL went to the server: only what ran since is prepared on the connection
    # (and the broker's own session reset and probe, prepared again).
    prepared = "SELECT statement FROM pg_prepared_statements ORDER BY 1"
    left = rows(broker.execute(request(prepared)).results[0])
    # (The query just run is not among them: its first run here was the unnamed statement.)
    expected = [("SELECT pg_sleep(0.3)",), (select,), *((sql,) for sql in CLEANUP)]
    assert left == sorted(expected)


def test_ddl_committed_in_a_lease_drops_every_connections_statements(
    broker: InProcessBroker, ints: str, caplog: pytest.LogCaptureFixture
) -> None:
    select = f"SELECT v FROM {ints} ORDER BY id"
    assert on_every_connection(broker, select) == [[(10,), (20,)]] * POOL
    lease = Lease(broker)
    assert not lease.execute(f"ALTER TABLE {ints} ALTER v TYPE text").HasField("error")
    lease.end(commit=True)
    with caplog.at_level(logging.INFO, logger="pgbroker.execute"):
        results = select_many(broker, select)
    assert results == [[("10",), ("20",)]] * (20 + POOL)
    assert RERUN not in caplog.text


def test_a_lease_reads_what_its_own_ddl_changed(broker: InProcessBroker, ints: str) -> None:
    select = f"SELECT v FROM {ints} ORDER BY id"
    on_every_connection(broker, select)
    lease = Lease(broker)  # LIFO: the connection used last, which has the SELECT prepared
    assert not lease.execute(f"ALTER TABLE {ints} ALTER v TYPE text").HasField("error")
    executed = lease.execute(select)
    assert not executed.HasField("error"), executed.error
    assert rows(executed.results[0]) == [("10",), ("20",)]
    lease.end(commit=True)


def test_rolled_back_ddl_keeps_the_statements(broker: InProcessBroker, ints: str) -> None:
    select = f"SELECT v FROM {ints} ORDER BY id"
    on_every_connection(broker, select)
    generation = broker.server.pool.statement_generation
    lease = Lease(broker)
    lease.execute(f"ALTER TABLE {ints} ALTER v TYPE text")
    lease.end(commit=False)
    with pytest.raises(grpc.RpcError):  # a failed DDL batch rolls back: nothing changed
        broker.execute(request(f"ALTER TABLE {ints} ALTER v TYPE text", "SELECT 1/0"))
    assert broker.server.pool.statement_generation == generation
    assert select_many(broker, select, times=3) == [[(10,), (20,)]] * (3 + POOL)


def test_ddl_outside_the_broker_is_absorbed_by_one_rerun(
    broker: InProcessBroker,
    ints: str,
    admin: pg8000.native.Connection,
    caplog: pytest.LogCaptureFixture,
) -> None:
    select = f"SELECT v FROM {ints} ORDER BY id"
    assert on_every_connection(broker, select) == [[(10,), (20,)]] * POOL
    admin.run(f"ALTER TABLE {ints} ALTER v TYPE text")
    with caplog.at_level(logging.INFO, logger="pgbroker.execute"):
        results = select_many(broker, select)
    assert results == [[("10",), ("20",)]] * (20 + POOL)
    # Each connection met the stale plan once (autocommit or batch) and re-ran it.
    assert 1 <= caplog.text.count(RERUN) <= POOL


def test_ddl_outside_the_broker_then_a_stream(
    broker: InProcessBroker, ints: str, admin: pg8000.native.Connection
) -> None:
    select = f"SELECT v FROM {ints} ORDER BY id"
    stub = broker.stub()

    def stream() -> list[Any]:
        statement = pb.Statement(sql=select)
        chunks = list(stub.Stream(pb.StreamRequest(statement=statement), timeout=20))
        return [row for chunk in chunks for row in rows(chunk)]

    assert stream() == [(10,), (20,)]  # its DECLARE prepared on the connection used last
    admin.run(f"ALTER TABLE {ints} ALTER v TYPE text")
    assert [stream() for _ in range(5)] == [[("10",), ("20",)]] * 5


def test_inside_a_lease_ddl_outside_the_broker_fails_once_per_connection(
    broker: InProcessBroker, ints: str, admin: pg8000.native.Connection
) -> None:
    """The documented remaining case: the statement cannot be re-run inside the caller's
    transaction, so it fails (0A000) and the caller retries the transaction."""
    select = f"SELECT v FROM {ints} ORDER BY id"
    on_every_connection(broker, select)
    admin.run(f"ALTER TABLE {ints} ALTER v TYPE text")
    lease = Lease(broker)  # LIFO: the connection used last, which has the SELECT prepared
    failed = lease.execute(select)
    assert failed.error.sqlstate == "0A000"
    assert "cached plan must not change result type" in failed.error.message
    lease.end(commit=False)
    again = Lease(broker)  # the same connection: the statement was forgotten
    executed = again.execute(select)
    assert not executed.HasField("error"), executed.error
    assert rows(executed.results[0]) == [("10",), ("20",)]
    again.end(commit=True)
