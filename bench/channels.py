"""New-channel cost A/B: ``python -m bench.channels [--burst 500] [--rounds 3] [--variant ...]``.

W3 in isolation (`bench.load`'s burst: each invocation a new `lambda_client.aio` client, its
own channel, and one W2 transaction), against one or more brokers that differ only in their
environment, interleaved round by round (A, B, A, B, …) so that a shared machine's load
weighs on every variant alike; optionally PgBouncer+asyncpg in the same rounds
(``--pgbouncer``), for the time ratio `make bench` reports.

A variant is ``NAME`` or ``NAME:VAR=VALUE,VAR=VALUE``: the variables go into the environment of
its broker process and of the load processes that drive it (so a client-side switch can be
A/B'd too). Per round and variant it prints the broker's CPU per new channel (user + system
of the broker process over the burst ÷ completed invocations), the time until all were done,
errors and the 1-minute load average; then the medians. ``--profile`` records the first
variant's broker with py-spy during its bursts (collapsed stacks, ``--profile-out``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench import pgbench_runner
from bench.harness import ROLES, _create_roles, _run_burst_processes
from bench.load import Spec
from bench.procs import PgBouncer, Processes, cpu_seconds
from devtools.brokerproc import BrokerProcess
from devtools.localpg import LocalPostgres, free_port


def _variant(text: str) -> tuple[str, dict[str, str]]:
    name, _, assignments = text.partition(":")
    env = dict(part.split("=", 1) for part in assignments.split(",") if part)
    return name, env


class _Environ:
    """Set *env* in this process' environment (inherited by the load processes) for a while."""

    def __init__(self, env: dict[str, str]) -> None:
        self.env = env
        self.saved: dict[str, str | None] = {}

    def __enter__(self) -> None:
        for key, value in self.env.items():
            self.saved[key] = os.environ.get(key)
            os.environ[key] = value

    def __exit__(self, *exc: object) -> None:
        for key, value in self.saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _burst(
    procs: Processes, competitor: str, host: str, port: int, pid: int, clients: int, scale: int
) -> dict[str, Any]:
    spec = Spec(
        competitor=competitor, workload="w3", host=host, port=port, clients=clients,
        think_ms=1.0, scale=scale, timeout=120.0, user="postgres",
    )  # fmt: skip
    cpu: dict[str, float | None] = {}
    load = os.getloadavg()[0]
    result = _run_burst_processes(
        procs,
        spec,
        lambda: cpu.__setitem__("start", cpu_seconds(pid)),
        lambda: cpu.__setitem__("end", cpu_seconds(pid)),
        limit=200,
    )
    used = (cpu["end"] or 0.0) - (cpu["start"] or 0.0)
    done = result["tx"]
    return {
        "cpu_ms_per_channel": round(used / done * 1000, 3) if done else None,
        "elapsed_s": result["elapsed_s"],
        "done": done,
        "errors": result["errors"],
        "error_messages": result["error_messages"],
        "p50_ms": result["latency_ms"].get("p50"),
        "loadavg_1m": round(load, 2),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--burst", type=int, default=500, help="new channels per burst")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--scale", type=int, default=1, help="pgbench scale")
    parser.add_argument("--variant", action="append", default=[], help="NAME[:VAR=V,...]")
    parser.add_argument("--pgbouncer", action="store_true", help="PgBouncer+asyncpg too")
    parser.add_argument("--workers", default="", help="broker --workers")
    parser.add_argument("--profile", action="store_true", help="py-spy the first variant")
    parser.add_argument("--profile-out", type=Path, default=Path("/tmp/pgbroker-channels.txt"))
    parser.add_argument("--json", type=Path, help="write every figure here")
    args = parser.parse_args(argv)
    variants = [_variant(v) for v in args.variant] or [("broker", {})]
    rows: dict[str, list[dict[str, Any]]] = {}
    procs = Processes()
    with contextlib.ExitStack() as stack:
        stack.callback(procs.stop_all)
        pg = stack.enter_context(LocalPostgres(max_connections=200))
        binary = pgbench_runner.pgbench_binary(pg.bindir)
        pgbench_runner.initialise(binary, pg.host, pg.port, "postgres", args.scale)
        _create_roles(pg)
        _create_store_role(pg)
        brokers: dict[str, Any] = {}  # BrokerProcess, or _Floor
        for name, env in variants:
            role = env.pop("BENCH_ROLE", ROLES["pgbroker"])
            url = f"postgresql://{role}@{pg.host}:{pg.port}/{pg.database}?sslmode=disable"
            if env.get("BENCH_SERVER") == "floor":
                brokers[name] = _Floor(procs, env)
                continue
            extra = ("--workers", args.workers) if args.workers else ()
            broker = BrokerProcess(
                url, log_level="INFO", pool_size=20, auth="none", env=env, extra_args=extra
            )
            stack.callback(broker.close)
            stack.callback(broker.stop, 30)
            broker.start()
            if not broker.wait_serving(60):
                raise RuntimeError(f"{name}: not serving\n{broker.log()[-2000:]}")
            brokers[name] = broker
        bouncer = None
        if args.pgbouncer:
            bouncer = PgBouncer(
                procs, pg_host=pg.host, pg_port=pg.port, port=free_port(), pool_size=20,
                server_user=ROLES["pgbouncer+asyncpg"],
            )  # fmt: skip
            stack.callback(bouncer.stop)
            bouncer.start()
        spy = None
        for round_no in range(1, args.rounds + 1):
            for index, (name, env) in enumerate(variants):
                broker = brokers[name]
                assert broker.pid is not None
                if args.profile and index == 0 and spy is None:
                    spy = _start_spy(procs, broker.pid, args.profile_out)
                with _Environ(env):
                    row = _burst(
                        procs, "pgbroker", broker.host, broker.port, broker.pid,
                        args.burst, args.scale,
                    )  # fmt: skip
                if spy is not None:
                    _stop_spy(procs, spy)
                    spy = None
                    args.profile = False
                rows.setdefault(name, []).append(row)
                print(f"round {round_no} {name}: {json.dumps(row)}", file=sys.stderr, flush=True)
            if bouncer is not None:
                row = _burst(
                    procs, "asyncpg", bouncer.host, bouncer.port, bouncer.pid,
                    args.burst, args.scale,
                )  # fmt: skip
                rows.setdefault("pgbouncer+asyncpg", []).append(row)
                print(f"round {round_no} pgbouncer: {json.dumps(row)}", file=sys.stderr)
        for name, broker in brokers.items():
            failures = _failures(broker.log())
            if failures:
                print(f"{name}: broker logged failures {failures}", file=sys.stderr)
    summary = {name: _summary(values) for name, values in rows.items()}
    print(json.dumps(summary, indent=1))
    if args.json:
        args.json.write_text(json.dumps({"rounds": rows, "summary": summary}, indent=1))
    return 0


