"""The GIL switch interval is short only while heavy work runs (issue 14 kept issue 15's gain
for heavy requests without charging every request for it: docs/performance.md)."""

from __future__ import annotations

import sys
import threading
from collections.abc import Iterator

import pytest

from broker.sql.stack import BUSY_SWITCH_INTERVAL, ParserThreads, short_switch_interval


@pytest.fixture
def idle_interval() -> Iterator[float]:
    before = sys.getswitchinterval()
    sys.setswitchinterval(0.005)
    yield 0.005
    sys.setswitchinterval(before)


def test_a_parser_thread_job_runs_with_the_short_interval_and_puts_it_back(
    idle_interval: float,
) -> None:
    threads = ParserThreads(threads=2, stack_bytes=1024 * 1024)
    try:
        seen = threads.submit(sys.getswitchinterval).result(timeout=10)
        assert seen == pytest.approx(BUSY_SWITCH_INTERVAL)
        assert sys.getswitchinterval() == pytest.approx(idle_interval)
    finally:
        threads.shutdown()


def test_the_interval_comes_back_only_when_the_last_holder_leaves(idle_interval: float) -> None:
    threads = ParserThreads(threads=2, stack_bytes=1024 * 1024)
    release = threading.Event()
    started = threading.Barrier(3)

    def hold() -> float:
        started.wait(timeout=10)
        release.wait(timeout=10)
        return sys.getswitchinterval()

    try:
        first, second = threads.submit(hold), threads.submit(hold)
        started.wait(timeout=10)
        assert sys.getswitchinterval() == pytest.approx(BUSY_SWITCH_INTERVAL)
        with short_switch_interval():  # a heavy Execute on the loop's side, at the same time
            release.set()
            assert first.result(timeout=10) == pytest.approx(BUSY_SWITCH_INTERVAL)
            assert second.result(timeout=10) == pytest.approx(BUSY_SWITCH_INTERVAL)
            assert sys.getswitchinterval() == pytest.approx(BUSY_SWITCH_INTERVAL)
        assert sys.getswitchinterval() == pytest.approx(idle_interval)
    finally:
        threads.shutdown()


def test_a_failing_job_puts_the_interval_back(idle_interval: float) -> None:
    threads = ParserThreads(threads=1, stack_bytes=1024 * 1024)

    def fail() -> None:
        raise ValueError("bad request")

    try:
        with pytest.raises(ValueError):
            threads.submit(fail).result(timeout=10)
        assert sys.getswitchinterval() == pytest.approx(idle_interval)
    finally:
        threads.shutdown()
