"""The gate in front of the Broker's handlers: every call is authenticated before it runs.

`AuthGate.add_service` registers a service's handlers on the server, each wrapped once
(`AuthGate.wrap`) so that it authenticates its call from that call's metadata before the
servicer runs; no interceptor runs per call, and the services registered without the gate
(health checks, reflection) stay open so load balancers can probe the broker. The handler runs
with `current_identity` set to the caller (for the role map and per-caller limits).

A refused call ends with the `AuthError`'s status (UNAUTHENTICATED, PERMISSION_DENIED or
UNAVAILABLE), a ``google.rpc.ErrorInfo`` with the same reason and, for UNAVAILABLE, a
``RetryInfo``; it adds one to ``auth_failures`` in the stats and logs a line with the reason
and the caller ARN when known, never the token (at most `LogBudget` lines per window). The
refusal is answered after a hold when its source keeps being refused (`Tarpit`; counted in
``auth_held``).
"""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import Iterable, Mapping
from typing import Any

import grpc

from broker.security.identity import (
    Authenticator,
    AuthError,
    AuthStats,
    Identity,
    NoAuth,
    current_identity,
)
from broker.security.stsgate import peer_host
from broker.security.tarpit import Tarpit
from lambda_client._status import FUNCTION_NAME_KEY, Code, Reason, pack

__all__ = ["AuthGate", "LogBudget"]

log = logging.getLogger("pgbroker.auth")


