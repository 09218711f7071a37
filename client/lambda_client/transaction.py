"""Interactive transactions: read, decide in Python, write, in one transaction.

::

    with db.begin(context=context) as tx:
        (stock,) = tx.query("SELECT stock FROM items WHERE id = $1 FOR UPDATE", [item]).one()
        if stock < wanted:
            raise OutOfStock(item)           # rolled back
        tx.execute("UPDATE items SET stock = stock - $1 WHERE id = $2", [wanted, item])
    # committed here

`BrokerClient.begin` opens one ``Transact`` stream: the broker leases one pooled connection
to it until COMMIT or ROLLBACK (as PgBouncer does in transaction mode). Each `query` /
`execute` is one round trip; `pipeline` sends several statements in one. The connection is
held across the handler's think time, so keep transactions short; a batch
(`BrokerClient.transaction`) holds it only while Postgres works.

* Leaving the ``with`` block normally commits; an exception rolls back and propagates.
  `commit` and `rollback` end the transaction explicitly (then the ``with`` exit does
  nothing).
* A Postgres error raises its `DatabaseError` subclass (`SerializationFailure`,
  `IntegrityError`, …) and leaves the transaction aborted, as in Postgres: later statements
  raise with SQLSTATE 25P02 until it is rolled back, or rolled back to a savepoint
  (`savepoint`). A COMMIT of an aborted transaction raises (25P02): nothing committed.
* The deadline (the Lambda context's remaining time minus the margin, capped by *timeout*) is
  the stream's, and bounds the whole transaction. The broker also ends a transaction idle for
  ``PGBROKER_IDLE_TRANSACTION_TIMEOUT`` (10 s by default) or older than
  ``PGBROKER_TRANSACTION_TIMEOUT``; the next call then raises `DeadlineExceeded` whose
  ``reason`` names the bound. Either way the transaction was rolled back.
* `lambda_client.aio.AsyncBrokerClient.begin` returns an `AsyncTransaction`: the same methods
  as coroutines (``async with await db.begin() as tx:``).
* Only ``begin`` is retried (queue full, broker unreachable: nothing ran yet). The client
  cannot replay the Python decisions between statements, so a serialization failure is
  retried only by `run_transaction`, which re-runs a whole function.
"""

from __future__ import annotations

import contextlib
import queue
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar

from lambda_client import _position, errors
from lambda_client._grpc import grpc
from lambda_client._policy import _uniform
from lambda_client._proto.pgbroker.v1 import broker_pb2 as pb
from lambda_client._requests import Statement, _options, _split, _statement
from lambda_client._slots import DEFAULT_MAX_OPEN_TRANSACTIONS, TransactionSlots
from lambda_client._stream import AsyncRowStream, RowStream, _chunk_rows

if TYPE_CHECKING:
    from lambda_client.client import Result

__all__ = [
    "DEFAULT_MAX_OPEN_TRANSACTIONS",
    "AsyncTransaction",
    "Transaction",
    "TransactionSlots",
    "open_async_transaction",
    "open_transaction",
    "run_async_transaction",
    "run_transaction",
]

T = TypeVar("T")
# The trailing metadata carrying ``ended`` (a serialized ``TransactEnded``) when the commit or
# rollback asked for it (``ended_in_trailer``): one message less each way. A broker that
# predates it answers with an ``ended`` message, read as before.
ENDED_KEY = "pgbroker-ended-bin"
# One Transact attempt: (stub, seconds left, metadata) -> Transaction (`open_transaction`).
Decode = Callable[[pb.StatementResult], "Result"]
_SAVEPOINT_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}")


