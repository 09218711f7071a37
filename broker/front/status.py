"""A failure as the gRPC status the caller gets: a lookup of what it declares, not a chain.

Every broker failure derives from `broker.errors.BrokerFailure` and declares its ``code``,
``reason`` and ``retry_after`` (plus ``metadata`` and ``database_error``); `status_for` packs
them with `lambda_client._status.pack`, the one place the domain and the detail layout live.
Which failure gets which status is the table in `broker.front.service`.

An exception that is not a `BrokerFailure` is a bug: `failure_for` turns it into INTERNAL
naming its class only, never its text (which may hold SQL or secrets).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from broker.errors import BrokerFailure
from lambda_client._status import pack

if TYPE_CHECKING:
    import grpc

__all__ = ["failure_fields", "failure_for", "failure_reason", "status_for"]


def failure_for(exc: BaseException) -> BrokerFailure:
    """*exc* itself if it is a `BrokerFailure`, else INTERNAL with its class name only."""
    if isinstance(exc, BrokerFailure):
        return exc
    return BrokerFailure(f"internal error ({type(exc).__name__})")


def status_for(failure: BrokerFailure) -> grpc.Status:
    """The status for `context.abort_with_status`: code, ``str(failure)`` as the message,
    and the details the failure declares (DatabaseError, ErrorInfo, RetryInfo)."""
    return pack(
        failure.code,
        str(failure),
        reason=failure.reason,
        metadata=failure.metadata,
        retry_after=failure.retry_after,
        database_error=failure.database_error,
    )


def failure_fields(failure: BrokerFailure) -> dict[str, object]:
    """Log fields for *failure*: ``kind`` says whose failure it is, "database error" (Postgres
    raised it; ``sqlstate`` and ``statement_index`` say which) or "broker refusal" (the broker
    refused or could not run the request), so a constraint violation, sent as
    INVALID_ARGUMENT, does not read as a validation failure of the broker's; ``code`` is the
    gRPC status the caller got and ``reason`` the pgbroker reason."""
    db = failure.database_error
    fields: dict[str, object] = {
        "kind": "database error" if db is not None else "broker refusal",
        "code": failure.code.name,
        "reason": failure.reason.value if failure.reason is not None else None,
        "sqlstate": db.sqlstate if db is not None else None,
        "statement_index": db.statement_index if db is not None else None,
    }
    return fields


def failure_reason(failure: BrokerFailure) -> str:
    """What *failure* is counted as: its ErrorInfo reason (``QUEUE_FULL``, ...), else
    ``DATABASE_ERROR`` when Postgres raised it, else its gRPC code's name (``INTERNAL``). A
    closed set of names, so it can be a metric dimension."""
    if failure.reason is not None:
        return str(failure.reason.value)
    if failure.database_error is not None:
        return "DATABASE_ERROR"
    return failure.code.name
