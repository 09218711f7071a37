"""`Cursor` (results buffered from one answer) and `ServerCursor` (a named cursor whose rows
are pulled as they are fetched: a ``Broker.Stream`` in autocommit, DECLARE/FETCH inside a
transaction).

Every row a cursor hands out comes through `Cursor._fetch_rows`, which `ServerCursor`
overrides.
"""

from __future__ import annotations

import contextlib
import itertools
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any, NamedTuple

from lambda_client import errors
from lambda_client._result import Result
from lambda_client.dbapi._pyformat import bind

if TYPE_CHECKING:
    from lambda_client._stream import RowStream
    from lambda_client.dbapi._connection import Connection
    from lambda_client.transaction import Transaction

__all__ = ["Column", "Cursor", "ServerCursor"]

Params = Sequence[Any] | Mapping[str, Any] | None
Row = tuple[Any, ...]

# A function name for callproc: identifiers, optionally schema-qualified or double-quoted.
_PROCNAME = re.compile(
    r'(?:[A-Za-z_][A-Za-z0-9_$]*|"(?:[^"]|"")+")(?:\.(?:[A-Za-z_][A-Za-z0-9_$]*|"(?:[^"]|"")+"))?'
)


class Column(NamedTuple):
    """One entry of `Cursor.description`: PEP 249's 7-tuple; *type_code* is the Postgres type
    OID (compare it with `lambda_client.dbapi.STRING`, `NUMBER`, …)."""

    name: str
    type_code: int
    display_size: int | None = None
    internal_size: int | None = None
    precision: int | None = None
    scale: int | None = None
    null_ok: bool | None = None


