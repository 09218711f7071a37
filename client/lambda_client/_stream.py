"""Streamed rows: `RowStream` (``db.stream``, ``tx.stream``) and `AsyncRowStream`.

::

    with db.stream("SELECT id, body FROM events WHERE day = $1", [day], context=context) as rows:
        for id, body in rows:
            handle(id, body)

The broker sends the rows in chunks of about 1 MiB (or *chunk_rows* rows) and sends the next
chunk only as this side takes the previous one (HTTP/2 flow control), so memory stays bounded
by a few chunks on both sides whatever the result's size, and no result limit applies.
Rows are decoded one chunk at a time, as the iteration reaches them.

``db.stream`` (``Broker.Stream``) reads through a server-side cursor in a READ ONLY
transaction on a pooled connection held only while the stream is read. Leaving the ``with``
block or calling `RowStream.close` before the end cancels the call: the broker closes the
cursor and frees the connection at once. A reader that stops reading for the broker's
``PGBROKER_IDLE_TRANSACTION_TIMEOUT`` (10 s by default) is cut off (`DeadlineExceeded`,
reason ``IDLE_TRANSACTION_TIMEOUT``). The call's deadline (*timeout*, the Lambda context)
bounds the whole read. Only opening the stream is retried (while nothing ran).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from typing import Any

from lambda_client import errors
from lambda_client._grpc import grpc
from lambda_client._proto.pgbroker.v1 import broker_pb2 as pb
from lambda_client._requests import _statement
from lambda_client.codec import decode_row

__all__ = ["AsyncRowStream", "RowStream", "open_async_stream", "open_stream", "stream_request"]


def stream_request(
    sql: str,
    params: Sequence[Any] | None,
    chunk_rows: int | None,
    read_only: bool = False,
    after_lsn: int = 0,
) -> pb.StreamRequest:
    """The ``Stream`` request (*read_only*: it may run on a read replica; *after_lsn*: the
    read-your-writes position); `TypeError`/`ValueError` for a bad argument (nothing sent)."""
    if not isinstance(read_only, bool):
        raise TypeError(f"read_only must be True or False, not {read_only!r}")
    return pb.StreamRequest(
        statement=_statement(sql, params),
        chunk_rows=_chunk_rows(chunk_rows),
        read_only=read_only,
        after_lsn=after_lsn,
    )


def _chunk_rows(chunk_rows: int | None) -> int:
    if chunk_rows is None:
        return 0
    if isinstance(chunk_rows, bool) or not isinstance(chunk_rows, int) or chunk_rows < 1:
        raise ValueError(f"chunk_rows must be a positive int or None, not {chunk_rows!r}")
    if chunk_rows > 1_000_000:
        raise ValueError("chunk_rows must be at most 1000000")
    return chunk_rows


def open_stream(request: pb.StreamRequest) -> Callable[..., RowStream]:
    """One attempt at opening a ``Stream`` (for the client's retry loop): the call and its first
    chunk, which arrives once the broker holds a connection and the cursor is open;
    `grpc.RpcError` when it was refused (nothing was read yet)."""

    def invoke(stub: Any, timeout: float, metadata: Sequence[tuple[str, str]]) -> RowStream:
        call = stub.Stream(request, timeout=timeout, metadata=metadata, wait_for_ready=True)
        try:
            first = next(call)
        except StopIteration:
            first = pb.RowChunk()
        except BaseException:
            call.cancel()
            raise
        return CallRowStream(call, first)

    return invoke


def open_async_stream(request: pb.StreamRequest) -> Callable[..., Any]:
    """`open_stream` for a ``grpc.aio`` stub: the attempt is a coroutine."""

    async def invoke(
        stub: Any, timeout: float, metadata: Sequence[tuple[str, str]]
    ) -> AsyncRowStream:
        call = stub.Stream(request, timeout=timeout, metadata=metadata, wait_for_ready=True)
        try:
            first = await call.read()
        except BaseException:
            call.cancel()
            raise
        return AsyncCallRowStream(call, pb.RowChunk() if first is grpc.aio.EOF else first)

    return invoke


class _RowStreamBase:
    """The columns of a stream and what is left of its current chunk."""

    def __init__(self, first: pb.RowChunk) -> None:
        self.columns: tuple[str, ...] = tuple(c.name for c in first.columns)
        self.type_oids: tuple[int, ...] = tuple(c.type_oid for c in first.columns)
        self.rows_read = 0
        self.closed = False
        self._pending: Iterator[pb.Row] | None = iter(first.rows)

    def _take(self) -> tuple[Any, ...] | None:
        """The next row of the current chunk, None when it is used up."""
        if self._pending is None:
            return None
        row = next(self._pending, None)
        if row is None:
            self._pending = None
            return None
        self.rows_read += 1
        return decode_row(row.values)

    def __repr__(self) -> str:
        state = "closed" if self.closed else "open"
        return f"<{type(self).__name__} {state}, {self.rows_read} rows read>"


class RowStream(_RowStreamBase):
    """Rows as tuples, read lazily (`lambda_client._stream`); ``columns`` names them. Iterate
    once; use as a context manager, or `close` it, to stop early. Raise an `errors.Error`
    subclass if the broker or Postgres fails mid-stream (rows read before stay valid)."""

    def __iter__(self) -> Iterator[tuple[Any, ...]]:
        return self

    def __next__(self) -> tuple[Any, ...]:
        while True:
            row = self._take()
            if row is not None:
                return row
            if self.closed:
                raise StopIteration
            chunk = self._next_chunk()
            if chunk is None:
                self.closed = True
                raise StopIteration
            self._pending = iter(chunk.rows)

    def _next_chunk(self) -> pb.RowChunk | None:
        """The next chunk, None at the end; raise the error that ended the stream."""
        raise NotImplementedError

    def close(self) -> None:
        """Stop reading (see the subclass); does nothing once the stream has ended."""
        raise NotImplementedError

    def __enter__(self) -> RowStream:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class CallRowStream(RowStream):
    """The rows of one ``Broker.Stream`` call (``db.stream``)."""

    def __init__(self, call: Any, first: pb.RowChunk) -> None:
        super().__init__(first)
        self._call = call

    def _next_chunk(self) -> pb.RowChunk | None:
        try:
            chunk: pb.RowChunk = next(self._call)
        except StopIteration:
            return None
        except grpc.RpcError as exc:
            self.closed = True
            raise errors.from_rpc_error(exc) from exc
        return chunk

    def close(self) -> None:
        """Cancel the call: the broker closes the cursor and frees the connection at once."""
        if not self.closed:
            self.closed = True
            self._pending = None
            self._call.cancel()

    def __del__(self) -> None:
        # Abandoned mid-stream: cancel, so the broker frees its connection now.
        with contextlib.suppress(Exception):
            self.close()


class AsyncRowStream(_RowStreamBase):
    """`RowStream` for asyncio: ``async for row in rows`` / ``async with``."""

    def __aiter__(self) -> AsyncIterator[tuple[Any, ...]]:
        return self

    async def __anext__(self) -> tuple[Any, ...]:
        while True:
            row = self._take()
            if row is not None:
                return row
            if self.closed:
                raise StopAsyncIteration
            chunk = await self._next_chunk()
            if chunk is None:
                self.closed = True
                raise StopAsyncIteration
            self._pending = iter(chunk.rows)

    async def _next_chunk(self) -> pb.RowChunk | None:
        raise NotImplementedError

    async def aclose(self) -> None:
        """Stop reading (see the subclass); does nothing once the stream has ended."""
        raise NotImplementedError

    async def __aenter__(self) -> AsyncRowStream:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()


class AsyncCallRowStream(AsyncRowStream):
    """The rows of one ``Broker.Stream`` call on a ``grpc.aio`` stub."""

    def __init__(self, call: Any, first: pb.RowChunk) -> None:
        super().__init__(first)
        self._call = call

    async def _next_chunk(self) -> pb.RowChunk | None:
        try:
            chunk = await self._call.read()
        except grpc.RpcError as exc:
            self.closed = True
            raise errors.from_rpc_error(exc) from exc
        return None if chunk is grpc.aio.EOF else chunk  # type: ignore[no-any-return]

    async def aclose(self) -> None:
        """As `CallRowStream.close`."""
        if not self.closed:
            self.closed = True
            self._pending = None
            self._call.cancel()
