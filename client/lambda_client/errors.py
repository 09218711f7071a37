"""The errors a `BrokerClient` call raises, one hierarchy rooted at `BrokerError`.

Every error keeps the gRPC status it came from (`code`, `details`) and, when the broker sent
them as ``google.rpc.Status`` details, the Postgres error (`sqlstate`, `statement_index`,
`detail`, `hint`), the broker's reason (`reason`, e.g. ``QUEUE_FULL``; the client sets
``BROKER_UNREACHABLE`` when no connection was ready before the deadline, so nothing was sent)
and its retry hint (`retry_after`, seconds). The original `grpc.RpcError` is chained as
``__cause__``.

Database errors are classed by SQLSTATE like DB-API drivers (psycopg's names)::

    BrokerError                      any failed call; .code is the grpc.StatusCode
    ├── DatabaseError                Postgres reported an error; .sqlstate, .statement_index
    │   ├── DataError                class 22: bad value (division by zero, overflow, …)
    │   ├── IntegrityError           class 23: constraint violated (unique, foreign key, …)
    │   ├── ProgrammingError         class 42: syntax error, undefined table/column, …
    │   └── OperationalError         everything else Postgres reports
    │       ├── TransactionRollback  class 40: rolled back, safe to resend the whole batch
    │       │   ├── SerializationFailure   40001
    │       │   └── DeadlockDetected       40P01
    │       └── QueryCanceled        57014: statement timeout or cancel (also DeadlineExceeded)
    ├── InvalidRequest               INVALID_ARGUMENT from the broker itself (limits, bad SQL kind)
    ├── Overloaded                   RESOURCE_EXHAUSTED: queue full / queue timeout; nothing ran
    ├── Unavailable                  UNAVAILABLE: broker or database unreachable; nothing ran
    ├── DeadlineExceeded             DEADLINE_EXCEEDED: the call's deadline passed; rolled back
    ├── Cancelled                    CANCELLED
    ├── OutcomeUnknown               UNKNOWN: the connection broke during COMMIT; it may have run
    ├── Unauthenticated              UNAUTHENTICATED: no or bad credentials
    └── PermissionDenied             PERMISSION_DENIED

`from_rpc_error` builds the right class from a `grpc.RpcError` (sync or ``grpc.aio``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import grpc

__all__ = [
    "BrokerError",
    "Cancelled",
    "DataError",
    "DatabaseError",
    "DeadlineExceeded",
    "DeadlockDetected",
    "IntegrityError",
    "InvalidRequest",
    "OperationalError",
    "OutcomeUnknown",
    "Overloaded",
    "PermissionDenied",
    "ProgrammingError",
    "QueryCanceled",
    "SerializationFailure",
    "TransactionRollback",
    "Unauthenticated",
    "Unavailable",
    "from_rpc_error",
]

_DETAILS_KEY = "grpc-status-details-bin"
_DOMAIN = "pgbroker"


class BrokerError(Exception):
    """A call to the broker failed.

    Attributes are None (or -1 for `statement_index`) when the status carried no such detail.
    """

    code: grpc.StatusCode | None
    details: str
    sqlstate: str | None
    statement_index: int
    detail: str | None
    hint: str | None
    retry_after: float | None
    reason: str | None

    def __init__(
        self,
        message: str,
        *,
        code: grpc.StatusCode | None = None,
        sqlstate: str | None = None,
        statement_index: int = -1,
        detail: str | None = None,
        hint: str | None = None,
        retry_after: float | None = None,
        reason: str | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.details = message
        self.sqlstate = sqlstate
        self.statement_index = statement_index
        self.detail = detail
        self.hint = hint
        self.retry_after = retry_after
        self.reason = reason

    def __str__(self) -> str:
        text = self.details
        if self.sqlstate:
            text = f"{text} (SQLSTATE {self.sqlstate}"
            if self.statement_index >= 0:
                text += f", statement {self.statement_index}"
            text += ")"
        if self.detail:
            text += f"\nDETAIL: {self.detail}"
        if self.hint:
            text += f"\nHINT: {self.hint}"
        return text


class DatabaseError(BrokerError):
    """Postgres reported an error; the transaction was rolled back."""


class DataError(DatabaseError):
    """SQLSTATE class 22: a value was wrong for its type or operation."""


class IntegrityError(DatabaseError):
    """SQLSTATE class 23: a constraint was violated."""


class ProgrammingError(DatabaseError):
    """SQLSTATE class 42: the statement is wrong (syntax, undefined object, privilege)."""


class OperationalError(DatabaseError):
    """Any other Postgres error."""


class TransactionRollback(OperationalError):
    """SQLSTATE class 40: Postgres rolled the transaction back; resending it may succeed."""


class SerializationFailure(TransactionRollback):
    """SQLSTATE 40001 (serializable isolation conflict)."""


class DeadlockDetected(TransactionRollback):
    """SQLSTATE 40P01."""


class InvalidRequest(BrokerError):
    """The broker refused the request before running it (limits, session-state SQL, types)."""


class Overloaded(BrokerError):
    """Every pooled connection was busy and the queue was full or timed out; nothing ran."""


class Unavailable(BrokerError):
    """The broker, or its database, could not be reached; nothing ran."""


class DeadlineExceeded(BrokerError):
    """The call's deadline passed; a transaction that had started was rolled back."""


