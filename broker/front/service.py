"""The Broker servicer: proto ⇄ domain, and every failure mapped to a gRPC status.

Every failure is a `broker.errors.BrokerFailure` that declares its status (code, ErrorInfo
reason, RetryInfo delay, metadata, DatabaseError); `broker.front.status` packs it into the
richer error model (``google.rpc.Status`` in the trailing metadata, read with
``lambda_client._status.unpack``). Who raises what, and what the caller gets:

=================================  ====================  ===================  =====================
situation                          raised as             status               details
=================================  ====================  ===================  =====================
SQLSTATE class 22, 23, 42, 08P01   StatementFailed       INVALID_ARGUMENT     DatabaseError
40001, 40P01                       StatementFailed       ABORTED              DatabaseError,
                                                                              RetryInfo
57014 (statement timeout, cancel)  StatementFailed       DEADLINE_EXCEEDED    DatabaseError
other 08*, 57P0x                   StatementFailed       UNAVAILABLE          DatabaseError,
                                                                              RetryInfo
other SQLSTATE                     StatementFailed       FAILED_PRECONDITION  DatabaseError
queue full                         QueueFull             RESOURCE_EXHAUSTED   QUEUE_FULL, RetryInfo
queue timeout                      QueueTimeout          RESOURCE_EXHAUSTED   QUEUE_TIMEOUT
deadline passed while queued       DeadlineExpired,      DEADLINE_EXCEEDED    QUEUE_TIMEOUT
(or before BEGIN)                  DeadlineBeforeStart                        (cause=deadline)
database unreachable, nothing ran  PoolUnavailable       UNAVAILABLE          POOL_UNAVAILABLE,
                                                                              RetryInfo 1 s
connection lost, none committed    TransactionLost       UNAVAILABLE          POOL_UNAVAILABLE,
                                                                              RetryInfo
connection lost, outcome unknown   TransactionLost       UNKNOWN              CONNECTION_LOST
lost mid-statement on every        TransactionLost       UNAVAILABLE          CONNECTION_LOST (no
attempt (nothing committed)        (gave_up)                                  RetryInfo)
bad request (also a bad            BadRequest,           INVALID_ARGUMENT     BAD_REQUEST
idempotency_key)                   BadParameter
key used for another request       KeyReused             INVALID_ARGUMENT     IDEMPOTENCY_KEY_
                                                                              REUSED
key held by an attempt that        KeyInProgress         ABORTED              IDEMPOTENCY_KEY_
outlasted the statement timeout                                               IN_PROGRESS, RetryInfo
keyed request, no key store        StoreUnavailable      FAILED_PRECONDITION  IDEMPOTENCY_
                                                                              UNAVAILABLE
session-state SQL                  SessionStateError     INVALID_ARGUMENT     SESSION_STATE or
                                                                              BAD_REQUEST
no, bad or expired credentials     AuthError             UNAUTHENTICATED      UNAUTHENTICATED
caller not allowed (IAM roles)     PermissionDenied      PERMISSION_DENIED    PERMISSION_DENIED
identity not verifiable now (STS)  AuthUnavailable       UNAVAILABLE          AUTH_UNAVAILABLE,
                                                                              RetryInfo
address over its STS refusal       SourceThrottled       UNAVAILABLE          AUTH_UNAVAILABLE,
budget (security/stsgate.py)                                                  RetryInfo
caller maps to no role             RoleRefused           PERMISSION_DENIED    PERMISSION_DENIED
                                                                              (cause=role_map)
a limit crossed                    LimitExceeded         RESOURCE_EXHAUSTED   LIMIT_EXCEEDED
(security/limits.py)                                                          (+RetryInfo for the
                                                                              in-flight limit)
Transact: no step within the idle  LeaseTimeout          DEADLINE_EXCEEDED    IDLE_TRANSACTION_
timeout, or too long a transaction                                            TIMEOUT or
                                                                              TRANSACTION_TIMEOUT
Transact: COMMIT after an error    TransactionAborted    FAILED_PRECONDITION  DatabaseError 25P02
Transact: a step out of order      StepRefused           INVALID_ARGUMENT     BAD_REQUEST
Stream: no chunk taken within the  ReaderStalled         DEADLINE_EXCEEDED    IDLE_TRANSACTION_
idle timeout                                                                  TIMEOUT
shutting down                      PoolClosed            UNAVAILABLE          SHUTTING_DOWN,
                                                                              RetryInfo
Admin: a reload with a bad value   ReloadRefused         INVALID_ARGUMENT     BAD_REQUEST
(front/reload.py; nothing changed)
Admin: overrides, --workers N      NotForwardable        FAILED_PRECONDITION  BAD_REQUEST
Admin: the supervisor did not      FanoutTimeout         UNAVAILABLE          none
forward a control in time
anything else (a bug)              (any exception)       INTERNAL             none; the message
                                                                              names the class only
=================================  ====================  ===================  =====================

The details column names the ErrorInfo reason (domain ``pgbroker``, metadata in brackets);
a lost connection whose server sent a FATAL also carries it as DatabaseError.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import Any

import grpc

from broker.errors import BrokerFailure, Code, Reason
from broker.flow.batch import Batch, ExecuteOutcome, application_name, execute
from broker.flow.routing import Router, run_on_replica_or_primary
from broker.flow.stream import StreamStats
from broker.front.siblings import Siblings
from broker.front.status import failure_fields, failure_for, failure_reason, status_for
from broker.pooling.pool import Pool
from broker.pooling.targets import Target, TargetSet
from broker.postgres import keys
from broker.postgres.params import BadParameter, Bound, bind_params, bind_scalars
from broker.security.identity import AuthStats, Identity, current_identity
from broker.security.limits import (
    InflightLimiter,
    Limits,
    ResultBudget,
    caller_key,
    check_request,
    check_results,
)
from broker.security.roles import RoleMap
from broker.sql.plan import DIRECT_PARSE_CHARS, RequestPlan, plan_request
from broker.sql.plan import cache_info as plan_cache_info
from broker.sql.stack import parser_threads, short_switch_interval
from lambda_client._proto.pgbroker.v1 import broker_pb2 as pb
from lambda_client._proto.pgbroker.v1 import broker_pb2_grpc as pb_grpc
from lambda_client._status import FUNCTION_NAME_KEY, REQUEST_ID_KEY

__all__ = [
    "BadRequest",
    "BrokerService",
    "analyse",
    "lambda_metadata",
    "prebind",
    "small_request",
    "validate",
]

log = logging.getLogger("pgbroker.service")

# What a small request runs with instead of `short_switch_interval`: one, reused.
_SAME_SWITCH_INTERVAL = contextlib.nullcontext()


class BadRequest(BrokerFailure):
    """A request that cannot run as sent: INVALID_ARGUMENT, reason BAD_REQUEST; nothing ran."""

    code = Code.INVALID_ARGUMENT
    reason = Reason.BAD_REQUEST


_ISOLATION_LEVELS = frozenset(pb.IsolationLevel.values())


def validate(
    request: pb.ExecuteRequest,
    limits: Limits,
    role_locked: bool = False,
    bound: list[Bound] | None = None,
) -> tuple[RequestPlan, list[Bound]]:
    """Refuse a request that cannot run, before it queues; raise `BadRequest`, `BadParameter`
    (broker/postgres/params.py), `LimitExceeded` (broker/security/limits.py) or
    `SessionStateError` (broker/sql/sessionstate.py).

    Return the request's plan (its SQL parsed once, broker/sql/plan.py) and each statement's
    parameters bound for the wire, so neither is done again. *bound*: the parameters bound
    already (`prebind`), not bound again."""
    if request.idempotency_key and (why := keys.check_key(request.idempotency_key)):
        raise BadRequest(why)
    if not request.statements:
        raise BadRequest("no statements")
    check_request(request, limits)
    if request.options.isolation not in _ISOLATION_LEVELS:
        raise BadRequest(f"unknown isolation level {request.options.isolation}")
    statements = request.statements
    # Read once: each read of a message's string field makes a new str.
    sqls = [statement.sql for statement in statements]
    for index, sql in enumerate(sqls):
        if not sql or sql.isspace():  # what strip() removes, without copying the SQL
            raise BadRequest(f"statement {index}: empty SQL")
    plan = plan_request(sqls, role_locked=role_locked)
    if bound is not None:
        return plan, bound
    bound = []
    for index, statement in enumerate(statements):
        try:
            bound.append(bind_params(statement.params))
        except BadParameter as exc:
            raise BadParameter(f"statement {index}: {exc}") from exc
    return plan, bound


# A request at most this small is validated on the event loop: binding its values and parsing
# its SQL (at most this long, so parsed where it is: broker/sql/plan.py) takes microseconds to a
# few ms, less than the hop to another thread would cost. Told without ByteSize(), which
# serializes the message (45 ms for a 1M-element array: that would stall the loop itself).
ON_LOOP_SQL_CHARS = DIRECT_PARSE_CHARS
ON_LOOP_STATEMENTS = 16
ON_LOOP_VALUES = 256


def small_request(request: pb.ExecuteRequest) -> bool:
    """Whether *request* is cheap to validate: few statements, short SQL, few scalar values."""
    return _within_loop_sizes(request) and not any(
        value.WhichOneof("kind") == "array"
        for statement in request.statements
        for value in statement.params
    )


def _within_loop_sizes(request: pb.ExecuteRequest) -> bool:
    """Few statements, short SQL, few values (the values themselves not read)."""
    statements = request.statements
    if len(statements) > ON_LOOP_STATEMENTS:
        return False
    chars = values = 0
    for statement in statements:
        chars += len(statement.sql)
        values += len(statement.params)
        if chars > ON_LOOP_SQL_CHARS or values > ON_LOOP_VALUES:
            return False
    return True


def prebind(request: pb.ExecuteRequest) -> tuple[bool, list[Bound] | None]:
    """`small_request` (*request*), and a small request's parameters bound (`bind_params`,
    for `validate`) in the same pass over its values: each read of a value makes a Python
    object, so reading them once instead of twice saves a microsecond per value or so (W2:
    13 values). None instead of the bound parameters when the request is not small, or a
    value does not bind: `validate` binds them again and raises in its order."""
    if not _within_loop_sizes(request):
        return False, None
    try:
        bound = [bind_scalars(statement.params) for statement in request.statements]
    except BadParameter:
        return small_request(request), None
    scalars = [each for each in bound if each is not None]
    if len(scalars) < len(bound):  # an array: not small
        return False, None
    return True, scalars


async def analyse(
    request: pb.ExecuteRequest,
    limits: Limits,
    role_locked: bool = False,
    small: bool | None = None,
) -> tuple[RequestPlan, list[Bound]]:
    """`validate`, run on a parser thread (broker/sql/stack.py) unless the request is small
    (`small_request`), so that binding 65,535 parameters or planning 1 MB of SQL (seconds of CPU)
    does not stall every other caller on the event loop (issue 15); raises what `validate`
    raises. *small*: `small_request` (request) when the caller has it already."""
    if small is None:
        small = small_request(request)
    if small:
        return validate(request, limits, role_locked)
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(parser_threads(), validate, request, limits, role_locked)


def lambda_metadata(metadata: Any) -> tuple[str | None, str | None]:
    """The caller's Lambda request id and function name from the call metadata, if sent."""
    request_id = function = None
    for key, value in metadata or ():
        if key == REQUEST_ID_KEY:
            request_id = str(value) or None
        elif key == FUNCTION_NAME_KEY:
            function = str(value) or None
    return request_id, function


