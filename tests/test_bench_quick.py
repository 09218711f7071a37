"""`python -m bench --tiny` runs end to end: JSON shape and every competitor did work.

Timings are never asserted here; `make bench` is where they are read.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    if not (ROOT / "broker" / "__main__.py").exists():
        pytest.skip("the broker (python -m broker) is not there yet")
    out = tmp_path_factory.mktemp("bench")
    done = subprocess.run(
        [sys.executable, "-m", "bench", "--tiny", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=150,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert (out / "tiny.png").stat().st_size > 0
    data: dict[str, Any] = json.loads((out / "tiny.json").read_text())
    data["_stdout"] = done.stdout
    return data


def test_every_competitor_completes_transactions_in_every_workload(
    tiny_run: dict[str, Any],
) -> None:
    rows = tiny_run["results"]
    seen = {(r["workload"], r["competitor"]) for r in rows}
    for workload in ("W1", "W2"):
        for competitor in ("direct", "pgbouncer+asyncpg", "pgbouncer+pgbench", "pgbroker"):
            assert (workload, competitor) in seen
    for competitor in ("direct", "pgbouncer+asyncpg", "pgbroker"):
        assert ("W3", competitor) in seen
    for competitor in ("pgbroker", "pgbouncer+psycopg"):  # the Django view
        assert ("W4", competitor) in seen
    for row in rows:
        assert not row.get("skipped"), row
        assert row["tx"] > 0, row
        assert row["errors"] == 0, row["error_messages"]


def test_result_rows_carry_every_figure(tiny_run: dict[str, Any]) -> None:
    for row in tiny_run["results"]:
        assert set(row["latency_ms"]) == {"p50", "p95", "p99", "mean"}
        assert isinstance(row["tps"], int | float)
        assert isinstance(row["error_messages"], dict)
        assert row["peak_backends"] >= 1
        assert row["loadgen_cpu_s"] >= 0
        if row["competitor"] == "direct":
            assert row["pooler"] is None
        else:
            assert row["pooler"]["name"] in ("pgbouncer", "pgbroker")
            assert set(row["pooler"]) == {"name", "cpu_s", "cpu_s_per_1000_tx", "peak_rss_mb"}
            assert row["pooler"]["peak_rss_mb"] > 0
    burst = [r for r in tiny_run["results"] if r["workload"] == "W3"]
    assert all(r["invocations"] == r["clients"] for r in burst)
    rounds = tiny_run["meta"]["plan"]["rounds"]
    steady = [r for r in tiny_run["results"] if r["workload"] != "W3"]
    assert all(len(r["rounds_tps"]) == rounds and r["tps"] == max(r["rounds_tps"]) for r in steady)


def test_pooled_competitors_never_exceed_their_pool(tiny_run: dict[str, Any]) -> None:
    pool_size = tiny_run["meta"]["plan"]["pool_size"]
    for row in tiny_run["results"]:
        if row["competitor"] != "direct":
            assert row["peak_backends"] <= pool_size


def test_cold_start_ratios_and_targets_are_reported(tiny_run: dict[str, Any]) -> None:
    cold = {entry["competitor"]: entry for entry in tiny_run["cold_start"]}
    assert set(cold) == {"direct", "pgbroker"}
    for entry in cold.values():
        assert entry["samples"] >= 1 and entry["errors"] == 0
        assert entry["first_query_ms"]["median"] >= entry["import_ms"]["median"]
    versus = {(r["workload"], r["versus"]) for r in tiny_run["ratios"]}
    assert ("W2", "pgbouncer+asyncpg") in versus and ("W1", "direct") in versus
    assert len([t for t in tiny_run["targets"] if not t["target"].startswith("issue 14")]) == 4
    assert any(t["target"].startswith("W4") and t["met"] is None for t in tiny_run["targets"])
    assert ("W4", "pgbouncer+psycopg") in versus
    assert "pgbroker ÷ competitor" in tiny_run["_stdout"]


def test_the_floor_competitors_and_cpu_multiples_are_reported(tiny_run: dict[str, Any]) -> None:
    """W1 runs against bench/floor.py (the broker's stack, a canned reply) and bench/pgfloor.py
    (the same stack, a minimal round trip to Postgres) too: their rows are
    apart from the poolers', and pgbroker's CPU per request is given as a multiple of each."""
    floor, postgres = tiny_run["floor"], tiny_run["floor_postgres"]
    for rows, name, backends in ((floor, "floor", 0), (postgres, "floor+postgres", 1)):
        assert [(r["workload"], r["variant"], r["competitor"]) for r in rows] == [
            ("W1", "base", name)
        ]
        row = rows[0]
        assert row["tx"] > 0 and row["errors"] == 0, row["error_messages"]
        # The floor never touches Postgres; the floor with Postgres holds its own pool.
        assert (row["peak_backends"] > 0) == bool(backends), row["peak_backends"]
        assert row["pooler"]["name"] == name and row["pooler"]["cpu_s_per_1000_tx"] > 0
    (multiples,) = tiny_run["cpu_multiples"]
    cpu = multiples["cpu_s_per_1000_tx"]
    assert set(cpu) == {"pgbroker", "floor", "floor+postgres", "pgbouncer+asyncpg"}

    def multiple(a: float | None, b: float | None) -> float | None:
        # CPU is counted in 10 ms clock ticks: a tiny run's PgBouncer may show none.
        return round(a / b, 2) if a and b else None

    for name, key in (
        ("floor", "pgbroker_x_floor"),
        ("floor+postgres", "pgbroker_x_floor_postgres"),
        ("pgbouncer+asyncpg", "pgbroker_x_pgbouncer"),
    ):
        assert multiples[key] == multiple(cpu["pgbroker"], cpu[name])
    assert multiples["floor_postgres_x_floor"] == multiple(cpu["floor+postgres"], cpu["floor"])
    # Each floor against PgBouncer: where a broker that did no work at all, or nothing but
    # the round trip to Postgres, would stand.
    results = {(r["workload"], r["variant"], r["competitor"]): r for r in tiny_run["results"]}
    bouncer = results[("W1", "base", "pgbouncer+asyncpg")]
    for rows, name, key in (
        (floor, "floor", "floor_x_pgbouncer"),
        (postgres, "floor+postgres", "floor_postgres_x_pgbouncer"),
    ):
        stack = multiples[key]
        assert stack["tps"] == multiple(rows[0]["tps"], bouncer["tps"])
        p50 = rows[0]["latency_ms"]["p50"], bouncer["latency_ms"]["p50"]
        assert stack["p50"] == multiple(*p50)
        assert stack["cpu"] == multiple(cpu[name], cpu["pgbouncer+asyncpg"])
    assert "against its floor" in tiny_run["_stdout"]
    assert "floor with Postgres" in tiny_run["_stdout"]


def test_issue_14_targets_are_reported_from_the_run(tiny_run: dict[str, Any]) -> None:
    """Every run states each of issue 14's targets, its value read from this run's rows, CPU
    multiples and cold starts, and whether it is met (never asserted: timings are not)."""
    from bench.report import PER_REQUEST_TARGETS

    stated = [t for t in tiny_run["targets"] if t["target"].startswith("issue 14: ")]
    assert [t["target"] for t in stated] == [
        f"issue 14: {what} {sense} {bound:g}" for what, sense, bound in PER_REQUEST_TARGETS
    ]
    rows = {(r["workload"], r["variant"], r["competitor"]): r for r in tiny_run["results"]}

    def ratio(workload: str, variant: str, figure: str) -> float:
        mine, theirs = (rows[(workload, variant, c)] for c in ("pgbroker", "pgbouncer+asyncpg"))
        return round(mine[figure] / theirs[figure], 2)

    cold = {e["competitor"]: e["first_query_ms"]["median"] for e in tiny_run["cold_start"]}
    (multiples,) = tiny_run["cpu_multiples"]
    expected = [
        multiples["pgbroker_x_floor"],
        multiples["pgbroker_x_pgbouncer"],
        ratio("W1", "base", "tps"),
        rows[("W3", "burst", "pgbroker")]["pooler"]["cpu_s_per_1000_tx"],
        ratio("W3", "burst", "elapsed_s"),
        round(cold["pgbroker"] / cold["direct"], 2),
        ratio("W2", "base", "tps"),
    ]
    for target, value, (_, sense, bound) in zip(stated, expected, PER_REQUEST_TARGETS, strict=True):
        if value is None:  # a tiny run's PgBouncer may show no CPU tick: no multiple
            assert (target["value"], target["met"]) == ("–", False)
            continue
        assert target["value"] == f"{value:,.2f}"
        assert target["met"] is (value <= bound if sense == "<=" else value >= bound)
    assert "issue 14: nothing slower" in tiny_run["_stdout"]
    # Beside the first three, where the floor with Postgres stands on the same bound.
    stack = multiples["floor_postgres_x_pgbouncer"]
    reach = (multiples["floor_postgres_x_floor"], stack["cpu"], stack["tps"])
    for target, value, (_, sense, bound) in zip(stated, reach, PER_REQUEST_TARGETS, strict=False):
        if value is None:  # no CPU tick, as above
            assert "floor_postgres" not in target
            continue
        met = value <= bound if sense == "<=" else value >= bound
        assert target["floor_postgres"] == {"value": f"{value:,.2f}", "met": met}
    assert all("floor_postgres" not in target for target in stated[len(reach) :])
    assert "(the floor with Postgres: " in tiny_run["_stdout"]
    # And beside the seed issue's W1 p50 target (a tiny run has no light variant).
    (p50,) = [t for t in tiny_run["targets"] if t["target"].startswith("W1: pgbroker p50")]
    value = stack["p50"]
    assert p50["floor_postgres"] == {"value": f"{value:,.2f}x", "met": value <= 1.5}
