"""The errors a client call raises: the PEP 249 tree, with a class per common SQLSTATE.

Every failure the client raises derives from `Error`; ``BrokerError`` is the same class under
the name earlier releases used, so ``except lambda_client.BrokerError`` still catches them all.
Broker-level failures (a full queue, an unreachable broker, a passed deadline) sit where
PEP 249 puts "errors related to the database's operation"; Postgres errors are classed by
SQLSTATE as psycopg classes them (same names; each such class has its ``.sqlstate``)::

    Warning                             PEP 249; never raised
    Error = BrokerError                 any failed call; .code is the grpc.StatusCode
    ├── InterfaceError                  a status this client cannot place (no known code)
    └── DatabaseError                   .sqlstate, .statement_index, .detail, .hint
        ├── DataError                   class 22: DivisionByZero, NumericValueOutOfRange,
        │                               InvalidTextRepresentation, StringDataRightTruncation, …
        ├── IntegrityError              class 23: UniqueViolation, ForeignKeyViolation,
        │                               NotNullViolation, CheckViolation, ExclusionViolation
        ├── InternalError               INTERNAL; classes 24, 25, 2B, 2D, XX:
        │                               InFailedSqlTransaction, ReadOnlySqlTransaction, …
        ├── NotSupportedError           UNIMPLEMENTED; class 0A: FeatureNotSupported
        ├── ProgrammingError            classes 20, 21, 26, 34, 3D, 3F, 42, 44, P0: SyntaxError,
        │   │                           UndefinedTable, UndefinedColumn, InsufficientPrivilege, …
        │   ├── InvalidRequest          INVALID_ARGUMENT from the broker itself (types, counts,
        │   │                           session-state SQL); nothing ran
        │   └── PermissionDenied        PERMISSION_DENIED: authenticated, not allowed
        └── OperationalError            classes 08, 27, 28, 53, 54, 55, 57, 58, …: LockNotAvailable,
            │                           TooManyConnections, AdminShutdown, …
            ├── Overloaded              RESOURCE_EXHAUSTED: queue full, queue timeout, a limit
            ├── Unavailable             UNAVAILABLE: broker or database unreachable
            ├── Unauthenticated         UNAUTHENTICATED: no or bad credentials
            ├── Cancelled               CANCELLED
            ├── OutcomeUnknown          UNKNOWN: the connection broke during COMMIT, or the
            │                           transport failed after the request was sent (no
            │                           idempotency key, or attempts ran out); it may have
            │                           committed
            ├── DeadlineExceeded        DEADLINE_EXCEEDED: the deadline passed; rolled back
            │   └── QueryCanceled       57014: statement timeout or cancel
            └── TransactionRollback     class 40: rolled back, safe to resend the whole batch
                ├── SerializationFailure   40001
                └── DeadlockDetected       40P01

PEP 249 puts a refused request ("wrong number of parameters specified") and a missing
privilege under ProgrammingError, and failed authentication under OperationalError, as
psycopg does for SQLSTATE 42501 and class 28. `error_class` chooses: for UNAVAILABLE,
UNKNOWN, RESOURCE_EXHAUSTED, CANCELLED, UNAUTHENTICATED and PERMISSION_DENIED the code
decides (it says whether anything ran), otherwise the SQLSTATE does when there is one.

Each error keeps the gRPC status it came from (`code`, `details`) and what the broker sent
as ``google.rpc.Status`` details (`lambda_client._status.unpack`): the Postgres error
(`sqlstate`, `statement_index`, `detail`, `hint`), the broker's reason (`reason`, its text,
e.g. ``QUEUE_FULL``, which equals the `lambda_client._status.Reason` member of that name; the
client sets ``BROKER_UNREACHABLE`` when no connection was ready before the deadline, so
nothing was sent) with its `metadata`, and its retry hint (`retry_after`, seconds). The
`grpc.RpcError` is chained as ``__cause__``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from lambda_client._status import unpack

if TYPE_CHECKING:
    from lambda_client._grpc import grpc

# PEP 249 and broker-level classes; the SQLSTATE classes are added below, as defined.
__all__ = [
    "BrokerError",
    "Cancelled",
    "DataError",
    "DatabaseError",
    "DeadlineExceeded",
    "DeadlockDetected",
    "Error",
    "IntegrityError",
    "InterfaceError",
    "InternalError",
    "InvalidRequest",
    "NotSupportedError",
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
    "Warning",
    "error_class",
    "from_rpc_error",
    "lookup",
]

# SQLSTATE -> its class, filled as the classes below are defined.
_BY_SQLSTATE: dict[str, type[DatabaseError]] = {}


class Warning(Exception):
    """PEP 249's warning class; the client never raises it."""


