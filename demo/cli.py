"""``python -m demo`` (``make demo``): a burst of Lambda invocations, direct and via pgbroker.

Phase 1 runs N concurrent invocations of the example handler, each container with its own
Postgres connection kept open like a warm Lambda's: past ``max_connections`` they fail with
Postgres' own errors. Phase 2 runs the same N through a broker with a pool of 20: every one
succeeds and Postgres never sees more than the pool. Exit status 0 iff phase 2 had no failure.

With ``--django`` (``make demo DJANGO=1``) the two phases run the Django example instead
(``examples/django_lambda``, served by Zappa's handler from API Gateway events): first with
Django's stock postgresql backend (psycopg) straight to Postgres, then with
``ENGINE: lambda_client.django`` through the broker.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from demo.burst import Burst, Invocation
from demo.database import DemoDatabase, connect
from demo.direct import DirectClient
from demo.invocations import BrokerInvocation, ContainerLocal, DirectInvocation, bind_handler
from demo.report import PhaseResult, print_table, write_chart
from devtools.brokerproc import BrokerProcess
from devtools.pgmonitor import BackendMonitor
from devtools.signals import sigterm_as_interrupt
from examples import handler as example
from lambda_client import BrokerClient

__all__ = ["main", "parse_args"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m demo",
        description="A burst of concurrent Lambda invocations against Postgres: first with a "
        "connection each, then through pgbroker.",
    )
    parser.add_argument(
        "--invocations",
        "-n",
        type=int,
        default=1000,
        help="concurrent invocations per phase (default 1000)",
    )
    parser.add_argument(
        "--pool-size", type=int, default=20, help="the broker's Postgres connections (default 20)"
    )
    parser.add_argument(
        "--max-connections",
        type=int,
        default=100,
        help="max_connections of the embedded Postgres (default 100, "
        "Postgres' own default); ignored with --database-url",
    )
    parser.add_argument(
        "--database-url",
        default=os.environ.get("PGBROKER_DATABASE_URL"),
        help="run against this Postgres instead of an embedded one (default "
        "PGBROKER_DATABASE_URL); it gets the example's tables",
    )
    parser.add_argument(
        "--django",
        action="store_true",
        help="run the Django example (Zappa's handler, stock backend, then lambda_client.django)",
    )
    parser.add_argument(
        "--json",
        action="store_true",
        help="print a machine-readable summary on stdout (the rest on stderr)",
    )
    parser.add_argument(
        "--chart",
        type=Path,
        default=None,
        help="where to write the PNG chart (default demo-output/pgbroker-demo.png)",
    )
    args = parser.parse_args(argv)
    if args.invocations < 1 or args.pool_size < 1 or args.max_connections < 5:
        parser.error("--invocations and --pool-size must be >= 1, --max-connections >= 5")
    return args


def default_chart_path() -> Path:
    """``demo-output/pgbroker-demo.png`` under the working directory, or a temp dir if that
    directory cannot be written."""
    out = Path("demo-output")
    try:
        out.mkdir(exist_ok=True)
        if os.access(out, os.W_OK):
            return out.resolve() / "pgbroker-demo.png"
    except OSError:
        pass
    return Path(tempfile.mkdtemp(prefix="pgbroker-demo-")) / "pgbroker-demo.png"


def raise_open_files_limit(wanted: int) -> None:
    """Raise the soft open-files limit toward *wanted* (each container holds a socket, and
    the broker child inherits the limit); keep the hard limit, ignore refusals."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    raise_open_files_limit(2 * args.invocations + 256)
    console = Console(stderr=args.json)
    try:
        with sigterm_as_interrupt():
            summary = run(args, console)
    except KeyboardInterrupt:
        console.print("[yellow]interrupted: broker and Postgres stopped, temporary data removed")
        return 130
    except Exception as exc:
        console.print(f"[red]demo failed:[/] {type(exc).__name__}: {exc}", highlight=False)
        console.print("broker and Postgres stopped, temporary data removed")
        return 1
    if args.json:
        print(json.dumps(summary, indent=2))
    return 0 if summary["ok"] else 1


