"""The pool under load and faults: FIFO queue, limits, deadlines, broken connections."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from typing import Any

import grpc
import pg8000.native
import pytest

from devtools.localpg import LocalPostgres
from tests.support import request, rows, status_of, wait_until

LOCK_KEY = 4242


@pytest.fixture
def tag() -> str:
    """A token put in the brokers' application_name so tests count only their own backends."""
    return "t" + uuid.uuid4().hex[:10]


@pytest.fixture
def lock(admin: pg8000.native.Connection) -> Iterator[pg8000.native.Connection]:
    """Holds an advisory lock that a `blocker` request waits on, pinning a pooled connection."""
    admin.run("SELECT pg_advisory_lock(:k)", k=LOCK_KEY)
    yield admin
    admin.run("SELECT pg_advisory_unlock_all()")


def block_pool(broker: Any, n: int = 1) -> list[Any]:
    """Occupy *n* pooled connections with requests waiting on the advisory lock."""
    futures = [
        broker.stub().Execute.future(
            request(f"SELECT pg_advisory_xact_lock({LOCK_KEY})"), timeout=30
        )
        for _ in range(n)
    ]
    wait_until(lambda: broker.stats()["pool_active"] == n, what=f"{n} active connections")
    return futures


def backends(admin: pg8000.native.Connection, tag: str) -> int:
    return admin.run(
        "SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE :p",
        p=f"%{tag}%",
    )[0][0]


def test_pool_of_two_serves_100_concurrent_requests_with_two_backends(
    start_inproc_broker: Any, postgres: Any, tag: str
) -> None:
    dsn = f"{postgres.dsn}?sslmode=disable&application_name=pgbroker-{tag}"
    broker = start_inproc_broker(database_url=dsn, pool_size=2)
    observer = pg8000.native.Connection(postgres.user, host=postgres.host, port=postgres.port)
    seen: list[int] = []
    stop = threading.Event()

    def observe() -> None:
        while not stop.is_set():
            seen.append(backends(observer, tag))

    thread = threading.Thread(target=observe)
    thread.start()
    try:
        metadata = (("x-lambda-function-name", tag),)
        futures = [
            broker.stub().Execute.future(
                request(("SELECT $1::int, pg_sleep(0.002)", [i])), timeout=60, metadata=metadata
            )
            for i in range(100)
        ]
        results = [rows(f.result().results[0])[0][0] for f in futures]
    finally:
        stop.set()
        thread.join()
        observer.close()
    assert results == list(range(100))
    assert seen and max(seen) <= 2
    stats = broker.stats()
    assert stats["connections_num"] == 2
    assert stats["requests_num"] == 100
    assert stats["requests_queued"] > 0
    assert stats["requests_errors"] == 0


def test_waiters_are_served_in_fifo_order(
    start_inproc_broker: Any, lock: Any, table: str, admin: Any
) -> None:
    broker = start_inproc_broker(pool_size=1)
    broker.execute(request(f"CREATE TABLE {table} (seq serial, n int)"))
    blocker = block_pool(broker)
    queued = []
    for i in range(10):
        queued.append(
            broker.stub().Execute.future(
                request((f"INSERT INTO {table} (n) VALUES ($1)", [i])), timeout=30
            )
        )
        wait_until(lambda i=i: broker.stats()["requests_waiting"] == i + 1)
    lock.run("SELECT pg_advisory_unlock_all()")
    blocker[0].result()
    for future in queued:
        future.result()
    order = admin.run(f"SELECT n FROM {table} ORDER BY seq")
    assert [r[0] for r in order] == list(range(10))


def test_full_queue_rejects_at_once_with_resource_exhausted(
    start_inproc_broker: Any, lock: Any
) -> None:
    broker = start_inproc_broker(pool_size=1, max_waiting=2)
    blocker = block_pool(broker)
    waiting = [broker.stub().Execute.future(request("SELECT 1"), timeout=30) for _ in range(2)]
    wait_until(lambda: broker.stats()["requests_waiting"] == 2)
    with pytest.raises(grpc.RpcError) as failure:
        broker.execute(request("SELECT 1"), timeout=30)
    assert failure.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    details = status_of(failure.value)
    assert details.reason == "QUEUE_FULL"
    assert details.retry_after is not None
    lock.run("SELECT pg_advisory_unlock_all()")
    assert [rows(f.result().results[0]) for f in [*blocker, *waiting]][1:] == [[(1,)], [(1,)]]
    assert broker.stats()["requests_rejected"] == 1


