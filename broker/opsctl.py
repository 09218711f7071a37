"""The operator's commands of ``python -m broker``: pause, resume, reload and top.

Each asks a running broker through ``pgbroker.v1.Admin`` (broker/front/admin.py) on a channel
and with credentials that `broker.__main__` builds (as for ``stats``); a refused call raises
``grpc.RpcError``, which `broker.__main__` turns into one line on stderr and exit 1.

`top` is PgBouncer's ``SHOW POOLS`` / ``SHOW STATS`` / ``SHOW CLIENTS`` as one live terminal
view (rich): the pools per target (``target.<name>.*`` figures when the broker reports them,
else the primary's unprefixed ones), the waiting callers, the lease hold times and the busiest
callers, redrawn every *interval* seconds until Ctrl-C; ``--once`` prints one frame.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import grpc

from lambda_client._proto.pgbroker.v1 import broker_pb2 as pb
from lambda_client._proto.pgbroker.v1 import broker_pb2_grpc as pb_grpc

__all__ = ["Ask", "frame", "pause", "reload", "resume", "targets", "top"]

# The figures shown per pool target, in `top`'s column order: (stats key, heading).
POOL_COLUMNS = (
    ("pool_size", "size"),
    ("pool_max", "max"),
    ("pool_active", "active"),
    ("pool_available", "idle"),
    ("requests_waiting", "waiting"),
    ("replica_lag_ms", "lag ms"),
    ("in_rotation", "in rotation"),
)
# Counters shown as a rate per second between two frames.
RATES = (
    ("requests_num", "requests/s"),
    ("transactions_num", "transactions/s"),
    ("rpcs_failed", "failed/s"),
    ("requests_errors", "pool errors/s"),
)


@dataclass
class Ask:
    """How to ask one broker: *channel*, the admin call's *metadata*, the stats call's
    *stats_metadata*, and a *timeout* in seconds per call."""

    channel: grpc.Channel
    metadata: Sequence[tuple[str, str]]
    stats_metadata: Sequence[tuple[str, str]]
    timeout: float

    @property
    def admin(self) -> Any:
        return pb_grpc.AdminStub(self.channel)

    def stats(self) -> dict[str, int]:
        reply = pb_grpc.BrokerStub(self.channel).GetStats(
            pb.GetStatsRequest(), timeout=self.timeout, metadata=self.stats_metadata
        )
        return dict(reply.stats)


def pause(ask: Ask, *, wait: bool) -> int:
    """PAUSE; with *wait*, until nothing runs. Exit 1 if work still ran at the timeout."""
    reply = ask.admin.Pause(pb.PauseRequest(wait=wait), timeout=ask.timeout, metadata=ask.metadata)
    print(reply.message)
    return 1 if wait and reply.stats.get("pool_active", 0) else 0


def resume(ask: Ask) -> int:
    reply = ask.admin.Resume(pb.ResumeRequest(), timeout=ask.timeout, metadata=ask.metadata)
    print(reply.message)
    return 0


def reload(ask: Ask, overrides: Sequence[str]) -> int:
    """RELOAD with ``key=value`` *overrides*; raise ValueError for one that is not
    ``key=value``."""
    pairs: dict[str, str] = {}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"{item!r} is not KEY=VALUE")
        pairs[key.strip()] = value.strip()
    reply = ask.admin.Reload(
        pb.ReloadRequest(overrides=pairs), timeout=ask.timeout, metadata=ask.metadata
    )
    print(reply.message)
    return 0


# -- top ---------------------------------------------------------------------------------------


def targets(stats: Mapping[str, int]) -> dict[str, dict[str, int]]:
    """The figures of each pool target: ``target.<name>.<key>`` grouped by name, or, from a
    broker that reports none, ``primary`` with the unprefixed figures."""
    found: dict[str, dict[str, int]] = {}
    for key, value in stats.items():
        if key.startswith("target."):
            name, _, figure = key[len("target.") :].partition(".")
            found.setdefault(name, {})[figure] = value
    if found:
        return dict(sorted(found.items(), key=lambda item: (item[0] != "primary", item[0])))
    return {"primary": {key: stats[key] for key, _ in POOL_COLUMNS if key in stats}}


def callers_view(ask: Ask, limit: int = 10) -> pb.ShowCallersResponse | str:
    """ShowCallers' answer, or why it is not shown (it needs an admin identity)."""
    try:
        return ask.admin.ShowCallers(
            pb.ShowCallersRequest(limit=limit), timeout=ask.timeout, metadata=ask.metadata
        )
    except grpc.RpcError as exc:
        return f"callers not shown: {exc.code().name}: {exc.details() or ''}"


