"""Named (server-side) cursors of `lambda_client.dbapi` against a real broker process and
Postgres: in autocommit a ``Broker.Stream`` pulled chunk by chunk as rows are fetched (client
memory bounded over 200,000 rows, fetchmany sizes, an early close freeing the broker's
connection, errors as DB-API exceptions), in a transaction DECLARE/FETCH with statements
interleaved, and SQLAlchemy's ``stream_results`` over both."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from sqlalchemy import NullPool, create_engine, text
from sqlalchemy.engine import Engine

from devtools.brokerproc import BrokerProcess
from lambda_client import dbapi, errors
from tests.support import temp_table, wait_until

POOL_SIZE = 2
ROWS = 200_000
WIDTH = 300  # characters per row: 60 MB of text over 200,000 rows
# Holding those rows as Python objects takes 100 MB (measured: fetchall on the same cursor),
# 100,000 rows of 600 characters 67 MB.
MAX_GROWTH_MB = 50
BIG = "SELECT g, repeat('x', %s) AS body FROM generate_series(1, %s) g"


@pytest.fixture(scope="module")
def broker(postgres: Any) -> Iterator[BrokerProcess]:
    with BrokerProcess(
        postgres.dsn + "?sslmode=disable", pool_size=POOL_SIZE, auth="none", shutdown_grace=2
    ) as process:
        yield process


@pytest.fixture
def conn(broker: BrokerProcess) -> Iterator[dbapi.Connection]:
    connection = dbapi.connect(broker.target, autocommit=True)
    yield connection
    connection.close()


def pool_active(broker: BrokerProcess) -> int:
    return dbapi.client_for(broker.target, {}).stats()["pool_active"]


def all_idle(broker: BrokerProcess) -> None:
    """Every pooled connection is back in the pool, and none was lost on the way."""
    client = dbapi.client_for(broker.target, {})
    wait_until(lambda: client.stats()["pool_active"] == 0, timeout=5, what="the pool idle")
    assert client.stats()["connections_lost"] == 0


class PeakRss:
    """The process's resident memory, sampled every 5 ms by a thread (and on `sample`)."""

    def __init__(self) -> None:
        self._page = os.sysconf("SC_PAGE_SIZE")
        self.start = self.peak = self._rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _rss(self) -> int:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * self._page

    def sample(self) -> None:
        self.peak = max(self.peak, self._rss())

    def _run(self) -> None:
        while not self._stop.wait(0.005):
            self.sample()

    @property
    def growth_mb(self) -> float:
        return (self.peak - self.start) / 2**20

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()


def read_in_bounded_memory(read: Callable[[PeakRss], int]) -> tuple[int, float]:
    """Run *read* (returning the rows it saw) under `PeakRss`; (rows, growth in MB)."""
    with PeakRss() as rss:
        seen = read(rss)
    return seen, rss.growth_mb


# -- autocommit: a stream ------------------------------------------------------------------


def test_a_named_cursor_in_autocommit_streams_200k_rows_in_bounded_memory(
    conn: dbapi.Connection, broker: BrokerProcess
) -> None:
    def read(rss: PeakRss) -> int:
        cur = conn.cursor("big")
        cur.execute(BIG, [WIDTH, ROWS])
        assert [(c.name, c.type_code) for c in cur.description or []] == [
            ("g", 23),
            ("body", 25),
        ]
        assert cur.rowcount == 0
        assert pool_active(broker) == 1  # held while the stream is read
        seen, expected = 0, 1
        while rows := cur.fetchmany(1000):
            assert len(rows) == 1000 or seen + len(rows) == ROWS
            assert rows[0] == (expected, "x" * WIDTH) and rows[-1][0] == expected + len(rows) - 1
            expected += len(rows)
            seen += len(rows)
            rss.sample()
        assert cur.rowcount == ROWS and cur.fetchone() is None and cur.fetchall() == []
        cur.close()
        return seen

    seen, growth = read_in_bounded_memory(read)
    print(f"{seen} rows of {WIDTH} characters: client RSS grew {growth:.1f} MB")
    assert seen == ROWS
    assert growth < MAX_GROWTH_MB
    all_idle(broker)  # read to its end: the broker committed and freed the connection


