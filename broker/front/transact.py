"""``Broker.Transact``: an interactive transaction over a bidirectional stream.

One stream is one transaction on one leased pooled connection (`broker.flow.lease`). The
requests, each answered by one response in order:

* ``begin`` (first, once): queue for a connection as ``Execute`` does, BEGIN with the options;
  answered ``begun``;
* ``execute``: the statements pass the same checks as a batch's (limits, session-state guard,
  parameters; role mapping and audit apply), run pipelined, answered ``executed`` with their
  results, or with the Postgres error in-stream: the transaction is then aborted as in
  Postgres, and the stream goes on (ROLLBACK TO SAVEPOINT recovers it);
* ``commit`` / ``rollback`` (last): answered ``ended``, then the stream ends OK; with
  ``ended_in_trailer``, ``ended`` goes in the OK status's trailing metadata (`ENDED_KEY`)
  instead of a message of its own.

Anything else ends the stream with the status ``Execute`` would give (broker/front/service.py)
and rolls the transaction back: a refused step, a result over its limit, a lost connection, a
failed COMMIT, and the bounds, which name themselves (DEADLINE_EXCEEDED with reason
``IDLE_TRANSACTION_TIMEOUT`` or ``TRANSACTION_TIMEOUT``). A stream that breaks (the caller
crashed, was frozen past its deadline, the network was cut) or closes without ``commit`` or
``rollback`` cancels what runs and rolls back. Every lease ending abnormally is logged once
with the caller and the request id.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable
from typing import Any

import grpc

from broker.errors import BrokerFailure, Code, Reason
from broker.flow.batch import Batch, StatementFailed, application_name
from broker.flow.lease import End, Lease, LeaseBounds, LeaseStats, LeaseTimeout
from broker.flow.routing import run_on_replica_or_primary
from broker.front.service import BrokerService, analyse, lambda_metadata, small_request
from broker.front.status import failure_fields, failure_for, status_for
from broker.pooling.targets import Target
from broker.security.identity import current_identity
from broker.security.limits import ResultBudget, caller_key, check_results
from broker.sql.plan import RequestPlan
from lambda_client import _status
from lambda_client._proto.pgbroker.v1 import broker_pb2 as pb
from lambda_client.transaction import ENDED_KEY

__all__ = ["TransactService", "transact_handler"]

log = logging.getLogger("pgbroker.transact")


class StepRefused(BrokerFailure):
    """A request out of order (``execute`` before ``begin``, a second ``begin``, …)."""

    code = Code.INVALID_ARGUMENT
    reason = Reason.BAD_REQUEST


class StreamClosed(Exception):
    """The caller closed its side of the stream without ``commit`` or ``rollback``."""


class TransactService:
    """Serves ``Transact`` with the pool, limits, role map and audit policy of *service*."""

    def __init__(
        self,
        service: BrokerService,
        *,
        idle_transaction_timeout: float,
        transaction_timeout: float,
    ) -> None:
        self.service = service
        self.idle_transaction_timeout = idle_transaction_timeout
        self.transaction_timeout = transaction_timeout
        self.stats = LeaseStats()
        # The streams holding a lease now, for ShowCallers (broker/front/admin.py).
        self.open: set[_Call] = set()

    def get_stats(self) -> dict[str, int]:
        """``leases_active``, ``leases_num``, ``leases_ms``, ``leases_max_ms``,
        ``leases_p50_ms`` and ``leases_ended_<how>`` for each `End`."""
        return self.stats.as_dict()

    def holds(self) -> list[tuple[str, float, float]]:
        """(caller key, monotonic BEGIN time, monotonic last step) of each open lease."""
        return [
            (call.key or "anonymous", call.lease.began_at, call.lease.last_active)
            for call in self.open
            if call.lease is not None
        ]

    async def Transact(
        self,
        requests: AsyncIterator[pb.TransactRequest],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> AsyncIterator[pb.TransactResponse]:
        call = _Call(self, requests, context)
        try:
            async for response in call.run():
                yield response
        except Exception as exc:
            await context.abort_with_status(_status_for(exc))


class _Call:
    """One ``Transact`` stream: its caller, bounds and lease."""

    def __init__(
        self,
        owner: TransactService,
        requests: AsyncIterator[pb.TransactRequest],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> None:
        self.owner = owner
        self.context = context
        self.service = owner.service
        self.requests = aiter(requests)
        self.request_id, self.function = lambda_metadata(context.invocation_metadata())
        identity = current_identity.get()
        self.identity = identity
        self.caller = str(identity) if identity is not None and identity.kind != "none" else None
        # Queued fairly and counted by the in-flight cap per identity and function.
        self.key = caller_key(self.caller, self.function)
        remaining = context.time_remaining()
        self.deadline = time.monotonic() + remaining if remaining is not None else None
        self.lease: Lease | None = None

    async def run(self) -> AsyncIterator[pb.TransactResponse]:
        """The responses; the lease is released (and counted, and logged if abnormal) on the
        way out, whatever happened."""
        with self.service.inflight.hold(self.key):
            first = await self._next(None)
            if first.WhichOneof("step") != "begin":
                raise StepRefused("the first request of a Transact stream must be begin")
            self.lease = await self._begin(first.begin)
            self.owner.stats.opened()
            self.owner.open.add(self)
            end, error = End.CLIENT_GONE, None  # type: tuple[End, BaseException | None]
            try:
                yield pb.TransactResponse(begun=pb.TransactBegun(wait_us=self.lease.wait_us))
                async for response in self._steps():
                    yield response
                end = End.COMMIT if self.lease.committed else End.ROLLBACK
            except LeaseTimeout as exc:
                end, error = exc.bound, exc
                raise
            except StreamClosed as exc:
                error = exc
                raise
            except Exception as exc:
                end, error = End.ERROR, exc
                raise
            finally:
                self.owner.open.discard(self)
                await self._release(end, error)

    async def _steps(self) -> AsyncIterator[pb.TransactResponse]:
        lease = self.lease
        assert lease is not None
        while True:
            request = await self._next(lease)
            step = request.WhichOneof("step")
            if step == "execute":
                yield await self._execute(lease, request.execute)
            elif step == "stream":
                async for response in self._stream(lease, request.stream):
                    yield response
            elif step in ("commit", "rollback"):
                replayed = False
                if step == "commit":
                    replayed = await lease.commit(self.service.commit_claim(request, self.caller))
                    in_trailer = request.commit.ended_in_trailer
                else:
                    await lease.rollback()
                    in_trailer = request.rollback.ended_in_trailer
                run_us = int((time.monotonic() - lease.began_at) * 1_000_000)
                ended = pb.TransactEnded(
                    committed=lease.committed or replayed,
                    run_us=run_us,
                    replayed=replayed,
                    commit_lsn=lease.commit_lsn,
                )
                if in_trailer:  # sent with the OK status as the stream ends: no message
                    self.context.set_trailing_metadata(((ENDED_KEY, ended.SerializeToString()),))
                else:
                    yield pb.TransactResponse(ended=ended)
                return
            else:
                raise StepRefused(f"unexpected {step or 'empty'} request inside a transaction")

    async def _next(self, lease: Lease | None) -> pb.TransactRequest:
        """The caller's next request; raise `LeaseTimeout` when a bound passes first (before
        the lease, only the idle timeout waits for ``begin``), `StreamClosed` at its end."""
        bound: tuple[float, End] | None
        if lease is not None:
            bound = lease.next_bound(idle=True)
        elif self.owner.idle_transaction_timeout:
            bound = (
                time.monotonic() + self.owner.idle_transaction_timeout,
                End.IDLE_TRANSACTION_TIMEOUT,
            )
        else:
            bound = None
        try:
            if bound is None:
                return await anext(self.requests)
            # Not `asyncio.wait_for`, which runs the read in a task of its own each step; the
            # loop's clock is `time.monotonic`, the bounds' clock.
            async with asyncio.timeout_at(bound[0]):
                return await anext(self.requests)
        except StopAsyncIteration:
            raise StreamClosed("the stream ended without commit or rollback") from None
        except TimeoutError:
            assert bound is not None
            if lease is None:
                raise StepRefused("no begin request within the idle transaction timeout") from None
            raise lease.timeout(bound[1]) from None

    async def _execute(self, lease: Lease, step: pb.TransactRequest.Execute) -> pb.TransactResponse:
        """Check and run one ``execute``: a Postgres error is answered in-stream."""
        request = pb.ExecuteRequest(statements=step.statements)
        small = small_request(request)
        role_locked = self.service.role_map is not None
        plan, bound = await analyse(request, self.service.limits, role_locked, small)
        budget = ResultBudget(self.service.limits)
        try:
            results = await lease.execute(
                step.statements, plan, bound, self.service.audit_needed(plan), small, budget
            )
        except StatementFailed as exc:
            return pb.TransactResponse(executed=_executed_error(exc))
        # Refused before COMMIT, so nothing behind it commits (the lease is rolled back).
        check_results(results, self.service.limits, completed=False, budget=budget)
        return pb.TransactResponse(executed=pb.TransactExecuted(results=results))

    async def _stream(
        self, lease: Lease, step: pb.TransactRequest.Stream
    ) -> AsyncIterator[pb.TransactResponse]:
        """Check and run one ``stream``: ``rows`` chunks, then ``executed`` with the count and
        tag (or the Postgres error, in-stream). No result limit applies. A chunk gRPC has not
        taken within the idle bound (a reader that stopped reading) ends the lease."""
        request = pb.ExecuteRequest(statements=[step.statement])
        plan, bound = await analyse(request, self.service.limits, self.service.role_map is not None)
        stats = self.service.stream_stats
        stats.counters["streams_num"] += 1
        result = pb.StatementResult(rows_affected=0)
        chunks = lease.stream(
            step.statement,
            plan.statements[0],
            bound[0],
            self.service.audit_needed(plan),
            step.chunk_rows,
        )
        try:
            async with contextlib.aclosing(chunks):
                async for chunk in chunks:
                    if chunk.columns:
                        result.columns.extend(chunk.columns)
                    result.rows_affected += len(chunk.rows)
                    await self._write_chunk(lease, chunk)
                    stats.sent(chunk)
        except StatementFailed as exc:
            yield pb.TransactResponse(executed=_executed_error(exc))
            return
        result.command_tag = f"SELECT {result.rows_affected}"
        yield pb.TransactResponse(executed=pb.TransactExecuted(results=[result]))

    async def _write_chunk(self, lease: Lease, chunk: pb.RowChunk) -> None:
        """Write *chunk* directly, once gRPC has taken the previous one (flow control), so a
        reader that stops reading can be timed: past the lease's next bound (the idle timeout
        counting from now) the lease ends with that bound's error."""
        lease.last_active = time.monotonic()
        bound = lease.next_bound(idle=True)
        write = self.context.write(pb.TransactResponse(rows=chunk))
        if bound is None:
            await write
            return
        try:
            await asyncio.wait_for(write, max(0.0, bound[0] - time.monotonic()))
        except TimeoutError:
            raise lease.timeout(bound[1]) from None

    async def _begin(self, begin: pb.TransactionOptions) -> Lease:
        """Lease a connection where the routing says (broker/flow/routing.py: a transaction
        begun read_only may run on a replica; any other on the primary, which then reads the
        commit's position behind COMMIT) and BEGIN."""
        options, bounds = self._options(begin), self._bounds()
        # A keyed COMMIT under a mapped role finds its claim prepared at BEGIN (`Lease.begin`);
        # a read-only transaction (on a replica, or not) cannot write one.
        ahead = not self.service.key_store_error and not begin.read_only
        router = self.service.router
        if not router.replicas:
            return await Lease.begin(self.service.pool, options, bounds, claim_ahead=ahead)
        routing = await router.choose(
            read_only=begin.read_only,
            plan=None,
            sqls=(),
            caller=self.caller,
            after_lsn=begin.after_lsn,
            isolation=begin.isolation,
        )

        def begin_on(target: Target) -> Awaitable[Lease]:
            return Lease.begin(target.pool, options, bounds, claim_ahead=ahead)

        lease, target = await run_on_replica_or_primary(router, routing, begin_on)
        lease.report_position = routing.report_position and not target.replica
        return lease

    def _options(self, options: pb.TransactionOptions) -> Batch:
        if options.isolation not in pb.IsolationLevel.values():
            raise StepRefused(f"unknown isolation level {options.isolation}")
        role_map = self.service.role_map
        return Batch(
            statements=(),
            plan=RequestPlan(statements=()),
            isolation=options.isolation,
            read_only=options.read_only,
            deferrable=options.deferrable,
            application_name=application_name(self.function, self.request_id),
            role=role_map.role_for(self.identity) if role_map is not None else None,
            reset_session=self.service.session_audit != "off",
            queue_key=self.key,
        )

    def _bounds(self) -> LeaseBounds:
        return LeaseBounds(
            deadline=self.deadline,
            idle_timeout=self.owner.idle_transaction_timeout,
            transaction_timeout=self.owner.transaction_timeout,
            statement_timeout=self.service.statement_timeout,
        )

    async def _release(self, end: End, error: BaseException | None) -> None:
        lease = self.lease
        assert lease is not None
        # gRPC cancels the stream at the deadline: name the bound, not the broken stream.
        if end is End.CLIENT_GONE and time.monotonic() >= (self.deadline or float("inf")):
            end = End.DEADLINE
        try:
            await lease.release(error)
        finally:  # also when cancelled meanwhile: the release itself runs on regardless
            self._account(lease, end, error)

    def _account(self, lease: Lease, end: End, error: BaseException | None) -> None:
        held_ms = int((time.monotonic() - lease.began_at) * 1000)
        self.owner.stats.ended(end, held_ms)
        if end.abnormal:
            log.warning(
                "lease ended abnormally",
                extra={
                    # sqlstate/statement_index/kind when a failure ended it
                    **(failure_fields(error) if isinstance(error, BrokerFailure) else {}),
                    "end": end.value,
                    "caller": self.caller,
                    "request_id": self.request_id,
                    "function": self.function,
                    "backend_pid": lease.conn.pg.backend_pid,
                    "held_ms": held_ms,
                    "error": _error_text(error),
                },
            )


