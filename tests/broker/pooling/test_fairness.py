"""Fair queuing by caller (issue 15, item 8): one function's backlog delays another's request by
about one pool turn, weights shift the share, FIFO holds within one caller, stats stay exact.

The pool is driven directly (real Postgres connections) for the large floods and exact orders;
then a real broker with a pool of 2 is flooded by one Lambda function (``x-lambda-function-name``)
through gRPC.
"""

from __future__ import annotations

import asyncio
import queue
import uuid
from collections.abc import Iterator
from typing import Any

import grpc
import pg8000.native
import pytest

from broker.config import parse_database_url
from broker.pooling.pool import Pool, QueueTimeout, ServerConnection
from broker.postgres.pg import connect
from broker.security.limits import QueueWeights, caller_key
from lambda_client._proto.pgbroker.v1 import broker_pb2 as pb
from lambda_client._status import FUNCTION_NAME_KEY
from tests.support import request, rows, status_of, wait_until

LOCK_KEY = 4343


def _pool(postgres: Any, size: int, weights: str = "", **kw: Any) -> Pool:
    target = parse_database_url(postgres.dsn + "?sslmode=disable")
    return Pool(
        lambda: connect(target, timeout=5, statement_timeout=30),
        size=size,
        max_waiting=kw.get("max_waiting", 5000),
        queue_timeout=kw.get("queue_timeout", 60),
        max_lifetime=3600,
        weights=QueueWeights.parse(weights),
    )


async def _serve_in_order(
    pool: Pool, held: list[ServerConnection], waiters: list[tuple[str, asyncio.Task[Any]]]
) -> list[str]:
    """Release the held connections and serve every waiter one turn at a time (each returns
    its connection at once); the caller keys in the order they got a connection."""
    order: list[str] = []
    pending = {task: key for key, task in waiters}
    for conn in held:
        pool.putconn(conn)
    while pending:
        done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
        # Within one loop step several tasks may complete: the pool handed them out in
        # task-creation order of wake-ups, so order them by when they were handed a connection.
        for task in sorted(done, key=lambda t: t.result()[1]):
            order.append(pending.pop(task))
            pool.putconn(task.result()[0])
    return order


def _getconn(pool: Pool, key: str | None, clock: list[int]) -> asyncio.Task[Any]:
    async def one() -> tuple[ServerConnection, int]:
        conn = await pool.getconn(None, key=key)
        clock[0] += 1
        return conn, clock[0]

    return asyncio.get_running_loop().create_task(one())


async def _queue(
    pool: Pool, keys: list[str | None], clock: list[int]
) -> list[tuple[str, asyncio.Task[Any]]]:
    waiters = []
    for key in keys:
        waiters.append((str(key), _getconn(pool, key, clock)))
        await asyncio.sleep(0)  # each enqueues in turn: the order they arrived is known
    return waiters


def test_a_flood_of_2000_delays_another_function_by_one_turn(postgres: Any) -> None:
    async def scenario() -> tuple[list[str], dict[str, int]]:
        pool = _pool(postgres, size=2)
        await pool.open()
        try:
            held = [await pool.getconn(), await pool.getconn()]
            clock = [0]
            flood = await _queue(pool, [caller_key(None, "fn-a")] * 2000, clock)
            late = await _queue(pool, [caller_key(None, "fn-b")], clock)
            stats = pool.get_stats()
            order = await _serve_in_order(pool, held, flood + late)
            return order, stats
        finally:
            await pool.close()

    order, stats = asyncio.run(scenario())
    assert stats["requests_waiting"] == 2001
    assert stats["requests_waiting_callers"] == 2
    # B arrived behind 2000 of A's: plain FIFO would serve it last. Here at most one A
    # request (one per other waiting caller) goes first.
    assert order.index("|fn-b") <= 1, order[:5]
    assert len(order) == 2001


def test_weights_shift_the_share_and_fifo_holds_within_a_caller(postgres: Any) -> None:
    async def scenario() -> list[str]:
        pool = _pool(postgres, size=1, weights="fn-a=3")
        await pool.open()
        try:
            held = [await pool.getconn()]
            clock = [0]
            keys = [f"|fn-a#{i}" for i in range(60)] + [f"|fn-b#{i}" for i in range(60)]
            waiters = []
            for label in keys:
                key = label.split("#")[0]
                waiters.append((label, _getconn(pool, key, clock)))
                await asyncio.sleep(0)
            return await _serve_in_order(pool, held, waiters)
        finally:
            await pool.close()

    order = asyncio.run(scenario())
    first = order[:40]
    share_a = sum(label.startswith("|fn-a") for label in first)
    assert 29 <= share_a <= 31, first  # weight 3 against 1: three quarters of the turns
    # Strict FIFO within each caller, whatever the interleaving.
    for fn in ("fn-a", "fn-b"):
        mine = [int(label.split("#")[1]) for label in order if label.startswith(f"|{fn}")]
        assert mine == sorted(mine) == list(range(60))


