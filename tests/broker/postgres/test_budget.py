"""The connection budget: pool_size × max_replicas must fit in what Postgres leaves over."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import subprocess
import sys
from functools import partial
from typing import Any

import pytest

from broker.config import Settings, parse_database_url
from broker.pooling.pool import Pool
from broker.postgres import pg
from broker.postgres.budget import BudgetExceeded, BudgetProbe, ConnectionBudget
from devtools.localpg import LocalPostgres


def _dsn(postgres: Any) -> str:
    return postgres.dsn + ("&" if "?" in postgres.dsn else "?") + "sslmode=disable"


def _target(postgres: Any) -> Any:
    return parse_database_url(_dsn(postgres))


async def _check(postgres: Any, pool_size: int, max_replicas: int) -> ConnectionBudget:
    """Run the start-up check as the broker does: the probe wraps a real pool's connect."""
    return (await _open_and_check(postgres, pool_size, max_replicas))[1]


async def _open_and_check(
    postgres: Any, pool_size: int, max_replicas: int
) -> tuple[dict[str, int], ConnectionBudget]:
    probe = BudgetProbe(partial(pg.connect, _target(postgres), 5.0, 30.0))
    pool = Pool(probe, size=2, max_waiting=10, queue_timeout=5.0, max_lifetime=3600.0)
    try:
        await pool.open(wait="first", timeout=10.0)
        budget = probe.check(pool_size, max_replicas)
        return pool.get_stats(), budget
    finally:
        await pool.close()


def test_budget_reads_max_connections_and_reserved_slots_from_postgres(postgres: Any) -> None:
    budget = asyncio.run(_check(postgres, 1, 1))
    assert budget.available == (
        budget.max_connections - budget.superuser_reserved_connections - budget.reserved_connections
    )
    if isinstance(postgres, LocalPostgres):
        # The session's server: max_connections 100, the default 3 superuser slots, and no
        # reserved_connections before Postgres 16.
        assert (budget.max_connections, budget.superuser_reserved_connections) == (100, 3)
        assert budget.available == 100 - 3 - budget.reserved_connections


def test_budget_accepts_pools_that_fit_exactly(postgres: Any) -> None:
    budget = asyncio.run(_check(postgres, 1, 1))
    replicas = 4
    fitting = budget.available // replicas
    asyncio.run(_check(postgres, fitting, replicas))


def test_budget_refuses_oversubscribed_pools_with_the_arithmetic(postgres: Any) -> None:
    budget = asyncio.run(_check(postgres, 1, 1))
    replicas = 4
    too_big = budget.available // replicas + 1
    with pytest.raises(BudgetExceeded) as refused:
        asyncio.run(_check(postgres, too_big, replicas))
    message = str(refused.value)
    assert (
        f"pool_size {too_big} × max_replicas {replicas} = {too_big * replicas}"
        f" > {budget.available} available" in message
    )
    assert f"max_connections {budget.max_connections}" in message
    assert f"superuser_reserved_connections {budget.superuser_reserved_connections}" in message
    assert f"at most {budget.available // replicas}" in message


def test_budget_probe_costs_no_pool_request_and_no_extra_connection(postgres: Any) -> None:
    stats, _ = asyncio.run(_open_and_check(postgres, 1, 1))
    assert stats["requests_num"] == 0
    assert stats["pool_max"] == 2 and stats["connections_num"] <= 2


def test_budget_probe_reports_a_connection_never_opened() -> None:
    probe = BudgetProbe(lambda: None)  # type: ignore[arg-type, return-value]
    with pytest.raises(BudgetExceeded, match="no database connection has been opened yet"):
        probe.check(1, 1)


def test_reserved_connections_of_postgres_16_count_against_the_budget() -> None:
    budget = ConnectionBudget(
        max_connections=100, superuser_reserved_connections=3, reserved_connections=5
    )
    assert budget.available == 92
    assert budget.check(pool_size=23, max_replicas=4) == 0
    with pytest.raises(BudgetExceeded, match=r"= 96 > 92 available .*reserved_connections 5"):
        budget.check(pool_size=24, max_replicas=4)


def test_budget_row_parses_what_postgres_returns() -> None:
    assert ConnectionBudget.from_row([100, 3, 0]) == ConnectionBudget(100, 3, 0)
    assert ConnectionBudget.from_row(["400", "3", "2"]).available == 395


def test_budget_message_does_not_suggest_a_pool_of_zero() -> None:
    budget = ConnectionBudget(max_connections=10, superuser_reserved_connections=3)
    with pytest.raises(BudgetExceeded) as refused:
        budget.check(pool_size=1, max_replicas=8)
    assert "at most 0" not in str(refused.value)
    assert "lower PGBROKER_MAX_REPLICAS" in str(refused.value)


def _settings_have(name: str) -> bool:
    return name in {f.name for f in dataclasses.fields(Settings)}


def _start_broker(dsn: str, **settings: str) -> subprocess.CompletedProcess[str]:
    """``python -m broker run`` on *dsn* with *settings*; expected to refuse to start."""
    env = dict(os.environ, PGBROKER_DATABASE_URL=dsn, PGBROKER_LISTEN="127.0.0.1:0", **settings)
    return subprocess.run(
        [sys.executable, "-m", "broker", "run"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.mark.skipif(
    not _settings_have("max_replicas"), reason="the broker has no PGBROKER_MAX_REPLICAS yet"
)
def test_broker_refuses_to_start_over_budget_with_the_arithmetic(postgres: Any) -> None:
    available = asyncio.run(_check(postgres, 1, 1)).available
    replicas = 4
    done = _start_broker(
        _dsn(postgres),
        PGBROKER_POOL_SIZE=str(available // replicas + 1),
        PGBROKER_MAX_REPLICAS=str(replicas),
    )
    assert done.returncode != 0
    assert "connection budget exceeded" in done.stderr
    assert f"> {available} available" in done.stderr


def test_a_pool_far_over_budget_is_refused_after_one_connection() -> None:
    """pool_size 100000 (a typo for 100): refused on the first connection, before the broker
    opens the rest, instead of 100000 connect attempts and threads hammering Postgres."""
    tag = "pgbroker-huge-pool"
    with LocalPostgres(extra_conf={"log_connections": "on"}) as server:
        done = _start_broker(_dsn(server) + f"&application_name={tag}", PGBROKER_POOL_SIZE="100000")
        assert done.returncode != 0
        assert "pool_size 100000 × max_replicas 1 = 100000 >" in done.stderr
        # Postgres logs "connection authorized: user=… application_name=<tag>" per session.
        opened = server.log().count(f"application_name={tag}")
        assert opened == 1, server.log()[-3000:]
