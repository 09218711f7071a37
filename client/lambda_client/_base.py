"""What `BrokerClient` and `lambda_client.aio.AsyncBrokerClient` share: settings, the calls
their public methods make, the one plan every call follows, metadata and the channel's life.

A driver supplies only its I/O: how it gets the channel's `Link` (`_get_link`), how it
sleeps (`_sleep`) and how it runs a plan's steps (`lambda_client._policy.run_plan`, or
awaiting each step).
"""

from __future__ import annotations

import functools
import json
import os
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from lambda_client import _position, errors
from lambda_client._config import ClientConfig, open_channel
from lambda_client._grpc import grpc
from lambda_client._policy import (
    SAFETY_ATTEMPTS,
    Call,
    CallPolicy,
    Invoke,
    Link,
    Metadata,
    Plan,
    _uniform,
    logger,
    time_left,
)
from lambda_client._proto.pgbroker.v1 import broker_pb2 as pb
from lambda_client._proto.pgbroker.v1 import broker_pb2_grpc as pb_grpc
from lambda_client._requests import (
    LambdaContext,
    Statement,
    check_target,
    many_statements,
    query_request,
    transaction_request,
)
from lambda_client._result import Result, results_of
from lambda_client._status import FUNCTION_NAME_KEY, REQUEST_ID_KEY, Reason
from lambda_client.auth import auth_for

__all__ = ["DEFAULT_TARGET", "AuthHook", "ClientBase", "channel_options"]

DEFAULT_TARGET = "127.0.0.1:50051"
# Resends of a rolled-back transaction when max_attempts is not given.
DEFAULT_MAX_ATTEMPTS = 5
HEALTH_CHECK_SERVICE = "pgbroker.v1.Broker"
USER_AGENT = "pgbroker-lambda-client/0.1"
CORRELATION_ID_KEY = "x-correlation-id"

# A callable returning metadata to add to every attempt, e.g. ("authorization", "Bearer …").
AuthHook = Callable[[], Sequence[tuple[str, str]]]
T = TypeVar("T")


