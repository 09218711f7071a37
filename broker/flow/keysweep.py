"""The background sweep of expired idempotency keys (broker/postgres/keys.py).

Every `interval` seconds it borrows one pooled connection (queued like any request, with a
short deadline, so it never waits long behind callers) and deletes expired keys in batches
of `keys.SWEEP_BATCH` until none are left. Several replicas or workers may sweep at once:
their batches skip each other's locked rows. A failed sweep is logged and tried again at the
next interval; it never affects callers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from broker.pooling.pool import Pool
from broker.postgres import keys

__all__ = ["KeySweeper", "sweep_interval"]

log = logging.getLogger("pgbroker.keys")


def sweep_interval(ttl: float) -> float:
    """A tenth of the keys' lifetime, between 1 s and 60 s: expired keys never pile up for
    long, and an idle broker sweeps about once a minute."""
    return min(60.0, max(1.0, ttl / 10))


class KeySweeper:
    """Deletes expired keys every *interval* seconds on *pool* until `stop`."""

    def __init__(self, pool: Pool, interval: float) -> None:
        self.pool = pool
        self.interval = interval
        self.deleted = 0
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            if self.pool.paused:  # PAUSE: nothing reaches Postgres until RESUME
                continue
            try:
                await self.sweep_once()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the next interval tries again
                log.warning("idempotency key sweep failed", extra={"error": str(exc)})

    async def sweep_once(self) -> int:
        """One sweep; return how many keys it deleted."""
        conn = await self.pool.getconn(time.monotonic() + 1.0)
        reason: str | None = None
        deleted = 0
        try:
            while True:
                batch = await self.pool.run_in_worker(keys.sweep, conn.pg)
                deleted += batch
                if batch < keys.SWEEP_BATCH:
                    break
        except BaseException as exc:
            reason = f"key sweep failed: {type(exc).__name__}"
            raise
        finally:
            if reason is None and conn.pg.closed:
                reason = "server connection lost"
            self.pool.putconn(conn, reason)
        self.deleted += deleted
        if deleted:
            log.info("idempotency keys swept", extra={"deleted": deleted})
        return deleted
