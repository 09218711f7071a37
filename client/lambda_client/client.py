"""`BrokerClient`: what a Lambda handler uses instead of a database driver.

Build one client at module level and reuse it across warm invocations::

    from lambda_client import BrokerClient

    db = BrokerClient()        # target from PGBROKER_URL; nothing connects yet

    def handler(event, context):
        return db.query("SELECT now()", context=context).scalar()

Nothing connects at construction: the gRPC channel is created on the first call and reused
(`channels_created` counts them). One call is one round trip; a `transaction` sends every
statement at once and the broker runs them between BEGIN and COMMIT on one pooled connection.

Deadlines: a call's budget is its *timeout*, else the client's (30 s by default); with a Lambda
*context* it is also cut to the invocation's remaining time minus *deadline_margin*. The
deadline travels to the broker, which drops queued work that can no longer start and cancels
a statement that outlives it. A call never outlives its deadline.

Retries happen only where nothing ran, and only inside the same deadline: RESOURCE_EXHAUSTED
(queue full, queue timeout) and UNAVAILABLE that the broker reports with a pgbroker reason or
``RetryInfo`` (database unreachable before BEGIN, shutting down), with jittered exponential
backoff that honours ``RetryInfo``. A call on a channel that is not connected waits for it to
connect; if its deadline passes first, it raises `Unavailable` (reason ``BROKER_UNREACHABLE``):
nothing was sent. gRPC itself resends a request that never left the client. DEADLINE_EXCEEDED,
CANCELLED, UNKNOWN and a transport failure mid-call are never retried: the transaction may
have run. ABORTED (40001/40P01) is retried only with
``transaction(..., retry_serialization=True)``, since the whole transaction is resent.
"""

from __future__ import annotations

import json
import os
import random
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import grpc

from lambda_client import errors
from lambda_client._proto.pgbroker.v1 import broker_pb2 as pb
from lambda_client._proto.pgbroker.v1 import broker_pb2_grpc as pb_grpc
from lambda_client._requests import (
    Statement,
    check_target,
    many_statements,
    query_request,
    remaining_seconds,
    seconds,
    target_ports,
    transaction_request,
)
from lambda_client.auth import auth_from_env
from lambda_client.codec import decode_row
from lambda_client.transaction import Transaction, open_transaction, run_transaction

__all__ = ["DEFAULT_TARGET", "BrokerClient", "LambdaContext", "Result", "Statement"]

DEFAULT_TARGET = "127.0.0.1:50051"
HEALTH_CHECK_SERVICE = "pgbroker.v1.Broker"
HEALTH_CHECK_METHOD = "/grpc.health.v1.Health/Check"
USER_AGENT = "pgbroker-lambda-client/0.1"

T = TypeVar("T")
# A callable returning metadata to add to every attempt, e.g. ("authorization", "Bearer …").
AuthHook = Callable[[], Sequence[tuple[str, str]]]
Metadata = list[tuple[str, str]]
# One attempt of a call: (stub, seconds left, metadata) -> response (an awaitable for aio).
Invoke = Callable[[pb_grpc.BrokerStub, float, Metadata], Any]

# Broker-reported reasons that guarantee nothing ran, so UNAVAILABLE may be retried.
_NOTHING_RAN_REASONS = frozenset({"POOL_UNAVAILABLE", "SHUTTING_DOWN"})
# The reason of the `Unavailable` the client raises when no connection was ready in time.
BROKER_UNREACHABLE = "BROKER_UNREACHABLE"


class LambdaContext(Protocol):
    """The parts of the Lambda context object the client reads."""

    aws_request_id: str
    function_name: str

    def get_remaining_time_in_millis(self) -> int: ...


