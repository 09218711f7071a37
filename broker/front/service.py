"""The Broker servicer: proto ⇄ domain, and every failure mapped to a gRPC status.

Errors carry the richer error model (``google.rpc.Status`` in the trailing metadata, read
with ``grpc_status.rpc_status.from_call``):

=====================================  =====================  =================================
situation                              status                 details
=====================================  =====================  =================================
SQLSTATE class 22, 23, 42              INVALID_ARGUMENT       DatabaseError
40001, 40P01                           ABORTED                DatabaseError, RetryInfo
57014 (statement timeout, cancel)      DEADLINE_EXCEEDED      DatabaseError
08*, 57P0x                             UNAVAILABLE            DatabaseError, RetryInfo
other SQLSTATE                         FAILED_PRECONDITION    DatabaseError
queue full                             RESOURCE_EXHAUSTED     ErrorInfo QUEUE_FULL, RetryInfo
queue timeout                          RESOURCE_EXHAUSTED     ErrorInfo QUEUE_TIMEOUT
deadline passed while queued           DEADLINE_EXCEEDED      ErrorInfo QUEUE_TIMEOUT
database unreachable, nothing ran      UNAVAILABLE            ErrorInfo POOL_UNAVAILABLE, RetryInfo
connection lost, outcome unknown       UNKNOWN                ErrorInfo CONNECTION_LOST
lost mid-statement on every attempt    UNAVAILABLE            ErrorInfo CONNECTION_LOST (nothing
                                                              committed; no RetryInfo)
bad request / session-state SQL        INVALID_ARGUMENT       ErrorInfo BAD_REQUEST / SESSION_STATE
a limit crossed (security/limits.py)   RESOURCE_EXHAUSTED     ErrorInfo LIMIT_EXCEEDED (+RetryInfo
                                                              for the in-flight limit)
shutting down                          UNAVAILABLE            ErrorInfo SHUTTING_DOWN, RetryInfo
=====================================  =====================  =================================
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.protobuf.message import Message
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from broker.flow.batch import (
    MAX_ATTEMPTS,
    Batch,
    DeadlineBeforeStart,
    StatementFailed,
    TransactionLost,
    application_name,
    execute,
)
from broker.pooling.pool import (
    DeadlineExpired,
    Pool,
    PoolClosed,
    PoolUnavailable,
    QueueFull,
    QueueTimeout,
)
from broker.postgres.params import BadParameter, Bound, bind_params
from broker.postgres.pg import PgError
from broker.security.auth import AuthStats, current_identity
from broker.security.limits import (
    InflightLimiter,
    LimitExceeded,
    Limits,
    check_request,
    check_results,
)
from broker.security.roles import RoleMap, RoleRefused
from broker.sql.sessionstate import (
    SessionStateError,
    calls_unknown_function,
    check_batch,
    needs_audit,
)
from lambda_client._proto.pgbroker.v1 import broker_pb2 as pb
from lambda_client._proto.pgbroker.v1 import broker_pb2_grpc as pb_grpc

__all__ = ["BrokerFailure", "BrokerService"]

log = logging.getLogger("pgbroker.service")

ERROR_DOMAIN = "pgbroker"
_RETRY_SOON = 0.1  # seconds suggested in RetryInfo


class BrokerFailure(Exception):
    """A request failure already decided: status code, message and details to send."""

    def __init__(self, code: grpc.StatusCode, message: str, details: Sequence[Message] = ()):
        super().__init__(message)
        self.code = code
        self.message = message
        self.details = list(details)

    def to_status(self) -> grpc.Status:
        status = status_pb2.Status(code=self.code.value[0], message=self.message)
        for detail in self.details:
            packed = any_pb2.Any()
            packed.Pack(detail)
            status.details.append(packed)
        return rpc_status.to_status(status)


def _error_info(reason: str, **metadata: str) -> error_details_pb2.ErrorInfo:
    return error_details_pb2.ErrorInfo(domain=ERROR_DOMAIN, reason=reason, metadata=metadata)


def _retry_info(seconds: float = _RETRY_SOON) -> error_details_pb2.RetryInfo:
    delay = duration_pb2.Duration()
    delay.FromNanoseconds(int(seconds * 1e9))
    return error_details_pb2.RetryInfo(retry_delay=delay)


def _database_error(error: PgError, index: int) -> pb.DatabaseError:
    return pb.DatabaseError(
        sqlstate=error.sqlstate,
        message=error.message,
        detail=error.detail,
        hint=error.hint,
        statement_index=index,
        severity=error.severity,
    )


def status_for_sqlstate(sqlstate: str) -> grpc.StatusCode:
    """The gRPC status for a Postgres error (see the module table)."""
    if sqlstate in ("40001", "40P01"):
        return grpc.StatusCode.ABORTED
    if sqlstate == "57014":
        return grpc.StatusCode.DEADLINE_EXCEEDED
    if sqlstate == "08P01":
        # A protocol violation Postgres blames on the message the broker sent for the
        # caller (wrong parameter counts are refused before sending, with 42601): the
        # connection is fine and a retry cannot help.
        return grpc.StatusCode.INVALID_ARGUMENT
    if sqlstate.startswith("08") or sqlstate.startswith("57P0"):
        return grpc.StatusCode.UNAVAILABLE
    if sqlstate[:2] in ("22", "23", "42"):
        return grpc.StatusCode.INVALID_ARGUMENT
    return grpc.StatusCode.FAILED_PRECONDITION


def failure_for(exc: BaseException) -> BrokerFailure:
    """Map a domain exception to the status the caller gets; unknown ones to INTERNAL."""
    code = grpc.StatusCode
    if isinstance(exc, BrokerFailure):
        return exc
    if isinstance(exc, StatementFailed):
        status = status_for_sqlstate(exc.error.sqlstate)
        details: list[Message] = [_database_error(exc.error, exc.statement_index)]
        if status in (code.ABORTED, code.UNAVAILABLE):
            details.append(_retry_info())
        where = "COMMIT/BEGIN" if exc.statement_index < 0 else f"statement {exc.statement_index}"
        return BrokerFailure(status, f"{where}: {exc.error.message}", details)
    if isinstance(exc, QueueFull):
        return BrokerFailure(
            code.RESOURCE_EXHAUSTED, str(exc), [_error_info("QUEUE_FULL"), _retry_info()]
        )
    if isinstance(exc, PoolUnavailable):
        return BrokerFailure(
            code.UNAVAILABLE, str(exc), [_error_info("POOL_UNAVAILABLE"), _retry_info(1.0)]
        )
    if isinstance(exc, QueueTimeout):
        return BrokerFailure(code.RESOURCE_EXHAUSTED, str(exc), [_error_info("QUEUE_TIMEOUT")])
    if isinstance(exc, DeadlineExpired | DeadlineBeforeStart):
        return BrokerFailure(
            code.DEADLINE_EXCEEDED, str(exc), [_error_info("QUEUE_TIMEOUT", cause="deadline")]
        )
    if isinstance(exc, PoolClosed):
        return BrokerFailure(
            code.UNAVAILABLE, str(exc), [_error_info("SHUTTING_DOWN"), _retry_info()]
        )
    if isinstance(exc, TransactionLost):
        return _lost_failure(exc)
    if isinstance(exc, BadParameter):
        return BrokerFailure(code.INVALID_ARGUMENT, str(exc), [_error_info("BAD_REQUEST")])
    if isinstance(exc, SessionStateError):
        # Session-changing SQL outlives the transaction on a pooled connection (issue 6).
        info = _error_info(exc.reason, statement_index=str(exc.statement_index))
        return BrokerFailure(code.INVALID_ARGUMENT, str(exc), [info])
    if isinstance(exc, RoleRefused):
        return BrokerFailure(
            code.PERMISSION_DENIED, str(exc), [_error_info("PERMISSION_DENIED", cause="role_map")]
        )
    if isinstance(exc, LimitExceeded):
        limit_details: list[Message] = [_error_info("LIMIT_EXCEEDED", **exc.metadata())]
        if exc.retry_after is not None:
            limit_details.append(_retry_info(exc.retry_after))
        return BrokerFailure(code.RESOURCE_EXHAUSTED, exc.message, limit_details)
    return BrokerFailure(code.INTERNAL, f"internal error ({type(exc).__name__})")


def _lost_failure(exc: TransactionLost) -> BrokerFailure:
    # POOL_UNAVAILABLE tells clients nothing ran; an unknown outcome gets its own reason so a
    # client that reads reasons before codes cannot take it for retry-safe.
    retry_safe = exc.nothing_committed and not exc.gave_up
    reason = "POOL_UNAVAILABLE" if retry_safe else "CONNECTION_LOST"
    details: list[Message] = [_error_info(reason)]
    if exc.cause.fatal is not None:
        details.insert(0, _database_error(exc.cause.fatal, -1))
    if exc.gave_up:
        # Nothing committed, but no RetryInfo and not POOL_UNAVAILABLE: clients do not retry.
        return BrokerFailure(
            grpc.StatusCode.UNAVAILABLE,
            f"database connection lost on {MAX_ATTEMPTS} connections in a row while this"
            f" request ran; nothing committed, not retried again: {exc}",
            details,
        )
    if exc.nothing_committed:
        details.append(_retry_info())
        return BrokerFailure(
            grpc.StatusCode.UNAVAILABLE,
            f"database connection lost, nothing committed: {exc}",
            details,
        )
    return BrokerFailure(
        grpc.StatusCode.UNKNOWN,
        f"database connection lost, the transaction may or may not have committed: {exc}",
        details,
    )


def validate(
    request: pb.ExecuteRequest, limits: Limits | None = None, role_locked: bool = False
) -> list[Bound]:
    """Refuse a request that cannot run, before it queues; raise `BrokerFailure`,
    `LimitExceeded` (broker/security/limits.py) or `SessionStateError` (broker/sql/sessionstate.py).

    Return each statement's parameters bound for the wire, so they are bound only once."""
    bad = grpc.StatusCode.INVALID_ARGUMENT
    if not request.statements:
        raise BrokerFailure(bad, "no statements", [_error_info("BAD_REQUEST")])
    check_request(request, limits or Limits())
    if request.options.isolation not in pb.IsolationLevel.values():
        raise BrokerFailure(
            bad,
            f"unknown isolation level {request.options.isolation}",
            [_error_info("BAD_REQUEST")],
        )
    for index, statement in enumerate(request.statements):
        if not statement.sql.strip():
            raise BrokerFailure(bad, f"statement {index}: empty SQL", [_error_info("BAD_REQUEST")])
    check_batch([statement.sql for statement in request.statements], role_locked=role_locked)
    bound: list[Bound] = []
    for index, statement in enumerate(request.statements):
        try:
            bound.append(bind_params(statement.params))
        except BadParameter as exc:
            raise BrokerFailure(
                bad, f"statement {index}: {exc}", [_error_info("BAD_REQUEST")]
            ) from exc
    return bound


