"""Interactive transactions (`BrokerClient.begin`) against a real broker process and Postgres:
read-decide-write under contention, rollback, savepoints, the aborted state, the bounds, a
client killed mid-transaction, and serialization retries."""

from __future__ import annotations

import asyncio
import gc
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pg8000.native
import pytest

from devtools.brokerproc import BrokerProcess
from devtools.lambda_context import FakeLambdaContext
from lambda_client import (
    BrokerClient,
    DataError,
    DeadlineExceeded,
    DeadlockDetected,
    InvalidRequest,
    Overloaded,
    transaction,
)
from lambda_client._proto.pgbroker.v1 import broker_pb2 as pb
from lambda_client.aio import AsyncBrokerClient
from lambda_client.errors import InFailedSqlTransaction
from lambda_client.transaction import AsyncTransaction, Transaction
from tests.support import temp_table, wait_until

ROOT = Path(__file__).resolve().parents[2]
IDLE_TIMEOUT = 2.0


@pytest.fixture(scope="module")
def broker(postgres: Any) -> Iterator[BrokerProcess]:
    """A broker with a pool of 5 and a short idle transaction timeout."""
    env = {"PGBROKER_IDLE_TRANSACTION_TIMEOUT": str(IDLE_TIMEOUT)}
    with BrokerProcess(
        postgres.dsn + "?sslmode=disable",
        pool_size=5,
        auth="none",
        shutdown_grace=2,
        log_level="INFO",
        env=env,
    ) as process:
        yield process


@pytest.fixture
def db(broker: BrokerProcess) -> Iterator[BrokerClient]:
    with BrokerClient(broker.target) as client:
        yield client


@pytest.fixture
def counter(postgres: Any) -> Iterator[str]:
    with temp_table(postgres, "counter", "id int PRIMARY KEY, n int NOT NULL") as name:
        admin = pg8000.native.Connection(
            postgres.user, host=postgres.host, port=postgres.port, database=postgres.database
        )
        admin.run(f"INSERT INTO {name} VALUES (1, 0)")
        admin.close()
        yield name


def value(admin: pg8000.native.Connection, table: str) -> int:
    return int(admin.run(f"SELECT n FROM {table} WHERE id = 1")[0][0])