class Error(Exception):
    """A call to the broker failed.

    Attributes are None (or -1 for `statement_index`) when the status carried no such detail;
    `sqlstate` defaults to the class's own (``UniqueViolation.sqlstate == "23505"``).
    """

    sqlstate: str | None = None
    code: grpc.StatusCode | None
    details: str
    statement_index: int
    detail: str | None
    hint: str | None
    retry_after: float | None
    reason: str | None
    metadata: dict[str, str]

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
        metadata: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.details = message
        if sqlstate is not None:
            self.sqlstate = sqlstate
        self.statement_index = statement_index
        self.detail = detail
        self.hint = hint
        self.retry_after = retry_after
        self.reason = reason
        self.metadata = dict(metadata or {})

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


# The name users of earlier releases catch: every failure the client raises.
BrokerError = Error


class InterfaceError(Error):
    """The broker answered with a status this client cannot place (an unknown code)."""


class DatabaseError(Error):
    """The database side failed the call; the transaction was rolled back."""

    def __init_subclass__(cls, sqlstate: str | None = None, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if sqlstate is not None:
            cls.sqlstate = sqlstate
            _BY_SQLSTATE[sqlstate] = cls


class DataError(DatabaseError):
    """A value was wrong for its type or operation (SQLSTATE class 22)."""


class OperationalError(DatabaseError):
    """The database or the broker could not do the work, through no fault of the request."""


class IntegrityError(DatabaseError):
    """A constraint was violated (SQLSTATE class 23)."""


class InternalError(DatabaseError):
    """The broker failed internally, or the transaction state was wrong (classes 25, XX)."""


class ProgrammingError(DatabaseError):
    """The statement is wrong: syntax, undefined object, privilege (class 42)."""


class NotSupportedError(DatabaseError):
    """The database or broker does not support what was asked (class 0A, UNIMPLEMENTED)."""


# -- broker-level failures ----------------------------------------------------------------


class InvalidRequest(ProgrammingError):
    """The broker refused the request before running it (types, counts, session-state SQL)."""


class PermissionDenied(ProgrammingError):
    """The caller is authenticated but not allowed to do this."""


class Overloaded(OperationalError):
    """Every pooled connection was busy and the queue was full or timed out, or a limit was
    crossed; with a `reason` in `lambda_client._status.NOTHING_RAN`, nothing ran."""


class Unavailable(OperationalError):
    """The broker, or its database, could not be reached; with a `reason` in
    `lambda_client._status.NOTHING_RAN`, nothing ran."""


class Unauthenticated(OperationalError):
    """The broker rejected the credentials (or there were none)."""


class Cancelled(OperationalError):
    """The call was cancelled."""


class OutcomeUnknown(OperationalError):
    """The transaction may or may not have committed: the database connection broke during
    COMMIT, or the call failed after the request was sent (a broker killed mid-call). With an
    idempotency key the client resends it itself; this is raised without one, or when the
    attempts ran out (resending with the same key is then still safe)."""


class DeadlineExceeded(OperationalError):
    """The call's deadline passed; a transaction that had started was rolled back."""


# -- SQLSTATE classes (psycopg's names) ----------------------------------------------------


class FeatureNotSupported(NotSupportedError, sqlstate="0A000"):
    pass


class CardinalityViolation(ProgrammingError, sqlstate="21000"):
    pass


class StringDataRightTruncation(DataError, sqlstate="22001"):
    pass


class NumericValueOutOfRange(DataError, sqlstate="22003"):
    pass


class NullValueNotAllowed(DataError, sqlstate="22004"):
    pass


class InvalidDatetimeFormat(DataError, sqlstate="22007"):
    pass


class DatetimeFieldOverflow(DataError, sqlstate="22008"):
    pass


class DivisionByZero(DataError, sqlstate="22012"):
    pass


class CharacterNotInRepertoire(DataError, sqlstate="22021"):
    pass


class InvalidParameterValue(DataError, sqlstate="22023"):
    pass


class InvalidJsonText(DataError, sqlstate="22032"):
    pass


class InvalidTextRepresentation(DataError, sqlstate="22P02"):
    pass


class InvalidBinaryRepresentation(DataError, sqlstate="22P03"):
    pass


class UntranslatableCharacter(DataError, sqlstate="22P05"):
    pass


class RestrictViolation(IntegrityError, sqlstate="23001"):
    pass


class NotNullViolation(IntegrityError, sqlstate="23502"):
    pass


class ForeignKeyViolation(IntegrityError, sqlstate="23503"):
    pass


class UniqueViolation(IntegrityError, sqlstate="23505"):
    pass


class CheckViolation(IntegrityError, sqlstate="23514"):
    pass


class ExclusionViolation(IntegrityError, sqlstate="23P01"):
    pass


class ActiveSqlTransaction(InternalError, sqlstate="25001"):
    pass


class ReadOnlySqlTransaction(InternalError, sqlstate="25006"):
    pass


class NoActiveSqlTransaction(InternalError, sqlstate="25P01"):
    pass


class InFailedSqlTransaction(InternalError, sqlstate="25P02"):
    pass


class IdleInTransactionSessionTimeout(InternalError, sqlstate="25P03"):
    pass


class InvalidAuthorizationSpecification(OperationalError, sqlstate="28000"):
    pass


class InvalidPassword(OperationalError, sqlstate="28P01"):
    pass


class DependentObjectsStillExist(InternalError, sqlstate="2BP01"):
    pass


class InvalidCatalogName(ProgrammingError, sqlstate="3D000"):
    pass


class InvalidSchemaName(ProgrammingError, sqlstate="3F000"):
    pass


class TransactionRollback(OperationalError, sqlstate="40000"):
    """Postgres rolled the transaction back (class 40); resending all of it may succeed."""


class SerializationFailure(TransactionRollback, sqlstate="40001"):
    pass


class DeadlockDetected(TransactionRollback, sqlstate="40P01"):
    pass


class InsufficientPrivilege(ProgrammingError, sqlstate="42501"):
    pass


class SyntaxError(ProgrammingError, sqlstate="42601"):
    pass


class DuplicateColumn(ProgrammingError, sqlstate="42701"):
    pass


class AmbiguousColumn(ProgrammingError, sqlstate="42702"):
    pass


class UndefinedColumn(ProgrammingError, sqlstate="42703"):
    pass


class UndefinedObject(ProgrammingError, sqlstate="42704"):
    pass


class DuplicateObject(ProgrammingError, sqlstate="42710"):
    pass


class AmbiguousFunction(ProgrammingError, sqlstate="42725"):
    pass


class GroupingError(ProgrammingError, sqlstate="42803"):
    pass


class DatatypeMismatch(ProgrammingError, sqlstate="42804"):
    pass


class WrongObjectType(ProgrammingError, sqlstate="42809"):
    pass


class CannotCoerce(ProgrammingError, sqlstate="42846"):
    pass


class UndefinedFunction(ProgrammingError, sqlstate="42883"):
    pass


class UndefinedTable(ProgrammingError, sqlstate="42P01"):
    pass


class UndefinedParameter(ProgrammingError, sqlstate="42P02"):
    pass


class DuplicateSchema(ProgrammingError, sqlstate="42P06"):
    pass


class DuplicateTable(ProgrammingError, sqlstate="42P07"):
    pass


class IndeterminateDatatype(ProgrammingError, sqlstate="42P18"):
    pass


class TooManyConnections(OperationalError, sqlstate="53300"):
    pass


class ProgramLimitExceeded(OperationalError, sqlstate="54000"):
    pass


class ObjectInUse(OperationalError, sqlstate="55006"):
    pass


class LockNotAvailable(OperationalError, sqlstate="55P03"):
    pass


class QueryCanceled(DeadlineExceeded, sqlstate="57014"):
    """Postgres cancelled the statement (statement timeout, or the call's deadline)."""


class AdminShutdown(OperationalError, sqlstate="57P01"):
    pass


class CannotConnectNow(OperationalError, sqlstate="57P03"):
    pass


class RaiseException(ProgrammingError, sqlstate="P0001"):
    pass


class NoDataFound(ProgrammingError, sqlstate="P0002"):
    pass


class TooManyRows(ProgrammingError, sqlstate="P0003"):
    pass


class AssertFailure(ProgrammingError, sqlstate="P0004"):
    pass


class DataCorrupted(InternalError, sqlstate="XX001"):
    pass


class IndexCorrupted(InternalError, sqlstate="XX002"):
    pass


# The PEP 249 class of a SQLSTATE without a class of its own, by its class (first two
# characters) or first character; psycopg's table.
_BY_SQLSTATE_CLASS: dict[str, type[DatabaseError]] = {
    "08": OperationalError,
    "0A": NotSupportedError,
    "20": ProgrammingError,
    "21": ProgrammingError,
    "22": DataError,
    "23": IntegrityError,
    "24": InternalError,
    "25": InternalError,
    "26": ProgrammingError,
    "27": OperationalError,
    "28": OperationalError,
    "2B": InternalError,
    "2D": InternalError,
    "2F": OperationalError,
    "34": ProgrammingError,
    "38": OperationalError,
    "39": OperationalError,
    "3B": OperationalError,
    "3D": ProgrammingError,
    "3F": ProgrammingError,
    "40": TransactionRollback,
    "42": ProgrammingError,
    "44": ProgrammingError,
    "53": OperationalError,
    "54": OperationalError,
    "55": OperationalError,
    "57": OperationalError,
    "58": OperationalError,
    "F": OperationalError,
    "H": OperationalError,
    "P": ProgrammingError,
    "X": InternalError,
}

__all__ += sorted(cls.__name__ for cls in _BY_SQLSTATE.values() if cls.__name__ not in __all__)

_BY_CODE_NAME: dict[str, type[Error]] = {
    "INVALID_ARGUMENT": InvalidRequest,
    "RESOURCE_EXHAUSTED": Overloaded,
    "UNAVAILABLE": Unavailable,
    "DEADLINE_EXCEEDED": DeadlineExceeded,
    "CANCELLED": Cancelled,
    "UNKNOWN": OutcomeUnknown,
    "UNAUTHENTICATED": Unauthenticated,
    "PERMISSION_DENIED": PermissionDenied,
    "ABORTED": TransactionRollback,
    "FAILED_PRECONDITION": OperationalError,
    "INTERNAL": InternalError,
    "DATA_LOSS": InternalError,
    "UNIMPLEMENTED": NotSupportedError,
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


def lookup(sqlstate: str) -> type[DatabaseError]:
    """The class for *sqlstate*: its own, else its SQLSTATE class's, else `DatabaseError`."""
    return (
        _BY_SQLSTATE.get(sqlstate)
        or _BY_SQLSTATE_CLASS.get(sqlstate[:2])
        or _BY_SQLSTATE_CLASS.get(sqlstate[:1])
        or DatabaseError
    )


def error_class(code_name: str, sqlstate: str | None) -> type[Error]:
    """The class for a status code name (``"ABORTED"``) and an optional SQLSTATE; a code
    this client does not know gives `InterfaceError`."""
    if not sqlstate or code_name in _CODE_FIRST:
        return _BY_CODE_NAME.get(code_name, InterfaceError)
    cls = lookup(sqlstate)
    if code_name == "DEADLINE_EXCEEDED" and not issubclass(cls, DeadlineExceeded):
        return DeadlineExceeded
    return cls


def from_rpc_error(exc: grpc.RpcError) -> Error:
    """The `Error` for a failed call (sync or ``grpc.aio``), read from its rich status.

    The caller raises it ``from exc``. Details that cannot be read leave the class to the
    code alone.
    """
    code: grpc.StatusCode | None = exc.code() if hasattr(exc, "code") else None
    message = (exc.details() if hasattr(exc, "details") else None) or str(code or "error")
    trailing = exc.trailing_metadata() if hasattr(exc, "trailing_metadata") else None
    status = unpack(trailing)
    fields: dict[str, Any] = {
        "code": code,
        "retry_after": status.retry_after,
        "reason": status.reason,
        "metadata": status.metadata,
    }
    db = status.database_error
    if db is not None:
        message = db.message or message
        fields.update(
            sqlstate=db.sqlstate or None,
            statement_index=db.statement_index,
            detail=db.detail or None,
            hint=db.hint or None,
        )
    cls = error_class(code.name if code is not None else "", fields.get("sqlstate"))
    return cls(message, **fields)


def outcome_unknown(exc: grpc.RpcError, error: Error) -> bool:
    """Whether *exc* leaves unknown whether the request ran: the broker said so (UNKNOWN:
    the database link broke during COMMIT, or gRPC's "stream removed"), or the transport
    failed after the request went out (UNAVAILABLE without the broker's status: a broker
    killed mid-call, a connection dead after a freeze, grpc/grpc#11043). Calls wait for the
    channel (``wait_for_ready``), so a bare UNAVAILABLE is never "could not connect"."""
    code = exc.code() if hasattr(exc, "code") else None
    name = getattr(code, "name", "")
    if name == "UNKNOWN":
        return True
    no_status = error.reason is None and error.retry_after is None
    bare = no_status and not getattr(error, "sqlstate", None)
    return name == "UNAVAILABLE" and bare
