"""pgbroker's client library: what a Lambda handler imports instead of a database driver.

::

    from lambda_client import BrokerClient

    db = BrokerClient()  # module level: reused across warm invocations

    def handler(event, context):
        return db.query("SELECT $1::int + 1", [41], context=context).scalar()

Errors follow PEP 249 (`Error`, `DatabaseError`, `OperationalError`, …; ``BrokerError`` is
`Error`); `lambda_client.errors` draws the tree and holds a class per common SQLSTATE
(``errors.UniqueViolation``).

This module only re-exports. ``import lambda_client`` is cheap: the client, gRPC and protobuf
load when a name is first used (``from lambda_client import BrokerClient`` loads them, which
is best done at module level, in the Lambda init phase). `lambda_client.dbapi`, the PEP 249
module, loads on first use too.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lambda_client import dbapi, errors
    from lambda_client.client import BrokerClient, Result
    from lambda_client.codec import Interval, Json, Jsonb
    from lambda_client.errors import (
        BrokerError,
        Cancelled,
        DatabaseError,
        DataError,
        DeadlineExceeded,
        DeadlockDetected,
        Error,
        IntegrityError,
        InterfaceError,
        InternalError,
        InvalidRequest,
        NotSupportedError,
        OperationalError,
        OutcomeUnknown,
        Overloaded,
        PermissionDenied,
        ProgrammingError,
        QueryCanceled,
        SerializationFailure,
        TransactionRollback,
        Unauthenticated,
        Unavailable,
        Warning,
    )

__all__ = [
    "BrokerClient",
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
    "Interval",
    "InvalidRequest",
    "Json",
    "Jsonb",
    "NotSupportedError",
    "OperationalError",
    "OutcomeUnknown",
    "Overloaded",
    "PermissionDenied",
    "ProgrammingError",
    "QueryCanceled",
    "Result",
    "SerializationFailure",
    "TransactionRollback",
    "Unauthenticated",
    "Unavailable",
    "Warning",
    "dbapi",
    "errors",
]

_HOME = {
    "BrokerClient": "lambda_client.client",
    "Result": "lambda_client.client",
    "Interval": "lambda_client.codec",
    "Json": "lambda_client.codec",
    "Jsonb": "lambda_client.codec",
}


def __getattr__(name: str) -> Any:
    """Import a public name on first use (PEP 562), so a bare import costs nothing."""
    if name in ("errors", "dbapi"):
        return importlib.import_module(f"lambda_client.{name}")
    if name in __all__:
        module = importlib.import_module(_HOME.get(name, "lambda_client.errors"))
        value = getattr(module, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'lambda_client' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
