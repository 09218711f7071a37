"""`lambda_client.aio.AsyncBrokerClient` against a real broker: the same calls, errors and
deadlines as the blocking client, one channel per event loop."""

from __future__ import annotations

import asyncio
import gc
import weakref

import pytest

from devtools.brokerproc import BrokerProcess
from devtools.lambda_context import FakeLambdaContext
from devtools.localpg import free_port
from lambda_client import DeadlineExceeded, ProgrammingError, Unavailable
from lambda_client.aio import AsyncBrokerClient


def test_async_calls_return_results_and_share_one_channel(broker: BrokerProcess) -> None:
    db = AsyncBrokerClient(broker.target)

    async def invocation() -> list[int]:
        context = FakeLambdaContext(remaining=10)
        values = await asyncio.gather(
            *(db.query("SELECT $1::int", [n], context=context) for n in range(20))
        )
        first, second = await db.transaction(["SELECT 1", ("SELECT $1::text", ["x"])])
        assert (first.scalar(), second.scalar()) == (1, "x")
        return [v.scalar() for v in values]

    async def both() -> None:
        assert await invocation() == list(range(20))
        assert await invocation() == list(range(20))
        await db.close()

    asyncio.run(both())
    assert db.channels_created == 1


def test_a_new_event_loop_gets_a_new_channel(broker: BrokerProcess) -> None:
    db = AsyncBrokerClient(broker.target)
    for n in range(3):  # a handler that calls asyncio.run per invocation
        assert asyncio.run(db.query("SELECT $1::int", [n])).scalar() == n
    assert db.channels_created == 3


def test_async_errors_and_deadlines_match_the_blocking_client(broker: BrokerProcess) -> None:
    db = AsyncBrokerClient(broker.target)

    async def run() -> None:
        with pytest.raises(ProgrammingError) as info:
            await db.transaction(["SELECT 1", "SELECT * FROM no_such_table"])
        assert info.value.sqlstate == "42P01" and info.value.statement_index == 1
        with pytest.raises(DeadlineExceeded):
            await db.query("SELECT pg_sleep(5)", context=FakeLambdaContext(remaining=1.0))
        assert (await db.query("SELECT 'still fine'")).scalar() == "still fine"
        await db.close()

    asyncio.run(run())


def test_async_unreachable_broker_raises_unavailable_at_the_deadline() -> None:
    db = AsyncBrokerClient(f"127.0.0.1:{free_port()}", timeout=0.5)
    with pytest.raises(Unavailable, match=r"not reachable .* nothing was sent") as info:
        asyncio.run(db.query("SELECT 1"))
    assert info.value.reason == "BROKER_UNREACHABLE"


def test_async_bad_arguments_raise_before_anything_is_sent(broker: BrokerProcess) -> None:
    db = AsyncBrokerClient(broker.target)
    with pytest.raises(TypeError, match="statements must be a list"):
        asyncio.run(db.transaction("SELECT 1"))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="param_sets must be a list"):
        asyncio.run(db.execute_many("SELECT $1", None))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="timeout must be a finite number"):
        asyncio.run(db.query("SELECT 1", timeout=float("inf")))
    assert db.channels_created == 0


class _Statements(list):  # type: ignore[type-arg]
    """A list a weak reference can watch."""


def test_a_call_in_flight_keeps_neither_its_statements_nor_its_params(
    broker: BrokerProcess,
) -> None:
    """The request holds what is sent; the caller's lists are let go before the await, so
    calls in flight do not keep them for the garbage collector to traverse again and again."""
    db = AsyncBrokerClient(broker.target)

    async def in_flight() -> None:
        await db.query("SELECT 1")  # the channel is open
        statements = _Statements([("SELECT $1::int FROM pg_sleep(0.3)", [7]), "SELECT 2"])
        params = _Statements([5])
        watched = [weakref.ref(statements), weakref.ref(params)]
        batch = asyncio.ensure_future(db.transaction(statements))
        single = asyncio.ensure_future(db.query("SELECT $1::int FROM pg_sleep(0.3)", params))
        del statements, params
        await asyncio.sleep(0.1)  # both calls are in flight now
        assert not batch.done() and not single.done()
        gc.collect()
        assert [ref() for ref in watched] == [None, None]
        first, second = await batch
        assert first.rows == [(7,)] and second.scalar() == 2
        assert (await single).rows == [(5,)]
        await db.close()

    asyncio.run(in_flight())