def test_queue_timeout_fails_clearly_and_nothing_runs(
    start_inproc_broker: Any, lock: Any, table: str, admin: Any
) -> None:
    broker = start_inproc_broker(pool_size=1, queue_timeout=0.3)
    broker.execute(request(f"CREATE TABLE {table} (n int)"))
    blocker = block_pool(broker)
    with pytest.raises(grpc.RpcError) as failure:
        broker.execute(request(f"INSERT INTO {table} VALUES (1)"), timeout=30)
    assert failure.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert status_of(failure.value).reason == "QUEUE_TIMEOUT"
    assert "queue_timeout" in (failure.value.details() or "")
    lock.run("SELECT pg_advisory_unlock_all()")
    blocker[0].result()
    assert admin.run(f"SELECT count(*) FROM {table}") == [[0]]
    assert broker.stats()["requests_timeouts"] == 1


def test_request_whose_deadline_expires_in_the_queue_never_reaches_postgres(
    start_inproc_broker: Any, lock: Any, table: str, admin: Any
) -> None:
    broker = start_inproc_broker(pool_size=1)
    broker.execute(request(f"CREATE TABLE {table} (n int)"))
    blocker = block_pool(broker)
    with pytest.raises(grpc.RpcError) as failure:
        broker.execute(request(f"INSERT INTO {table} VALUES (1)"), timeout=0.3)
    assert failure.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    wait_until(lambda: broker.stats()["requests_waiting"] == 0)
    lock.run("SELECT pg_advisory_unlock_all()")
    blocker[0].result()
    broker.execute(request("SELECT 1"))  # the connection is free again
    assert admin.run(f"SELECT count(*) FROM {table}") == [[0]]


def test_request_with_too_little_time_left_is_dropped_without_queueing(
    start_inproc_broker: Any, table: str, admin: Any
) -> None:
    broker = start_inproc_broker(pool_size=1)
    broker.execute(request(f"CREATE TABLE {table} (n int)"))
    with pytest.raises(grpc.RpcError) as failure:
        broker.execute(request(f"INSERT INTO {table} VALUES (1)"), timeout=0.001)
    assert failure.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert admin.run(f"SELECT count(*) FROM {table}") == [[0]]


def _sleepers(admin: Any) -> int:
    """Backends sleeping in pg_sleep(30); one still parsing it does not count (a cancel sent
    then would be lost, and the sleep would run its full 30 s)."""
    return admin.run(
        "SELECT count(*) FROM pg_stat_activity WHERE query LIKE '%pg_sleep(30)%' "
        "AND state = 'active' AND wait_event = 'PgSleep' AND pid <> pg_backend_pid()"
    )[0][0]


def _signal_sleepers(admin: Any, function: str) -> None:
    admin.run(
        f"SELECT {function}(pid) FROM pg_stat_activity "
        "WHERE query LIKE '%pg_sleep(30)%' AND pid <> pg_backend_pid()"
    )


@pytest.mark.parametrize("batch", [False, True], ids=["single", "batch"])
def test_long_statement_is_stopped_by_the_deadline(
    start_inproc_broker: Any, admin: Any, batch: bool
) -> None:
    broker = start_inproc_broker(pool_size=1)
    pid_before = rows(broker.execute(request("SELECT pg_backend_pid()")).results[0])[0][0]
    statements = ["SELECT 1", "SELECT pg_sleep(30)"] if batch else ["SELECT pg_sleep(30)"]
    with pytest.raises(grpc.RpcError) as failure:
        broker.execute(request(*statements), timeout=1.0)
    assert failure.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    wait_until(lambda: _sleepers(admin) == 0, what="the backend query to stop")
    # The statement was stopped server-side and the connection survived (same backend).
    pid_after = rows(broker.execute(request("SELECT pg_backend_pid()")).results[0])[0][0]
    assert pid_after == pid_before


