"""Streamed rows (`BrokerClient.stream`, ``Broker.Stream``; ``tx.stream`` inside ``Transact``)
against a real broker process and Postgres: chunks, columns, parameters, errors, a reader that
stops early or stops reading, and the stream statistics."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import pytest

from devtools.brokerproc import BrokerProcess
from lambda_client import BrokerClient, DataError, DeadlineExceeded, InvalidRequest
from lambda_client.aio import AsyncBrokerClient
from tests.support import connect, temp_table, wait_until

IDLE_TIMEOUT = 2.0
POOL_SIZE = 3


@pytest.fixture(scope="module")
def broker(postgres: Any) -> Iterator[BrokerProcess]:
    """A broker with a small pool and a short idle timeout (it also bounds a stalled reader)."""
    env = {"PGBROKER_IDLE_TRANSACTION_TIMEOUT": str(IDLE_TIMEOUT)}
    with BrokerProcess(
        postgres.dsn + "?sslmode=disable",
        pool_size=POOL_SIZE,
        auth="none",
        shutdown_grace=2,
        env=env,
    ) as process:
        yield process


@pytest.fixture
def db(broker: BrokerProcess) -> Iterator[BrokerClient]:
    with BrokerClient(broker.target) as client:
        yield client


def _all_idle(db: BrokerClient) -> bool:
    stats = db.stats()
    return stats["pool_available"] == POOL_SIZE and stats["pool_active"] == 0


def test_stream_returns_every_row_in_order_with_columns(db: BrokerClient) -> None:
    with db.stream(
        "SELECT g AS n, 'row ' || g AS label FROM generate_series(1, $1::int) g", [25_000]
    ) as rows:
        assert rows.columns == ("n", "label")
        got = list(rows)
    assert got == [(n, f"row {n}") for n in range(1, 25_001)]
    assert rows.rows_read == 25_000


def test_stream_of_no_rows_still_names_the_columns(db: BrokerClient) -> None:
    with db.stream("SELECT 1 AS one WHERE false") as rows:
        assert rows.columns == ("one",)
        assert list(rows) == []


def test_chunk_rows_sets_the_rows_per_chunk(db: BrokerClient) -> None:
    before = db.stats()["streams_bytes"]
    with db.stream("SELECT g FROM generate_series(1, 10) g", chunk_rows=3) as rows:
        assert [r[0] for r in rows] == list(range(1, 11))
    stats = db.stats()
    assert stats["streams_bytes"] > before
    with pytest.raises(ValueError, match="chunk_rows"):
        db.stream("SELECT 1", chunk_rows=0)


def test_stream_counts_rows_and_bytes_in_stats(db: BrokerClient) -> None:
    before = db.stats()
    assert len(list(db.stream("SELECT g FROM generate_series(1, 1234) g"))) == 1234
    after = db.stats()
    assert after["streams_num"] - before["streams_num"] == 1
    assert after["streams_rows"] - before["streams_rows"] == 1234
    assert after["streams_bytes"] - before["streams_bytes"] >= 1234 * 2


def test_an_error_midway_raises_after_the_rows_before_it(db: BrokerClient) -> None:
    # Row 5000 divides by zero: the rows of the FETCHes before it arrive first.
    rows = db.stream("SELECT 1 / (5000 - g) FROM generate_series(1, 10000) g", chunk_rows=1000)
    seen = 0
    with pytest.raises(DataError) as caught:
        for _ in rows:
            seen += 1
    assert caught.value.sqlstate == "22012"
    assert seen == 4000
    wait_until(lambda: _all_idle(db), timeout=5)


def test_stream_refuses_session_state_and_writes(db: BrokerClient, postgres: Any) -> None:
    with pytest.raises(InvalidRequest):
        db.stream("SET search_path = x")
    with temp_table(postgres, "stream", "id int") as table, pytest.raises(Exception) as caught:
        db.stream(f"INSERT INTO {table} VALUES (1) RETURNING id")
    assert getattr(caught.value, "sqlstate", None) in ("42601", "25006")
    assert _all_idle(db)


def test_a_reader_that_stops_early_closes_the_cursor_and_frees_the_connection(
    db: BrokerClient, postgres: Any
) -> None:
    rows = db.stream("SELECT generate_series(1, 50000000) AS g")
    assert next(rows) == (1,)
    assert db.stats()["pool_active"] == 1
    rows.close()
    # Freed at once (cancelled FETCH, ROLLBACK): long before the 50 million rows could be read.
    started = time.monotonic()
    wait_until(lambda: _all_idle(db), timeout=5)
    assert time.monotonic() - started < 5
    stats = db.stats()
    assert stats["connections_lost"] == 0  # returned clean, not replaced
    admin = connect(postgres)
    try:
        running = admin.run(
            "SELECT count(*) FROM pg_stat_activity WHERE query LIKE 'FETCH FORWARD%'"
            " AND state <> 'idle'"
        )
    finally:
        admin.close()
    assert running == [[0]]


@pytest.mark.slow
def test_a_reader_that_stops_reading_is_cut_off_after_the_idle_timeout(
    db: BrokerClient,
) -> None:
    rows = db.stream("SELECT repeat('x', 1000), generate_series(1, 10000000)")
    next(rows)
    started = time.monotonic()
    wait_until(lambda: _all_idle(db), timeout=IDLE_TIMEOUT + 10)
    assert time.monotonic() - started >= IDLE_TIMEOUT - 0.5
    with pytest.raises(DeadlineExceeded) as caught:
        for _ in rows:
            pass
    assert caught.value.reason == "IDLE_TRANSACTION_TIMEOUT"


@pytest.mark.slow
def test_the_deadline_bounds_the_whole_stream(db: BrokerClient) -> None:
    rows = db.stream(
        "SELECT g, pg_sleep(0.01) FROM generate_series(1, 100000) g", timeout=1.5, chunk_rows=10
    )
    with pytest.raises(DeadlineExceeded):
        for _ in rows:
            pass
    wait_until(lambda: _all_idle(db), timeout=5)


def test_async_stream(broker: BrokerProcess) -> None:
    async def main() -> list[Any]:
        async with (
            AsyncBrokerClient(broker.target) as db,
            await db.stream(
                "SELECT g FROM generate_series(1, $1::int) g", [3000], chunk_rows=700
            ) as rows,
        ):
            assert rows.columns == ("g",)
            return [r[0] async for r in rows]

    assert asyncio.run(main()) == list(range(1, 3001))


def test_tx_stream_reads_inside_the_transaction(db: BrokerClient, postgres: Any) -> None:
    with temp_table(postgres, "stream", "id int") as table, db.begin() as tx:
        tx.execute(f"INSERT INTO {table} SELECT generate_series(1, 5000)")
        with tx.stream(f"SELECT id FROM {table} ORDER BY id", chunk_rows=999) as rows:
            assert rows.columns == ("id",)
            assert [r[0] for r in rows] == list(range(1, 5001))
        # The transaction goes on after the stream, and sees its own writes.
        assert tx.query(f"SELECT count(*) FROM {table}").scalar() == 5000


def test_tx_stream_stopped_early_keeps_the_transaction(db: BrokerClient, postgres: Any) -> None:
    with temp_table(postgres, "stream", "id int") as table:
        with db.begin() as tx:
            tx.execute(f"INSERT INTO {table} VALUES (1)")
            with tx.stream("SELECT g FROM generate_series(1, 100000) g") as rows:
                assert next(rows) == (1,)
            tx.execute(f"INSERT INTO {table} VALUES (2)")
        assert db.query(f"SELECT count(*) FROM {table}").scalar() == 2


def test_tx_stream_error_aborts_the_transaction_like_a_statement(db: BrokerClient) -> None:
    with db.begin() as tx:
        with tx.savepoint():
            tx.execute("SELECT 1")
        with (
            pytest.raises(DataError),
            tx.stream("SELECT 1 / (g - 3) FROM generate_series(1, 5) g") as rows,
        ):
            list(rows)
        tx.rollback()
    assert _all_idle(db)


@pytest.mark.slow
def test_a_stalled_reader_inside_a_transaction_loses_the_lease_at_the_idle_timeout(
    db: BrokerClient, postgres: Any
) -> None:
    with temp_table(postgres, "stream", "id int") as table:
        tx = db.begin()
        tx.execute(f"INSERT INTO {table} VALUES (1)")
        rows = tx.stream("SELECT repeat('x', 1000), generate_series(1, 10000000)")
        next(rows)
        started = time.monotonic()
        wait_until(lambda: _all_idle(db), timeout=IDLE_TIMEOUT + 10)
        assert time.monotonic() - started >= IDLE_TIMEOUT - 0.5
        assert db.stats()["leases_ended_idle_transaction_timeout"] >= 1
        with pytest.raises(DeadlineExceeded) as caught:
            for _ in rows:
                pass
        assert caught.value.reason == "IDLE_TRANSACTION_TIMEOUT"
        assert tx.closed
        assert db.query(f"SELECT count(*) FROM {table}").scalar() == 0  # rolled back


def test_chunks_stay_near_one_mib_whatever_the_row_width(broker: BrokerProcess) -> None:
    import grpc

    from lambda_client._proto.pgbroker.v1 import broker_pb2 as pb
    from lambda_client._proto.pgbroker.v1 import broker_pb2_grpc as pb_grpc

    with grpc.insecure_channel(broker.target) as channel:
        stub = pb_grpc.BrokerStub(channel)
        for width, count in ((10, 300_000), (5000, 2000), (3 * 1024 * 1024, 3)):
            request = pb.StreamRequest(
                statement=pb.Statement(
                    sql=f"SELECT repeat('x', {width}) FROM generate_series(1, {count})"
                )
            )
            chunks = list(stub.Stream(request, timeout=60))
            assert sum(len(c.rows) for c in chunks) == count
            assert chunks[0].columns[0].type_oid == 25
            for chunk in chunks:
                # About 1 MiB: a chunk closes once it reaches 1 MiB; a wider row travels alone.
                assert chunk.ByteSize() <= 1024 * 1024 + width + 64 or len(chunk.rows) == 1
            if width * count > 2 * 1024 * 1024:
                assert len(chunks) >= min(count, (width * count) // (1024 * 1024))