def test_one_caller_alone_is_served_in_plain_fifo_order(postgres: Any) -> None:
    async def scenario() -> list[str]:
        pool = _pool(postgres, size=1)
        await pool.open()
        try:
            held = [await pool.getconn()]
            clock = [0]
            waiters = []
            for i in range(50):
                waiters.append((str(i), _getconn(pool, None, clock)))
                await asyncio.sleep(0)
            return await _serve_in_order(pool, held, waiters)
        finally:
            await pool.close()

    assert asyncio.run(scenario()) == [str(i) for i in range(50)]


def test_waiters_that_gave_up_are_skipped_and_stats_stay_exact(postgres: Any) -> None:
    async def scenario() -> None:
        pool = _pool(postgres, size=1, queue_timeout=0.2)
        await pool.open()
        try:
            held = await pool.getconn()
            clock = [0]
            doomed = await _queue(pool, ["|fn-a"] * 300 + ["|fn-b"] * 300, clock)
            assert pool.get_stats()["requests_waiting"] == 600
            for _, task in doomed:
                with pytest.raises(QueueTimeout):
                    await task
            stats = pool.get_stats()
            assert stats["requests_waiting"] == 0
            assert stats["requests_waiting_callers"] == 0
            assert stats["requests_timeouts"] == 600
            # Cancelled waiters leave the count at once too.
            pool.queue_timeout = 60
            cancelled = await _queue(pool, ["|fn-a"] * 10, clock)
            survivor = _getconn(pool, "|fn-b", clock)
            await asyncio.sleep(0)
            assert pool.get_stats()["requests_waiting"] == 11
            for _, task in cancelled:
                task.cancel()
            await asyncio.sleep(0)
            assert pool.get_stats()["requests_waiting"] == 1
            pool.putconn(held)  # the dead entries are skipped: the survivor gets it
            conn, _ = await asyncio.wait_for(survivor, 5)
            assert pool.get_stats()["requests_waiting"] == 0
            pool.putconn(conn)
        finally:
            await pool.close()

    asyncio.run(scenario())


def test_queue_weights_are_parsed_or_refused_in_one_line() -> None:
    weights = QueueWeights.parse("fn-a=2, report-*=0.5")
    assert weights.weight_for("|fn-a") == 2
    assert weights.weight_for("arn:aws:sts::1:assumed-role/r/s|report-daily") == 0.5
    assert weights.weight_for("|other") == 1
    assert weights.weight_for(None) == 1
    by_caller = QueueWeights.parse('{"token:batch": 4}')
    assert by_caller.weight_for("token:batch|fn-x") == 4
    for bad in ("fn-a", "fn-a=0", "fn-a=-1", "fn-a=lots", '{"fn-a": 1e9}', "{bad json"):
        with pytest.raises(ValueError, match="PGBROKER_QUEUE_WEIGHTS"):
            QueueWeights.parse(bad)


# -- through a real broker --------------------------------------------------------------------


@pytest.fixture
def sequence(admin: pg8000.native.Connection) -> Iterator[str]:
    name = "fair_" + uuid.uuid4().hex[:8]
    admin.run(f"CREATE SEQUENCE {name}")
    yield name
    admin.run(f"DROP SEQUENCE {name}")


def _send(broker: Any, sql: str, function: str) -> Any:
    return broker.stub().Execute.future(
        request(sql), timeout=60, metadata=((FUNCTION_NAME_KEY, function),)
    )


def test_broker_serves_another_function_within_one_turn_of_a_200_flood(
    start_inproc_broker: Any, admin: pg8000.native.Connection, sequence: str
) -> None:
    # One connection, so the order in which the pool hands it out is the order of the
    # numbers taken: with two, a request handed out first could still take its number after
    # the other connection's next one (its backend scheduled later), which blurred B's turn.
    broker = start_inproc_broker(pool_size=1)
    # Every request waits on the test's advisory lock, then takes a number.
    sql = f"SELECT pg_advisory_xact_lock_shared({LOCK_KEY}), nextval('{sequence}')"
    for _ in range(2):  # prepared (a text's second run), so no request costs a round trip more
        broker.execute(request(sql))
    admin.run(f"ALTER SEQUENCE {sequence} RESTART")
    admin.run("SELECT pg_advisory_lock(:k)", k=LOCK_KEY)
    try:
        flood = [_send(broker, sql, "fn-a") for _ in range(200)]
        wait_until(lambda: broker.stats()["requests_waiting"] == 199, what="A's flood to queue")
        late = _send(broker, sql, "fn-b")
        wait_until(lambda: broker.stats()["requests_waiting"] == 200, what="B to queue")
        assert broker.stats()["requests_waiting_callers"] == 2
    finally:
        admin.run("SELECT pg_advisory_unlock_all()")
    turn_b = rows(late.result().results[0])[0][1]
    turns_a = sorted(rows(f.result().results[0])[0][1] for f in flood)
    assert len(turns_a) == 200
    # One of A's was running, then at most one queued A (one per other waiting caller)
    # before B. FIFO would give B turn 201.
    assert turn_b <= 1 + 2, turn_b
    assert turns_a[-1] == 201


