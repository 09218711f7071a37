"""The error vocabulary both sides of the wire share: one module, imported by the broker (to
build statuses) and by the client (to read them).

A failed call carries a gRPC status code and message, and in the trailing metadata
(``grpc-status-details-bin``) a ``google.rpc.Status`` whose details may hold:

* ``google.rpc.ErrorInfo(domain="pgbroker", reason=<Reason>, metadata={...})``: why the broker
  refused or failed the call, in words a program can match;
* ``google.rpc.RetryInfo``: a retry may help, after this delay;
* ``pgbroker.v1.DatabaseError``: the Postgres error (SQLSTATE, message, detail, hint, the
  failing statement's index).

`pack` builds that status (broker side), `unpack` reads it back (client side). Both import
the protobuf modules they need on first use, so ``import lambda_client`` stays cheap.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import grpc

    from lambda_client._proto.pgbroker.v1 import broker_pb2 as pb

__all__ = [
    "DETAILS_KEY",
    "DOMAIN",
    "FUNCTION_NAME_KEY",
    "NOTHING_RAN",
    "REQUEST_ID_KEY",
    "Code",
    "Reason",
    "StatusDetails",
    "pack",
    "unpack",
]

DOMAIN = "pgbroker"
# Trailing-metadata key of the serialized google.rpc.Status (grpcio-status uses the same).
DETAILS_KEY = "grpc-status-details-bin"
# Call metadata the client sends and the broker logs and puts in application_name.
REQUEST_ID_KEY = "x-lambda-request-id"
FUNCTION_NAME_KEY = "x-lambda-function-name"


class Code(enum.IntEnum):
    """gRPC status codes by their canonical numbers (``google.rpc.Code``), so code that must
    not import gRPC (the broker's pool, the SQL analysis) can still declare one;
    ``grpc.StatusCode[code.name]`` is the gRPC object."""

    OK = 0
    CANCELLED = 1
    UNKNOWN = 2
    INVALID_ARGUMENT = 3
    DEADLINE_EXCEEDED = 4
    NOT_FOUND = 5
    ALREADY_EXISTS = 6
    PERMISSION_DENIED = 7
    RESOURCE_EXHAUSTED = 8
    FAILED_PRECONDITION = 9
    ABORTED = 10
    OUT_OF_RANGE = 11
    UNIMPLEMENTED = 12
    INTERNAL = 13
    UNAVAILABLE = 14
    DATA_LOSS = 15
    UNAUTHENTICATED = 16


class Reason(str, enum.Enum):  # a str enum: StrEnum is 3.11+, the client runs on 3.10
    """``ErrorInfo.reason`` values. A ``str`` enum, so a reason compares equal to its text
    (``Reason.QUEUE_FULL == "QUEUE_FULL"``); ``enum.StrEnum`` would need Python 3.11."""

    # Nothing ran: the request never reached Postgres.
    QUEUE_FULL = "QUEUE_FULL"  # max_waiting requests already queued
    QUEUE_TIMEOUT = "QUEUE_TIMEOUT"  # waited queue_timeout (or the caller's deadline) in vain
    POOL_UNAVAILABLE = "POOL_UNAVAILABLE"  # no database connection could be opened
    SHUTTING_DOWN = "SHUTTING_DOWN"  # the broker is draining (SIGTERM)
    BROKER_UNREACHABLE = "BROKER_UNREACHABLE"  # set by the client: no channel was ready
    # Refused before queueing.
    BAD_REQUEST = "BAD_REQUEST"  # malformed request: types, counts, empty SQL
    SESSION_STATE = "SESSION_STATE"  # SQL that would change a pooled session
    LIMIT_EXCEEDED = "LIMIT_EXCEEDED"  # a PGBROKER_MAX_* limit; metadata names it
    UNAUTHENTICATED = "UNAUTHENTICATED"  # no or bad credentials
    PERMISSION_DENIED = "PERMISSION_DENIED"  # authenticated, not allowed
    AUTH_UNAVAILABLE = "AUTH_UNAVAILABLE"  # the identity could not be verified (STS down)
    # The connection broke while the request ran; the outcome may be unknown.
    CONNECTION_LOST = "CONNECTION_LOST"
    # A bound of an interactive transaction (Transact) fired; it was rolled back.
    IDLE_TRANSACTION_TIMEOUT = "IDLE_TRANSACTION_TIMEOUT"  # PGBROKER_IDLE_TRANSACTION_TIMEOUT
    TRANSACTION_TIMEOUT = "TRANSACTION_TIMEOUT"  # PGBROKER_TRANSACTION_TIMEOUT
    # Exactly-once (idempotency keys); nothing ran.
    IDEMPOTENCY_KEY_REUSED = "IDEMPOTENCY_KEY_REUSED"  # the key was used for another request
    IDEMPOTENCY_KEY_IN_PROGRESS = "IDEMPOTENCY_KEY_IN_PROGRESS"  # an attempt with it still runs
    IDEMPOTENCY_UNAVAILABLE = "IDEMPOTENCY_UNAVAILABLE"  # the broker has no key store


# Reasons that guarantee nothing ran, so a retry cannot apply work twice.
NOTHING_RAN = frozenset(
    {
        Reason.QUEUE_FULL,
        Reason.QUEUE_TIMEOUT,
        Reason.POOL_UNAVAILABLE,
        Reason.SHUTTING_DOWN,
        Reason.BROKER_UNREACHABLE,
    }
)


@dataclass
class StatusDetails:
    """What a failed call says beyond its code and message. Empty fields: not sent."""

    reason: str | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    retry_after: float | None = None  # seconds, from RetryInfo
    database_error: pb.DatabaseError | None = None


def pack(
    code: int,
    message: str,
    *,
    reason: str | None = None,
    metadata: Mapping[str, str] | None = None,
    retry_after: float | None = None,
    database_error: pb.DatabaseError | None = None,
) -> grpc.Status:
    """The ``grpc.Status`` for `context.abort_with_status`: *code* is a ``google.rpc.Code``
    number (``grpc.StatusCode.X.value[0]``), details in the order DatabaseError, ErrorInfo,
    RetryInfo."""
    from google.rpc import error_details_pb2, status_pb2
    from grpc_status import rpc_status

    status = status_pb2.Status(code=code, message=message)
    if database_error is not None:
        status.details.add().Pack(database_error)
    if reason is not None:
        text = reason.value if isinstance(reason, Reason) else reason
        info = error_details_pb2.ErrorInfo(domain=DOMAIN, reason=text)
        info.metadata.update(metadata or {})
        status.details.add().Pack(info)
    if retry_after is not None:
        retry = error_details_pb2.RetryInfo()
        retry.retry_delay.FromNanoseconds(int(retry_after * 1e9))
        status.details.add().Pack(retry)
    return rpc_status.to_status(status)


def unpack(trailing_metadata: Iterable[tuple[str, Any]] | None) -> StatusDetails:
    """The details of a failed call's trailing metadata. Missing or malformed details give an
    empty `StatusDetails`: a detail that cannot be read must not hide the original error."""
    raw = next(
        (v for k, v in trailing_metadata or () if k == DETAILS_KEY and isinstance(v, bytes)),
        None,
    )
    details = StatusDetails()
    if raw is None:
        return details
    from google.rpc import error_details_pb2, status_pb2

    from lambda_client._proto.pgbroker.v1 import broker_pb2 as pb

    try:
        status = status_pb2.Status.FromString(raw)
    except Exception:  # protobuf raises DecodeError (and others) on garbage
        return details
    for any_detail in status.details:
        if any_detail.Is(pb.DatabaseError.DESCRIPTOR):
            details.database_error = pb.DatabaseError()
            any_detail.Unpack(details.database_error)
        elif any_detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            info = error_details_pb2.RetryInfo()
            any_detail.Unpack(info)
            details.retry_after = info.retry_delay.ToTimedelta().total_seconds()
        elif any_detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            error_info = error_details_pb2.ErrorInfo()
            any_detail.Unpack(error_info)
            if error_info.domain == DOMAIN:
                details.reason = error_info.reason or None
                details.metadata = dict(error_info.metadata)
    return details