def test_read_decide_write_under_contention_loses_no_update(
    db: BrokerClient, counter: str, admin: pg8000.native.Connection
) -> None:
    callers, rounds = 50, 4
    failures: list[BaseException] = []

    def increment() -> None:
        try:
            for _ in range(rounds):
                with db.begin(timeout=60) as tx:
                    (n,) = tx.query(f"SELECT n FROM {counter} WHERE id = $1 FOR UPDATE", [1]).one()
                    tx.execute(f"UPDATE {counter} SET n = $1 WHERE id = 1", [n + 1])
        except BaseException as exc:  # reported below
            failures.append(exc)

    threads = [threading.Thread(target=increment) for _ in range(callers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not failures, failures[:3]
    assert value(admin, counter) == callers * rounds
    wait_until(lambda: db.stats()["leases_active"] == 0, what="the last lease to end")
    stats = db.stats()
    assert stats["pool_available"] == 5
    assert stats["leases_ended_commit"] >= callers * rounds


def test_an_exception_in_the_block_rolls_back(
    db: BrokerClient, counter: str, admin: pg8000.native.Connection
) -> None:
    with pytest.raises(KeyError), db.begin() as tx:
        tx.execute(f"UPDATE {counter} SET n = 100")
        raise KeyError("decided against it")
    assert tx.closed and not tx.committed
    assert value(admin, counter) == 0


def test_savepoint_rollback_keeps_the_outer_work(
    db: BrokerClient, counter: str, admin: pg8000.native.Connection
) -> None:
    with db.begin() as tx:
        tx.execute(f"UPDATE {counter} SET n = 1")
        with pytest.raises(DataError), tx.savepoint():
            tx.execute(f"UPDATE {counter} SET n = 2")
            tx.query("SELECT 1 / 0")
        with tx.savepoint("inner"):
            tx.execute(f"UPDATE {counter} SET n = n + 10")
        assert tx.query(f"SELECT n FROM {counter}").scalar() == 11
    assert tx.committed
    assert value(admin, counter) == 11


def test_after_an_error_statements_fail_with_25P02_until_rollback(
    db: BrokerClient, counter: str, admin: pg8000.native.Connection
) -> None:
    tx = db.begin()
    tx.execute(f"UPDATE {counter} SET n = 5")
    with pytest.raises(DataError) as first:
        tx.pipeline(["SELECT 1", "SELECT 1 / 0"])
    assert (first.value.sqlstate, first.value.statement_index) == ("22012", 1)
    with pytest.raises(InFailedSqlTransaction) as aborted:
        tx.query("SELECT 1")
    assert aborted.value.sqlstate == "25P02"
    with pytest.raises(InFailedSqlTransaction) as commit:
        tx.commit()
    assert commit.value.sqlstate == "25P02"
    assert tx.closed and not tx.committed
    assert value(admin, counter) == 0
    with pytest.raises(RuntimeError, match="has ended"):
        tx.query("SELECT 1")


def test_session_state_guard_inside_a_transaction(db: BrokerClient) -> None:
    with db.begin() as tx:
        assert tx.query("SET LOCAL search_path TO pg_catalog").command_tag == "SET"
        assert tx.query("SHOW search_path").scalar() == "pg_catalog"
    with pytest.raises(InvalidRequest) as refused, db.begin() as tx:
        tx.execute("SET search_path TO pg_catalog")
    assert refused.value.reason == "SESSION_STATE"


def test_application_name_names_the_invocation(db: BrokerClient) -> None:
    context = FakeLambdaContext(remaining=10)
    with db.begin(context=context, read_only=True) as tx:
        name = tx.query("SELECT current_setting('application_name')").scalar()
        assert tx.query("SHOW transaction_read_only").scalar() == "on"
    assert name == f"pgbroker:{context.function_name}:{context.aws_request_id}"


def test_idle_timeout_names_the_bound_and_releases_the_lock(
    db: BrokerClient, counter: str, admin: pg8000.native.Connection
) -> None:
    tx = db.begin()
    tx.query(f"SELECT n FROM {counter} WHERE id = 1 FOR UPDATE")
    started = time.monotonic()
    locked = f"SELECT n FROM {counter} WHERE id = 1 FOR UPDATE SKIP LOCKED"
    wait_until(lambda: admin.run(locked), timeout=IDLE_TIMEOUT + 5, what="the lock to go")
    assert time.monotonic() - started >= IDLE_TIMEOUT - 0.2
    with pytest.raises(DeadlineExceeded) as bound:
        tx.execute(f"UPDATE {counter} SET n = 1")
    assert bound.value.reason == "IDLE_TRANSACTION_TIMEOUT"
    assert "PGBROKER_IDLE_TRANSACTION_TIMEOUT" in str(bound.value)
    assert value(admin, counter) == 0


def test_an_abandoned_transaction_is_rolled_back_at_once(
    db: BrokerClient, counter: str, admin: pg8000.native.Connection
) -> None:
    tx = db.begin()
    tx.query(f"SELECT n FROM {counter} WHERE id = 1 FOR UPDATE")
    del tx  # neither committed nor rolled back: the stream is cancelled
    started = time.monotonic()
    locked = f"SELECT n FROM {counter} WHERE id = 1 FOR UPDATE SKIP LOCKED"
    wait_until(lambda: admin.run(locked), timeout=IDLE_TIMEOUT + 5, what="the lock to go")
    assert time.monotonic() - started < IDLE_TIMEOUT / 2


def test_a_begin_past_max_open_transactions_waits_for_a_slot_then_fails_clearly(
    broker: BrokerProcess,
) -> None:
    """A blocking client keeps at most max_open_transactions Transact streams open (gRPC's
    blocking API stalls them all past about a thousand on one channel: TransactionSlots); a
    begin past it sends nothing, waits within its deadline, and gets the slot of any
    transaction that ends, however it ends."""
    with BrokerClient(broker.target, max_open_transactions=2) as db:
        wait_until(lambda: db.stats()["leases_active"] == 0, what="earlier tests' leases to end")
        first, second = db.begin(), db.begin()
        second_began = started = time.monotonic()
        with pytest.raises(Overloaded) as refused:
            db.begin(timeout=0.5)
        assert 0.4 < time.monotonic() - started < 3
        assert refused.value.reason == "QUEUE_TIMEOUT"
        assert "max_open_transactions" in str(refused.value)
        assert "nothing was sent" in str(refused.value)
        assert db.stats()["leases_active"] == 2  # the third never reached the broker

        first.commit()
        third = db.begin(timeout=2)
        third.rollback()
        fourth = db.begin(timeout=2)
        del fourth  # abandoned: its stream is cancelled, its slot freed
        gc.collect()
        fifth = db.begin(timeout=2)
        # Left idle: the broker ends the second, and its slot frees with no call on it.
        sixth = db.begin(timeout=IDLE_TIMEOUT + 5)
        assert time.monotonic() - second_began >= IDLE_TIMEOUT - 0.2
        with pytest.raises(DeadlineExceeded):
            second.query("SELECT 1")
        fifth.rollback()
        sixth.commit()


def test_threads_past_max_open_transactions_queue_in_the_client_and_all_commit(
    broker: BrokerProcess, counter: str, admin: pg8000.native.Connection
) -> None:
    callers, limit = 40, 3
    failures: list[BaseException] = []
    peak = 0
    done = threading.Event()

    def watch(stats: BrokerClient) -> None:
        nonlocal peak
        while not done.is_set():
            figures = stats.stats()
            peak = max(peak, figures["leases_active"] + figures["requests_waiting"])
            time.sleep(0.005)

    def caller(db: BrokerClient) -> None:
        try:
            with db.begin(timeout=30) as tx:
                (n,) = tx.query(f"SELECT n FROM {counter} WHERE id = 1 FOR UPDATE").one()
                time.sleep(0.01)
                tx.execute(f"UPDATE {counter} SET n = $1 WHERE id = 1", [n + 1])
        except BaseException as exc:
            failures.append(exc)

    with (
        BrokerClient(broker.target, max_open_transactions=limit) as db,
        BrokerClient(broker.target) as stats,
    ):
        watcher = threading.Thread(target=watch, args=(stats,))
        watcher.start()
        threads = [threading.Thread(target=caller, args=(db,)) for _ in range(callers)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        done.set()
        watcher.join(10)
    assert not failures
    assert value(admin, counter) == callers
    assert 1 <= peak <= limit


def test_max_open_transactions_must_be_a_positive_integer() -> None:
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="max_open_transactions"):
            BrokerClient("127.0.0.1:1", max_open_transactions=bad)


def test_the_lambda_deadline_bounds_the_whole_transaction(db: BrokerClient) -> None:
    context = FakeLambdaContext(remaining=1.5)  # 1 s after the client's 0.5 s margin
    started = time.monotonic()
    with pytest.raises(DeadlineExceeded), db.begin(context=context) as tx:
        tx.query("SELECT 1")
        tx.query("SELECT pg_sleep(10)")
    assert time.monotonic() - started < 3
    wait_until(lambda: db.stats()["leases_active"] == 0, what="the lease to end")


def test_run_transaction_reruns_the_function_on_a_serialization_failure(
    db: BrokerClient, counter: str, admin: pg8000.native.Connection
) -> None:
    calls: list[Transaction] = []

    def work(tx: Transaction) -> int:
        calls.append(tx)
        n = tx.query(f"UPDATE {counter} SET n = n + 1 RETURNING n").scalar()
        if len(calls) == 1:
            tx.query("DO $$ BEGIN RAISE EXCEPTION 'conflict' USING ERRCODE = '40001'; END $$")
        return int(n)

    assert db.run_transaction(work, isolation="serializable") == 1
    assert len(calls) == 2 and value(admin, counter) == 1


def test_run_transaction_gives_up_after_max_attempts(broker: BrokerProcess) -> None:
    attempts: list[int] = []

    def always_conflicts(tx: Transaction) -> None:
        attempts.append(1)
        tx.query("DO $$ BEGIN RAISE EXCEPTION 'conflict' USING ERRCODE = '40P01'; END $$")

    db = BrokerClient(broker.target, max_attempts=3, initial_backoff=0.01)
    with db, pytest.raises(DeadlockDetected):
        db.run_transaction(always_conflicts)
    assert len(attempts) == 3


# A client process that leases a connection, locks the row and waits to be killed.
HOLDER = """
import sys, time
from lambda_client import BrokerClient
tx = BrokerClient(sys.argv[1]).begin(timeout=120)
tx.query(f"SELECT n FROM {sys.argv[2]} WHERE id = 1 FOR UPDATE")
print("locked", flush=True)
time.sleep(300)
"""


def test_a_killed_client_frees_its_lease_and_locks(
    broker: BrokerProcess, db: BrokerClient, counter: str, admin: pg8000.native.Connection
) -> None:
    before = db.stats()["leases_ended_client_gone"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "client"), str(ROOT)])}
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, broker.target, counter],
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env=env,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        assert db.stats()["leases_active"] == 1
        os.kill(holder.pid, signal.SIGKILL)
        killed_at = time.monotonic()
        locked = f"SELECT n FROM {counter} WHERE id = 1 FOR UPDATE SKIP LOCKED"
        wait_until(lambda: admin.run(locked), timeout=IDLE_TIMEOUT + 5, what="the lock to go")
        assert time.monotonic() - killed_at < IDLE_TIMEOUT + 1
    finally:
        holder.kill()
        holder.wait(10)
    wait_until(lambda: db.stats()["leases_active"] == 0, what="the lease to end")
    stats = db.stats()
    assert stats["leases_ended_client_gone"] == before + 1 and stats["pool_available"] == 5