@dataclass(frozen=True)
class Result:
    """The outcome of one statement: rows as tuples, column names, rows affected, tag.

    `rows_affected` is -1 when the command reports no count.
    """

    columns: tuple[str, ...]
    rows: list[tuple[Any, ...]]
    rows_affected: int
    command_tag: str
    type_oids: tuple[int, ...] = field(default=(), repr=False)

    @classmethod
    def from_proto(cls, result: pb.StatementResult) -> Result:
        return cls(
            columns=tuple(c.name for c in result.columns),
            rows=[decode_row(row.values) for row in result.rows],
            rows_affected=result.rows_affected,
            command_tag=result.command_tag,
            type_oids=tuple(c.type_oid for c in result.columns),
        )

    def __iter__(self) -> Iterator[tuple[Any, ...]]:
        return iter(self.rows)

    def __len__(self) -> int:
        return len(self.rows)

    def one(self) -> tuple[Any, ...]:
        """The only row; raise `LookupError` if there are none or several."""
        if len(self.rows) != 1:
            raise LookupError(f"expected exactly one row, got {len(self.rows)}")
        return self.rows[0]

    def one_or_none(self) -> tuple[Any, ...] | None:
        """The only row, or None if there are none; raise `LookupError` if there are several."""
        if len(self.rows) > 1:
            raise LookupError(f"expected at most one row, got {len(self.rows)}")
        return self.rows[0] if self.rows else None

    def scalar(self) -> Any:
        """The first column of the first row, or None if there are no rows."""
        return self.rows[0][0] if self.rows and self.rows[0] else None

    def dicts(self) -> list[dict[str, Any]]:
        """The rows as dicts keyed by column name (a later duplicate name wins)."""
        return [dict(zip(self.columns, row, strict=True)) for row in self.rows]


