"""The benchmark run: one Postgres, PgBouncer and pgbroker side by side, same workloads.

`run_bench(plan)` starts everything itself (a private Postgres, PgBouncer as the ``postgres``
account, the broker, delay proxies), runs every workload against every competitor, stops
every process it started (also on errors and Ctrl-C) and returns the results as a dict
(written as JSON by `bench.report`).

Postgres runs with ``max_connections`` = `Plan.max_connections` (600 for the full run): high
enough that the direct competitor's 500 W2 clients each get a connection (plus PgBouncer's
and the broker's pools of 20 and the monitor), and far below W3's 2000 invocations, which is
the point of that workload: direct connections fail there, poolers queue.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from bench import coldstart, pgbench_runner
from bench.django_view import ViewSpec
from bench.load import Spec
from bench.monitor import Monitor
from bench.procs import ROOT, PgBouncer, Processes, cpu_seconds
from bench.workloads import pgbench_script
from devtools.brokerproc import BrokerProcess
from devtools.certs import self_signed_cert
from devtools.localpg import LocalPostgres, free_port
from devtools.signals import sigterm_as_interrupt
from devtools.tcpproxy import TcpProxy

DIRECT = "direct"
BOUNCER_ASYNCPG = "pgbouncer+asyncpg"
BOUNCER_PGBENCH = "pgbouncer+pgbench"
PGBROKER = "pgbroker"
COMPETITORS = (DIRECT, BOUNCER_ASYNCPG, BOUNCER_PGBENCH, PGBROKER)
# W4 only (bench/django_view.py): a Django view on the stock postgresql backend (psycopg)
# through PgBouncer, against the same view on lambda_client.django through pgbroker.
BOUNCER_PSYCOPG = "pgbouncer+psycopg"
# The broker's gRPC stack with a canned Execute and no Postgres (bench/floor.py): W1 only, and
# reported apart from `COMPETITORS` ("floor" in the JSON) as the broker's CPU-per-request floor.
FLOOR = "floor"
# The same stack answering W1 from Postgres with a minimal round trip
# (bench/pgfloor.py): what any broker on this stack pays to answer from Postgres, before its
# own work. Run and reported beside the floor ("floor_postgres" in the JSON).
FLOOR_PG = "floor+postgres"
FLOORS = (FLOOR, FLOOR_PG)
# The Postgres role each competitor's server connections log in as, so backends are counted
# per competitor (another pooler's idle pool does not count).
ROLES = {
    DIRECT: "bench_direct",
    BOUNCER_ASYNCPG: "bench_pgbouncer",
    BOUNCER_PGBENCH: "bench_pgbouncer",
    BOUNCER_PSYCOPG: "bench_pgbouncer",
    PGBROKER: "bench_pgbroker",
    FLOOR: "bench_floor",  # the floor opens no backend
    FLOOR_PG: "bench_floor_pg",
}


@dataclass(frozen=True)
class Plan:
    """Sizes and durations of one benchmark mode."""

    mode: str
    scale: int
    duration: float  # measured seconds per steady run
    warmup: float
    w1_clients: int
    w2_clients: int
    w3_invocations: int
    cold_samples: int
    think_ms: float = 1.0
    latency_ms: float = 0.5  # one-way delay added on the client <-> pooler hop
    variants: bool = True  # W2 at think 0 and the added-latency runs
    pool_size: int = 20
    max_connections: int = 600
    burst_timeout: float = 90.0
    pgbroker_asyncio: bool = True  # drive pgbroker with lambda_client.aio (else threads)
    rounds: int = 1  # steady cases run this many times, interleaved; the best round is kept
    light_clients: int = 1  # W1 "light": one client, so latency is the path, not a queue
    django_view: bool = True  # W4: a Django view of 10 ORM queries, one client
    # W4's measured seconds at least (a request takes milliseconds: few samples otherwise).
    view_duration: float = 3.0


PLANS = {
    "full": Plan("full", scale=10, duration=5, warmup=1.5, w1_clients=200, w2_clients=500,
                 w3_invocations=2000, cold_samples=10, rounds=2),
    "quick": Plan("quick", scale=1, duration=1.5, warmup=0.5, w1_clients=200, w2_clients=500,
                  w3_invocations=500, cold_samples=3, variants=False, max_connections=600,
                  burst_timeout=30),
    # tiny: W3's burst must outlast a few of the monitor's 50 ms samples, or a sample can
    # miss the short-lived direct connections entirely (peak backends 0). Its 40 direct
    # connections must all fit beside PgBouncer's and the broker's open pools (20 + 20).
    # A 1 s window: a 0.3 s one saw no W2 transaction complete on a machine running 7x slow.
    "tiny": Plan("tiny", scale=1, duration=1.0, warmup=0.2, w1_clients=4, w2_clients=4,
                 w3_invocations=40, cold_samples=1, variants=False, max_connections=120,
                 burst_timeout=20, rounds=2, view_duration=1.0),
}  # fmt: skip


# The W2 variant pgbroker runs through Transact (db.begin()) instead of one batch.
TRANSACT = "transact"


@dataclass
class Case:
    """One row of results: a workload variant against one competitor."""

    workload: str  # W1 | W2 | W3 | W4
    variant: str  # base | light | think0 | +latency | transact | view
    competitor: str
    clients: int
    think_ms: float
    added_latency_ms: float


def _log(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


class Bench:
    """Owns every process and proxy of one run; `close()` stops them all."""

    def __init__(self, plan: Plan, *, with_pgbroker: bool = True) -> None:
        self.plan = plan
        self.procs = Processes()
        self.stack = contextlib.ExitStack()
        self.with_pgbroker = with_pgbroker
        self.pg: LocalPostgres | None = None
        self.bouncer: PgBouncer | None = None
        self.broker: BrokerProcess | None = None
        self.floors: dict[str, tuple[int, int]] = {}  # each floor server's (pid, port)
        self.monitor: Monitor | None = None
        self.proxies: dict[str, TcpProxy] = {}
        self.pgbench = ""
        self.skipped: dict[str, str] = {}

    # -- setup ----------------------------------------------------------------------------

    def start(self) -> None:
        plan = self.plan
        self.stack.callback(self.procs.stop_all)
        certdir = Path(tempfile.mkdtemp(prefix="pgbroker-bench-tls-"))
        self.stack.callback(_rmtree, certdir)
        cert = self_signed_cert(certdir)
        _log(f"starting Postgres (max_connections={plan.max_connections})")
        self.pg = LocalPostgres(max_connections=plan.max_connections, ssl=cert)
        self.stack.callback(self.pg.stop)
        self.pg.start()
        self.pgbench = pgbench_runner.pgbench_binary(self.pg.bindir)
        _log(f"pgbench -i scale {plan.scale}")
        pgbench_runner.initialise(self.pgbench, self.pg.host, self.pg.port, "postgres", plan.scale)
        _create_roles(self.pg)
        _log("starting PgBouncer (transaction mode)")
        self.bouncer = PgBouncer(
            self.procs, pg_host=self.pg.host, pg_port=self.pg.port, port=free_port(),
            pool_size=plan.pool_size, server_user=ROLES[BOUNCER_ASYNCPG],
        )  # fmt: skip
        self.stack.callback(self.bouncer.stop)
        self.bouncer.start()
        if self.with_pgbroker:
            self._start_broker()
            self._start_floors()
        else:
            self.skipped[PGBROKER] = "left out (--no-pgbroker)"
            for name in FLOORS:
                self.skipped[name] = "left out (--no-pgbroker)"
        self.monitor = Monitor(self.pg.host, self.pg.port, "postgres", "postgres")
        self.stack.callback(self.monitor.close)
        if plan.variants:
            self._start_proxies()

    def _start_broker(self) -> None:
        assert self.pg is not None
        reason = _broker_missing()
        if reason:
            self.skipped[PGBROKER] = reason
            _log(f"pgbroker skipped: {reason}")
            return
        _log("starting the broker")
        pg = self.pg
        url = f"postgresql://{ROLES[PGBROKER]}@{pg.host}:{pg.port}/{pg.database}?sslmode=disable"
        # The broker's default worker count (one per CPU the machine gives it), which is what
        # the targets are about; BENCH_BROKER_WORKERS=N runs it with --workers N.
        workers = os.environ.get("BENCH_BROKER_WORKERS", "")
        broker = BrokerProcess(
            url,
            log_level="INFO",
            start_timeout=60,
            pool_size=self.plan.pool_size,
            auth="none",
            extra_args=("--workers", workers) if workers else (),
        )
        self.stack.callback(broker.close)  # removes its log; runs after the stop below
        self.stack.callback(broker.stop, 30)  # a loaded broker may need long to drain
        try:
            broker.start()
            if not broker.wait_serving(60):
                raise RuntimeError(f"pool not filled within 60 s\n{broker.log()[-3000:]}")
        except RuntimeError as exc:
            self.skipped[PGBROKER] = f"broker did not start: {str(exc)[-300:]}"
            _log(self.skipped[PGBROKER])
            broker.stop(timeout=30)
            return
        self.broker = broker

    def _start_floors(self) -> None:
        """Start `bench.floor` (the broker's stack, canned replies) and `bench.pgfloor` (the
        same, answering from Postgres) and read their ports."""
        if self.broker is None:
            for name in FLOORS:
                self.skipped[name] = "no broker to compare with"
            return
        assert self.pg is not None
        pg = self.pg
        url = f"postgresql://{ROLES[FLOOR_PG]}@{pg.host}:{pg.port}/{pg.database}"
        argvs = {
            FLOOR: ["bench.floor"],
            FLOOR_PG: ["bench.pgfloor", "--dsn", url, "--pool-size", str(self.plan.pool_size)],
        }
        for name, argv in argvs.items():
            _log(f"starting the {name} competitor ({argv[0]})")
            proc = self.procs.start([sys.executable, "-m", *argv], stdout=subprocess.PIPE, cwd=ROOT)
            try:
                event = _read_until(proc.stdout, "listening")
            except (RuntimeError, ValueError) as exc:
                self.procs.stop(proc)
                self.skipped[name] = f"{name} server did not start: {exc}"
                _log(self.skipped[name])
                continue
            self.floors[name] = (proc.pid, int(event["port"]))

    def _start_proxies(self) -> None:
        delay = self.plan.latency_ms / 1000
        assert self.bouncer is not None
        targets = {"pgbouncer": (self.bouncer.host, self.bouncer.port)}
        if self.broker is not None:
            targets["pgbroker"] = (self.broker.host, self.broker.port)
        for name, target in targets.items():
            proxy = TcpProxy(target, delay=delay)
            self.stack.callback(proxy.stop)
            self.proxies[name] = proxy.start()

    def close(self) -> None:
        """Stop load generators first, then proxies, poolers and Postgres (reverse order)."""
        self.procs.stop_all()
        self.stack.close()

    # -- runs -----------------------------------------------------------------------------

    def cases(self) -> Iterator[Case]:
        plan = self.plan
        for workload, clients in (("W1", plan.w1_clients), ("W2", plan.w2_clients)):
            think = plan.think_ms if workload == "W2" else 0.0
            for competitor in COMPETITORS:
                yield Case(workload, "base", competitor, clients, think, 0.0)
            if workload == "W1":
                for floor in FLOORS:
                    yield Case(workload, "base", floor, clients, think, 0.0)
            if workload == "W2":
                # The same transfer through Transact: the lease held across the think times,
                # as PgBouncer holds a server connection (ratios against W2 base's rows).
                yield Case(workload, TRANSACT, PGBROKER, clients, think, 0.0)
            if plan.variants and workload == "W1":
                # Per-request latency without queueing: closed loops of 200 measure mostly
                # throughput (Little's law), a few clients measure the path itself.
                for competitor in (*COMPETITORS, *FLOORS):
                    yield Case(workload, "light", competitor, plan.light_clients, 0.0, 0.0)
            if plan.variants and workload == "W2":
                for competitor in COMPETITORS:
                    yield Case(workload, "think0", competitor, clients, 0.0, 0.0)
            if plan.variants:
                for competitor in (BOUNCER_ASYNCPG, BOUNCER_PGBENCH, PGBROKER):
                    yield Case(workload, "+latency", competitor, clients, think, plan.latency_ms)
        if plan.django_view:
            # One client: the latency of the view is the path (10 round trips), not a queue.
            for competitor in (PGBROKER, BOUNCER_PSYCOPG):
                yield Case("W4", "view", competitor, 1, 0.0, 0.0)
        for competitor in (DIRECT, BOUNCER_ASYNCPG, PGBROKER):
            yield Case("W3", "burst", competitor, plan.w3_invocations, plan.think_ms, 0.0)

    def run_case(
        self, case: Case, hooks: tuple[Callable[[], None], Callable[[], None]] | None = None
    ) -> dict[str, Any]:
        """Run *case* and return its row; *hooks* are called at the measured window's start
        and end (the profiler uses them)."""
        row: dict[str, Any] = asdict(case)
        if case.competitor in self.skipped:
            return {**row, "skipped": self.skipped[case.competitor]}
        host, port, pooler_pid = self._endpoint(case)
        assert self.monitor is not None
        self.monitor.begin(pooler_pid, ROLES[case.competitor])
        cpu: dict[str, float | None] = {}

        def mark(name: str) -> Callable[[], None]:
            def hook() -> None:
                cpu[name] = cpu_seconds(pooler_pid) if pooler_pid else None
                if hooks is not None:
                    hooks[0 if name == "start" else 1]()

            return hook

        try:
            if case.competitor == BOUNCER_PGBENCH:
                result = self._run_pgbench(case, host, port, mark("start"), mark("end"))
            elif case.workload == "W4":
                result = self._run_django_view(case, host, port, mark("start"), mark("end"))
            else:
                result = self._run_load(case, host, port, mark("start"), mark("end"))
        except Exception as exc:
            result = {"tx": 0, "tps": 0.0, "errors": 1, "error_messages": {str(exc)[-300:]: 1}}
        peak_backends, peak_rss = self.monitor.end()
        result.pop("spec", None)
        row.update(result)
        row["peak_backends"] = peak_backends
        row["pooler"] = self._pooler_figures(case, cpu, result, peak_rss)
        return row

    def _endpoint(self, case: Case) -> tuple[str, int, int | None]:
        assert self.pg is not None and self.bouncer is not None
        if case.competitor == DIRECT:
            return self.pg.host, self.pg.port, None
        if case.competitor in FLOORS:
            floor_pid, floor_port = self.floors[case.competitor]
            return "127.0.0.1", floor_port, floor_pid
        if case.competitor == PGBROKER:
            assert self.broker is not None
            name, host, port, pid = "pgbroker", self.broker.host, self.broker.port, self.broker.pid
        else:
            name, host, port = "pgbouncer", self.bouncer.host, self.bouncer.port
            pid = self.bouncer.pid
        if case.added_latency_ms:
            proxy = self.proxies[name]
            host, port = proxy.host, proxy.port
        return host, port, pid

    def _pooler_figures(
        self, case: Case, cpu: dict[str, float | None], result: dict[str, Any], rss: int | None
    ) -> dict[str, Any] | None:
        if case.competitor == DIRECT:
            return None
        start, end = cpu.get("start"), cpu.get("end")
        used = end - start if start is not None and end is not None else None
        # pgbench has no measured window of its own: its figures cover the whole run.
        tx = result.get("tx_total" if case.competitor == BOUNCER_PGBENCH else "tx", 0)
        if case.workload == "W3":
            tx = result.get("tx", 0)
        per_1000 = round(used / tx * 1000, 3) if used is not None and tx else None
        names = {PGBROKER: "pgbroker", FLOOR: "floor", FLOOR_PG: "floor+postgres"}
        return {
            "name": names.get(case.competitor, "pgbouncer"),
            "cpu_s": round(used, 3) if used is not None else None,
            "cpu_s_per_1000_tx": per_1000,
            "peak_rss_mb": round(rss / 2**20, 1) if rss else None,
        }

    def _run_load(
        self, case: Case, host: str, port: int, on_start: Callable[[], None],
        on_end: Callable[[], None],
    ) -> dict[str, Any]:  # fmt: skip
        plan = self.plan
        # The floors speak the Broker protocol: the same client as pgbroker drives them.
        competitor = {
            DIRECT: "direct", BOUNCER_ASYNCPG: "asyncpg", PGBROKER: "pgbroker",
            FLOOR: "pgbroker", FLOOR_PG: "pgbroker",
        }  # fmt: skip
        spec = Spec(
            competitor=competitor[case.competitor], workload=case.workload.lower(),
            host=host, port=port, clients=case.clients, duration=plan.duration,
            warmup=plan.warmup, think_ms=case.think_ms, scale=plan.scale,
            timeout=plan.burst_timeout if case.workload == "W3" else 60.0,
            user=ROLES[DIRECT] if case.competitor == DIRECT else "postgres",
            asyncio=plan.pgbroker_asyncio, transact=case.variant == TRANSACT,
        )  # fmt: skip
        limit = plan.warmup + plan.duration + spec.timeout + 60
        if case.workload == "W3":
            return _run_burst_processes(self.procs, spec, on_start, on_end, limit)
        return _run_load_process(self.procs, spec, on_start, on_end, limit)

    def _run_django_view(
        self, case: Case, host: str, port: int, on_start: Callable[[], None],
        on_end: Callable[[], None],
    ) -> dict[str, Any]:  # fmt: skip
        plan = self.plan
        spec = ViewSpec(
            competitor="pgbroker" if case.competitor == PGBROKER else "psycopg",
            host=host, port=port, duration=max(plan.duration, plan.view_duration),
            warmup=max(plan.warmup, plan.view_duration / 3), scale=plan.scale,
        )  # fmt: skip
        limit = spec.warmup + spec.duration + 120
        return _run_load_process(
            self.procs, spec, on_start, on_end, limit, module="bench.django_view"
        )

    def _run_pgbench(
        self, case: Case, host: str, port: int, on_start: Callable[[], None],
        on_end: Callable[[], None],
    ) -> dict[str, Any]:  # fmt: skip
        plan = self.plan
        run = pgbench_runner.PgbenchRun(
            binary=self.pgbench, host=host, port=port, user="postgres", scale=plan.scale,
            clients=case.clients, duration=plan.duration, warmup=plan.warmup,
            script=pgbench_script(case.workload.lower(), case.think_ms),
        )  # fmt: skip
        return pgbench_runner.run(self.procs, run, on_start, on_end)

    def cold_starts(self) -> list[dict[str, Any]]:
        assert self.pg is not None
        samples = self.plan.cold_samples
        results = [coldstart.measure(DIRECT, [self.pg.host, str(self.pg.port)], samples)]
        if self.broker is not None:
            results.append(coldstart.measure(PGBROKER, [self.broker.target], samples))
        else:
            results.append({"competitor": PGBROKER, "skipped": self.skipped.get(PGBROKER)})
        return results


def _run_load_process(
    procs: Processes,
    spec: Spec | ViewSpec,
    on_start: Callable[[], None],
    on_end: Callable[[], None],
    limit: float,
    module: str = "bench.load",
) -> dict[str, Any]:
    """Run *module* (`bench.load`, or `bench.django_view` for W4) in a fresh process, calling
    the hooks on its window markers."""
    argv = [sys.executable, "-m", module, json.dumps(asdict(spec))]
    proc = procs.start(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT)
    watchdog = threading.Timer(limit, lambda: procs.stop(proc, timeout=2))
    watchdog.start()
    result: dict[str, Any] | None = None
    try:
        assert proc.stdout is not None and proc.stderr is not None
        for line in proc.stdout:
            event = json.loads(line)
            if event["event"] == "measure_start":
                on_start()
            elif event["event"] == "measure_end":
                on_end()
            elif event["event"] == "result":
                result = event
        stderr = proc.stderr.read().decode(errors="replace")
        proc.wait(30)
    finally:
        watchdog.cancel()
        procs.stop(proc)
    if result is None:
        raise RuntimeError(f"load generator failed ({proc.returncode}): {stderr.strip()[-500:]}")
    result.pop("event", None)
    return result


# One load process per this many burst invocations: a single Python process cannot open
# 2000 connections at once (GIL), which would turn the burst into a trickle.
BURST_PER_PROCESS = 250


def _run_burst_processes(
    procs: Processes,
    spec: Spec,
    on_start: Callable[[], None],
    on_end: Callable[[], None],
    limit: float,
) -> dict[str, Any]:
    """Split a W3 burst over several `bench.load` processes released together; merge."""
    count = max(1, -(-spec.clients // BURST_PER_PROCESS))
    shares = [spec.clients // count + (1 if i < spec.clients % count else 0) for i in range(count)]
    with contextlib.ExitStack() as stack:
        children: list[tuple[subprocess.Popen[bytes], Any]] = []
        first = 0
        for share in shares:
            child = replace(spec, clients=share, wait_for_go=True, first_index=first)
            first += share
            argv = [sys.executable, "-m", "bench.load", json.dumps(asdict(child))]
            err = stack.enter_context(tempfile.TemporaryFile())
            proc = procs.start(
                argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err.fileno(), cwd=ROOT
            )
            stack.callback(procs.stop, proc)
            children.append((proc, err))

        def stop_children() -> None:
            for proc, _ in children:
                procs.stop(proc, timeout=2)

        watchdog = threading.Timer(limit, stop_children)
        watchdog.start()
        stack.callback(watchdog.cancel)
        results = _release_burst(children, on_start, on_end)
    return _merge_bursts(spec, results)


def _release_burst(
    children: list[tuple[subprocess.Popen[bytes], Any]],
    on_start: Callable[[], None],
    on_end: Callable[[], None],
) -> list[dict[str, Any]]:
    """Wait until every child is ready, release them together, collect their results."""
    try:
        for proc, _ in children:
            _read_until(proc.stdout, "ready")
        on_start()
        for proc, _ in children:
            assert proc.stdin is not None
            proc.stdin.write(b"go\n")
            proc.stdin.flush()
        results = [_read_until(proc.stdout, "result") for proc, _ in children]
        on_end()
        return results
    except RuntimeError as exc:
        messages = []
        for proc, err in children:
            proc.kill()
            proc.wait(5)
            err.seek(0)
            messages.append(err.read().decode(errors="replace").strip()[-300:])
        raise RuntimeError(f"{exc}: {' | '.join(m for m in messages if m)}") from exc


def _read_until(stream: Any, wanted: str) -> dict[str, Any]:
    for line in stream:
        event: dict[str, Any] = json.loads(line)
        if event["event"] == wanted:
            return event
    raise RuntimeError(f"load generator exited before {wanted!r}")


def _merge_bursts(spec: Spec, results: list[dict[str, Any]]) -> dict[str, Any]:
    from bench.load import _percentiles

    latencies = [x for r in results for x in r.get("latencies_s", [])]
    errors: dict[str, int] = {}
    for r in results:
        for message, n in r["error_messages"].items():
            errors[message] = errors.get(message, 0) + n
    elapsed = max(r["elapsed_s"] for r in results)
    cpu = sum(r["loadgen_cpu_s"] for r in results)
    return {
        "tx": sum(r["tx"] for r in results),
        "tx_total": sum(r["tx_total"] for r in results),
        "tps": round(sum(r["tx"] for r in results) / elapsed, 1) if elapsed else 0.0,
        "latency_ms": _percentiles(latencies),
        "errors": sum(r["errors"] for r in results),
        "error_messages": dict(sorted(errors.items(), key=lambda kv: -kv[1])[:10]),
        "elapsed_s": elapsed,
        "loadgen_cpu_s": round(cpu, 3),
        "loadgen_cpu_util": round(cpu / elapsed, 3) if elapsed else None,
        "invocations": spec.clients,
        "load_processes": len(results),
    }


def _create_roles(pg: LocalPostgres) -> None:
    """One login role per competitor, with the rights pgbench's workload needs."""
    import pg8000.native

    conn = pg8000.native.Connection(
        pg.user, host=pg.host, port=pg.port, database=pg.database, ssl_context=False
    )
    try:
        for role in sorted(set(ROLES.values())):
            conn.run(f"CREATE ROLE {role} LOGIN")
            conn.run(f"GRANT ALL ON ALL TABLES IN SCHEMA public TO {role}")
        # The broker creates its idempotency-key store (schema pgbroker) on its first
        # connection, as in a deployment whose role may; without CREATE it would run with
        # keys off and refuse each new client's first keyed call (IDEMPOTENCY_UNAVAILABLE).
        conn.run(f"GRANT CREATE ON DATABASE {pg.database} TO {ROLES[PGBROKER]}")
    finally:
        conn.close()


