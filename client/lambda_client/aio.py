"""`AsyncBrokerClient`: the same calls as `BrokerClient`, for asyncio code (``grpc.aio``).

::

    from lambda_client.aio import AsyncBrokerClient

    db = AsyncBrokerClient()

    async def work(context):
        return (await db.query("SELECT now()", context=context)).scalar()

Deadlines, retries, metadata and errors are exactly those of `BrokerClient`: both follow
`lambda_client._policy`; this class awaits its steps. A ``grpc.aio`` channel belongs to one
event loop, so the client opens its channel in the loop of its first call and opens a new one
if it is later used from another loop (a handler that runs ``asyncio.run`` per invocation).
For plain Lambda handlers, which are synchronous, use `BrokerClient`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

from lambda_client import _position
from lambda_client._base import ClientBase
from lambda_client._grpc import grpc
from lambda_client._policy import Call, Link, resume
from lambda_client._requests import LambdaContext, Statement
from lambda_client._result import Result
from lambda_client._stream import AsyncRowStream, open_async_stream, stream_request
from lambda_client.transaction import (
    AsyncTransaction,
    open_async_transaction,
    run_async_transaction,
)

__all__ = ["AsyncBrokerClient"]

T = TypeVar("T")


class AsyncBrokerClient(ClientBase):
    """A ``grpc.aio`` client; arguments as for `BrokerClient`. Use it from one event loop at a
    time (it follows the loop of the latest call)."""

    _sleep = staticmethod(asyncio.sleep)
    _aio = True

    def __init__(self, target: str | None = None, **kwargs: Any) -> None:
        super().__init__(target, **kwargs)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closing: set[asyncio.Task[None]] = set()

    async def query(
        self,
        sql: str,
        params: Sequence[Any] | None = None,
        *,
        context: LambdaContext | None = None,
        timeout: float | None = None,
        idempotency_key: str | None = None,
        read_only: bool = False,
    ) -> Result:
        """As `BrokerClient.query`."""
        call = self._query(sql, params, idempotency_key, read_only)
        del params  # not kept alive while the call is in flight (see `transaction`)
        return await self._run(call, context, timeout)

    async def transaction(
        self,
        statements: Sequence[Statement],
        *,
        isolation: str | None = None,
        read_only: bool = False,
        deferrable: bool = False,
        context: LambdaContext | None = None,
        timeout: float | None = None,
        retry_serialization: bool = False,
        idempotency_key: str | None = None,
    ) -> list[Result]:
        """As `BrokerClient.transaction`."""
        call = self._transaction(
            statements, isolation, read_only, deferrable, retry_serialization, idempotency_key
        )
        # The request holds what is sent: the caller's statements (a list, a tuple and a
        # parameter list per statement) need not stay alive while the call is in flight,
        # where every collection of the cyclic garbage collector would traverse them
        # (docs/performance.md, "the client's objects in flight").
        del statements
        return await self._run(call, context, timeout)

    async def execute_many(
        self,
        sql: str,
        param_sets: Sequence[Sequence[Any]],
        *,
        context: LambdaContext | None = None,
        timeout: float | None = None,
        retry_serialization: bool = False,
        idempotency_key: str | None = None,
    ) -> list[Result]:
        """As `BrokerClient.execute_many`."""
        call = self._execute_many(sql, param_sets, retry_serialization, idempotency_key)
        del param_sets  # not kept alive while the call is in flight (see `transaction`)
        return await self._run(call, context, timeout)

    async def begin(
        self,
        *,
        isolation: str | None = None,
        read_only: bool = False,
        deferrable: bool = False,
        context: LambdaContext | None = None,
        timeout: float | None = None,
        idempotency_key: str | None = None,
    ) -> AsyncTransaction:
        """As `BrokerClient.begin`: ``async with await db.begin(...) as tx:``."""
        invoke = open_async_transaction(
            isolation, read_only, deferrable, Result.from_proto, self.target
        )
        transaction: AsyncTransaction = await self._run(Call(invoke, lambda t: t), context, timeout)
        transaction.idempotency_key = idempotency_key
        return transaction

    async def run_transaction(
        self,
        fn: Callable[[AsyncTransaction], Awaitable[T]],
        *,
        isolation: str | None = None,
        read_only: bool = False,
        deferrable: bool = False,
        context: LambdaContext | None = None,
        timeout: float | None = None,
    ) -> T:
        """As `BrokerClient.run_transaction`, awaiting ``fn(tx)``."""
        return await run_async_transaction(
            lambda left: self.begin(
                isolation=isolation,
                read_only=read_only,
                deferrable=deferrable,
                context=context,
                timeout=left,
            ),
            fn,
            deadline=self.policy.deadline(context, timeout),
            max_attempts=self.policy.max_attempts,
            initial_backoff=self.policy.initial_backoff,
            max_backoff=self.policy.max_backoff,
        )

    async def stream(
        self,
        sql: str,
        params: Sequence[Any] | None = None,
        *,
        context: LambdaContext | None = None,
        timeout: float | None = None,
        chunk_rows: int | None = None,
        read_only: bool = False,
    ) -> AsyncRowStream:
        """As `BrokerClient.stream`: ``async with await db.stream(...) as rows:`` then
        ``async for row in rows``."""
        invoke = open_async_stream(
            stream_request(sql, params, chunk_rows, read_only, _position.latest(self.target))
        )
        rows: AsyncRowStream = await self._run(Call(invoke, lambda r: r), context, timeout)
        return rows

    async def stats(self, *, timeout: float | None = None) -> dict[str, int]:
        """As `BrokerClient.stats`."""
        return await self._run(self._stats(), None, timeout)

    async def close(self) -> None:
        """Close the channel; the next call opens a new one."""
        channel, self._channel, self._link, self._loop = self._channel, None, None, None
        if channel is not None:
            await channel.close()

    async def __aenter__(self) -> AsyncBrokerClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def _run(self, call: Call[T], context: LambdaContext | None, timeout: float | None) -> T:
        """The plan of *call* (`BrokerClient`'s), each step awaited."""
        plan = self._plan(call, context, timeout)
        finished, step = resume(plan, None, False)
        while not finished:
            try:  # inline, not a helper coroutine: nothing more alive while the step is
                outcome, failed = await step(), False
            except grpc.RpcError as exc:
                outcome, failed = exc, True
            finished, step = resume(plan, outcome, failed)
        return step  # type: ignore[no-any-return]

    def _get_link(self) -> Link:
        """The stub on this loop's channel, created on first use, in a new loop, or after a
        long idle. Runs on the event loop, so no lock is needed."""
        loop = asyncio.get_running_loop()
        if self._loop is not loop or self._stale():
            old_loop, self._loop = self._loop, loop
            old = self._replace_channel()
            if old is not None and old_loop is loop:
                closing = loop.create_task(old.close())
                self._closing.add(closing)  # keep a reference until it is done
                closing.add_done_callback(self._closing.discard)
        assert self._link is not None
        return self._link
