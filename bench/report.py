"""Turns benchmark results into a printed table with ratios, a JSON file and a PNG chart."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from bench.harness import (
    BOUNCER_ASYNCPG,
    BOUNCER_PGBENCH,
    BOUNCER_PSYCOPG,
    COMPETITORS,
    DIRECT,
    FLOOR_PG,
    PGBROKER,
    cpu_per_1000,
    latency_ms,
)


def _key(row: dict[str, Any]) -> tuple[str, str]:
    return row["workload"], row["variant"]


def _fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def ratios(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """pgbroker ÷ each other competitor, per workload variant: tx/s and p50 latency
    (for W3: completion time), None where a side did no work."""
    by_case: dict[tuple[str, str], dict[str, dict[str, Any]]] = {}
    for row in results:
        by_case.setdefault(_key(row), {})[row["competitor"]] = row
    out = []
    for (workload, variant), rows in by_case.items():
        mine = rows.get(PGBROKER)
        if mine is None or mine.get("skipped"):
            continue
        # The Transact variant has only pgbroker's row: compared with the base run's others.
        others = by_case.get((workload, "base"), {}) if variant == "transact" else rows
        for other_name in (BOUNCER_ASYNCPG, BOUNCER_PGBENCH, BOUNCER_PSYCOPG, DIRECT):
            other = others.get(other_name)
            if other is None or other.get("skipped"):
                continue
            entry: dict[str, Any] = {"workload": workload, "variant": variant}
            entry["versus"] = other_name
            entry["tps"] = _ratio(mine.get("tps"), other.get("tps"))
            entry["p50"] = _ratio(latency_ms(mine, "p50"), latency_ms(other, "p50"))
            if workload == "W3":
                entry["elapsed"] = _ratio(mine.get("elapsed_s"), other.get("elapsed_s"))
            out.append(entry)
    return out


def _ratio(a: float | None, b: float | None) -> float | None:
    if not a or not b:
        return None
    return round(a / b, 2)


def _floor_multiples(entry: dict[str, Any], floor: str = "floor") -> str:
    """*floor*'s CPU, tx/s and p50 as multiples of PgBouncer's (older runs: none)."""
    multiples = entry.get(f"{floor}_x_pgbouncer") or {}
    return ", ".join(_fmt(multiples.get(name), 2) for name in ("cpu", "tps", "p50"))


def _floor_rows(data: dict[str, Any]) -> list[tuple[dict[str, Any], list[str]]]:
    """Per `cpu_multiples` entry, the cells of the floors' table (terminal and Markdown)."""
    floor = {(r["workload"], r["variant"]): r for r in data.get("floor", [])}
    out = []
    for entry in data.get("cpu_multiples", []):
        cpu = entry["cpu_s_per_1000_tx"]
        row = floor.get((entry["workload"], entry["variant"]), {})
        out.append((entry, [
            _fmt(row.get("tps")), _fmt(cpu["floor"], 3), _fmt(cpu.get(FLOOR_PG), 3),
            _fmt(cpu[PGBROKER], 3), _fmt(cpu[BOUNCER_ASYNCPG], 3),
            _fmt(entry["pgbroker_x_floor"], 2), _fmt(entry.get("pgbroker_x_floor_postgres"), 2),
            _fmt(entry["pgbroker_x_pgbouncer"], 2), _floor_multiples(entry),
            _fmt(entry.get("floor_postgres_x_floor"), 2),
            _floor_multiples(entry, "floor_postgres"),
        ]))  # fmt: skip
    return out


# The floors' table's columns after the W1 variant (terminal and Markdown).
_FLOOR_HEADERS = (
    "floor tx/s",
    "floor",
    "floor+postgres",
    "pgbroker",
    "PgBouncer",
    "÷ floor",
    "÷ floor+postgres",
    "÷ PgBouncer",
    "floor ÷ PgBouncer: CPU, tx/s, p50",
    "floor+postgres ÷ floor",
    "floor+postgres ÷ PgBouncer: CPU, tx/s, p50",
)