def test_async_transactions_read_decide_write_and_roll_back(
    broker: BrokerProcess, counter: str, admin: pg8000.native.Connection
) -> None:
    db = AsyncBrokerClient(broker.target)

    async def increment() -> None:
        async with await db.begin(timeout=60) as tx:
            (n,) = (await tx.query(f"SELECT n FROM {counter} WHERE id = 1 FOR UPDATE")).one()
            await tx.execute(f"UPDATE {counter} SET n = $1 WHERE id = 1", [n + 1])

    async def undone() -> AsyncTransaction:
        async with await db.begin() as tx:
            await tx.execute(f"UPDATE {counter} SET n = -1")
            async with tx.savepoint():
                await tx.execute(f"UPDATE {counter} SET n = -2")
            with pytest.raises(DataError):
                async with tx.savepoint():
                    await tx.query("SELECT 1 / 0")
            assert (await tx.query(f"SELECT n FROM {counter}")).scalar() == -2
            raise KeyError("decided against it")

    async def run() -> None:
        await asyncio.gather(*(increment() for _ in range(20)))
        with pytest.raises(KeyError):
            await undone()
        await db.close()

    asyncio.run(run())
    assert value(admin, counter) == 20


def test_the_client_reads_ended_from_the_trailer_or_from_an_older_brokers_message(
    db: BrokerClient, broker: BrokerProcess, counter: str, admin: pg8000.native.Connection
) -> None:
    # The client asks for `ended` in the trailer; a broker that predates
    # `ended_in_trailer` ignores it and answers with a message, as it answers a request
    # without the field (sent here through the same read path).
    older = pb.TransactRequest(commit=pb.TransactRequest.Commit())
    with db.begin() as tx:
        tx.execute(f"UPDATE {counter} SET n = 1")
        assert transaction._commit_request(None).commit.ended_in_trailer
        tx.commit()
    assert tx.committed and not tx.replayed and value(admin, counter) == 1
    with db.begin() as tx:
        tx.execute(f"UPDATE {counter} SET n = 2")
        assert tx._end(older).ended.committed
    with db.begin() as tx:
        tx.execute(f"UPDATE {counter} SET n = 3")
        tx.rollback()
    assert value(admin, counter) == 2

    async def run() -> None:
        adb = AsyncBrokerClient(broker.target)
        async with await adb.begin() as atx:
            await atx.execute(f"UPDATE {counter} SET n = 4")
        assert atx.committed
        async with await adb.begin() as atx:
            await atx.execute(f"UPDATE {counter} SET n = 5")
            assert (await atx._end(older)).ended.committed
        async with await adb.begin() as atx:
            await atx.execute(f"UPDATE {counter} SET n = 6")
            await atx.rollback()
        await adb.close()

    asyncio.run(run())
    assert value(admin, counter) == 5


