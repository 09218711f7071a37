"""The load generator: one fresh process per run, ``python -m bench.load '<json spec>'``.

Each simulated Lambda container is one client with its own connection (direct: a pg8000
connection; PgBouncer: an asyncpg connection with its statement cache off, as transaction
pooling requires; pgbroker: a `lambda_client.BrokerClient` with its own gRPC channel).

Steady runs (W1, W2) connect every client, then run closed loops for *warmup* + *duration*
seconds; only transactions that complete inside the measured window count. Burst runs (W3)
release *clients* invocations at once, each a fresh connection and one W2 transaction, and
time them until all are done.

The process prints JSON lines on stdout: ``{"event": "measure_start"}`` and
``{"event": "measure_end"}`` (so the harness samples the pooler's CPU over the same window)
and finally ``{"event": "result", ...}`` with counts, latency percentiles, errors and this
process's own CPU time.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import resource
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from bench.workloads import W1_LITERAL_SQL, W1_SQL, W2_THINKS, Transfer, random_aid
from devtools.runas import raise_fd_limit

COMPETITORS = ("direct", "asyncpg", "pgbroker")

# Idempotency keys on the pgbroker client's writes (its default); PGBROKER_BENCH_KEYS=0 turns
# them off, to measure what exactly-once costs under load.
_KEYS = os.environ.get("PGBROKER_BENCH_KEYS", "1") != "0"


@dataclass
class Spec:
    """What one load run does; see the module docstring."""

    competitor: str  # direct | asyncpg | pgbroker
    workload: str  # w1 | w2 | w3
    host: str
    port: int
    clients: int
    duration: float = 10.0
    warmup: float = 2.0
    think_ms: float = 1.0
    scale: int = 10
    user: str = "postgres"
    database: str = "postgres"
    timeout: float = 120.0  # a burst gives up after this many seconds
    wait_for_go: bool = False  # burst: print "ready", wait for a line on stdin, then release
    first_index: int = 0  # this process's first invocation (bursts split across processes)
    asyncio: bool = True  # pgbroker: lambda_client.aio on one event loop, else a thread each
    # pgbroker W2 through Transact (db.begin()): statement by statement with the think time
    # between them, as PgBouncer's clients run it, instead of one batch after the think time.
    transact: bool = False
    # pgbroker W1 with the value as a literal in the SQL, as Django sends it (W1_LITERAL_SQL).
    literal: bool = False


@dataclass
class Tally:
    """One client's record: latencies (s) of transactions done in the window, errors."""

    latencies: list[float] = field(default_factory=list)
    done_total: int = 0
    errors: Counter[str] = field(default_factory=Counter)

    def error(self, exc: BaseException) -> None:
        text = " ".join(str(exc).split()) or type(exc).__name__
        cause = exc.__cause__
        debug = getattr(cause, "debug_error_string", None)
        if callable(debug):  # a gRPC error: the transport's own account says who cancelled
            text += f" [{_grpc_detail(str(debug()))}]"
        self.errors[f"{type(exc).__name__}: {text[:240]}"] += 1


def _grpc_detail(debug: str) -> str:
    """The useful part of grpc's debug_error_string (status and description, no time)."""
    try:
        info = json.loads(debug)
    except ValueError:
        return " ".join(debug.split())[:120]
    if isinstance(info, dict):
        parts = [str(info.get(k)) for k in ("grpc_status", "grpc_message", "description")]
        return " ".join(p for p in parts if p and p != "None")[:120]
    return str(info)[:120]


@dataclass
class Window:
    """The measured window, in `time.monotonic()` seconds."""

    start: float
    end: float

    def count(self, finished: float) -> bool:
        return self.start <= finished < self.end


def _emit(event: str, **fields: Any) -> None:
    sys.stdout.write(json.dumps({"event": event, **fields}) + "\n")
    sys.stdout.flush()


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _percentiles(latencies: list[float]) -> dict[str, float | None]:
    if not latencies:
        return {"p50": None, "p95": None, "p99": None, "mean": None}
    ordered = sorted(latencies)

    def pick(q: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000, 3)

    return {
        "p50": pick(0.50),
        "p95": pick(0.95),
        "p99": pick(0.99),
        "mean": round(sum(ordered) / len(ordered) * 1000, 3),
    }