def test_fetchmany_sizes_are_honoured_across_chunks(conn: dbapi.Connection) -> None:
    # 2 MB of rows: the broker sends chunks of about 1 MiB, so sizes cross chunk boundaries.
    with conn.cursor("sizes") as cur:
        cur.execute(BIG, [WIDTH, 7000])
        got = [cur.fetchone()]
        assert cur.rowcount == 1
        for size in (0, 1, 7, 999, 2500, 3):
            rows = cur.fetchmany(size)
            assert len(rows) == size
            got += rows
        cur.arraysize = 250
        assert len(cur.fetchmany()) == 250
        assert cur.rownumber == 3761
        cur.itersize = 10  # iteration reads on, as fetchmany does
        got += [
            row for _, row in zip(range(239), cur, strict=False)
        ]  # range first: zip stops without pulling a row too many
        got += cur.fetchmany(10_000)  # fewer remain: the rest
        assert cur.fetchmany(5) == []
    numbers = [row[0] for row in got if row is not None]
    assert len(numbers) == 7000 - 250 and numbers == sorted(set(numbers))
    assert cur.rowcount == 7000


def test_an_empty_result_has_its_columns(conn: dbapi.Connection) -> None:
    cur = conn.cursor("empty")
    cur.execute("SELECT 1 AS one, 'x'::text AS two WHERE false")
    assert [c.name for c in cur.description or []] == ["one", "two"]
    assert cur.fetchall() == [] and cur.rowcount == 0


def test_stopping_early_frees_the_broker_connection_at_once(
    conn: dbapi.Connection, broker: BrokerProcess
) -> None:
    endless = "SELECT generate_series(1, 50000000) AS g"
    cur = conn.cursor("early")
    cur.execute(endless)
    assert cur.fetchone() == (1,)
    assert pool_active(broker) == 1
    cur.close()  # 50 million rows unread: cancelled, not read to the end
    all_idle(broker)
    with pytest.raises(dbapi.InterfaceError, match="closed"):
        cur.fetchone()

    with conn.cursor("block") as cur:  # leaving the with-block
        cur.execute(endless)
        cur.fetchmany(10)
    all_idle(broker)

    cur = conn.cursor("again")
    cur.execute(endless)
    cur.fetchone()
    cur.execute("SELECT 42")  # executing again stops the earlier stream
    assert cur.fetchall() == [(42,)]
    all_idle(broker)

    other = dbapi.connect(broker.target, autocommit=True)
    cur = other.cursor("with_the_connection")
    cur.execute(endless)
    cur.fetchone()
    other.close()  # closing the connection stops its streams
    assert cur.closed
    all_idle(broker)


def test_query_errors_surface_as_dbapi_exceptions(
    conn: dbapi.Connection, broker: BrokerProcess, postgres: Any
) -> None:
    cur = conn.cursor("errors")
    with pytest.raises(dbapi.ProgrammingError) as caught:
        cur.execute("SELEC 1")
    assert caught.value.sqlstate == "42601"
    with pytest.raises(dbapi.ProgrammingError) as caught:
        cur.execute("SELECT * FROM no_such_table")
    assert caught.value.sqlstate == "42P01"
    with pytest.raises(dbapi.ProgrammingError, match="no results"):
        cur.fetchone()  # a failed execute leaves no result behind
    with pytest.raises(dbapi.ProgrammingError):
        cur.execute("SELECT %s", [object()])  # a value with no Postgres type: nothing sent
    with pytest.raises(dbapi.ProgrammingError):
        cur.execute("SELECT %s, %s", [1])
    with temp_table(postgres, "streamed", "id int") as table:
        with pytest.raises(dbapi.InternalError) as caught:
            cur.execute(f"SELECT * FROM {table} FOR UPDATE")  # read only outside a transaction
        assert caught.value.sqlstate == "25006"

    # Row 3000 divides by zero: the rows before it arrive, then the error.
    cur.execute("SELECT 1 / (3000 - g) FROM generate_series(1, 10000) g")
    assert len(cur.fetchmany(100)) == 100
    with pytest.raises(dbapi.DataError) as caught:
        while cur.fetchmany(500):
            pass
    assert isinstance(caught.value, errors.DivisionByZero)
    with pytest.raises(dbapi.ProgrammingError, match="failed midway"):
        cur.fetchall()  # never an empty list that looks like the end
    cur.execute("SELECT 1")  # usable again
    assert cur.fetchall() == [(1,)]
    all_idle(broker)


