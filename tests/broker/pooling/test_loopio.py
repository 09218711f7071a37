"""pg8000 on the event loop in a greenlet (PGBROKER_PG_IO=loop): the socket shim
(broker/postgres/greenio.py) and its loop-side driver (broker/pooling/loopio.py), against a real
Postgres, plain and TLS, and over socket pairs where the test controls the peer."""

from __future__ import annotations

import asyncio
import gc
import socket
import threading
import time
import weakref
from collections.abc import Iterator
from typing import Any

import pytest
from greenlet import getcurrent, greenlet

from broker.config import parse_database_url
from broker.pooling import loopio
from broker.pooling.loopio import idle_runners, run_on_loop
from broker.postgres import greenio
from broker.postgres.pg import COOPERATE_ROWS, ConnectionLost, PgConnection, TransactionStatus
from broker.postgres.pg import connect as connect_pg
from devtools.localpg import LocalPostgres
from devtools.tcpproxy import TcpProxy
from tests.fixtures.certs import TestCA


def _connect(dsn: str) -> PgConnection:
    pg = connect_pg(parse_database_url(dsn), timeout=5, statement_timeout=30)
    pg.use_loop_io()
    return pg


@pytest.fixture
def pg(postgres: Any) -> Iterator[PgConnection]:
    conn = _connect(postgres.dsn + "?sslmode=disable")
    yield conn
    conn.close_quietly()


class Ticker:
    """Counts turns of the event loop (one per ``sleep(0)``) until stopped."""

    def __init__(self) -> None:
        self.turns = 0
        self._task = asyncio.ensure_future(self._run())

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(0)
            self.turns += 1

    async def stop(self) -> int:
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
        return self.turns


def _on_loop(fn: Any, *args: Any) -> Any:
    """*fn(*args)* in a greenlet on a fresh event loop; its result (the loop's turns meanwhile
    in ``.turns`` of the returned pair)."""

    async def main() -> tuple[Any, int]:
        ticker = Ticker()
        try:
            result = await run_on_loop(asyncio.get_running_loop(), fn, *args)
        finally:
            turns = await ticker.stop()
        return result, turns

    return asyncio.run(main())


def _where_it_ran(pg: PgConnection, sql: str) -> tuple[Any, str, bool]:
    rows = pg.execute_simple(sql)
    return rows, threading.current_thread().name, greenio.in_io_greenlet()


def test_a_query_runs_in_a_greenlet_on_the_loop_thread_and_waits_without_blocking(
    pg: PgConnection,
) -> None:
    (rows, thread, in_greenlet), turns = _on_loop(_where_it_ran, pg, "SELECT pg_sleep(0.3), 42")
    assert rows == [["", 42]]
    assert (thread, in_greenlet) == (threading.main_thread().name, True)
    # The loop kept turning while Postgres slept: the greenlet waited on the socket.
    assert turns > 100
    assert pg.transaction_status is TransactionStatus.IDLE


def test_the_same_connection_still_works_on_a_thread(pg: PgConnection) -> None:
    """A heavy request runs on a worker thread over the same non-blocking socket (poll)."""
    assert _on_loop(pg.execute_simple, "SELECT 1")[0] == [[1]]
    assert pg.execute_simple("SELECT 2") == [[2]]  # this thread, no greenlet
    assert _on_loop(pg.execute_simple, "SELECT 3")[0] == [[3]]


def test_prepared_statements_and_errors_keep_the_connection_in_sync(pg: PgConnection) -> None:
    from broker.postgres.pg import PgError
    from lambda_client._proto.pgbroker.v1 import broker_pb2 as pb

    def work() -> list[Any]:
        out = []
        for n in range(3):  # unnamed, then prepared, then reused
            result = pg.run("SELECT $1::int + 1", [pb.Value(int64=n)])
            out.append(result.rows[0].values[0].int64)
        with pytest.raises(PgError):
            pg.execute_simple("SELECT 1/0")
        out.append(pg.execute_simple("SELECT 7")[0][0])
        return out

    assert _on_loop(work)[0] == [1, 2, 3, 7]


@pytest.fixture
def every_read_yields(monkeypatch: pytest.MonkeyPatch) -> None:
    """Slices of no time: each buffer read and `cooperate` call gives the loop a turn, so
    the count of turns tells whether the slicing happens (what a slice lasts is the bench's)."""
    monkeypatch.setattr(greenio, "SLICE_SECONDS", 0.0)


def test_a_large_result_is_read_and_encoded_in_slices(
    pg: PgConnection, every_read_yields: None
) -> None:
    sql = "SELECT repeat('x', 1000) FROM generate_series(1, 2000)"  # about 2 MB
    result, turns = _on_loop(pg.run, sql)
    assert len(result.rows) == 2000
    # A turn per buffer read and per COOPERATE_ROWS rows encoded (every wait is one too).
    assert turns >= 2_000_000 // greenio.BUFFER_SIZE + 2000 // COOPERATE_ROWS - 2


