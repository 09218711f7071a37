"""Idempotency keys through a real broker on a real Postgres (broker/postgres/keys.py)."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import grpc
import pytest

from lambda_client._proto.pgbroker.v1 import broker_pb2 as pb
from tests.support import request, rows, status_of


@pytest.fixture
def broker(start_inproc_broker: Any) -> Any:
    return start_inproc_broker(pool_size=2)


def _keyed(key: str, *statements: Any, **options: Any) -> pb.ExecuteRequest:
    keyed = request(*statements, **options)
    keyed.idempotency_key = key
    return keyed


def _count(broker: Any, table: str) -> int:
    return int(rows(broker.execute(request(f"SELECT count(*) FROM {table}")).results[0])[0][0])


def test_a_retried_key_returns_the_stored_response_and_runs_nothing(
    broker: Any, table: str
) -> None:
    broker.execute(request(f"CREATE TABLE {table} (id serial, note text)"))
    insert = (f"INSERT INTO {table} (note) VALUES ($1) RETURNING id", ["x"])
    first = broker.execute(_keyed("order-42", insert))
    again = broker.execute(_keyed("order-42", insert))
    assert rows(again.results[0]) == rows(first.results[0])
    assert again.results[0].command_tag == "INSERT 0 1"
    assert _count(broker, table) == 1
    other = broker.execute(_keyed("order-43", insert))
    assert rows(other.results[0]) != rows(first.results[0])
    assert _count(broker, table) == 2


def test_a_key_reused_for_another_request_is_refused(broker: Any, table: str) -> None:
    broker.execute(request(f"CREATE TABLE {table} (id int)"))
    broker.execute(_keyed("k", (f"INSERT INTO {table} VALUES ($1)", [1])))
    with pytest.raises(grpc.RpcError) as failure:
        broker.execute(_keyed("k", (f"INSERT INTO {table} VALUES ($1)", [2])))
    assert failure.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert status_of(failure.value).reason == "IDEMPOTENCY_KEY_REUSED"
    assert _count(broker, table) == 1


def test_the_key_commits_only_with_the_work(broker: Any, table: str) -> None:
    broker.execute(request(f"CREATE TABLE {table} (id int PRIMARY KEY)"))
    broker.execute(request(f"INSERT INTO {table} VALUES (1)"))
    failing = _keyed(
        "k1", (f"INSERT INTO {table} VALUES ($1)", [2]), f"INSERT INTO {table} VALUES (1)"
    )
    for _ in range(2):  # rolled back, so the key is free again: the same error, not a replay
        with pytest.raises(grpc.RpcError) as failure:
            broker.execute(failing)
        assert status_of(failure.value).database_error.sqlstate == "23505"
        assert status_of(failure.value).database_error.statement_index == 1
    assert _count(broker, table) == 1


def test_a_retry_waits_for_the_attempt_still_running(broker: Any, table: str) -> None:
    broker.execute(request(f"CREATE TABLE {table} (id int)"))
    slow = _keyed("slow", (f"INSERT INTO {table} VALUES ($1)", [1]), "SELECT pg_sleep(0.5)")
    answers: list[Any] = []
    first = threading.Thread(target=lambda: answers.append(broker.execute(slow)))
    first.start()
    time.sleep(0.2)
    started = time.monotonic()
    second = broker.execute(slow)
    first.join()
    assert time.monotonic() - started > 0.2  # it waited for the first attempt
    assert rows(second.results[0]) == rows(answers[0].results[0])
    assert _count(broker, table) == 1


def test_read_only_work_records_no_key(broker: Any, admin: Any) -> None:
    before = admin.run("SELECT count(*) FROM pgbroker.idempotency_keys")[0][0]
    broker.execute(_keyed("read-1", "SELECT 1"))
    broker.execute(_keyed("read-2", "SELECT 2", read_only=True))
    after = admin.run("SELECT count(*) FROM pgbroker.idempotency_keys")[0][0]
    assert after == before


def test_keys_are_scoped_by_caller_and_expire(broker: Any, admin: Any, table: str) -> None:
    broker.execute(request(f"CREATE TABLE {table} (id int)"))
    broker.execute(_keyed("exp", (f"INSERT INTO {table} VALUES ($1)", [1])))
    admin.run(
        "UPDATE pgbroker.idempotency_keys SET expires_at = now() - interval '1 s' WHERE key = 'exp'"
    )
    broker.execute(_keyed("exp", (f"INSERT INTO {table} VALUES ($1)", [1])))  # a new request now
    assert _count(broker, table) == 2


def test_the_sweep_deletes_expired_keys(broker: Any, admin: Any, table: str) -> None:
    broker.execute(request(f"CREATE TABLE {table} (id int)"))
    broker.execute(_keyed("sweep-me", (f"INSERT INTO {table} VALUES ($1)", [1])))
    admin.run(
        "UPDATE pgbroker.idempotency_keys SET expires_at = now() - interval '1 s'"
        " WHERE key = 'sweep-me'"
    )
    deleted = broker.call(broker.server.key_sweeper.sweep_once())
    assert deleted >= 1
    assert admin.run("SELECT count(*) FROM pgbroker.idempotency_keys WHERE key = 'sweep-me'") == [
        [0]
    ]


def test_a_bad_key_is_a_bad_request(broker: Any) -> None:
    with pytest.raises(grpc.RpcError) as failure:
        broker.execute(_keyed("x" * 256, "SELECT 1"))
    assert status_of(failure.value).reason == "BAD_REQUEST"


def test_an_interactive_commit_with_a_committed_key_rolls_back_and_says_replayed(
    broker: Any, table: str
) -> None:
    import lambda_client as lc

    broker.execute(request(f"CREATE TABLE {table} (id int)"))
    db = lc.BrokerClient(broker.target, auth=lambda: ())
    key = f"tx-{uuid.uuid4()}"
    for _ in range(2):  # the second run is the application's retry after OutcomeUnknown
        with db.begin(idempotency_key=key) as tx:
            tx.execute(f"INSERT INTO {table} VALUES (1)")
    assert tx.committed and tx.replayed
    assert _count(broker, table) == 1
    executed = f"ex-{uuid.uuid4()}"
    broker.execute(_keyed(executed, (f"INSERT INTO {table} VALUES ($1)", [3])))
    tx = db.begin()
    tx.execute(f"INSERT INTO {table} VALUES (2)")
    with pytest.raises(lc.InvalidRequest) as failure:  # an Execute's key is not a COMMIT's
        tx.commit(idempotency_key=executed)
    assert failure.value.reason == "IDEMPOTENCY_KEY_REUSED"
    assert _count(broker, table) == 2  # the Execute's row; the transaction's was rolled back
    db.close()


@pytest.fixture
def unprivileged(admin: Any, postgres: Any) -> Iterator[str]:
    """A login role that may neither create the store nor use the one that exists."""
    name = f"eo_plain_{uuid.uuid4().hex[:8]}"
    admin.run(f"CREATE ROLE {name} LOGIN PASSWORD 'pw-{name}'")
    # PUBLIC has no CREATE on a database by default: the role cannot make the schema.
    url = urlsplit(postgres.dsn)
    yield url._replace(netloc=f"{name}:pw-{name}@{url.hostname}:{url.port}").geturl()
    admin.run(f"DROP OWNED BY {name}")
    admin.run(f"DROP ROLE {name}")


def test_without_a_usable_store_keyed_requests_are_refused_and_the_client_drops_its_key(
    start_inproc_broker: Any, unprivileged: str
) -> None:
    import lambda_client as lc

    broker = start_inproc_broker(unprivileged, pool_size=1)
    assert broker.server.service.key_store_error
    with pytest.raises(grpc.RpcError) as failure:
        broker.execute(_keyed("k", "CREATE TEMP TABLE x (id int) ON COMMIT DROP", "SELECT 1"))
    assert failure.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert status_of(failure.value).reason == "IDEMPOTENCY_UNAVAILABLE"
    db = lc.BrokerClient(broker.target, auth=lambda: ())
    db.transaction(["CREATE TEMP TABLE x (id int) ON COMMIT DROP", "SELECT 1"])  # resent keyless
    assert db.idempotency is False
    with pytest.raises(lc.OperationalError) as given:  # a key the caller chose is never dropped
        db.transaction(["CREATE TEMP TABLE x (id int) ON COMMIT DROP"], idempotency_key="mine")
    assert given.value.reason == "IDEMPOTENCY_UNAVAILABLE"
    db.close()


def test_a_large_keyed_request_is_replayed_too(broker: Any, table: str) -> None:
    """A request too large to validate on the event loop (an array) is hashed off it too."""
    broker.execute(request(f"CREATE TABLE {table} (id serial, arr int[])"))
    insert = (f"INSERT INTO {table} (arr) VALUES ($1) RETURNING id", [list(range(5000))])
    key = f"large-{uuid.uuid4()}"
    first = broker.execute(_keyed(key, insert))
    again = broker.execute(_keyed(key, insert))
    assert rows(again.results[0]) == rows(first.results[0])
    assert _count(broker, table) == 1
    changed = (insert[0], [list(range(5001))])
    with pytest.raises(grpc.RpcError) as failure:
        broker.execute(_keyed(key, changed))
    assert status_of(failure.value).reason == "IDEMPOTENCY_KEY_REUSED"
