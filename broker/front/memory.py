"""Give memory back after big results (issue 15): ``malloc_trim`` when RSS has grown.

A result is built from Python objects (pg8000's rows, then protobuf messages) on the pool's
worker threads; once it is sent or refused they are freed, but glibc keeps the freed memory
in its heaps: each worker thread allocates from its own malloc arena, and an arena only
shrinks from its top. Measured (bench/bigresults.py, a 3M-row result refused by the row
limit then ten concurrent 300k-row results): RSS went from 54 MB to a 797 MB peak and stayed
at 201 MB. ``malloc_trim(0)`` returns every free page of every arena to the kernel
(``madvise(MADV_DONTNEED)``), whatever its place in the heap.

Two glibc settings keep the heaps from fragmenting in the first place; `tune_malloc` sets them
at start (``MALLOC_ARENA_MAX`` / ``MALLOC_MMAP_THRESHOLD_`` in the environment override them):

* at most ``ARENA_MAX`` malloc arenas instead of 8 per core: the pool's worker threads then
  share heaps instead of each keeping its own high-water mark;
* a fixed mmap threshold (128 KiB): glibc otherwise raises it after each big free, up to
  32 MB, so later big buffers (a serialized result) land in the heaps and fragment them.

With both, the same load left RSS at 84 MB instead of 187 MB (malloc_trim alone: 187 MB).

What stayed (+44–57 % over the pre-load RSS) was Python's own small-object allocator
(pymalloc): it returns a 1 MiB arena to the system only once every 16 KiB pool in it is
free, and after the load ~32 arenas held 2,029 empty pools (33 MB resident) pinned by the
few objects allocated during the load that live on (``sys._debugmallocstats``: 17.2 MB in
blocks before and after, 18 → 50 arenas). `exec_with_malloc` makes glibc malloc the object
allocator (``PYTHONMALLOC=malloc``, read only at interpreter start, hence the re-exec), so
freed objects are heap chunks that ``malloc_trim`` returns page by page: RSS then comes back
to +0–2 %. It costs CPU: pymalloc is faster for small objects (docs/performance.md).

`MemoryTrimmer` reads the process's RSS every ``interval`` seconds (``/proc/self/statm``: a
few µs) and, while it is ``growth`` bytes or more above the lowest RSS seen (the idle level),
calls ``malloc_trim(0)`` on a thread (ctypes releases the GIL; it takes a few ms per 100 MB
of heap, while other threads' mallocs wait for the arena it walks). Under a steady big load
that is one trim per interval that finds little to return; when the load ends, the first
trim gives the freed memory back. Nothing is done where glibc is not the allocator (musl,
macOS): ``malloc_trim`` is not found there.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import gc
import logging
import os
import sys
from collections.abc import Callable

__all__ = [
    "MemoryTrimmer",
    "exec_with_malloc",
    "malloc_trim",
    "rss_bytes",
    "tune_gc",
    "tune_malloc",
]

log = logging.getLogger("pgbroker.memory")

INTERVAL = 2.0
GROWTH = 32 * 1024 * 1024
# RSS that moved less than this between two checks has held still: the load is over.
STEADY = 1024 * 1024
ARENA_MAX = 2
MMAP_THRESHOLD = 128 * 1024
# mallopt parameters (glibc malloc.h).
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8


def _find_malloc_trim() -> Callable[[int], int] | None:
    with contextlib.suppress(OSError, AttributeError):
        trim = ctypes.CDLL(None).malloc_trim
        trim.argtypes = [ctypes.c_size_t]
        trim.restype = ctypes.c_int
        return trim  # type: ignore[no-any-return]
    return None


_malloc_trim = _find_malloc_trim()


def exec_with_malloc(allocator: str) -> None:
    """With *allocator* ``malloc`` (`Settings.object_allocator`), restart this process in place
    (`os.execve`: same pid, argv and environment) with ``PYTHONMALLOC=malloc``, which only
    takes effect at interpreter start; return when there is nothing to do (``pymalloc``,
    ``PYTHONMALLOC`` already set, no glibc) or the exec fails. Call before any thread starts."""
    if allocator != "malloc" or "PYTHONMALLOC" in os.environ or _malloc_trim is None:
        return
    argv = getattr(sys, "orig_argv", None) or []
    if not argv or not sys.executable:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    with contextlib.suppress(OSError):  # then serve with pymalloc rather than not at all
        os.execve(sys.executable, argv, {**os.environ, "PYTHONMALLOC": "malloc"})


def tune_malloc() -> bool:
    """Set glibc's arena count and mmap threshold (see the module docstring), unless the
    environment sets them; False where glibc's ``mallopt`` is not there. Call early, before
    the pool's threads start."""
    with contextlib.suppress(OSError, AttributeError):
        mallopt = ctypes.CDLL(None).mallopt
        mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        if "MALLOC_ARENA_MAX" not in os.environ:
            mallopt(_M_ARENA_MAX, ARENA_MAX)
        if "MALLOC_MMAP_THRESHOLD_" not in os.environ:
            mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)
        return True
    return False


