"""``python -m bench.session_cost [--n 1000]``: what exactly-once and the session check cost
per transaction, one caller at a time against a broker child process on a throwaway Postgres.

Four brokers differ in two things only: idempotency keys (client ``idempotency=``) and the
session reset + probe behind COMMIT (``--session-audit off`` vs the default ``opaque``).
Each runs a W2 transfer (five statements, one batch) and a single-statement ``SELECT 1``
*n* times, in two interleaved rounds; the report is the median and p90 latency per
configuration, and the differences to the baseline (no keys, no check). Prints one JSON
document.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
import uuid
from typing import Any

import grpc

from bench.pgbench_runner import initialise, pgbench_binary
from bench.workloads import Transfer
from devtools.brokerproc import BrokerProcess
from devtools.localpg import LocalPostgres
from lambda_client._proto.pgbroker.v1 import broker_pb2_grpc as pb_grpc
from lambda_client._requests import query_request, transaction_request

CONFIGS = {
    "baseline": (False, "off"),
    "keys": (True, "off"),
    "session_check": (False, "opaque"),
    "keys+session_check": (True, "opaque"),
}
SCALE = 1


def _timed(stub: Any, make: Any, keys: bool, n: int) -> tuple[list[float], list[float]]:
    """Wall-clock milliseconds per call, and the broker's ``run_us`` (the time the pooled
    connection was held: Postgres' side only, without the client's and gRPC's noise)."""
    wall, held = [], []
    for _ in range(n):
        request = make()
        if keys:
            request.idempotency_key = f"cost-{uuid.uuid4()}"
        started = time.perf_counter()
        response = stub.Execute(request, timeout=30)
        wall.append((time.perf_counter() - started) * 1000)
        held.append(response.run_us / 1000)
    return wall, held


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=1000, help="calls per configuration and round")
    args = parser.parse_args(argv)
    rng = random.Random(7)
    kinds = ("w2", "w2_held", "select1", "select1_held")
    samples: dict[str, dict[str, list[float]]] = {
        name: {kind: [] for kind in kinds} for name in CONFIGS
    }
    w2 = lambda: transaction_request(Transfer.random(rng, SCALE).statements(), None, False, False)  # noqa: E731
    select1 = lambda: query_request("SELECT 1", None)  # noqa: E731
    with LocalPostgres() as pg:
        initialise(pgbench_binary(pg.bindir), pg.host, pg.port, pg.user, SCALE)
        brokers = {
            name: BrokerProcess(
                pg.dsn + "?sslmode=disable",
                log_level="INFO",
                pool_size=2,
                auth="none",
                session_audit=audit,
            ).start()
            for name, (_, audit) in CONFIGS.items()
        }
        try:
            for _ in range(2):
                for name, (keys, _) in CONFIGS.items():
                    channel = grpc.insecure_channel(brokers[name].target)
                    stub = pb_grpc.BrokerStub(channel)
                    stub.Execute(select1(), timeout=30)  # warm: channel, prepared statements
                    for kind, make in (("w2", w2), ("select1", select1)):
                        wall, held = _timed(stub, make, keys, args.n)
                        samples[name][kind] += wall
                        samples[name][kind + "_held"] += held
                    channel.close()
        finally:
            for broker in brokers.values():
                broker.close()
    report: dict[str, Any] = {}
    for name, by_kind in samples.items():
        report[name] = {
            kind: {
                "median_ms": round(statistics.median(times), 3),
                "p90_ms": round(statistics.quantiles(times, n=10)[-1], 3),
            }
            for kind, times in by_kind.items()
        }
    base = report["baseline"]
    report["added_median_ms"] = {
        name: {
            kind: round(report[name][kind]["median_ms"] - base[kind]["median_ms"], 3)
            for kind in base
        }
        for name in CONFIGS
        if name != "baseline"
    }
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
