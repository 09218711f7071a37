"""`PGDialect_pgbroker`: SQLAlchemy's PostgreSQL dialect over `lambda_client.dbapi`, built the
way SQLAlchemy's own pg8000 dialect is (``sqlalchemy/dialects/postgresql/pg8000.py``).

What differs from a direct Postgres driver, and why:

* Isolation level, read only and deferrable go **per transaction** (the DB-API connection's
  ``isolation_level`` / ``read_only`` / ``deferrable``, sent with the transaction's BEGIN).
  The stock dialect sets them with ``SET SESSION CHARACTERISTICS``: session state, which the
  broker refuses because the pooled connection serves someone else's transaction next.
  ``AUTOCOMMIT`` is the DB-API's autocommit: each statement is one ``Execute`` call.
* Reading the server's defaults (``SHOW transaction_isolation`` …) outside a transaction goes
  through the client as one autocommit call, so it never opens a ``Transact`` lease.
* The pool's ping is one autocommit ``SELECT 1``, for the same reason.
* Deadlines: the execution options ``lambda_context`` (the handler's context: the remaining
  time minus the client's margin) and ``timeout`` (seconds) bound the statements, and a
  transaction opened by them as a whole; ``engine.execution_options(lambda_context=context)``
  applies them to everything run through that engine view. The URL's ``timeout`` is the
  default.
* Server-side cursors (``stream_results``, ``yield_per``) are DB-API named cursors: a
  ``Broker.Stream`` read as SQLAlchemy fetches under AUTOCOMMIT, DECLARE/FETCH inside a
  transaction; ``use_server_side_cursors`` stays off by default.

URL: ``postgresql+pgbroker://[token@]host:port[/dbname][?tls=true&…]`` or
``postgresql+pgbroker:///[dbname]?target=dns:///broker.ns:50051`` (`connect_args_from_url`).
"""

from __future__ import annotations

from typing import Any, cast

from sqlalchemy import util
from sqlalchemy.dialects.postgresql.base import (
    PGCompiler,
    PGDialect,
    PGExecutionContext,
    PGIdentifierPreparer,
)
from sqlalchemy.engine import URL
from sqlalchemy.engine.interfaces import IsolationLevel

from lambda_client.sqlalchemy._types import COLSPECS
from lambda_client.sqlalchemy._url import connect_args_from_url

__all__ = ["PGDialect_pgbroker"]

_server_side_id = util.counter()

# Execution options the dialect reads (beside SQLAlchemy's own).
_CONTEXT_OPTION = "lambda_context"
_TIMEOUT_OPTION = "timeout"
_ISOLATION_LEVELS: tuple[IsolationLevel, ...] = (
    "AUTOCOMMIT",
    "READ COMMITTED",
    "READ UNCOMMITTED",
    "REPEATABLE READ",
    "SERIALIZABLE",
)


class PGExecutionContext_pgbroker(PGExecutionContext):
    def create_server_side_cursor(self) -> Any:
        ident = f"c_{id(self):x}_{_server_side_id():x}"
        return self._dbapi_connection.cursor(ident)

    def pre_exec(self) -> None:
        """Apply the ``lambda_context`` / ``timeout`` execution options to the DB-API
        connection, or restore the URL's defaults when a statement has none, so options
        never leak from one use of a pooled connection to the next."""
        options = self.execution_options
        # The pool's proxy forwards reads, not writes: set them on the DB-API connection.
        dbapi_connection: Any = self._dbapi_connection.dbapi_connection  # type: ignore[union-attr]
        dialect: PGDialect_pgbroker = self.dialect  # type: ignore[assignment]
        dbapi_connection.context = options.get(_CONTEXT_OPTION)
        dbapi_connection.timeout = options.get(_TIMEOUT_OPTION, dialect.default_timeout)


class PGCompiler_pgbroker(PGCompiler):
    def visit_mod_binary(self, binary: Any, operator: Any, **kw: Any) -> str:
        # The modulo operator in a %-format query (pyformat) is written %%.
        return self.process(binary.left, **kw) + " %% " + self.process(binary.right, **kw)


class PGIdentifierPreparer_pgbroker(PGIdentifierPreparer):
    pass