class _Stream:
    """One ``Transact`` call: requests go through a queue gRPC's sender thread drains; each
    `send` waits for its answer. Raises the call's `grpc.RpcError` when it ended. With
    *slots*, the call holds one of them (waited for within *timeout*) until it ends."""

    def __init__(
        self,
        stub: Any,
        timeout: float,
        metadata: Sequence[tuple[str, str]],
        slots: TransactionSlots | None = None,
    ) -> None:
        self._requests: queue.SimpleQueue[pb.TransactRequest | None] = queue.SimpleQueue()
        release = None
        if slots is not None:
            started = time.monotonic()
            release = slots.take(timeout)
            timeout -= time.monotonic() - started
        try:
            self._call = stub.Transact(
                iter(self._requests.get, None),
                timeout=timeout,
                metadata=metadata,
                wait_for_ready=True,
            )
        except BaseException:
            if release is not None:
                release()
            raise
        # However the call ends (commit, error, cancel, deadline, an abandoned transaction
        # collected), gRPC runs its callbacks then; an ended call runs none.
        if release is not None and not self._call.add_callback(release):
            release()

    def send(self, request: pb.TransactRequest) -> pb.TransactResponse:
        self._requests.put(request)
        return self.read()

    def read(self) -> pb.TransactResponse:
        """The next response (a streamed statement's answer is several)."""
        try:
            response: pb.TransactResponse = next(self._call)
        except StopIteration:
            return _ended_in_trailer(self._call.trailing_metadata())
        return response

    def finish(self) -> None:
        """Half-close and read the call's end (after ``ended``, the broker ends it at once)."""
        self._requests.put(None)
        with contextlib.suppress(grpc.RpcError):
            for _ in self._call:
                pass

    def cancel(self) -> None:
        """Half-close and cancel: the broker rolls back whatever is still open."""
        self._requests.put(None)
        self._call.cancel()


def _ended_in_trailer(trailing_metadata: Any) -> pb.TransactResponse:
    """The ``ended`` answer a stream that ended OK carried in its trailing metadata
    (`ENDED_KEY`); raise when it carried none."""
    for key, value in trailing_metadata or ():
        if key == ENDED_KEY and isinstance(value, bytes):
            return pb.TransactResponse(ended=pb.TransactEnded.FromString(value))
    raise errors.BrokerError(
        "the broker ended the transaction without an answer", code=grpc.StatusCode.UNKNOWN
    )


class _AsyncStream:
    """`_Stream` on a ``grpc.aio`` stub: write a request, read its answer."""

    def __init__(self, stub: Any, timeout: float, metadata: Sequence[tuple[str, str]]) -> None:
        self._call = stub.Transact(timeout=timeout, metadata=metadata, wait_for_ready=True)

    async def send(self, request: pb.TransactRequest) -> pb.TransactResponse:
        import asyncio  # loaded already by the asyncio client; the blocking one never needs it

        with contextlib.suppress(asyncio.InvalidStateError):
            # Raised when the broker has ended the call; reading raises its status.
            await self._call.write(request)
        return await self.read()

    async def read(self) -> pb.TransactResponse:
        """As `_Stream.read`."""
        response = await self._call.read()
        if response is grpc.aio.EOF:
            return _ended_in_trailer(await self._call.trailing_metadata())
        return response  # type: ignore[no-any-return]

    async def finish(self) -> None:
        with contextlib.suppress(grpc.RpcError):
            await self._call.done_writing()
            while await self._call.read() is not grpc.aio.EOF:
                pass

    def cancel(self) -> None:
        self._call.cancel()


def open_async_transaction(
    isolation: str | None, read_only: bool, deferrable: bool, decode: Decode, target: str = ""
) -> Any:
    """`open_transaction` for a ``grpc.aio`` stub: the attempt is a coroutine."""
    options = _options(isolation, read_only, deferrable)
    options.after_lsn = _position.latest(target)

    async def invoke(
        stub: Any, timeout: float, metadata: Sequence[tuple[str, str]]
    ) -> AsyncTransaction:
        stream = _AsyncStream(stub, timeout, metadata)
        try:
            await stream.send(pb.TransactRequest(begin=options))
        except BaseException:
            stream.cancel()
            raise
        return AsyncTransaction(stream, decode, target)

    return invoke


def open_transaction(
    isolation: str | None,
    read_only: bool,
    deferrable: bool,
    decode: Decode,
    target: str = "",
    slots: TransactionSlots | None = None,
) -> Any:
    """One attempt at opening a transaction, for the client's retry loop: send ``begin`` and
    wait for the connection; `grpc.RpcError` when it was refused (nothing ran). Raise
    `TypeError`/`ValueError` for bad options (nothing sent). *target* names the broker whose
    read-your-writes position (`lambda_client._position`) it sends and keeps; each attempt's
    stream holds one of *slots* (`TransactionSlots`) while it is open."""
    options = _options(isolation, read_only, deferrable)
    options.after_lsn = _position.latest(target)

    def invoke(stub: Any, timeout: float, metadata: Sequence[tuple[str, str]]) -> Transaction:
        stream = _Stream(stub, timeout, metadata, slots)
        try:
            stream.send(pb.TransactRequest(begin=options))
        except BaseException:
            stream.cancel()
            raise
        return Transaction(stream, decode, target)

    return invoke


