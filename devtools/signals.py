"""Signal handling shared by the demo and the benchmarks."""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator
from types import FrameType

__all__ = ["sigterm_as_interrupt"]


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Within the block, SIGTERM (e.g. from a CI timeout) raises KeyboardInterrupt like
    Ctrl-C, so the caller's cleanup stops every process it started; the previous handler is
    restored on exit. Main thread only (as `signal.signal`)."""

    def raise_interrupt(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, raise_interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
