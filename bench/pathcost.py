"""``python -m bench.pathcost --dsn URL``: the Postgres side of one request, without gRPC.

Runs `broker.flow.batch.run_transaction` on one pooled-style connection (`broker.postgres.pg
.connect`), in this process' main thread, *n* times per kind, and prints per request: this
thread's CPU (what a pool worker spends: pg8000, binding, result building), the backend's
CPU (from ``/proc``: Postgres parsing, planning, running the session SQL) and the wall time.
Kinds: ``w1`` (the W1 point select, a single statement), ``w2`` (the W2 transfer batch) and
``w2key`` (the same with an idempotency key). Run it from another source tree's directory
(``cd DIR && python -m bench.pathcost``, with ``PYTHONPATH=DIR/client``) to compare two
versions of the broker (`bench.ab` does the whole stack); it needs the pgbench schema
(`bench.pgbench_runner.initialise`, scale 1) and the login role's right to create the key
store. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time
import uuid
from pathlib import Path

from bench.workloads import W1_SQL, Transfer
from broker.config import load_settings
from broker.flow.batch import Batch, run_transaction
from broker.front.server import limits_for
from broker.front.service import validate
from broker.postgres import keys
from broker.postgres.pg import PgConnection, connect
from broker.security.limits import check_results
from lambda_client._proto.pgbroker.v1 import broker_pb2 as pb
from lambda_client._requests import query_request, transaction_request

CLK_TCK = os.sysconf("SC_CLK_TCK")


def _backend_cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def _batch(request: pb.ExecuteRequest, limits: object, keyed: bool) -> Batch:
    plan, bound = validate(request, limits)  # type: ignore[arg-type]
    claim = None
    if keyed:
        claim = keys.KeyClaim("bench", f"k-{uuid.uuid4()}", keys.request_hash(request), 60.0)
    return Batch(
        statements=request.statements,
        plan=plan,
        application_name="pgbroker:-:-",
        bound=bound,
        claim=claim,
        result_check=lambda results: check_results(results, limits, completed=False),  # type: ignore[arg-type]
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dsn", required=True)
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--kinds", default="w1,w2,w2key")
    args = parser.parse_args(argv)
    settings = load_settings({"database_url": args.dsn}, {})
    limits = limits_for(settings)
    conn: PgConnection = connect(settings.database, 10.0, settings.statement_timeout)
    keys.ensure_store(conn)
    rng = random.Random(7)
    out: dict[str, dict[str, float]] = {}
    for kind in args.kinds.split(","):
        for warm in (True, False):
            n = 200 if warm else args.n
            batches = []
            for _ in range(n):
                if kind == "w1":
                    request = query_request(W1_SQL, [rng.randint(1, 100_000)])
                else:
                    request = transaction_request(
                        Transfer.random(rng, 1).statements(), None, False, False
                    )
                batches.append(_batch(request, limits, kind == "w2key"))
            pid = conn.backend_pid
            cpu0, pg0, wall0 = time.thread_time(), _backend_cpu(pid), time.perf_counter()
            for batch in batches:
                run_transaction(conn, batch, time.monotonic() + 60, settings.statement_timeout)
                if conn.session_dirty:
                    raise RuntimeError(f"session left dirty: {conn.session_dirty}")
            cpu1, pg1, wall1 = time.thread_time(), _backend_cpu(pid), time.perf_counter()
            if not warm:
                out[kind] = {
                    "worker_cpu_us": round((cpu1 - cpu0) / n * 1e6, 1),
                    "backend_cpu_us": round((pg1 - pg0) / n * 1e6, 1),
                    "wall_us": round((wall1 - wall0) / n * 1e6, 1),
                }
    conn.close_quietly()
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
