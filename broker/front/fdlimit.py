"""File descriptors: raise the soft ``RLIMIT_NOFILE`` at start, check it fits, watch usage.

Every caller holds a TCP connection to the broker process, and every pooled server connection
is one more descriptor. With ``ulimit -n 256`` and the default ``max_waiting`` of 2,000, a
broker used to start without a word, and 777 of 1,000 warm callers then failed with
``BROKER_UNREACHABLE``, the only trace being gRPC C-core lines on stderr (issue 15). So, at
start (each worker of ``--workers N`` for itself):

* the soft limit is raised to the hard limit (what ``ulimit -n`` could do; only the hard
  limit needs privilege);
* the descriptors one process needs are counted, the way the connection budget is::

      max_waiting + 2 × pool_size + 64 = needed

  (a connection per waiting caller; per running caller, its connection and the pooled server
  connection it uses; 64 for the listening socket, epoll, pipes, logs and gRPC's own);
* if the limit is below that, a WARNING with the arithmetic goes to the JSON log. A warning,
  not a refusal as for the connection budget: the budget's arithmetic is certain (Postgres
  will refuse the connections), while this one is an upper bound of a load that may never
  come, and refusing would stop a broker in any container with a low hard limit that serves
  a handful of callers well.

Then `DescriptorWatch` counts the open descriptors (``/proc/self/fd``) every few seconds and
logs a WARNING when they reach 90 % of the limit, once a minute at most: gRPC's own "File
descriptor limit reached" line goes to stderr from C code the Python process cannot
intercept without replacing file descriptor 2, so the broker reports the condition from its
own count instead, in the JSON log, before gRPC starts refusing connections.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from dataclasses import dataclass

try:
    import resource
except ImportError:  # not POSIX: nothing to raise or check
    resource = None  # type: ignore[assignment]

__all__ = ["MARGIN", "DescriptorBudget", "DescriptorWatch", "open_descriptors", "raise_nofile"]

log = logging.getLogger("pgbroker.fdlimit")

MARGIN = 64
# Share of the soft limit in use at which the watch warns.
WARN_SHARE = 0.9
WATCH_INTERVAL = 5.0
WARN_EVERY = 60.0


@dataclass(frozen=True)
class DescriptorBudget:
    """The open-file limit of this process against what its settings may need."""

    soft: int
    hard: int
    raised_from: int
    max_waiting: int
    pool_size: int

    @property
    def needed(self) -> int:
        return self.max_waiting + 2 * self.pool_size + MARGIN

    @property
    def fits(self) -> bool:
        return self.soft >= self.needed

    def explain(self) -> str:
        return (
            f"max_waiting {self.max_waiting} + 2 × pool_size {self.pool_size} + {MARGIN}"
            f" = {self.needed} file descriptors needed > soft limit {self.soft}"
            f" (hard limit {self.hard})"
        )

    def advice(self) -> str:
        fitting = max(0, self.soft - 2 * self.pool_size - MARGIN)
        return (
            f"raise the hard limit (ulimit -Hn, the container's nofile ulimit) to at least"
            f" {self.needed}, or lower PGBROKER_MAX_WAITING to at most {fitting}; past the"
            " limit, callers fail with BROKER_UNREACHABLE"
        )


def raise_nofile(max_waiting: int, pool_size: int) -> DescriptorBudget | None:
    """Raise the soft RLIMIT_NOFILE to the hard limit, log a WARNING with the arithmetic if it
    still cannot hold *max_waiting* callers and *pool_size* connections; return the budget
    (None where the platform has no such limit). Never raises."""
    if resource is None:
        return None
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    except (OSError, ValueError):
        return None
    raised_from = soft
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (OSError, ValueError) as exc:
            log.warning(
                "cannot raise the open-file limit",
                extra={"soft": soft, "hard": hard, "error": str(exc)},
            )
    budget = DescriptorBudget(soft, hard, raised_from, max_waiting, pool_size)
    if not budget.fits:
        log.warning(
            "file descriptor limit too low: %s; %s",
            budget.explain(),
            budget.advice(),
            extra={"nofile_soft": soft, "nofile_hard": hard, "nofile_needed": budget.needed},
        )
    elif raised_from != soft:
        log.info(
            "open-file limit raised from %d to %d",
            raised_from,
            soft,
            extra={"nofile_soft": soft, "nofile_needed": budget.needed},
        )
    return budget


def open_descriptors() -> int | None:
    """How many descriptors this process has open (Linux ``/proc/self/fd``), else None."""
    with contextlib.suppress(OSError):
        return len(os.listdir("/proc/self/fd"))
    return None


class DescriptorWatch:
    """Logs a WARNING (once a minute at most) while this process uses >= 90 % of its soft
    open-file limit; `start` it on the event loop, `stop` it at shutdown."""

    def __init__(self, limit: int, interval: float = WATCH_INTERVAL) -> None:
        self.limit = limit
        self.interval = interval
        self._task: asyncio.Task[None] | None = None
        self._warned_at = -WARN_EVERY

    def start(self) -> None:
        if self._task is None and open_descriptors() is not None:
            self._task = asyncio.get_running_loop().create_task(self._watch())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def check(self) -> bool:
        """Count now; log and return True if at or over the warning share."""
        used = open_descriptors()
        if used is None or used < WARN_SHARE * self.limit:
            return False
        now = time.monotonic()
        if now - self._warned_at >= WARN_EVERY:
            self._warned_at = now
            log.warning(
                "file descriptors nearly exhausted: %d of %d open; new callers fail with"
                " BROKER_UNREACHABLE at the limit (raise the nofile ulimit)",
                used,
                self.limit,
                extra={"fds_open": used, "nofile_soft": self.limit},
            )
        return True

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            self.check()