class ClientBase:
    """Configuration and call policy shared by both clients; arguments as on `BrokerClient`,
    plus *config* (default: `ClientConfig.from_env`, read here, once)."""

    _sleep: Callable[[float], Any]  # time.sleep, or asyncio.sleep
    _aio = False  # whether channels are grpc.aio ones

    def __init__(
        self,
        target: str | None = None,
        *,
        timeout: float = 30.0,
        deadline_margin: float = 0.5,
        tls: bool | None = None,
        root_certificates: bytes | None = None,
        tls_server_name: str | None = None,
        auth: AuthHook | None = None,
        max_attempts: int | None = None,
        initial_backoff: float = 0.05,
        max_backoff: float = 1.0,
        correlation_id: Callable[[], str | None] | None = None,
        keepalive_time: float = 30.0,
        keepalive_timeout: float = 5.0,
        reconnect_after_idle: float = 240.0,
        max_message_bytes: int = 64 * 1024 * 1024,
        health_check: bool = True,
        options: Sequence[tuple[str, Any]] = (),
        config: ClientConfig | None = None,
        idempotency: bool = True,
    ) -> None:
        # No max_attempts: work that did not run is resent until the deadline (up to
        # SAFETY_ATTEMPTS), a rolled-back transaction 5 times; given, it bounds both.
        self.policy = CallPolicy(
            timeout,
            deadline_margin,
            DEFAULT_MAX_ATTEMPTS if max_attempts is None else max_attempts,
            initial_backoff,
            max_backoff,
            SAFETY_ATTEMPTS if max_attempts is None else max_attempts,
        )
        config = ClientConfig.from_env() if config is None else config
        self._choose_target(target, config)
        self.config = config.replace(
            tls=config.tls if tls is None else tls,
            tls_server_name=tls_server_name or config.tls_server_name,
        )
        self.tls = self.config.tls
        self.root_certificates = root_certificates
        # Default credentials from PGBROKER_AUTH (iam | token | none), see lambda_client/auth.py.
        self.auth = auth if auth is not None else auth_for(config, default_audience=self.target)
        self.correlation_id = correlation_id
        self.reconnect_after_idle = reconnect_after_idle
        self.channel_options = channel_options(
            keepalive_time=keepalive_time,
            keepalive_timeout=keepalive_timeout,
            max_message_bytes=max_message_bytes,
            health_check_service=HEALTH_CHECK_SERVICE if health_check else None,
            overrides=options,
        )
        self._lock = threading.Lock()
        self._channel: Any = None  # grpc.Channel or grpc.aio.Channel, created on first use
        self._link: Link | None = None  # the stub on self._channel
        self._last_used = (0.0, 0.0)  # (monotonic, wall clock) at the end of the last call
        self.channels_created = 0
        # Exactly-once: a key generated for every call that may write (docs/client.md);
        # turned off for good when the broker says it has no key store.
        self.idempotency = idempotency

    def _choose_target(self, target: str | None, config: ClientConfig) -> None:
        """``target``, else ``PGBROKER_URL``, else the loopback default. Inside a Lambda the
        default cannot work: the first call says so (`_unusable`), not the constructor, so a
        module-level client never breaks the Lambda's init phase."""
        self._unusable: str | None = None
        self.target_is_default = False
        if target is not None:
            self.target = check_target(target)
        elif config.target:  # an empty PGBROKER_URL counts as unset (from_env makes it None)
            self.target = check_target(config.target, "PGBROKER_URL")
        else:
            self.target = DEFAULT_TARGET
            self.target_is_default = True
            if config.lambda_function:
                self._unusable = no_target_in_lambda(config.lambda_function)

    # -- what the public methods ask for ---------------------------------------------------

    def _query(
        self,
        sql: str,
        params: Sequence[Any] | None,
        idempotency_key: str | None = None,
        read_only: bool = False,
    ) -> Call[Result]:
        """`query`: one statement, autocommit (with *read_only*, in a READ ONLY
        transaction, which a broker with read replicas may run on one); `TypeError` for an
        unmappable parameter."""
        request = query_request(sql, params, read_only)
        return self._keyed(request, lambda r: results_of(r)[0], False, idempotency_key)

    def _transaction(
        self,
        statements: Sequence[Statement],
        isolation: str | None,
        read_only: bool,
        deferrable: bool,
        retry_serialization: bool,
        idempotency_key: str | None = None,
    ) -> Call[list[Result]]:
        """`transaction`; `TypeError`/`ValueError` for a bad argument. An empty one sends
        nothing."""
        request = transaction_request(statements, isolation, read_only, deferrable)
        if not request.statements:
            return Call(None, _all_results, retry_serialization)
        return self._keyed(request, _all_results, retry_serialization, idempotency_key)

    def _execute_many(
        self,
        sql: str,
        param_sets: Sequence[Sequence[Any]],
        retry_serialization: bool,
        idempotency_key: str | None = None,
    ) -> Call[list[Result]]:
        """`execute_many`: *sql* once per parameter set, in one transaction."""
        statements = many_statements(sql, param_sets)
        return self._transaction(
            statements, None, False, False, retry_serialization, idempotency_key
        )

    def _keyed(
        self,
        request: pb.ExecuteRequest,
        finish: Callable[[Any], T],
        retry_aborted: bool,
        idempotency_key: str | None,
    ) -> ExecuteCall[T]:
        """An ``Execute`` call with its idempotency key: *idempotency_key*, else one generated
        for this call (kept across its retries) unless keys are off or it is read-only; and
        this process's read-your-writes position (`lambda_client._position`)."""
        request.options.after_lsn = _position.latest(self.target)
        if idempotency_key is not None:
            if not isinstance(idempotency_key, str) or not idempotency_key:
                raise ValueError("idempotency_key must be a non-empty string")
            request.idempotency_key = idempotency_key
            generated = False
        else:
            generated = self.idempotency and not request.options.read_only
            if generated:
                # 128 random bits, as uuid4 has, without importing uuid (and platform) on a
                # cold start.
                request.idempotency_key = f"pgbroker-{os.urandom(16).hex()}"
        return ExecuteCall(
            _execute(request), finish, retry_aborted, request=request, generated_key=generated
        )

    @staticmethod
    def _stats() -> Call[dict[str, int]]:
        """`stats`: the replica's GetStats figures."""
        return Call(_get_stats, lambda r: dict(r.stats))

    # -- the plan every call follows -------------------------------------------------------

    def _plan(self, call: Call[T], context: LambdaContext | None, timeout: float | None) -> Plan[T]:
        """Attempt *call* until success, an error that must not be resent, the attempt bound
        (`CallPolicy.retry_delay`) or the deadline (from *context* and *timeout*,
        `CallPolicy.deadline`); each piece of I/O is a yielded step (`lambda_client._policy`).
        An ``Execute`` with an idempotency key is also resent after an unknown outcome
        (`execute_backoff_or_raise`). Raise `errors.InterfaceError` at once when the client
        has no usable target."""
        if self._unusable is not None:
            raise errors.InterfaceError(self._unusable)
        if call.invoke is None:
            return call.finish(None)
        started = time.monotonic()
        deadline = self.policy.deadline(context, timeout)
        attempt = 0
        while True:
            attempt += 1
            link = self._get_link()
            metadata = self._metadata(context)
            if not link.reached:
                left = time_left(deadline, attempt)
                yield from link.reach(left, self.target, started, self._explain)
            sent = time.monotonic()
            try:
                # Measured after the channel, credentials and check: the call must not outlive it.
                left = time_left(deadline, attempt)
                response = yield _bind(call.invoke, link.stub, left, metadata)
            except grpc.RpcError as exc:
                link.call_failed(exc)
                took = time.monotonic() - sent
                if isinstance(call, ExecuteCall):
                    unkeyed = self._without_key(call, exc)
                    if unkeyed is not None:
                        call = unkeyed  # nothing ran: resend at once, without the key
                        continue
                    delay = execute_backoff_or_raise(
                        self.policy, call, exc, attempt, deadline, started, took
                    )
                else:
                    delay = self.policy.backoff_or_raise(
                        exc, attempt, deadline, call.retry_aborted, started, took
                    )
                yield _bind(self._sleep, delay)
            else:
                link.reached = True
                if isinstance(call, ExecuteCall):
                    _position.seen(self.target, response.commit_lsn)
                return call.finish(response)
            finally:
                self._mark_used()

    def _without_key(self, call: ExecuteCall[T], exc: grpc.RpcError) -> ExecuteCall[T] | None:
        """*call* without its generated key when the broker has no key store (it then ran
        nothing); None otherwise. Keys stay off for this client afterwards."""
        if not call.generated_key or errors.from_rpc_error(exc).reason != _NO_STORE:
            return None
        self.idempotency = False
        request = pb.ExecuteRequest()
        request.CopyFrom(call.request)
        request.idempotency_key = ""
        return ExecuteCall(
            _execute(request), call.finish, call.retry_aborted, request=request, generated_key=False
        )

    def _explain(self, last_error: str, probe_seconds: float) -> str:
        """Why the broker was not reached (`lambda_client._diagnose.explain`, probing for
        at most *probe_seconds*), and that the default target was used when it was.
        Imported here: the probe needs ssl and socket, which a call that connects never does."""
        from lambda_client._diagnose import DEFAULT_TARGET_NOTE, explain

        why = explain(last_error, tls=self.tls, probe_timeout=probe_seconds)
        if self.target_is_default:
            why = f"{why}; {DEFAULT_TARGET_NOTE}" if why else DEFAULT_TARGET_NOTE
        return why

    def _get_link(self) -> Link:
        """The stub on the channel to use now (the driver's)."""
        raise NotImplementedError

    # -- metadata and the channel's life ---------------------------------------------------

    def _metadata(self, context: LambdaContext | None) -> Metadata:
        if context is None and self.correlation_id is None and self.auth is None:
            return ()  # no list to keep alive while the call is in flight (grpc takes either)
        metadata: list[tuple[str, str]] = []
        if context is not None:
            if request_id := getattr(context, "aws_request_id", None):
                metadata.append((REQUEST_ID_KEY, _ascii(request_id)))
            if function_name := getattr(context, "function_name", None):
                metadata.append((FUNCTION_NAME_KEY, _ascii(function_name)))
        if self.correlation_id is not None and (correlation := self.correlation_id()):
            metadata.append((CORRELATION_ID_KEY, _ascii(correlation)))
        if self.auth is not None:
            metadata.extend(self.auth())
        return metadata

    def _mark_used(self) -> None:
        self._last_used = (time.monotonic(), time.time())

    def _stale(self) -> bool:
        """Whether the channel must be replaced: none yet, or idle too long."""
        if self._link is None:
            return True
        # Wall clock too: a frozen container's monotonic clock may not advance while frozen.
        mono, wall = self._last_used
        if mono == 0.0:
            return False
        idle = max(time.monotonic() - mono, time.time() - wall)
        return idle > self.reconnect_after_idle

    def _new_channel(self) -> Any:
        """A new channel (``grpc.aio`` for the asyncio client) as configured."""
        return open_channel(
            self.target,
            self.config,
            self.channel_options,
            root_certificates=self.root_certificates,
            aio=self._aio,
        )

    def _replace_channel(self) -> Any:
        """Replace the channel with a new one; return the old one (None at first), for the
        driver to close."""
        old, self._channel = self._channel, self._new_channel()
        self._link = Link(self._channel, aio=self._aio)
        self._mark_used()
        self.channels_created += 1
        return old

    def __repr__(self) -> str:
        return f"{type(self).__name__}(target={self.target!r}, tls={self.tls})"