def test_inflight_cap_counts_per_function(
    start_inproc_broker: Any, admin: pg8000.native.Connection
) -> None:
    broker = start_inproc_broker(pool_size=2, max_inflight_per_caller=3)
    sql = f"SELECT pg_advisory_xact_lock_shared({LOCK_KEY})"
    admin.run("SELECT pg_advisory_lock(:k)", k=LOCK_KEY)
    try:
        held = [_send(broker, sql, "fn-a") for _ in range(3)]  # 2 running, 1 queued
        wait_until(lambda: broker.stats()["requests_waiting"] == 1, what="A's third to queue")
        with pytest.raises(grpc.RpcError) as refused:
            broker.stub().Execute(
                request("SELECT 1"), timeout=10, metadata=((FUNCTION_NAME_KEY, "fn-a"),)
            )
        assert refused.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert status_of(refused.value).metadata["limit"] == "PGBROKER_MAX_INFLIGHT_PER_CALLER"
        # Same (anonymous) identity, another function: its own count, so it queues and runs.
        other = _send(broker, "SELECT 1", "fn-b")
        wait_until(lambda: broker.stats()["requests_waiting"] == 2, what="B to queue")
    finally:
        admin.run("SELECT pg_advisory_unlock_all()")
    assert rows(other.result().results[0]) == [(1,)]
    for future in held:
        future.result()


def test_transact_lease_queues_fairly_behind_another_functions_flood(
    start_inproc_broker: Any, admin: pg8000.native.Connection, sequence: str
) -> None:
    broker = start_inproc_broker(pool_size=2)
    # Each of A's requests holds its connection 50 ms once the lock is free, so a few
    # milliseconds between B's BEGIN and its first statement let at most one more A in.
    sql = f"SELECT pg_advisory_xact_lock_shared({LOCK_KEY}), nextval('{sequence}'), pg_sleep(0.05)"
    requests: queue.SimpleQueue[pb.TransactRequest | None] = queue.SimpleQueue()
    stream = broker.stub().Transact(
        iter(requests.get, None), timeout=60, metadata=((FUNCTION_NAME_KEY, "fn-b"),)
    )
    admin.run("SELECT pg_advisory_lock(:k)", k=LOCK_KEY)
    try:
        flood = [_send(broker, sql, "fn-a") for _ in range(50)]
        wait_until(lambda: broker.stats()["requests_waiting"] == 48, what="A's flood to queue")
        requests.put(pb.TransactRequest(begin=pb.TransactionOptions()))
        wait_until(lambda: broker.stats()["requests_waiting"] == 49, what="B's BEGIN to queue")
    finally:
        admin.run("SELECT pg_advisory_unlock_all()")
    assert next(stream).WhichOneof("step") == "begun"
    step = pb.TransactRequest.Execute()
    step.statements.add(sql=f"SELECT nextval('{sequence}')")
    requests.put(pb.TransactRequest(execute=step))
    turn_b = rows(next(stream).executed.results[0])[0][0]
    requests.put(pb.TransactRequest(commit=pb.TransactRequest.Commit()))
    next(stream)
    requests.put(None)
    for future in flood:
        future.result()
    # FIFO would lease B's connection after all 50 of A's (turn 51).
    assert turn_b <= 2 + 2 + 1, turn_b


def test_broker_weights_shift_the_share_and_keep_fifo_within_a_function(
    start_inproc_broker: Any, admin: pg8000.native.Connection, sequence: str
) -> None:
    broker = start_inproc_broker(pool_size=1, queue_weights="fn-a=3")
    sql = f"SELECT pg_advisory_xact_lock_shared({LOCK_KEY}), nextval('{sequence}')"
    admin.run("SELECT pg_advisory_lock(:k)", k=LOCK_KEY)
    sent: list[tuple[str, Any]] = []
    try:
        sent.append(("hold", _send(broker, sql, "fn-hold")))
        wait_until(lambda: broker.stats()["pool_active"] == 1, what="the connection taken")
        # One at a time, so the order each function's requests queued in is known.
        for i in range(80):
            function = "fn-a" if i % 2 == 0 else "fn-b"
            sent.append((function, _send(broker, sql, function)))
            wait_until(lambda i=i: broker.stats()["requests_waiting"] == i + 1)
    finally:
        admin.run("SELECT pg_advisory_unlock_all()")
    turns = [(rows(f.result().results[0])[0][1], function) for function, f in sent]
    queued = sorted(turn for turn in turns if turn[1] != "hold")
    first_40 = [function for _, function in queued[:40]]
    assert 29 <= first_40.count("fn-a") <= 31, first_40  # weight 3 to 1: three turns in four
    for function in ("fn-a", "fn-b"):
        mine = [turn for turn, f in turns if f == function]  # in the order they queued
        assert mine == sorted(mine), (function, mine)