class _Floor:
    """`bench.floor` (canned Execute) standing in for a broker: host, port, pid."""

    def __init__(self, procs: Processes, env: dict[str, str]) -> None:
        from bench.harness import _read_until
        from bench.procs import ROOT

        argv = [sys.executable, "-m", "bench.floor"]
        proc = procs.start(argv, stdout=subprocess.PIPE, cwd=ROOT, env={**os.environ, **env})
        self.host, self.port = "127.0.0.1", int(_read_until(proc.stdout, "listening")["port"])
        self.pid = proc.pid

    def log(self) -> str:
        return ""


def _create_store_role(pg: LocalPostgres) -> None:
    """``bench_nostore``: the bench's pgbroker role as it was before the key store was granted
    (no CREATE on the database: the broker runs without idempotency keys)."""
    import pg8000.native

    conn = pg8000.native.Connection(
        pg.user, host=pg.host, port=pg.port, database=pg.database, ssl_context=False
    )
    try:
        conn.run("CREATE ROLE bench_nostore LOGIN")
        conn.run("GRANT ALL ON ALL TABLES IN SCHEMA public TO bench_nostore")
    finally:
        conn.close()


def _failures(log: str) -> dict[str, int]:
    """Counts of the broker's "request failed" lines by kind and reason."""
    counts: dict[str, int] = {}
    for line in log.splitlines():
        if "request failed" not in line:
            continue
        with contextlib.suppress(ValueError):
            record = json.loads(line)
            key = f"{record.get('kind')}/{record.get('reason') or record.get('sqlstate')}"
            counts[key] = counts.get(key, 0) + 1
    return counts


def _summary(values: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in ("cpu_ms_per_channel", "elapsed_s", "p50_ms", "loadavg_1m"):
        got = [v[key] for v in values if v[key] is not None]
        if got:
            out[key] = {"median": round(statistics.median(got), 3), "all": got}
    out["errors"] = sum(v["errors"] for v in values)
    return out


def _start_spy(procs: Processes, pid: int, out: Path) -> subprocess.Popen[bytes]:
    spy = str(Path(sys.executable).parent / "py-spy")
    argv = [spy, "record", "-p", str(pid), "-r", "200", "--format", "raw", "-o", str(out)]
    argv += ["--threads", "--gil"]
    proc = procs.start(argv, stderr=subprocess.DEVNULL)
    time.sleep(1.0)  # py-spy attaches
    return proc


def _stop_spy(procs: Processes, proc: subprocess.Popen[bytes]) -> None:
    import signal

    with contextlib.suppress(ProcessLookupError):
        os.kill(proc.pid, signal.SIGINT)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(30)
    procs.forget(proc)


if __name__ == "__main__":
    sys.exit(main())
