"""The connection Django's DatabaseWrapper holds: PEP 249's shape over one `BrokerClient`.

* Autocommit (Django's default outside ``atomic()``): each statement is one ``Execute`` call;
  nothing is held between statements.
* ``autocommit = False`` (``atomic()``): the first statement opens a ``Transact`` lease
  (`BrokerClient.begin`, with the isolation level), the next ones run on it, and
  ``commit()``/``rollback()`` end it. A connection is leased only while Django is inside
  ``atomic()`` and has run something.
* Session state travels per transaction (see `Connection.time_zone`): a pooled connection
  never keeps it.
* Deadlines: the Lambda context set for the request (`lambda_client.django.middleware`)
  bounds each call and each lease; otherwise *timeout* seconds.

Errors are `lambda_client.errors` classes, which Django's ``wrap_database_errors`` turns into
``django.db.IntegrityError`` & co. by name (the SQLSTATE stays on ``__cause__.sqlstate``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from datetime import tzinfo
from typing import TYPE_CHECKING, Any, NamedTuple
from zoneinfo import ZoneInfo

from lambda_client import errors
from lambda_client.django import _adapt, deadline

if TYPE_CHECKING:
    from lambda_client.client import BrokerClient, Result
    from lambda_client.transaction import Transaction

ISOLATION_NAMES = {
    1: "read uncommitted",
    2: "read committed",
    3: "repeatable read",
    4: "serializable",
}  # psycopg.IsolationLevel values


class _ColumnItems(NamedTuple):
    name: str
    type_code: int
    display_size: int | None = None
    internal_size: int | None = None
    precision: int | None = None
    scale: int | None = None
    null_ok: bool | None = None


class Column(_ColumnItems):
    """One entry of `Cursor.description` (PEP 249's seven items), with psycopg's
    ``type_display``."""

    types: Any = None  # the connection's type registry (extension types: hstore, citext)

    @property
    def type_display(self) -> str | None:
        """The type's name, as psycopg's Column gives it (Django 6's introspection reads it,
        e.g. for hstore, whose OID differs per database); without modifiers, which the
        broker does not send. Looked up in the connection's registry, where
        django.contrib.postgres registers hstore, then psycopg's built-in types."""
        from psycopg.postgres import types

        info = (self.types or types).get(self.type_code) or types.get(self.type_code)
        return info.regtype if info is not None else None


class ServerInfo:
    """What Django reads from ``connection.info``: the server version and the defaults the
    broker's pooled connections have (read once per process, they do not change)."""

    encoding = "utf-8"  # psycopg's name for the client encoding, which the broker fixes

    def __init__(self, server_version: int, parameters: dict[str, str]) -> None:
        self.server_version = server_version
        self._parameters = parameters

    def parameter_status(self, name: str) -> str | None:
        return self._parameters.get(name)


class Connection:
    """See the module docstring. *adapters* is Django's psycopg adapters map, used to write
    literals and read values (`lambda_client.django._adapt`)."""

    def __init__(
        self,
        client: BrokerClient,
        *,
        timeout: float,
        adapters: Any,
        info: ServerInfo,
        aware: bool,
    ) -> None:
        self.client = client
        self.timeout = timeout
        self.adapters = adapters
        self.info = info
        self.aware = aware
        self.autocommit = True
        self.isolation_level: int | None = None
        self.closed = False
        # Django's session time zone, carried by every transaction (None: the server's own).
        self.time_zone: str | None = None
        self._zone = ZoneInfo("UTC")
        self._transaction: Transaction | None = None

    # -- PEP 249 ---------------------------------------------------------------------------

    def cursor(self) -> Cursor:
        self._check_open()
        return Cursor(self)

    def commit(self) -> None:
        """End the lease with COMMIT (nothing to do when nothing ran since the last one).

        COMMIT of a transaction an earlier error aborted rolls back; psycopg reports that
        silently (Postgres answers ROLLBACK, not an error) and Django relies on it, so the
        broker's 25P02 for it is not raised here either: nothing was committed."""
        transaction, self._transaction = self._transaction, None
        if transaction is not None:
            with contextlib.suppress(errors.InFailedSqlTransaction):
                transaction.commit()

    def rollback(self) -> None:
        transaction, self._transaction = self._transaction, None
        if transaction is not None:
            transaction.rollback()

    def close(self) -> None:
        """Roll back what is open; the client (one gRPC channel per process) stays open for
        the next connection, as Lambda reuses it across warm invocations."""
        if not self.closed:
            self.closed = True
            # The lease is gone either way if this fails: the broker rolled it back.
            with contextlib.suppress(errors.Error):
                self.rollback()

    # -- Django's needs ----------------------------------------------------------------------

    @property
    def in_transaction(self) -> bool:
        """A lease is open (a statement ran since autocommit was turned off)."""
        return self._transaction is not None

    def set_time_zone(self, name: str | None) -> None:
        """Carry *name* as ``SET LOCAL TimeZone`` in each transaction (None, or the zone the
        pooled connections already have: do not)."""
        server = self.info.parameter_status("TimeZone")
        same = name == server or (_is_utc(name) and _is_utc(server))
        self.time_zone = None if name is None or same else name
        self._zone = ZoneInfo(name or server or "UTC")
        self.adapters.register_loader("timestamptz", _adapt.zone_tz_loader(self._zone, self.aware))

    def run(self, sql: str) -> Result:
        """Run *sql* (one statement, or several as Django's migrations may send, split with
        sqlparse and sent in one request) on the open lease, a new lease, or as one
        ``Execute``; return the last statement's result."""
        self._check_open()
        statements = split_statements(sql)
        if len(statements) > 1:
            return self.run_many(statements)[-1]
        options = deadline.call_options(self.timeout)
        if not self.autocommit:
            if self._transaction is None:
                self._transaction = self._begin(options)
            return self._transaction.query(sql)
        if self.time_zone is None or _outside_transaction_only(sql):
            # CREATE INDEX CONCURRENTLY, VACUUM & co. cannot run inside a transaction block;
            # they do not read the session time zone.
            return self.client.query(sql, **options)
        return self.client.transaction([self._set_time_zone_sql(), sql], **options)[-1]

    def run_many(self, sqls: Sequence[str]) -> list[Result]:
        """Several statements in one round trip, in one transaction (executemany)."""
        self._check_open()
        if not sqls:
            return []
        options = deadline.call_options(self.timeout)
        if not self.autocommit:
            if self._transaction is None:
                self._transaction = self._begin(options)
            return self._transaction.pipeline(list(sqls))
        prefix = [] if self.time_zone is None else [self._set_time_zone_sql()]
        return self.client.transaction([*prefix, *sqls], **options)[len(prefix) :]

    def row_loader(self, type_oids: Sequence[int], zone: tzinfo | None) -> _adapt.RowLoader:
        return _adapt.RowLoader(type_oids, self.adapters, zone or self._zone, self.aware)

    def lease(self) -> Transaction:
        """The open lease of this ``atomic()`` block, opened now if nothing ran yet."""
        self._check_open()
        if self._transaction is None:
            self._transaction = self._begin(deadline.call_options(self.timeout))
        return self._transaction

    def begin_lease(self, options: dict[str, Any]) -> Transaction:
        """A lease of its own (a streaming cursor's in autocommit), with this connection's
        isolation level and time zone; the caller ends it."""
        self._check_open()
        return self._begin(options)

    def _begin(self, options: dict[str, Any]) -> Transaction:
        isolation = ISOLATION_NAMES.get(self.isolation_level or 0)
        transaction = self.client.begin(isolation=isolation, **options)
        if self.time_zone is not None:
            try:
                transaction.query(self._set_time_zone_sql())
            except BaseException:
                transaction.rollback()
                raise
        return transaction

    def _set_time_zone_sql(self) -> str:
        assert self.time_zone is not None
        return _adapt.mogrify("SET LOCAL TimeZone TO %s", [self.time_zone], self.adapters)

    def _check_open(self) -> None:
        if self.closed:
            raise errors.InterfaceError("the connection is closed")


_UTC_NAMES = {
    "utc",
    "etc/utc",
    "uct",
    "etc/uct",
    "universal",
    "etc/universal",
    "zulu",
    "etc/zulu",
    "gmt",
    "etc/gmt",
    "gmt0",
    "etc/gmt0",
    "greenwich",
    "etc/greenwich",
}
_OUTSIDE_TRANSACTION = (
    "vacuum",
    "create database",
    "drop database",
    "alter system",
    "create tablespace",
    "drop tablespace",
)


def _is_utc(name: str | None) -> bool:
    return name is not None and name.lower() in _UTC_NAMES


def _outside_transaction_only(sql: str) -> bool:
    """Statements Postgres refuses inside a transaction block (a coarse test: it only decides
    whether the SET LOCAL TimeZone prefix is left out)."""
    text = " ".join(sql.lower().split())
    return text.startswith(_OUTSIDE_TRANSACTION) or " concurrently " in f"{text} "


def split_statements(sql: str) -> list[str]:
    """*sql* as its statements (sqlparse, which knows quotes, comments and dollar quotes);
    only texts with a ``;`` before their end are parsed, the rest are one statement."""
    if ";" not in sql.rstrip().rstrip(";"):
        return [sql]
    import sqlparse  # a Django dependency; loaded only for multi-statement texts

    return [s.rstrip(";") for s in sqlparse.split(sql) if s.strip().rstrip(";").strip()]


def make_column(name: str, type_code: int, types: Any) -> Column:
    column = Column(name, type_code)
    column.types = types
    return column


class Cursor:
    """A PEP 249 cursor: ``%s``/``%(name)s`` placeholders bound on the client as psycopg's
    ClientCursor does; the whole result is fetched with the statement."""

    arraysize = 1

    def __init__(self, connection: Connection) -> None:
        self.connection = connection
        self.zone: tzinfo | None = None  # timestamptz values' zone; None: the session's
        self.query: str | None = None  # the last SQL sent, literals merged (psycopg's _query)
        self.description: list[Column] | None = None
        self.rowcount = -1
        self.statusmessage: str | None = None
        self._rows: Iterator[tuple[Any, ...]] = iter(())
        self.closed = False

    def execute(self, sql: str, params: Sequence[Any] | dict[str, Any] | None = None) -> Cursor:
        self._check_open()
        self.query = _adapt.mogrify(sql, params, self.connection.adapters)
        self._take(self.connection.run(self.query))
        return self

    def executemany(self, sql: str, param_sets: Sequence[Sequence[Any]]) -> Cursor:
        self._check_open()
        adapters = self.connection.adapters
        results = self.connection.run_many([_adapt.mogrify(sql, p, adapters) for p in param_sets])
        self.description = None
        self._rows = iter(())
        self.rowcount = sum(max(r.rows_affected, 0) for r in results) if results else 0
        return self

    def callproc(self, procname: str, args: Sequence[Any] = ()) -> Sequence[Any]:
        """``SELECT * FROM procname(args)``, as psycopg's Django cursor does."""
        placeholders = ", ".join(["%s"] * len(args))
        self.execute(f"SELECT * FROM {procname}({placeholders})", list(args))
        return args

    def fetchone(self) -> tuple[Any, ...] | None:
        self._check_result()
        return next(self._rows, None)

    def fetchmany(self, size: int | None = None) -> list[tuple[Any, ...]]:
        self._check_result()
        count = self.arraysize if size is None else size
        return [row for _, row in zip(range(count), self._rows, strict=False)]

    def fetchall(self) -> list[tuple[Any, ...]]:
        self._check_result()
        return list(self._rows)

    def __iter__(self) -> Iterator[tuple[Any, ...]]:
        self._check_result()
        return self._rows

    def close(self) -> None:
        self.closed = True
        self._rows = iter(())

    def setinputsizes(self, sizes: Any) -> None:
        pass

    def setoutputsize(self, size: Any, column: Any = None) -> None:
        pass

    def __enter__(self) -> Cursor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _take(self, result: Result) -> None:
        self.statusmessage = result.command_tag
        self.rowcount = result.rows_affected
        if result.columns:
            types = self.connection.adapters.types
            self.description = [
                make_column(n, t, types)
                for n, t in zip(result.columns, result.type_oids, strict=False)
            ]
            load = self.connection.row_loader(result.type_oids, self.zone)
            self._rows = iter(result.rows) if load.identity else map(load, result.rows)
            if self.rowcount < 0:
                self.rowcount = len(result.rows)
        else:
            self.description = None
            self._rows = iter(())

    def _check_open(self) -> None:
        if self.closed:
            raise errors.InterfaceError("the cursor is closed")
        self.connection._check_open()

    def _check_result(self) -> None:
        self._check_open()
        if self.description is None:
            raise errors.ProgrammingError("the last statement returned no rows")
