"""Heavy requests do not stall the event loop (issue 15): their values are bound and their
SQL planned on the parser threads (broker/sql/stack.py), so other callers keep being served.

Timing belongs in benchmarks (bench/bigresults.py measures the SELECT 1 p99 under these
requests); this test asserts the behaviour: the loop keeps running while they are analysed,
with a lag threshold far above what the broker shows (~0.3 s at most) and far below what the
old on-loop analysis took (2-5 s per request)."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import pytest

from tests.support import request, rows

STALL = 1.5  # seconds of loop lag that count as a stall


class LoopLag:
    """Samples the broker loop's lag (how late a 10 ms sleep wakes up) until stopped."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._future = asyncio.run_coroutine_threadsafe(self._run(), loop)

    async def _run(self) -> None:
        while not self._stop.is_set():
            started = time.perf_counter()
            await asyncio.sleep(0.01)
            self.samples.append(time.perf_counter() - started - 0.01)

    def stop(self) -> list[float]:
        self._stop.set()
        self._future.result(30)
        return self.samples


@pytest.fixture(scope="module")
def broker(postgres: Any) -> Any:
    from tests.fixtures.brokers import InProcessBroker

    with InProcessBroker(postgres.dsn, pool_size=2) as started:
        yield started


@pytest.mark.parametrize(
    ("name", "heavy", "expected"),
    [
        (
            "65,535 parameters",
            lambda: request(
                (
                    "SELECT cardinality(ARRAY["
                    + ",".join(f"${i}::int" for i in range(1, 65536))
                    + "])",
                    list(range(65535)),
                )
            ),
            65535,
        ),
        (
            "1M-element array",
            lambda: request(("SELECT cardinality($1::int[])", [list(range(1_000_000))])),
            1_000_000,
        ),
    ],
)
def test_a_heavy_request_leaves_the_loop_responsive(
    broker: Any, name: str, heavy: Any, expected: int
) -> None:
    req = heavy()
    lag = LoopLag(broker.loop)
    try:
        reply = broker.execute(req, timeout=120)
        # Other callers are answered meanwhile, too.
        assert rows(broker.execute(request("SELECT 1")).results[0]) == [(1,)]
    finally:
        samples = lag.stop()
    assert rows(reply.results[0]) == [(expected,)]
    assert len(samples) > 20, "the loop barely ran while the request was analysed"
    stalls = [round(s, 2) for s in samples if s > STALL]
    assert not stalls, f"{name}: the loop stalled for {stalls} s"