def _broker_missing() -> str | None:
    """Why pgbroker cannot be benchmarked yet, or None when broker and client are there."""
    try:
        from lambda_client import BrokerClient  # noqa: F401
    except ImportError as exc:
        return f"lambda_client.BrokerClient not importable: {exc}"
    return None


def _rmtree(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


def _run_rounds(bench: Bench, cases: list[Case]) -> list[dict[str, Any]]:
    """Run the steady cases `Plan.rounds` times, interleaved (every case once per round), and
    keep each case's best round: on a shared machine the best round is the one least
    disturbed by other work. Bursts (W3) run once, after the steady cases."""
    steady = [c for c in cases if c.workload != "W3"]
    best: dict[int, dict[str, Any]] = {}
    tps: dict[int, list[float]] = {}
    for round_no in range(1, bench.plan.rounds + 1):
        for index, case in enumerate(steady):
            _log(
                f"{case.workload} {case.variant:9} {case.competitor} ({case.clients})"
                f" round {round_no}/{bench.plan.rounds}"
            )
            row = bench.run_case(case)
            tps.setdefault(index, []).append(row.get("tps") or 0.0)
            if index not in best or (row.get("tps") or 0.0) > (best[index].get("tps") or 0.0):
                best[index] = row
    rows = []
    for index in range(len(steady)):
        rows.append({**best[index], "rounds_tps": tps[index]})
    for case in cases:
        if case.workload == "W3":
            _log(f"{case.workload} {case.variant:9} {case.competitor} ({case.clients})")
            rows.append(bench.run_case(case))
    return rows


def _selected(case: Case, only: set[str]) -> bool:
    """*only* names workloads (W1, W2, W3, W4) and/or competitors; empty means everything."""
    if not only:
        return True
    workloads = {o.upper() for o in only if o.upper() in ("W1", "W2", "W3", "W4")}
    competitors = {o for o in only if o in (*COMPETITORS, BOUNCER_PSYCOPG, *FLOORS)}
    if PGBROKER in competitors:
        competitors.update(FLOORS)  # pgbroker's CPU is read against its floors
    return (not workloads or case.workload in workloads) and (
        not competitors or case.competitor in competitors
    )


def run_bench(
    plan: Plan, *, with_pgbroker: bool = True, only: set[str] | None = None
) -> dict[str, Any]:
    """Start everything, run every case (or those *only* selects) and the cold starts, stop
    everything; see the module docstring."""
    started = dt.datetime.now(dt.UTC)
    bench = Bench(plan, with_pgbroker=with_pgbroker)
    load_before = os.getloadavg()
    with sigterm_as_interrupt():
        try:
            bench.start()
            cases = [c for c in bench.cases() if _selected(c, only or set())]
            rows = _run_rounds(bench, cases)
            floor = [row for row in rows if row["competitor"] == FLOOR]
            floor_pg = [row for row in rows if row["competitor"] == FLOOR_PG]
            rows = [row for row in rows if row["competitor"] not in FLOORS]
            _log("cold starts")
            cold = bench.cold_starts()
        finally:
            bench.close()
    return {
        "meta": {
            "started": started.isoformat(timespec="seconds"),
            "duration_s": round((dt.datetime.now(dt.UTC) - started).total_seconds(), 1),
            "plan": asdict(plan),
            "machine": {
                "cpus": os.cpu_count(),
                "python": platform.python_version(),
                "platform": platform.platform(),
                # Other work on the machine skews absolute numbers; a load average above
                # the core count means the benchmark shared its CPUs.
                "loadavg_1m_before": round(load_before[0], 2),
                "loadavg_1m_after": round(os.getloadavg()[0], 2),
            },
            "skipped": bench.skipped,
            "only": sorted(only or ()),
        },
        "results": rows,
        "floor": floor,
        "floor_postgres": floor_pg,
        "cpu_multiples": cpu_multiples(rows, floor, floor_pg),
        "cold_start": cold,
    }


def cpu_multiples(
    results: list[dict[str, Any]],
    floor: list[dict[str, Any]],
    floor_pg: list[dict[str, Any]] | None = None,
) -> list[dict[str, Any]]:
    """Per W1 variant with a floor row: pooler CPU per 1,000 requests of pgbroker, of the
    floors and of PgBouncer (asyncpg), and pgbroker's as a multiple of each.

    Also each floor's own CPU, tx/s and p50 as multiples of PgBouncer's: a broker that did no
    work at all (the floor), or nothing but the round trip to Postgres (the floor with
    Postgres), would stand there, so a target past them cannot be met on this stack."""
    rows = {(r["workload"], r["variant"], r["competitor"]): r for r in results}
    with_pg = {(r["workload"], r["variant"]): r for r in floor_pg or ()}
    out = []
    for base in floor:
        key = (base["workload"], base["variant"])
        bouncer = rows.get((*key, BOUNCER_ASYNCPG))
        postgres = with_pg.get(key)
        figures = {
            PGBROKER: cpu_per_1000(rows.get((*key, PGBROKER))),
            FLOOR: cpu_per_1000(base),
            FLOOR_PG: cpu_per_1000(postgres),
            BOUNCER_ASYNCPG: cpu_per_1000(bouncer),
        }
        broker = figures[PGBROKER]
        out.append({
            "workload": key[0], "variant": key[1],
            "cpu_s_per_1000_tx": figures,
            "pgbroker_x_floor": _multiple(broker, figures[FLOOR]),
            "pgbroker_x_floor_postgres": _multiple(broker, figures[FLOOR_PG]),
            "pgbroker_x_pgbouncer": _multiple(broker, figures[BOUNCER_ASYNCPG]),
            "floor_postgres_x_floor": _multiple(figures[FLOOR_PG], figures[FLOOR]),
            "floor_x_pgbouncer": _against(base, bouncer),
            "floor_postgres_x_pgbouncer": _against(postgres, bouncer),
        })  # fmt: skip
    return out


def _against(row: dict[str, Any] | None, bouncer: dict[str, Any] | None) -> dict[str, Any]:
    """*row*'s pooler CPU per request, tx/s and p50 as multiples of PgBouncer's (*bouncer*)."""
    return {
        "cpu": _multiple(cpu_per_1000(row), cpu_per_1000(bouncer)),
        "tps": _multiple(_figure(row, "tps"), _figure(bouncer, "tps")),
        "p50": _multiple(latency_ms(row, "p50"), latency_ms(bouncer, "p50")),
    }


def _figure(row: dict[str, Any] | None, name: str) -> Any:
    """*row*'s *name*; None for a missing or skipped row."""
    return None if not row or row.get("skipped") else row.get(name)


def latency_ms(row: dict[str, Any] | None, name: str) -> float | None:
    """*row*'s latency percentile *name* (``"p50"``, …) in ms; None when it has none."""
    value = (_figure(row, "latency_ms") or {}).get(name)
    return float(value) if value is not None else None


def cpu_per_1000(row: dict[str, Any] | None) -> float | None:
    """*row*'s pooler CPU seconds per 1,000 requests; None when it has none."""
    value = (_figure(row, "pooler") or {}).get("cpu_s_per_1000_tx")
    return float(value) if value is not None else None


def _multiple(a: float | None, b: float | None) -> float | None:
    return round(a / b, 2) if a and b else None


def with_overrides(plan: Plan, **changes: Any) -> Plan:
    return replace(plan, **{k: v for k, v in changes.items() if v is not None})