# The cyclic garbage collector's first threshold (Python's default: 700 allocations). Every
# request allocates hundreds of tracked objects (protobuf messages, futures, handles, pg8000's
# rows), almost all freed by reference counting, so at 700 a young-generation collection ran
# every few requests and promoted the objects of the requests in flight to older generations,
# which then needed full collections over the whole heap.
GC_THRESHOLD0 = 10_000


def tune_gc() -> None:
    """Make the cyclic GC cheap per request; call once serving (everything start-up
    allocated is then alive for good).

    ``gc.freeze()`` moves every object alive now (modules, protobuf descriptors, settings,
    the pool) to a permanent generation that collections no longer walk: a full collection
    walked ~60,000 of them (33 ms on the 2-core bench machine) every few hundred requests.
    The first threshold goes up to `GC_THRESHOLD0` (see there); garbage cycles are still
    collected, a little later. Measured in docs/performance.md ("the cyclic GC")."""
    gc.collect()  # what start-up left as garbage, before freezing
    gc.freeze()
    _, threshold1, threshold2 = gc.get_threshold()
    gc.set_threshold(max(GC_THRESHOLD0, gc.get_threshold()[0]), threshold1, threshold2)


def malloc_trim() -> bool:
    """Return free heap memory to the kernel (glibc); False where there is no such call."""
    if _malloc_trim is None:
        return False
    _malloc_trim(0)
    return True


def rss_bytes() -> int | None:
    """This process's resident set size (Linux ``/proc/self/statm``), else None."""
    try:
        with open("/proc/self/statm", "rb") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


class MemoryTrimmer:
    """Calls `malloc_trim` off the event loop while RSS is *growth* bytes or more above the
    lowest RSS seen, checking every *interval* seconds; `start` on the loop, `stop` at
    shutdown."""

    def __init__(self, interval: float = INTERVAL, growth: int = GROWTH) -> None:
        self.interval = interval
        self.growth = growth
        self.trims = 0
        self._task: asyncio.Task[None] | None = None
        self._floor = rss_bytes() or 0
        self._last = self._floor  # RSS at the previous check
        self._trimmed_steady = False  # trimmed at the level RSS has held since

    def start(self) -> None:
        if self._task is None and _malloc_trim is not None and rss_bytes() is not None:
            self._task = asyncio.get_running_loop().create_task(self._watch())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _watch(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.interval)
            rss = rss_bytes() or 0
            self._floor = min(self._floor, rss)
            steady = abs(rss - self._last) < STEADY
            if not steady:
                self._trimmed_steady = False
            if self._should_trim(rss, steady):
                await loop.run_in_executor(None, malloc_trim)
                self.trims += 1
                after = rss_bytes() or 0
                self._floor = min(self._floor, after)
                self._trimmed_steady = steady
                log.debug("malloc_trim", extra={"rss_before": rss, "rss_after": after})
                rss = after
            self._last = rss

    def _should_trim(self, rss: int, steady: bool) -> bool:
        """Trim while RSS is *growth* above the idle level; and once more when it has held
        still (the load is over) a quarter of that above it: a trim during the load finds
        much of the memory still in use, and what is freed after it would otherwise stay
        (with Postgres I/O on the event loop, results are built in the main arena)."""
        above = rss - self._floor
        if above >= self.growth:
            return True
        return steady and not self._trimmed_steady and above >= self.growth // 4
