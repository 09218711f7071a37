"""`DirectClient`: the `BrokerClient` calls a handler makes, served by its own pg8000 connection.

Phase 1 runs the example handler unchanged with this in place of its `BrokerClient`, so the
handler's own SQL and logic run, the way the same function would before pgbroker: one
database connection per Lambda container, opened on first use and kept for warm invocations.
SQL keeps Postgres' ``$1…$n`` placeholders (pg8000 sends them as they are); results are the
client's own `Result` objects, so ``.one()``, ``.scalar()``, ``.dicts()`` behave the same.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence
from typing import Any

import pg8000.native

from demo.database import connect
from lambda_client.client import Result

__all__ = ["DirectClient"]

_ISOLATION = {
    None: "",
    "read committed": " ISOLATION LEVEL READ COMMITTED",
    "repeatable read": " ISOLATION LEVEL REPEATABLE READ",
    "serializable": " ISOLATION LEVEL SERIALIZABLE",
}


class DirectClient:
    """A direct Postgres connection to *dsn* with `BrokerClient`'s ``query`` and
    ``transaction``. The connection opens on the first call (as a Lambda's module-level
    connection does on its first invocation) and `connected_at` records when it was ready;
    a refused connection raises pg8000's `DatabaseError` with Postgres' message."""

    def __init__(self, dsn: str, *, application_name: str = "pgbroker-demo-direct") -> None:
        self.dsn = dsn
        self.application_name = application_name
        self.connected_at: float | None = None
        self._conn: pg8000.native.Connection | None = None

    def query(
        self,
        sql: str,
        params: Sequence[Any] | None = None,
        *,
        context: object = None,
        timeout: float | None = None,
    ) -> Result:
        """Run one statement on its own (autocommit)."""
        return self._run(self._connection(), sql, params)

    def transaction(
        self,
        statements: Sequence[str | tuple[str, Sequence[Any] | None]],
        *,
        isolation: str | None = None,
        read_only: bool = False,
        deferrable: bool = False,
        context: object = None,
        timeout: float | None = None,
        retry_serialization: bool = False,
    ) -> list[Result]:
        """BEGIN, each statement, COMMIT; on any error ROLLBACK and re-raise. With
        *retry_serialization*, a serialization failure or deadlock resends the transaction
        (up to 5 attempts), as `BrokerClient` does."""
        for attempt in range(1, 6):
            try:
                return self._transaction(statements, isolation, read_only, deferrable)
            except pg8000.native.DatabaseError as exc:
                fields = exc.args[0] if exc.args and isinstance(exc.args[0], dict) else {}
                if not retry_serialization or attempt == 5:
                    raise
                if fields.get("C") not in ("40001", "40P01"):
                    raise
        raise AssertionError("unreachable")

    def _transaction(
        self,
        statements: Sequence[str | tuple[str, Sequence[Any] | None]],
        isolation: str | None,
        read_only: bool,
        deferrable: bool,
    ) -> list[Result]:
        conn = self._connection()
        begin = "BEGIN" + _ISOLATION[isolation]
        if read_only:
            begin += " READ ONLY"
        if deferrable:
            begin += " DEFERRABLE"
        conn.run(begin)
        try:
            results = [
                self._run(conn, *(s if isinstance(s, tuple) else (s, None))) for s in statements
            ]
            conn.run("COMMIT")
        except BaseException:
            with contextlib.suppress(Exception):
                conn.run("ROLLBACK")
            raise
        return results

    def execute_many(
        self, sql: str, param_sets: Sequence[Sequence[Any]], **kwargs: Any
    ) -> list[Result]:
        return self.transaction([(sql, params) for params in param_sets], **kwargs)

    def close(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(Exception):
                self._conn.close()
            self._conn = None

    def _connection(self) -> pg8000.native.Connection:
        if self._conn is None:
            self._conn = connect(self.dsn, application_name=self.application_name)
            self.connected_at = time.monotonic()
        return self._conn

    @staticmethod
    def _run(conn: pg8000.native.Connection, sql: str, params: Sequence[Any] | None) -> Result:
        context = conn.execute_unnamed(sql, vals=list(params or ()))
        columns = tuple(c["name"] for c in context.columns or ())
        rows = [tuple(row) for row in context.rows or ()]
        return Result(
            columns=columns,
            rows=rows,
            rows_affected=context.row_count if context.row_count is not None else -1,
            command_tag="",
        )
