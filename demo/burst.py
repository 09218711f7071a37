"""A burst of simulated Lambda invocations, one thread per container, released at once.

Each thread stands for one Lambda container: it builds its own database client (a container's
module-level client), waits for the release, runs one invocation, then keeps its client open,
as a warm container keeps its connection, until every invocation of the burst has finished.
That is what exhausts ``max_connections`` when each container connects directly.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Burst", "Invocation", "Outcome", "percentile"]

# 1000 threads at the default 8 MiB stack reserve 8 GiB of address space; 512 KiB is plenty
# for pg8000 or a gRPC call and keeps the burst small on a shared 2-core machine.
THREAD_STACK_SIZE = 512 * 1024


@dataclass
class Outcome:
    """What one invocation did. Times are monotonic seconds; *started* is when its database
    work could begin (connection open, or the broker's queue left), None if it never did."""

    index: int
    released: float = 0.0
    started: float | None = None
    finished: float = 0.0
    error: str | None = None
    queue_wait: float | None = None  # seconds queued in the broker, when it says

    @property
    def ok(self) -> bool:
        return self.error is None


class Invocation:
    """One container's run: ``setup()`` builds its client before the release, ``invoke()``
    runs the handler once and returns when its database work could start (monotonic seconds,
    or None if unknown), ``close()`` releases the client at the end of the burst."""

    queue_wait: float | None = None  # seconds the broker queued the call, if known

    def setup(self) -> None:
        """Build the container's client; nothing connects yet."""

    def invoke(self) -> float | None:
        raise NotImplementedError

    def close(self) -> None:
        """Close the container's client."""


@dataclass
class Burst:
    """*count* invocations made by *factory(index)*, released together by `run`."""

    count: int
    factory: Callable[[int], Invocation]
    outcomes: list[Outcome] = field(default_factory=list)
    released_at: float = 0.0
    finished_at: float = 0.0
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _done: int = 0
    _failed: int = 0
    _all_done: threading.Event = field(default_factory=threading.Event)

    @property
    def completed(self) -> int:
        return self._done - self._failed

    @property
    def failed(self) -> int:
        return self._failed

    @property
    def waiting(self) -> int:
        return self.count - self._done

    def run(self, on_tick: Callable[[Burst], None] | None = None, tick: float = 0.1) -> None:
        """Start every container, release them at once, wait for all invocations, then close
        every client. *on_tick* is called every *tick* seconds meanwhile (live progress)."""
        self.outcomes = [Outcome(i) for i in range(self.count)]
        release = threading.Event()
        close = threading.Event()
        ready = threading.Semaphore(0)
        previous = threading.stack_size(THREAD_STACK_SIZE)
        try:
            threads = [
                threading.Thread(
                    target=self._container,
                    args=(self.outcomes[i], release, close, ready),
                    name=f"container-{i}",
                    daemon=True,  # Ctrl-C must not wait for a stuck invocation
                )
                for i in range(self.count)
            ]
            for thread in threads:
                thread.start()
        finally:
            threading.stack_size(previous)
        for _ in range(self.count):
            ready.acquire()
        self.released_at = time.monotonic()
        release.set()
        try:
            while not self._all_done.wait(tick):
                if on_tick:
                    on_tick(self)
        except BaseException:
            close.set()  # Ctrl-C: let the containers go, do not wait for them
            raise
        self.finished_at = max((o.finished for o in self.outcomes), default=time.monotonic())
        if on_tick:
            on_tick(self)
        close.set()
        for thread in threads:
            thread.join(timeout=30)

    def _container(
        self,
        outcome: Outcome,
        release: threading.Event,
        close: threading.Event,
        ready: threading.Semaphore,
    ) -> None:
        invocation: Invocation | None = None
        try:
            invocation = self.factory(outcome.index)
            invocation.setup()
        except Exception as exc:
            outcome.error = _describe(exc)
        ready.release()
        release.wait()
        outcome.released = time.monotonic()
        if invocation is not None and outcome.error is None:
            try:
                outcome.started = invocation.invoke()
                outcome.queue_wait = invocation.queue_wait
            except Exception as exc:
                outcome.error = _describe(exc)
        outcome.finished = time.monotonic()
        self._finish(outcome)
        close.wait()
        if invocation is not None:
            with contextlib.suppress(Exception):
                invocation.close()

    def _finish(self, outcome: Outcome) -> None:
        with self._lock:
            self._done += 1
            if not outcome.ok:
                self._failed += 1
            if self._done == self.count:
                self._all_done.set()

    def errors(self) -> Counter[str]:
        """Each distinct error message with how many invocations it ended."""
        return Counter(o.error for o in self.outcomes if o.error is not None)

    def waits(self) -> list[float]:
        """Seconds from release to the start of the database work, successful invocations."""
        return [o.started - o.released for o in self.outcomes if o.ok and o.started is not None]

    def queue_waits(self) -> list[float]:
        """Seconds each successful invocation waited in the broker's queue, where known."""
        return [o.queue_wait for o in self.outcomes if o.ok and o.queue_wait is not None]

    def latencies(self) -> list[float]:
        """Seconds from release to the handler's return, successful invocations."""
        return [o.finished - o.released for o in self.outcomes if o.ok]


def _describe(exc: BaseException) -> str:
    """The error as a person would report it: Postgres' own message when there is one."""
    if isinstance(report := getattr(exc, "report", None), str):  # already worded
        return report
    args = exc.args[0] if exc.args else None
    if isinstance(args, dict) and "M" in args:  # pg8000's error fields
        severity = args.get("S", "ERROR")
        return f"{severity}: {args['M']} (SQLSTATE {args.get('C', '?')})"
    text = str(exc) or type(exc).__name__
    return f"{type(exc).__name__}: {text}"


def percentile(values: list[float], pct: float) -> float | None:
    """The *pct* percentile (nearest rank) of *values*, or None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, round(pct / 100 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def summarize_times(values: list[float]) -> dict[str, Any]:
    """p50/p95/p99 in milliseconds, rounded for display and JSON."""
    out: dict[str, Any] = {}
    for pct in (50, 95, 99):
        value = percentile(values, pct)
        out[f"p{pct}"] = None if value is None else round(value * 1000, 2)
    return out
