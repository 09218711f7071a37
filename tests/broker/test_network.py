"""Network loss between the broker and Postgres, through a TCP proxy the test can cut."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from brokertest import details_of, request, rows, wait_until

from devtools.tcpproxy import TcpProxy


@pytest.fixture
def proxy(postgres: Any) -> Iterator[TcpProxy]:
    with TcpProxy((postgres.host, postgres.port)) as p:
        yield p


@pytest.fixture
def broker(start_broker: Any, proxy: TcpProxy) -> Any:
    url = f"postgresql://postgres@{proxy.host}:{proxy.port}/postgres?sslmode=disable"
    return start_broker(database_url=url, pool_size=2, queue_timeout=30)


def test_network_loss_replaces_connections_and_queued_requests_succeed(
    broker: Any, proxy: TcpProxy
) -> None:
    broker.execute(request("SELECT 1"))
    proxy.refuse()
    proxy.cut()
    futures = [
        broker.stub.Execute.future(request(("SELECT $1::int", [i])), timeout=30) for i in range(5)
    ]
    wait_until(lambda: broker.stats()["requests_waiting"] == 5, what="requests to queue")
    proxy.accept()
    assert [rows(f.result().results[0])[0][0] for f in futures] == list(range(5))
    assert broker.stats()["connections_lost"] == 2


def _sleeping(admin: Any) -> bool:
    return bool(
        admin.run(
            "SELECT count(*) FROM pg_stat_activity WHERE state = 'active' "
            "AND query LIKE '%pg_sleep(0.5)%' AND pid <> pg_backend_pid()"
        )[0][0]
    )


def test_link_lost_before_commit_is_retried_and_commits_once(
    broker: Any, proxy: TcpProxy, admin: Any, table: str
) -> None:
    broker.execute(request(f"CREATE TABLE {table} (n int)"))
    future = broker.stub.Execute.future(
        request("SELECT pg_sleep(0.5)", f"INSERT INTO {table} VALUES (1)"), timeout=30
    )
    wait_until(lambda: _sleeping(admin), what="the batch to run")
    proxy.cut()
    # Cut during the first statement: COMMIT was not sent, nothing can have committed, so
    # the broker retries on a new link. (Cut during the last statement, which travels with
    # COMMIT, the outcome would be unknown: see the autocommit test below.)
    future.result()
    wait_until(lambda: not _sleeping(admin))
    assert admin.run(f"SELECT count(*) FROM {table}") == [[1]]
    assert broker.stats()["connections_lost"] >= 1  # the cut landed: this was a retry


def test_link_lost_during_an_autocommit_statement_reports_unknown(
    broker: Any, proxy: TcpProxy, admin: Any
) -> None:
    future = broker.stub.Execute.future(request("SELECT pg_sleep(0.5)"), timeout=30)
    wait_until(lambda: _sleeping(admin), what="the statement to run")
    proxy.cut()
    with pytest.raises(grpc.RpcError) as failure:
        future.result()
    # A single statement commits on its own: whether it did is unknown to the broker.
    assert failure.value.code() == grpc.StatusCode.UNKNOWN
    assert details_of(failure.value)["ErrorInfo"].reason == "CONNECTION_LOST"
    assert rows(broker.execute(request("SELECT 1")).results[0]) == [(1,)]