def targets(data: dict[str, Any]) -> list[dict[str, Any]]:
    """The issues' targets (reported, never asserted) and where this run stands: the seed
    issue's, then issue 14's (`per_request_targets`)."""
    rows = {(r["workload"], r["variant"], r["competitor"]): r for r in data["results"]}

    def get(workload: str, variant: str, competitor: str) -> dict[str, Any]:
        row = rows.get((workload, variant, competitor), {})
        return {} if row.get("skipped") else row

    out = []
    broker, bouncer = get("W2", "base", PGBROKER), get("W2", "base", BOUNCER_ASYNCPG)
    value = _ratio(broker.get("tps"), bouncer.get("tps"))
    out.append({
        "target": "W2 think 1 ms: pgbroker tx/s >= 3x PgBouncer (asyncpg), zero errors",
        "value": f"{_fmt(value, 2)}x, {broker.get('errors', '–')} errors",
        "met": bool(value and value >= 3 and broker.get("errors") == 0),
    })  # fmt: skip
    for variant, name in (("base", "W1"), ("light", "W1 light (no queueing)")):
        broker, bouncer = get("W1", variant, PGBROKER), get("W1", variant, BOUNCER_ASYNCPG)
        if variant == "light" and not (broker and bouncer):
            continue
        value = _ratio(latency_ms(broker, "p50"), latency_ms(bouncer, "p50"))
        entry = {
            "target": f"{name}: pgbroker p50 <= 1.5x PgBouncer (asyncpg)",
            "value": f"{_fmt(value, 2)}x",
            "met": bool(value is not None and value <= 1.5),
        }
        stack = _multiples(data, variant).get("floor_postgres_x_pgbouncer") or {}
        if stack.get("p50") is not None:
            entry["floor_postgres"] = {
                "value": f"{_fmt(stack['p50'], 2)}x", "met": stack["p50"] <= 1.5
            }  # fmt: skip
        out.append(entry)
    broker, bouncer = get("W4", "view", PGBROKER), get("W4", "view", BOUNCER_PSYCOPG)
    if broker and bouncer:
        value = _ratio(latency_ms(broker, "p50"), latency_ms(bouncer, "p50"))
        out.append({
            "target": "W4 (reported): Django view of 10 ORM queries, pgbroker p50 vs "
            "PgBouncer + psycopg",
            "value": f"{_fmt(latency_ms(broker, 'p50'), 2)} vs "
            f"{_fmt(latency_ms(bouncer, 'p50'), 2)} ms "
            f"({_fmt(value, 2)}x)",
            "met": None,
        })  # fmt: skip
    burst = get("W3", "burst", PGBROKER)
    out.append({
        "target": "W3: zero failures through pgbroker",
        "value": f"{burst.get('errors', '–')} failures of {burst.get('invocations', '–')}",
        "met": bool(burst and burst.get("errors") == 0 and burst.get("tx")),
    })  # fmt: skip
    return out + per_request_targets(data, get)


# Issue 14's targets (per-request cost), each as (what, at most / at least, bound). Its W1-light
# p50 target (<= 1.5x PgBouncer) is the seed issue's, reported above.
_AT_MOST, _AT_LEAST = "<=", ">="
PER_REQUEST_TARGETS = (
    ("pooler CPU per W1 request, x the floor", _AT_MOST, 1.5),
    ("pooler CPU per W1 request, x PgBouncer (asyncpg)", _AT_MOST, 4.0),
    ("W1 tx/s, x PgBouncer (asyncpg)", _AT_LEAST, 1.0),
    ("W3 broker CPU per new channel, ms", _AT_MOST, 1.0),
    ("W3 time until all done, x PgBouncer (asyncpg)", _AT_MOST, 1.5),
    ("cold start (import + first query), x pg8000's TLS path", _AT_MOST, 0.6),
    ("nothing slower: W2 tx/s, x PgBouncer (asyncpg)", _AT_LEAST, 1.56),
)