def test_caller_going_away_cancels_the_backend_query(start_inproc_broker: Any, admin: Any) -> None:
    broker = start_inproc_broker(pool_size=1)
    future = broker.stub().Execute.future(request("SELECT pg_sleep(30)"), timeout=60)
    wait_until(lambda: _sleepers(admin) == 1, what="the query to start")
    future.cancel()
    wait_until(lambda: _sleepers(admin) == 0, what="the backend query to be cancelled")
    assert rows(broker.execute(request("SELECT 7")).results[0]) == [(7,)]
    wait_until(lambda: broker.stats()["pool_available"] == 1)


def test_terminated_backends_are_replaced_and_no_request_is_lost(
    start_inproc_broker: Any, postgres: Any, admin: Any, tag: str
) -> None:
    dsn = f"{postgres.dsn}?sslmode=disable&application_name=pgbroker-{tag}"
    broker = start_inproc_broker(database_url=dsn, pool_size=2)
    wait_until(lambda: backends(admin, tag) == 2)
    admin.run(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name LIKE :p",
        p=f"%{tag}%",
    )
    futures = [broker.stub().Execute.future(request("SELECT 1"), timeout=30) for _ in range(20)]
    assert all(rows(f.result().results[0]) == [(1,)] for f in futures)
    # Replacements open in the background: the requests may all finish before the last one.
    wait_until(lambda: broker.stats()["connections_num"] == 4)
    assert broker.stats()["connections_lost"] == 2


def test_backend_terminated_mid_statement_is_retried_on_a_new_connection(
    start_inproc_broker: Any, postgres: Any, admin: Any, tag: str
) -> None:
    dsn = f"{postgres.dsn}?sslmode=disable&application_name=pgbroker-{tag}"
    broker = start_inproc_broker(database_url=dsn, pool_size=1)
    future = broker.stub().Execute.future(request("SELECT pg_sleep(30), 1"), timeout=60)
    wait_until(lambda: _sleepers(admin) == 1)
    _signal_sleepers(admin, "pg_terminate_backend")
    # FATAL 57P01 says the server aborted it: nothing committed, so the broker retries.
    wait_until(lambda: _sleepers(admin) == 1, what="the retry to start")
    _signal_sleepers(admin, "pg_cancel_backend")
    with pytest.raises(grpc.RpcError) as failure:
        future.result()
    assert status_of(failure.value).database_error.sqlstate == "57014"
    assert broker.stats()["connections_lost"] == 1


@pytest.mark.slow
def test_postgres_restart_while_requests_are_queued(start_inproc_broker: Any) -> None:
    with LocalPostgres() as server:
        broker = start_inproc_broker(dsn=server.dsn, pool_size=2, queue_timeout=30)
        broker.execute(request("SELECT 1"))
        server.shutdown()
        futures = [
            broker.stub().Execute.future(request(("SELECT $1::int", [i])), timeout=60)
            for i in range(10)
        ]
        wait_until(lambda: broker.stats()["requests_waiting"] == 10, what="requests to queue")
        server.start()
        assert [rows(f.result().results[0])[0][0] for f in futures] == list(range(10))
        stats = broker.stats()
        assert stats["connections_lost"] == 2
        assert stats["connections_errors"] >= 1


def test_connections_are_recycled_after_max_lifetime(start_inproc_broker: Any) -> None:
    broker = start_inproc_broker(pool_size=1, max_lifetime=0.3)
    first = rows(broker.execute(request("SELECT pg_backend_pid()")).results[0])[0][0]
    wait_until(lambda: broker.stats()["connections_num"] >= 2, what="a recycled connection")
    second = rows(broker.execute(request("SELECT pg_backend_pid()")).results[0])[0][0]
    assert second != first
    assert broker.stats()["connections_lost"] == 0