class _TransactionBase:
    """State and the decisions of a transaction that involve no I/O, shared by `Transaction`
    and `AsyncTransaction`: the request for some statements, the results (or error) of an
    answer, savepoint names."""

    _stream: _Stream | _AsyncStream

    def __init__(self, decode: Decode, target: str = "") -> None:
        self._decode = decode
        self._target = target  # whose read-your-writes position a COMMIT updates
        self._savepoints = 0
        self._streaming: Any = None  # the stream whose rows are still arriving
        self.closed = False
        self.committed = False
        # Exactly-once COMMIT: the key `commit` sends unless given another (`begin`'s
        # *idempotency_key*), and whether the broker found it committed already (an earlier
        # attempt of this transaction committed; this one was rolled back).
        self.idempotency_key: str | None = None
        self.replayed = False

    def _execute_request(self, statements: Sequence[Statement]) -> pb.TransactRequest | None:
        """The ``execute`` request for *statements*, None for none; `TypeError` /
        `ValueError` for a bad statement or parameter (nothing is sent)."""
        if isinstance(statements, str):
            raise TypeError("statements must be a list of SQL strings or (sql, params) pairs")
        step = pb.TransactRequest.Execute(
            statements=[_statement(*_split(s, i)) for i, s in enumerate(statements)]
        )
        return pb.TransactRequest(execute=step) if step.statements else None

    def _stream_request(
        self, sql: str, params: Sequence[Any] | None, chunk_rows: int | None
    ) -> pb.TransactRequest:
        """The ``stream`` request; `TypeError`/`ValueError` for a bad argument (nothing sent)."""
        step = pb.TransactRequest.Stream(
            statement=_statement(sql, params), chunk_rows=_chunk_rows(chunk_rows)
        )
        return pb.TransactRequest(stream=step)

    def _first_chunk(self, response: pb.TransactResponse) -> pb.RowChunk:
        """The first chunk of a streamed statement; raise its error when it failed at once."""
        if response.WhichOneof("step") == "rows":
            return response.rows
        self._results(response)  # raises the statement's error
        return pb.RowChunk()

    def _results(self, response: pb.TransactResponse) -> list[Result]:
        executed = response.executed
        if executed.HasField("error"):
            raise _database_error(executed)
        return [self._decode(result) for result in executed.results]

    def _savepoint_name(self, name: str | None) -> str:
        if name is None:
            self._savepoints += 1
            name = f"pgbroker_sp_{self._savepoints}"
        elif not _SAVEPOINT_NAME.fullmatch(name):
            raise ValueError(f"savepoint name must be a plain identifier, not {name!r}")
        return f'"{name}"'  # quoted: a keyword ("inner") is a fine name too

    def _check_open(self) -> None:
        if self.closed:
            raise RuntimeError("the transaction has ended (committed, rolled back or failed)")

    def __repr__(self) -> str:
        state = "committed" if self.committed else "closed" if self.closed else "open"
        return f"<{type(self).__name__} {state}>"

    def __del__(self) -> None:
        # Abandoned without commit or rollback: cancel the stream, so the broker rolls back
        # now rather than at its idle timeout.
        with contextlib.suppress(Exception):
            self._close()

    def _close(self) -> None:
        """Mark the transaction ended and cancel its stream (the broker rolls back what is
        still open)."""
        if not self.closed:
            self.closed = True
            self._stream.cancel()


def _commit_request(key: str | None) -> pb.TransactRequest:
    commit = pb.TransactRequest.Commit(idempotency_key=key or "", ended_in_trailer=True)
    return pb.TransactRequest(commit=commit)


_ROLLBACK = pb.TransactRequest(rollback=pb.TransactRequest.Rollback(ended_in_trailer=True))