def per_request_targets(
    data: dict[str, Any], get: Callable[[str, str, str], dict[str, Any]]
) -> list[dict[str, Any]]:
    """Issue 14's targets in `PER_REQUEST_TARGETS`' order, from the rows (*get*: a competitor's
    row of a workload variant, {} when missing or skipped), the W1 CPU multiples and the cold
    starts: so every run states each one, and runs compare."""
    multiples = _multiples(data, "base")
    burst, burst_bouncer = get("W3", "burst", PGBROKER), get("W3", "burst", BOUNCER_ASYNCPG)
    cold = {
        entry["competitor"]: entry["first_query_ms"]["median"]
        for entry in data.get("cold_start", [])
        if not entry.get("skipped")
    }

    def tps_versus_bouncer(workload: str) -> float | None:
        mine, theirs = get(workload, "base", PGBROKER), get(workload, "base", BOUNCER_ASYNCPG)
        return _ratio(mine.get("tps"), theirs.get("tps"))

    stack = multiples.get("floor_postgres_x_pgbouncer") or {}
    # The same figure for the floor with Postgres (bench/pgfloor.py) where it has one: a
    # bound that even a broker doing nothing but the round trip misses is out of this stack's
    # reach, whatever the broker's own code does.
    reach = (
        multiples.get("floor_postgres_x_floor"),
        stack.get("cpu"),
        stack.get("tps"),
        None,
        None,
        None,
        None,
    )
    values = (
        multiples.get("pgbroker_x_floor"),
        multiples.get("pgbroker_x_pgbouncer"),
        tps_versus_bouncer("W1"),
        cpu_per_1000(burst),  # s per 1,000 = ms per channel
        _ratio(burst.get("elapsed_s"), burst_bouncer.get("elapsed_s")),
        _ratio(cold.get(PGBROKER), cold.get(DIRECT)),
        tps_versus_bouncer("W2"),
    )
    out = []
    for (what, sense, bound), value, floor in zip(PER_REQUEST_TARGETS, values, reach, strict=True):
        entry = {
            "target": f"issue 14: {what} {sense} {bound:g}",
            "value": _fmt(value, 2),
            "met": _within(value, sense, bound),
        }
        if floor is not None:
            entry["floor_postgres"] = {"value": _fmt(floor, 2), "met": _within(floor, sense, bound)}
        out.append(entry)
    return out


def _multiples(data: dict[str, Any], variant: str) -> dict[str, Any]:
    """The `cpu_multiples` entry of W1's *variant* ({} when the run has none)."""
    return next((m for m in data.get("cpu_multiples", []) if m["variant"] == variant), {})


def _within(value: float | None, sense: str, bound: float) -> bool:
    return value is not None and (value <= bound if sense == _AT_MOST else value >= bound)


def _floor_postgres_note(entry: dict[str, Any]) -> str:
    """Where the floor with Postgres stands on *entry*'s target ("" when it has no figure)."""
    floor = entry.get("floor_postgres")
    if not floor:
        return ""
    return f"the floor with Postgres: {floor['value']}, {'met' if floor['met'] else 'not met'}"


