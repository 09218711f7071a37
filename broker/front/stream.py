"""``Broker.Stream``: one large read outside a transaction, its rows streamed in chunks.

The statement passes the checks of a batch's (request limits, the session-state guard,
parameters; role mapping and the session audit apply) and runs through a server-side cursor
in a READ ONLY transaction (`broker.flow.stream.stream_rows`). The result limits
(``PGBROKER_MAX_RESULT_ROWS`` / ``_BYTES``) do not apply: they bound buffered results only.

Each chunk is written only once gRPC has taken the one before (``await context.write``: HTTP/2
flow control holds it while the reader does not read), so a slow reader slows the cursor down
instead of filling the broker's memory. A reader that stops reading for
``PGBROKER_IDLE_TRANSACTION_TIMEOUT`` gets DEADLINE_EXCEEDED (reason
``IDLE_TRANSACTION_TIMEOUT``) and its connection is freed; one that cancels the call frees it at
once. Failures end the call with the status ``Execute`` would give (broker/front/service.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc

from broker.errors import BrokerFailure, Code, Reason
from broker.flow.batch import Batch, application_name
from broker.flow.routing import stream_on_replica_or_primary
from broker.flow.stream import StreamStats, stream_rows
from broker.front.service import BrokerService, analyse, lambda_metadata
from broker.front.status import failure_for, status_for
from broker.pooling.targets import Target
from broker.security.identity import current_identity
from broker.security.limits import caller_key
from lambda_client._proto.pgbroker.v1 import broker_pb2 as pb

__all__ = ["ReaderStalled", "StreamService", "stream_handler"]

log = logging.getLogger("pgbroker.stream")


class ReaderStalled(BrokerFailure):
    """The caller read no chunk for the idle timeout: DEADLINE_EXCEEDED, reason
    IDLE_TRANSACTION_TIMEOUT; the cursor is closed and the connection freed."""

    code = Code.DEADLINE_EXCEEDED
    reason = Reason.IDLE_TRANSACTION_TIMEOUT


class StreamService:
    """Serves ``Stream`` with the pool, limits, role map and audit policy of *service*;
    *idle_timeout* (seconds, 0: off) bounds the wait for the reader between chunks."""

    def __init__(self, service: BrokerService, *, idle_timeout: float, stats: StreamStats) -> None:
        self.service = service
        self.idle_timeout = idle_timeout
        self.stats = stats

    async def Stream(
        self, request: pb.StreamRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> None:
        service = self.service
        request_id, function = lambda_metadata(context.invocation_metadata())
        remaining = context.time_remaining()
        deadline = time.monotonic() + remaining if remaining is not None else None
        identity = current_identity.get()
        caller = str(identity) if identity is not None and identity.kind != "none" else None
        key = caller_key(caller, function)  # queued and counted as Execute and Transact are
        try:
            with service.inflight.hold(key):
                plan, bound = await analyse(
                    pb.ExecuteRequest(statements=[request.statement]),
                    service.limits,
                    service.role_map is not None,
                )
                role = service.role_map.role_for(identity) if service.role_map else None
                options = Batch(
                    statements=(),
                    plan=plan,
                    application_name=application_name(function, request_id),
                    role=role,
                    audit_session=service.audit_needed(plan),
                    reset_session=service.session_audit != "off",
                    queue_key=key,
                )
                self.stats.counters["streams_num"] += 1
                routing = await service.router.choose(
                    read_only=request.read_only,
                    plan=plan,
                    sqls=[request.statement.sql],
                    caller=caller,
                    after_lsn=request.after_lsn,
                )

                def open_stream(target: Target) -> AsyncIterator[pb.RowChunk]:
                    return stream_rows(
                        target.pool,
                        options,
                        request.statement,
                        plan.statements[0],
                        bound[0],
                        deadline,
                        service.statement_timeout,
                        request.chunk_rows,
                    )

                chunks = stream_on_replica_or_primary(service.router, routing, open_stream)
                async with contextlib.aclosing(chunks):
                    async for chunk in chunks:
                        await self._write(context, chunk)
        except Exception as exc:
            failure = failure_for(exc)
            log.info(
                "stream failed",
                extra={
                    "request_id": request_id,
                    "function": function,
                    "caller": caller,
                    "code": failure.code.name,
                    "error": str(failure),
                },
            )
            await context.abort_with_status(status_for(failure))

    async def _write(self, context: grpc.aio.ServicerContext[Any, Any], chunk: pb.RowChunk) -> None:
        """Write *chunk* once gRPC has room for it; raise `ReaderStalled` past the idle
        timeout."""
        write = context.write(chunk)
        try:
            if self.idle_timeout:
                await asyncio.wait_for(write, self.idle_timeout)
            else:
                await write
        except TimeoutError:
            raise ReaderStalled(
                f"the reader took no rows for {self.idle_timeout:g}s"
                " (PGBROKER_IDLE_TRANSACTION_TIMEOUT): the stream was ended and its connection"
                " freed"
            ) from None
        self.stats.sent(chunk)


def stream_handler(service: StreamService) -> grpc.RpcMethodHandler:
    """The ``Stream`` method handler (a coroutine writing with ``context.write``)."""
    return grpc.unary_stream_rpc_method_handler(
        service.Stream,
        request_deserializer=pb.StreamRequest.FromString,
        response_serializer=pb.RowChunk.SerializeToString,
    )