class _ClientBase:
    """Configuration and call policy (deadlines, retries, metadata, channel arguments) shared
    by `BrokerClient` and `lambda_client.aio.AsyncBrokerClient`; arguments as on
    `BrokerClient`."""

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
        max_attempts: int = 5,
        initial_backoff: float = 0.05,
        max_backoff: float = 1.0,
        correlation_id: Callable[[], str | None] | None = None,
        keepalive_time: float = 30.0,
        keepalive_timeout: float = 5.0,
        reconnect_after_idle: float = 240.0,
        max_message_bytes: int = 64 * 1024 * 1024,
        health_check: bool = True,
        options: Sequence[tuple[str, Any]] = (),
    ) -> None:
        self.timeout = seconds("timeout", timeout)
        self.deadline_margin = seconds("deadline_margin", deadline_margin, allow_zero=True)
        if max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        if target is None:
            # An empty PGBROKER_URL counts as unset.
            env_target = os.environ.get("PGBROKER_URL", "").strip()
            self.target = check_target(env_target, "PGBROKER_URL") if env_target else DEFAULT_TARGET
        else:
            self.target = check_target(target)
        self.tls = _env_flag("PGBROKER_TLS") if tls is None else tls
        self.root_certificates = root_certificates
        self.tls_server_name = tls_server_name
        # Default credentials from PGBROKER_AUTH (iam | token | none), see lambda_client/auth.py.
        self.auth = auth if auth is not None else auth_from_env(default_audience=self.target)
        self.max_attempts = max_attempts
        self.initial_backoff = initial_backoff
        self.max_backoff = max_backoff
        self.correlation_id = correlation_id
        self.keepalive_time = keepalive_time
        self.keepalive_timeout = keepalive_timeout
        self.reconnect_after_idle = reconnect_after_idle
        self.max_message_bytes = max_message_bytes
        self.health_check = health_check
        self.extra_options = tuple(options)
        self._lock = threading.Lock()
        self._channel: Any = None  # grpc.Channel or grpc.aio.Channel, created on first use
        self._link: Link | None = None  # the stub on self._channel
        self._last_used = (0.0, 0.0)  # (monotonic, wall clock) at the end of the last call
        self.channels_created = 0

    def _deadline(self, context: LambdaContext | None, timeout: float | None) -> float:
        """The call's monotonic deadline; raise `TypeError`/`ValueError` for a bad *timeout*
        or *context*, `DeadlineExceeded` if the context leaves no time (nothing is sent)."""
        budget = self.timeout if timeout is None else seconds("timeout", timeout)
        if context is not None:
            # A 15-minute function should not wait 15 minutes on one call (a broker that is
            # down makes a call wait for the channel until its deadline): the timeout caps it.
            remaining = remaining_seconds(context)
            if remaining <= self.deadline_margin:
                raise errors.DeadlineExceeded(
                    f"no time left for the call: the Lambda invocation has {remaining:.3f}s "
                    f"left, within the deadline margin of {self.deadline_margin}s; "
                    "nothing was sent",
                    code=grpc.StatusCode.DEADLINE_EXCEEDED,
                )
            budget = min(budget, remaining - self.deadline_margin)
        return time.monotonic() + budget

    def _retry_delay(
        self, error: errors.BrokerError, attempt: int, retry_aborted: bool
    ) -> float | None:
        """Seconds to wait before resending, or None if *error* must not be retried."""
        if attempt >= self.max_attempts:
            return None
        if isinstance(error, errors.Overloaded):
            # A crossed limit (PGBROKER_MAX_*, or gRPC's message size cap, which has no
            # reason) fails the same way again; only the in-flight limit sends RetryInfo,
            # since it clears as the caller's other requests finish.
            if error.reason in (None, "LIMIT_EXCEEDED") and error.retry_after is None:
                return None
        elif isinstance(error, errors.Unavailable):
            # Only when the broker itself says nothing ran; a transport failure mid-call
            # (no rich status) may hide a transaction that committed.
            if error.reason not in _NOTHING_RAN_REASONS and error.retry_after is None:
                return None
        elif not (retry_aborted and isinstance(error, errors.TransactionRollback)):
            return None
        backoff = min(self.max_backoff, self.initial_backoff * 2 ** (attempt - 1))
        if error.retry_after is not None:
            return error.retry_after + random.uniform(0, backoff)
        return random.uniform(backoff / 2, backoff)

    def _backoff_or_raise(
        self, exc: grpc.RpcError, attempt: int, deadline: float, retry_aborted: bool
    ) -> float:
        """Seconds to wait before resending after *exc*; raise its `BrokerError` (caused by
        *exc*) if it must not be retried or the wait would pass *deadline*."""
        error = errors.from_rpc_error(exc)
        delay = self._retry_delay(error, attempt, retry_aborted)
        if delay is None or time.monotonic() + delay >= deadline:
            raise error from exc
        return delay

    def _mark_used(self) -> None:
        self._last_used = (time.monotonic(), time.time())

    def _metadata(self, context: LambdaContext | None) -> list[tuple[str, str]]:
        metadata: list[tuple[str, str]] = []
        if context is not None:
            if request_id := getattr(context, "aws_request_id", None):
                metadata.append(("x-lambda-request-id", _ascii(request_id)))
            if function_name := getattr(context, "function_name", None):
                metadata.append(("x-lambda-function-name", _ascii(function_name)))
        if self.correlation_id is not None and (correlation := self.correlation_id()):
            metadata.append(("x-correlation-id", _ascii(correlation)))
        if self.auth is not None:
            metadata.extend(self.auth())
        return metadata

    def _idle_too_long(self) -> bool:
        # Wall clock too: a frozen container's monotonic clock may not advance while frozen.
        mono, wall = self._last_used
        if mono == 0.0:
            return False
        idle = max(time.monotonic() - mono, time.time() - wall)
        return idle > self.reconnect_after_idle

    def _channel_args(self) -> tuple[list[tuple[str, Any]], grpc.ChannelCredentials | None]:
        """Channel options and, with TLS, the credentials (None for plaintext)."""
        options = channel_options(
            keepalive_time=self.keepalive_time,
            keepalive_timeout=self.keepalive_timeout,
            max_message_bytes=self.max_message_bytes,
            health_check_service=HEALTH_CHECK_SERVICE if self.health_check else None,
        )
        if self.tls_server_name:
            options.append(("grpc.ssl_target_name_override", self.tls_server_name))
        # Caller options win over the defaults (gRPC would take the first of two equal keys).
        overridden = {key for key, _ in self.extra_options}
        options = [o for o in options if o[0] not in overridden] + list(self.extra_options)
        if not self.tls:
            return options, None
        roots = self.root_certificates
        if roots is None and (ca_file := os.environ.get("PGBROKER_TLS_CA_FILE")):
            with open(ca_file, "rb") as f:
                roots = f.read()
        # mTLS: a client certificate when the broker sets PGBROKER_TLS_CLIENT_CA.
        cert_file = os.environ.get("PGBROKER_TLS_CLIENT_CERT_FILE")
        key_file = os.environ.get("PGBROKER_TLS_CLIENT_KEY_FILE")
        chain = key = None
        if cert_file and key_file:
            with open(cert_file, "rb") as f:
                chain = f.read()
            with open(key_file, "rb") as f:
                key = f.read()
        credentials = grpc.ssl_channel_credentials(
            root_certificates=roots, private_key=key, certificate_chain=chain
        )
        return options, credentials