class QueryCanceled(OperationalError, DeadlineExceeded):
    """SQLSTATE 57014: Postgres cancelled the statement (statement timeout or deadline)."""


class Cancelled(BrokerError):
    """The call was cancelled."""


class OutcomeUnknown(BrokerError):
    """The connection broke during COMMIT: the transaction may or may not have committed."""


class Unauthenticated(BrokerError):
    """The broker rejected the credentials (or there were none)."""


class PermissionDenied(BrokerError):
    """The caller is authenticated but not allowed to do this."""


_BY_SQLSTATE: dict[str, type[DatabaseError]] = {
    "40001": SerializationFailure,
    "40P01": DeadlockDetected,
    "57014": QueryCanceled,
}
_BY_SQLSTATE_CLASS: dict[str, type[DatabaseError]] = {
    "22": DataError,
    "23": IntegrityError,
    "40": TransactionRollback,
    "42": ProgrammingError,
}
_BY_CODE_NAME: dict[str, type[BrokerError]] = {
    "INVALID_ARGUMENT": InvalidRequest,
    "RESOURCE_EXHAUSTED": Overloaded,
    "UNAVAILABLE": Unavailable,
    "DEADLINE_EXCEEDED": DeadlineExceeded,
    "CANCELLED": Cancelled,
    "UNKNOWN": OutcomeUnknown,
    "UNAUTHENTICATED": Unauthenticated,
    "PERMISSION_DENIED": PermissionDenied,
}


# Codes whose meaning (did anything run? may it be retried?) matters more than the SQLSTATE
# they may carry: UNKNOWN with 57P01 is still "outcome unknown", UNAVAILABLE with 08006 still
# "nothing ran".
_CODE_FIRST = frozenset(
    {
        "UNAVAILABLE",
        "UNKNOWN",
        "RESOURCE_EXHAUSTED",
        "CANCELLED",
        "UNAUTHENTICATED",
        "PERMISSION_DENIED",
    }
)


def error_class(code_name: str, sqlstate: str | None) -> type[BrokerError]:
    """The class for a status code name (``"ABORTED"``) and an optional SQLSTATE."""
    if not sqlstate or code_name in _CODE_FIRST:
        return _BY_CODE_NAME.get(code_name, BrokerError)
    cls = _BY_SQLSTATE.get(sqlstate) or _BY_SQLSTATE_CLASS.get(sqlstate[:2], OperationalError)
    if code_name == "DEADLINE_EXCEEDED" and not issubclass(cls, DeadlineExceeded):
        return DeadlineExceeded
    return cls


def from_rpc_error(exc: grpc.RpcError) -> BrokerError:
    """Return the `BrokerError` for a failed call (sync or aio), reading its rich status.

    The caller raises it ``from exc``. A status whose details cannot be parsed still maps by
    its code alone.
    """
    code: grpc.StatusCode | None = exc.code() if hasattr(exc, "code") else None
    message = (exc.details() if hasattr(exc, "details") else None) or str(code or "error")
    fields = _rich_fields(exc)
    cls = error_class(code.name if code is not None else "", fields.get("sqlstate"))
    return cls(fields.pop("message", None) or message, code=code, **fields)


def _rich_fields(exc: grpc.RpcError) -> dict[str, Any]:
    """Keyword arguments for `BrokerError` from the ``google.rpc.Status`` details, if any."""
    status = _rich_status(exc)
    fields: dict[str, Any] = {}
    if status is None:
        return fields
    # Imported here: only failed calls pay for the error-details modules.
    from google.rpc import error_details_pb2

    from lambda_client._proto.pgbroker.v1 import broker_pb2 as pb

    for any_detail in status.details:
        if any_detail.Is(pb.DatabaseError.DESCRIPTOR):
            db = pb.DatabaseError()
            any_detail.Unpack(db)
            fields.update(
                message=db.message or None,
                sqlstate=db.sqlstate or None,
                statement_index=db.statement_index,
                detail=db.detail or None,
                hint=db.hint or None,
            )
        elif any_detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            info = error_details_pb2.RetryInfo()
            any_detail.Unpack(info)
            fields["retry_after"] = info.retry_delay.ToTimedelta().total_seconds()
        elif any_detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            error_info = error_details_pb2.ErrorInfo()
            any_detail.Unpack(error_info)
            if error_info.domain == _DOMAIN:
                fields["reason"] = error_info.reason or None
    return fields


def _rich_status(exc: grpc.RpcError) -> Any:
    """The ``google.rpc.Status`` in the trailing metadata, or None if absent or unreadable."""
    trailing = exc.trailing_metadata() if hasattr(exc, "trailing_metadata") else None
    if not trailing:
        return None
    from google.rpc import status_pb2

    for key, value in trailing:
        if key == _DETAILS_KEY and isinstance(value, bytes):
            try:
                return status_pb2.Status.FromString(value)
            except Exception:  # a malformed detail must not hide the original error
                return None
    return None
