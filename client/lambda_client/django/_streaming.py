"""``QuerySet.iterator()`` without loading the whole result: a cursor declared inside a lease
and read with FETCH, ``chunk_size`` rows per round trip.

Behind a transaction pooler Django's docs say to disable server-side cursors because psycopg
declares them ``WITH HOLD`` in autocommit, so they outlive the transaction on a connection the
pooler hands to someone else (the broker refuses ``WITH HOLD`` for that reason). This cursor
is declared ``WITHOUT HOLD`` inside a ``Transact`` lease instead: inside ``atomic()`` the
block's own lease; in autocommit a lease of its own, held while the iterator is read and
ended (COMMIT) when the rows run out or the cursor is closed (Django closes it when the
iterator is exhausted or dropped). Memory holds one chunk at a time.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

from lambda_client import errors
from lambda_client.django import _adapt, deadline
from lambda_client.django._connection import Cursor, make_column

if TYPE_CHECKING:
    from lambda_client.client import Result
    from lambda_client.transaction import Transaction

FIRST_CHUNK = 2000  # Django's GET_ITERATOR_CHUNK_SIZE; fetchmany sizes the later ones
_names = itertools.count(1)


class StreamingCursor(Cursor):
    """A cursor for Django's chunked reads (`DatabaseWrapper.chunked_cursor`)."""

    def __init__(self, connection: Any) -> None:
        super().__init__(connection)
        self._name = f"_lc_curs_{next(_names)}"
        self._lease: Transaction | None = None
        self._own_lease = False
        self._buffer: list[tuple[Any, ...]] = []
        self._done = True
        self._load: Any = None

    def execute(self, sql: str, params: Sequence[Any] | dict[str, Any] | None = None) -> Cursor:
        self._check_open()
        self._end_own_lease(commit=False)
        literal = self.query = _adapt.mogrify(sql, params, self.connection.adapters)
        if self.connection.autocommit:
            self._lease = self.connection.begin_lease(
                deadline.call_options(self.connection.timeout)
            )
            self._own_lease = True
        else:
            self._lease = self.connection.lease()
            self._own_lease = False
        try:
            self._lease.query(f"DECLARE {self._name} NO SCROLL CURSOR WITHOUT HOLD FOR {literal}")
            self._done = False
            self._fill(FIRST_CHUNK)
        except BaseException:
            self._end_own_lease(commit=False)
            raise
        return self

    def fetchone(self) -> tuple[Any, ...] | None:
        rows = self.fetchmany(1)
        return rows[0] if rows else None

    def fetchmany(self, size: int | None = None) -> list[tuple[Any, ...]]:
        self._check_result()
        count = self.arraysize if size is None else size
        if len(self._buffer) < count and not self._done:
            self._fill(count - len(self._buffer))
        rows, self._buffer = self._buffer[:count], self._buffer[count:]
        return rows

    def fetchall(self) -> list[tuple[Any, ...]]:
        rows: list[tuple[Any, ...]] = []
        while chunk := self.fetchmany(FIRST_CHUNK):
            rows.extend(chunk)
        return rows

    def __iter__(self) -> Iterator[tuple[Any, ...]]:
        while row := self.fetchone():
            yield row

    def close(self) -> None:
        if not self.closed:
            try:
                self._end_own_lease(commit=True)
            finally:
                super().close()
                self._buffer = []

    def _fill(self, count: int) -> None:
        assert self._lease is not None
        result: Result = self._lease.query(f"FETCH FORWARD {max(count, 1)} FROM {self._name}")
        if self.description is None or self._load is None:
            types = self.connection.adapters.types
            self.description = [
                make_column(n, t, types)
                for n, t in zip(result.columns, result.type_oids, strict=False)
            ]
            self._load = self.connection.row_loader(result.type_oids, self.zone)
        rows = result.rows if self._load.identity else [self._load(r) for r in result.rows]
        self._buffer.extend(rows)
        self.rowcount = -1
        if len(result.rows) < count:
            self._done = True
            self._end_own_lease(commit=True)

    def _end_own_lease(self, *, commit: bool) -> None:
        lease, own = self._lease, self._own_lease
        if lease is None:
            return
        self._lease = None
        if not own:
            return  # atomic()'s lease: the block ends it; the cursor dies with it
        try:
            if commit:
                lease.commit()
            else:
                lease.rollback()
        except errors.Error:
            if commit:
                raise
