"""Measure how long one function's request waits behind another function's flood (issue 15, 8).

    .venv/bin/python -m devtools.fairflood [--flood 200] [--hold 0.02] [--trials 3] [--python PATH]

Starts a local Postgres and a real broker (pool of 2, its own process; ``--python`` runs
another checkout's broker, e.g. ``/work/main/.venv/bin/python`` for plain FIFO). Function A
(``x-lambda-function-name: fn-a``) sends *flood* requests at once, each holding a connection
*hold* seconds (``pg_sleep``); 0.3 s later function B sends ``SELECT 1``. Prints B's time and
its ``wait_us`` (time queued), with how many requests were waiting when B was sent.
"""

from __future__ import annotations

import argparse
import sys
import time

import grpc

from devtools.brokerproc import BrokerProcess
from devtools.localpg import LocalPostgres
from lambda_client._proto.pgbroker.v1 import broker_pb2 as pb
from lambda_client._proto.pgbroker.v1 import broker_pb2_grpc as pb_grpc


def _request(sql: str) -> pb.ExecuteRequest:
    return pb.ExecuteRequest(statements=[pb.Statement(sql=sql)])


def _as(function: str) -> tuple[tuple[str, str], ...]:
    return (("x-lambda-function-name", function),)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--flood", type=int, default=200)
    parser.add_argument("--hold", type=float, default=0.02)
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--python", default=sys.executable)
    args = parser.parse_args()
    pg = LocalPostgres().start()
    broker = BrokerProcess(pg.dsn + "?sslmode=disable", log_level="INFO", pool_size=2)
    # The broker runs from this checkout's directory: keep it off sys.path, so --python's own
    # (editable) broker is the one imported.
    broker.env["PYTHONSAFEPATH"] = "1"
    original_argv = broker.argv
    broker.argv = lambda: [args.python, *original_argv()[1:]]  # type: ignore[method-assign]
    try:
        broker.start()
        broker.wait_serving()
        with grpc.insecure_channel(broker.target) as channel:
            stub = pb_grpc.BrokerStub(channel)
            print(f"broker python: {args.python}")
            for _ in range(args.trials):
                flood = [
                    stub.Execute.future(
                        _request(f"SELECT pg_sleep({args.hold})"), timeout=120, metadata=_as("fn-a")
                    )
                    for _ in range(args.flood)
                ]
                time.sleep(0.3)
                waiting = stub.GetStats(pb.GetStatsRequest(), timeout=10).stats["requests_waiting"]
                started = time.perf_counter()
                answer = stub.Execute(_request("SELECT 1"), timeout=120, metadata=_as("fn-b"))
                took = time.perf_counter() - started
                print(
                    f"B behind {waiting} of A's queued: {took * 1000:.0f} ms"
                    f" (queued {answer.wait_us / 1000:.0f} ms)"
                )
                for future in flood:
                    future.result()
    finally:
        broker.close()
        pg.stop()


if __name__ == "__main__":
    main()