def channel_options(
    *,
    keepalive_time: float = 30.0,
    keepalive_timeout: float = 5.0,
    max_message_bytes: int = 64 * 1024 * 1024,
    health_check_service: str | None = HEALTH_CHECK_SERVICE,
    overrides: Sequence[tuple[str, Any]] = (),
) -> list[tuple[str, Any]]:
    """Channel arguments for a Lambda client: round-robin, health checks, keepalive, no BDP
    probe, quick reconnects, then *overrides* (which replace a default of the same key: gRPC
    would take the first of two).

    With *health_check_service*, round-robin only picks replicas whose ``grpc.health.v1``
    status for that service is SERVING (gRPC client-side health checking, a ``Watch`` stream
    per connection): a broker that starts shutting down reports NOT_SERVING and stops getting
    new calls before it stops accepting them, so no call races its shutdown. A broker without
    the health service counts as healthy.

    Keepalive pings (also between calls) find a connection that died while the container was
    frozen within *keepalive_timeout*; the broker must permit pings that often
    (``grpc.http2.min_ping_interval_without_data_ms`` ≤ *keepalive_time*, and
    ``grpc.keepalive_permit_without_calls``) or it answers with GOAWAY ``too_many_pings``.
    Reconnect backoff is capped at 2 s (gRPC's default cap is 120 s), so a broker that
    restarts is found again within a Lambda's deadline.
    """
    service_config: dict[str, Any] = {"loadBalancingConfig": [{"round_robin": {}}]}
    if health_check_service is not None:
        service_config["healthCheckConfig"] = {"serviceName": health_check_service}
    defaults: list[tuple[str, Any]] = [
        ("grpc.service_config", json.dumps(service_config)),
        ("grpc.keepalive_time_ms", int(keepalive_time * 1000)),
        ("grpc.keepalive_timeout_ms", int(keepalive_timeout * 1000)),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
        # No BDP probe (a PING and its ACK with nearly every call that follows an idle
        # spell); a fixed 4 MiB receive window instead keeps big results as fast as the
        # probe's window did (docs/performance.md, "HTTP/2 pings").
        ("grpc.http2.bdp_probe", 0),
        ("grpc.http2.lookahead_bytes", 4 << 20),
        ("grpc.initial_reconnect_backoff_ms", 100),
        ("grpc.max_reconnect_backoff_ms", 2000),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.primary_user_agent", USER_AGENT),
        # A channel owns its connections: otherwise gRPC shares subchannels between channels
        # with the same target and arguments, and a replacement channel (after a long idle)
        # would inherit the very connection it is meant to replace.
        ("grpc.use_local_subchannel_pool", 1),
    ]
    overridden = {key for key, _ in overrides}
    return [o for o in defaults if o[0] not in overridden] + list(overrides)


