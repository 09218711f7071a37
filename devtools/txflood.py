"""Measure interactive transactions (``Transact`` leases) from many threads of one process.

    .venv/bin/python -m devtools.txflood [--threads 100,300,1000] [--mode shared,per-thread,async]
        [--pool 20] [--cpu-ms 0] [--max-open N] [--poll SECONDS] [--target HOST:PORT]

Starts a local Postgres and a real broker (its own process, pool of *pool*) unless *target* is
given. For each thread count and mode, that many workers start at once, each doing
``begin()`` → 3 statements → ``commit()`` within 30 s (with *cpu-ms* of Python work before
each step, as an ORM would do): ``shared`` threads use one `BrokerClient` (one channel, as the
Django backend does), ``channels=K`` K clients round-robin, ``per-thread`` one client each,
``async`` tasks one `AsyncBrokerClient`. *max-open* is the clients' ``max_open_transactions``
(a huge value: no bound); *poll* replaces gRPC's 0.1 s wait-polling period
(``grpc._common.MAXIMUM_WAIT_TIMEOUT``, an experiment only). Prints per run: wall time,
transactions committed, failures by error reason (and one message each), and the gaps the
client saw between two steps of one lease (the broker ends a lease idle for
``PGBROKER_IDLE_TRANSACTION_TIMEOUT``). docs/client.md, "Threads", has its figures.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import threading
import time
from typing import Any

from devtools.brokerproc import BrokerProcess
from devtools.localpg import LocalPostgres
from lambda_client import BrokerClient, errors
from lambda_client.aio import AsyncBrokerClient
from lambda_client.transaction import DEFAULT_MAX_OPEN_TRANSACTIONS

TIMEOUT = 30.0  # bounds each transaction (begin to commit)
STATEMENTS = ("SELECT 1", "SELECT now()", "SELECT count(*) FROM pg_class")


class Outcome:
    """What the workers of one run saw (thread-safe)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.committed = 0
        self.failures: collections.Counter[str] = collections.Counter()
        self.max_gap = 0.0
        self.gaps: list[float] = []
        self.examples: dict[str, str] = {}

    def done(self, gaps: list[float]) -> None:
        with self.lock:
            self.committed += 1
            self.gaps.extend(gaps)
            self.max_gap = max(self.max_gap, *gaps)

    def failed(self, exc: BaseException) -> None:
        reason = getattr(exc, "reason", None) or type(exc).__name__
        with self.lock:
            self.failures[str(reason)] += 1
            self.examples.setdefault(str(reason), str(exc)[:300])


def _burn(ms: float) -> None:
    """Python work holding the GIL, as an ORM building a query and reading its rows does."""
    end = time.perf_counter() + ms / 1000
    while time.perf_counter() < end:
        pass


def _work(client: BrokerClient, cpu_ms: float, outcome: Outcome) -> None:
    try:
        with client.begin(timeout=TIMEOUT) as tx:
            last, gaps = time.monotonic(), []
            for sql in STATEMENTS:
                _burn(cpu_ms)
                tx.query(sql)
                now = time.monotonic()
                gaps.append(now - last)
                last = now
            _burn(cpu_ms)
            tx.commit()
            gaps.append(time.monotonic() - last)
        outcome.done(gaps)
    except errors.Error as exc:
        outcome.failed(exc)


async def _work_async(client: AsyncBrokerClient, cpu_ms: float, outcome: Outcome) -> None:
    try:
        async with await client.begin(timeout=TIMEOUT) as tx:
            last, gaps = time.monotonic(), []
            for sql in STATEMENTS:
                _burn(cpu_ms)
                await tx.query(sql)
                now = time.monotonic()
                gaps.append(now - last)
                last = now
            _burn(cpu_ms)
            await tx.commit()
            gaps.append(time.monotonic() - last)
        outcome.done(gaps)
    except errors.Error as exc:
        outcome.failed(exc)


def run_threads(target: str, threads: int, mode: str, cpu_ms: float, max_open: int) -> Outcome:
    outcome = Outcome()
    if mode == "per-thread":
        channels = threads
    elif mode.startswith("channels="):
        channels = int(mode.split("=")[1])
    else:
        channels = 1
    pool = [BrokerClient(target, max_open_transactions=max_open) for _ in range(channels)]
    clients = [pool[i % channels] for i in range(threads)]
    for client in {id(c): c for c in clients}.values():
        client.query("SELECT 1")  # connected before the release
    start = threading.Barrier(threads)

    def worker(client: BrokerClient) -> None:
        start.wait()
        _work(client, cpu_ms, outcome)

    workers = [threading.Thread(target=worker, args=(c,), daemon=True) for c in clients]
    for thread in workers:
        thread.start()
    for thread in workers:
        thread.join(TIMEOUT + 60)
    for client in {id(c): c for c in clients}.values():
        client.close()
    return outcome


def run_async(target: str, tasks: int, cpu_ms: float) -> Outcome:
    outcome = Outcome()

    async def main() -> None:
        client = AsyncBrokerClient(target)
        await client.query("SELECT 1")
        await asyncio.gather(*(_work_async(client, cpu_ms, outcome) for _ in range(tasks)))
        await client.close()

    asyncio.run(main())
    return outcome


def report(threads: int, mode: str, elapsed: float, outcome: Outcome) -> dict[str, Any]:
    gaps = sorted(outcome.gaps) or [0.0]
    return {
        "threads": threads,
        "mode": mode,
        "seconds": round(elapsed, 1),
        "committed": outcome.committed,
        "failures": dict(outcome.failures),
        "examples": outcome.examples,
        "gap_p50_ms": round(gaps[len(gaps) // 2] * 1000),
        "gap_p99_ms": round(gaps[int(len(gaps) * 0.99)] * 1000),
        "gap_max_ms": round(outcome.max_gap * 1000),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", default="100,300,1000")
    parser.add_argument("--mode", default="shared,per-thread,async")
    parser.add_argument("--pool", type=int, default=20)
    parser.add_argument("--cpu-ms", type=float, default=0.0)
    parser.add_argument("--target", default=None)
    parser.add_argument("--max-open", type=int, default=DEFAULT_MAX_OPEN_TRANSACTIONS)
    parser.add_argument(
        "--poll", type=float, default=None, help="grpc._common.MAXIMUM_WAIT_TIMEOUT"
    )
    args = parser.parse_args()
    if args.poll is not None:
        import grpc._common

        grpc._common.MAXIMUM_WAIT_TIMEOUT = args.poll
    pg = broker = None
    target = args.target
    try:
        if target is None:
            pg = LocalPostgres().start()
            broker = BrokerProcess(
                pg.dsn + "?sslmode=disable", log_level="INFO", pool_size=args.pool
            )
            broker.start()
            broker.wait_serving()
            target = broker.target
            print(json.dumps({"broker": target, "broker_pid": broker.pid}), flush=True)
        for threads in (int(n) for n in args.threads.split(",")):
            for mode in args.mode.split(","):
                began = time.monotonic()
                if mode == "async":
                    outcome = run_async(target, threads, args.cpu_ms)
                else:
                    outcome = run_threads(target, threads, mode, args.cpu_ms, args.max_open)
                row = report(threads, mode, time.monotonic() - began, outcome)
                print(json.dumps(row), flush=True)
    finally:
        if broker is not None:
            broker.stop()
        if pg is not None:
            pg.stop()


if __name__ == "__main__":
    main()
