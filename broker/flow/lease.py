"""A pooled connection leased to one interactive transaction (``Broker.Transact``); no gRPC.

A lease is taken exactly as a batch takes its connection (`Pool.getconn`: fair queuing by
caller key, FIFO within one, ``max_waiting``, ``queue_timeout``, the caller's deadline;
checked again before BEGIN). BEGIN carries the
batch's options (isolation, read only, deferrable, ``SET LOCAL`` statement_timeout,
application_name and the mapped role: `broker.flow.batch`), as statements the connection
prepares once (`batch.begin_calls`), and so are COMMIT/ROLLBACK and the session reset + probe
behind them (`_end`, prepared at BEGIN). Each `Lease.execute` then runs its
statements pipelined on a worker thread (`PgConnection.run_many`), so between steps the lease
holds the connection, never a thread.

Bounds (PgBouncer's words), each naming itself in the error the caller gets:

* the caller's deadline (the stream's gRPC deadline);
* ``idle_transaction_timeout``: the longest wait for the caller's next step (`Lease.next_bound`
  tells the front how long it may wait);
* ``transaction_timeout``: the longest a lease may last, counted from BEGIN.

A statement is cut by Postgres itself (``SET LOCAL statement_timeout`` to what is left of the
deadline and the transaction timeout, at most ``PGBROKER_STATEMENT_TIMEOUT``), and a cancel
request is sent when a bound passes or the caller goes away while it runs.

`Lease.release` ends every lease, whatever happened: it waits for running work and cancel
requests, rolls back unless committed, audits the session when a statement asked for it, and
returns the connection only when idle and clean (else the pool replaces it). It never raises
and a cancelled caller cannot interrupt it.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import statistics
import time
from collections import deque
from collections.abc import AsyncGenerator, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from broker.errors import BrokerFailure, Code, Reason
from broker.flow.batch import (
    MAX_ATTEMPTS,
    Batch,
    DeadlineBeforeStart,
    StatementFailed,
    TransactionLost,
    begin_calls,
    rollback,
    statement_timeout_ms,
)
from broker.flow.cancel import Attempt, close_reason, send_cancel, settle
from broker.flow.stream import CURSOR, Fetcher, close_cursor, declare, prefetched, tidy
from broker.pooling.pool import Pool, ServerConnection
from broker.postgres import keys
from broker.postgres.audit import CLEANUP, mark_leaks
from broker.postgres.params import Bound
from broker.postgres.pg import (
    Call,
    ConnectionLost,
    PgConnection,
    PgError,
    Phase,
    Session,
    TransactionStatus,
)
from broker.postgres.replication import POSITION_SQL, wal_position
from broker.security.limits import ResultBudget
from broker.sql.plan import RequestPlan, StatementPlan
from lambda_client._proto.pgbroker.v1 import broker_pb2 as pb

__all__ = [
    "End",
    "Lease",
    "LeaseBounds",
    "LeaseStats",
    "LeaseTimeout",
    "TransactionAborted",
]

log = logging.getLogger("pgbroker.lease")

_T = TypeVar("_T")
# Releases still running after their caller went away: kept so they are not collected.
_releasing: set[asyncio.Task[None]] = set()


class End(enum.Enum):
    """How a lease ended: by the caller's COMMIT or ROLLBACK, or abnormally."""

    COMMIT = "commit"
    ROLLBACK = "rollback"
    DEADLINE = "deadline"  # the caller's deadline passed
    IDLE_TRANSACTION_TIMEOUT = "idle_transaction_timeout"
    TRANSACTION_TIMEOUT = "transaction_timeout"
    CLIENT_GONE = "client_gone"  # the stream broke, was cancelled or closed without an end
    ERROR = "error"  # a refused step, a lost connection, a failed COMMIT

    @property
    def abnormal(self) -> bool:
        return self not in (End.COMMIT, End.ROLLBACK)


