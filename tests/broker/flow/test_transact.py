"""``Transact`` against a real in-process broker and Postgres, driven through the raw stream:
steps answered in order, Postgres errors in-stream, the bounds of a lease, pool accounting and
the session-state guard."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import grpc
import pg8000.native
import pytest

from lambda_client import codec
from lambda_client._proto.pgbroker.v1 import broker_pb2 as pb
from lambda_client.transaction import ENDED_KEY
from tests.fixtures.brokers import InProcessBroker
from tests.support import rows, status_of, wait_until


class Stream:
    """One Transact stream: each `step` sends one request and reads its answer."""

    def __init__(self, broker: InProcessBroker, timeout: float = 20, **kw: Any) -> None:
        self.requests: queue.SimpleQueue[pb.TransactRequest | None] = queue.SimpleQueue()
        self.call = broker.stub().Transact(iter(self.requests.get, None), timeout=timeout, **kw)

    def step(self, **request: Any) -> pb.TransactResponse:
        self.requests.put(pb.TransactRequest(**request))
        return next(self.call)

    def begin(self, **options: Any) -> pb.TransactBegun:
        return self.step(begin=pb.TransactionOptions(**options)).begun

    def execute(self, *statements: str | tuple[str, Sequence[object]]) -> pb.TransactExecuted:
        out = pb.TransactRequest.Execute()
        for item in statements:
            sql, params = (item, ()) if isinstance(item, str) else item
            out.statements.add(sql=sql, params=codec.encode_params(list(params)))
        return self.step(execute=out).executed

    def commit(self) -> pb.TransactEnded:
        return self.step(commit=pb.TransactRequest.Commit()).ended

    def rollback(self) -> pb.TransactEnded:
        return self.step(rollback=pb.TransactRequest.Rollback()).ended

    def close(self) -> None:
        self.requests.put(None)


def failure(action: Callable[[], Any]) -> grpc.RpcError:
    """The status *action* ends the stream with."""
    with pytest.raises(grpc.RpcError) as info:
        action()
    return info.value


def values(executed: pb.TransactExecuted) -> list[list[tuple[Any, ...]]]:
    assert not executed.HasField("error"), executed.error
    return [rows(result) for result in executed.results]


@pytest.fixture
def broker(start_inproc_broker: Callable[..., InProcessBroker]) -> InProcessBroker:
    return start_inproc_broker(idle_transaction_timeout=2)


@pytest.fixture
def counter(admin: pg8000.native.Connection, table: str) -> str:
    admin.run(f"CREATE TABLE {table} (id int PRIMARY KEY, n int NOT NULL)")
    admin.run(f"INSERT INTO {table} VALUES (1, 0)")
    return table


def test_statements_run_in_one_transaction_until_commit(
    broker: InProcessBroker, counter: str, admin: pg8000.native.Connection
) -> None:
    stream = Stream(broker)
    assert stream.begin(isolation=pb.ISOLATION_LEVEL_REPEATABLE_READ).wait_us >= 0
    read = stream.execute(
        (f"SELECT n FROM {counter} WHERE id = $1 FOR UPDATE", [1]),
        "SELECT current_setting('transaction_isolation')",
    )
    assert values(read) == [[(0,)], [("repeatable read",)]]
    stream.execute((f"UPDATE {counter} SET n = $1 WHERE id = 1", [41 + 1]))
    assert admin.run(f"SELECT n FROM {counter}") == [[0]]  # not committed yet
    ended = stream.commit()
    assert ended.committed and ended.run_us > 0
    assert admin.run(f"SELECT n FROM {counter}") == [[42]]
    wait_until(lambda: broker.stats()["leases_active"] == 0, what="the lease to end")
    stats = broker.stats()
    assert (stats["leases_num"], stats["leases_ended_commit"], stats["pool_available"]) == (1, 1, 2)
    assert stats["leases_p50_ms"] == stats["leases_max_ms"] == stats["leases_ms"]  # one lease


def test_rollback_undoes_the_transaction(
    broker: InProcessBroker, counter: str, admin: pg8000.native.Connection
) -> None:
    stream = Stream(broker)
    stream.begin()
    stream.execute(f"UPDATE {counter} SET n = 7")
    assert not stream.rollback().committed
    assert admin.run(f"SELECT n FROM {counter}") == [[0]]
    # Counted once the stream is over, just after the ROLLBACK is answered.
    wait_until(lambda: broker.stats()["leases_ended_rollback"] == 1, what="the lease to end")


def test_ended_comes_in_the_trailer_when_asked_and_as_a_message_otherwise(
    broker: InProcessBroker, counter: str, admin: pg8000.native.Connection
) -> None:
    def ended_in_trailer(stream: Stream, **request: Any) -> pb.TransactEnded:
        stream.requests.put(pb.TransactRequest(**request))
        with pytest.raises(StopIteration):  # no message: the stream ends OK at once
            next(stream.call)
        assert stream.call.code() is grpc.StatusCode.OK
        return pb.TransactEnded.FromString(dict(stream.call.trailing_metadata())[ENDED_KEY])

    stream = Stream(broker)
    stream.begin()
    stream.execute(f"UPDATE {counter} SET n = 5")
    ended = ended_in_trailer(stream, commit=pb.TransactRequest.Commit(ended_in_trailer=True))
    assert ended.committed and ended.run_us > 0 and not ended.replayed
    assert admin.run(f"SELECT n FROM {counter}") == [[5]]
    stream = Stream(broker)
    stream.begin()
    stream.execute(f"UPDATE {counter} SET n = 6")
    ended = ended_in_trailer(stream, rollback=pb.TransactRequest.Rollback(ended_in_trailer=True))
    assert not ended.committed and ended.run_us > 0
    assert admin.run(f"SELECT n FROM {counter}") == [[5]]
    # An older client asks for nothing: `ended` comes as a message, none in the trailer.
    stream = Stream(broker)
    stream.begin()
    stream.execute(f"UPDATE {counter} SET n = 7")
    assert stream.commit().committed
    with pytest.raises(StopIteration):
        next(stream.call)
    assert ENDED_KEY not in dict(stream.call.trailing_metadata())
    assert admin.run(f"SELECT n FROM {counter}") == [[7]]
    wait_until(lambda: broker.stats()["leases_active"] == 0, what="the leases to end")
    stats = broker.stats()
    assert (stats["leases_ended_commit"], stats["leases_ended_rollback"]) == (2, 1)


def test_an_error_aborts_until_rollback_to_savepoint(
    broker: InProcessBroker, counter: str, admin: pg8000.native.Connection
) -> None:
    stream = Stream(broker)
    stream.begin()
    stream.execute(f"UPDATE {counter} SET n = 1", "SAVEPOINT s1")
    failed = stream.execute(f"UPDATE {counter} SET n = 2", "SELECT 1 / 0")
    assert (failed.error.sqlstate, failed.error.statement_index) == ("22012", 1)
    assert failed.error_code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert not failed.results
    aborted = stream.execute("SELECT 1")
    assert (aborted.error.sqlstate, aborted.error.statement_index) == ("25P02", 0)
    values(stream.execute("ROLLBACK TO SAVEPOINT s1", f"SELECT n FROM {counter}"))
    assert values(stream.execute(f"SELECT n FROM {counter}")) == [[(1,)]]
    assert stream.commit().committed
    assert admin.run(f"SELECT n FROM {counter}") == [[1]]


def test_commit_of_an_aborted_transaction_fails_and_commits_nothing(
    broker: InProcessBroker, counter: str, admin: pg8000.native.Connection
) -> None:
    stream = Stream(broker)
    stream.begin()
    stream.execute(f"UPDATE {counter} SET n = 5")
    assert stream.execute("SELECT missing_column").error.sqlstate == "42703"
    error = failure(stream.commit)
    assert error.code() is grpc.StatusCode.FAILED_PRECONDITION
    assert status_of(error).database_error.sqlstate == "25P02"
    assert admin.run(f"SELECT n FROM {counter}") == [[0]]
    wait_until(lambda: broker.stats()["leases_ended_error"] == 1, what="the lease to end")


def test_session_state_guard_applies_inside_a_transaction(broker: InProcessBroker) -> None:
    stream = Stream(broker)
    stream.begin()
    local = stream.execute("SET LOCAL search_path TO pg_catalog", "SHOW search_path")
    assert values(local)[1] == [("pg_catalog",)]
    error = failure(lambda: stream.execute("SET search_path TO pg_catalog"))
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert status_of(error).reason == "SESSION_STATE"
    wait_until(lambda: broker.stats()["pool_available"] == 2, what="the lease to end")
    refused = failure(lambda: Stream(broker).execute("SELECT 1"))
    assert refused.code() is grpc.StatusCode.INVALID_ARGUMENT  # no begin first


def test_idle_timeout_ends_the_lease_and_releases_its_locks(
    broker: InProcessBroker, counter: str, admin: pg8000.native.Connection
) -> None:
    stream = Stream(broker)
    stream.begin()
    stream.execute(f"SELECT n FROM {counter} WHERE id = 1 FOR UPDATE")
    started = time.monotonic()
    # The lock is released by the broker's rollback, without anything from the caller.
    wait_until(
        lambda: admin.run(f"SELECT n FROM {counter} WHERE id = 1 FOR UPDATE SKIP LOCKED"),
        timeout=10,
        what="the row lock to be released",
    )
    assert 1.5 < time.monotonic() - started < 6
    error = failure(lambda: stream.execute("SELECT 1"))
    assert error.code() is grpc.StatusCode.DEADLINE_EXCEEDED
    assert status_of(error).reason == "IDLE_TRANSACTION_TIMEOUT"
    assert "PGBROKER_IDLE_TRANSACTION_TIMEOUT" in (error.details() or "")
    stats = broker.stats()
    assert (stats["leases_ended_idle_transaction_timeout"], stats["pool_available"]) == (1, 2)


def test_transaction_timeout_cancels_a_running_statement(
    start_inproc_broker: Callable[..., InProcessBroker],
) -> None:
    broker = start_inproc_broker(transaction_timeout=1)
    stream = Stream(broker)
    stream.begin()
    started = time.monotonic()
    error = failure(lambda: stream.execute("SELECT pg_sleep(20)"))
    assert time.monotonic() - started < 5
    assert status_of(error).reason == "TRANSACTION_TIMEOUT"
    stats = broker.stats()
    assert (stats["leases_ended_transaction_timeout"], stats["pool_available"]) == (1, 2)


def test_deadline_mid_statement_cancels_it(
    broker: InProcessBroker, admin: pg8000.native.Connection
) -> None:
    stream = Stream(broker, timeout=1.5)
    stream.begin()
    started = time.monotonic()
    error = failure(lambda: stream.execute("SELECT pg_sleep(20)"))
    assert error.code() is grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - started < 3
    wait_until(lambda: broker.stats()["leases_ended_deadline"] == 1, what="the lease to end")
    sleeping = "SELECT count(*) FROM pg_stat_activity WHERE query = 'SELECT pg_sleep(20)'"
    wait_until(lambda: admin.run(sleeping + " AND state = 'active'") == [[0]], timeout=5)
    assert broker.stats()["pool_available"] == 2


def test_a_cancelled_stream_rolls_back_and_frees_its_connection(
    broker: InProcessBroker, counter: str, admin: pg8000.native.Connection
) -> None:
    stream = Stream(broker)
    stream.begin()
    stream.execute(f"UPDATE {counter} SET n = 9")
    stream.call.cancel()
    wait_until(lambda: broker.stats()["leases_ended_client_gone"] == 1, what="the lease to end")
    assert broker.stats()["pool_available"] == 2
    assert admin.run(f"SELECT n FROM {counter} FOR UPDATE NOWAIT") == [[0]]


def test_a_stream_closed_without_commit_rolls_back(
    broker: InProcessBroker, counter: str, admin: pg8000.native.Connection
) -> None:
    stream = Stream(broker)
    stream.begin()
    stream.execute(f"UPDATE {counter} SET n = 3")
    stream.close()
    error = failure(lambda: next(stream.call))
    assert error.code() is grpc.StatusCode.CANCELLED
    assert admin.run(f"SELECT n FROM {counter}") == [[0]]


def test_a_third_caller_waits_until_one_of_two_leases_commits(broker: InProcessBroker) -> None:
    first, second = Stream(broker), Stream(broker)
    first.begin()
    second.begin()
    third = Stream(broker)
    answers: queue.SimpleQueue[Any] = queue.SimpleQueue()
    waiter = threading.Thread(target=lambda: answers.put(third.begin()))
    waiter.start()
    wait_until(lambda: broker.stats()["requests_waiting"] == 1, what="the third to queue")
    time.sleep(0.3)
    assert answers.empty()  # still queued: both connections are leased
    committed_at = time.monotonic()
    first.commit()
    waiter.join(5)
    begun = answers.get(timeout=1)
    assert time.monotonic() - committed_at < 1
    assert begun.wait_us >= 300_000
    assert values(third.execute("SELECT 1")) == [[(1,)]]
    for stream in (second, third):
        stream.commit()

    # The lease is counted and its connection pooled once the stream is over, just after the
    # COMMIT is answered.
    def figures() -> tuple[int, int, int]:
        stats = broker.stats()
        return stats["leases_num"], stats["leases_ended_commit"], stats["pool_available"]

    wait_until(lambda: figures() == (3, 3, 2), what="three leases committed, both connections back")


def test_a_result_over_its_limit_is_refused_before_commit(
    start_inproc_broker: Callable[..., InProcessBroker],
    counter: str,
    admin: pg8000.native.Connection,
) -> None:
    broker = start_inproc_broker(max_result_rows=3)
    stream = Stream(broker)
    stream.begin()
    stream.execute(f"INSERT INTO {counter} VALUES (2, 2)")
    error = failure(lambda: stream.execute("SELECT generate_series(1, 10)"))
    assert error.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    info = status_of(error)
    assert (info.reason, info.metadata["limit"]) == ("LIMIT_EXCEEDED", "PGBROKER_MAX_RESULT_ROWS")
    assert "rolled back" in (error.details() or "")
    assert admin.run(f"SELECT count(*) FROM {counter}") == [[1]]


def test_the_mapped_role_holds_for_the_whole_transaction(
    start_inproc_broker: Callable[..., InProcessBroker], admin: pg8000.native.Connection, table: str
) -> None:
    role = f"r_{table}"
    admin.run(f"CREATE ROLE {role}")
    try:
        broker = start_inproc_broker(role_map=f"anonymous={role}")
        stream = Stream(broker)
        stream.begin()
        assert values(stream.execute("SELECT current_user")) == [[(role,)]]
        assert values(stream.execute("SELECT current_user")) == [[(role,)]]
        error = failure(lambda: stream.execute(f"SET LOCAL ROLE {role}"))
        assert status_of(error).reason == "SESSION_STATE"
        wait_until(lambda: broker.stats()["leases_active"] == 0, what="the lease to end")
    finally:
        admin.run(f"DROP ROLE IF EXISTS {role}")


def test_a_keyed_commit_under_a_mapped_role_commits_once(
    start_inproc_broker: Callable[..., InProcessBroker], admin: pg8000.native.Connection, table: str
) -> None:
    """The mapped role may not see the key store: the claim runs as the login role (prepared
    at BEGIN), and the application's retry with the same key is answered as replayed."""
    role = f"r_{table}"
    admin.run(f"CREATE TABLE {table} (id int)")
    admin.run(f"CREATE ROLE {role}")
    admin.run(f"GRANT INSERT, SELECT ON {table} TO {role}")
    key = f"mapped-{table}"
    try:
        broker = start_inproc_broker(role_map=f"anonymous={role}")
        for attempt in range(2):
            stream = Stream(broker)
            stream.begin()
            stream.execute(f"INSERT INTO {table} VALUES ({attempt})")
            ended = stream.step(commit=pb.TransactRequest.Commit(idempotency_key=key)).ended
            assert ended.committed and ended.replayed is (attempt == 1)
            stream.close()
        assert admin.run(f"SELECT id FROM {table}") == [[0]]
        wait_until(lambda: broker.stats()["leases_active"] == 0, what="the leases to end")
    finally:
        admin.run(f"DROP TABLE IF EXISTS {table}")
        admin.run(f"DROP ROLE IF EXISTS {role}")


def test_session_state_left_by_a_do_block_never_reaches_the_next_lease(
    start_inproc_broker: Callable[..., InProcessBroker],
) -> None:
    broker = start_inproc_broker(pool_size=1)  # every lease gets the same connection
    stream = Stream(broker)
    stream.begin()
    pid = values(stream.execute("SELECT pg_backend_pid()"))[0][0][0]
    stream.execute("DO $$ BEGIN PERFORM set_config('search_path', 'leaked', false); END $$")
    assert stream.commit().committed
    after = Stream(broker)
    after.begin()
    path, new_pid = values(
        after.execute("SELECT current_setting('search_path')", "SELECT pg_backend_pid()")
    )
    # Reset behind COMMIT in the same round trip (RESET ALL), so the connection is kept.
    assert path == [('"$user", public',)] and new_pid[0][0] == pid
    after.rollback()