class Transaction(_TransactionBase):
    """An open interactive transaction on one leased pooled connection (`BrokerClient.begin`).

    Not thread-safe: one transaction belongs to one thread.
    """

    _stream: _Stream

    def __init__(self, stream: _Stream, decode: Decode, target: str = "") -> None:
        super().__init__(decode, target)
        self._stream = stream

    def query(self, sql: str, params: Sequence[Any] | None = None) -> Result:
        """Run one statement in the transaction and return its `Result`.

        Raise `TypeError` for a parameter with no Postgres mapping (nothing sent), a
        `DatabaseError` subclass for a Postgres error (the transaction is then aborted), or
        another `BrokerError` when the transaction ended (rolled back)."""
        return self.pipeline([(sql, params)])[0]

    execute = query  # the same call; `execute` reads better for writes

    def execute_many(self, sql: str, param_sets: Sequence[Sequence[Any]]) -> list[Result]:
        """Run *sql* once per parameter set, pipelined in one round trip."""
        return self.pipeline([(sql, params) for params in param_sets])

    def pipeline(self, statements: Sequence[Statement]) -> list[Result]:
        """Run *statements* (``sql`` or ``(sql, params)``) in order in one round trip; one
        `Result` each. A failure raises for the first failing statement (its
        ``statement_index``); none of their results are returned then."""
        request = self._execute_request(statements)
        return [] if request is None else self._results(self._send(request))

    def stream(
        self, sql: str, params: Sequence[Any] | None = None, *, chunk_rows: int | None = None
    ) -> RowStream:
        """Run one query in the transaction and return its rows lazily, in chunks of about
        1 MiB (or *chunk_rows* rows), through a server-side cursor; no result limit applies
        (`lambda_client._stream`). Stopping early (``with`` exit, `RowStream.close`, or the
        next call on the transaction) reads and discards the rest, so the transaction goes
        on: bound a large read with ``LIMIT`` if it may stop early. A Postgres error raises as
        in `query` and aborts the transaction."""
        request = self._stream_request(sql, params, chunk_rows)
        rows = _TxRowStream(self, self._first_chunk(self._send(request)))
        if not rows.closed:
            self._streaming = rows
        return rows

    @contextlib.contextmanager
    def savepoint(self, name: str | None = None) -> Iterator[Transaction]:
        """A nested transaction: ``SAVEPOINT`` on entry, ``RELEASE`` on normal exit; on an
        exception ``ROLLBACK TO SAVEPOINT`` (the outer work stays) and the exception
        propagates. *name* must be a plain identifier; by default one is made up."""
        name = self._savepoint_name(name)
        self.execute(f"SAVEPOINT {name}")
        try:
            yield self
        except BaseException:
            if not self.closed:
                self.pipeline([f"ROLLBACK TO SAVEPOINT {name}", f"RELEASE SAVEPOINT {name}"])
            raise
        self.execute(f"RELEASE SAVEPOINT {name}")

    def commit(self, idempotency_key: str | None = None) -> None:
        """COMMIT. Raise a `DatabaseError` if it failed (serialization failure, deferred
        constraint, an earlier error: 25P02) or `OutcomeUnknown` if the connection (or the
        broker) broke during it; after any error nothing is committed unless the error says
        it may be. With *idempotency_key* (default: `begin`'s), the key commits with the
        transaction: re-running the whole transaction after `OutcomeUnknown` with the same key
        commits at most once (`replayed` is then True: the earlier attempt stands)."""
        key = idempotency_key or self.idempotency_key
        ended = self._end(_commit_request(key)).ended
        _position.seen(self._target, ended.commit_lsn)
        self.replayed = ended.replayed
        self.committed = True

    def rollback(self) -> None:
        """ROLLBACK; does nothing if the transaction has already ended."""
        if not self.closed:
            self._end(_ROLLBACK)

    def __enter__(self) -> Transaction:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self.closed:
            return
        if exc is None:
            self.commit()
            return
        with contextlib.suppress(errors.BrokerError):
            self.rollback()  # the original exception matters more than a failed rollback
        self._close()

    def _end(self, request: pb.TransactRequest) -> pb.TransactResponse:
        response = self._send(request)  # an error closes the transaction
        self.closed = True
        self._stream.finish()
        return response

    def _send(self, request: pb.TransactRequest) -> pb.TransactResponse:
        self._check_open()
        if self._streaming is not None:
            self._streaming.close()  # its rows come first: read and drop them
        return self._read(lambda: self._stream.send(request), request)

    def _read(
        self,
        read: Callable[[], pb.TransactResponse] | None = None,
        request: pb.TransactRequest | None = None,
    ) -> pb.TransactResponse:
        """The next response (*read*, or the next one on the stream: a streamed chunk); an
        error closes the transaction and is raised as `_error` says for *request*."""
        try:
            return (read or self._stream.read)()
        except grpc.RpcError as exc:
            self._close()  # the broker rolled back and ended the stream
            raise _error(exc, request) from exc
        except BaseException:
            self._close()
            raise