class LeaseTimeout(BrokerFailure):
    """A bound of the lease passed (`End.DEADLINE`, `End.IDLE_TRANSACTION_TIMEOUT` or
    `End.TRANSACTION_TIMEOUT`, in ``bound``); the transaction is rolled back."""

    code = Code.DEADLINE_EXCEEDED

    def __init__(self, bound: End, message: str, reason: Reason | None = None) -> None:
        super().__init__(message, reason=reason, metadata={"bound": bound.value})
        self.bound = bound


class TransactionAborted(StatementFailed):
    """COMMIT of a transaction an earlier statement aborted: Postgres would roll it back and
    answer ``ROLLBACK``; the caller must hear that nothing committed (25P02)."""

    def __init__(self) -> None:
        error = PgError(
            "25P02",
            "current transaction is aborted (a statement failed); it was rolled back instead"
            " of committed",
        )
        super().__init__(error, -1)


@dataclass(frozen=True)
class LeaseBounds:
    """Seconds; ``deadline`` is the caller's (monotonic, None for none); 0 turns a timeout
    off."""

    deadline: float | None
    idle_timeout: float
    transaction_timeout: float
    statement_timeout: float


class LeaseStats:
    """GetStats figures of the leases (``leases_*``): ``leases_active`` and
    ``leases_p50_ms`` (the median hold time of the last `RECENT` leases) computed on read,
    counters since start."""

    RECENT = 1000

    def __init__(self) -> None:
        self.active = 0
        self.counters: dict[str, int] = dict.fromkeys(_COUNTERS, 0)
        self.recent_ms: deque[int] = deque(maxlen=self.RECENT)

    def opened(self) -> None:
        self.active += 1
        self.counters["leases_num"] += 1

    def ended(self, end: End, held_ms: int) -> None:
        self.active -= 1
        self.counters["leases_ms"] += held_ms
        self.counters["leases_max_ms"] = max(self.counters["leases_max_ms"], held_ms)
        self.counters[f"leases_ended_{end.value}"] += 1
        self.recent_ms.append(held_ms)

    def as_dict(self) -> dict[str, int]:
        p50 = int(statistics.median_low(self.recent_ms)) if self.recent_ms else 0
        return {"leases_active": self.active, "leases_p50_ms": p50, **self.counters}


_COUNTERS = ("leases_num", "leases_ms", "leases_max_ms", *(f"leases_ended_{e.value}" for e in End))


