"""Run a blocking pg8000 function on the event loop, in a greenlet (``PGBROKER_PG_IO=loop``).

The loop side of `broker.postgres.greenio`: `run_on_loop` starts *fn* in an `IoGreenlet` at
once (it runs up to its first wait: usually the request is written and the reply not yet
there) and returns a future for its result. Each `Wait` the greenlet switches out with is
served by a callback, never a task: a reader or writer on the descriptor (removed when it
fires), or one ``call_soon`` for a turn; then the greenlet is switched back in. What *fn*
returns or raises settles the future.

Like a worker thread, the greenlet runs to its end whoever awaits the future: a cancelled
caller awaits it through ``asyncio.shield`` (broker/flow/cancel.py ``settle``), so the
connection is never handed on in the middle of the protocol. A socket timeout (none on the
broker's connections) is thrown into the greenlet as ``TimeoutError``, which pg8000 reports as
a network error, as it would on a blocking socket.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from time import perf_counter
from typing import Any, TypeVar

from greenlet import getcurrent

from broker.postgres.greenio import READ, TURN, IoGreenlet, Wait

__all__ = ["run_on_loop"]

_T = TypeVar("_T")


def run_on_loop(
    loop: asyncio.AbstractEventLoop, fn: Callable[..., _T], *args: Any
) -> asyncio.Future[_T]:
    """Run *fn(*args)* in a greenlet driven by *loop* (the running loop, this thread);
    return a future for its result."""
    drive = _Drive(loop, fn)
    drive.step(args)
    return drive.future


class _Drive:
    """One greenlet and the future of its result; `step` switches it in until it waits."""

    __slots__ = ("events", "fd", "future", "glet", "loop", "timer")

    def __init__(self, loop: asyncio.AbstractEventLoop, fn: Callable[..., Any]) -> None:
        self.loop = loop
        self.future: asyncio.Future[Any] = loop.create_future()
        self.glet = IoGreenlet(fn, getcurrent())
        self.glet.resumed_at = perf_counter()
        self.fd = -1
        self.events = TURN
        self.timer: asyncio.TimerHandle | None = None

    def step(self, args: tuple[Any, ...] = (), error: BaseException | None = None) -> None:
        try:
            wait = self.glet.throw(error) if error is not None else self.glet.switch(*args)
        except BaseException as exc:  # what fn raised: the caller's to see
            if not self.future.done():
                self.future.set_exception(exc)
            if not isinstance(exc, Exception):
                raise
            return
        if self.glet.dead:
            if not self.future.done():
                self.future.set_result(wait)
            return
        self._await(wait)

    def _await(self, wait: Wait) -> None:
        loop = self.loop
        if wait.events == TURN:
            loop.call_soon(self.step)
            return
        self.fd = wait.fd
        self.events = wait.events
        if wait.events == READ:
            loop.add_reader(wait.fd, self._ready)
        else:
            loop.add_writer(wait.fd, self._ready)
        if wait.timeout is not None:
            self.timer = loop.call_later(wait.timeout, self._timed_out)

    def _stop_waiting(self) -> None:
        if self.events == READ:
            self.loop.remove_reader(self.fd)
        else:
            self.loop.remove_writer(self.fd)
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _ready(self) -> None:
        self._stop_waiting()
        self.step()

    def _timed_out(self) -> None:
        self.timer = None
        self._stop_waiting()
        self.step(error=TimeoutError("timed out"))
