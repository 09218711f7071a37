"""``lambda_client.dbapi``: a PEP 249 (DB-API 2.0) module over the broker.

::

    from lambda_client import dbapi

    def handler(event, context):
        with dbapi.connect(autocommit=True, context=context) as conn:   # cheap: no I/O
            cur = conn.cursor()
            cur.execute("SELECT name FROM users WHERE id = %s", [event["id"]])
            return cur.fetchone()

* `connect` reuses the process's channel (one `BrokerClient` per target and options), so a
  Lambda can call it per invocation. ``autocommit=True`` runs each statement on its own (one
  ``Execute``); otherwise the first statement opens a transaction whose ``Transact`` lease is
  held until ``commit()``/``rollback()``/``close()`` (see docs/dbapi.md for the pool
  arithmetic: prefer autocommit plus ``with conn.transaction():`` blocks in a Lambda).
* ``paramstyle`` is ``"pyformat"``, and ``%s`` (format) is accepted too, with psycopg's rules
  (`lambda_client.dbapi._pyformat`); placeholders become ``$n`` before sending.
* ``threadsafety`` is 1: threads may share the module (and its channel), not connections.
* Errors are `lambda_client.errors`' PEP 249 tree (with ``.sqlstate``); type objects compare
  equal to the Postgres type OIDs in ``cursor.description``.

The module loads on first use of ``lambda_client.dbapi``; it needs nothing beyond the client's
own dependencies.
"""

from __future__ import annotations

from typing import Any

from lambda_client._requests import LambdaContext
from lambda_client.dbapi._connection import (
    MAX_STATEMENTS,
    Connection,
    IsolationLevel,
    client_for,
    served_database,
)
from lambda_client.dbapi._cursor import Column, Cursor, ServerCursor
from lambda_client.dbapi._types import (
    BINARY,
    DATETIME,
    NUMBER,
    ROWID,
    STRING,
    Binary,
    Date,
    DateFromTicks,
    DBAPITypeObject,
    Time,
    TimeFromTicks,
    Timestamp,
    TimestampFromTicks,
)
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
    "BINARY",
    "DATETIME",
    "MAX_STATEMENTS",
    "NUMBER",
    "ROWID",
    "STRING",
    "Binary",
    "Column",
    "Connection",
    "Cursor",
    "DBAPITypeObject",
    "DataError",
    "DatabaseError",
    "Date",
    "DateFromTicks",
    "Error",
    "IntegrityError",
    "InterfaceError",
    "InternalError",
    "IsolationLevel",
    "NotSupportedError",
    "OperationalError",
    "ProgrammingError",
    "ServerCursor",
    "Time",
    "TimeFromTicks",
    "Timestamp",
    "TimestampFromTicks",
    "Warning",
    "apilevel",
    "connect",
    "paramstyle",
    "threadsafety",
]

apilevel = "2.0"
# Threads may share the module (and the channel under it), not connections or cursors.
threadsafety = 1
# %(name)s; %s is accepted too (psycopg's rules).
paramstyle = "pyformat"


def connect(
    target: str | None = None,
    *,
    autocommit: bool = False,
    context: LambdaContext | None = None,
    timeout: float | None = None,
    dbname: str | None = None,
    client: Any = None,
    max_statements: int = MAX_STATEMENTS,
    **client_options: Any,
) -> Connection:
    """A `Connection` to the broker at *target* (default ``PGBROKER_URL``).

    Cheap: it reuses the process's `BrokerClient` for the same *target* and
    *client_options* (any `BrokerClient` argument: ``tls``, ``auth``, ``timeout``…), or
    *client* when given, and sends nothing, except once per client when *dbname* is set:
    the broker serves one database, and a *dbname* that is not it raises
    `OperationalError` naming both. *context* (the Lambda context) and *timeout* bound each
    call, and each transaction as a whole; both are attributes that may be changed later.
    *max_statements* is the broker's ``PGBROKER_MAX_STATEMENTS`` (the statements
    `Cursor.executemany` sends per request). Raise `TypeError`/`ValueError` for a bad
    argument.
    """
    if client is None:
        client = client_for(target, client_options)
    elif target is not None or client_options:
        raise TypeError("pass either client or target and client options, not both")
    connection = Connection(
        client,
        autocommit=autocommit,
        context=context,
        timeout=timeout,
        max_statements=max_statements,
    )
    if dbname is not None:
        served = served_database(client, context, timeout)
        if served != dbname:
            raise OperationalError(
                f"the broker at {client.target} serves database {served!r}, not {dbname!r}: "
                "a broker serves one database; point the target at the broker for "
                f"{dbname!r}, or leave dbname unset"
            )
    return connection