class AsyncTransaction(_TransactionBase):
    """`Transaction` for asyncio (`lambda_client.aio.AsyncBrokerClient.begin`): the same
    methods as coroutines, ``async with`` for the transaction and its savepoints."""

    _stream: _AsyncStream

    def __init__(self, stream: _AsyncStream, decode: Decode, target: str = "") -> None:
        super().__init__(decode, target)
        self._stream = stream

    async def query(self, sql: str, params: Sequence[Any] | None = None) -> Result:
        """As `Transaction.query`."""
        return (await self.pipeline([(sql, params)]))[0]

    execute = query

    async def execute_many(self, sql: str, param_sets: Sequence[Sequence[Any]]) -> list[Result]:
        """As `Transaction.execute_many`."""
        return await self.pipeline([(sql, params) for params in param_sets])

    async def pipeline(self, statements: Sequence[Statement]) -> list[Result]:
        """As `Transaction.pipeline`."""
        request = self._execute_request(statements)
        return [] if request is None else self._results(await self._send(request))

    async def stream(
        self, sql: str, params: Sequence[Any] | None = None, *, chunk_rows: int | None = None
    ) -> AsyncRowStream:
        """As `Transaction.stream`: ``async with await tx.stream(...) as rows:``."""
        request = self._stream_request(sql, params, chunk_rows)
        rows = _AsyncTxRowStream(self, self._first_chunk(await self._send(request)))
        if not rows.closed:
            self._streaming = rows
        return rows

    @contextlib.asynccontextmanager
    async def savepoint(self, name: str | None = None) -> AsyncIterator[AsyncTransaction]:
        """As `Transaction.savepoint`."""
        name = self._savepoint_name(name)
        await self.execute(f"SAVEPOINT {name}")
        try:
            yield self
        except BaseException:
            if not self.closed:
                await self.pipeline([f"ROLLBACK TO SAVEPOINT {name}", f"RELEASE SAVEPOINT {name}"])
            raise
        await self.execute(f"RELEASE SAVEPOINT {name}")

    async def commit(self, idempotency_key: str | None = None) -> None:
        """As `Transaction.commit`."""
        key = idempotency_key or self.idempotency_key
        ended = (await self._end(_commit_request(key))).ended
        _position.seen(self._target, ended.commit_lsn)
        self.replayed = ended.replayed
        self.committed = True

    async def rollback(self) -> None:
        """As `Transaction.rollback`."""
        if not self.closed:
            await self._end(_ROLLBACK)

    async def __aenter__(self) -> AsyncTransaction:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self.closed:
            return
        if exc is None:
            await self.commit()
            return
        with contextlib.suppress(errors.BrokerError):
            await self.rollback()
        self._close()

    async def _end(self, request: pb.TransactRequest) -> pb.TransactResponse:
        response = await self._send(request)
        self.closed = True
        await self._stream.finish()
        return response

    async def _send(self, request: pb.TransactRequest) -> pb.TransactResponse:
        self._check_open()
        if self._streaming is not None:
            await self._streaming.aclose()  # its rows come first: read and drop them
        return await self._read(self._stream.send(request), request)

    async def _read(
        self,
        read: Awaitable[pb.TransactResponse] | None = None,
        request: pb.TransactRequest | None = None,
    ) -> pb.TransactResponse:
        """As `Transaction._read`."""
        try:
            return await (read if read is not None else self._stream.read())
        except grpc.RpcError as exc:
            self._close()
            raise _error(exc, request) from exc
        except BaseException:
            self._close()
            raise


def _error(exc: grpc.RpcError, request: pb.TransactRequest | None) -> errors.Error:
    """The error for a failed step (*request*; None while reading a stream's rows); a COMMIT
    whose outcome is unknown (the broker's UNKNOWN, or a transport failure after it was sent)
    is `OutcomeUnknown`, never `Unavailable`."""
    error = errors.from_rpc_error(exc)
    if request is None or request.WhichOneof("step") != "commit":
        return error
    if not errors.outcome_unknown(exc, error):
        return error
    key = request.commit.idempotency_key
    advice = (
        f"re-running the transaction with idempotency key {key!r} commits it at most once"
        if key
        else "COMMIT had no idempotency key, so re-running it may commit it twice"
    )
    return errors.OutcomeUnknown(
        f"COMMIT may or may not have taken effect ({error.details}); {advice}",
        code=error.code,
        reason=error.reason,
        metadata=error.metadata,
    )


