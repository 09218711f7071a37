"""What Django reads from a backend's ``Database`` module: the PEP 249 exception classes
(``wrap_database_errors`` maps them to ``django.db.*`` by name) and ``Binary``.

The exceptions are `lambda_client.errors`' own, so ``django.db.IntegrityError``'s
``__cause__`` is e.g. ``lambda_client.errors.UniqueViolation`` with its ``.sqlstate``.
When `lambda_client.dbapi` is present its module-level names are the same objects.
"""

from __future__ import annotations

from lambda_client.errors import (
    DatabaseError,
    DataError,
    Error,
    IntegrityError,
    InterfaceError,
    InternalError,
    NotSupportedError,
    OperationalError,
    ProgrammingError,
    Warning,
)

__all__ = [
    "Binary",
    "DataError",
    "DatabaseError",
    "Error",
    "IntegrityError",
    "InterfaceError",
    "InternalError",
    "NotSupportedError",
    "OperationalError",
    "ProgrammingError",
    "Warning",
]

Binary = bytes  # bytea: psycopg writes bytes as a bytea literal