class Lease:
    """One pooled connection held for one transaction, from BEGIN to `release`.

    Event-loop confined. Use `Lease.begin`, then `execute` / `commit` / `rollback`, then
    always `release`.
    """

    def __init__(
        self, pool: Pool, conn: ServerConnection, bounds: LeaseBounds, wait_us: int
    ) -> None:
        self.pool = pool
        self.conn = conn
        self.bounds = bounds
        self.wait_us = wait_us
        self.began_at = time.monotonic()
        self.last_active = self.began_at
        self.ends_at = (
            self.began_at + bounds.transaction_timeout if bounds.transaction_timeout else None
        )
        # The earliest of the deadline and the transaction timeout: fixed from BEGIN, and
        # asked for several times a step (`next_bound`).
        candidates = []
        if bounds.deadline is not None:
            candidates.append((bounds.deadline, End.DEADLINE))
        if self.ends_at is not None:
            candidates.append((self.ends_at, End.TRANSACTION_TIMEOUT))
        self._hard_bound = min(candidates, key=lambda c: c[0]) if candidates else None
        self.audit = False
        self.committed = False
        # Reset the session behind COMMIT/ROLLBACK (broker/postgres/audit.py CLEANUP).
        self.reset_session = True
        # The mapped role (PGBROKER_ROLE_MAP) the transaction runs as: see `commit`.
        self.role: str | None = None
        # A stream's cursor left open by a reader that stopped early (closed before the next).
        self.cursor_open = False
        self._attempt = Attempt(conn)
        # A step was DDL: its COMMIT drops the pool's prepared statements (broker/pooling).
        self.ran_ddl = False
        # Whether the lease's end (`_END_CALLS`) is prepared on the connection: from BEGIN
        # until a DDL step drops every prepared statement.
        self.end_prepared = True
        # Whether a keyed COMMIT under the mapped role finds its claim prepared (at BEGIN, as
        # the login role: `_CLAIM_AHEAD`); dropped with the end by a DDL step.
        self.claim_prepared = False
        # Read-your-writes (broker/flow/routing.py): read the WAL position behind COMMIT.
        self.report_position = False
        self.commit_lsn = 0

    # -- opening -------------------------------------------------------------------------

    @classmethod
    async def begin(
        cls, pool: Pool, options: Batch, bounds: LeaseBounds, *, claim_ahead: bool = False
    ) -> Lease:
        """Queue for a connection and run BEGIN with *options* (its statements are ignored).
        *claim_ahead*: the key store is usable, so under a mapped role (``options.role``) the
        key's claim is prepared ahead of BEGIN, for a keyed COMMIT (`_keyed_commit`).

        Raise the pool's errors or `DeadlineBeforeStart` (nothing ran), `TransactionLost`
        when BEGIN broke the connection on `MAX_ATTEMPTS` connections in a row, or
        `StatementFailed` for BEGIN itself (e.g. a role that does not exist).
        """
        arrived = time.monotonic()
        for attempt_no in range(1, MAX_ATTEMPTS + 1):
            conn = await pool.getconn(bounds.deadline, key=options.queue_key)
            lease = cls(pool, conn, bounds, int((time.monotonic() - arrived) * 1_000_000))
            lease.reset_session, lease.role = options.reset_session, options.role
            error: BaseException | None = None
            try:
                timeout_ms = statement_timeout_ms(bounds.deadline, bounds.statement_timeout)
                # No SET LOCAL statement_timeout when the session has that value already: with
                # the reset behind every transaction, the one set at connect (as for a batch).
                default_ms = conn.pg.default_statement_timeout_ms if lease.reset_session else None
                session = begin_calls(options, timeout_ms, default_ms)
                ahead = claim_ahead and options.role is not None
                lease.claim_prepared = await lease._on_worker(_begin, session, ahead, small=True)
                return lease
            except TransactionLost as exc:
                error = exc
                if attempt_no == MAX_ATTEMPTS:
                    raise
                # A connection that died while idle: nothing ran, take another.
                log.info("BEGIN lost its connection; retrying", extra={"attempt": attempt_no})
            except BaseException as exc:
                error = exc
                raise
            finally:
                if error is not None:
                    await lease.release(error)
        raise AssertionError("unreachable: the last attempt returns or raises")

    # -- steps ---------------------------------------------------------------------------

    async def execute(
        self,
        statements: Sequence[pb.Statement],
        plan: RequestPlan,
        bound: Sequence[Bound],
        audit: bool,
        small: bool = False,
        budget: ResultBudget | None = None,
    ) -> list[pb.StatementResult]:
        """Run *statements* (parameters already *bound*) in the open transaction; *small*
        as `Batch.small` (with PGBROKER_PG_IO=loop, on the event loop); *budget* as
        `PgConnection.run_many`'s (the step's results are then checked with it).

        Raise `StatementFailed` for a Postgres error (the transaction is then aborted, the
        lease still usable), `LeaseTimeout` when a bound passed before or during the run,
        `TransactionLost` when the connection broke (nothing committed).
        """
        timeout_ms, cut = self._step_start(audit)
        try:
            results = await self._on_worker(
                _run_statements, statements, plan, bound, timeout_ms, budget, small=small
            )
            if plan.ddl:
                self.ran_ddl = True  # see commit
                # This transaction sees the changed tables already: prepare afresh in it (the
                # lease's end too: see `_end`).
                self.conn.pg.drop_statements()
                self.end_prepared = self.claim_prepared = False
            return results
        except StatementFailed as exc:
            named = self._named(exc, cut)
            if named is exc:
                raise
            raise named from exc
        finally:
            self.last_active = time.monotonic()

    async def stream(
        self,
        statement: pb.Statement,
        plan: StatementPlan,
        bound: Bound,
        audit: bool,
        chunk_rows: int,
    ) -> AsyncGenerator[pb.RowChunk, None]:
        """The rows of *statement* in chunks, through a cursor in the open transaction
        (`broker.flow.stream`): DECLARE, FETCH after FETCH (one ahead of the chunk being
        written), CLOSE. Raise as `execute`; closing the iterator early cancels the running
        FETCH (the cursor ends with the transaction, or at the next stream's DECLARE)."""
        timeout_ms, cut = self._step_start(audit)
        before = None
        if self.conn.pg.transaction_status is not TransactionStatus.INERROR:
            before = f"SET LOCAL statement_timeout = {timeout_ms}"
        try:
            if self.cursor_open:
                await self._on_worker(close_cursor, f"CLOSE {CURSOR}", small=True)
                self.cursor_open = False
            await self._on_worker(declare, statement, plan, bound, before)
            self.cursor_open = True
            fetches = prefetched(self._on_worker, Fetcher(chunk_rows=chunk_rows))
            async with contextlib.aclosing(fetches) as chunks:
                async for chunk in chunks:
                    yield chunk
                    self.last_active = time.monotonic()
            await self._on_worker(close_cursor, f"CLOSE {CURSOR}", small=True)
            self.cursor_open = False
        except StatementFailed as exc:
            self.cursor_open = False  # the transaction is aborted: the cursor is unusable
            named = self._named(exc, cut)
            if named is exc:
                raise
            raise named from exc
        finally:
            self.last_active = time.monotonic()

    def _step_start(self, audit: bool) -> tuple[int, tuple[float, End] | None]:
        """Check the bounds; the statement timeout (ms) for a step starting now, and the bound
        of the lease that cuts it first (None when the statement timeout does)."""
        self.check_bounds()
        self.audit = self.audit or audit
        cut = self.next_bound(idle=False)
        try:
            timeout_ms = statement_timeout_ms(
                cut[0] if cut else None, self.bounds.statement_timeout
            )
        except DeadlineBeforeStart:
            assert cut is not None  # only a bound leaves no time
            raise self.timeout(cut[1]) from None
        if cut is not None and cut[0] - time.monotonic() >= self.bounds.statement_timeout:
            cut = None  # the statement timeout bounds this step, not a bound of the lease
        return timeout_ms, cut

    def _named(
        self, exc: StatementFailed, cut: tuple[float, End] | None
    ) -> StatementFailed | LeaseTimeout:
        """*exc*, or the bound's error when Postgres stopped the statement just ahead of it."""
        if cut is not None and exc.error.sqlstate == "57014":
            return self.timeout(cut[1])
        return exc

    async def commit(self, claim: keys.KeyClaim | None = None) -> bool:
        """COMMIT, claiming *claim*'s idempotency key in the same transaction (one round
        trip either way). Return True when the key had committed before: this transaction
        was rolled back instead and the earlier one stands (`keys.KeyReused` when the key was
        an ``Execute``'s). Raise `TransactionAborted` if a statement had failed (nothing
        committed), `StatementFailed` if COMMIT failed (e.g. 40001, a deferred constraint),
        `LeaseTimeout`, or `TransactionLost` (``nothing_committed`` False when the outcome is
        unknown)."""
        self.check_bounds()
        if self.conn.pg.transaction_status is TransactionStatus.INERROR:
            raise TransactionAborted()
        after: list[str | Call] = [_COMMIT] if claim is None else self._keyed_commit(claim)
        if self.report_position:  # its rows are `after_rows`
            after.append(POSITION_SQL)
        try:
            rows = await self._on_worker(
                _end, after, self._cleanup(), True, self.end_prepared, small=True
            )
        except StatementFailed as exc:
            if claim is None or not keys.is_claimed(exc.error):
                raise
            await self._on_worker(_replayed, claim, small=True)
            if self.report_position:  # the earlier attempt's commit is behind this position
                self.commit_lsn = wal_position(await self._on_worker(_read_position, small=True))
            return True
        self.committed = True
        if self.report_position:
            self.commit_lsn = wal_position(rows)
        if self.ran_ddl:
            self.pool.statements_changed()  # other connections' plans may no longer fit
        return False

    async def rollback(self) -> None:
        """ROLLBACK; raise `TransactionLost` if the connection broke (nothing committed)."""
        await self._on_worker(
            _end, [_ROLLBACK], self._cleanup(), False, self.end_prepared, small=True
        )

    def _keyed_commit(self, claim: keys.KeyClaim) -> list[str | Call]:
        """The key's claim and COMMIT, in one Sync group (a committed key's 23505 skips
        COMMIT): statements the connection prepares once. Under a mapped role, behind
        ``SET LOCAL ROLE NONE`` (the login role owns the store) and prepared at BEGIN
        (`claim_prepared`): preparing now would run as the mapped role, which may not see
        the store (a batch claims before its ``SET LOCAL ROLE``). Without that (a DDL step
        dropped them), as simple SQL."""
        if self.role is None:
            return [*keys.claim_calls(claim), _COMMIT]
        if self.claim_prepared:
            return [_ROLE_NONE, *keys.claim_calls(claim), _COMMIT]
        sql = keys.claim_sql(claim.caller, claim.key, claim.digest, claim.ttl_seconds)
        return [f"SET LOCAL ROLE NONE; {sql}; COMMIT"]

    def _cleanup(self) -> tuple[str, ...]:
        """The session reset and probe behind COMMIT/ROLLBACK (audit.CLEANUP, prepared once
        per connection), unless PGBROKER_SESSION_AUDIT=off."""
        return CLEANUP if self.reset_session else ()

    # -- bounds --------------------------------------------------------------------------

    def next_bound(self, *, idle: bool) -> tuple[float, End] | None:
        """The earliest bound still ahead (monotonic time, which one); with *idle* the idle
        timeout counts too. None when nothing bounds the lease."""
        hard = self._hard_bound
        if not idle or not self.bounds.idle_timeout:
            return hard
        idle_at = self.last_active + self.bounds.idle_timeout
        if hard is None or idle_at < hard[0]:  # on a tie, the deadline or transaction timeout
            return idle_at, End.IDLE_TRANSACTION_TIMEOUT
        return hard

    def check_bounds(self) -> None:
        """Raise `LeaseTimeout` if the deadline or the transaction timeout has passed."""
        upcoming = self.next_bound(idle=False)
        if upcoming is not None and time.monotonic() >= upcoming[0]:
            raise self.timeout(upcoming[1])

    def timeout(self, bound: End) -> LeaseTimeout:
        """The error for *bound* having passed."""
        bounds = self.bounds
        rolled_back = "the transaction was rolled back and its connection returned to the pool"
        if bound is End.IDLE_TRANSACTION_TIMEOUT:
            return LeaseTimeout(
                bound,
                f"no step for {bounds.idle_timeout:g}s inside the transaction"
                f" (PGBROKER_IDLE_TRANSACTION_TIMEOUT): {rolled_back}",
                Reason.IDLE_TRANSACTION_TIMEOUT,
            )
        if bound is End.TRANSACTION_TIMEOUT:
            return LeaseTimeout(
                bound,
                f"the transaction lasted {bounds.transaction_timeout:g}s"
                f" (PGBROKER_TRANSACTION_TIMEOUT): {rolled_back}",
                Reason.TRANSACTION_TIMEOUT,
            )
        return LeaseTimeout(bound, f"the caller's deadline passed: {rolled_back}")

    # -- running on the connection ---------------------------------------------------------

    async def _on_worker(self, fn: Callable[..., _T], *args: Any, small: bool = False) -> _T:
        """Run *fn(conn, *args)* on a worker (with *small* and PGBROKER_PG_IO=loop, on the
        event loop: `Pool.run_io`); send a cancel request when a bound passes or the caller
        goes away (then wait for the work, so the connection's state is known)."""
        work = self.pool.run_io(small, fn, self.conn.pg, *args)
        self._attempt.work = work  # type: ignore[assignment]
        watchdog = None
        upcoming = self.next_bound(idle=False)
        if upcoming is not None:
            loop = asyncio.get_running_loop()
            why = f"{upcoming[1].value} passed"
            watchdog = loop.call_at(upcoming[0], send_cancel, self.pool, self._attempt, why)
        try:
            return await asyncio.shield(work)
        except asyncio.CancelledError:
            send_cancel(self.pool, self._attempt, "caller went away")
            await settle(work)  # type: ignore[arg-type]
            raise
        finally:
            if watchdog is not None:
                watchdog.cancel()

    # -- ending --------------------------------------------------------------------------

    async def release(self, error: BaseException | None = None) -> None:
        """Roll back unless committed, then return the connection (or replace it when it is
        not idle and clean: `broker.flow.cancel.close_reason`). Never raises; runs to the
        end even if the calling task is cancelled meanwhile (which is then re-raised)."""
        task = asyncio.ensure_future(self._release(error))
        _releasing.add(task)
        task.add_done_callback(_releasing.discard)
        await asyncio.shield(task)

    async def _release(self, error: BaseException | None) -> None:
        attempt = self._attempt
        reason: str | None = None
        try:
            if attempt.work is not None and not attempt.work.done():
                await settle(attempt.work)
            if attempt.cancel_tasks:
                # Let a cancel request land before ROLLBACK, which it must not hit.
                await asyncio.gather(*attempt.cancel_tasks, return_exceptions=True)
            pg = self.conn.pg
            if not pg.closed and (
                pg.transaction_status is not TransactionStatus.IDLE or self.audit
            ):
                await self.pool.run_io(True, tidy, pg, self.audit)
        except Exception as exc:  # a worker pool shut down under us: do not hand it on
            reason = f"release failed ({type(exc).__name__})"
        self.pool.putconn(self.conn, reason or close_reason(self.conn, attempt, error))