def run(args: argparse.Namespace, console: Console) -> dict[str, Any]:
    """Both phases, the table and the chart; every process it starts is stopped on return."""
    with contextlib.ExitStack() as stack:
        console.rule("[bold]pgbroker demo")
        with console.status("starting Postgres ..."):
            database = stack.enter_context(
                DemoDatabase(args.database_url, max_connections=args.max_connections)
            )
        console.print(
            f"Postgres: {database.describe()}, max_connections={database.max_connections}"
        )
        schema_client = DirectClient(database.app_dsn, application_name="pgbroker-demo-setup")
        try:
            example.create_schema(schema_client)  # type: ignore[arg-type]
        finally:
            schema_client.close()
        # Superuser, opened before the burst: it keeps a reserved slot when the application
        # role has none left. The role, not application_name (the broker may set it per
        # request), marks the burst's connections in phase 1 and the broker's pool in phase 2.
        monitor = BackendMonitor(
            lambda: connect(database.admin_dsn, application_name="pgbroker-demo-monitor"),
            role=database.app_user,
        ).start()
        stack.callback(monitor.stop)
        limits = {"max_connections": database.max_connections, "pool_size": args.pool_size}
        local = stack.enter_context(bind_handler())

        if args.django:
            direct, brokered = _django_phases(args, console, database, monitor)
        else:
            direct = _direct_phase(args, console, database, monitor, local)
            brokered = _broker_phase(args, console, database, monitor, local)
        phases = [direct, brokered]

        console.rule("[bold]result")
        print_table(console, phases, limits)
        chart = write_chart(args.chart or default_chart_path(), phases, limits)
        console.print(f"chart: [bold]{chart}[/]")
        ok = brokered.burst.failed == 0
        verdict = (
            "[green]every invocation through pgbroker succeeded"
            if ok
            else (f"[red]{brokered.burst.failed} invocations through pgbroker failed")
        )
        console.print(verdict)
        return {
            "ok": ok,
            "database": "embedded" if database.embedded else "url",
            "data_dir": database.data_dir,
            "invocations": args.invocations,
            "app": "django" if args.django else "handler",
            "pool_size": args.pool_size,
            "max_connections": database.max_connections,
            "monitor_errors": monitor.errors,
            "chart": str(chart),
            "phases": {p.name: p.summary() for p in phases},
        }


def _direct_phase(
    args: argparse.Namespace,
    console: Console,
    database: DemoDatabase,
    monitor: BackendMonitor,
    local: ContainerLocal,
) -> PhaseResult:
    title = "direct"
    console.rule("[bold]phase 1: direct, a pg8000 connection per Lambda container")
    console.print(
        f"{args.invocations} invocations at once, each container with its own "
        "Postgres connection, kept open as a warm Lambda keeps it"
    )
    began = time.monotonic()
    burst = _run_burst(
        console,
        "phase 1",
        monitor,
        args.invocations,
        lambda i: DirectInvocation(i, local, database.app_dsn),
    )
    # Warm containers are gone now; wait until Postgres has let go of their backends.
    monitor.wait_for(lambda s: s.role_backends == 0, timeout=15)
    ended = time.monotonic()
    return _phase_result(
        "direct", title, burst, monitor, (began, ended), "release → connection open"
    )


def _broker_phase(
    args: argparse.Namespace,
    console: Console,
    database: DemoDatabase,
    monitor: BackendMonitor,
    local: ContainerLocal,
) -> PhaseResult:
    title = "via pgbroker"
    console.rule(f"[bold]phase 2: through pgbroker, pool {args.pool_size}")
    began = time.monotonic()
    with _started_broker(args, console, database, monitor) as broker:
        console.print(
            f"broker pid {broker.pid} on {broker.target}; {args.invocations} "
            "invocations at once, each container with its own BrokerClient channel"
        )
        burst = _run_burst(
            console,
            "phase 2",
            monitor,
            args.invocations,
            lambda i: BrokerInvocation(i, local, broker.target),
        )
        stats = _broker_stats(broker.target)
        ended = time.monotonic()
    return _phase_result(
        "broker",
        title,
        burst,
        monitor,
        (began, ended),
        "release → broker began the transaction",
        {"broker_stats": stats},
    )


