"""Broker overhead on loopback: ``python -m bench.broker_latency [--n 2000] [--seconds 5]``.

Measures, against a temporary local Postgres (or ``PGBROKER_BENCH_DSN``):

* single statement and 4-statement transaction latency (median, p99 of --n calls) directly
  with pg8000 (unnamed statements, as ``pg8000.native`` does, and prepared once) and through a
  broker process (`python -m broker run`, pool 20) with a blocking gRPC stub, plus how long the
  broker held the pooled connection (``held_median_us``, from ExecuteResponse.run_us);
* requests/s one broker process sustains with 200 concurrent callers (grpc.aio client in a
  separate process, single-statement requests) for --seconds.

Timings vary with machine load; the figures are for comparison on the same machine only.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import grpc
import pg8000.native

from devtools.brokerproc import BrokerProcess
from devtools.localpg import LocalPostgres
from lambda_client import codec
from lambda_client._proto.pgbroker.v1 import broker_pb2 as pb
from lambda_client._proto.pgbroker.v1 import broker_pb2_grpc as pb_grpc

SINGLE = "SELECT $1::int"
BATCH = [
    ("UPDATE bench_accounts SET balance = balance - $1 WHERE id = $2", [1, 1]),
    ("UPDATE bench_accounts SET balance = balance + $1 WHERE id = $2", [1, 2]),
    ("INSERT INTO bench_history (account, delta) VALUES ($1, $2)", [1, -1]),
    ("SELECT balance FROM bench_accounts WHERE id = $1", [1]),
]


def _timings(fn: Callable[[], Any], n: int) -> dict[str, float]:
    for _ in range(min(200, n)):  # warm up: prepared statements, caches, channel
        fn()
    samples = []
    for _ in range(n):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e6)
    samples.sort()
    return {
        "median_us": round(statistics.median(samples), 1),
        "p99_us": round(samples[int(len(samples) * 0.99) - 1], 1),
    }


def _request(statements: list[tuple[str, list[Any]]]) -> pb.ExecuteRequest:
    req = pb.ExecuteRequest()
    for sql, params in statements:
        req.statements.add(sql=sql, params=codec.encode_params(params))
    return req


def _direct(dsn_parts: dict[str, Any], n: int) -> dict[str, Any]:
    conn = pg8000.native.Connection(**dsn_parts)
    out: dict[str, Any] = {}
    out["single_unnamed"] = _timings(lambda: conn.run("SELECT :v::int", v=1), n)
    stmt = conn.prepare("SELECT :v::int")
    out["single_prepared"] = _timings(lambda: stmt.run(v=1), n)
    prepared = [conn.prepare(sql.replace("$1", ":a").replace("$2", ":b")) for sql, _ in BATCH]

    def batch() -> None:
        conn.run("BEGIN")
        for ps, (_, params) in zip(prepared, BATCH, strict=True):
            ps.run(**dict(zip("ab", params, strict=False)))
        conn.run("COMMIT")

    out["batch4_prepared"] = _timings(batch, n)
    conn.close()
    return out


def _through_broker(target: str, n: int) -> dict[str, Any]:
    with grpc.insecure_channel(target) as channel:
        stub = pb_grpc.BrokerStub(channel)
        single = _request([(SINGLE, [1])])
        batch = _request(BATCH)
        out = {
            "single": _timings(lambda: stub.Execute(single, timeout=10), n),
            "batch4": _timings(lambda: stub.Execute(batch, timeout=10), n),
        }
        # How long the pooled connection was held (ExecuteResponse.run_us): what bounds
        # transactions per second per pooled connection.
        for name, req in (("single", single), ("batch4", batch)):
            held = [stub.Execute(req, timeout=10).run_us for _ in range(min(n, 1000))]
            out[name]["held_median_us"] = statistics.median(held)
        return out


async def _load(target: str, callers: int, seconds: float) -> dict[str, Any]:
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.BrokerStub(channel)
        req = _request([(SINGLE, [1])])
        done = 0
        errors = 0
        stop_at = time.monotonic() + seconds

        async def caller() -> None:
            nonlocal done, errors
            while time.monotonic() < stop_at:
                try:
                    await stub.Execute(req, timeout=30)
                    done += 1
                except grpc.aio.AioRpcError:
                    errors += 1

        start = time.monotonic()
        await asyncio.gather(*(caller() for _ in range(callers)))
        elapsed = time.monotonic() - start
    return {"callers": callers, "requests_per_s": round(done / elapsed), "errors": errors}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=2000, help="calls per latency figure")
    parser.add_argument("--seconds", type=float, default=5.0, help="load duration")
    parser.add_argument("--callers", type=int, default=200, help="concurrent callers")
    parser.add_argument("--load-only", metavar="TARGET", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.load_only:
        print(json.dumps(asyncio.run(_load(args.load_only, args.callers, args.seconds))))
        return 0
    server = None
    dsn = os.environ.get("PGBROKER_BENCH_DSN")
    if dsn is None:
        server = LocalPostgres().start()
        dsn = server.dsn + "?sslmode=disable"
    try:
        return _run(dsn, args)
    finally:
        if server is not None:
            server.stop()


def _run(dsn: str, args: argparse.Namespace) -> int:
    from urllib.parse import urlsplit

    url = urlsplit(dsn)
    parts = {
        "user": url.username or "postgres",
        "host": url.hostname,
        "port": url.port or 5432,
        "database": url.path.lstrip("/") or "postgres",
        "password": url.password,
    }
    setup = pg8000.native.Connection(**parts)
    setup.run("DROP TABLE IF EXISTS bench_accounts, bench_history")
    setup.run("CREATE TABLE bench_accounts (id int PRIMARY KEY, balance bigint)")
    setup.run("INSERT INTO bench_accounts SELECT g, 1000000 FROM generate_series(1, 10) g")
    setup.run("CREATE TABLE bench_history (id bigserial, account int, delta int)")
    setup.close()
    with BrokerProcess(dsn, log_level="INFO") as broker:
        results: dict[str, Any] = {"direct_pg8000": _direct(parts, args.n)}
        results["broker"] = _through_broker(broker.target, args.n)
        # The load client runs in its own process so it does not share our GIL.
        load = subprocess.run(
            [
                sys.executable,
                "-m",
                "bench.broker_latency",
                "--load-only",
                broker.target,
                "--callers",
                str(args.callers),
                "--seconds",
                str(args.seconds),
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        results["load"] = json.loads(load.stdout)
        broker.stop(timeout=30)
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