def _merge(tallies: list[Tally]) -> Tally:
    total = Tally()
    for tally in tallies:
        total.latencies += tally.latencies
        total.done_total += tally.done_total
        total.errors.update(tally.errors)
    return total


# -- clients ----------------------------------------------------------------------------------
# A client is an object with connect(), w1(rng), w2(rng), close(); sync or async.


class DirectClient:
    """One pg8000 connection per simulated container, as a Lambda without a pooler."""

    def __init__(self, spec: Spec) -> None:
        self.spec = spec
        self.conn: Any = None

    def connect(self) -> None:
        import pg8000.native

        self.conn = pg8000.native.Connection(
            self.spec.user,
            host=self.spec.host,
            port=self.spec.port,
            database=self.spec.database,
            ssl_context=False,
            timeout=self.spec.timeout,
        )

    def w1(self, rng: random.Random) -> None:
        self.conn.run(
            "SELECT abalance FROM pgbench_accounts WHERE aid = :aid",
            aid=random_aid(rng, self.spec.scale),
        )

    def w2(self, rng: random.Random) -> None:
        t = Transfer.random(rng, self.spec.scale)
        think = self.spec.think_ms / 1000
        self.conn.run("BEGIN")
        try:
            for sql, params in t.statements():
                if think:
                    time.sleep(think)
                self.conn.run(_named(sql), **{f"p{i + 1}": v for i, v in enumerate(params)})
            if think:
                time.sleep(think)
            self.conn.run("COMMIT")
        except Exception:
            with contextlib.suppress(Exception):
                self.conn.run("ROLLBACK")
            raise

    def close(self) -> None:
        if self.conn is not None:
            with contextlib.suppress(Exception):
                self.conn.close()


def _warms_up(spec: Spec) -> bool:
    """Whether a pgbroker client makes a first ``SELECT 1`` when it connects: in steady runs,
    so the window measures warm containers; not in a burst (W3), where a new container's one
    call (its W2 transaction) opens the channel itself, as a Lambda's first query does (there
    is no connect step to time apart, unlike a Postgres connection's startup)."""
    if os.environ.get("BENCH_W3_WARMUP") == "1":  # A/B of the old burst
        return True
    return spec.workload != "w3"


def _named(sql: str) -> str:
    """``$1`` -> ``:p1`` (pg8000.native's parameter style)."""
    for i in range(9, 0, -1):
        sql = sql.replace(f"${i}", f":p{i}")
    return sql


class BrokerLoadClient:
    """One `lambda_client.BrokerClient` (its own channel) per simulated container."""

    def __init__(self, spec: Spec) -> None:
        self.spec = spec
        self.client: Any = None

    def connect(self) -> None:
        from lambda_client import BrokerClient

        self.client = BrokerClient(f"{self.spec.host}:{self.spec.port}", idempotency=_KEYS)
        if _warms_up(self.spec):
            # A channel connects lazily; a first cheap call makes it ready like a warm container.
            self.client.query("SELECT 1", timeout=self.spec.timeout)

    def w1(self, rng: random.Random) -> None:
        aid = random_aid(rng, self.spec.scale)
        if self.spec.literal:
            self.client.query(W1_LITERAL_SQL.format(aid=aid), timeout=self.spec.timeout)
        else:
            self.client.query(W1_SQL, [aid], timeout=self.spec.timeout)

    def w2(self, rng: random.Random) -> None:
        t = Transfer.random(rng, self.spec.scale)
        think = self.spec.think_ms / 1000 * W2_THINKS
        if think:
            time.sleep(think)
        self.client.transaction(t.statements(), timeout=self.spec.timeout)

    def w2_transact(self, rng: random.Random) -> None:
        """W2 as an interactive transaction: the lease is held across the think times."""
        t = Transfer.random(rng, self.spec.scale)
        think = self.spec.think_ms / 1000
        with self.client.begin(timeout=self.spec.timeout) as tx:
            for sql, params in t.statements():
                if think:
                    time.sleep(think)
                tx.execute(sql, params)
            if think:
                time.sleep(think)

    def close(self) -> None:
        if self.client is not None:
            with contextlib.suppress(Exception):
                self.client.close()


