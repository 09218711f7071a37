"""Big results and heavy requests against a real broker process (issue 15, items 3 and 5).

    python -m bench.bigresults [--skip-memory] [--skip-stall] [--allocator pymalloc]
        [--pg-io loop|threads] [--only NAME-PART]

Memory: the broker's RSS before, at peak and 10 s after a load of big results ends (a 3M-row
result refused by the row limit, then ten concurrent 300k-row results), from
``/proc/PID/status``. The goal: back within 20 % of the pre-load RSS. ``--allocator pymalloc``
measures the broker with Python's own object allocator (PGBROKER_OBJECT_ALLOCATOR).

Stall: the latency of ``SELECT 1`` callers (one every 10 ms, four threads) while heavy
requests run: 65,535 parameters, a 1M-element array, 30,000 ``VALUES`` parameters, a
20,000-term expression, and a small request with a 300,000-row result (``--pg-io loop``: read
on the event loop). Reports p50/p99/max of the ``SELECT 1`` calls alone and under load. The
goal: under 100 ms p99 added.
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc

from bench.procs import rss_bytes
from devtools.brokerproc import BrokerProcess
from devtools.localpg import LocalPostgres
from lambda_client import codec
from lambda_client._proto.pgbroker.v1 import broker_pb2 as pb
from lambda_client._proto.pgbroker.v1 import broker_pb2_grpc as pb_grpc


def rss_mb(pid: int) -> float:
    """The broker's RSS: *pid* and its worker processes (``--workers``, one per CPU)."""
    rss = rss_bytes(pid)
    if rss is None:
        raise RuntimeError("no VmRSS")
    return rss / 2**20


def req(sql: str, params: list[Any] | None = None) -> pb.ExecuteRequest:
    return pb.ExecuteRequest(
        statements=[pb.Statement(sql=sql, params=[codec.encode(p) for p in params or []])]
    )


def call(stub: Any, request: pb.ExecuteRequest, timeout: float = 120) -> str:
    try:
        stub.Execute(request, timeout=timeout)
        return "OK"
    except grpc.RpcError as exc:
        return exc.code().name


def memory(stub: Any, pid: int) -> None:
    for _ in range(20):  # warm: the first calls allocate for good (caches, threads)
        call(stub, req("SELECT generate_series(1, 1000)"))
    time.sleep(1)
    before = rss_mb(pid)
    peaks = [before, before]  # during the 3M-row result, during the ten 300k-row ones
    phase = 0
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peaks[phase] = max(peaks[phase], rss_mb(pid))
            time.sleep(0.05)

    sampler = threading.Thread(target=sample)
    sampler.start()
    outcome = call(stub, req("SELECT generate_series(1, 3000000)"))
    print(f"3M rows: {outcome}")
    phase = 1
    with ThreadPoolExecutor(10) as pool:
        outcomes = list(
            pool.map(lambda _: call(stub, req("SELECT generate_series(1, 300000)")), range(10))
        )
    print(f"10 × 300k rows: {outcomes}")
    stop.set()
    sampler.join()
    ended = rss_mb(pid)
    # grpc.aio keeps the last call's state (and so its result) until the next call arrives:
    # the load ends with ordinary calls, as health checks and other callers make in service.
    for _ in range(5):
        call(stub, req("SELECT 1"))
    time.sleep(10)
    after = rss_mb(pid)
    print(
        f"RSS MB: before {before:.0f}, peak {max(peaks):.0f} (3M-row result {peaks[0]:.0f},"
        f" ten 300k-row results {peaks[1]:.0f}), when the load ended {ended:.0f},"
        f" 10 s later {after:.0f} ({100 * (after - before) / before:+.0f} %)"
    )


HEAVY = {
    "65,535 parameters": lambda: req(
        "SELECT cardinality(ARRAY[" + ",".join(f"${i}::int" for i in range(1, 65536)) + "])",
        list(range(65535)),
    ),
    "1M-element array": lambda: req("SELECT cardinality($1::int[])", [list(range(1_000_000))]),
    "30,000 VALUES parameters": lambda: req(
        "SELECT count(*) FROM (VALUES " + ",".join(f"(${i}::int)" for i in range(1, 30001)) + ") v",
        list(range(30000)),
    ),
    "20,000-term expression": lambda: req("SELECT " + "+".join(["1"] * 20_000)),
    # A small request with a big reply (about 9 MB): with PGBROKER_PG_IO=loop it runs on the
    # event loop itself, in slices (broker/postgres/greenio.py).
    "a 300,000-row result": lambda: req(
        "SELECT g, repeat('x', 20) FROM generate_series(1, 300000) g"
    ),
}


def latencies(stub: Any, seconds: float, heavy: pb.ExecuteRequest | None) -> list[float]:
    samples: list[float] = []
    stop = threading.Event()

    def caller() -> None:
        while not stop.is_set():
            started = time.perf_counter()
            call(stub, req("SELECT 1"), 30)
            samples.append(time.perf_counter() - started)
            time.sleep(0.01)

    threads = [threading.Thread(target=caller) for _ in range(4)]
    for thread in threads:
        thread.start()
    if heavy is not None:
        ends = time.monotonic() + seconds
        while time.monotonic() < ends:
            call(stub, heavy)
    else:
        time.sleep(seconds)
    stop.set()
    for thread in threads:
        thread.join()
    return samples


def report(name: str, samples: list[float]) -> None:
    ordered = sorted(samples)
    p99 = ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]
    print(
        f"{name:28s} SELECT 1 × {len(samples):4d}: p50 {1000 * statistics.median(ordered):6.1f}"
        f" ms, p99 {1000 * p99:7.1f} ms, max {1000 * ordered[-1]:7.1f} ms"
    )


def stall(stub: Any) -> None:
    report("alone", latencies(stub, 3, None))
    for name, build in HEAVY.items():
        heavy = build()
        print(f"{name}: {call(stub, heavy)}")
        report(f"during {name}", latencies(stub, 5, heavy))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--skip-stall", action="store_true")
    parser.add_argument("--allocator", choices=("malloc", "pymalloc"), default="malloc")
    parser.add_argument("--pg-io", choices=("threads", "loop"), default=None)
    parser.add_argument("--only", help="run only the heavy requests whose name contains this")
    options = parser.parse_args()
    if options.only:
        for name in [n for n in HEAVY if options.only not in n]:
            del HEAVY[name]
    extra = {} if options.pg_io is None else {"pg_io": options.pg_io}
    with LocalPostgres() as postgres:
        broker = BrokerProcess(
            postgres.dsn + "?sslmode=disable",
            log_level="INFO",
            pool_size=4,
            auth="none",
            max_result_rows=1_000_000,
            max_inflight_per_caller=0,
            max_request_bytes="64MiB",
            object_allocator=options.allocator,
            **extra,
        ).start()
        try:
            with grpc.insecure_channel(
                broker.target, options=[("grpc.max_receive_message_length", 256 << 20)]
            ) as channel:
                stub = pb_grpc.BrokerStub(channel)
                if not options.skip_memory:
                    assert broker.pid is not None
                    memory(stub, broker.pid)
                if not options.skip_stall:
                    stall(stub)
        finally:
            broker.stop()


if __name__ == "__main__":
    main()
