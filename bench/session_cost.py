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
from typing import Any

import lambda_client as lc
from bench.pgbench_runner import initialise, pgbench_binary
from bench.workloads import Transfer
from devtools.brokerproc import BrokerProcess
from devtools.localpg import LocalPostgres

CONFIGS = {
    "baseline": (False, "off"),
    "keys": (True, "off"),
    "session_check": (False, "opaque"),
    "keys+session_check": (True, "opaque"),
}
SCALE = 1


def _timed(fn: Any, n: int) -> list[float]:
    times = []
    for _ in range(n):
        started = time.perf_counter()
        fn()
        times.append((time.perf_counter() - started) * 1000)
    return times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=1000, help="calls per configuration and round")
    args = parser.parse_args(argv)
    rng = random.Random(7)
    samples: dict[str, dict[str, list[float]]] = {
        name: {"w2": [], "select1": []} for name in CONFIGS
    }
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
                    db = lc.BrokerClient(brokers[name].target, idempotency=keys, auth=lambda: ())
                    db.query("SELECT 1")  # warm: channel, prepared statements
                    samples[name]["w2"] += _timed(
                        lambda db=db: db.transaction(Transfer.random(rng, SCALE).statements()),
                        args.n,
                    )
                    samples[name]["select1"] += _timed(lambda db=db: db.query("SELECT 1"), args.n)
                    db.close()
        finally:
            for broker in brokers.values():
                broker.close()
    report: dict[str, Any] = {}
    for name, kinds in samples.items():
        report[name] = {
            kind: {
                "median_ms": round(statistics.median(times), 3),
                "p90_ms": round(statistics.quantiles(times, n=10)[-1], 3),
            }
            for kind, times in kinds.items()
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
