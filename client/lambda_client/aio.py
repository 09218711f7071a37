"""`AsyncBrokerClient`: the same calls as `BrokerClient`, for asyncio code (``grpc.aio``).

::

    from lambda_client.aio import AsyncBrokerClient

    db = AsyncBrokerClient()

    async def work(context):
        return (await db.query("SELECT now()", context=context)).scalar()

Deadlines, retries, metadata and errors are exactly those of `BrokerClient` (the policy is
shared). A ``grpc.aio`` channel belongs to one event loop, so the client opens its channel in
the loop of its first call and opens a new one if it is later used from another loop (a
handler that runs ``asyncio.run`` per invocation). For plain Lambda handlers, which are
synchronous, use `BrokerClient`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import grpc

from lambda_client._requests import (
    Statement,
    many_statements,
    query_request,
    transaction_request,
)
from lambda_client.client import (
    Invoke,
    LambdaContext,
    Link,
    Result,
    _ClientBase,
    execute_call,
    results_of,
    stats_call,
    time_left,
)
from lambda_client.transaction import (
    AsyncTransaction,
    open_async_transaction,
    run_async_transaction,
)

__all__ = ["AsyncBrokerClient"]

T = TypeVar("T")


class AsyncBrokerClient(_ClientBase):
    """A ``grpc.aio`` client; arguments as for `BrokerClient`. Use it from one event loop at a
    time (it follows the loop of the latest call)."""

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
    ) -> Result:
        """As `BrokerClient.query`."""
        invoke = execute_call(query_request(sql, params))
        response = await self._call_with_retries(invoke, context, timeout, retry_aborted=False)
        return results_of(response)[0]

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
    ) -> list[Result]:
        """As `BrokerClient.transaction`."""
        request = transaction_request(statements, isolation, read_only, deferrable)
        if not request.statements:
            return []
        response = await self._call_with_retries(
            execute_call(request), context, timeout, retry_aborted=retry_serialization
        )
        return results_of(response)

    async def execute_many(
        self,
        sql: str,
        param_sets: Sequence[Sequence[Any]],
        *,
        context: LambdaContext | None = None,
        timeout: float | None = None,
        retry_serialization: bool = False,
    ) -> list[Result]:
        """As `BrokerClient.execute_many`."""
        return await self.transaction(
            many_statements(sql, param_sets),
            context=context,
            timeout=timeout,
            retry_serialization=retry_serialization,
        )

    async def begin(
        self,
        *,
        isolation: str | None = None,
        read_only: bool = False,
        deferrable: bool = False,
        context: LambdaContext | None = None,
        timeout: float | None = None,
    ) -> AsyncTransaction:
        """As `BrokerClient.begin`: ``async with await db.begin(...) as tx:``."""
        invoke = open_async_transaction(isolation, read_only, deferrable, Result.from_proto)
        transaction: AsyncTransaction = await self._call_with_retries(
            invoke, context, timeout, retry_aborted=False
        )
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
            deadline=self._deadline(context, timeout),
            max_attempts=self.max_attempts,
            initial_backoff=self.initial_backoff,
            max_backoff=self.max_backoff,
        )

    async def stats(self, *, timeout: float | None = None) -> dict[str, int]:
        """As `BrokerClient.stats`."""
        response = await self._call_with_retries(stats_call, None, timeout, retry_aborted=False)
        return dict(response.stats)

    async def close(self) -> None:
        """Close the channel; the next call opens a new one."""
        channel, self._channel, self._link, self._loop = self._channel, None, None, None
        if channel is not None:
            await channel.close()

    async def __aenter__(self) -> AsyncBrokerClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    def __repr__(self) -> str:
        return f"AsyncBrokerClient(target={self.target!r}, tls={self.tls})"

    async def _call_with_retries(
        self,
        invoke: Invoke,
        context: LambdaContext | None,
        timeout: float | None,
        *,
        retry_aborted: bool,
    ) -> Any:
        """As `BrokerClient._call_with_retries`, awaiting the call and `asyncio.sleep`."""
        started = time.monotonic()
        deadline = self._deadline(context, timeout)
        for attempt in range(1, self.max_attempts + 1):
            link = self._get_link()
            metadata = self._metadata(context)
            if not link.reached:
                await self._reach(link, time_left(deadline, attempt), started)
            try:
                # Measured after the channel, credentials and check: the call must not outlive it.
                response = await invoke(link.stub, time_left(deadline, attempt), metadata)
            except grpc.RpcError as exc:
                link.call_failed(exc)
                await asyncio.sleep(self._backoff_or_raise(exc, attempt, deadline, retry_aborted))
            else:
                link.reached = True
                return response
            finally:
                self._mark_used()
        raise AssertionError("unreachable: _backoff_or_raise raises after the last attempt")

    async def _reach(self, link: Link, timeout: float, started: float) -> None:
        """As `BrokerClient._reach`."""
        try:
            await link.health_check(b"", timeout=timeout, wait_for_ready=True)
        except grpc.RpcError as exc:
            link.check_failed(exc, self.target, started)
        else:
            link.reached = True

    def _get_link(self) -> Link:
        """The stub on this loop's channel, created on first use, in a new loop, or after a
        long idle. Runs on the event loop, so no lock is needed."""
        loop = asyncio.get_running_loop()
        if self._link is None or self._loop is not loop or self._idle_too_long():
            old, old_loop = self._channel, self._loop
            self._channel = self._new_channel()
            self._link = Link(self._channel)
            self._loop = loop
            self._mark_used()
            self.channels_created += 1
            if old is not None and old_loop is loop:
                closing = loop.create_task(old.close())
                self._closing.add(closing)  # keep a reference until it is done
                closing.add_done_callback(self._closing.discard)
        return self._link

    def _new_channel(self) -> grpc.aio.Channel:
        options, credentials = self._channel_args()
        if credentials is None:
            return grpc.aio.insecure_channel(self.target, options=options)
        return grpc.aio.secure_channel(self.target, credentials, options=options)
