"""What the demo shows: a phase summary, the side-by-side table, and the PNG chart."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from demo.burst import Burst, summarize_times
from devtools.pgmonitor import Sample

__all__ = ["PhaseResult", "print_table", "write_chart"]


@dataclass
class PhaseResult:
    """One phase's figures; *samples* are its ``pg_stat_activity`` polls, *began* and *ended*
    (monotonic seconds) bound it, *burst* holds every invocation's outcome."""

    name: str
    title: str
    burst: Burst
    samples: list[Sample]
    peak_backends: int
    began: float
    ended: float
    wait_label: str
    extra: dict[str, Any]

    def summary(self) -> dict[str, Any]:
        """The machine-readable figures (``--json``)."""
        burst = self.burst
        wall = max(burst.finished_at - burst.released_at, 1e-9)
        waits = burst.waits()
        queue_waits = burst.queue_waits()
        errors = burst.errors()
        return {
            "invocations": burst.count,
            "succeeded": burst.completed,
            "failed": burst.failed,
            "errors": [{"message": m, "count": c} for m, c in errors.most_common()],
            "peak_backends": self.peak_backends,
            "wait_ms": summarize_times(waits) if waits else None,
            "wait_measures": self.wait_label,
            "queue_wait_ms": summarize_times(queue_waits) if queue_waits else None,
            "latency_ms": summarize_times(burst.latencies()),
            "wall_s": round(wall, 3),
            "tx_per_s": round(burst.completed / wall, 1),
            **self.extra,
        }


def _ms(figures: dict[str, Any] | None) -> str:
    if not figures:
        return "—"
    return " / ".join("—" if figures[k] is None else f"{figures[k]:.0f}" for k in figures)


def print_table(console: Console, phases: list[PhaseResult], limits: dict[str, int]) -> None:
    """The side-by-side table, then the distinct errors of each phase."""
    table = Table(title="pgbroker demo: the same burst, direct and through pgbroker")
    table.add_column("")
    summaries = [p.summary() for p in phases]
    for phase in phases:
        table.add_column(phase.title, justify="right")
    rows = [
        ("invocations", lambda s: f"{s['invocations']}"),
        ("succeeded", lambda s: f"[green]{s['succeeded']}[/]"),
        ("failed", lambda s: f"[red]{s['failed']}[/]" if s["failed"] else "0"),
        ("peak Postgres backends", lambda s: f"{s['peak_backends']}"),
        ("wait p50 / p95 / p99 (ms)", lambda s: _ms(s["wait_ms"])),
        ("broker queue p50 / p95 / p99 (ms)", lambda s: _ms(s["queue_wait_ms"])),
        ("latency p50 / p95 / p99 (ms)", lambda s: _ms(s["latency_ms"])),
        ("wall time (s)", lambda s: f"{s['wall_s']:.2f}"),
        ("transactions/s", lambda s: f"{s['tx_per_s']:.0f}"),
    ]
    for label, cell in rows:
        table.add_row(label, *(cell(s) for s in summaries))
    console.print(table)
    console.print(
        f"max_connections={limits['max_connections']}, pool size={limits['pool_size']}. "
        + "; ".join(f"{p.title}: wait = {p.wait_label}" for p in phases)
        + ". Latency: release → handler returned."
    )
    for phase, summary in zip(phases, summaries, strict=True):
        for error in summary["errors"][:5]:
            console.print(
                f"[bold]{phase.title}[/]: {error['count']} × [red]{error['message']}[/]",
                highlight=False,
            )


def write_chart(path: Path, phases: list[PhaseResult], limits: dict[str, int]) -> Path:
    """Postgres backends and completed invocations over time, one panel per phase (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(1, len(phases), figsize=(6.5 * len(phases), 4.6), sharey=True)
    axes = list(axes) if len(phases) > 1 else [axes]
    count = max(p.burst.count for p in phases)
    legend: dict[str, Any] = {}
    for ax, phase in zip(axes, phases, strict=True):
        zero = phase.burst.released_at
        xs = [s.at - zero for s in phase.samples]
        ax.step(
            xs,
            [s.role_backends for s in phase.samples],
            where="post",
            color="tab:blue",
            label="Postgres backends (application)",
        )
        ax.axhline(
            limits["max_connections"],
            color="tab:red",
            linestyle="--",
            linewidth=1,
            label=f"max_connections = {limits['max_connections']}",
        )
        if phase.name == "broker":
            ax.axhline(
                limits["pool_size"],
                color="tab:gray",
                linestyle=":",
                linewidth=1,
                label=f"broker pool size = {limits['pool_size']}",
            )
        # Before the release only the broker's pool filling matters; keep a second of it.
        ax.set_xlim(left=max(min(xs, default=0.0), -1.0))
        ax.set_xlabel("seconds since the burst was released")
        ax.set_title(phase.title)
        ax.set_ylim(0, max(limits["max_connections"], phase.peak_backends) * 1.15)
        ax.grid(alpha=0.3)
        right = ax.twinx()
        done = sorted(o.finished - zero for o in phase.burst.outcomes if o.ok)
        failed = sorted(o.finished - zero for o in phase.burst.outcomes if not o.ok)
        start = min(xs[0] if xs else 0.0, 0.0)
        end = max(xs[-1] if xs else 0.0, phase.burst.finished_at - zero)
        right.step(
            [start, *done, end],
            [0, *range(1, len(done) + 1), len(done)],
            where="post",
            color="tab:green",
            label="invocations succeeded",
        )
        if failed:
            right.step(
                [start, *failed, end],
                [0, *range(1, len(failed) + 1), len(failed)],
                where="post",
                color="tab:red",
                alpha=0.6,
                label="invocations failed",
            )
        right.set_ylim(0, count * 1.05)
        right.set_ylabel("invocations (cumulative)")
        for axis in (ax, right):
            for handle, label in zip(*axis.get_legend_handles_labels(), strict=True):
                legend.setdefault(label, handle)
    fig.legend(
        list(legend.values()), list(legend), loc="lower center", ncol=5, fontsize=8, frameon=False
    )
    axes[0].set_ylabel("Postgres backends")
    fig.suptitle(f"{count} concurrent Lambda invocations: direct connections vs pgbroker")
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