class BrokerClient(_ClientBase):
    """A client for one broker target (one or many replicas, round-robin).

    *target* is a gRPC target: ``dns:///broker.internal:50051`` (every address the name
    resolves to), ``ipv4:10.0.1.5:50051,10.0.2.7:50051`` or ``host:port``; default
    ``PGBROKER_URL``, then ``127.0.0.1:50051``. *timeout* (seconds) bounds every call unless
    the call passes its own; *deadline_margin* is kept back from a Lambda context's remaining
    time so the handler can still answer. *tls* (default ``PGBROKER_TLS`` in 1/true/yes) uses
    TLS with *root_certificates* (PEM bytes; default ``PGBROKER_TLS_CA_FILE``, else the system
    roots).
    *auth* returns metadata added to every attempt (tokens, signatures); by default it comes
    from ``PGBROKER_AUTH`` (`lambda_client.auth`). *max_attempts*,
    *initial_backoff* and *max_backoff* shape the retries described in the module docstring.
    *correlation_id* returns an id to send as ``x-correlation-id`` (e.g. powertools
    ``logger.get_correlation_id``). A channel idle longer than *reconnect_after_idle* seconds
    (a frozen Lambda whose connection a NAT or load balancer may have dropped silently) is
    replaced before the next call rather than trusted. With *health_check* (default) calls
    go only to replicas whose ``grpc.health.v1`` status is SERVING, so a replica that is
    shutting down gets no new calls (one more round trip when a connection opens).
    *options* are extra gRPC channel arguments; they override the defaults.

    Blocking; safe to share between threads.
    """

    # -- calls ----------------------------------------------------------------------------

    def query(
        self,
        sql: str,
        params: Sequence[Any] | None = None,
        *,
        context: LambdaContext | None = None,
        timeout: float | None = None,
    ) -> Result:
        """Run one statement on its own (autocommit) and return its `Result`.

        Raise `TypeError` naming the parameter if a value has no Postgres mapping (before
        anything is sent), or a `BrokerError` subclass if the call fails.
        """
        invoke = execute_call(query_request(sql, params))
        return results_of(self._call_with_retries(invoke, context, timeout, retry_aborted=False))[0]

    def transaction(
        self,
        statements: Sequence[Statement],
        *,
        isolation: str | None = None,
        read_only: bool = False,
        deferrable: bool = False,
        context: LambdaContext | None = None,
        timeout: float | None = None,
        retry_serialization: bool = False,
    ) -> list[Result]:
        """Run *statements* (``sql`` or ``(sql, params)``) as one transaction, one round trip.

        *isolation* is ``"read committed"``, ``"repeatable read"`` or ``"serializable"``.
        Return one `Result` per statement. On error everything is rolled back and the
        `DatabaseError` names the failing statement (`statement_index`). With
        *retry_serialization* a serialization failure or deadlock resends the transaction.
        """
        request = transaction_request(statements, isolation, read_only, deferrable)
        if not request.statements:
            return []
        response = self._call_with_retries(
            execute_call(request), context, timeout, retry_aborted=retry_serialization
        )
        return results_of(response)

    def execute_many(
        self,
        sql: str,
        param_sets: Sequence[Sequence[Any]],
        *,
        context: LambdaContext | None = None,
        timeout: float | None = None,
        retry_serialization: bool = False,
    ) -> list[Result]:
        """Run *sql* once per parameter set, all in one transaction; one `Result` each."""
        return self.transaction(
            many_statements(sql, param_sets),
            context=context,
            timeout=timeout,
            retry_serialization=retry_serialization,
        )

    def begin(
        self,
        *,
        isolation: str | None = None,
        read_only: bool = False,
        deferrable: bool = False,
        context: LambdaContext | None = None,
        timeout: float | None = None,
    ) -> Transaction:
        """Open an interactive transaction on a pooled connection the broker leases to it
        until it ends (`lambda_client.transaction`); use it as ``with db.begin(...) as tx:``.

        *timeout* and *context* bound the whole transaction. Raise as `query` when no
        connection could be leased (retried like a call while nothing ran)."""
        invoke = open_transaction(isolation, read_only, deferrable, Result.from_proto)
        transaction: Transaction = self._call_with_retries(
            invoke, context, timeout, retry_aborted=False
        )
        return transaction

    def run_transaction(
        self,
        fn: Callable[[Transaction], T],
        *,
        isolation: str | None = None,
        read_only: bool = False,
        deferrable: bool = False,
        context: LambdaContext | None = None,
        timeout: float | None = None,
    ) -> T:
        """Return ``fn(tx)`` run in a transaction (`begin`) and committed; re-run in a new
        transaction on a serialization failure or deadlock (40001, 40P01), up to
        *max_attempts* times within one deadline (*timeout*, *context*)."""
        deadline = self._deadline(context, timeout)
        return run_transaction(
            lambda left: self.begin(
                isolation=isolation,
                read_only=read_only,
                deferrable=deferrable,
                context=context,
                timeout=left,
            ),
            fn,
            deadline=deadline,
            max_attempts=self.max_attempts,
            initial_backoff=self.initial_backoff,
            max_backoff=self.max_backoff,
        )

    def stats(self, *, timeout: float | None = None) -> dict[str, int]:
        """The broker replica's pool and queue figures (``GetStats``)."""
        return dict(self._call_with_retries(stats_call, None, timeout, retry_aborted=False).stats)

    def close(self) -> None:
        """Close the channel; the next call opens a new one."""
        with self._lock:
            channel, self._channel, self._link = self._channel, None, None
        if channel is not None:
            channel.close()

    def __enter__(self) -> BrokerClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"BrokerClient(target={self.target!r}, tls={self.tls})"

    # -- internals ------------------------------------------------------------------------

    def _call_with_retries(
        self,
        invoke: Invoke,
        context: LambdaContext | None,
        timeout: float | None,
        *,
        retry_aborted: bool,
    ) -> Any:
        """Invoke until success, a non-retryable error, *max_attempts* or the deadline (from
        *context* and *timeout*, `_ClientBase._deadline`)."""
        started = time.monotonic()
        deadline = self._deadline(context, timeout)
        for attempt in range(1, self.max_attempts + 1):
            link = self._get_link()
            metadata = self._metadata(context)
            if not link.reached:
                self._reach(link, time_left(deadline, attempt), started)
            try:
                # Measured after the channel, credentials and check: the call must not outlive it.
                response = invoke(link.stub, time_left(deadline, attempt), metadata)
            except grpc.RpcError as exc:
                link.call_failed(exc)
                time.sleep(self._backoff_or_raise(exc, attempt, deadline, retry_aborted))
            else:
                link.reached = True
                return response
            finally:
                self._mark_used()
        raise AssertionError("unreachable: _backoff_or_raise raises after the last attempt")

    def _get_link(self) -> Link:
        """The stub on the shared channel, created on first use (or after a long idle)."""
        link = self._link
        if link is not None and not self._idle_too_long():
            return link
        with self._lock:
            if self._link is None or self._idle_too_long():
                old = self._channel
                self._channel = self._new_channel()
                self._link = Link(self._channel)
                self._mark_used()
                self.channels_created += 1
                if old is not None:
                    old.close()
            return self._link

    def _reach(self, link: Link, timeout: float, started: float) -> None:
        """Wait for *link* to reach the broker (`Link`); raise `broker_unreachable` if the
        deadline passes first."""
        try:
            link.health_check(b"", timeout=timeout, wait_for_ready=True)
        except grpc.RpcError as exc:
            link.check_failed(exc, self.target, started)
        else:
            link.reached = True

    def _new_channel(self) -> grpc.Channel:
        options, credentials = self._channel_args()
        if credentials is None:
            return grpc.insecure_channel(self.target, options=options)
        return grpc.secure_channel(self.target, credentials, options=options)


