"""Round trips to Postgres per kind of batch (`broker.flow.batch.run_transaction`), counted on a
real server connection: every flush of the socket waits for its reply.

COMMIT travels with the statements unless the batch must see its results first: a statement
returning rows (the result limits are checked before COMMIT) or an idempotency key (the
response is stored before COMMIT). Either way, or both, that costs ONE more round trip, which
carries the key's store, COMMIT and the session reset + probe together.
"""

from __future__ import annotations

import dataclasses
import uuid
from typing import Any

import pytest

from broker.errors import BrokerFailure, Code
from broker.flow.batch import Batch, run_transaction
from broker.postgres import keys
from broker.postgres.pg import PgConnection, TransactionStatus
from broker.sql.plan import plan_request
from lambda_client._proto.pgbroker.v1 import broker_pb2 as pb
from tests.support import rows


class _CountingSocket:
    """The connection's buffered socket, counting flushes (each one then waits for a reply)."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self.flushes = 0

    def flush(self) -> None:
        self.flushes += 1
        self._inner.flush()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


@pytest.fixture
def conn(keyed_pg: PgConnection) -> PgConnection:
    return keyed_pg  # tests/fixtures/postgres.py


@pytest.fixture
def counted(conn: PgConnection) -> _CountingSocket:
    sock = _CountingSocket(conn._core._sock)
    conn._core._sock = sock
    return sock


def _batch(table: str, *, returns_rows: bool, key: bool, checked: list[int]) -> Batch:
    sqls = [f"INSERT INTO {table} (note) VALUES ('x')"]
    sqls.append(f"SELECT count(*) FROM {table}" if returns_rows else f"UPDATE {table} SET n = 1")
    plan = plan_request(sqls)
    claim = None
    if key:
        digest = keys.request_hash(
            pb.ExecuteRequest(statements=[pb.Statement(sql=s) for s in sqls])
        )
        claim = keys.KeyClaim("round-trips", f"rt-{uuid.uuid4()}", digest, 60.0)
    return Batch(
        statements=[pb.Statement(sql=s) for s in sqls],
        plan=plan,
        claim=claim,
        result_check=lambda results: checked.append(len(results)),
    )


@pytest.mark.parametrize(
    ("returns_rows", "key", "expected"),
    [(False, False, 1), (True, False, 2), (False, True, 2), (True, True, 2)],
    ids=["plain-write", "with-rows", "keyed", "keyed-with-rows"],
)
def test_round_trips_per_batch_kind(
    table: str,
    conn: PgConnection,
    counted: _CountingSocket,
    returns_rows: bool,
    key: bool,
    expected: int,
) -> None:
    conn.execute_simple(f"CREATE TABLE {table} (note text, n int)")
    checked: list[int] = []
    # The first run sends the statements unnamed, the second prepares them (a round trip
    # each); the third finds them cached.
    for _ in range(2):
        batch = _batch(table, returns_rows=returns_rows, key=key, checked=[])
        run_transaction(conn, batch, None, 30)
    counted.flushes = 0
    batch = _batch(table, returns_rows=returns_rows, key=key, checked=checked)
    results = run_transaction(conn, batch, None, 30)
    assert counted.flushes == expected
    # Committed, the session probed behind COMMIT (no audit query after it), nothing left open.
    assert conn.transaction_status is TransactionStatus.IDLE
    assert conn.cleanup_rows and conn.session_dirty is None
    assert checked == ([2] if returns_rows else [])  # the limits see results with rows only
    if returns_rows:
        assert rows(results[1]) == [(3,)]  # the third INSERT
    if key:
        assert batch.claim is not None
        stored = conn.execute_simple(
            f"SELECT response IS NOT NULL FROM {keys.TABLE} WHERE key = '{batch.claim.key}'"
        )
        assert stored == [[True]]


@pytest.mark.parametrize("returns_rows", [False, True], ids=["write", "with-rows"])
def test_a_batch_run_once_takes_no_prepare_round_trips(
    table: str, conn: PgConnection, counted: _CountingSocket, returns_rows: bool
) -> None:
    """SQL with literals written in is new text each time: its statements go unnamed in one
    flush; as their columns are not known before the reply, COMMIT is held back for the
    result check (2 round trips, where preparing each would take 2 more)."""
    conn.execute_simple(f"CREATE TABLE {table} (note text, n int)")
    # The broker's own session reset and probe are prepared once per connection: do that
    # first, with other SQL texts (another table), so only the batch's round trips count.
    conn.execute_simple(f"CREATE TABLE {table}_warm (note text, n int)")
    warm = _batch(f"{table}_warm", returns_rows=False, key=False, checked=[])
    run_transaction(conn, warm, None, 30)
    counted.flushes = 0
    checked: list[int] = []
    results = run_transaction(
        conn, _batch(table, returns_rows=returns_rows, key=False, checked=checked), None, 30
    )
    assert counted.flushes == 2
    assert conn.transaction_status is TransactionStatus.IDLE
    assert checked == [2]
    assert rows(results[1]) == ([(1,)] if returns_rows else [])
    assert results[0].command_tag == "INSERT 0 1"


def test_a_refused_result_leaves_the_key_unclaimed(table: str, conn: PgConnection) -> None:
    """The limit check runs before the key's store and COMMIT: refused, nothing of the batch
    nor of its key is committed, so the same key can run again."""
    conn.execute_simple(f"CREATE TABLE {table} (note text, n int)")

    class Refused(BrokerFailure):  # as the result limits' LimitExceeded is
        code = Code.RESOURCE_EXHAUSTED

    def refuse(results: list[pb.StatementResult]) -> None:
        raise Refused("over the limit")

    batch = _batch(table, returns_rows=True, key=True, checked=[])
    with pytest.raises(Refused):
        run_transaction(conn, dataclasses.replace(batch, result_check=refuse), None, 30)
    assert conn.transaction_status is TransactionStatus.IDLE
    assert conn.execute_simple(f"SELECT count(*) FROM {table}") == [[0]]
    assert batch.claim is not None
    assert conn.execute_simple(
        f"SELECT count(*) FROM {keys.TABLE} WHERE key = '{batch.claim.key}'"
    ) == [[0]]
    run_transaction(conn, batch, None, 30)  # the same key commits now
    assert conn.execute_simple(f"SELECT count(*) FROM {table}") == [[1]]
