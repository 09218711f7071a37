"""Streamed results: rows read through a server-side cursor, in chunks sized in bytes (no gRPC).

pg8000 reads a whole result into memory, so a large result is read in slices instead:
``DECLARE pgbroker_cursor NO SCROLL CURSOR FOR <query>`` (prepared, parameters bound as for any
statement), then ``FETCH FORWARD n`` until it returns fewer than *n* rows. *n* adapts so that one
FETCH brings about `CHUNK_BYTES` of encoded rows (`Fetcher`: 16 rows first, then at most four
times the previous count), and a FETCH that brought more is
split into chunks of about that size, so every chunk stays far below gRPC's message limit
whatever the rows' width. A row larger than a chunk travels alone.

Memory is bounded by the chunk window, not by the result: the flow keeps at most one FETCH
ahead of the chunk being written (`prefetched`), and the front writes a chunk only once gRPC
has taken the previous one (HTTP/2 flow control: a reader that does not read stops the
writes). So the broker holds about two FETCHes of rows, whatever the result size.

`stream_rows` is the flow of ``Broker.Stream``, outside a transaction: queue for a connection
as a batch does, ``BEGIN READ ONLY`` (with the batch's ``SET LOCAL`` statement_timeout,
application_name and role), the cursor, FETCH after FETCH, ``COMMIT`` with the session reset
and probe behind it in the same round trip, as behind a batch's (broker/postgres/audit.py;
after a failure the session is audited instead). The connection is held only while the stream
is read; statement_timeout bounds each FETCH, the caller's deadline the
whole stream (a cancel request is sent when it passes or the caller goes away), and the
connection is returned only when idle and clean, as after a batch.

`broker.flow.lease.Lease.stream` uses the same worker functions inside an interactive
transaction.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from broker.configvalues import MIB
from broker.flow.batch import (
    Batch,
    StatementFailed,
    TransactionLost,
    begin_sql,
    rollback,
    statement_timeout_ms,
)
from broker.flow.cancel import Attempt, close_reason, send_cancel, settle
from broker.pooling.pool import Pool
from broker.postgres.audit import RESET_SQL, mark_leaks
from broker.postgres.params import Bound
from broker.postgres.pg import ConnectionLost, PgConnection, PgError, Phase, TransactionStatus
from broker.sql.plan import StatementPlan
from lambda_client._proto.pgbroker.v1 import broker_pb2 as pb

__all__ = [
    "CHUNK_BYTES",
    "CURSOR",
    "Fetcher",
    "StreamStats",
    "close_cursor",
    "declare",
    "prefetched",
    "stream_rows",
    "tidy",
]

# Encoded rows per chunk: far below gRPC's 4 MiB default message limit (and the client's).
CHUNK_BYTES = MIB
CURSOR = "pgbroker_cursor"
# Rows of the first FETCH, before a row's size is known (16 rows of 1 MiB are still only
# 16 MiB); each later FETCH is sized from the rows of the one before, asks for at most RAMP
# times its rows and never more than MAX_FETCH. pg8000 holds a FETCH's rows in memory: a
# result whose rows suddenly grow much wider can still make one FETCH large (chunk_rows, or
# narrower rows, bound it then).
FIRST_FETCH = 16
RAMP = 4
MAX_FETCH = 100_000

_T = TypeVar("_T")


class StreamStats:
    """GetStats figures of streamed results: ``streams_num`` (streams started, either RPC),
    ``streams_rows`` and ``streams_bytes`` (rows and encoded bytes sent), counters since
    start."""

    def __init__(self) -> None:
        self.counters = {"streams_num": 0, "streams_rows": 0, "streams_bytes": 0}

    def sent(self, chunk: pb.RowChunk) -> None:
        self.counters["streams_rows"] += len(chunk.rows)
        self.counters["streams_bytes"] += chunk.ByteSize()

    def as_dict(self) -> dict[str, int]:
        return dict(self.counters)


@dataclass
class Fetcher:
    """How many rows the next FETCH asks for: *chunk_rows* when the caller fixed it, else
    sized from the previous FETCH's rows to bring about `CHUNK_BYTES`."""

    chunk_rows: int = 0
    count: int = 0
    rows: int = 0
    columns_sent: bool = False
    done: bool = False
    _bytes: int = field(default=0, repr=False)  # of the last FETCH that brought rows
    _last_rows: int = field(default=0, repr=False)

    def next_count(self) -> int:
        if self.chunk_rows:
            return self.chunk_rows
        if not self.rows:
            return FIRST_FETCH
        per_row = max(1, self._bytes // max(1, self._last_rows))
        ramp = max(1, self.count * RAMP)
        self.count = max(1, min(MAX_FETCH, ramp, CHUNK_BYTES // per_row))
        return self.count

    def fetch(self, conn: PgConnection) -> tuple[list[pb.RowChunk], bool]:
        """One FETCH (blocking; worker thread), as chunks of about `CHUNK_BYTES` each (the
        first chunk of the stream carries the columns), and whether it was the last. Raise
        `StatementFailed` or `TransactionLost`."""
        count = self.count = self.next_count()
        try:
            columns, chunks, fetched = conn.fetch(CURSOR, count, CHUNK_BYTES)
        except PgError as exc:
            raise StatementFailed(exc, 0) from exc
        except ConnectionLost as exc:
            raise TransactionLost(exc, nothing_committed=True) from exc
        self.done = fetched < count
        self.rows += fetched
        if fetched:
            self._last_rows = fetched
            self._bytes = sum(chunk.ByteSize() for chunk in chunks)
        if not self.columns_sent:
            if not chunks:
                chunks = [pb.RowChunk()]
            chunks[0].columns.extend(columns)
            self.columns_sent = True
        return chunks, self.done


def declare(
    conn: PgConnection,
    statement: pb.Statement,
    plan: StatementPlan,
    bound: Bound,
    before: str | None,
) -> None:
    """*before* (BEGIN …, SET LOCAL …) and ``DECLARE`` of the cursor for *statement*, in one
    flush (blocking; worker thread). Raise `StatementFailed` (index 0 for the statement, -1
    for *before*) or `TransactionLost` (nothing committed: no COMMIT is sent here)."""
    sql = f"DECLARE {CURSOR} NO SCROLL CURSOR FOR {statement.sql}"
    try:
        conn.run_many([(sql, statement.params)], before=before, bound=[bound], plans=[plan])
    except PgError as exc:
        raise StatementFailed(exc, exc.index if exc.phase is Phase.STATEMENT else -1) from exc
    except ConnectionLost as exc:
        raise TransactionLost(exc, nothing_committed=True) from exc


def commit(conn: PgConnection, reset: bool, audit: bool) -> None:
    """``COMMIT`` the read-only transaction (blocking; worker thread); with *reset*, the
    session reset and probe behind it in the same round trip (broker/postgres/audit.py), else
    with *audit* an audit query after it. A session left changed marks *conn* dirty (replaced
    on release). Raise `StatementFailed` or `TransactionLost` (nothing to commit: read only)."""
    try:
        rows = conn.execute_simple("COMMIT; " + RESET_SQL if reset else "COMMIT")
    except PgError as exc:
        raise StatementFailed(exc, -1) from exc
    except ConnectionLost as exc:
        raise TransactionLost(exc, nothing_committed=True) from exc
    mark_leaks(conn, rows if reset else None, audit)


def tidy(conn: PgConnection, audit: bool) -> None:
    """ROLLBACK what is left open; with *audit*, audit the session (session advisory locks
    survive a rollback, and no probe ran behind a COMMIT)."""
    rollback(conn)
    mark_leaks(conn, None, audit)


def close_cursor(conn: PgConnection, sql: str) -> None:
    """``CLOSE`` the cursor, or ``COMMIT`` the read-only transaction around it (blocking)."""
    try:
        conn.execute_simple(sql)
    except PgError as exc:
        raise StatementFailed(exc, -1) from exc
    except ConnectionLost as exc:
        raise TransactionLost(exc, nothing_committed=True) from exc


async def stream_rows(
    pool: Pool,
    options: Batch,
    statement: pb.Statement,
    plan: StatementPlan,
    bound: Bound,
    deadline: float | None,
    statement_timeout: float,
    chunk_rows: int = 0,
) -> AsyncGenerator[pb.RowChunk, None]:
    """The chunks of *statement*'s rows (*chunk_rows* rows per FETCH, 0: sized in bytes),
    read in a READ ONLY transaction on a pooled connection (*options* give its
    application_name and role; see the module docstring).

    Raise the pool's errors or `DeadlineBeforeStart` (nothing ran), `StatementFailed`,
    `TransactionLost`; closing the iterator early (the caller went away) cancels the running
    FETCH, rolls back and returns the connection clean (or replaces it).
    """
    conn = await pool.getconn(deadline, key=options.queue_key)
    attempt = Attempt(conn)
    error: BaseException | None = None
    watchdog = None
    if deadline is not None:
        loop = asyncio.get_running_loop()
        watchdog = loop.call_at(deadline, send_cancel, pool, attempt, "deadline passed")
    try:
        timeout_ms = statement_timeout_ms(deadline, statement_timeout)
        begin = begin_sql(_read_only(options), timeout_ms)
        run = _runner(pool, attempt)
        await run(declare, statement, plan, bound, begin)
        # aclosing: a reader gone mid-stream cancels the FETCH running ahead at once.
        async with contextlib.aclosing(prefetched(run, Fetcher(chunk_rows=chunk_rows))) as chunks:
            async for chunk in chunks:
                yield chunk
        await run(commit, options.reset_session, options.audit_session)
    except BaseException as exc:
        error = exc
        raise
    finally:
        if watchdog is not None:
            watchdog.cancel()
        # The probe behind COMMIT did not run: audit instead when a check was asked for.
        audit = error is not None and (options.reset_session or options.audit_session)
        await _release(pool, attempt, error, audit)


async def prefetched(
    run: Callable[..., Any], fetcher: Fetcher
) -> AsyncGenerator[pb.RowChunk, None]:
    """The fetcher's chunks, the next FETCH running on the worker while these are written."""
    pending = asyncio.ensure_future(run(fetcher.fetch))
    try:
        while True:
            # The FETCH's own verdict on the end: fetcher.done may already be the next one's.
            chunks, done = await pending
            if not done:
                pending = asyncio.ensure_future(run(fetcher.fetch))
            for chunk in chunks:
                yield chunk
            if done:
                return
    finally:
        if not pending.done():
            pending.cancel()
            with contextlib.suppress(BaseException):
                await pending


def _runner(pool: Pool, attempt: Attempt) -> Callable[..., Any]:
    """Run ``fn(conn, *args)`` on a worker; when the awaiting task is cancelled, send a cancel
    request and wait for the worker, so the connection's state is known."""

    async def run(fn: Callable[..., _T], *args: Any) -> _T:
        work = pool.run_in_worker(fn, attempt.conn.pg, *args)
        attempt.work = work
        try:
            return await asyncio.shield(work)
        except asyncio.CancelledError:
            send_cancel(pool, attempt, "caller went away")
            await settle(work)
            raise

    return run


async def _release(pool: Pool, attempt: Attempt, error: BaseException | None, audit: bool) -> None:
    """Roll back what is open (with *audit*, audit the session) and return the connection
    (or replace it), whatever happened; not interrupted by a cancellation of the calling
    task."""

    async def release() -> None:
        reason: str | None = None
        try:
            if attempt.work is not None and not attempt.work.done():
                await settle(attempt.work)
            if attempt.cancel_tasks:
                await asyncio.gather(*attempt.cancel_tasks, return_exceptions=True)
            pg = attempt.conn.pg
            if not pg.closed and (pg.transaction_status is not TransactionStatus.IDLE or audit):
                await pool.run_in_worker(tidy, pg, audit)
        except Exception as exc:  # a worker pool shut down under us
            reason = f"release failed ({type(exc).__name__})"
        pool.putconn(attempt.conn, reason or close_reason(attempt.conn, attempt, error))

    task = asyncio.ensure_future(release())
    _releasing.add(task)
    task.add_done_callback(_releasing.discard)
    await asyncio.shield(task)


# Releases still running after their caller went away: kept so they are not collected.
_releasing: set[asyncio.Task[None]] = set()


def _read_only(options: Batch) -> Batch:
    return Batch(
        statements=(),
        plan=options.plan,
        read_only=True,
        application_name=options.application_name,
        role=options.role,
    )