def test_async_errors_abort_and_bounds_name_themselves(
    broker: BrokerProcess, counter: str, admin: pg8000.native.Connection
) -> None:
    db = AsyncBrokerClient(broker.target)

    async def run() -> None:
        tx = await db.begin()
        with pytest.raises(DataError):
            await tx.query("SELECT 1 / 0")
        with pytest.raises(InFailedSqlTransaction) as aborted:
            await tx.query("SELECT 1")
        assert aborted.value.sqlstate == "25P02"
        await tx.rollback()
        assert tx.closed and not tx.committed
        idle = await db.begin()
        await asyncio.sleep(IDLE_TIMEOUT + 0.5)
        with pytest.raises(DeadlineExceeded) as bound:
            await idle.query("SELECT 1")
        assert bound.value.reason == "IDLE_TRANSACTION_TIMEOUT"
        calls: list[int] = []

        async def work(tx: AsyncTransaction) -> int:
            calls.append(1)
            n = (await tx.query(f"UPDATE {counter} SET n = n + 1 RETURNING n")).scalar()
            if len(calls) == 1:
                await tx.query(
                    "DO $$ BEGIN RAISE EXCEPTION 'conflict' USING ERRCODE = '40001'; END $$"
                )
            return int(n)

        assert await db.run_transaction(work) == 1
        assert len(calls) == 2
        await db.close()

    asyncio.run(run())
    assert value(admin, counter) == 1