def _django_phases(
    args: argparse.Namespace,
    console: Console,
    database: DemoDatabase,
    monitor: BackendMonitor,
) -> tuple[PhaseResult, PhaseResult]:
    """The Django example: its migrations (Zappa's ``manage`` event), the burst with the stock
    backend, then with lambda_client.django through a broker with the pool."""
    from demo import django_app

    wait_label = "release → first query answered"
    handler = django_app.load_handler(database.app_dsn)
    django_app.migrate(handler)
    console.rule("[bold]phase 1: Django, stock postgresql backend (psycopg), direct")
    console.print(
        f"{args.invocations} API Gateway requests at once to Zappa's handler, each container "
        "with its own Django connection (CONN_MAX_AGE=None, as a warm Lambda keeps it)"
    )
    began = time.monotonic()
    burst = _run_burst(
        console,
        "phase 1",
        monitor,
        args.invocations,
        lambda i: django_app.DjangoInvocation(i, handler),
    )
    monitor.wait_for(lambda s: s.role_backends == 0, timeout=15)
    direct = _phase_result(
        "direct", "Django direct", burst, monitor, (began, time.monotonic()), wait_label
    )

    console.rule(
        f"[bold]phase 2: Django, lambda_client.django through pgbroker, pool {args.pool_size}"
    )
    began = time.monotonic()
    with _started_broker(args, console, database, monitor) as broker:
        from clicks.settings import broker_database  # the example's own switch

        options = {"target": broker.target, "tls": False, "timeout": django_app.LAMBDA_TIMEOUT}
        django_app.use_database({**broker_database(), "OPTIONS": options})
        console.print(
            f"broker pid {broker.pid} on {broker.target}; the same {args.invocations} requests, "
            "each container with its own gRPC channel"
        )
        burst = _run_burst(
            console,
            "phase 2",
            monitor,
            args.invocations,
            lambda i: django_app.DjangoInvocation(i, handler),
        )
        stats = _broker_stats(broker.target)
        recorded = django_app.clicks_recorded()
        ended = time.monotonic()
    brokered = _phase_result(
        "broker",
        "Django via pgbroker",
        burst,
        monitor,
        (began, ended),
        wait_label,
        {"broker_stats": stats, "clicks_recorded": recorded},
    )
    return direct, brokered


@contextlib.contextmanager
def _started_broker(
    args: argparse.Namespace, console: Console, database: DemoDatabase, monitor: BackendMonitor
) -> Iterator[BrokerProcess]:
    """A broker with the pool on the demo's database, its pool filled, stopped on exit."""
    broker_url = database.app_dsn
    if database.embedded:
        broker_url += "?sslmode=disable"
    # INFO, the broker's default: DEBUG would log every one of the burst's requests.
    broker = BrokerProcess(
        broker_url, pool_size=args.pool_size, log_level="INFO", env={"PGBROKER_AUTH": "none"}
    )
    try:
        with console.status("starting the broker and filling its pool ..."):
            broker.start()
            broker.wait_serving()
            # Let the monitor see the filled pool before 1000 threads starve it of the GIL.
            monitor.wait_for(lambda s: s.role_backends >= args.pool_size, timeout=5)
        yield broker
    finally:
        broker.close()


def _run_burst(
    console: Console,
    title: str,
    monitor: BackendMonitor,
    count: int,
    factory: Callable[[int], Invocation],
) -> Burst:
    burst = Burst(count, factory)
    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn(
            "[green]{task.fields[ok]} completed[/] [red]{task.fields[failed]} failed[/] "
            "{task.fields[waiting]} waiting · {task.fields[backends]} backends"
        ),
        TimeElapsedColumn(),
        console=console,
    )

    def tick(b: Burst) -> None:
        backends = monitor.samples[-1].role_backends if monitor.samples else 0
        progress.update(
            task,
            completed=b.count - b.waiting,
            ok=b.completed,
            failed=b.failed,
            waiting=b.waiting,
            backends=backends,
        )

    with progress:
        task = progress.add_task(title, total=count, ok=0, failed=0, waiting=count, backends=0)
        burst.run(on_tick=tick)
    return burst


def _phase_result(
    name: str,
    title: str,
    burst: Burst,
    monitor: BackendMonitor,
    window: tuple[float, float],
    wait_label: str,
    extra: dict[str, Any] | None = None,
) -> PhaseResult:
    """A phase's figures: its burst and what *monitor* saw within *window* (began, ended)."""
    began, ended = window
    return PhaseResult(
        name=name,
        title=title,
        burst=burst,
        samples=[s for s in monitor.samples if began <= s.at <= ended],
        peak_backends=monitor.peak(began, ended),
        began=began,
        ended=ended,
        wait_label=wait_label,
        extra=extra or {},
    )


def _broker_stats(target: str) -> dict[str, int]:
    """The broker's own pool figures after the burst, or {} if it does not answer."""
    try:
        with BrokerClient(target, timeout=5, tls=False) as client:
            return client.stats()
    except Exception:
        return {}


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