_NO_STORE = Reason.IDEMPOTENCY_UNAVAILABLE.value
_IN_PROGRESS = Reason.IDEMPOTENCY_KEY_IN_PROGRESS.value


class ExecuteCall(Call[T]):
    """An ``Execute`` call: its *request* (with the idempotency key, if any) and whether the
    client generated that key."""

    __slots__ = ("generated_key", "request")

    def __init__(
        self,
        invoke: Invoke,
        finish: Callable[[Any], T],
        retry_aborted: bool,
        *,
        request: pb.ExecuteRequest,
        generated_key: bool,
    ) -> None:
        super().__init__(invoke, finish, retry_aborted)
        self.request = request
        self.generated_key = generated_key

    @property
    def idempotent(self) -> bool:
        """Whether resending after an unknown outcome is safe: a key, or read-only work."""
        return bool(self.request.idempotency_key) or self.request.options.read_only


def execute_backoff_or_raise(
    policy: CallPolicy,
    call: ExecuteCall[Any],
    exc: grpc.RpcError,
    attempt: int,
    deadline: float,
    started: float | None = None,
    took: float = 0.0,
) -> float:
    """`CallPolicy.backoff_or_raise` for an ``Execute``: an unknown outcome is resent when
    *call* is idempotent (its key makes the broker answer a committed attempt from its store)
    and raises `errors.OutcomeUnknown` otherwise, never `errors.Unavailable`; an attempt that
    found the key still held by an earlier one waits and resends."""
    error = errors.from_rpc_error(exc)
    unknown = errors.outcome_unknown(exc, error)
    if not unknown and not (call.idempotent and error.reason == _IN_PROGRESS):
        return policy.backoff_or_raise(exc, attempt, deadline, call.retry_aborted, started, took)
    backoff = min(policy.max_backoff, policy.initial_backoff * 2 ** (attempt - 1))
    delay = (error.retry_after or 0.0) + _uniform(backoff / 2, backoff)
    # Safe to resend like work that did not run: until the deadline (or nothing_ran_attempts).
    safe = call.idempotent and attempt < policy.nothing_ran_attempts
    if safe and time.monotonic() + delay < deadline:
        logger.info(
            "pgbroker call's outcome unknown (%s), resending with its idempotency key in %.3fs"
            " (attempt %d)",
            error.reason or (error.code.name if error.code else type(error).__name__),
            delay,
            attempt,
        )
        return delay
    if not unknown:
        raise error from exc
    code = error.code.name if error.code else type(error).__name__
    logger.warning(
        "pgbroker call failed with %s; it may have run: %s",
        code,
        error.details,
        extra={
            "pgbroker_code": code,
            "reason": error.reason,
            "attempt": attempt,
            "outcome": "unknown",
        },
    )
    key = call.request.idempotency_key
    if key:
        advice = (
            f"after {attempt} attempts with idempotency key {key!r}; resending with the same"
            " key is safe: it runs at most once"
        )
    else:
        advice = "no idempotency key was sent, so resending may run it twice"
    raise errors.OutcomeUnknown(
        f"the request may or may not have committed ({error.details}); {advice}",
        code=error.code,
        reason=error.reason,
        retry_after=error.retry_after,
        metadata=error.metadata,
    ) from exc