# -- on the worker thread ------------------------------------------------------------------


# The lease's end (`_end`): prepared at BEGIN, with the session reset and probe, while the
# connection is idle and has the login role (a failed step aborts the transaction, and an
# aborted transaction can prepare nothing but ROLLBACK).
_COMMIT = Call("COMMIT")
_ROLLBACK = Call("ROLLBACK")
_END_CALLS = (_COMMIT.sql, _ROLLBACK.sql, *CLEANUP)
# A keyed COMMIT under a mapped role (`Lease._keyed_commit`): back to the login role, then the
# key's claim; prepared at BEGIN (`claim_ahead`), before the role is set.
_ROLE_NONE = Call("SET LOCAL ROLE NONE")
_CLAIM_AHEAD = (_ROLE_NONE.sql, *keys.CLAIM_CALLS)


def _begin(conn: PgConnection, session: Session, claim_ahead: bool = False) -> bool:
    """BEGIN and its SET LOCALs as statements prepared once (`batch.begin_calls`); with
    *claim_ahead*, the key's claim prepared first, as the login role. Return whether it is
    prepared: a store Postgres refuses now (dropped since start) costs no transaction its
    BEGIN, and a keyed COMMIT then claims as simple SQL, which reports why."""
    try:
        claim_prepared = claim_ahead and _prepare_claim(conn)
        conn.run_many((), before=session, calls=_END_CALLS)
    except PgError as exc:
        rollback(conn)
        raise StatementFailed(exc, -1) from exc
    except ConnectionLost as exc:
        raise TransactionLost(exc, nothing_committed=True) from exc
    return claim_prepared


