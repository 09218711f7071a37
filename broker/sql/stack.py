"""Threads with a stack deep enough for pglast: where long SQL is parsed (issue 15).

Since the plan reads libpg_query's JSON tree (broker/sql/tree.py) instead of pglast's Python
AST, nothing in the broker calls ``pglast.parse_sql`` any more, and the hazard below is gone
from the planner: the JSON is written by libpg_query under its own stack check and read
without recursion. The threads still take a big request's analysis off the event loop (last
paragraph); the history is kept because the same rule holds for any code that would walk a
parse tree recursively.

``pglast.parse_sql`` turns libpg_query's parse tree into Python objects with C recursion, one
C frame chain per tree level, and never checks the stack. Postgres' grammar nests *left
recursive* chains (``1+1+…``, ``'a'||'b'||…``, ``x::int::int…``, ``x IS NULL IS NULL…``)
without its parser stack limit, so their depth grows with the SQL's length: a 50 KB
``SELECT 1+1+…`` (25,000 levels) overflowed a thread's default 8 MB stack and killed the
broker with SIGSEGV. Measured with pglast 8.8 on x86-64 (scripts/parse_depth.py):

==========================  ========================  ================================
chain                        C stack per level          deepest libpg_query's own check
                             (pglast.parse_sql)         lets through (parse_sql_json)
==========================  ========================  ================================
``1+1+…``, ``'a'||…``        ~357 bytes                 16,219 levels (5.8 MB in pglast)
``1::int::int…``             ~258 bytes                 32,429 levels (8.4 MB in pglast)
``(((…)))``, ``NOT NOT …``   parser stack: refused at 10,000 levels ("memory exhausted")
==========================  ========================  ================================

So the sound rule, in `broker.sql.plan`, is two bounds that do not depend on guessing a
depth from the text:

* SQL of up to ``DIRECT_PARSE_CHARS`` characters nests at most that many levels (every
  level takes a token), under 1 MB of stack: it is parsed on whatever thread asks;
* longer SQL is first checked by libpg_query's own output code, which checks its stack
  depth as Postgres does and refuses with "stack depth limit exceeded" (Postgres answers
  such SQL with 54001 too): that caps the depth at ~32,000 levels whatever the length.
  It is then parsed on one of these threads, whose ``STACK_BYTES`` (128 MB of address
  space, touched only as deep as a parse goes) is 15 times the deepest measured need.

The check costs ~60 ms per MB of SQL, against ~2.6 s per MB for ``parse_sql`` itself. A
thread with a large stack was chosen over a separate process: a process would need every
plan pickled back, and a crash there would still lose the request; over bounding the length
alone: 50 KB of SQL is a legitimate bulk ``INSERT``.

The same threads run a big request's analysis (`broker.front.service.validate`) off the
event loop, so binding 65,535 parameters or planning a 1 MB statement does not stall other
callers. They still share the GIL with the loop, which Python hands over every
``sys.getswitchinterval()`` (5 ms by default): while any of these threads runs a job, and while
a heavy request runs (`short_switch_interval`), the interval is ``BUSY_SWITCH_INTERVAL``
(1 ms), so the loop gets the GIL back quickly (with 5 ms a 65,535-parameter request added
230-320 ms to other callers' p99, with 1 ms 60-120 ms: docs/performance.md), and back to what
it was once none runs. Not 1 ms all the time: that cost a third of W2's throughput (the pool's
worker threads and the loop trade the GIL five times as often; issue 14's A/B in
docs/performance.md).
"""

from __future__ import annotations

import queue
import sys
import threading
from collections.abc import Callable
from concurrent.futures import Executor, Future
from typing import Any, TypeVar

__all__ = [
    "BUSY_SWITCH_INTERVAL",
    "STACK_BYTES",
    "THREADS",
    "ParserThreads",
    "on_parser_thread",
    "parser_threads",
    "run_on_parser_thread",
    "short_switch_interval",
]

T = TypeVar("T")