def test_buffered_input_still_gives_the_loop_a_turn_every_slice(every_read_yields: None) -> None:
    """Data already in the socket never makes the read wait: only the slicing lets the loop
    in."""
    reader, writer = socket.socketpair()
    with reader, writer:
        writer.setblocking(False)
        sent = 0
        chunk = b"y" * 4096
        try:
            while sent < 16 * greenio.BUFFER_SIZE:
                sent += writer.send(chunk)
        except BlockingIOError:
            pass
        if sent < 4 * greenio.BUFFER_SIZE:
            pytest.skip(f"the socket pair buffers only {sent} bytes")
        file = greenio.install(reader, None)

        def read_all() -> int:
            return sum(len(file.read(100)) for _ in range(sent // 100))

        got, turns = _on_loop(read_all)
        assert got == sent // 100 * 100
        assert turns >= sent // greenio.BUFFER_SIZE - 1


def test_a_silent_peer_times_out_like_a_blocking_socket() -> None:
    """With a socket timeout, a read that waits longer fails with TimeoutError, on the loop
    and on a thread alike (pg8000 reports it as a network error: ConnectionLost)."""
    reader, writer = socket.socketpair()
    with reader, writer:
        reader.settimeout(0.2)
        file = greenio.install(reader, reader.gettimeout())
        with pytest.raises(TimeoutError):
            _on_loop(file.read, 1)
        with pytest.raises(TimeoutError):
            file.read(1)


def test_a_dead_peer_mid_read_raises_connection_lost(postgres: Any) -> None:
    with TcpProxy((postgres.host, postgres.port)) as proxy:
        pg = _connect(f"postgresql://{postgres.user}@{proxy.host}:{proxy.port}/postgres")

        async def main() -> None:
            work = run_on_loop(asyncio.get_running_loop(), pg.execute_simple, "SELECT pg_sleep(5)")
            await asyncio.sleep(0.3)
            assert not work.done()
            await asyncio.get_running_loop().run_in_executor(None, proxy.cut)
            with pytest.raises(ConnectionLost):
                await asyncio.wait_for(work, 5)

        asyncio.run(main())
        assert pg.closed


def test_a_cancelled_caller_leaves_the_greenlet_to_finish_the_protocol(pg: PgConnection) -> None:
    """As with a worker thread, the waiting task's cancellation does not stop the greenlet:
    it reads the whole reply, and the connection is idle and usable afterwards."""

    async def main() -> Any:
        work = run_on_loop(asyncio.get_running_loop(), _runner_of, pg, "SELECT pg_sleep(0.3), 5")
        caller = asyncio.ensure_future(asyncio.shield(work))
        await asyncio.sleep(0.1)
        caller.cancel()
        with pytest.raises(asyncio.CancelledError):
            await caller
        assert not work.done()
        return await work

    runner, rows = asyncio.run(main())
    assert rows == [["", 5]]
    assert pg.transaction_status is TransactionStatus.IDLE
    # The runner finished the job and takes the next one.
    assert _on_loop(_runner_of, pg, "SELECT 6")[0] == (runner, [[6]])


def test_a_backend_cancel_stops_a_query_running_in_a_greenlet(pg: PgConnection) -> None:
    from broker.postgres.pg import PgError

    async def main() -> None:
        loop = asyncio.get_running_loop()
        work = run_on_loop(loop, pg.execute_simple, "SELECT pg_sleep(10)")
        await asyncio.sleep(0.2)
        assert await loop.run_in_executor(None, pg.cancel)
        with pytest.raises(PgError) as caught:
            await asyncio.wait_for(work, 5)
        assert caught.value.sqlstate == "57014"

    asyncio.run(main())
    assert _on_loop(pg.execute_simple, "SELECT 1")[0] == [[1]]


# -- runner greenlets, reused job after job ------------------------------------------------------


def _runner_of(pg: PgConnection, sql: str) -> tuple[greenlet, Any]:
    """The greenlet the job ran in, and *sql*'s rows."""
    return getcurrent(), pg.execute_simple(sql)


def _jobs_in_turn(*jobs: tuple[Any, ...]) -> list[Any]:
    """Each job ``(fn, *args)`` run after the one before on one loop: its result, or the
    exception it raised."""

    async def main() -> list[Any]:
        loop = asyncio.get_running_loop()
        out = []
        for fn, *args in jobs:
            try:
                out.append(await run_on_loop(loop, fn, *args))
            except Exception as exc:
                out.append(exc)
        return out

    return asyncio.run(main())


def test_one_runner_greenlet_takes_job_after_job(pg: PgConnection) -> None:
    """No new greenlet per request (each would map and unmap a fresh frame stack): the
    runner goes back to this thread's idle list between jobs."""
    results = _jobs_in_turn(*[(_runner_of, pg, f"SELECT {n}") for n in range(4)])
    runners = {id(runner) for runner, _ in results}
    assert [rows for _, rows in results] == [[[0]], [[1]], [[2]], [[3]]]
    assert len(runners) == 1
    runner = results[0][0]
    assert type(runner) is greenio.IoGreenlet and not runner.dead
    assert runner.parent is getcurrent()
    assert idle_runners() >= 1


def test_a_failing_job_leaves_its_runner_clean_for_the_next(pg: PgConnection) -> None:
    from broker.postgres.pg import PgError

    failed_in: list[greenlet] = []

    def fail_after_a_wait() -> None:
        failed_in.append(getcurrent())
        pg.execute_simple("SELECT 1/0")

    def slice_started(sql: str) -> tuple[greenlet, float, Any]:
        return getcurrent(), getcurrent().resumed_at, pg.execute_simple(sql)

    async def main() -> tuple[BaseException, tuple[greenlet, float, Any], float]:
        loop = asyncio.get_running_loop()
        with pytest.raises(PgError) as failed:
            await run_on_loop(loop, fail_after_a_wait)
        before = time.perf_counter()
        return failed.value, await run_on_loop(loop, slice_started, "SELECT 8"), before

    error, (runner, resumed_at, rows), before = asyncio.run(main())
    assert isinstance(error, PgError) and error.sqlstate == "22012"
    assert runner is failed_in[0] and not runner.dead
    assert rows == [[8]]
    assert resumed_at >= before  # the next job's slice starts afresh
    assert pg.transaction_status is TransactionStatus.IDLE


class _Stop(BaseException):
    """Not an `Exception`: it ends the runner greenlet it is raised in."""


def test_a_job_that_raises_a_base_exception_ends_its_runner(pg: PgConnection) -> None:
    def stop_after_a_wait() -> None:
        pg.execute_simple("SELECT pg_sleep(0.05)")  # surely waits: _Stop leaves a callback
        raise _Stop

    async def main() -> tuple[list[greenlet], Any, list[dict[str, Any]]]:
        loop = asyncio.get_running_loop()
        reported: list[dict[str, Any]] = []
        loop.set_exception_handler(lambda _, context: reported.append(context))
        first, _ = await run_on_loop(loop, _runner_of, pg, "SELECT 1")
        with pytest.raises(_Stop):  # raised in a loop callback (after the wait) and set
            await run_on_loop(loop, stop_after_a_wait)
        after, rows = await run_on_loop(loop, _runner_of, pg, "SELECT 2")
        return [first, after], rows, reported

    idle_before = idle_runners()
    (first, after), rows, reported = asyncio.run(main())
    assert first.dead and first is not after and not after.dead
    assert rows == [[2]]
    assert [type(context.get("exception")) for context in reported] == [_Stop]
    assert idle_runners() == idle_before  # the dead runner was replaced, not kept


def test_a_runner_holds_nothing_of_its_last_job(pg: PgConnection) -> None:
    class Result:
        pass

    def make() -> Result:
        pg.execute_simple("SELECT 1")
        return Result()

    class Failure(Exception):
        pass

    def fail() -> None:
        pg.execute_simple("SELECT 1")
        raise Failure

    result, failure = _jobs_in_turn((make,), (fail,))
    assert isinstance(result, Result) and isinstance(failure, Failure)
    refs: list[weakref.ref[Any]] = [weakref.ref(result), weakref.ref(failure)]
    del result, failure
    gc.collect()  # the failure's traceback and the test's frames form cycles
    assert [ref() for ref in refs] == [None, None]


def test_runners_beyond_the_idle_limit_are_let_go(
    pg: PgConnection, postgres: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(loopio, "IDLE_RUNNERS", idle_runners() + 2)
    others = [_connect(postgres.dsn + "?sslmode=disable") for _ in range(3)]

    async def main() -> list[Any]:
        loop = asyncio.get_running_loop()
        jobs = [
            run_on_loop(loop, _runner_of, conn, "SELECT pg_sleep(0.1), 1") for conn in [pg, *others]
        ]
        return await asyncio.gather(*jobs)

    try:
        results = asyncio.run(main())
    finally:
        for conn in others:
            conn.close_quietly()
    assert len({id(runner) for runner, _ in results}) == 4  # one at a time each
    assert idle_runners() == loopio.IDLE_RUNNERS


def test_a_timed_out_read_leaves_the_runner_reusable() -> None:
    """The TimeoutError thrown in mid-read ends the job, not the runner."""
    reader, writer = socket.socketpair()
    with reader, writer:
        reader.settimeout(0.2)
        file = greenio.install(reader, reader.gettimeout())

        def read_one() -> tuple[greenlet, bytes]:
            return getcurrent(), file.read(1)

        def timed_out_read() -> None:
            runners.append(getcurrent())
            file.read(1)

        runners: list[greenlet] = []
        failed, (runner, data) = _jobs_in_turn(
            (timed_out_read,), (lambda: writer.send(b"x"),), (read_one,)
        )[0::2]
    assert isinstance(failed, TimeoutError)
    assert data == b"x" and runner is runners[0] and not runner.dead


def _request_with_cleanup(pg: PgConnection, n: int) -> tuple[int, Any]:
    from broker.postgres.audit import CLEANUP
    from lambda_client._proto.pgbroker.v1 import broker_pb2 as pb

    result = pg.run(
        "SELECT $1::int + 1",
        [pb.Value(int64=n)],
        before="SET application_name = 'x'",
        cleanup=CLEANUP,
    )
    return result.rows[0].values[0].int64, pg.cleanup_rows


@pytest.fixture(scope="module")
def tls_postgres(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalPostgres]:
    ca = TestCA(tmp_path_factory.mktemp("pki"))
    issued = ca.issue("postgres", ["localhost"])
    with LocalPostgres(max_connections=20, ssl=(issued.cert_file, issued.key_file)) as server:
        yield server


def test_tls_reads_across_many_records_and_slices(
    tls_postgres: LocalPostgres, every_read_yields: None
) -> None:
    pg = _connect(
        f"postgresql://{tls_postgres.user}@127.0.0.1:{tls_postgres.port}/"
        f"{tls_postgres.database}?sslmode=require"
    )
    try:
        assert isinstance(pg.socket, __import__("ssl").SSLSocket)
        sql = "SELECT repeat('z', 1000) FROM generate_series(1, 3000)"
        (rows, _, in_greenlet), turns = _on_loop(_where_it_ran, pg, sql)
        assert len(rows) == 3000 and in_greenlet
        assert turns >= 3_000_000 // greenio.BUFFER_SIZE - 1
        (rows, _, _), turns = _on_loop(_where_it_ran, pg, "SELECT pg_sleep(0.2), 1")
        assert rows == [["", 1]] and turns > 50
        # Job after job on one runner greenlet, over the same TLS stream.
        results = _jobs_in_turn(*[(_runner_of, pg, f"SELECT {n}") for n in range(3)])
        assert [rows for _, rows in results] == [[[0]], [[1]], [[2]]]
        assert len({id(runner) for runner, _ in results}) == 1
        # A request as the broker sends it (SET, Bind…Sync, the cleanup group), over TLS:
        # the unnamed statement, then prepared, then reused.
        results = _jobs_in_turn(*[(_request_with_cleanup, pg, n) for n in range(3)])
        assert results == [(n + 1, [[""]]) for n in range(3)]
        assert pg.execute_simple("SELECT 2") == [[2]]  # and on a thread
    finally:
        pg.close_quietly()


def _worker_threads(broker: Any) -> int:
    """Threads the broker's pool has started for requests (the executor starts them on
    demand)."""
    return len(broker.server.pool._workers._threads)


@pytest.mark.parametrize(("pg_io", "workers_used"), [("loop", 0), ("threads", 1)])
def test_pg_io_chooses_where_small_requests_run(
    start_inproc_broker: Any, pg_io: str, workers_used: int
) -> None:
    """A small request starts no worker thread with loop (the default); with threads it runs
    on one. A heavy one (an array value) runs on a worker thread either way."""
    from tests.support import request, rows

    broker = start_inproc_broker(pg_io=pg_io)
    assert rows(broker.execute(request(("SELECT $1::int", [5]))).results[0]) == [(5,)]
    assert _worker_threads(broker) == workers_used
    heavy = request(("SELECT cardinality($1::int[])", [list(range(1000))]))
    assert rows(broker.execute(heavy).results[0]) == [(1000,)]
    assert _worker_threads(broker) >= 1


def test_a_broker_serves_request_after_request_on_the_same_runner_greenlets(
    start_inproc_broker: Any,
) -> None:
    """End to end: small requests make no greenlet each (each would map and unmap a frame
    stack); the runners on the broker's loop thread are the same before and after."""
    from tests.support import request, rows

    broker = start_inproc_broker(pg_io="loop")

    def runners() -> set[int]:
        return {
            id(obj)
            for obj in gc.get_objects()
            if type(obj) is greenio.IoGreenlet and not obj.dead and obj.job is None
        }

    assert rows(broker.execute(request(("SELECT 1", []))).results[0]) == [(1,)]
    before = runners()
    kept = [obj for obj in gc.get_objects() if id(obj) in before]  # ids stay theirs
    for n in range(20):
        assert rows(broker.execute(request(("SELECT $1::int", [n]))).results[0]) == [(n,)]
    assert before and runners() == before
    del kept