class AsyncpgClient:
    """One asyncpg connection to PgBouncer per simulated container (statement cache off)."""

    def __init__(self, spec: Spec) -> None:
        self.spec = spec
        self.conn: Any = None

    async def connect(self) -> None:
        import asyncpg

        self.conn = await asyncpg.connect(
            host=self.spec.host,
            port=self.spec.port,
            user=self.spec.user,
            database=self.spec.database,
            statement_cache_size=0,
            ssl=False,
            timeout=self.spec.timeout,
        )

    async def w1(self, rng: random.Random) -> None:
        await self.conn.fetchval(W1_SQL, random_aid(rng, self.spec.scale))

    async def w2(self, rng: random.Random) -> None:
        t = Transfer.random(rng, self.spec.scale)
        think = self.spec.think_ms / 1000
        await self.conn.execute("BEGIN")
        try:
            for sql, params in t.statements():
                if think:
                    await asyncio.sleep(think)
                if sql.startswith("SELECT"):
                    await self.conn.fetchval(sql, *params)
                else:
                    await self.conn.execute(sql, *params)
            if think:
                await asyncio.sleep(think)
            await self.conn.execute("COMMIT")
        except Exception:
            with contextlib.suppress(Exception):
                await self.conn.execute("ROLLBACK")
            raise

    async def close(self) -> None:
        if self.conn is not None:
            with contextlib.suppress(Exception):
                await self.conn.close(timeout=5)


class AsyncBrokerLoadClient:
    """One `lambda_client.aio.AsyncBrokerClient` (its own channel) per simulated container."""

    def __init__(self, spec: Spec) -> None:
        self.spec = spec
        self.client: Any = None

    async def connect(self) -> None:
        from lambda_client.aio import AsyncBrokerClient

        self.client = AsyncBrokerClient(f"{self.spec.host}:{self.spec.port}", idempotency=_KEYS)
        if _warms_up(self.spec):
            await self.client.query("SELECT 1", timeout=self.spec.timeout)

    async def w1(self, rng: random.Random) -> None:
        aid = random_aid(rng, self.spec.scale)
        if self.spec.literal:
            await self.client.query(W1_LITERAL_SQL.format(aid=aid), timeout=self.spec.timeout)
        else:
            await self.client.query(W1_SQL, [aid], timeout=self.spec.timeout)

    async def w2(self, rng: random.Random) -> None:
        t = Transfer.random(rng, self.spec.scale)
        think = self.spec.think_ms / 1000 * W2_THINKS
        if think:
            await asyncio.sleep(think)
        await self.client.transaction(t.statements(), timeout=self.spec.timeout)

    async def w2_transact(self, rng: random.Random) -> None:
        """As `BrokerLoadClient.w2_transact`."""
        t = Transfer.random(rng, self.spec.scale)
        think = self.spec.think_ms / 1000
        async with await self.client.begin(timeout=self.spec.timeout) as tx:
            for sql, params in t.statements():
                if think:
                    await asyncio.sleep(think)
                await tx.execute(sql, params)
            if think:
                await asyncio.sleep(think)

    async def close(self) -> None:
        if self.client is not None:
            with contextlib.suppress(Exception):
                await self.client.close()


def _op(spec: Spec, client: Any) -> Callable[[random.Random], Any]:
    """The steady loop's transaction: W1, W2, or W2 through Transact (pgbroker only)."""
    if spec.workload == "w1":
        return client.w1  # type: ignore[no-any-return]
    if spec.transact:
        return client.w2_transact  # type: ignore[no-any-return]
    return client.w2  # type: ignore[no-any-return]


def _async_factory(spec: Spec) -> Callable[[], Any]:
    if spec.competitor == "asyncpg":
        return lambda: AsyncpgClient(spec)
    return lambda: AsyncBrokerLoadClient(spec)


# -- threaded runner (direct, pgbroker) -------------------------------------------------------


