"""A request that ends its own server connection runs at most MAX_ATTEMPTS times: the broker
retries a connection lost mid-statement (a failover looks the same), then gives up in a way the
client does not retry, so the two retry loops never multiply."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import grpc
import pg8000.native
import pytest

from broker.flow.batch import MAX_ATTEMPTS
from lambda_client import BrokerClient, Unavailable
from tests.support import request, rows, status_of


@pytest.fixture
def sequence(admin: pg8000.native.Connection) -> Iterator[str]:
    name = "seq_" + uuid.uuid4().hex[:12]
    admin.run(f"CREATE SEQUENCE {name}")
    yield name
    admin.run(f"DROP SEQUENCE IF EXISTS {name}")


def test_a_statement_ending_its_own_connection_runs_max_attempts_times(
    start_inproc_broker: Any, admin: pg8000.native.Connection, sequence: str
) -> None:
    broker = start_inproc_broker()
    db = BrokerClient(broker.target, timeout=20)
    try:
        with pytest.raises(Unavailable) as failure:
            db.query(f"SELECT nextval('{sequence}'), pg_terminate_backend(pg_backend_pid())")
    finally:
        db.close()
    assert failure.value.reason == "CONNECTION_LOST"
    assert admin.run(f"SELECT last_value FROM {sequence}") == [[MAX_ATTEMPTS]]
    # The status says what happened; no RetryInfo invites a retry.
    with pytest.raises(grpc.RpcError) as raw:
        broker.execute(request(f"SELECT pg_terminate_backend(pg_backend_pid()), '{sequence}'"))
    assert raw.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "nothing committed, not retried again" in (raw.value.details() or "")
    assert status_of(raw.value).retry_after is None
    # The pool replaced what it lost and serves the next request.
    assert rows(broker.execute(request("SELECT 1")).results[0]) == [(1,)]