def _prepare_claim(conn: PgConnection) -> bool:
    """Prepare `_CLAIM_AHEAD` on idle *conn*; False when Postgres refuses it."""
    try:
        conn.prepare(_CLAIM_AHEAD)
    except PgError as exc:
        log.warning("the key's claim could not be prepared", extra={"error": str(exc)})
        return False
    return True


def _run_statements(
    conn: PgConnection,
    statements: Sequence[pb.Statement],
    plan: RequestPlan,
    bound: Sequence[Bound],
    timeout_ms: int,
    budget: ResultBudget | None = None,
) -> list[pb.StatementResult]:
    # In an aborted transaction only ROLLBACK (TO SAVEPOINT) runs: the SET LOCAL would fail
    # ahead of it.
    before = None
    if conn.transaction_status is not TransactionStatus.INERROR:
        before = f"SET LOCAL statement_timeout = {timeout_ms}"
    pairs = [(statement.sql, statement.params) for statement in statements]
    try:
        return conn.run_many(
            pairs, before=before, bound=bound, plans=plan.statements, budget=budget
        )
    except PgError as exc:
        raise StatementFailed(exc, exc.index if exc.phase is Phase.STATEMENT else -1) from exc
    except ConnectionLost as exc:
        raise TransactionLost(exc, nothing_committed=True) from exc