def _execute(request: pb.ExecuteRequest) -> Invoke:
    """One ``Execute`` attempt of *request* (blocking or ``grpc.aio`` stub alike). A
    `functools.partial`, as `_bind`: two objects where a closure is four."""
    return functools.partial(_execute_once, request)


def _execute_once(
    request: pb.ExecuteRequest, stub: pb_grpc.BrokerStub, timeout: float, metadata: Metadata
) -> Any:
    return stub.Execute(request, timeout=timeout, metadata=metadata, wait_for_ready=True)


def _all_results(response: Any) -> list[Result]:
    return results_of(response) if response is not None else []


def _get_stats(stub: pb_grpc.BrokerStub, timeout: float, metadata: Metadata) -> Any:
    """One ``GetStats`` attempt (blocking or ``grpc.aio`` stub alike)."""
    return stub.GetStats(
        pb.GetStatsRequest(), timeout=timeout, metadata=metadata, wait_for_ready=True
    )


def no_target_in_lambda(function_name: str) -> str:
    """The error text for a client in Lambda *function_name* with no target configured."""
    return (
        f"no broker target: PGBROKER_URL is not set in Lambda function {function_name!r}, and "
        f"the default {DEFAULT_TARGET} (this Lambda's own loopback) has no broker: set "
        "PGBROKER_URL to the broker's address (e.g. dns:///broker.internal:50051), or pass "
        "BrokerClient(target=...); nothing was sent"
    )


def _bind(function: Callable[..., Any], *args: Any) -> Callable[[], Any]:
    """*function* with *args*, called later. A step lives as long as its I/O (all of a call's
    time in flight), and every object alive then is traversed by each collection of the
    cyclic garbage collector: a partial is two objects (itself, its arguments), a closure
    over *function* and *args* five."""
    return functools.partial(function, *args)


def _ascii(value: object) -> str:
    """Metadata values must be printable ASCII; replace anything else."""
    return "".join(c if " " <= c <= "~" else "?" for c in str(value))