# -- in a transaction: DECLARE/FETCH ------------------------------------------------------


def test_in_a_transaction_statements_run_between_fetches(
    broker: BrokerProcess, postgres: Any
) -> None:
    """The named cursor stays DECLARE/FETCH on the lease: an UPDATE per row while the cursor
    is open works (a tx.stream would have to be read to its end first)."""
    with temp_table(postgres, "interleaved", "id int PRIMARY KEY, seen bool") as table:
        conn = dbapi.connect(broker.target)  # autocommit off
        conn.cursor().execute(f"INSERT INTO {table} SELECT g, false FROM generate_series(1, 500) g")
        cur = conn.cursor("walk")
        cur.itersize = 50
        cur.execute(f"SELECT id FROM {table} ORDER BY id")
        writer = conn.cursor()
        for (row_id,) in cur:
            writer.execute(f"UPDATE {table} SET seen = true WHERE id = %s", [row_id])
        assert cur.rowcount == 500
        writer.execute(f"SELECT count(*) FROM {table} WHERE seen")
        assert writer.fetchone() == (500,)
        conn.commit()
        cur.execute("SELECT 1")  # declared anew in the next transaction
        assert cur.fetchall() == [(1,)]
        conn.rollback()
        conn.autocommit = True
        cur.execute("SELECT 2")  # the same cursor streams in autocommit
        assert cur.fetchall() == [(2,)]
        conn.close()
    all_idle(broker)


# -- SQLAlchemy's stream_results -----------------------------------------------------------


@pytest.fixture(scope="module")
def engine(broker: BrokerProcess) -> Iterator[Engine]:
    engine = create_engine(f"postgresql+pgbroker://{broker.target}", poolclass=NullPool)
    yield engine
    engine.dispose()


def test_sqlalchemy_stream_results_in_autocommit_keeps_memory_bounded(
    engine: Engine, broker: BrokerProcess
) -> None:
    autocommit = engine.execution_options(isolation_level="AUTOCOMMIT")

    def read(rss: PeakRss) -> int:
        seen = 0
        with autocommit.connect() as conn:
            # Half the rows, twice as wide: SQLAlchemy's per-row work is what takes time.
            result = conn.execution_options(stream_results=True).execute(
                text("SELECT g, repeat('x', :width) FROM generate_series(1, :rows) g"),
                {"width": WIDTH * 2, "rows": ROWS // 2},
            )
            assert isinstance(result.cursor, dbapi.ServerCursor)
            for partition in result.partitions(5000):
                seen += len(partition)
                rss.sample()
        return seen

    seen, growth = read_in_bounded_memory(read)
    print(f"SQLAlchemy stream_results, {seen} rows: client RSS grew {growth:.1f} MB")
    assert seen == ROWS // 2
    assert growth < MAX_GROWTH_MB
    all_idle(broker)


def test_sqlalchemy_stream_results_closed_early_frees_the_connection(
    engine: Engine, broker: BrokerProcess
) -> None:
    autocommit = engine.execution_options(isolation_level="AUTOCOMMIT", yield_per=100)
    with autocommit.connect() as conn:
        result = conn.execute(text("SELECT generate_series(1, 50000000)"))
        assert [row[0] for row in result.fetchmany(3)] == [1, 2, 3]
        assert pool_active(broker) == 1
        result.close()
        all_idle(broker)
    with engine.connect() as conn:  # a transaction: DECLARE/FETCH, interleaving allowed
        result = conn.execution_options(yield_per=10).execute(text("SELECT generate_series(1, 25)"))
        first = result.fetchmany(5)
        assert conn.scalar(text("SELECT 7")) == 7
        assert [row[0] for row in first + result.all()] == list(range(1, 26))
        conn.rollback()
    all_idle(broker)