def channel_options(
    *,
    keepalive_time: float = 30.0,
    keepalive_timeout: float = 5.0,
    max_message_bytes: int = 64 * 1024 * 1024,
    health_check_service: str | None = HEALTH_CHECK_SERVICE,
) -> list[tuple[str, Any]]:
    """Channel arguments for a Lambda client: round-robin, health checks, keepalive, quick
    reconnects.

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
    return [
        ("grpc.service_config", json.dumps(service_config)),
        ("grpc.keepalive_time_ms", int(keepalive_time * 1000)),
        ("grpc.keepalive_timeout_ms", int(keepalive_timeout * 1000)),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
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


def execute_call(request: pb.ExecuteRequest) -> Invoke:
    """One ``Execute`` attempt of *request* (blocking or ``grpc.aio`` stub alike)."""
    return lambda stub, t, md: stub.Execute(request, timeout=t, metadata=md, wait_for_ready=True)


def stats_call(stub: pb_grpc.BrokerStub, timeout: float, metadata: Metadata) -> Any:
    """One ``GetStats`` attempt (blocking or ``grpc.aio`` stub alike)."""
    return stub.GetStats(
        pb.GetStatsRequest(), timeout=timeout, metadata=metadata, wait_for_ready=True
    )


def results_of(response: pb.ExecuteResponse) -> list[Result]:
    """One `Result` per statement of *response*."""
    return [Result.from_proto(r) for r in response.results]


class Link:
    """The stub on one channel (blocking or ``grpc.aio``), and whether a call on it has
    reached the broker since the channel opened or last failed in a way that may mean a lost
    connection.

    Until then, each attempt first makes a health check that waits for the channel
    (``wait_for_ready``): if the deadline passes during it, the request itself was never sent,
    which a call that waited inside gRPC could not tell (``broker_unreachable``). A channel
    that has reached the broker skips the check, so a warm call is still one round trip.
    """

    def __init__(self, channel: Any) -> None:
        self.stub = pb_grpc.BrokerStub(channel)
        # Raw bytes both ways: an empty HealthCheckRequest asks about the server as a whole,
        # and any answer (even UNIMPLEMENTED) proves a connection.
        self.health_check = channel.unary_unary(HEALTH_CHECK_METHOD)
        self.reached = False

    @staticmethod
    def check_failed(exc: grpc.RpcError, target: str, started: float) -> None:
        """After a failed health check: raise `broker_unreachable` if the deadline passed.
        Any other failure is left to the call itself (which waits for the channel too)."""
        if exc.code() is grpc.StatusCode.DEADLINE_EXCEEDED:
            raise broker_unreachable(target, time.monotonic() - started) from exc

    def call_failed(self, exc: grpc.RpcError) -> None:
        if exc.code() in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNAVAILABLE):
            self.reached = False


def time_left(deadline: float, attempt: int) -> float:
    """Seconds until *deadline*; raise `DeadlineExceeded` if none are left to send *attempt*."""
    left = deadline - time.monotonic()
    if left > 0:
        return left
    # Only a refusal that guarantees nothing ran, or a rollback, is retried.
    if attempt > 1:
        message = "deadline passed while waiting to retry; no earlier attempt took effect"
    else:
        message = "deadline passed before the call could be sent; nothing was sent"
    raise errors.DeadlineExceeded(message, code=grpc.StatusCode.DEADLINE_EXCEEDED)


def broker_unreachable(target: str, waited: float) -> errors.Unavailable:
    """The error for a call whose deadline passed before its channel reached the broker: the
    request never left the client."""
    no_port = " (the target has no port, so gRPC uses 443)" if None in target_ports(target) else ""
    return errors.Unavailable(
        f"broker at {target!r} not reachable within {waited:.3g}s: no connection was ready, "
        f"or the broker reported NOT_SERVING{no_port}; nothing was sent, so retrying is safe",
        code=grpc.StatusCode.UNAVAILABLE,
        reason=BROKER_UNREACHABLE,
    )


def _ascii(value: object) -> str:
    """Metadata values must be printable ASCII; replace anything else."""
    return "".join(c if " " <= c <= "~" else "?" for c in str(value))


def _env_flag(name: str, environ: Mapping[str, str] = os.environ) -> bool:
    return environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")