class Cursor:
    """A PEP 249 cursor. `execute` runs the statement and buffers its rows; fetching reads
    them. Not thread-safe."""

    def __init__(self, connection: Connection) -> None:
        self.connection = connection
        #: Rows `fetchmany` returns by default.
        self.arraysize = 1
        #: Rows a server-side cursor fetches per round trip while iterating (psycopg's name).
        self.itersize = 100
        self.description: list[Column] | None = None
        #: Rows of the last statement: returned by a SELECT, affected by DML, summed over
        #: `executemany`; -1 when the command reports none.
        self.rowcount = -1
        #: The command tag of the last statement ("INSERT 0 1"), psycopg's name.
        self.statusmessage: str | None = None
        self.lastrowid = None  # Postgres has no implicit row ids: use RETURNING
        self._rows: list[Row] = []
        self._pos = 0
        self._closed = False

    # -- executing -------------------------------------------------------------------------

    def execute(self, query: str, params: Params = None) -> Cursor:
        """Run *query*, with ``%s`` / ``%(name)s`` placeholders when *params* is given
        (`lambda_client.dbapi._pyformat`); return the cursor. Raise `ProgrammingError` for a
        bad placeholder or parameter, a `DatabaseError` subclass for a Postgres error."""
        self._check_open()
        sql, values = bind(query, params)
        self._reset()  # a failed statement leaves no earlier rows behind
        with _parameter_errors():
            result = self.connection._execute(sql, values)
        self._set_result(result)
        return self

    def executemany(self, query: str, params_seq: Iterable[Params]) -> Cursor:
        """Run *query* once per parameter set in one request, not one per set (an ``Execute``
        batch in autocommit, pipelined steps in a transaction; chunks of the connection's
        ``max_statements``). `rowcount` is the sum; no rows are kept."""
        self._check_open()
        if isinstance(params_seq, str | bytes | Mapping):
            raise TypeError("executemany takes a sequence of parameter sets, one per execution")
        sql: str | None = None
        param_sets: list[list[Any]] = []
        for params in params_seq:
            bound_sql, values = bind(query, params)
            sql = bound_sql if sql is None else sql
            param_sets.append(values)
        self._reset()
        if sql is None:  # no parameter sets: nothing runs
            self.rowcount = 0
            return self
        with _parameter_errors():
            results = self.connection._execute_many(sql, param_sets)
        self.rowcount = sum(max(r.rows_affected, 0) for r in results)
        self.statusmessage = results[-1].command_tag if results else None
        return self

    def callproc(self, procname: str, parameters: Sequence[Any] | None = None) -> Sequence[Any]:
        """Call a function as ``SELECT * FROM procname(%s, …)`` (Postgres procedures called
        with CALL have no result set here: use `execute`); its rows can be fetched. Return
        *parameters* unchanged (Postgres has no output parameters for functions)."""
        if not isinstance(procname, str) or not _PROCNAME.fullmatch(procname):
            raise errors.ProgrammingError(
                f"procname must be a function name (optionally schema-qualified), not {procname!r}"
            )
        parameters = [] if parameters is None else parameters
        placeholders = ", ".join(["%s"] * len(parameters))
        self.execute(f"SELECT * FROM {procname}({placeholders})", list(parameters))
        return parameters

    def _set_result(self, result: Result) -> None:
        self._rows = result.rows
        self._pos = 0
        self.rowcount = result.rows_affected
        self.statusmessage = result.command_tag
        self.description = _description(result)

    def _reset(self) -> None:
        self._rows, self._pos = [], 0
        self.description = None
        self.rowcount = -1
        self.statusmessage = None

    # -- fetching --------------------------------------------------------------------------

    @property
    def rownumber(self) -> int | None:
        """The index of the next row in the result, None without a result."""
        return None if self.description is None else self._pos

    def fetchone(self) -> Row | None:
        """The next row, None at the end."""
        rows = self._fetch_rows(1)
        return rows[0] if rows else None

    def fetchmany(self, size: int | None = None) -> list[Row]:
        """Up to *size* (default `arraysize`) next rows; [] at the end."""
        return self._fetch_rows(self.arraysize if size is None else size)

    def fetchall(self) -> list[Row]:
        """The remaining rows."""
        return self._fetch_rows(None)

    def __iter__(self) -> Iterator[Row]:
        while rows := self._fetch_rows(self.itersize):
            yield from rows

    def _fetch_rows(self, size: int | None) -> list[Row]:
        """Up to *size* rows (all that remain when None) of the current result. Raise
        `ProgrammingError` when there is no result (nothing run, or a command without
        rows)."""
        self._check_result()
        end = len(self._rows) if size is None else self._pos + max(size, 0)
        rows = self._rows[self._pos : end]
        self._pos += len(rows)
        return rows

    def _check_result(self) -> None:
        self._check_open()
        if self.description is None:
            raise errors.ProgrammingError(
                "no results to fetch: the last statement returned no rows"
            )

    # -- the rest of PEP 249 ---------------------------------------------------------------

    def nextset(self) -> None:
        """None: a statement has one result set here."""
        self._check_open()
        return None

    def setinputsizes(self, sizes: Any) -> None:
        """Does nothing (parameters are typed by value)."""

    def setoutputsize(self, size: Any, column: Any = None) -> None:
        """Does nothing."""

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Drop the buffered rows; the cursor refuses further use."""
        self._closed = True
        self._rows = []

    def __enter__(self) -> Cursor:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _check_open(self) -> None:
        if self._closed:
            raise errors.InterfaceError("the cursor is closed")
        self.connection._check_open()


class ServerCursor(Cursor):
    """A named cursor: its rows are pulled from the server as they are fetched, so a big
    result never sits in memory whole. Two ways, chosen at each `execute`:

    * in autocommit mode outside a transaction, one ``Broker.Stream`` call
      (`BrokerClient.stream`): chunks of about 1 MiB, each read only when a fetch reaches it,
      from a cursor the broker runs in a READ ONLY transaction on a pooled connection held
      until the result is read to its end, `close` is called or another statement is
      executed on this cursor;
    * in a transaction, ``DECLARE name NO SCROLL CURSOR WITHOUT HOLD FOR query`` on the lease
      and one ``FETCH FORWARD n`` per fetch, so other statements may run on the transaction
      between fetches (as with psycopg); closed by `close` or by the transaction's end.

    `rowcount` is the number of rows fetched so far (0 after `execute`), as psycopg's."""

    def __init__(self, connection: Connection, name: str) -> None:
        super().__init__(connection)
        if not isinstance(name, str) or not name:
            raise TypeError("a server-side cursor's name must be a non-empty str")
        self.name = name
        self._quoted = '"' + name.replace('"', '""') + '"'
        self._declared_in: Transaction | None = None  # the transaction it is declared in
        self._done = False
        # Each declaration's FETCH text is unique: the broker caches prepared statements by
        # text per pooled connection, with the columns of the cursor they were prepared for.
        self._tag = ""
        self._stream: RowStream | None = None  # autocommit: the stream being read
        self._failure: errors.Error | None = None  # what ended the stream midway

    def execute(self, query: str, params: Params = None) -> Cursor:
        """Open the cursor for *query* (a SELECT, VALUES, TABLE or WITH … SELECT) and read its
        columns (one round trip); rows come with the fetches. In autocommit mode the query
        runs read-only: a query that writes raises `ReadOnlySqlTransaction` (use a
        transaction). Raise `ProgrammingError` for bad SQL or parameters, a `DatabaseError`
        subclass for any other Postgres error, as `Cursor.execute` does."""
        self._check_open()
        sql, values = bind(query, params)
        connection = self.connection
        # Declared in the open transaction: its CLOSE goes in one request with the new DECLARE.
        redeclare = self._declared_in is not None and self._declared_in is connection._tx
        self._stop(close_declared=not redeclare)  # an earlier result, streamed or declared
        self._reset()
        if connection.autocommit and not connection.in_transaction:
            self._open_stream(sql, values)
        else:
            self._declare(sql, values, connection._transaction(), close_first=redeclare)
        return self

    def _open_stream(self, sql: str, values: list[Any]) -> None:
        connection = self.connection
        with _parameter_errors():
            stream = connection.client.stream(
                sql,
                values,
                context=connection.context,
                timeout=connection.timeout,
                read_only=bool(connection.read_only),
            )
        self._stream, self._done = stream, False
        connection._streaming(self)
        self.description = _columns(stream.columns, stream.type_oids)
        self.rowcount = 0

    def _declare(self, sql: str, values: list[Any], tx: Transaction, close_first: bool) -> None:
        statements: list[Any] = [f"CLOSE {self._quoted}"] if close_first else []
        import secrets  # with hashlib, hmac and random: only a server-side cursor needs it

        self._tag = f"{secrets.token_hex(6)}"
        statements += [
            (f"DECLARE {self._quoted} NO SCROLL CURSOR WITHOUT HOLD FOR {sql}", values),
            self._fetch_sql("0"),
        ]
        with _parameter_errors():
            results = tx.pipeline(statements)
        self._done, self._declared_in = False, tx
        self._set_result(results[-1])
        self.rowcount = 0

    def executemany(self, query: str, params_seq: Iterable[Params]) -> Cursor:
        raise errors.NotSupportedError("executemany is not supported on a server-side cursor")

    def _fetch_sql(self, count: str) -> str:
        return f"FETCH FORWARD {count} FROM {self._quoted} /* pgbroker {self._tag} */"

    def __iter__(self) -> Iterator[Row]:
        """The rows; a stream hands them out one at a time (its chunks are the read-ahead),
        so iteration stopped midway leaves no row fetched but unseen; DECLARE/FETCH reads
        `itersize` rows per round trip."""
        if self._declared_in is not None:
            yield from super().__iter__()
            return
        while rows := self._fetch_rows(1):
            yield rows[0]

    def _fetch_rows(self, size: int | None) -> list[Row]:
        if self._failure is not None:
            raise errors.ProgrammingError(
                f"server-side cursor {self.name!r} failed midway ({self._failure}); the rows "
                "after the failure are lost: execute it again"
            ) from self._failure
        self._check_result()
        if self._done or size == 0:
            return []
        rows = self._read_stream(size) if self._declared_in is None else self._fetch(size)
        if size is None or len(rows) < size:
            self._done = True
        self._pos += len(rows)
        self.rowcount = self._pos
        return rows

    def _read_stream(self, size: int | None) -> list[Row]:
        """Up to *size* rows of the stream; its next chunk is read only when they need it."""
        stream = self._stream
        if stream is None:
            return []
        try:
            rows = list(stream) if size is None else list(itertools.islice(stream, max(size, 0)))
        except errors.Error as exc:
            self._stream, self._failure = None, exc
            raise
        if stream.closed:  # read to its end: the broker has freed the connection
            self._stream = None
        return rows

    def _fetch(self, size: int | None) -> list[Row]:
        """Up to *size* rows with one FETCH on the transaction the cursor lives in."""
        if self.connection._tx is not self._declared_in:
            raise errors.ProgrammingError(
                f"server-side cursor {self.name!r} ended with the transaction it was declared "
                "in (a WITHOUT HOLD cursor): fetch before commit() or rollback()"
            )
        count = "ALL" if size is None else str(max(size, 0))
        return self.connection._transaction().query(self._fetch_sql(count)).rows

    def _stop(self, close_declared: bool = True) -> None:
        """End the current result: cancel a stream (the broker frees its connection at
        once), CLOSE a cursor declared in the still-open transaction (unless
        *close_declared* is False). Never raises a database error (a failed transaction has
        dropped the cursor already)."""
        stream, self._stream, self._failure = self._stream, None, None
        if stream is not None:
            stream.close()
        tx, self._declared_in = self._declared_in, None
        if close_declared and tx is not None and tx is self.connection._tx and not tx.closed:
            with contextlib.suppress(errors.DatabaseError):
                tx.execute(f"CLOSE {self._quoted}")

    def close(self) -> None:
        """Stop the stream, or CLOSE the cursor if its transaction is still open; the cursor
        refuses further use."""
        if self._closed:
            return
        self._stop()
        super().close()


class _parameter_errors:
    """Parameters the codec cannot send (`TypeError`, `ValueError`, raised before anything is
    sent) as PEP 249 errors: `ProgrammingError` and `DataError`."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        if isinstance(exc, TypeError):
            raise errors.ProgrammingError(str(exc)) from exc
        if isinstance(exc, ValueError):
            raise errors.DataError(str(exc)) from exc


def _description(result: Result) -> list[Column] | None:
    return _columns(result.columns, result.type_oids)


def _columns(names: Sequence[str], type_oids: Sequence[int]) -> list[Column] | None:
    if not names:
        return None
    oids: Iterable[int] = type_oids or itertools.repeat(0)
    return [Column(name, oid) for name, oid in zip(names, oids, strict=False)]