def _lambda_metadata(metadata: Any) -> tuple[str | None, str | None]:
    """The caller's Lambda request id and function name from the call metadata, if sent."""
    request_id = function = None
    for key, value in metadata or ():
        if key == "x-lambda-request-id":
            request_id = str(value) or None
        elif key == "x-lambda-function-name":
            function = str(value) or None
    return request_id, function


class BrokerService(pb_grpc.BrokerServicer):
    """Runs `Execute` batches on the pool; `GetStats` reports pool and broker figures."""

    def __init__(
        self,
        pool: Pool,
        statement_timeout: float,
        *,
        limits: Limits | None = None,
        auth_stats: AuthStats | None = None,
        role_map: RoleMap | None = None,
        session_audit: str = "opaque",
    ) -> None:
        self.pool = pool
        self.statement_timeout = statement_timeout
        # Constant figures added to GetStats (a worker's index and pid with --workers N > 1).
        self.extra_stats: dict[str, int] = {}
        # Live figures added to GetStats (Transact's leases: broker/front/transact.py).
        self.stats_sources: list[Callable[[], dict[str, int]]] = []
        self.limits = limits or Limits()
        self.inflight = InflightLimiter(self.limits.max_inflight_per_caller)
        self.auth_stats = auth_stats or AuthStats()
        self.role_map = role_map
        self.session_audit = session_audit
        # pg_catalog's function names, read on the first connection (BrokerServer.start); a
        # call of any other function is audited. None: not read, every call is audited.
        self.known_functions: frozenset[str] | None = None
        self._stats: dict[str, int] = dict.fromkeys(_COUNTERS, 0)

    async def Execute(
        self, request: pb.ExecuteRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ExecuteResponse:
        started = time.monotonic()
        self._stats["rpcs_num"] += 1
        request_id, function = _lambda_metadata(context.invocation_metadata())
        remaining = context.time_remaining()
        deadline = started + remaining if remaining is not None else None
        if deadline is None:
            # A caller without a deadline is still bounded (issue 6): otherwise
            # SET LOCAL statement_timeout = 0 could hold a pooled connection forever.
            deadline = started + self.pool.queue_timeout + self.statement_timeout
        identity = current_identity.get()
        caller = str(identity) if identity is not None and identity.kind != "none" else None
        try:
            bound = validate(request, self.limits, role_locked=self.role_map is not None)
            role = self.role_map.role_for(identity) if self.role_map is not None else None
            batch = Batch(
                statements=request.statements,
                isolation=request.options.isolation,
                read_only=request.options.read_only,
                deferrable=request.options.deferrable,
                application_name=application_name(function, request_id),
                role=role,
                audit_session=self._audit(request),
                bound=bound,
            )
            with self.inflight.hold(caller):
                outcome = await execute(self.pool, batch, deadline, self.statement_timeout)
            check_results(outcome.results, self.limits)
        except Exception as exc:
            failure = failure_for(exc)
            self._count_failure(failure)
            log.info(
                "request failed",
                extra={
                    "request_id": request_id,
                    "function": function,
                    "caller": caller,
                    "code": failure.code.name,
                    "error": failure.message,
                    "statements": len(request.statements),
                },
            )
            await context.abort_with_status(failure.to_status())
            raise AssertionError("unreachable") from exc  # abort_with_status raises
        stats = self._stats
        stats["transactions_num"] += 1
        stats["transactions_ms"] += outcome.run_us // 1000
        if log.isEnabledFor(logging.DEBUG):  # the extras cost more than the check
            log.debug(
                "request done",
                extra={
                    "request_id": request_id,
                    "function": function,
                    "backend_pid": outcome.backend_pid,
                    "wait_us": outcome.wait_us,
                    "run_us": outcome.run_us,
                    "statements": len(request.statements),
                },
            )
        return pb.ExecuteResponse(
            results=outcome.results, wait_us=outcome.wait_us, run_us=outcome.run_us
        )

    def Transact(self, request_iterator: Any, context: Any) -> Any:
        """Served by `broker.front.transact.TransactService`, which the server registers in
        this method's place."""
        raise NotImplementedError

    def _audit(self, request: pb.ExecuteRequest) -> bool:
        """Whether to audit the session after this request (broker/postgres/audit.py)."""
        if self.session_audit == "always":
            return True
        if self.session_audit == "off":
            return False
        sqls = [statement.sql for statement in request.statements]
        return needs_audit(sqls) or calls_unknown_function(sqls, self.known_functions)

    def _count_failure(self, failure: BrokerFailure) -> None:
        self._stats["rpcs_failed"] += 1
        if failure.code == grpc.StatusCode.RESOURCE_EXHAUSTED:
            self._stats["rpcs_rejected"] += 1
        if any(isinstance(d, pb.DatabaseError) for d in failure.details):
            self._stats["transactions_errors"] += 1
        if any(getattr(d, "reason", "") == "LIMIT_EXCEEDED" for d in failure.details):
            self._stats["limits_exceeded"] += 1

    async def GetStats(
        self, request: pb.GetStatsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.GetStatsResponse:
        return pb.GetStatsResponse(stats=self.get_stats())

    def get_stats(self) -> dict[str, int]:
        """Pool figures (psycopg_pool names, PgBouncer's maxwait) plus broker counters."""
        stats = self.pool.get_stats()
        stats.update(self._stats)
        stats.update(self.auth_stats.as_dict())
        stats.update(self.extra_stats)
        for source in self.stats_sources:
            stats.update(source())
        return stats


_COUNTERS = (
    "rpcs_num",
    "rpcs_failed",
    "rpcs_rejected",
    "transactions_num",
    "transactions_ms",
    "transactions_errors",
    "limits_exceeded",
)