def _thread_factory(spec: Spec) -> Callable[[], Any]:
    if spec.competitor == "direct":
        return lambda: DirectClient(spec)
    return lambda: BrokerLoadClient(spec)


def run_threads_steady(spec: Spec) -> dict[str, Any]:
    factory = _thread_factory(spec)
    tallies = [Tally() for _ in range(spec.clients)]
    ready = threading.Barrier(spec.clients + 1)
    started = threading.Event()
    state: dict[str, Window] = {}

    def client_main(index: int) -> None:
        tally, client, rng = tallies[index], factory(), random.Random(index)
        op = _op(spec, client)
        try:
            client.connect()
        except Exception as exc:
            tally.error(exc)
            client = None
        with contextlib.suppress(threading.BrokenBarrierError):
            ready.wait(timeout=spec.timeout)
        started.wait(timeout=spec.timeout)
        if client is None or "window" not in state:
            return
        window = state["window"]
        try:
            while (now := time.monotonic()) < window.end:
                try:
                    op(rng)
                except Exception as exc:
                    tally.error(exc)
                    continue
                finished = time.monotonic()
                tally.done_total += 1
                if window.count(finished):
                    tally.latencies.append(finished - now)
        finally:
            client.close()

    threads = [
        threading.Thread(target=client_main, args=(i,), daemon=True) for i in range(spec.clients)
    ]
    for thread in threads:
        thread.start()
    with contextlib.suppress(threading.BrokenBarrierError):
        ready.wait(timeout=spec.timeout)
    start = time.monotonic() + spec.warmup
    state["window"] = Window(start, start + spec.duration)
    started.set()
    return _steady_measure(spec, state["window"], lambda: _join(threads, spec.timeout), tallies)


def _join(threads: list[threading.Thread], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))


def _steady_measure(
    spec: Spec, window: Window, wait_all: Callable[[], None], tallies: list[Tally]
) -> dict[str, Any]:
    time.sleep(max(0.0, window.start - time.monotonic()))
    _emit("measure_start")
    cpu0 = _cpu()
    time.sleep(max(0.0, window.end - time.monotonic()))
    cpu1 = _cpu()
    _emit("measure_end")
    wait_all()
    return _result(spec, _merge(tallies), spec.duration, cpu1 - cpu0)


def _result(spec: Spec, total: Tally, elapsed: float, cpu: float, **extra: Any) -> dict[str, Any]:
    tx = len(total.latencies)
    return {
        "spec": asdict(spec),
        "tx": tx,
        "tx_total": total.done_total,
        "tps": round(tx / elapsed, 1) if elapsed > 0 else 0.0,
        "latency_ms": _percentiles(total.latencies),
        "errors": sum(total.errors.values()),
        "error_messages": dict(total.errors.most_common(10)),
        "elapsed_s": round(elapsed, 3),
        "loadgen_cpu_s": round(cpu, 3),
        "loadgen_cpu_util": round(cpu / elapsed, 3) if elapsed > 0 else None,
        **extra,
    }


def run_threads_burst(spec: Spec) -> dict[str, Any]:
    factory = _thread_factory(spec)
    tallies = [Tally() for _ in range(spec.clients)]
    go = threading.Event()
    window = Window(0.0, float("inf"))

    def invocation(index: int) -> None:
        tally, rng = tallies[index], random.Random(spec.first_index + index)
        go.wait()
        client = factory()
        started = time.monotonic()
        try:
            client.connect()
            client.w2(rng)
            tally.latencies.append(time.monotonic() - started)
            tally.done_total += 1
        except Exception as exc:
            tally.error(exc)
        finally:
            client.close()

    threading.stack_size(512 * 1024)
    threads = [
        threading.Thread(target=invocation, args=(i,), daemon=True) for i in range(spec.clients)
    ]
    for thread in threads:
        thread.start()
    _await_go(spec)
    _emit("measure_start")
    cpu0, window.start = _cpu(), time.monotonic()
    go.set()
    _join(threads, spec.timeout)
    elapsed = time.monotonic() - window.start
    _emit("measure_end")
    return _burst_result(spec, tallies, elapsed, _cpu() - cpu0)