class BrokerService(pb_grpc.BrokerServicer):
    """Runs `Execute` batches on the pool; `GetStats` reports pool and broker figures."""

    def __init__(
        self,
        pool: Pool,
        statement_timeout: float,
        *,
        limits: Limits,
        auth_stats: AuthStats | None = None,
        role_map: RoleMap | None = None,
        session_audit: str = "opaque",
        idempotency_ttl: float = 86400.0,
        router: Router | None = None,
    ) -> None:
        self.pool = pool
        # Primary and read replicas (broker/flow/routing.py); without replicas, the pool alone.
        self.router = router or Router(TargetSet(Target("primary", pool)))
        self.statement_timeout = statement_timeout
        # Constant figures added to GetStats (a worker's index and pid with --workers N > 1).
        self.extra_stats: dict[str, int] = {}
        # With --workers N: GetStats combines every worker's figures (broker/front/siblings.py).
        self.siblings: Siblings | None = None
        # Live figures added to GetStats (Transact's leases: broker/front/transact.py).
        self.stats_sources: list[Callable[[], dict[str, int]]] = []
        self.limits = limits
        self.inflight = InflightLimiter(self.limits.max_inflight_per_caller)
        self.auth_stats = auth_stats or AuthStats()
        self.role_map = role_map
        self.session_audit = session_audit
        # pg_catalog's function names, read on the first connection (BrokerServer.start); a
        # call of any other function is audited. None: not read, every call is audited.
        self.known_functions: frozenset[str] | None = None
        # Exactly-once (broker/postgres/keys.py): why the key store is unusable ("" when it
        # is usable; set at start by BrokerServer), and how long a key lives.
        self.key_store_error: str | None = "the key store was not checked"
        self.idempotency_ttl = idempotency_ttl
        self._stats: dict[str, int] = dict.fromkeys(_COUNTERS, 0)
        # Rows and bytes streamed (Stream, and Transact's stream steps).
        self.stream_stats = StreamStats()
        self.stats_sources.append(self.stream_stats.as_dict)

    async def Execute(
        self, request: pb.ExecuteRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ExecuteResponse:
        self._stats["rpcs_num"] += 1
        call = _Caller.of(context)
        deadline = self._deadline(context)
        # A heavy request runs with the short GIL switch interval, so the loop keeps its turn
        # while pg8000 encodes 65,535 values on a worker (broker/sql/stack.py).
        small, bound = prebind(request)
        with _SAME_SWITCH_INTERVAL if small else short_switch_interval():
            try:
                batch = await self._batch(request, call, small, bound)
                inflight = self.inflight
                held = inflight.enter(call.key)  # `InflightLimiter.hold` without a generator
                try:
                    outcome = await self._execute(request, batch, call, deadline)
                finally:
                    inflight.leave(held)
                # A single statement committed as it completed: checked now (completed=true);
                # so are a batch's results unless checked before its COMMIT already.
                check = batch.result_check
                if not (isinstance(check, _CheckBeforeCommit) and check.passed is outcome.results):
                    check_results(outcome.results, self.limits, budget=batch.budget)
            except Exception as exc:
                failure = failure_for(exc)
                self._count_failure(failure)
                _log_failure(failure, call, len(request.statements))
                await context.abort_with_status(status_for(failure))
                raise AssertionError("unreachable") from exc  # abort_with_status raises
        self._count_done(outcome, call, len(request.statements))
        return pb.ExecuteResponse(
            results=outcome.results,
            wait_us=outcome.wait_us,
            run_us=outcome.run_us,
            commit_lsn=outcome.commit_lsn,
        )

    def _execute(
        self, request: pb.ExecuteRequest, batch: Batch, call: _Caller, deadline: float
    ) -> Awaitable[ExecuteOutcome]:
        """Run *batch* on the primary, or where the routing sends it when replicas exist
        (broker/flow/routing.py: the commit's position is read behind a write's COMMIT).
        Not a coroutine itself: without replicas (W1's path: no routing, no position) the
        flow's coroutine is awaited directly, one frame fewer to resume on every wake-up."""
        if not self.router.replicas:
            return execute(self.pool, batch, deadline, self.statement_timeout)
        return self._routed(request, batch, call, deadline)

    async def _routed(
        self, request: pb.ExecuteRequest, batch: Batch, call: _Caller, deadline: float
    ) -> ExecuteOutcome:
        """`_execute` with read replicas."""
        router = self.router
        options = request.options
        routing = await router.choose(
            read_only=options.read_only,
            plan=batch.plan,
            sqls=[statement.sql for statement in request.statements],
            caller=call.caller,
            after_lsn=options.after_lsn,
            isolation=options.isolation,
        )
        on_primary = replace(batch, report_position=routing.report_position)
        # A read claims no idempotency key: the store is on the primary (and reads need none).
        on_replica = replace(batch, claim=None)

        def run(target: Target) -> Any:
            chosen = on_replica if target.replica else on_primary
            return execute(target.pool, chosen, deadline, self.statement_timeout)

        outcome, _ = await run_on_replica_or_primary(router, routing, run)
        return outcome  # type: ignore[no-any-return]

    def _deadline(self, context: grpc.aio.ServicerContext[Any, Any]) -> float:
        """The call's monotonic deadline. A caller without one is still bounded (issue 6):
        otherwise SET LOCAL statement_timeout = 0 could hold a pooled connection forever."""
        remaining = context.time_remaining()
        if remaining is None:
            remaining = self.pool.queue_timeout + self.statement_timeout
        return time.monotonic() + remaining

    async def _batch(
        self,
        request: pb.ExecuteRequest,
        call: _Caller,
        small: bool,
        prebound: list[Bound] | None = None,
    ) -> Batch:
        """*request* checked, planned and bound (off the loop unless *small*), as the `Batch`
        the flow runs; raise the `BrokerFailure` that refuses it. *prebound*: its parameters
        bound already (`prebind`)."""
        role_map = self.role_map
        if small:  # `analyse` without a coroutine
            plan, bound = validate(request, self.limits, role_map is not None, prebound)
        else:
            plan, bound = await analyse(request, self.limits, role_map is not None, small)
        plan.check_autocommit()  # a lone SET LOCAL would do nothing (Transact allows it)
        options = request.options
        budget = ResultBudget(self.limits)
        return Batch(
            statements=request.statements,
            plan=plan,
            isolation=options.isolation,
            read_only=options.read_only,
            deferrable=options.deferrable,
            application_name=call.application_name,
            role=role_map.role_for(call.identity) if role_map is not None else None,
            audit_session=self.audit_needed(plan),
            bound=bound,
            claim=await self._claim(request, plan, call.caller, small)
            if request.idempotency_key
            else None,
            reset_session=self.session_audit != "off",
            queue_key=call.key,
            result_check=_CheckBeforeCommit(budget),
            budget=budget,
            small=small,
        )

    def _count_done(self, outcome: ExecuteOutcome, call: _Caller, statements: int) -> None:
        stats = self._stats
        stats["transactions_num"] += 1
        stats["transactions_ms"] += outcome.run_us // 1000
        if log.isEnabledFor(logging.DEBUG):  # the extras cost more than the check
            log.debug(
                "request done",
                extra={
                    "request_id": call.request_id,
                    "function": call.function,
                    "backend_pid": outcome.backend_pid,
                    "wait_us": outcome.wait_us,
                    "run_us": outcome.run_us,
                    "statements": statements,
                },
            )

    def Stream(self, request: Any, context: Any) -> Any:
        """Served by `broker.front.stream.StreamService`, which the server registers in this
        method's place."""
        raise NotImplementedError

    def Transact(self, request_iterator: Any, context: Any) -> Any:
        """Served by `broker.front.transact.TransactService`, which the server registers in
        this method's place."""
        raise NotImplementedError

    async def _claim(
        self, request: pb.ExecuteRequest, plan: RequestPlan, caller: str | None, small: bool
    ) -> keys.KeyClaim | None:
        """The key to claim with this request, or None: no key, or it writes nothing (the
        read_only option, or the plan says so); raise `StoreUnavailable` without a store.
        The request's hash serializes it: a request that is not small is hashed on a parser
        thread, as `analyse` validates it there (a large one would stall the event loop);
        *small*: `small_request` (request)."""
        key = request.idempotency_key
        if not key or request.options.read_only or plan.exempt_from_key(self.known_functions):
            return None
        if self.key_store_error:
            raise keys.StoreUnavailable(
                f"idempotency keys are not available on this broker ({self.key_store_error});"
                " nothing ran: send the request without idempotency_key"
            )
        if small:
            digest = keys.request_hash(request)
        else:
            loop = asyncio.get_running_loop()
            digest = await loop.run_in_executor(parser_threads(), keys.request_hash, request)
        return keys.KeyClaim(caller or "", key, digest, self.idempotency_ttl)

    def commit_claim(self, request: pb.TransactRequest, caller: str | None) -> keys.KeyClaim | None:
        """The key a Transact COMMIT claims (None without one); raise `BadRequest` for a bad
        key, `StoreUnavailable` without a store."""
        key = request.commit.idempotency_key
        if not key:
            return None
        if why := keys.check_key(key):
            raise BadRequest(why)
        if self.key_store_error:
            raise keys.StoreUnavailable(
                f"idempotency keys are not available on this broker ({self.key_store_error});"
                " the transaction was rolled back"
            )
        return keys.KeyClaim(caller or "", key, keys.request_hash(None), self.idempotency_ttl)

    def audit_needed(self, plan: RequestPlan) -> bool:
        """Whether to audit the session after this request (broker/postgres/audit.py)."""
        mode = self.session_audit
        if mode == "always":
            return True
        if mode == "off":
            return False
        # `RequestPlan.needs_audit or .calls_unknown_function`, in one pass and no generator.
        known = self.known_functions
        for statement in plan.statements:
            if statement.opaque or statement.calls_unknown_function(known):
                return True
        return False

    def _count_failure(self, failure: BrokerFailure) -> None:
        self._stats["rpcs_failed"] += 1
        # By reason too, created at its first failure (the EMF metric QueryRequestsFailed by
        # Reason, broker/front/metrics.py); the reasons add up to rpcs_failed.
        key = f"rpcs_failed.{failure_reason(failure)}"
        self._stats[key] = self._stats.get(key, 0) + 1
        if failure.code is Code.RESOURCE_EXHAUSTED:
            self._stats["rpcs_rejected"] += 1
        if failure.database_error is not None:
            self._stats["transactions_errors"] += 1
        if failure.reason is Reason.LIMIT_EXCEEDED:
            self._stats["limits_exceeded"] += 1

    async def GetStats(
        self, request: pb.GetStatsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.GetStatsResponse:
        if self.siblings is not None:  # --workers N: the sum over every worker
            return pb.GetStatsResponse(stats=await self.siblings.get_stats())
        return pb.GetStatsResponse(stats=self.get_stats())

    def get_stats(self) -> dict[str, int]:
        """Pool figures (psycopg_pool names, PgBouncer's maxwait) plus broker counters."""
        stats = self.pool.get_stats()
        stats.update(self._stats)
        plans = plan_cache_info()
        stats["plan_cache_hits"], stats["plan_cache_misses"] = plans.hits, plans.misses
        stats.update(self.auth_stats.as_dict())
        stats.update(self.extra_stats)
        stats.update(self.router.get_stats())
        for source in self.stats_sources:
            stats.update(source())
        return stats


class _CheckBeforeCommit:
    """The result limits, checked before a batch's COMMIT (on the worker), one per request:
    it keeps the results it passed, which `BrokerService.Execute` then does not check again
    after COMMIT (W2: five results' sizes). Results it did not see (none had rows, or a
    keyed request answered from the store) are checked there."""

    __slots__ = ("budget", "passed")

    def __init__(self, budget: ResultBudget) -> None:
        self.budget = budget
        self.passed: list[pb.StatementResult] | None = None

    def __call__(self, results: list[pb.StatementResult]) -> None:
        check_results(results, self.budget.limits, completed=False, budget=self.budget)
        self.passed = results


class _Caller:
    """Who sent a call: the Lambda request id and function (call metadata), the authenticated
    identity, the key it queues and is counted as (identity and function), and the
    application_name its session gets. Read-only once made: one is shared by every call with
    the same metadata and identity (`of`)."""

    __slots__ = ("application_name", "caller", "function", "identity", "key", "request_id")

    def __init__(
        self, request_id: str | None, function: str | None, identity: Identity | None
    ) -> None:
        self.request_id = request_id
        self.function = function
        self.identity = identity
        self.caller = str(identity) if identity is not None and identity.kind != "none" else None
        self.key = caller_key(self.caller, function)
        self.application_name = application_name(function, request_id)

    @classmethod
    def of(cls, context: grpc.aio.ServicerContext[Any, Any]) -> _Caller:
        request_id, function = lambda_metadata(context.invocation_metadata())
        identity = current_identity.get()
        # Keyed by the identity's id, checked by `is` (a dataclass' hash is a Python call);
        # a Lambda function's invocations send the same function name, its queries the same
        # request id, and every caller has the same identity with PGBROKER_AUTH=none.
        memo = (request_id, function, id(identity))
        call = _CALLERS.get(memo)
        if call is None or call.identity is not identity:
            if len(_CALLERS) >= _CALLERS_KEPT:
                _CALLERS.clear()  # request ids are new with every invocation: start over
            call = _CALLERS[memo] = cls(request_id, function, identity)
        return call


# The callers `_Caller.of` made lately, by request id, function and identity.
_CALLERS: dict[tuple[str | None, str | None, int], _Caller] = {}
_CALLERS_KEPT = 4096


def _log_failure(failure: BrokerFailure, call: _Caller, statements: int) -> None:
    fields = failure_fields(failure)
    log.info(
        "request failed: %s",
        fields["kind"],
        extra={
            **fields,
            "request_id": call.request_id,
            "function": call.function,
            "caller": call.caller,
            "error": str(failure),
            "statements": statements,
        },
    )


_COUNTERS = (
    "rpcs_num",
    "rpcs_failed",
    "rpcs_rejected",
    "transactions_num",
    "transactions_ms",
    "transactions_errors",
    "limits_exceeded",
)