class AuthGate:
    """Authenticates the calls of the services it guards with *authenticator*, counting
    refusals in *stats* (the authenticator's own stats when it has them) and holding those of
    sources that keep being refused (*tarpit*)."""

    def __init__(
        self,
        authenticator: Authenticator,
        stats: AuthStats | None = None,
        *,
        log_budget: LogBudget | None = None,
        tarpit: Tarpit | None = None,
    ) -> None:
        self.authenticator = authenticator
        self.stats = stats or getattr(authenticator, "stats", None) or AuthStats()
        self._log_budget = log_budget or LogBudget()
        self.tarpit = tarpit or Tarpit()
        # PGBROKER_AUTH=none admits everyone as the same identity: no metadata to read.
        self._anonymous: Identity | None = (
            NoAuth.anonymous if isinstance(authenticator, NoAuth) else None
        )

    def add_service(
        self,
        server: grpc.aio.Server,
        service_name: str,
        handlers: Mapping[str, grpc.RpcMethodHandler],
    ) -> None:
        """Register *handlers* (by method name) of *service_name* (``package.Service``) on
        *server*, each authenticating its calls first (`wrap`)."""
        wrapped = {
            name: self.wrap(f"/{service_name}/{name}", handler)
            for name, handler in handlers.items()
        }
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(service_name, wrapped),)
        )
        server.add_registered_method_handlers(service_name, wrapped)

    def wrap(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        """*handler* (of *method*, ``/package.Service/Method``) authenticating each call
        first, from that call's metadata; a refused call is aborted with the `AuthError`'s
        status and never reaches *handler*."""
        return _wrap_handler(handler, self, method)

    async def admit_call(self, method: str, context: grpc.aio.ServicerContext) -> Identity:
        """The caller of *context*'s call of *method*, authenticated from its metadata; a
        refused call is aborted (`abort_with_status` raises)."""
        if self._anonymous is not None:
            return self._anonymous
        metadata = _metadata_dict(context.invocation_metadata())
        return await self._admit(method, metadata, context)

    async def _admit(
        self, method: str, metadata: Mapping[str, str], context: grpc.aio.ServicerContext
    ) -> Identity:
        source = peer_host(context.peer())
        try:
            return await self.authenticator.authenticate(metadata, source)
        except AuthError as exc:
            self.stats.auth_failures += 1
            if self._log_budget.take():
                log.warning(
                    "auth refused %s: %s (caller %s, function %s)",
                    method,
                    exc.message,
                    exc.caller_arn or "unknown",
                    metadata.get(FUNCTION_NAME_KEY, "-")[:64],
                    extra={"suppressed": self._log_budget.pop_suppressed()},
                )
            status = pack(
                exc.code,
                exc.message,
                reason=exc.reason,
                metadata=exc.metadata,
                retry_after=exc.retry_after,
            )
            counted = exc.counts_against_source
        # Held outside the except block, so that the refusal's traceback (and the frames and
        # token it references) is freed first: a held call keeps only its status.
        await self._hold(source, counted)
        await context.abort_with_status(status)
        raise AssertionError("abort_with_status raises")  # keeps type checkers content

    async def _hold(self, source: str, counted: bool) -> None:
        """Count a refusal against *source* if *counted*, and hold it if *source* is over its
        budget (`Tarpit`).

        An UNAVAILABLE refusal is not counted (STS or a secret out of reach refuses every
        caller alike) unless the address's own STS refusals caused it (`SourceThrottled`):
        ``AuthError.counts_against_source``. Any is held from an address over its budget."""
        if await self.tarpit.hold_refusal(source, count=counted):
            self.stats.auth_held += 1


def _metadata_dict(metadata: Iterable[tuple[str, str | bytes]] | None) -> dict[str, str]:
    result: dict[str, str] = {}
    for key, value in metadata or ():
        if isinstance(value, str):
            result.setdefault(key.lower(), value)
    return result


class LogBudget:
    """At most *per_window* log lines per *window* seconds, so a flood of bad requests cannot
    flood the logs; the next line logged says how many were suppressed (the counter in
    GetStats, ``auth_failures``, stays exact)."""

    def __init__(self, per_window: int = 20, window: float = 10.0) -> None:
        self.per_window = per_window
        self.window = window
        self._started = time.monotonic()
        self._used = 0
        self._suppressed = 0

    def take(self) -> bool:
        now = time.monotonic()
        if now - self._started >= self.window:
            self._started, self._used = now, 0
        if self._used < self.per_window:
            self._used += 1
            return True
        self._suppressed += 1
        return False

    def pop_suppressed(self) -> int:
        suppressed, self._suppressed = self._suppressed, 0
        return suppressed


def _wrap_handler(
    handler: grpc.RpcMethodHandler, gate: AuthGate, method: str
) -> grpc.RpcMethodHandler:
    """The same handler, authenticating first (`AuthGate.admit_call`) and running with
    `current_identity` set.

    grpc.aio runs each RPC in its own task (its own context), so the identity set here is
    seen by that RPC's handler only and needs no reset. A unary request is decoded only after
    authentication, and a request that is not valid protobuf (bad UTF-8, nesting too deep)
    gets INVALID_ARGUMENT/BAD_REQUEST rather than gRPC's UNKNOWN.
    """
    h: Any = handler
    kwargs = {
        "request_deserializer": h.request_deserializer,
        "response_serializer": h.response_serializer,
    }

    async def admit(context: grpc.aio.ServicerContext) -> None:
        current_identity.set(await gate.admit_call(method, context))

    if h.unary_unary is not None:
        inner_uu = h.unary_unary
        decode = h.request_deserializer
        kwargs["request_deserializer"] = None  # raw bytes; decoded below, after admission
        # Known at wrap time: a coroutine function's result is awaited without asking what
        # it is (`_maybe_await`), on every call.
        is_coroutine = inspect.iscoroutinefunction(inner_uu)

        async def unary_unary(raw: Any, context: grpc.aio.ServicerContext) -> Any:
            # PGBROKER_AUTH=none: the same identity for every call, without a coroutine.
            identity = gate._anonymous
            if identity is None:
                identity = await gate.admit_call(method, context)
            current_identity.set(identity)
            request = raw
            if decode is not None and isinstance(raw, bytes):
                try:
                    request = decode(raw)
                except Exception as exc:  # protobuf DecodeError (bad UTF-8, too deep, corrupt)
                    await _refuse_undecodable(exc, context)
                    raise
            if is_coroutine:
                return await inner_uu(request, context)
            return await _maybe_await(inner_uu(request, context))

        return grpc.unary_unary_rpc_method_handler(unary_unary, **kwargs)
    if h.stream_unary is not None:
        inner_su = h.stream_unary

        async def stream_unary(requests: Any, context: grpc.aio.ServicerContext) -> Any:
            await admit(context)
            return await _maybe_await(inner_su(requests, context))

        return grpc.stream_unary_rpc_method_handler(stream_unary, **kwargs)
    inner = h.unary_stream or h.stream_stream
    factory = (
        grpc.unary_stream_rpc_method_handler
        if h.unary_stream is not None
        else grpc.stream_stream_rpc_method_handler
    )

    async def streaming(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await admit(context)
        responses = inner(request, context)
        if hasattr(responses, "__aiter__"):
            async for response in responses:
                yield response
        elif responses is not None and not inspect.isawaitable(responses):
            for response in responses:
                yield response
        else:
            await _maybe_await(responses)

    return factory(streaming, **kwargs)


async def _refuse_undecodable(exc: Exception, context: grpc.aio.ServicerContext) -> None:
    """Abort a call whose request is not a valid message: INVALID_ARGUMENT, BAD_REQUEST."""
    message = f"the request is not a valid message: {str(exc)[:200]}"
    status = pack(Code.INVALID_ARGUMENT, message, reason=Reason.BAD_REQUEST)
    await context.abort_with_status(status)


async def _maybe_await(value: Any) -> Any:
    return await value if inspect.isawaitable(value) else value
