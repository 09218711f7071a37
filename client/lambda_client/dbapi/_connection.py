"""`Connection`: a PEP 249 connection over the broker, and the per-process client cache.

A connection owns no network connection: statements go over the process's shared
`BrokerClient` channel (one per target and options, `client_for`). What it owns is at most
one transaction:

* ``autocommit=True``: each ``execute`` is one ``Execute`` call; a pooled Postgres connection
  is held only while Postgres works. A named cursor's ``execute`` is one ``Stream`` call, its
  connection held while the rows are read (`ServerCursor`); `close` stops such streams.
* ``autocommit=False`` (PEP 249's default): the first statement opens a ``Transact`` lease
  (`lambda_client.transaction.Transaction`) held until `commit`, `rollback` or `close`, and
  bounded by the broker's idle-transaction and transaction timeouts. A connection garbage
  collected, or a process that dies, with a transaction open cancels the stream, and the
  broker rolls back at once.
* `transaction` is an explicit transaction block in either mode (a savepoint when one is
  already open), psycopg 3's ``conn.transaction()``.
"""

from __future__ import annotations

import contextlib
import enum
import threading
import weakref
from collections.abc import Iterator, Mapping, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any

from lambda_client import errors
from lambda_client._requests import LambdaContext
from lambda_client._result import Result
from lambda_client.client import BrokerClient
from lambda_client.dbapi._cursor import Cursor, ServerCursor

if TYPE_CHECKING:
    # Loaded by the first transaction (`BrokerClient.begin`): an autocommit connection, the
    # Lambda default, never needs it.
    from lambda_client.transaction import Transaction

__all__ = [
    "MAX_REQUEST_BYTES",
    "MAX_STATEMENTS",
    "Connection",
    "IsolationLevel",
    "client_for",
    "served_database",
]

# The broker's default PGBROKER_MAX_STATEMENTS: executemany sends at most this many
# statements per request (several requests go on one Transact lease).
MAX_STATEMENTS = 1000


class IsolationLevel(enum.IntEnum):
    """psycopg's isolation levels. READ_UNCOMMITTED runs as READ_COMMITTED, as in Postgres."""

    READ_UNCOMMITTED = 1
    READ_COMMITTED = 2
    REPEATABLE_READ = 3
    SERIALIZABLE = 4


_ISOLATION_NAMES = {
    IsolationLevel.READ_UNCOMMITTED: "read committed",
    IsolationLevel.READ_COMMITTED: "read committed",
    IsolationLevel.REPEATABLE_READ: "repeatable read",
    IsolationLevel.SERIALIZABLE: "serializable",
}

# Half the broker's default PGBROKER_MAX_REQUEST_BYTES (8 MiB): executemany's requests stay
# under it by an estimate of their size (`_chunks`).
MAX_REQUEST_BYTES = 4 * 1024 * 1024

_clients: dict[Any, BrokerClient] = {}
# client -> the database its broker serves (weak: a caller's own client may go away)
_databases: weakref.WeakKeyDictionary[BrokerClient, str] = weakref.WeakKeyDictionary()
_lock = threading.Lock()


def client_for(target: str | None, options: Mapping[str, Any]) -> BrokerClient:
    """The process's `BrokerClient` for *target* and *options*, created on first use, so a
    Lambda calling `connect` per invocation reuses one channel. Raise `TypeError` /
    `ValueError` as `BrokerClient` does for a bad option."""
    key = (target, _freeze(options))
    with _lock:
        client = _clients.get(key)
        if client is None:
            client = BrokerClient(target, **options)
            _clients[key] = client
        return client


def _freeze(value: Any) -> Any:
    """A hashable stand-in for an option value (lists and dicts become tuples)."""
    if isinstance(value, Mapping):
        return tuple(sorted((k, _freeze(v)) for k, v in value.items()))
    if isinstance(value, list | tuple):
        return tuple(_freeze(v) for v in value)
    try:
        hash(value)
    except TypeError:
        return ("id", id(value))
    return value


def served_database(
    client: BrokerClient, context: LambdaContext | None, timeout: float | None
) -> str:
    """The database *client*'s broker serves, asked once per client
    (``SELECT current_database()``)."""
    name = _databases.get(client)
    if name is None:
        result = client.query("SELECT current_database()", context=context, timeout=timeout)
        name = _databases[client] = str(result.scalar())
    return name