class PGDialect_pgbroker(PGDialect):
    """``postgresql+pgbroker``; see the module docstring."""

    driver = "pgbroker"
    supports_statement_cache = True
    default_paramstyle = "pyformat"
    supports_sane_multi_rowcount = True
    supports_server_side_cursors = True
    execution_ctx_cls = PGExecutionContext_pgbroker
    statement_compiler = PGCompiler_pgbroker
    preparer = PGIdentifierPreparer_pgbroker
    # The codec sends dict/Json as json itself, but SQLAlchemy's JSON type serializes to a
    # string (honouring json_serializer) that travels as text with a ::JSON cast; results
    # arrive parsed.
    supports_native_json_serialization = False
    supports_native_json_deserialization = True
    dialect_injects_custom_json_deserializer = True
    supports_native_uuid = True
    render_bind_cast = True
    description_encoding = None
    colspecs = util.update_copy(PGDialect.colspecs, COLSPECS)

    def __init__(self, timeout: float | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        #: Seconds bounding each call when no ``timeout`` execution option is given (the
        #: URL's or connect_args' ``timeout`` when there is one).
        self.default_timeout = timeout

    @classmethod
    def import_dbapi(cls) -> Any:
        from lambda_client import dbapi

        return dbapi

    def create_connect_args(self, url: URL) -> tuple[list[Any], dict[str, Any]]:
        return [], connect_args_from_url(url)

    def connect(self, *cargs: Any, **cparams: Any) -> Any:
        """`lambda_client.dbapi.connect`; a ``timeout`` from the URL or ``connect_args``
        becomes the default that statements without a ``timeout`` option get back."""
        if "timeout" in cparams:
            self.default_timeout = cparams["timeout"]
        return super().connect(*cargs, **cparams)

    def is_disconnect(self, e: Any, connection: Any, cursor: Any) -> bool:
        """A closed DB-API connection, or a broker that cannot be reached: the pool drops
        the connection (a new one costs nothing: it shares the process's channel)."""
        dbapi = self.loaded_dbapi
        if isinstance(e, dbapi.InterfaceError) and "connection is closed" in str(e):
            return True
        code = getattr(e, "code", None)
        return getattr(code, "name", None) == "UNAVAILABLE"

    # -- per-transaction characteristics ---------------------------------------------------

    def get_isolation_level_values(self, dbapi_connection: Any) -> tuple[IsolationLevel, ...]:
        return _ISOLATION_LEVELS

    def set_isolation_level(self, dbapi_connection: Any, level: str) -> None:
        """AUTOCOMMIT turns the DB-API's autocommit on; a level applies to every transaction
        the connection opens from now on (never ``SET SESSION CHARACTERISTICS``)."""
        level = level.replace("_", " ")
        if level == "AUTOCOMMIT":
            dbapi_connection.autocommit = True
            return
        dbapi_connection.autocommit = False
        dbapi_connection.isolation_level = level

    def detect_autocommit_setting(self, dbapi_conn: Any) -> bool:
        return bool(dbapi_conn.autocommit)

    def get_isolation_level(self, dbapi_connection: Any) -> IsolationLevel:
        if dbapi_connection.autocommit and not dbapi_connection.in_transaction:
            return "AUTOCOMMIT"
        # The level the connection's transactions begin with (it cannot change inside one);
        # READ UNCOMMITTED is asked for as such, although Postgres runs it as READ COMMITTED.
        level = dbapi_connection.isolation_level
        if level is not None:
            return _level(level.name.replace("_", " "))
        return _level(self._show(dbapi_connection, "transaction_isolation"))

    def get_default_isolation_level(self, dbapi_conn: Any) -> IsolationLevel:
        """The level the engine's connections start with (an ``isolation_level=`` given to
        `create_engine` is applied by then), which a connection returned to the pool gets
        back; under AUTOCOMMIT, the server's."""
        level = self.get_isolation_level(dbapi_conn)
        if level == "AUTOCOMMIT":
            return _level(self._show(dbapi_conn, "transaction_isolation"))
        return level

    def set_readonly(self, connection: Any, value: bool) -> None:
        connection.read_only = bool(value)

    def get_readonly(self, connection: Any) -> bool:
        if connection.read_only is not None and not connection.in_transaction:
            return bool(connection.read_only)
        return self._show(connection, "transaction_read_only") == "on"

    def set_deferrable(self, connection: Any, value: bool) -> None:
        connection.deferrable = bool(value)

    def get_deferrable(self, connection: Any) -> bool:
        if connection.deferrable is not None and not connection.in_transaction:
            return bool(connection.deferrable)
        return self._show(connection, "transaction_deferrable") == "on"

    def _show(self, dbapi_connection: Any, setting: str) -> Any:
        """A setting's value: inside the open transaction if there is one, else as one
        autocommit call (no lease)."""
        sql = f"SHOW {setting}"
        if dbapi_connection.in_transaction:
            cursor = dbapi_connection.cursor()
            try:
                cursor.execute(sql)
                return cursor.fetchone()[0]
            finally:
                cursor.close()
        result = dbapi_connection.client.query(
            sql, context=dbapi_connection.context, timeout=dbapi_connection.timeout
        )
        return result.scalar()

    def do_ping(self, dbapi_connection: Any) -> bool:
        """One autocommit ``SELECT 1`` over the client (never a transaction lease)."""
        dbapi_connection.client.query("SELECT 1", timeout=dbapi_connection.timeout)
        return True

    # -- two-phase commit ------------------------------------------------------------------

    def do_begin_twophase(self, connection: Any, xid: Any) -> None:
        raise self.loaded_dbapi.NotSupportedError(
            "two-phase commit is not supported through pgbroker: PREPARE TRANSACTION is "
            "refused (the broker ends every transaction itself)"
        )

    @classmethod
    def load_provisioning(cls) -> None:
        """SQLAlchemy's test plugin asks the dialect's package for its provisioning hooks;
        this dialect's are postgresql's."""
        import sqlalchemy.dialects.postgresql.provision  # noqa: F401

    @util.memoized_property
    def _dialect_specific_select_one(self) -> str:
        return "SELECT 1"


def _level(name: Any) -> IsolationLevel:
    return cast(IsolationLevel, str(name).upper())


dialect = PGDialect_pgbroker
