"""``python -m bench.ab --base DIR``: an A/B of two broker source trees on one machine.

The machine this runs on is shared, so whole-bench ratios move by ±20–40 % between identical
runs; this compares two versions of the broker side by side instead. One private Postgres
(pgbench schema), two broker processes — A from the source tree *DIR* (e.g. ``git archive
<commit> | tar -x -C DIR``), B from this tree — with the bench's settings (pool 20,
``PGBROKER_AUTH=none``), and the same `bench.load` generator (this tree's client) against each
in turn, alternating which goes first every round. Per run it records the broker process'
CPU per request (user + system, all threads: less sensitive to other work on the machine than
latency), Postgres' CPU per request (postmaster and backends), the load generator's CPU per
request (the client library's cost), tx/s, p50 and the load average. Both sides' loads use this
tree's client, unless ``--client-too`` gives side A's load A's client (an A/B of the client
library as well: compare ``client_cpu_us_per_tx``).
Prints one JSON document: every run, and per workload the medians of A and B and B ÷ A.
``w4`` runs W4's Django view (bench/django_view.py, this tree's client) instead of
`bench.load`: its figures are per view (10 queries).

Each broker runs with its own tree's default worker count (``--workers``: one per CPU since
issue 14, one before), unless ``--env PGBROKER_WORKERS=N`` sets it for both. ``--env-b`` sets
a variable for B only: an A/B of a setting (``--base`` the same tree). ``--scale`` sets pgbench's
scale (1 by default: W2 contends on one branch row; ``make bench``'s full plan runs 10).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

from bench import harness
from bench.django_view import ViewSpec
from bench.load import Spec
from bench.pgbench_runner import initialise, pgbench_binary
from bench.procs import Processes, cpu_seconds
from devtools import brokerproc
from devtools.localpg import LocalPostgres

SCALE = 1  # pgbench's scale unless --scale says otherwise
WORKLOADS = {
    # name: (workload, clients, think ms)
    "w1": ("w1", 200, 0.0),
    "w1light": ("w1", 1, 0.0),
    "w2": ("w2", 500, 1.0),
    # W4: the Django view of 10 ORM queries (bench/django_view.py), one client; per view.
    "w4": ("w4", 1, 0.0),
    # W1 light with Django's SQL: the value as a literal, a new text per value (W1_LITERAL_SQL).
    "w1literal": ("w1", 1, 0.0),
    # W2 through Transact (db.begin()), as `make bench`'s "transact" variant.
    "w2transact": ("w2", 500, 1.0),
    # The same, one client without think time: a transaction's own cost, little queueing.
    "w2transactlight": ("w2", 1, 0.0),
}
TRANSACT = {"w2transact", "w2transactlight"}


def _start_broker(tree: Path, url: str, env: dict[str, str]) -> brokerproc.BrokerProcess:
    """A broker from the source tree *tree* (the child runs with its cwd there, so ``python -m
    broker`` imports that tree's broker, and that tree's client via PYTHONPATH)."""
    broker = brokerproc.BrokerProcess(
        url, log_level="INFO", start_timeout=60, pool_size=20, auth="none", env=env
    )
    saved_root = brokerproc.ROOT
    brokerproc.ROOT = tree
    try:
        with _client_from(tree):
            broker.start()
    finally:
        brokerproc.ROOT = saved_root
    if not broker.wait_serving(60):
        broker.stop()
        raise RuntimeError(f"broker from {tree} not serving\n{broker.log()[-2000:]}")
    return broker


@contextlib.contextmanager
def _client_from(tree: Path | None) -> Iterator[None]:
    """Child processes started inside import `lambda_client` from *tree* (None: this tree's)."""
    saved = os.environ.get("PYTHONPATH")
    if tree is not None:
        os.environ["PYTHONPATH"] = str(tree / "client")
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = saved


def _one(
    procs: Processes,
    spec: Spec | ViewSpec,
    broker_pid: int,
    pg_pid: int,
    client_tree: Path | None = None,
) -> dict[str, Any]:
    marks: dict[str, tuple[float | None, float | None, float]] = {}

    def mark(name: str) -> Any:
        def hook() -> None:
            marks[name] = (cpu_seconds(broker_pid), cpu_seconds(pg_pid), os.getloadavg()[0])

        return hook

    limit = spec.warmup + spec.duration + 120
    module = "bench.django_view" if isinstance(spec, ViewSpec) else "bench.load"
    with _client_from(client_tree):
        result = harness._run_load_process(
            procs, spec, mark("start"), mark("end"), limit, module=module
        )
    (b0, p0, load0), (b1, p1, load1) = marks["start"], marks["end"]
    tx = result["tx"] or 1

    def per_tx(start: float | None, end: float | None) -> float | None:
        return round((end - start) / tx * 1e6, 1) if start is not None and end is not None else None

    return {
        "tps": result["tps"],
        "p50_ms": round((result["latency_ms"] or {}).get("p50") or 0, 3),
        "errors": result["errors"],
        "broker_cpu_us_per_tx": per_tx(b0, b1),
        "pg_cpu_us_per_tx": per_tx(p0, p1),
        # The load generator's own CPU (this tree's client library), over the same window.
        "client_cpu_us_per_tx": round(result["loadgen_cpu_s"] / tx * 1e6, 1),
        "load": [round(load0, 2), round(load1, 2)],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base", required=True, type=Path, help="source tree of version A")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=3.0)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--workloads", default="w1,w1light,w2")
    parser.add_argument("--scale", type=int, default=SCALE, help="pgbench scale of the database")
    parser.add_argument("--env", action="append", default=[], help="NAME=VALUE for both brokers")
    parser.add_argument(
        "--env-b", action="append", default=[], help="NAME=VALUE for broker B only (A/B a setting)"
    )
    parser.add_argument(
        "--client-too", action="store_true", help="side A's load uses A's client library"
    )
    args = parser.parse_args(argv)
    env = dict(item.split("=", 1) for item in args.env)
    env_b = env | dict(item.split("=", 1) for item in args.env_b)
    names = args.workloads.split(",")
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {n: {"A": [], "B": []} for n in names}
    procs = Processes()
    with LocalPostgres(max_connections=200) as pg:
        initialise(pgbench_binary(pg.bindir), pg.host, pg.port, pg.user, args.scale)
        url = pg.dsn + "?sslmode=disable"
        assert pg.pid is not None
        brokers = {
            "A": _start_broker(args.base.resolve(), url, env),
            "B": _start_broker(brokerproc.ROOT, url, env_b),
        }
        try:
            for round_no in range(args.rounds):
                order = ("A", "B") if round_no % 2 == 0 else ("B", "A")
                for name in names:
                    workload, clients, think = WORKLOADS[name]
                    for side in order:
                        broker = brokers[side]
                        assert broker.pid is not None
                        spec: Spec | ViewSpec = Spec(
                            competitor="pgbroker", workload=workload, host=broker.host,
                            port=broker.port, clients=clients, duration=args.duration,
                            warmup=args.warmup, think_ms=think, scale=args.scale, timeout=60.0,
                            literal=name == "w1literal",
                            transact=name in TRANSACT,
                        )  # fmt: skip
                        if workload == "w4":
                            spec = ViewSpec(
                                competitor="pgbroker", host=broker.host, port=broker.port,
                                duration=args.duration, warmup=args.warmup, scale=args.scale,
                            )  # fmt: skip
                        client = args.base.resolve() if side == "A" and args.client_too else None
                        row = _one(procs, replace(spec), broker.pid, pg.pid, client)
                        runs[name][side].append(row)
                        print(f"[ab] {name} {side}: {row}", file=sys.stderr, flush=True)
        finally:
            procs.stop_all()
            for broker in brokers.values():
                broker.stop()
                broker.close()
    print(json.dumps({"runs": runs, "summary": _summary(runs)}, indent=1))
    return 0


def _summary(runs: dict[str, dict[str, list[dict[str, Any]]]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, sides in runs.items():
        figures: dict[str, Any] = {}
        for key in (
            "broker_cpu_us_per_tx",
            "pg_cpu_us_per_tx",
            "client_cpu_us_per_tx",
            "tps",
            "p50_ms",
        ):
            a = statistics.median(r[key] for r in sides["A"] if r[key] is not None)
            b = statistics.median(r[key] for r in sides["B"] if r[key] is not None)
            figures[key] = {"A": a, "B": b, "B/A": round(b / a, 3) if a else None}
        out[name] = figures
    return out


if __name__ == "__main__":
    sys.exit(main())