STACK_BYTES = 128 * 1024 * 1024
# Several, so one 2 s parse of a 1 MB statement does not queue every other request behind it.
THREADS = 4

# Seconds a thread may hold the GIL while another waits, while a parser thread runs a job.
BUSY_SWITCH_INTERVAL = 0.001

_local = threading.local()


class _ShortSwitchWhileBusy:
    """Sets ``sys.setswitchinterval(BUSY_SWITCH_INTERVAL)`` while at least one job runs (over
    all parser threads) and puts back the interval found when the first one started."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._running = 0
        self._idle_interval = sys.getswitchinterval()

    def __enter__(self) -> None:
        with self._lock:
            if self._running == 0:
                self._idle_interval = sys.getswitchinterval()
                sys.setswitchinterval(min(BUSY_SWITCH_INTERVAL, self._idle_interval))
            self._running += 1

    def __exit__(self, *exc: object) -> None:
        with self._lock:
            self._running -= 1
            if self._running == 0:
                sys.setswitchinterval(self._idle_interval)


_busy = _ShortSwitchWhileBusy()


def short_switch_interval() -> _ShortSwitchWhileBusy:
    """A context manager holding the GIL switch interval at ``BUSY_SWITCH_INTERVAL`` while it
    is entered (also from other threads at once: the interval comes back when the last one
    leaves). A parser thread's job holds it; so does a heavy request while it runs on a pool
    worker (broker/front/service.py), whose pg8000 encoding of 65,535 values is Python too."""
    return _busy


class ParserThreads(Executor):
    """A fixed set of daemon threads with ``STACK_BYTES`` stacks running submitted calls in
    order (a `concurrent.futures.Executor`: usable with ``loop.run_in_executor``).

    Raise RuntimeError from `submit` after `shutdown`."""

    def __init__(self, threads: int = THREADS, stack_bytes: int = STACK_BYTES) -> None:
        self._queue: queue.SimpleQueue[tuple[Future[Any], Callable[[], Any]] | None] = (
            queue.SimpleQueue()
        )
        self._closed = False
        self._threads: list[threading.Thread] = []
        # threading.stack_size is process-wide and read when a thread starts: set it only
        # while these threads start, then put back what was there.
        previous = threading.stack_size(stack_bytes)
        try:
            for index in range(threads):
                thread = threading.Thread(
                    target=self._work, name=f"pgbroker-parser-{index}", daemon=True
                )
                thread.start()
                self._threads.append(thread)
        finally:
            threading.stack_size(previous)

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> Future[T]:
        if self._closed:
            raise RuntimeError("parser threads are shut down")
        future: Future[T] = Future()
        self._queue.put((future, lambda: fn(*args, **kwargs)))
        return future

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        self._closed = True
        for _ in self._threads:
            self._queue.put(None)
        if wait:
            for thread in self._threads:
                thread.join()

    def _work(self) -> None:
        _local.deep_stack = True
        while (item := self._queue.get()) is not None:
            future, call = item
            if not future.set_running_or_notify_cancel():
                continue
            try:
                with _busy:
                    result = call()
                future.set_result(result)
            except BaseException as exc:  # the caller gets it from the future
                future.set_exception(exc)


def on_parser_thread() -> bool:
    """True on one of the `ParserThreads` (whose stack holds any parse libpg_query allows)."""
    return getattr(_local, "deep_stack", False)


_shared: ParserThreads | None = None
_shared_lock = threading.Lock()


def parser_threads() -> ParserThreads:
    """The process's parser threads, started on first use (nothing starts at import)."""
    global _shared
    with _shared_lock:
        if _shared is None:
            _shared = ParserThreads()
        return _shared


def run_on_parser_thread(fn: Callable[..., T], *args: Any) -> T:
    """*fn*(*args*) on a parser thread (here if this is one), its result or its exception."""
    if on_parser_thread():
        return fn(*args)
    return parser_threads().submit(fn, *args).result()
