"""Network loss between the broker and Postgres, through a TCP proxy the test can cut."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import grpc
import pytest

from devtools.tcpproxy import TcpProxy
from tests.support import request, rows, status_of, wait_until


@pytest.fixture
def proxy(postgres: Any) -> Iterator[TcpProxy]:
    with TcpProxy((postgres.host, postgres.port)) as p:
        yield p


@pytest.fixture
def broker(start_inproc_broker: Any, proxy: TcpProxy) -> Any:
    url = f"postgresql://postgres@{proxy.host}:{proxy.port}/postgres?sslmode=disable"
    return start_inproc_broker(database_url=url, pool_size=2, queue_timeout=30)


def test_network_loss_replaces_connections_and_queued_requests_succeed(
    broker: Any, proxy: TcpProxy
) -> None:
    broker.execute(request("SELECT 1"))
    proxy.refuse()
    proxy.cut()
    futures = [
        broker.stub().Execute.future(request(("SELECT $1::int", [i])), timeout=30) for i in range(5)
    ]
    wait_until(lambda: broker.stats()["requests_waiting"] == 5, what="requests to queue")
    proxy.accept()
    assert [rows(f.result().results[0])[0][0] for f in futures] == list(range(5))
    assert broker.stats()["connections_lost"] == 2


LOCK_KEY = 4343


@pytest.fixture
def lock(admin: Any) -> Iterator[Any]:
    """Holds the advisory lock that a statement under test waits on, so it keeps running
    until the test releases it (after the cut); released at teardown whatever happened."""
    admin.run("SELECT pg_advisory_lock(:k)", k=LOCK_KEY)
    try:
        yield admin
    finally:
        admin.run("SELECT pg_advisory_unlock_all()")


def _waiting_on_lock(admin: Any) -> int:
    """How many backends (besides *admin*) run a statement waiting for the advisory lock."""
    return int(
        admin.run(
            "SELECT count(*) FROM pg_stat_activity WHERE state = 'active' "
            "AND wait_event_type = 'Lock' AND wait_event = 'advisory' "
            "AND query LIKE '%pg_advisory_xact_lock%' AND pid <> pg_backend_pid()"
        )[0][0]
    )


def test_link_lost_before_commit_is_retried_and_commits_once(
    broker: Any, proxy: TcpProxy, lock: Any, table: str
) -> None:
    broker.execute(request(f"CREATE TABLE {table} (n int)"))
    future = broker.stub().Execute.future(
        request(f"SELECT pg_advisory_xact_lock({LOCK_KEY})", f"INSERT INTO {table} VALUES (1)"),
        timeout=30,
    )
    wait_until(lambda: _waiting_on_lock(lock) == 1, what="the batch to wait on the lock")
    assert proxy.cut() >= 1
    # Cut during the first statement (it cannot finish while the lock is held): COMMIT was not
    # sent, nothing can have committed, so the broker retries on a new link. (Cut during the
    # last statement, which travels with COMMIT, the outcome would be unknown: see the
    # autocommit test below.)
    wait_until(lambda: broker.stats()["connections_lost"] >= 1, what="the cut to be seen")
    lock.run("SELECT pg_advisory_unlock_all()")
    future.result()
    wait_until(lambda: _waiting_on_lock(lock) == 0, what="the cut backend to end")
    assert lock.run(f"SELECT count(*) FROM {table}") == [[1]]
    assert broker.stats()["connections_lost"] >= 1  # the cut landed: this was a retry


def test_link_lost_during_an_autocommit_statement_reports_unknown(
    broker: Any, proxy: TcpProxy, lock: Any
) -> None:
    future = broker.stub().Execute.future(
        request(f"SELECT pg_advisory_xact_lock({LOCK_KEY})"), timeout=30
    )
    wait_until(lambda: _waiting_on_lock(lock) == 1, what="the statement to wait on the lock")
    assert proxy.cut() >= 1
    with pytest.raises(grpc.RpcError) as failure:
        future.result()  # the link is gone while the statement still waits on the lock
    lock.run("SELECT pg_advisory_unlock_all()")
    # A single statement commits on its own: whether it did is unknown to the broker.
    assert failure.value.code() == grpc.StatusCode.UNKNOWN
    assert status_of(failure.value).reason == "CONNECTION_LOST"
    assert rows(broker.execute(request("SELECT 1")).results[0]) == [(1,)]