def _end(
    conn: PgConnection, after: Session, cleanup: Sequence[str], commit: bool, prepared: bool
) -> list[list[Any]]:
    """COMMIT or ROLLBACK (*after*), with the session reset and probe (*cleanup*) behind it
    in the same round trip, as statements prepared once; return the rows of *after*'s simple
    SQL (`PgConnection.after_rows`). A broken link during COMMIT leaves the outcome unknown
    unless the server said it was ending the session (as for a batch).

    Not *prepared* (``DEALLOCATE ALL`` dropped them since BEGIN, `Lease.end_prepared`) in a
    transaction a failed step aborted, where nothing but ROLLBACK can be prepared: ROLLBACK
    as simple SQL first, one round trip more (a COMMIT there is refused before: `commit`)."""
    if not prepared and conn.transaction_status is TransactionStatus.INERROR:
        rollback(conn)
        after = []
    try:
        conn.run_many((), after=after, cleanup=cleanup)
    except PgError as exc:
        rollback(conn)
        _check_probe(conn, cleanup)
        raise StatementFailed(exc, -1) from exc
    except ConnectionLost as exc:
        certain = not commit or exc.fatal is not None
        raise TransactionLost(exc, nothing_committed=certain) from exc
    _check_probe(conn, cleanup)
    return conn.after_rows


def _check_probe(conn: PgConnection, cleanup: Sequence[str]) -> None:
    """Mark *conn* dirty when the probe behind the end found session state left; when it did
    not run (a failed claim or COMMIT skipped it), audit the idle session instead."""
    if cleanup:
        mark_leaks(conn, conn.cleanup_rows, audit=True)


def _read_position(conn: PgConnection) -> list[list[Any]]:
    try:
        return conn.execute_simple(POSITION_SQL)
    except PgError as exc:
        raise StatementFailed(exc, -1) from exc
    except ConnectionLost as exc:
        raise TransactionLost(exc, nothing_committed=False) from exc


def _replayed(conn: PgConnection, claim: keys.KeyClaim) -> None:
    """After a claim at COMMIT met a committed key: raise `keys.KeyReused` when it was
    claimed for an ``Execute``, else return (the earlier transaction stands)."""
    keys.replay_transact(conn, claim.caller, claim.key, claim.digest)