def print_report(data: dict[str, Any], console: Console | None = None) -> None:
    console = console or Console(width=160)
    table = Table(title=f"pgbroker bench ({data['meta']['plan']['mode']})", show_lines=False)
    for header in (
        "workload", "competitor", "clients", "tx/s", "p50 ms", "p95 ms", "p99 ms", "errors",
        "peak backends", "pooler CPU s/1k tx", "pooler RSS MB", "loadgen CPU",
    ):  # fmt: skip
        left = header in ("workload", "competitor")
        table.add_column(header, justify="left" if left else "right")
    for row in data["results"]:
        label = f"{row['workload']} {row['variant']}"
        if row.get("skipped"):
            table.add_row(label, row["competitor"], *["–"] * 9, "skipped")
            continue
        pooler = row.get("pooler") or {}
        latency = row.get("latency_ms") or {}
        util = row.get("loadgen_cpu_util")
        tps = row.get("tps") if row["workload"] != "W3" else f"{row.get('elapsed_s', 0):.2f} s"
        table.add_row(
            label, row["competitor"], _fmt(row.get("clients")), _fmt(tps),
            _fmt(latency.get("p50"), 2), _fmt(latency.get("p95"), 2),
            _fmt(latency.get("p99"), 2), _fmt(row.get("errors")), _fmt(row.get("peak_backends")),
            _fmt(pooler.get("cpu_s_per_1000_tx"), 3), _fmt(pooler.get("peak_rss_mb")),
            f"{util * 100:.0f}%" if util is not None else "–",
        )  # fmt: skip
    console.print(table)
    console.print("W3 rows: tx/s column is the time until all invocations finished.")
    ratio_table = Table(title="pgbroker ÷ competitor")
    for header in ("workload", "versus", "tx/s", "p50", "W3 time"):
        ratio_table.add_column(header)
    for entry in data.get("ratios", []):
        ratio_table.add_row(
            f"{entry['workload']} {entry['variant']}", entry["versus"], _fmt(entry["tps"], 2),
            _fmt(entry["p50"], 2), _fmt(entry.get("elapsed"), 2),
        )  # fmt: skip
    console.print(ratio_table)
    floor = Table(
        title="pooler CPU per 1k W1 requests, s: pgbroker against its floor (bench/floor.py)"
        " and the floor with Postgres (bench/pgfloor.py)"
    )
    for header in ("workload", *_FLOOR_HEADERS):
        floor.add_column(header)
    for entry, cells in _floor_rows(data):
        floor.add_row(f"{entry['workload']} {entry['variant']}", *cells)
    console.print(floor)
    for entry in data.get("targets", []):
        mark = (
            "reported"
            if entry["met"] is None
            else "[green]met[/]"
            if entry["met"]
            else "[red]not met[/]"
        )
        note = _floor_postgres_note(entry)
        note = f" ({note})" if note else ""
        console.print(f"target: {entry['target']}: {entry['value']} — {mark}{note}")
    cold = Table(title="cold start (median of fresh processes, ms)")
    for header in ("client", "samples", "import", "import + first query", "process wall"):
        cold.add_column(header)
    for entry in data.get("cold_start", []):
        if entry.get("skipped"):
            cold.add_row(entry["competitor"], "skipped", "–", "–", "–")
            continue
        cold.add_row(
            entry["competitor"] + (" (TLS)" if entry["competitor"] == DIRECT else ""),
            str(entry["samples"]), _fmt(entry["import_ms"]["median"]),
            _fmt(entry["first_query_ms"]["median"]), _fmt(entry["process_ms"]["median"]),
        )  # fmt: skip
    console.print(cold)
    for row in data["results"]:
        for message, count in (row.get("error_messages") or {}).items():
            console.print(
                f"[dim]{row['workload']} {row['variant']} {row['competitor']}: "
                f"{count} × {message}[/]"
            )