class Connection:
    """A PEP 249 connection (`lambda_client.dbapi.connect`). Not thread-safe: one connection
    belongs to one thread at a time (the module and its client may be shared)."""

    # PEP 249's optional extension: the error classes as connection attributes.
    Warning = errors.Warning
    Error = errors.Error
    InterfaceError = errors.InterfaceError
    DatabaseError = errors.DatabaseError
    DataError = errors.DataError
    OperationalError = errors.OperationalError
    IntegrityError = errors.IntegrityError
    InternalError = errors.InternalError
    ProgrammingError = errors.ProgrammingError
    NotSupportedError = errors.NotSupportedError

    def __init__(
        self,
        client: BrokerClient,
        *,
        autocommit: bool = False,
        context: LambdaContext | None = None,
        timeout: float | None = None,
        max_statements: int = MAX_STATEMENTS,
    ) -> None:
        if not isinstance(max_statements, int) or max_statements < 1:
            raise ValueError(f"max_statements must be a positive int, not {max_statements!r}")
        self.client = client
        self._autocommit = _flag("autocommit", autocommit)
        #: The Lambda context bounding each call (and each transaction); may be set per
        #: invocation on a connection kept across invocations.
        self.context = context
        #: Seconds bounding each call in autocommit, and each transaction as a whole.
        self.timeout = timeout
        self.max_statements = max_statements
        self._tx: Transaction | None = None
        # Named cursors reading a stream in autocommit: close() stops them, so the broker
        # frees their connections at once rather than when the cursors are collected.
        self._streams: weakref.WeakSet[ServerCursor] = weakref.WeakSet()
        self._closed = False
        self._isolation_level: IsolationLevel | None = None
        self._read_only: bool | None = None
        self._deferrable: bool | None = None

    # -- attributes ------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def in_transaction(self) -> bool:
        """Whether a transaction is open (a lease is held), even a failed one."""
        return self._tx is not None

    @property
    def autocommit(self) -> bool:
        """Each statement commits on its own (True) or the first opens a transaction (False).
        Setting it while a transaction is open raises `ProgrammingError`."""
        return self._autocommit

    @autocommit.setter
    def autocommit(self, value: bool) -> None:
        self._check_idle("autocommit")
        self._autocommit = _flag("autocommit", value)

    @property
    def isolation_level(self) -> IsolationLevel | None:
        """The isolation of the next transaction (None: the server's default). Accepts an
        `IsolationLevel` or its name (``"serializable"``, ``"REPEATABLE READ"``)."""
        return self._isolation_level

    @isolation_level.setter
    def isolation_level(self, value: IsolationLevel | int | str | None) -> None:
        self._check_idle("isolation_level")
        self._isolation_level = _isolation(value)

    @property
    def read_only(self) -> bool | None:
        """Whether the next transaction is READ ONLY (None: the server's default)."""
        return self._read_only

    @read_only.setter
    def read_only(self, value: bool | None) -> None:
        self._check_idle("read_only")
        self._read_only = None if value is None else _flag("read_only", value)

    @property
    def deferrable(self) -> bool | None:
        """Whether the next transaction is DEFERRABLE (None: the server's default)."""
        return self._deferrable

    @deferrable.setter
    def deferrable(self, value: bool | None) -> None:
        self._check_idle("deferrable")
        self._deferrable = None if value is None else _flag("deferrable", value)

    # -- PEP 249 ---------------------------------------------------------------------------

    def cursor(
        self, name: str | None = None, *, withhold: bool = False, scrollable: bool | None = None
    ) -> Cursor:
        """A cursor; with *name*, a server-side cursor (`ServerCursor`: a stream in
        autocommit, DECLARE/FETCH in a transaction). ``withhold=True`` raises
        `NotSupportedError`: a WITH HOLD cursor
        outlives its transaction, and the broker returns the connection to the pool at its
        end (as any transaction pooler must)."""
        self._check_open()
        if name is None:
            return Cursor(self)
        if withhold:
            raise errors.NotSupportedError(
                "WITH HOLD cursors are not supported: they outlive the transaction, and the "
                "broker returns the Postgres connection to the pool when it ends; fetch "
                "within the transaction instead"
            )
        if scrollable:
            raise errors.NotSupportedError("scrollable server-side cursors are not supported")
        return ServerCursor(self, name)

    def commit(self) -> None:
        """Commit the open transaction (nothing to do without one). Raise a `DatabaseError`
        if Postgres refused (an earlier error: 25P02, a deferred constraint, …); the
        transaction is over either way."""
        self._check_open()
        tx, self._tx = self._tx, None
        if tx is not None:
            tx.commit()

    def rollback(self) -> None:
        """Roll back the open transaction (nothing to do without one)."""
        self._check_open()
        tx, self._tx = self._tx, None
        if tx is not None:
            tx.rollback()

    def close(self) -> None:
        """Stop the named cursors reading a stream, roll back an open transaction and close;
        the shared channel stays open. Closing twice does nothing."""
        if self._closed:
            return
        tx, self._tx = self._tx, None
        self._closed = True
        for cursor in list(self._streams):
            cursor.close()
        if tx is not None:
            with contextlib.suppress(errors.Error):
                tx.rollback()

    def __enter__(self) -> Connection:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """psycopg 3's rule: commit if the block ended normally, else roll back; then close."""
        if self._closed:
            return
        try:
            if exc is None:
                self.commit()
            else:
                with contextlib.suppress(errors.Error):
                    self.rollback()
        finally:
            self.close()

    @contextlib.contextmanager
    def transaction(self) -> Iterator[Connection]:
        """A transaction block: opens a transaction (or a savepoint inside an open one),
        commits (releases) it when the block ends normally, rolls it back on an exception,
        which propagates. In autocommit mode this is the way to group statements, and the
        lease is held only for the block."""
        self._check_open()
        if self._tx is not None:
            with self._transaction().savepoint():  # refused if the broker ended it
                yield self
            return
        self._begin()
        try:
            yield self
        except BaseException:
            with contextlib.suppress(errors.Error):
                self.rollback()
            raise
        self.commit()

    # -- what cursors call -----------------------------------------------------------------

    def _execute(self, sql: str, params: Sequence[Any]) -> Result:
        """Run one statement: in autocommit on its own, else in the transaction."""
        self._check_open()
        if self._tx is None and self._autocommit:
            return self.client.query(
                sql,
                params,
                context=self.context,
                timeout=self.timeout,
                read_only=bool(self._read_only),
            )
        return self._transaction().query(sql, params)

    def _execute_many(self, sql: str, param_sets: Sequence[Sequence[Any]]) -> list[Result]:
        """Run *sql* once per parameter set in as few requests as the broker's limits allow
        (`_chunks`): one ``Execute`` batch in autocommit when they fit in one, else pipelined
        steps on one transaction (the open one, or one opened and committed here in
        autocommit)."""
        self._check_open()
        chunks = _chunks(sql, param_sets, self.max_statements, MAX_REQUEST_BYTES)
        if self._tx is None and self._autocommit:
            if len(chunks) == 1:
                return self.client.execute_many(
                    sql, chunks[0], context=self.context, timeout=self.timeout
                )
            with self.transaction():
                return self._pipelined(sql, chunks)
        return self._pipelined(sql, chunks)

    def _pipelined(self, sql: str, chunks: list[Sequence[Sequence[Any]]]) -> list[Result]:
        tx = self._transaction()
        results: list[Result] = []
        for chunk in chunks:
            results += tx.execute_many(sql, chunk)
        return results

    def _streaming(self, cursor: ServerCursor) -> None:
        """*cursor* reads a stream that `close` must stop."""
        self._streams.add(cursor)

    def _transaction(self) -> Transaction:
        """The open transaction, opened now if there is none. A transaction the broker ended
        (idle timeout, deadline, lost stream) stays current, failing every statement with
        `InFailedSqlTransaction`, until `rollback` acknowledges it."""
        tx = self._tx if self._tx is not None else self._begin()
        if tx.closed:
            raise errors.InFailedSqlTransaction(
                "the transaction has ended (the broker rolled it back, or it failed); "
                "call rollback() to start a new one"
            )
        return tx

    def _begin(self) -> Transaction:
        level = self._isolation_level
        self._tx = self.client.begin(
            isolation=None if level is None else _ISOLATION_NAMES[level],
            read_only=bool(self._read_only),
            deferrable=bool(self._deferrable),
            context=self.context,
            timeout=self.timeout,
        )
        return self._tx

    def _check_open(self) -> None:
        if self._closed:
            raise errors.InterfaceError("the connection is closed")

    def _check_idle(self, attribute: str) -> None:
        if self._tx is not None:
            raise errors.ProgrammingError(
                f"can't change {attribute} while a transaction is open; commit() or "
                "rollback() first"
            )

    def __repr__(self) -> str:
        state = "closed" if self._closed else "in transaction" if self._tx else "idle"
        return f"<Connection {self.client.target} {state} autocommit={self._autocommit}>"