class _TxRowStream(RowStream):
    """The rows of `Transaction.stream`: ``rows`` responses up to the ``executed`` that ends
    the statement."""

    def __init__(self, tx: Transaction, first: pb.RowChunk) -> None:
        super().__init__(first)
        self._tx = tx

    def _next_chunk(self) -> pb.RowChunk | None:
        response = self._tx._read()
        if response.WhichOneof("step") == "rows":
            return response.rows
        self.closed = True
        self._tx._streaming = None
        self._tx._results(response)  # raises the statement's error
        return None

    def close(self) -> None:
        """Read and drop the rows still coming, so the transaction can go on."""
        self._pending = None
        while not self.closed and not self._tx.closed:
            self._next_chunk()
        self.closed = True
        self._tx._streaming = None


class _AsyncTxRowStream(AsyncRowStream):
    """`_TxRowStream` for `AsyncTransaction.stream`."""

    def __init__(self, tx: AsyncTransaction, first: pb.RowChunk) -> None:
        super().__init__(first)
        self._tx = tx

    async def _next_chunk(self) -> pb.RowChunk | None:
        response = await self._tx._read()
        if response.WhichOneof("step") == "rows":
            return response.rows
        self.closed = True
        self._tx._streaming = None
        self._tx._results(response)
        return None

    async def aclose(self) -> None:
        """As `_TxRowStream.close`."""
        self._pending = None
        while not self.closed and not self._tx.closed:
            await self._next_chunk()
        self.closed = True
        self._tx._streaming = None


def _database_error(executed: pb.TransactExecuted) -> errors.BrokerError:
    """The error for a statement Postgres refused inside the transaction, classed as the same
    failure of an ``Execute`` would be."""
    error = executed.error
    code = _STATUS_CODES.get(executed.error_code)
    cls = errors.error_class(code.name if code is not None else "", error.sqlstate)
    return cls(
        error.message,
        code=code,
        sqlstate=error.sqlstate or None,
        statement_index=error.statement_index,
        detail=error.detail or None,
        hint=error.hint or None,
    )


_STATUS_CODES = {code.value[0]: code for code in grpc.StatusCode}


def run_transaction(
    begin: Callable[[float], Transaction],
    fn: Callable[[Transaction], T],
    *,
    deadline: float,
    max_attempts: int,
    initial_backoff: float,
    max_backoff: float,
) -> T:
    """Call ``fn(tx)`` in a transaction opened by ``begin(seconds_left)`` and commit; re-run it
    all in a new transaction when Postgres rolled it back for a serialization failure or a
    deadlock (40001, 40P01), at most *max_attempts* times and within *deadline* (monotonic),
    with jittered exponential backoff. Any other error propagates at once."""
    for attempt in range(1, max_attempts + 1):
        try:
            with begin(deadline - time.monotonic()) as tx:
                return fn(tx)
        except errors.TransactionRollback:
            delay = _retry_delay(attempt, deadline, max_attempts, initial_backoff, max_backoff)
            if delay is None:
                raise
            time.sleep(delay)
    raise AssertionError("unreachable: the last attempt returns or raises")


async def run_async_transaction(
    begin: Callable[[float], Awaitable[AsyncTransaction]],
    fn: Callable[[AsyncTransaction], Awaitable[T]],
    *,
    deadline: float,
    max_attempts: int,
    initial_backoff: float,
    max_backoff: float,
) -> T:
    """`run_transaction` for asyncio: awaits ``fn(tx)`` and the backoff."""
    import asyncio  # loaded already by the asyncio client; the blocking one never needs it

    for attempt in range(1, max_attempts + 1):
        try:
            async with await begin(deadline - time.monotonic()) as tx:
                return await fn(tx)
        except errors.TransactionRollback:
            delay = _retry_delay(attempt, deadline, max_attempts, initial_backoff, max_backoff)
            if delay is None:
                raise
            await asyncio.sleep(delay)
    raise AssertionError("unreachable: the last attempt returns or raises")


def _retry_delay(
    attempt: int, deadline: float, max_attempts: int, initial_backoff: float, max_backoff: float
) -> float | None:
    """Seconds to wait before re-running a rolled-back transaction, None to give up: jittered
    exponential backoff, never past *deadline*."""
    backoff = min(max_backoff, initial_backoff * 2 ** (attempt - 1))
    delay = _uniform(backoff / 2, backoff)
    if attempt == max_attempts or time.monotonic() + delay >= deadline:
        return None
    return delay
