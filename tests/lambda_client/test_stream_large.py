"""Large streamed reads through a real broker process: 5 million rows, and 200 MB of bytea
checked row by row, with the resident memory of the broker and of the client (a child
process running `bench.stream_memory`) sampled every 20 ms.

The bound: each side stays under ``MAX_GROWTH_MB`` (100 MB) over its idle size, whatever the
result's size (the buffered path needed 1.3 GB in the broker and 1.1 GB in the client for 5
million rows). These take minutes on a shared 2-core machine, so they run only with
``PGBROKER_LARGE_TESTS=1`` (``make test-large``), not in ``make test``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from devtools.brokerproc import BrokerProcess

ROOT = Path(__file__).resolve().parents[2]
MAX_GROWTH_MB = 100

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(1200),
    pytest.mark.skipif(
        os.environ.get("PGBROKER_LARGE_TESTS") != "1",
        reason="minutes long: make test-large (PGBROKER_LARGE_TESTS=1)",
    ),
]


@pytest.fixture(scope="module")
def broker(postgres: Any) -> Iterator[BrokerProcess]:
    # One process: the broker RSS measured is the serving process's (not a supervisor's).
    dsn = postgres.dsn + "?sslmode=disable"
    with BrokerProcess(dsn, pool_size=2, auth="none", workers=1) as process:
        yield process


def measure(broker: BrokerProcess, *args: str) -> dict[str, Any]:
    argv = [sys.executable, "-m", "bench.stream_memory", "broker", "--target", broker.target]
    argv += ["--broker-pid", str(broker.pid), *args]
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=900, check=True)
    figures: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    print(figures)
    return figures


def assert_bounded(figures: dict[str, Any]) -> None:
    assert figures["client_peak_mb"] - figures["client_idle_mb"] < MAX_GROWTH_MB, figures
    assert figures["broker_peak_mb"] - figures["broker_idle_mb"] < MAX_GROWTH_MB, figures


def test_five_million_rows_stream_in_bounded_memory(broker: BrokerProcess) -> None:
    figures = measure(broker, "--rows", "5000000")
    assert figures["rows"] == 5_000_000
    assert_bounded(figures)


def test_200_mb_of_bytea_streams_intact_in_bounded_memory(broker: BrokerProcess) -> None:
    figures = measure(broker, "--bytea-mb", "200")
    assert figures["rows"] == 200
    assert figures["mismatches"] == 0  # each row's md5 from Postgres matches what arrived
    assert_bounded(figures)