def _chunks(
    sql: str, param_sets: Sequence[Sequence[Any]], max_statements: int, max_bytes: int
) -> list[Sequence[Sequence[Any]]]:
    """*param_sets* cut into requests of at most *max_statements* sets and about *max_bytes*
    (an estimate: a request of one set is never cut). At least one chunk, possibly empty."""
    chunks: list[Sequence[Sequence[Any]]] = []
    start, size = 0, 0
    overhead = _estimate(sql) + 16
    for index, params in enumerate(param_sets):
        cost = overhead + sum(_estimate(value) for value in params)
        if index > start and (index - start >= max_statements or size + cost > max_bytes):
            chunks.append(param_sets[start:index])
            start, size = index, 0
        size += cost
    chunks.append(param_sets[start:])
    return chunks


def _estimate(value: Any) -> int:
    """About how many bytes *value* takes in a request (UTF-8 text counted at its worst)."""
    if isinstance(value, str):
        return len(value) if value.isascii() else 4 * len(value)
    if isinstance(value, bytes | bytearray | memoryview):
        return len(value)
    if isinstance(value, list | tuple):
        return 4 + sum(_estimate(item) for item in value)
    if isinstance(value, dict):
        return len(repr(value)) * 2  # sent as JSON text; repr is about its size
    return 16


def _flag(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, not {value!r}")
    return value


def _isolation(value: IsolationLevel | int | str | None) -> IsolationLevel | None:
    if value is None or isinstance(value, IsolationLevel):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return IsolationLevel(value)
    if isinstance(value, str):
        key = value.strip().upper().replace(" ", "_")
        if key in IsolationLevel.__members__:
            return IsolationLevel[key]
    raise ValueError(
        "isolation_level must be None, an IsolationLevel, or 'read committed', "
        f"'repeatable read' or 'serializable', not {value!r}"
    )