def write_json(data: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(path)


def write_chart(data: dict[str, Any], path: Path) -> None:
    """Two panels: tx/s and p50 latency per workload variant, one bar per competitor."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steady = [r for r in data["results"] if r["workload"] != "W3"]
    cases: list[tuple[str, str]] = []
    for row in steady:
        if _key(row) not in cases:
            cases.append(_key(row))
    values = {(_key(r), r["competitor"]): r for r in steady if not r.get("skipped")}
    fig, axes = plt.subplots(2, 1, figsize=(11, 7.5), sharex=True)
    shown = (*COMPETITORS, BOUNCER_PSYCOPG)  # W4's PgBouncer client is psycopg (Django)
    width = 0.8 / len(shown)
    colors = {DIRECT: "#999999", BOUNCER_ASYNCPG: "#4c72b0", BOUNCER_PGBENCH: "#8fb0dd",
              PGBROKER: "#dd8452", BOUNCER_PSYCOPG: "#55a868"}  # fmt: skip
    for i, competitor in enumerate(shown):
        xs = [j + (i - (len(shown) - 1) / 2) * width for j in range(len(cases))]
        tps = [values.get((c, competitor), {}).get("tps") or 0 for c in cases]
        p50 = [latency_ms(values.get((c, competitor), {}), "p50") or 0 for c in cases]
        axes[0].bar(xs, tps, width, label=competitor, color=colors[competitor])
        axes[1].bar(xs, p50, width, label=competitor, color=colors[competitor])
    axes[0].set_ylabel("transactions / s (log)")
    axes[1].set_ylabel("p50 latency, ms (log)")
    if values:  # a run of W3 alone has no steady bars, and an empty axis cannot be log-scaled
        axes[0].set_yscale("log")  # pgbench's W1 is 10x the rest; W2 differences stay visible
        axes[1].set_yscale("log")
    axes[1].set_xticks(range(len(cases)))
    axes[1].set_xticklabels([f"{w} {v}" for w, v in cases])
    axes[0].legend(ncols=4, fontsize=8)
    plan = data["meta"]["plan"]
    axes[0].set_title(
        f"pgbroker vs PgBouncer vs direct — pool {plan['pool_size']}, scale {plan['scale']}, "
        f"W1 {plan['w1_clients']} / W2 {plan['w2_clients']} clients, think {plan['think_ms']} ms"
    )
    for ax in axes:
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown(data: dict[str, Any]) -> str:
    """The results and ratio tables as Markdown (for docs/performance.md)."""
    lines = [
        "| workload | competitor | clients | tx/s (W3: time) | p50 ms | p95 ms | p99 ms | errors "
        "| peak backends | pooler CPU s/1k tx | pooler RSS MB | loadgen CPU |",
        "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for row in data["results"]:
        if row.get("skipped"):
            continue
        pooler = row.get("pooler") or {}
        latency = row.get("latency_ms") or {}
        util = row.get("loadgen_cpu_util")
        tps = _fmt(row.get("tps")) if row["workload"] != "W3" else f"{row['elapsed_s']:.1f} s"
        cells = [
            f"{row['workload']} {row['variant']}", row["competitor"], _fmt(row.get("clients")),
            tps, _fmt(latency.get("p50"), 1), _fmt(latency.get("p95"), 1),
            _fmt(latency.get("p99"), 1), _fmt(row.get("errors")), _fmt(row.get("peak_backends")),
            _fmt(pooler.get("cpu_s_per_1000_tx"), 2), _fmt(pooler.get("peak_rss_mb")),
            f"{util * 100:.0f}%" if util is not None else "–",
        ]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "| workload | pgbroker ÷ | tx/s | p50 |", "|---|---|--:|--:|"]
    for entry in data.get("ratios", []):
        lines.append(
            f"| {entry['workload']} {entry['variant']} | {entry['versus']} "
            f"| {_fmt(entry['tps'], 2)} | {_fmt(entry['p50'], 2)} |"
        )
    lines += [
        "",
        "W1, pooler CPU s per 1k requests, and multiples:",
        "",
        "| W1 | " + " | ".join(_FLOOR_HEADERS) + " |",
        "|---|" + "--:|" * len(_FLOOR_HEADERS),
    ]
    for entry, cells in _floor_rows(data):
        lines.append(f"| {entry['variant']} | " + " | ".join(cells) + " |")
    lines += ["", "| cold start (median, ms) | samples | import | import + first query |"]
    lines.append("|---|--:|--:|--:|")
    for entry in data.get("cold_start", []):
        if not entry.get("skipped"):
            lines.append(
                f"| {entry['competitor']} | {entry['samples']} "
                f"| {_fmt(entry['import_ms']['median'])} "
                f"| {_fmt(entry['first_query_ms']['median'])} |"
            )
    lines += ["", "| target | this run | met | on this stack |", "|---|--:|---|---|"]
    for entry in data.get("targets", []):
        met = "reported" if entry["met"] is None else "yes" if entry["met"] else "no"
        note = _floor_postgres_note(entry)
        lines.append(f"| {entry['target']} | {entry['value']} | {met} | {note} |")
    return "\n".join(lines) + "\n"