def _await_go(spec: Spec) -> None:
    """Several processes share one burst: all get ready first, then the harness says go."""
    if spec.wait_for_go:
        _emit("ready")
        sys.stdin.readline()


def _burst_result(spec: Spec, tallies: list[Tally], elapsed: float, cpu: float) -> dict[str, Any]:
    total = _merge(tallies)
    unfinished = spec.clients - total.done_total - sum(total.errors.values())
    if unfinished > 0:
        total.errors[f"unfinished after {spec.timeout:.0f} s"] += unfinished
    # Raw latencies, so the harness can merge the percentiles of a burst split across processes.
    raw = [round(x, 6) for x in total.latencies]
    return _result(spec, total, elapsed, cpu, invocations=spec.clients, latencies_s=raw)


# -- asyncio runner (asyncpg) -----------------------------------------------------------------


async def _async_steady(spec: Spec) -> dict[str, Any]:
    tallies = [Tally() for _ in range(spec.clients)]
    factory = _async_factory(spec)
    clients = [factory() for _ in range(spec.clients)]

    async def connect(index: int) -> Any:
        try:
            await clients[index].connect()
            return clients[index]
        except Exception as exc:
            tallies[index].error(exc)
            return None

    connected = await asyncio.gather(*(connect(i) for i in range(spec.clients)))
    start = time.monotonic() + spec.warmup
    window = Window(start, start + spec.duration)

    async def loop(index: int, client: Any) -> None:
        tally, rng = tallies[index], random.Random(index)
        op = _op(spec, client)
        while (now := time.monotonic()) < window.end:
            try:
                await op(rng)
            except Exception as exc:
                tally.error(exc)
                continue
            finished = time.monotonic()
            tally.done_total += 1
            if window.count(finished):
                tally.latencies.append(finished - now)

    tasks = [asyncio.create_task(loop(i, c)) for i, c in enumerate(connected) if c is not None]
    await asyncio.sleep(max(0.0, window.start - time.monotonic()))
    _emit("measure_start")
    cpu0 = _cpu()
    await asyncio.sleep(max(0.0, window.end - time.monotonic()))
    cpu1 = _cpu()
    _emit("measure_end")
    await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), spec.timeout)
    await asyncio.gather(*(c.close() for c in connected if c is not None))
    return _result(spec, _merge(tallies), spec.duration, cpu1 - cpu0)


async def _async_burst(spec: Spec) -> dict[str, Any]:
    tallies = [Tally() for _ in range(spec.clients)]
    go = asyncio.Event()

    async def invocation(index: int) -> None:
        tally, client = tallies[index], _async_factory(spec)()
        rng = random.Random(spec.first_index + index)
        await go.wait()
        started = time.monotonic()
        try:
            await client.connect()
            await client.w2(rng)
            tally.latencies.append(time.monotonic() - started)
            tally.done_total += 1
        except Exception as exc:
            tally.error(exc)
        finally:
            await client.close()

    tasks = [asyncio.create_task(invocation(i)) for i in range(spec.clients)]
    await asyncio.sleep(0)  # every task is now waiting on `go`
    _await_go(spec)
    _emit("measure_start")
    cpu0, started = _cpu(), time.monotonic()
    go.set()
    await asyncio.wait(tasks, timeout=spec.timeout)
    elapsed = time.monotonic() - started
    _emit("measure_end")
    for task in tasks:
        task.cancel()
    return _burst_result(spec, tallies, elapsed, _cpu() - cpu0)


def run(spec: Spec) -> dict[str, Any]:
    """Run *spec* and return the result (see `_result` for its keys)."""
    if spec.competitor not in COMPETITORS:
        raise ValueError(f"unknown competitor {spec.competitor!r}")
    raise_fd_limit()
    if spec.competitor == "asyncpg" or (spec.competitor == "pgbroker" and spec.asyncio):
        coro = _async_burst(spec) if spec.workload == "w3" else _async_steady(spec)
        return asyncio.run(coro)
    if spec.workload == "w3":
        return run_threads_burst(spec)
    return run_threads_steady(spec)


def main(argv: list[str]) -> int:
    spec = Spec(**json.loads(argv[0]))
    result = run(spec)
    _emit("result", **result)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
