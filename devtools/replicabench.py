"""W1-style read throughput through a broker on the primary only, then on the primary plus one
streaming replica, in the same run on this machine (issue 16's figure).

``python -m devtools.replicabench [--seconds 10] [--clients 16] [--rounds 2]`` starts a
private Postgres (pgbench scale 1), a replica of it (``pg_basebackup -R``) and two brokers
(``--routing auto``, the same pool size per server): one without replicas, one with the
replica. Load processes run W1's point select (``SELECT abalance FROM pgbench_accounts WHERE
aid = $1``, one autocommit statement per call, which auto routing sends to the replica) in
closed loops, alternating the two brokers for *rounds* rounds, and print requests per second
and where the reads ran. Everything started is stopped by pid at the end.

Every process shares the machine's cores: expect little from the replica where the broker's
event loop, not Postgres, is the limit (docs/performance.md).
"""

from __future__ import annotations

import argparse
import multiprocessing
import random
import subprocess
import threading
import time
from typing import Any

from bench.workloads import W1_SQL
from devtools.brokerproc import BrokerProcess
from devtools.localpg import LocalPostgres, LocalReplica
from devtools.runas import as_user


def _load(target: str, clients: int, seconds: float, out: Any) -> None:
    """One load process: *clients* threads, each a closed loop of W1 for *seconds*."""
    from lambda_client import BrokerClient

    db = BrokerClient(target, timeout=10)
    db.query("SELECT 1")
    done = [0] * clients
    errors = [0] * clients
    stop_at = time.monotonic() + seconds

    def loop(i: int) -> None:
        rng = random.Random(i)
        while time.monotonic() < stop_at:
            try:
                db.query(W1_SQL, [rng.randint(1, 100_000)])
                done[i] += 1
            except Exception:
                errors[i] += 1

    threads = [threading.Thread(target=loop, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    db.close()
    out.put((sum(done), sum(errors)))


def measure(broker: BrokerProcess, clients: int, seconds: float, processes: int) -> float:
    """Requests per second of W1 through *broker* with *clients* threads over *processes*."""
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    per = max(1, clients // processes)
    procs = [
        ctx.Process(target=_load, args=(broker.target, per, seconds, out)) for _ in range(processes)
    ]
    for proc in procs:
        proc.start()
    totals = [out.get(timeout=seconds + 60) for _ in procs]
    for proc in procs:
        proc.join(30)
    done = sum(t[0] for t in totals)
    failed = sum(t[1] for t in totals)
    if failed:
        print(f"  {failed} failed calls")
    return done / seconds


def _stat(broker: BrokerProcess, key: str) -> int:
    from lambda_client import BrokerClient

    with BrokerClient(broker.target) as db:
        return int(db.stats().get(key, 0))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--pool-size", type=int, default=8)
    args = parser.parse_args()

    primary = LocalPostgres(max_connections=100).start()
    replica: LocalReplica | None = None
    brokers: list[BrokerProcess] = []
    try:
        argv, run_as = as_user(
            primary._os_user,
            [str(primary.bindir / "pgbench"), "-i", "-q", "-s", "1", "-h", primary.host,
             "-p", str(primary.port), "-U", primary.user, primary.database],
        )  # fmt: skip
        subprocess.run(argv, **run_as, cwd="/", check=True, capture_output=True)
        replica = LocalReplica(primary).start()
        common = {"pool_size": args.pool_size, "routing": "auto", "log_level": "INFO"}
        alone = BrokerProcess(primary.dsn + "?sslmode=disable", **common)
        with_replica = BrokerProcess(
            primary.dsn + "?sslmode=disable",
            replica_urls=replica.dsn + "?sslmode=disable",
            **common,
        )
        brokers = [alone.start(), with_replica.start()]
        time.sleep(2)  # the replica joins the rotation on the first check
        results: dict[str, list[float]] = {"primary only": [], "primary + 1 replica": []}
        for _ in range(args.rounds):
            for name, broker in zip(results, brokers, strict=True):
                rate = measure(broker, args.clients, args.seconds, args.processes)
                results[name].append(rate)
                print(f"{name}: {rate:,.0f} req/s")
        on_replica = _stat(with_replica, "target.replica1.routed_num")
        on_primary = _stat(with_replica, "target.primary.routed_num")
        print(f"with the replica: {on_replica} reads routed to replica1, {on_primary} to primary")
        for name, rates in results.items():
            print(f"{name}: mean {sum(rates) / len(rates):,.0f} req/s over {len(rates)} rounds")
    finally:
        for broker in brokers:
            broker.stop()
        if replica is not None:
            replica.stop()
        primary.stop()


if __name__ == "__main__":
    main()