def frame(
    target: str,
    stats: Mapping[str, int],
    callers: pb.ShowCallersResponse | str,
    rates: Mapping[str, float] | None = None,
) -> Any:
    """One frame of `top` (a rich renderable)."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    state = "PAUSED" if stats.get("pool_paused") else "running"
    header = Text.assemble(
        ("pgbroker top ", "bold"),
        f"{target}  {time.strftime('%H:%M:%S')}  ",
        (state, "bold red" if state == "PAUSED" else "green"),
        f"  workers: {stats.get('workers', 1)}" + _workers_shown(stats),
    )
    pools = Table(title="pools", title_justify="left", expand=False)
    pools.add_column("target")
    for _, heading in POOL_COLUMNS:
        pools.add_column(heading, justify="right")
    for name, figures in targets(stats).items():
        pools.add_row(name, *(_cell(figures, key) for key, _ in POOL_COLUMNS))
    queue = Table(title="queue and leases", title_justify="left")
    for heading in (
        "waiting",
        "callers waiting",
        "maxwait ms",
        "leases open",
        "lease p50 ms",
        "lease max ms",
        "longest held ms",
    ):
        queue.add_column(heading, justify="right")
    queue.add_row(
        str(stats.get("requests_waiting", 0)),
        str(stats.get("requests_waiting_callers", 0)),
        str(stats.get("maxwait_us", 0) // 1000),
        str(stats.get("leases_active", 0)),
        str(stats.get("leases_p50_ms", 0)),
        str(stats.get("leases_max_ms", 0)),
        str(stats.get("pool_active_max_ms", 0)),
    )
    throughput = Table(title="rates", title_justify="left")
    for _, heading in RATES:
        throughput.add_column(heading, justify="right")
    throughput.add_row(*(f"{rates[key]:.1f}" if rates else "—" for key, _ in RATES))
    return Group(header, pools, queue, throughput, *_callers_tables(callers))


def _cell(figures: Mapping[str, int], key: str) -> str:
    return str(figures[key]) if key in figures else "—"


def _workers_shown(stats: Mapping[str, int]) -> str:
    """What part of the workers the figures cover: all (the broker's sum), or fewer when a
    worker did not answer (restarting), or one (a broker that does not combine them)."""
    workers = stats.get("workers", 1)
    answered = stats.get("workers_answered", workers)
    if "worker" in stats:
        return " (one shown)"
    return "" if answered >= workers else f" ({answered} answered)"


def _callers_tables(callers: pb.ShowCallersResponse | str) -> list[Any]:
    from rich.table import Table
    from rich.text import Text

    if isinstance(callers, str):
        return [Text(callers, style="dim")]
    busiest = Table(title="busiest callers", title_justify="left")
    busiest.add_column("caller (identity|function)")
    busiest.add_column("in flight", justify="right")
    busiest.add_column("waiting", justify="right")
    for caller in callers.callers:
        busiest.add_row(caller.caller, str(caller.in_flight), str(caller.waiting))
    leases = Table(title="open leases (longest first)", title_justify="left")
    leases.add_column("caller")
    leases.add_column("held ms", justify="right")
    leases.add_column("idle ms", justify="right")
    for lease in callers.leases:
        leases.add_row(lease.caller, str(lease.held_ms), str(lease.idle_ms))
    return [busiest, leases]


def top(ask: Ask, target: str, *, once: bool, interval: float) -> int:
    """Draw frames until Ctrl-C (exit 0); with *once*, print one. A failed GetStats raises
    ``grpc.RpcError`` (for `broker.__main__` to report)."""
    from rich.console import Console
    from rich.live import Live

    console = Console()
    stats = ask.stats()
    if once:
        console.print(frame(target, stats, callers_view(ask)))
        return 0
    previous, at = stats, time.monotonic()
    try:
        with Live(frame(target, stats, callers_view(ask)), console=console, screen=False) as live:
            while True:
                time.sleep(interval)
                stats, now = ask.stats(), time.monotonic()
                rates = {
                    key: max(0, stats.get(key, 0) - previous.get(key, 0)) / (now - at)
                    for key, _ in RATES
                }
                live.update(frame(target, stats, callers_view(ask), rates))
                previous, at = stats, now
    except KeyboardInterrupt:
        return 0
