"""One transaction on one pooled connection, and the request flow around it (no gRPC here).

`run_transaction` runs where ``PGBROKER_PG_IO`` says (`Pool.run_io`): a small request in a
greenlet on the event loop (``loop``, the default: broker/pooling/loopio.py), a large one, or
every one with ``threads``, on a worker thread (pg8000 blocks):

* several statements, or any transaction option: ``BEGIN [ISOLATION LEVEL …] [READ ONLY]
  [DEFERRABLE]; SET LOCAL statement_timeout …; SET LOCAL application_name …``, the statements
  and ``COMMIT`` pipelined in one flush: a batch whose statements are all prepared on the
  connection already costs one round trip (each statement not yet prepared adds one).
* a single statement runs without BEGIN/COMMIT (so VACUUM, CREATE INDEX CONCURRENTLY work):
  ``SET statement_timeout …; SET application_name …`` before it and ``RESET`` of both after it,
  all in the same flush — one round trip, still bounded by the statement timeout.
* the statement_timeout is not set (neither ``SET`` nor ``SET LOCAL``) when it is the value the
  session has had since connect (the usual case: a caller with more time left than
  ``PGBROKER_STATEMENT_TIMEOUT``) and the session is reset behind every transaction, which
  puts it back (`_session_timeout_ms`).
* behind COMMIT (or the single statement), in the same flush: the session reset and probe
  (``RESET ALL``, advisory unlock, one row naming what cannot be reset: broker/postgres/audit.py),
  as statements the connection prepared once (``cleanup`` of `PgConnection.run_many`), unless
  ``PGBROKER_SESSION_AUDIT=off``.
* a batch whose statements return rows, or that carries an idempotency key (the claim goes
  with BEGIN: broker/postgres/keys.py; a keyed batch's BEGIN, SET LOCALs, claim, store and
  COMMIT are statements the connection prepared once), holds COMMIT back until its results
  are read: then ``result_check`` (the result limits) sees results with rows, and the store of
  a keyed batch's response, COMMIT and the session reset go together in ONE more round trip. A
  result over its limit is refused before COMMIT and the batch rolled back (nothing commits,
  the key stays unclaimed; see broker/security/limits.py). Other batches keep COMMIT in the
  statements' flush.
* statement_timeout is the smaller of ``PGBROKER_STATEMENT_TIMEOUT`` and the caller's remaining
  time (minus a small margin, so Postgres stops the statement before the caller gives up).
* on a Postgres error the transaction is rolled back and `StatementFailed` names the failing
  statement (-1 for BEGIN/COMMIT).
* a statement whose prepared plan no longer fits its table (0A000 "cached plan must not change
  result type", after DDL outside the broker) did nothing, and the connection has forgotten
  it: the whole request runs once more on the same connection, idle again (`_plan_changed`).
  A batch whose DDL committed tells the pool (`Pool.statements_changed`).

Each failure here is a `broker.errors.BrokerFailure` that declares the status the caller gets
(the table in `broker.front.service`).

`execute` is the async flow on the event loop: queue for a connection (`Pool.getconn`), run the
transaction on a worker, send a cancel request to the backend if the deadline passes or the
caller goes away, return the connection only when idle and clean, and retry on a fresh
connection when the one it got was dead and nothing can have run.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from broker.errors import RETRY_SOON, BrokerFailure, Code, Reason
from broker.flow.cancel import Attempt, close_reason, send_cancel, settle
from broker.pooling.pool import Pool, ServerConnection
from broker.postgres import keys
from broker.postgres.audit import CLEANUP, mark_leaks
from broker.postgres.params import Bound
from broker.postgres.pg import (
    After,
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
from broker.security.roles import quote_role
from broker.sql.plan import RequestPlan
from lambda_client._proto.pgbroker.v1 import broker_pb2 as pb

__all__ = [
    "Batch",
    "DeadlineBeforeStart",
    "ExecuteOutcome",
    "Ran",
    "StatementFailed",
    "TransactionLost",
    "application_name",
    "begin_calls",
    "begin_sql",
    "execute",
    "rollback",
    "run_batch",
    "run_transaction",
    "statement_timeout_ms",
]

log = logging.getLogger("pgbroker.execute")

# Attempts on a fresh connection when the one handed out turned out dead before anything ran
# (an idle connection killed by a restart or pg_terminate_backend).
MAX_ATTEMPTS = 3

_ISOLATION: dict[int, str] = {
    pb.ISOLATION_LEVEL_READ_COMMITTED: "READ COMMITTED",
    pb.ISOLATION_LEVEL_REPEATABLE_READ: "REPEATABLE READ",
    pb.ISOLATION_LEVEL_SERIALIZABLE: "SERIALIZABLE",
}
_UNSAFE_APP_CHARS = re.compile(r"[^A-Za-z0-9._:/@=+-]")


@dataclass(slots=True)
class Batch:
    """What to run: statements ($n placeholders, bound params), their plan and transaction
    options. Read-only once made (`dataclasses.replace` makes a changed copy); not frozen,
    as a frozen dataclass sets each field through ``object.__setattr__`` (made per request:
    2.0 µs frozen, 0.7 µs not)."""

    statements: Sequence[pb.Statement]
    # The statements' plan (broker/sql/plan.py): parsed once, before the request queued.
    plan: RequestPlan
    isolation: int = pb.ISOLATION_LEVEL_UNSPECIFIED
    read_only: bool = False
    deferrable: bool = False
    application_name: str | None = None
    # Postgres role for the caller (PGBROKER_ROLE_MAP, broker/security/roles.py): SET LOCAL
    # ROLE after BEGIN, so it ends with the transaction whatever happens; forces BEGIN … COMMIT.
    role: str | None = None
    # Audit the session after the transaction (broker/postgres/audit.py): set for requests the
    # session-state parser cannot see through (DO, CALL) or with PGBROKER_SESSION_AUDIT=always.
    audit_session: bool = False
    # Each statement's parameters already bound (`broker.postgres.params.bind_params`), or None to
    # bind them on the worker.
    bound: Sequence[Bound] | None = None
    # The request's idempotency key, claimed inside the transaction (broker/postgres/keys.py);
    # forces BEGIN … COMMIT. None: no key, or the request is exempt (it writes nothing).
    claim: keys.KeyClaim | None = None
    # Reset the session behind COMMIT and probe what cannot be reset (audit.CLEANUP), in
    # the same flush; False with PGBROKER_SESSION_AUDIT=off.
    reset_session: bool = True
    # Who the request queues as (`broker.security.limits.caller_key`): identity and function.
    queue_key: str | None = None
    # Called with the results before COMMIT when a statement returns rows (the result limits,
    # broker/security/limits.py); what it raises rolls the batch back and reaches the caller.
    result_check: Callable[[list[pb.StatementResult]], None] | None = None
    # Keeps no more of the results than the result limits let through (`ResultBudget`): the
    # checks (result_check, and the one after a single statement) read it.
    budget: ResultBudget | None = None
    # Read-your-writes (broker/flow/routing.py): read the commit's WAL position behind COMMIT
    # (or behind a single statement), in the same flush. Set only when replicas exist.
    report_position: bool = False
    # Cheap to send (`broker.front.service.small_request`): with PGBROKER_PG_IO=loop it runs
    # in a greenlet on the event loop (`Pool.run_io`), else on a worker thread.
    small: bool = False

    @property
    def explicit(self) -> bool:
        """True if the batch needs BEGIN … COMMIT (several statements or any option)."""
        return (
            len(self.statements) > 1
            or self.isolation != pb.ISOLATION_LEVEL_UNSPECIFIED
            or self.read_only
            or self.deferrable
            or self.role is not None
            or self.claim is not None
        )


def _code_for_sqlstate(sqlstate: str) -> Code:
    """The status code of a Postgres error (the table in `broker.front.service`)."""
    if sqlstate in ("40001", "40P01"):
        return Code.ABORTED
    if sqlstate == "57014":
        return Code.DEADLINE_EXCEEDED
    if sqlstate == "08P01":
        # A protocol violation Postgres blames on the message the broker sent for the
        # caller (wrong parameter counts are refused before sending, with 42601): the
        # connection is fine and a retry cannot help.
        return Code.INVALID_ARGUMENT
    if sqlstate.startswith("08") or sqlstate.startswith("57P0"):
        return Code.UNAVAILABLE
    if sqlstate[:2] in ("22", "23", "42"):
        return Code.INVALID_ARGUMENT
    return Code.FAILED_PRECONDITION


def _database_error(error: PgError, statement_index: int) -> pb.DatabaseError:
    """*error* as the ``DatabaseError`` status detail."""
    return pb.DatabaseError(
        sqlstate=error.sqlstate,
        message=error.message,
        detail=error.detail,
        hint=error.hint,
        statement_index=statement_index,
        severity=error.severity,
    )


class StatementFailed(BrokerFailure):
    """Postgres rejected a statement; the transaction was rolled back.

    The code follows the SQLSTATE (the table in `broker.front.service`), with a retry hint for
    ABORTED and UNAVAILABLE; no ErrorInfo reason: the ``database_error`` detail says what failed.
    """

    def __init__(self, error: PgError, statement_index: int) -> None:
        code = _code_for_sqlstate(error.sqlstate)
        where = "COMMIT/BEGIN" if statement_index < 0 else f"statement {statement_index}"
        super().__init__(
            f"{where}: {error.message}",
            code=code,
            retry_after=RETRY_SOON if code in (Code.ABORTED, Code.UNAVAILABLE) else None,
            database_error=_database_error(error, statement_index),
        )
        self.error = error
        self.statement_index = statement_index


class TransactionLost(BrokerFailure):
    """The server connection broke during the transaction.

    `nothing_committed` is True when the transaction certainly did not commit (the link broke
    before COMMIT was sent, or the server said it was terminating the session); then the
    request may be retried on another connection: UNAVAILABLE, reason POOL_UNAVAILABLE (nothing
    ran), retry soon. Otherwise the outcome is unknown: UNKNOWN, reason CONNECTION_LOST, so a
    client that reads reasons before codes cannot take it for retry-safe.
    `gave_up` is True when the broker stopped retrying a request that lost its connection
    while its statements ran on every attempt (the request itself may be what ends it):
    UNAVAILABLE, reason CONNECTION_LOST and no retry hint, so clients do not retry either.
    The server's FATAL, if it sent one, is the ``database_error`` detail.
    """

    def __init__(
        self, cause: ConnectionLost, nothing_committed: bool, *, gave_up: bool = False
    ) -> None:
        fatal = None if cause.fatal is None else _database_error(cause.fatal, -1)
        if gave_up:
            super().__init__(
                f"database connection lost on {MAX_ATTEMPTS} connections in a row while this"
                f" request ran; nothing committed, not retried again: {cause}",
                code=Code.UNAVAILABLE,
                reason=Reason.CONNECTION_LOST,
                database_error=fatal,
            )
        elif nothing_committed:
            super().__init__(
                f"database connection lost, nothing committed: {cause}",
                code=Code.UNAVAILABLE,
                reason=Reason.POOL_UNAVAILABLE,
                retry_after=RETRY_SOON,
                database_error=fatal,
            )
        else:
            super().__init__(
                f"database connection lost, the transaction may or may not have committed: {cause}",
                code=Code.UNKNOWN,
                reason=Reason.CONNECTION_LOST,
                database_error=fatal,
            )
        self.cause = cause
        self.nothing_committed = nothing_committed
        self.gave_up = gave_up


class DeadlineBeforeStart(BrokerFailure):
    """The caller's deadline passed before BEGIN: nothing was sent to Postgres.
    DEADLINE_EXCEEDED, reason QUEUE_TIMEOUT with metadata ``cause=deadline``, as a deadline
    that passes in the queue."""

    code = Code.DEADLINE_EXCEEDED
    reason = Reason.QUEUE_TIMEOUT

    def __init__(self, message: str) -> None:
        super().__init__(message, metadata={"cause": "deadline"})


@dataclass
class ExecuteOutcome:
    """A committed request: its results, the time it queued and the time it held a
    connection (microseconds), and the backend that ran it (for the logs)."""

    results: list[pb.StatementResult]
    wait_us: int
    run_us: int
    backend_pid: int
    # The commit's WAL position (`Batch.report_position`), else 0.
    commit_lsn: int = 0


@dataclass
class Ran:
    """What `run_batch` returns: the results and, with `Batch.report_position`, the commit's
    WAL position (0 otherwise)."""

    results: list[pb.StatementResult]
    commit_lsn: int = 0


def application_name(function: str | None, request_id: str | None) -> str:
    """``pgbroker:<function>:<request id>``, safe characters only, at most 63 bytes.

    The function name is shortened first: the request id (a 36-character UUID from Lambda)
    is what finds the invocation's logs, so it stays whole.
    """
    request = _UNSAFE_APP_CHARS.sub("_", request_id or "-")[:53]
    room = 63 - len("pgbroker::") - len(request)
    function = _UNSAFE_APP_CHARS.sub("_", function or "-")[: max(room, 1)]
    return f"pgbroker:{function}:{request}"[:63]


def statement_timeout_ms(deadline: float | None, statement_timeout: float) -> int:
    """Milliseconds Postgres may spend: the statement timeout, cut to the caller's deadline.

    The margin (10% of the remaining time, at most 50 ms) lets Postgres stop the statement
    and the error travel back before the caller's own deadline fires.
    """
    budget = statement_timeout
    if deadline is not None:
        remaining = deadline - time.monotonic()
        remaining -= min(0.05, remaining * 0.1)
        budget = min(budget, remaining)
    if budget <= 0:
        raise DeadlineBeforeStart("the caller's deadline passed before the transaction started")
    return max(1, int(budget * 1000))


def begin_sql(batch: Batch, timeout_ms: int, session_timeout_ms: int | None = None) -> str:
    """BEGIN and the SET LOCALs (a keyed batch's claim goes between them: `begin_calls`). No
    SET LOCAL statement_timeout when *timeout_ms* is *session_timeout_ms*, the value the
    session already has."""
    sql = _begin_settings(batch, timeout_ms, session_timeout_ms)
    if batch.claim is not None:
        claim = batch.claim
        sql += "; " + keys.claim_sql(claim.caller, claim.key, claim.digest, claim.ttl_seconds)
    if batch.role is not None:
        sql += f"; SET LOCAL ROLE {quote_role(batch.role)}"
    return sql


def begin_calls(
    batch: Batch, timeout_ms: int, session_timeout_ms: int | None, delete_expired: bool = True
) -> list[str | Call]:
    """`begin_sql` as statements the connection prepares once, in one Sync group with the
    key's claim when the batch has one (one reply to read, nothing parsed per transaction):
    the claim ahead of SET LOCAL ROLE, so the store is written as the login role, which owns
    it; with *delete_expired* False, the claim's INSERT alone (`keys.claim_calls`). A keyed
    batch's BEGIN, and a lease's (broker/flow/lease.py)."""
    parts: list[str | Call] = [Call(_begin(batch))]
    if timeout_ms != session_timeout_ms:
        parts.append(Call(_SET_LOCAL, ("statement_timeout", str(timeout_ms))))
    if batch.application_name:
        parts.append(Call(_SET_LOCAL, ("application_name", batch.application_name)))
    if batch.claim is not None:
        parts += keys.claim_calls(batch.claim, delete_expired=delete_expired)
    if batch.role is not None:
        parts.append(f"SET LOCAL ROLE {quote_role(batch.role)}")
    return parts


def _begin_settings(batch: Batch, timeout_ms: int, session_timeout_ms: int | None) -> str:
    """BEGIN with its options, and the SET LOCALs but the role."""
    sql = _begin(batch)
    if timeout_ms != session_timeout_ms:
        sql += f"; SET LOCAL statement_timeout = {timeout_ms}"
    if batch.application_name:
        sql += f"; SET LOCAL application_name = '{batch.application_name}'"
    return sql


def _begin(batch: Batch) -> str:
    """BEGIN with the batch's transaction options."""
    begin = "BEGIN"
    if batch.isolation in _ISOLATION:
        begin += " ISOLATION LEVEL " + _ISOLATION[batch.isolation]
    if batch.read_only:
        begin += " READ ONLY"
    if batch.deferrable:
        begin += " DEFERRABLE"
    return begin


def run_transaction(
    conn: PgConnection, batch: Batch, deadline: float | None, statement_timeout: float
) -> list[pb.StatementResult]:
    """Run *batch* on *conn* (blocking; worker thread) and leave *conn* idle if possible.

    Raise `StatementFailed` (rolled back), `TransactionLost` (link broke) or
    `DeadlineBeforeStart` (nothing sent).
    """
    return run_batch(conn, batch, deadline, statement_timeout).results


def run_batch(
    conn: PgConnection, batch: Batch, deadline: float | None, statement_timeout: float
) -> Ran:
    """`run_transaction`, with the commit's WAL position when the batch asks for it."""
    try:
        try:
            try:
                return _run_once(conn, batch, deadline, statement_timeout)
            except StatementFailed as exc:
                if not _plan_changed(conn, batch, exc):
                    raise
                log.info("re-running after a plan change", extra={"error": str(exc)})
                return _run_once(conn, batch, deadline, statement_timeout)
        finally:
            _check_session(conn, batch)
    except ConnectionLost as exc:
        raise TransactionLost(exc, nothing_committed=_nothing_committed(exc, batch)) from exc


def _check_session(conn: PgConnection, batch: Batch) -> None:
    """Mark *conn* dirty (replaced, never handed on) if the transaction left session state
    behind: read the probe behind COMMIT, else (it did not run) audit with one more query."""
    # Audited also after a failure: session advisory locks survive a rollback.
    rows = conn.cleanup_rows if batch.reset_session else None
    mark_leaks(conn, rows, batch.audit_session or batch.reset_session)


def _run_once(
    conn: PgConnection, batch: Batch, deadline: float | None, statement_timeout: float
) -> Ran:
    timeout_ms = statement_timeout_ms(deadline, statement_timeout)
    if batch.explicit:
        try:
            results = _run_explicit(conn, batch, timeout_ms)
        except keys.ClaimExpired:  # rolled back, nothing ran: claim again, deleting it first
            timeout_ms = statement_timeout_ms(deadline, statement_timeout)
            results = _run_explicit(conn, batch, timeout_ms, delete_expired=True)
    else:
        results = [_run_single(conn, batch, timeout_ms)]
    if not batch.report_position:
        return Ran(results)
    # Read behind COMMIT in the same flush; a keyed batch answered from the store (an earlier
    # attempt committed) had no COMMIT to read it behind: one more round trip then.
    position = wal_position(conn.after_rows) or wal_position(conn.execute_simple(POSITION_SQL))
    return Ran(results, position)


def _plan_changed(conn: PgConnection, batch: Batch, exc: StatementFailed) -> bool:
    """Whether *exc* is a statement meeting a stale prepared plan (`PgError.plan_changed`)
    that left nothing behind: the batch rolled back (or a lone statement failed whole, unless
    opaque: a CALL may have committed inside) and *conn* is idle, so running again is safe."""
    if not exc.error.plan_changed or exc.error.phase is not Phase.STATEMENT:
        return False
    if not batch.explicit and batch.plan.statements[0].opaque:
        return False
    return conn.transaction_status is TransactionStatus.IDLE


def _nothing_committed(exc: ConnectionLost, batch: Batch) -> bool:
    """Whether the broken link certainly left nothing committed (safe to retry)."""
    if batch.explicit:
        # A FATAL reply means the server ended the session before COMMIT completed (a
        # completed COMMIT is answered before the FATAL). Without one, only a batch whose
        # COMMIT was not yet sent is certainly rolled back.
        return exc.fatal is not None or not exc.after_sent
    # A single statement commits as it completes, so a FATAL read after it (in the RESET
    # behind it) says nothing; and a CALL or DO may COMMIT inside, before a FATAL ends it.
    if not exc.after_sent:
        return True  # failed while preparing: the statement was never sent
    if exc.fatal is None or exc.phase not in (Phase.BEFORE, Phase.PREPARE, Phase.STATEMENT):
        return False
    return exc.phase is not Phase.STATEMENT or not batch.plan.statements[0].opaque


def _session_timeout_ms(conn: PgConnection, batch: Batch) -> int | None:
    """The statement_timeout *conn*'s session certainly has now, or None when unsure.

    With the session reset behind every transaction (`Batch.reset_session`, in every flow:
    batch, lease, stream), it is the value set at connect: RESET ALL puts it back, and a
    reset that did not run leaves the probe unread, so the session is audited and, with a
    session-level setting found, replaced. Without the reset a request may have changed it.
    """
    return conn.default_statement_timeout_ms if batch.reset_session else None


def _statements(batch: Batch) -> list[tuple[str, Sequence[pb.Value]]]:
    """The batch's statements as `PgConnection.run_many` takes them: their SQL as the plan
    read it, without the values when they are bound already (`Batch.bound`); reading each
    statement's SQL and values from the request again costs a microsecond or so each."""
    sqls = batch.plan.sqls
    if batch.bound is None or len(sqls) != len(batch.statements):
        return [(statement.sql, statement.params) for statement in batch.statements]
    return [(sql, ()) for sql in sqls]


def _run_single(conn: PgConnection, batch: Batch, timeout_ms: int) -> pb.StatementResult:
    ((sql, params),) = _statements(batch)
    sets, resets = [], []
    if timeout_ms != _session_timeout_ms(conn, batch):
        sets.append(f"SET statement_timeout = {timeout_ms}")
        resets.append("RESET statement_timeout")
    if batch.application_name:
        sets.append(f"SET application_name = '{batch.application_name}'")
        resets.append("RESET application_name")
    before = "; ".join(sets) or None
    # RESET ALL (CLEANUP) resets both, and whatever else the statement set.
    after = None if batch.reset_session else "; ".join(resets) or None
    if batch.report_position:  # its row is the first of `after_rows`
        after = f"{POSITION_SQL}; {after}" if after else POSITION_SQL
    try:
        bound = batch.bound[0] if batch.bound is not None else None
        return conn.run(
            sql,
            params,
            before=before,
            after=after,
            bound=bound,
            plan=batch.plan.statements[0],
            cleanup=_cleanup(batch),
            budget=batch.budget,
        )
    except PgError as exc:
        if exc.phase is Phase.AFTER and conn.transaction_status is TransactionStatus.IDLE:
            # The statement ran; only the RESET failed (a late cancel). Reset on next use.
            raise StatementFailed(exc, -1) from exc
        raise StatementFailed(exc, 0) from exc


def _run_explicit(
    conn: PgConnection, batch: Batch, timeout_ms: int, delete_expired: bool = False
) -> list[pb.StatementResult]:
    """BEGIN …, the statements, COMMIT, pipelined (`PgConnection.run_many`): one round trip
    when every statement is already prepared on this connection.

    A keyed batch claims its key with the INSERT alone unless *delete_expired*: it raises
    `keys.ClaimExpired` (rolled back, nothing ran) when the key it met had expired, so the
    caller runs the batch again with *delete_expired* (`keys.replay`'s ``expired_claims``)."""
    statements = _statements(batch)
    claim = batch.claim
    session_timeout_ms = _session_timeout_ms(conn, batch)
    before: Session = (
        begin_sql(batch, timeout_ms, session_timeout_ms)
        if claim is None
        else begin_calls(batch, timeout_ms, session_timeout_ms, delete_expired)
    )
    try:
        return conn.run_many(
            statements,
            before=before,
            after=_commit_sql(batch) if claim is None else _keyed_commit(claim, batch),
            bound=batch.bound,
            plans=batch.plan.statements,
            check=batch.result_check,
            cleanup=_cleanup(batch),
            calls=() if claim is None else _KEYED_CALLS,
            one_sync=True,  # behind BEGIN: one Sync for it and the statements
            budget=batch.budget,
        )
    except PgError as exc:
        rollback(conn)
        if claim is not None and exc.phase is Phase.BEFORE:
            if keys.is_claimed(exc):  # committed before: answer as then, run nothing
                return keys.replay(
                    conn, claim.caller, claim.key, claim.digest, expired_claims=not delete_expired
                )
            if exc.sqlstate == "57014":  # waited for another attempt with the key in vain
                raise keys.KeyInProgress(
                    "another attempt with this idempotency key is still running; nothing ran"
                ) from exc
        raise StatementFailed(exc, exc.index if exc.phase is Phase.STATEMENT else -1) from exc
    except BrokerFailure:  # refused by result_check before COMMIT
        rollback(conn)
        raise


def _commit_sql(batch: Batch) -> str:
    """COMMIT, and the commit's WAL position behind it when asked for (its row is the first
    of `after_rows`)."""
    return f"COMMIT; {POSITION_SQL}" if batch.report_position else "COMMIT"


def _cleanup(batch: Batch) -> tuple[str, ...]:
    """The session reset and probe behind the transaction, in the same flush
    (broker/postgres/audit.py), unless PGBROKER_SESSION_AUDIT=off."""
    return CLEANUP if batch.reset_session else ()


# A keyed batch's session SQL as statements prepared once (`begin_calls`, `_keyed_commit`).
_SET_LOCAL = "SELECT pg_catalog.set_config($1, $2, true)"
_COMMIT = Call("COMMIT")
# What `_keyed_commit` sends, prepared ahead (`PgConnection.run_many`'s *calls*).
_KEYED_CALLS = (*keys.FINISH_CALLS, _COMMIT.sql)


def _keyed_commit(claim: keys.KeyClaim, batch: Batch) -> After:
    """What follows a keyed batch's statements once their results are read (and checked):
    the response stored on the claimed key, COMMIT, the session reset and probe, in one
    round trip (`PgConnection.run_many`)."""

    def after(results: list[pb.StatementResult]) -> Session:
        response = pb.ExecuteResponse(results=results).SerializeToString()
        # One Sync group: a failed store skips COMMIT, and the transaction is rolled back.
        parts: list[str | Call] = [keys.finish_call(claim, response), _COMMIT]
        if batch.role is not None:  # back to the login role, which owns the store
            parts.insert(0, "SET LOCAL ROLE NONE")
        if batch.report_position:  # its row is the first of `after_rows`
            parts.append(POSITION_SQL)
        return parts

    return after


def rollback(conn: PgConnection) -> None:
    """End a failed transaction; a connection that stays in a transaction is replaced later."""
    if conn.transaction_status in (TransactionStatus.INTRANS, TransactionStatus.INERROR):
        # Still not idle afterwards (or the link broke): the pool replaces the connection.
        with contextlib.suppress(PgError, ConnectionLost):
            conn.execute_simple("ROLLBACK")


# -- the async flow ---------------------------------------------------------------------------


async def execute(
    pool: Pool, batch: Batch, deadline: float | None, statement_timeout: float
) -> ExecuteOutcome:
    """Queue for a connection, run *batch*, return the connection; see the module docstring.

    Raise the pool's errors (nothing ran), `StatementFailed`, `TransactionLost`,
    `DeadlineBeforeStart`; `asyncio.CancelledError` when the caller goes away (the backend
    query is cancelled first and the connection returned clean or replaced).
    """
    arrived = time.monotonic()
    attempt_no = 0
    while True:
        attempt_no += 1
        conn = await pool.getconn(deadline, key=batch.queue_key)
        checked_out = time.monotonic()
        try:
            ran = await _run_on(pool, conn, batch, deadline, statement_timeout)
        except TransactionLost as exc:
            if exc.nothing_committed and attempt_no < MAX_ATTEMPTS and not _expired(deadline):
                log.info(
                    "retrying on another connection",
                    extra={"attempt": attempt_no, "error": str(exc)},
                )
                continue
            gave_up = attempt_no >= MAX_ATTEMPTS and exc.cause.phase is Phase.STATEMENT
            if exc.nothing_committed and gave_up:
                # E.g. SELECT pg_terminate_backend(pg_backend_pid()): MAX_ATTEMPTS runs are
                # enough; the client must not multiply them by its own retries.
                raise TransactionLost(exc.cause, nothing_committed=True, gave_up=True) from exc
            raise
        if batch.plan.ddl:
            pool.statements_changed()  # committed: other connections' plans may not fit
        done = time.monotonic()
        return ExecuteOutcome(
            results=ran.results,
            commit_lsn=ran.commit_lsn,
            wait_us=int((checked_out - arrived) * 1_000_000),
            run_us=int((done - checked_out) * 1_000_000),
            backend_pid=conn.pg.backend_pid,
        )


def _expired(deadline: float | None) -> bool:
    return deadline is not None and time.monotonic() >= deadline


async def _run_on(
    pool: Pool,
    conn: ServerConnection,
    batch: Batch,
    deadline: float | None,
    statement_timeout: float,
) -> Ran:
    """Run on *conn* in a worker, cancel the backend query at the deadline, release *conn*."""
    attempt = Attempt(conn)
    loop = asyncio.get_running_loop()
    work = pool.run_io(batch.small, run_batch, conn.pg, batch, deadline, statement_timeout)
    attempt.work = work
    watchdog = None
    if deadline is not None:
        watchdog = loop.call_at(deadline, send_cancel, pool, attempt, "deadline passed")
    error: BaseException | None = None
    try:
        return await _shielded(work)
    except asyncio.CancelledError:
        # The caller went away: stop the backend query, then wait for the worker so the
        # connection is returned in a known state.
        send_cancel(pool, attempt, "caller cancelled")
        error = await settle(work)
        raise
    except BaseException as exc:
        error = exc
        raise
    finally:
        if watchdog is not None:
            watchdog.cancel()
        try:
            if attempt.cancel_tasks:
                # Let the cancel request land before the connection can serve anyone else.
                await asyncio.shield(asyncio.gather(*attempt.cancel_tasks, return_exceptions=True))
        except asyncio.CancelledError:
            pass  # cancelled again: close_reason replaces a connection a cancel may still hit
        finally:
            pool.putconn(conn, close_reason(conn, attempt, error))


def _shielded(work: asyncio.Future[Ran]) -> asyncio.Future[Ran]:
    """`asyncio.shield` (*work*) for a future the pool made: a future with *work*'s outcome
    whose cancellation (the caller went away) leaves *work* running. Without `shield`'s
    checks and its second callback, which serve any awaitable: 0.8 µs less per request."""
    if work.done():
        return work
    outer: asyncio.Future[Ran] = work.get_loop().create_future()

    def copy(done: asyncio.Future[Ran]) -> None:
        if outer.cancelled():  # nobody reads the outcome here (`settle` does): mark it read
            if not done.cancelled():
                done.exception()
        elif done.cancelled():
            outer.cancel()
        elif (error := done.exception()) is not None:
            outer.set_exception(error)
        else:
            outer.set_result(done.result())

    work.add_done_callback(copy)
    return outer
