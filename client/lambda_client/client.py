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

The policy is `lambda_client._policy`, shared with `lambda_client.aio.AsyncBrokerClient`; this
class only runs its steps with blocking calls.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from lambda_client import _position
from lambda_client._base import DEFAULT_TARGET, AuthHook, ClientBase, channel_options
from lambda_client._policy import BROKER_UNREACHABLE, Call, Link, broker_unreachable, run_plan
from lambda_client._requests import LambdaContext, Statement, check_target
from lambda_client._result import Result
from lambda_client._slots import DEFAULT_MAX_OPEN_TRANSACTIONS, TransactionSlots

if TYPE_CHECKING:
    # Loaded on first use (`begin`, `run_transaction`, `stream`): not on a cold start's path.
    from lambda_client._stream import RowStream
    from lambda_client.transaction import Transaction

__all__ = [
    "BROKER_UNREACHABLE",
    "DEFAULT_TARGET",
    "AuthHook",
    "BrokerClient",
    "LambdaContext",
    "Result",
    "Statement",
    "broker_unreachable",
    "channel_options",
    "check_target",
]

T = TypeVar("T")


class BrokerClient(ClientBase):
    """A client for one broker target (one or many replicas, round-robin).

    *target* is a gRPC target: ``dns:///broker.internal:50051`` (every address the name
    resolves to), ``ipv4:10.0.1.5:50051,10.0.2.7:50051`` or ``host:port``; default
    ``PGBROKER_URL``, then ``127.0.0.1:50051``. *timeout* (seconds) bounds every call unless
    the call passes its own; *deadline_margin* is kept back from a Lambda context's remaining
    time so the handler can still answer. *tls* (default ``PGBROKER_TLS`` in 1/true/yes) uses
    TLS with *root_certificates* (PEM bytes; default ``PGBROKER_TLS_CA_FILE``, else the system
    roots), checking *tls_server_name* (default ``PGBROKER_TLS_SERVER_NAME``) in the broker's
    certificate. *auth* returns metadata added to every attempt (tokens, signatures); by
    default it comes from ``PGBROKER_AUTH`` (`lambda_client.auth`). *max_attempts* (default:
    work that did not run is resent until the deadline, a rolled-back transaction 5 times),
    *initial_backoff* and *max_backoff* shape the retries described in the module docstring.
    *correlation_id* returns an id to send as ``x-correlation-id`` (e.g. powertools
    ``logger.get_correlation_id``). A channel idle longer than *reconnect_after_idle* seconds
    (a frozen Lambda whose connection a NAT or load balancer may have dropped silently) is
    replaced before the next call rather than trusted. With *health_check* (default) calls
    go only to replicas whose ``grpc.health.v1`` status is SERVING, so a replica that is
    shutting down gets no new calls (one more round trip when a connection opens).
    *options* are extra gRPC channel arguments; they override the defaults.
    *max_open_transactions* bounds the interactive transactions (`begin`) open at once on the
    client's channel; a `begin` past it waits, within its deadline, for one to end
    (`lambda_client._slots.TransactionSlots`: past about a thousand, gRPC's blocking
    API stalls them all). Settings not
    passed come from *config*, by default the environment read once, here
    (`lambda_client._config.ClientConfig.from_env`). Raise `TypeError`/`ValueError` naming a
    bad argument or variable.

    Blocking; safe to share between threads.
    """

    _sleep = staticmethod(time.sleep)

    def __init__(
        self,
        target: str | None = None,
        *,
        max_open_transactions: int = DEFAULT_MAX_OPEN_TRANSACTIONS,
        **kwargs: Any,
    ) -> None:
        self._slots = TransactionSlots(max_open_transactions)
        super().__init__(target, **kwargs)

    def query(
        self,
        sql: str,
        params: Sequence[Any] | None = None,
        *,
        context: LambdaContext | None = None,
        timeout: float | None = None,
        idempotency_key: str | None = None,
        read_only: bool = False,
    ) -> Result:
        """Run one statement on its own (autocommit) and return its `Result`.

        With *read_only*, it runs in a READ ONLY transaction, which a broker with read
        replicas may send to one (docs/client.md, "Replicas and read-your-writes").
        Raise `TypeError` naming the parameter if a value has no Postgres mapping (before
        anything is sent), or an `errors.Error` subclass if the call fails.
        """
        return self._run(self._query(sql, params, idempotency_key, read_only), context, timeout)

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
        idempotency_key: str | None = None,
    ) -> list[Result]:
        """Run *statements* (``sql`` or ``(sql, params)``) as one transaction, one round trip.

        *isolation* is ``"read committed"``, ``"repeatable read"`` or ``"serializable"``.
        Return one `Result` per statement. On error everything is rolled back and the
        `DatabaseError` names the failing statement (`statement_index`). With
        *retry_serialization* a serialization failure or deadlock resends the transaction.
        """
        call = self._transaction(
            statements, isolation, read_only, deferrable, retry_serialization, idempotency_key
        )
        return self._run(call, context, timeout)

    def execute_many(
        self,
        sql: str,
        param_sets: Sequence[Sequence[Any]],
        *,
        context: LambdaContext | None = None,
        timeout: float | None = None,
        retry_serialization: bool = False,
        idempotency_key: str | None = None,
    ) -> list[Result]:
        """Run *sql* once per parameter set, all in one transaction; one `Result` each."""
        return self._run(
            self._execute_many(sql, param_sets, retry_serialization, idempotency_key),
            context,
            timeout,
        )

    def begin(
        self,
        *,
        isolation: str | None = None,
        read_only: bool = False,
        deferrable: bool = False,
        context: LambdaContext | None = None,
        timeout: float | None = None,
        idempotency_key: str | None = None,
    ) -> Transaction:
        """Open an interactive transaction on a pooled connection the broker leases to it
        until it ends (`lambda_client.transaction`); use it as ``with db.begin(...) as tx:``.

        *timeout* and *context* bound the whole transaction. Raise as `query` when no
        connection could be leased (retried like a call while nothing ran). With
        *idempotency_key*, COMMIT records it (`Transaction.commit`)."""
        from lambda_client.transaction import open_transaction

        invoke = open_transaction(
            isolation, read_only, deferrable, Result.from_proto, self.target, self._slots
        )
        transaction: Transaction = self._run(Call(invoke, _opened), context, timeout)
        transaction.idempotency_key = idempotency_key
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
        from lambda_client.transaction import run_transaction

        return run_transaction(
            lambda left: self.begin(
                isolation=isolation,
                read_only=read_only,
                deferrable=deferrable,
                context=context,
                timeout=left,
            ),
            fn,
            deadline=self.policy.deadline(context, timeout),
            max_attempts=self.policy.max_attempts,
            initial_backoff=self.policy.initial_backoff,
            max_backoff=self.policy.max_backoff,
        )

    def stream(
        self,
        sql: str,
        params: Sequence[Any] | None = None,
        *,
        context: LambdaContext | None = None,
        timeout: float | None = None,
        chunk_rows: int | None = None,
        read_only: bool = False,
    ) -> RowStream:
        """Run one query (SELECT, VALUES, TABLE, WITH … SELECT) and return its rows lazily, in
        chunks of about 1 MiB (or *chunk_rows* rows), with no result limit
        (`lambda_client._stream`). The deadline (*timeout*, *context*) bounds the whole read.

        Raise as `query` if the stream could not open (retried like a call while nothing
        ran); iterating raises if it fails midway. Use ``with db.stream(...) as rows:`` so an
        early exit frees the broker's connection at once. With *read_only*, a broker with read
        replicas may run it on one."""
        from lambda_client._stream import open_stream, stream_request

        invoke = open_stream(
            stream_request(sql, params, chunk_rows, read_only, _position.latest(self.target))
        )
        rows: RowStream = self._run(Call(invoke, _opened), context, timeout)
        return rows

    def stats(self, *, timeout: float | None = None) -> dict[str, int]:
        """The broker replica's pool and queue figures (``GetStats``)."""
        return self._run(self._stats(), None, timeout)

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

    def _run(self, call: Call[T], context: LambdaContext | None, timeout: float | None) -> T:
        return run_plan(self._plan(call, context, timeout))

    def _get_link(self) -> Link:
        """The stub on the shared channel, created on first use (or after a long idle)."""
        link = self._link
        if link is not None and not self._stale():
            return link
        with self._lock:
            if self._stale():
                old = self._replace_channel()
                if old is not None:
                    old.close()
            assert self._link is not None
            return self._link


def _opened(transaction: T) -> T:
    """A `begin` call's result is the transaction its attempt opened."""
    return transaction
