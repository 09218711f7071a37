"""Run a blocking pg8000 function on the event loop, in a greenlet (``PGBROKER_PG_IO=loop``).

The loop side of `broker.postgres.greenio`: `run_on_loop` starts *fn* in a runner greenlet
(an `IoGreenlet`) at once (it runs up to its first wait: usually the request is written and
the reply not yet there) and returns a future for its result. Each `Wait` the greenlet
switches out with is served by a callback, never a task: a reader or writer on the descriptor
(removed when it fires), or one ``call_soon`` for a turn; then the greenlet is switched back
in. What *fn* returns or raises settles the future.

Runners are reused: one takes job after job (`_serve`), and between jobs it waits in a free
list of this thread (at most `IDLE_RUNNERS`). A new greenlet's first Python frame allocates a
fresh 16 KiB frame data stack (CPython 3.11: an ``mmap``, ``munmap``-ed when the greenlet
dies, with page faults and TLB shootdowns in between); a runner keeps its own. A job that
raised an `Exception` leaves its runner reusable (nothing of the job stays on it); one that
raised anything else (``GreenletExit``, ``KeyboardInterrupt``) ends the runner, which is
discarded.

Like a worker thread, the greenlet runs to its end whoever awaits the future: a cancelled
caller awaits it through ``asyncio.shield`` (broker/flow/cancel.py ``settle``), so the
connection is never handed on in the middle of the protocol (nor the runner reused in the
middle of a job). A socket timeout (none on the broker's connections) is thrown into the
greenlet as ``TimeoutError``, which pg8000 reports as a network error, as it would on a
blocking socket.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from time import perf_counter
from typing import Any, TypeVar

from greenlet import getcurrent

from broker.postgres.greenio import READ, TURN, IoGreenlet, Wait

__all__ = ["IDLE_RUNNERS", "idle_runners", "run_on_loop"]

_T = TypeVar("_T")

# Idle runner greenlets kept per thread. A loop runs at most one job per server connection at
# once (pool_size, 20 by default, plus replica pools); runners beyond this are let go.
IDLE_RUNNERS = 64


class _Runners(threading.local):
    """This thread's idle runners (a greenlet can only run on the thread that made it)."""

    def __init__(self) -> None:
        self.idle: list[IoGreenlet] = []


_runners = _Runners()

# What a runner switches to its driver when its job is over (the outcome is on the `_Drive`).
_DONE = object()


def run_on_loop(
    loop: asyncio.AbstractEventLoop, fn: Callable[..., _T], *args: Any
) -> asyncio.Future[_T]:
    """Run *fn(*args)* in a greenlet driven by *loop* (the running loop, this thread);
    return a future for its result."""
    drive = _Drive(loop, fn, args)
    drive.start()
    return drive.future


def idle_runners() -> int:
    """How many runner greenlets wait for a job on this thread (for tests)."""
    return len(_runners.idle)


def _serve() -> None:
    """A runner greenlet's body: run each job a driver hands it (`IoGreenlet.job`), leave its
    outcome on the driver, and wait for the next one. Holds nothing of a job while it waits
    (the job comes as an attribute, not as an argument: a greenlet's first switch keeps its
    arguments for as long as it lives)."""
    runner = getcurrent()
    while True:
        drive, runner.job = runner.job, None
        try:
            drive.result = drive.fn(*drive.args)
        except Exception as exc:  # the caller's to see; anything else ends the runner
            drive.error = exc
        drive = None
        runner.parent.switch(_DONE)


class _Drive:
    """One job on a runner greenlet and the future of its result; `step` switches the runner
    in until it waits or the job is over."""

    __slots__ = (
        "args",
        "error",
        "events",
        "fd",
        "fn",
        "future",
        "glet",
        "loop",
        "result",
        "timer",
    )

    def __init__(
        self, loop: asyncio.AbstractEventLoop, fn: Callable[..., Any], args: tuple[Any, ...]
    ) -> None:
        self.loop = loop
        self.future: asyncio.Future[Any] = loop.create_future()
        self.fn = fn
        self.args = args
        self.result: Any = None
        self.error: BaseException | None = None
        self.fd = -1
        self.events = TURN
        self.timer: asyncio.TimerHandle | None = None
        current = getcurrent()
        idle = _runners.idle
        if idle:
            glet = idle.pop()
            if glet.parent is not current:
                glet.parent = current
        else:
            glet = IoGreenlet(_serve, current)
        self.glet = glet

    def start(self) -> None:
        """Hand the job to the runner; its slice starts now."""
        self.glet.job = self
        self.glet.resumed_at = perf_counter()
        self.step()

    def step(self, error: BaseException | None = None) -> None:
        glet = self.glet
        try:
            wait = glet.throw(error) if error is not None else glet.switch()
        except BaseException as exc:  # not an Exception: it ended the runner (not reused)
            if not self.future.done():
                self.future.set_exception(exc)
            raise
        if wait is _DONE:
            self._done()
        else:
            self._await(wait)

    def _done(self) -> None:
        idle = _runners.idle
        if len(idle) < IDLE_RUNNERS:
            idle.append(self.glet)
        future = self.future
        if not future.done():
            if self.error is not None:
                future.set_exception(self.error)
            else:
                future.set_result(self.result)

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