def _error_text(error: BaseException | None) -> str | None:
    """What to log about the error that ended a lease: the broker's own messages, a
    Postgres error's SQLSTATE (its text may quote data), else only the type."""
    if error is None:
        return None
    if isinstance(error, BrokerFailure | StreamClosed):
        return str(error)
    if isinstance(error, StatementFailed):
        return f"SQLSTATE {error.error.sqlstate} (statement {error.statement_index})"
    return type(error).__name__


def _executed_error(exc: StatementFailed) -> pb.TransactExecuted:
    error = exc.error
    return pb.TransactExecuted(
        error=pb.DatabaseError(
            sqlstate=error.sqlstate,
            message=error.message,
            detail=error.detail,
            hint=error.hint,
            statement_index=exc.statement_index,
            severity=error.severity,
        ),
        error_code=exc.code,
    )


def _status_for(exc: BaseException) -> grpc.Status:
    """The status ending a stream: a `BrokerFailure` declares its own; the rest are mapped as
    for ``Execute``."""
    if isinstance(exc, StreamClosed):
        return _status.pack(Code.CANCELLED, f"{exc}; the transaction was rolled back")
    return status_for(failure_for(exc))


def transact_handler(service: TransactService) -> grpc.RpcMethodHandler:
    """The ``Transact`` method handler (the generated servicer base only answers
    UNIMPLEMENTED)."""
    return grpc.stream_stream_rpc_method_handler(
        service.Transact,
        request_deserializer=pb.TransactRequest.FromString,
        response_serializer=pb.TransactResponse.SerializeToString,
    )
