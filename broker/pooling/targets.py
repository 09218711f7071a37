"""Pool targets: the primary and its read replicas, each with its own pool, and the monitor that
keeps every replica's health and replay position (no gRPC).

Targets are named ``primary`` and ``replica1``, ``replica2``, … in the order of
``PGBROKER_REPLICA_URLS``. Each has its own `Pool` (its own size, queue and statistics, under
``target.<name>.*`` in ``GetStats``). A reload replaces the replicas (`TargetSet.set_replicas`,
`ReplicaMonitor.add` and ``remove``: broker/front/replicas.py); names keep following the order.

`ReplicaMonitor` checks every ``PGBROKER_REPLICA_CHECK_INTERVAL`` seconds (a background task,
one connection of its own per server, outside the pools), so a request never waits for a
check:

* on the primary, ``pg_current_wal_flush_lsn()``: a history of (time, position) samples;
* on each replica, ``pg_is_in_recovery()`` and ``pg_last_wal_replay_lsn()``. Its lag is how
  long ago the primary was where the replica has replayed to: 0 when it has replayed the
  newest sample, else the age of the first sample past its position. An idle primary
  therefore does not make an idle replica look late (``now() -
  pg_last_xact_replay_timestamp()`` would grow while nothing commits).

A replica is in the rotation while its last check answered, it is still a standby, its replay
position is known and its lag is at most ``PGBROKER_MAX_REPLICA_LAG``. Leaving the rotation is
logged with the reason, and the requests queued on its pool fail over at once
(`Pool.fail_waiters`: the routing sends them to the primary). While a read waits for a replica
(``PGBROKER_REPLICA_FALLBACK=wait``) the checks run every `FAST_INTERVAL` seconds.

The monitor also answers ``PGBROKER_ROUTING=auto``'s question, whether called functions are
volatile (`ReplicaMonitor.volatile`), on the replica the read would run on, cached per target
and name for `VOLATILITY_TTL` seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from itertools import count
from typing import TypeVar

from broker.pooling.pool import Pool
from broker.postgres.pg import ConnectionLost, PgConnection, PgError
from broker.postgres.replication import (
    PrimaryStatus,
    ReplicaStatus,
    format_lsn,
    read_volatility,
)

__all__ = ["FAST_INTERVAL", "VOLATILITY_TTL", "ReplicaMonitor", "Target", "TargetSet"]

log = logging.getLogger("pgbroker.replicas")

_T = TypeVar("_T")

# Seconds between checks while some read waits for a replica to catch up or come back.
FAST_INTERVAL = 0.05
# Seconds a function's volatility (pg_proc.provolatile) is trusted before it is read again.
VOLATILITY_TTL = 60.0
VOLATILITY_CACHE_MAX = 10_000
# The pool figures each target reports under target.<name>.* (the shared stats contract).
_POOL_KEYS = ("pool_size", "pool_active", "pool_max", "pool_available", "requests_waiting")


@dataclass(eq=False)
class Target:
    """One server the broker sends work to, its pool and (for a replica) its last check."""

    name: str
    pool: Pool
    replica: bool = False
    # Replicas: whether reads may go there, and why not; set by `ReplicaMonitor`.
    in_rotation: bool = True
    out_reason: str = ""
    replay_lsn: int = 0
    lag_ms: int = -1  # -1: unknown
    routed: int = 0  # requests sent here by the routing (not counting fallbacks)

    def busy(self) -> int:
        """Requests holding or waiting for one of its connections."""
        stats = self.pool.get_stats()
        return stats["pool_active"] + stats["requests_waiting"]

    def stats(self) -> dict[str, int]:
        """Its ``target.<name>.*`` figures."""
        pool = self.pool.get_stats()
        prefix = f"target.{self.name}."
        stats = {prefix + key: pool[key] for key in _POOL_KEYS}
        stats[prefix + "requests_num"] = pool["requests_num"]
        stats[prefix + "routed_num"] = self.routed
        if self.replica:
            stats[prefix + "replica_lag_ms"] = self.lag_ms
            stats[prefix + "in_rotation"] = int(self.in_rotation)
        return stats


class TargetSet:
    """The primary and the replicas (none: the broker works as before, primary only)."""

    def __init__(self, primary: Target, replicas: Sequence[Target] = ()) -> None:
        self.primary = primary
        self._turn = count()
        self.set_replicas(replicas)

    def set_replicas(self, replicas: Sequence[Target]) -> None:
        """Replace the replicas (a reload): a replica left out is no longer picked, from now."""
        self.replicas = tuple(replicas)
        self._by_name = {t.name: t for t in (self.primary, *self.replicas)}

    @property
    def all(self) -> tuple[Target, ...]:
        return (self.primary, *self.replicas)

    def get(self, name: str) -> Target | None:
        return self._by_name.get(name)

    def names(self) -> list[str]:
        return list(self._by_name)

    def pick(self, after_lsn: int = 0) -> Target | None:
        """The least busy replica in the rotation that has replayed *after_lsn* (0: any),
        taking turns among equals; None when no replica may take the read."""
        ready = [
            t
            for t in self.replicas
            if t.in_rotation and (not after_lsn or t.replay_lsn >= after_lsn)
        ]
        if not ready:
            return None
        if len(ready) == 1:
            return ready[0]
        start = next(self._turn) % len(ready)
        ready = ready[start:] + ready[:start]
        return min(ready, key=Target.busy)

    def get_stats(self) -> dict[str, int]:
        stats: dict[str, int] = {}
        for target in self.all:
            stats.update(target.stats())
        return stats


class _Link:
    """The monitor's own connection to one server, used on one thread of its own."""

    def __init__(self, name: str, connect: Callable[[], PgConnection]) -> None:
        self.name = name
        self._connect = connect
        self._conn: PgConnection | None = None
        self._thread = ThreadPoolExecutor(1, thread_name_prefix=f"pgbroker-monitor-{name}")

    def _query(self, read: Callable[[PgConnection], _T]) -> _T:
        if self._conn is None or self._conn.closed:
            self._conn = self._connect()
        try:
            return read(self._conn)
        except Exception:
            self._close()
            raise

    def _close(self) -> None:
        if self._conn is not None:
            self._conn.close_quietly()
            self._conn = None

    async def run(self, read: Callable[[PgConnection], _T], timeout: float) -> _T:
        """*read* on this link's connection (opened on first use, replaced after an error);
        raise what it raised, or TimeoutError after *timeout* seconds."""
        loop = asyncio.get_running_loop()
        return await asyncio.wait_for(
            loop.run_in_executor(self._thread, self._query, read), timeout
        )

    def close(self) -> None:
        with contextlib.suppress(RuntimeError):
            self._thread.submit(self._close)
        self._thread.shutdown(wait=False)


@dataclass
class _History:
    """The primary's flush position over time (monotonic seconds, LSN), oldest first."""

    samples: deque[tuple[float, int]] = field(default_factory=lambda: deque(maxlen=600))

    def add(self, at: float, lsn: int) -> None:
        if not self.samples or lsn != self.samples[-1][1]:
            self.samples.append((at, lsn))
        else:  # unchanged: the newest sample stands for now as well
            self.samples[-1] = (self.samples[-1][0], lsn)

    def lag(self, replay_lsn: int, now: float) -> float | None:
        """Seconds since the primary passed *replay_lsn* (0 when the replica has replayed
        the newest sample); None before the first sample."""
        if not self.samples:
            return None
        if replay_lsn >= self.samples[-1][1]:
            return 0.0
        for at, lsn in self.samples:
            if lsn > replay_lsn:
                return max(0.0, now - at)
        return 0.0  # unreachable: the newest sample is past replay_lsn


class ReplicaMonitor:
    """Checks the replicas of *targets* in the background; see the module docstring.

    *connect* maps each target name (``primary`` too) to a blocking connect function for the
    monitor's own connections. *max_lag* (seconds, 0: no limit) takes a lagging replica out of
    the rotation; each check gives up after *timeout* seconds (the replica counts as down).
    """

    def __init__(
        self,
        targets: TargetSet,
        connect: dict[str, Callable[[], PgConnection]],
        *,
        interval: float,
        max_lag: float,
        timeout: float,
    ) -> None:
        self.targets = targets
        self.interval = interval
        self.max_lag = max_lag
        self.timeout = timeout
        self._links = {name: _Link(name, fn) for name, fn in connect.items()}
        self._history = _History(deque(maxlen=_history_length(interval, max_lag)))
        self._checked = asyncio.Event()
        self._wake = asyncio.Event()
        self._waiting = 0
        self._task: asyncio.Task[None] | None = None
        self._primary_error: str | None = None
        self._volatility: dict[tuple[str, str], tuple[bool, float]] = {}
        self.checks = 0

    async def start(self) -> None:
        """Check once (so the rotation is known before the broker serves), then keep
        checking in the background."""
        for target in self.targets.replicas:
            target.in_rotation, target.out_reason = False, "not checked yet"
        await self.check()
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for link in self._links.values():
            link.close()

    # -- a reload's changes (broker/front/replicas.py) ----------------------------------------

    def add(self, name: str, connect: Callable[[], PgConnection]) -> None:
        """Check the replica *name* from the next round on (its target starts out of the
        rotation, "not checked yet"); the next round starts now."""
        self.remove(name)
        self._links[name] = _Link(name, connect)
        self._wake.set()

    def remove(self, name: str) -> None:
        """Stop checking the replica *name*: close its connection, forget its volatility."""
        link = self._links.pop(name, None)
        if link is not None:
            link.close()
        for key in [key for key in self._volatility if key[0] == name]:
            del self._volatility[key]

    def configure(
        self,
        *,
        interval: float,
        max_lag: float,
        timeout: float,
        connect: dict[str, Callable[[], PgConnection]] | None = None,
    ) -> None:
        """A reload's check interval, lag limit and check timeout, from the next round on;
        *connect* replaces the connections of those servers (opened again with the new
        timeout). The primary's position history is kept."""
        self.interval, self.max_lag, self.timeout = interval, max_lag, timeout
        samples = self._history.samples
        self._history = _History(deque(samples, maxlen=_history_length(interval, max_lag)))
        for name, fn in (connect or {}).items():
            old = self._links.get(name)
            self._links[name] = _Link(name, fn)
            if old is not None:
                old.close()
        self._wake.set()

    async def _loop(self) -> None:
        while True:
            interval = FAST_INTERVAL if self._waiting else self.interval
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), interval)
            self._wake.clear()
            try:
                await self.check()
            except Exception:  # never let the monitor die; the next check tries again
                log.exception("replica check failed")

    async def wait_for_check(self, timeout: float) -> bool:
        """Wait (at most *timeout* seconds) for the next check to complete, asking for checks
        every `FAST_INTERVAL` meanwhile; return whether one completed."""
        self._waiting += 1
        self._wake.set()
        try:
            self._checked.clear()
            await asyncio.wait_for(self._checked.wait(), timeout)
            return True
        except TimeoutError:
            return False
        finally:
            self._waiting -= 1

    # -- checks ------------------------------------------------------------------------------

    async def check(self) -> None:
        """One round: the primary's position, then every replica's, judged together."""
        await self._sample_primary()
        replicas = [t for t in self.targets.replicas if t.name in self._links]
        answers = await asyncio.gather(
            *(self._links[t.name].run(ReplicaStatus.read, self.timeout) for t in replicas),
            return_exceptions=True,
        )
        now = time.monotonic()
        current = self.targets.replicas
        for target, answer in zip(replicas, answers, strict=True):
            if target in current:  # a reload may have removed it meanwhile
                self._judge(target, answer, now)
        self.checks += 1
        self._checked.set()

    async def _sample_primary(self) -> None:
        try:
            status = await self._links["primary"].run(PrimaryStatus.read, self.timeout)
        except Exception as exc:
            if self._primary_error is None:
                log.warning("cannot read the primary's WAL position", extra={"error": _why(exc)})
            self._primary_error = _why(exc)
            return
        self._primary_error = None
        self._history.add(time.monotonic(), status.flush_lsn)

    def _judge(self, target: Target, answer: ReplicaStatus | BaseException, now: float) -> None:
        if isinstance(answer, BaseException):
            target.lag_ms = -1
            self._rotate(target, f"unreachable: {_why(answer)}")
            return
        target.replay_lsn = answer.replay_lsn
        lag = self._history.lag(answer.replay_lsn, now) if answer.replay_lsn else None
        target.lag_ms = -1 if lag is None else int(lag * 1000)
        if not answer.in_recovery:
            self._rotate(target, "not in recovery: the server is a primary, not a replica")
        elif not answer.replay_lsn:
            self._rotate(target, "pg_last_wal_replay_lsn() is unknown")
        elif self.max_lag and lag is None:
            self._rotate(target, "lag unknown: the primary's WAL position was not read yet")
        elif self.max_lag and lag is not None and lag > self.max_lag:
            self._rotate(
                target, f"lagging {lag:.1f}s behind the primary (PGBROKER_MAX_REPLICA_LAG)"
            )
        else:
            self._rotate(target, "")

    def _rotate(self, target: Target, out_reason: str) -> None:
        """Put *target* in the rotation (*out_reason* empty) or take it out, logging the
        change; requests queued on a replica that leaves fail over at once."""
        was_in = target.in_rotation
        target.out_reason = out_reason
        target.in_rotation = not out_reason
        extra = {
            "target": target.name,
            "replay_lsn": format_lsn(target.replay_lsn),
            "lag_ms": target.lag_ms,
        }
        if was_in and out_reason:
            failed = target.pool.fail_waiters(f"{target.name} left the rotation: {out_reason}")
            log.warning(
                "replica out of rotation: %s",
                out_reason,
                extra={**extra, "reason": out_reason, "requeued": failed},
            )
        elif not was_in and not out_reason:
            log.info("replica in rotation", extra=extra)

    # -- function volatility (PGBROKER_ROUTING=auto) -----------------------------------------

    async def volatile(self, target: Target, names: Iterable[str]) -> bool:
        """Whether any of the functions *names* may be volatile on *target* (cached); True
        when that cannot be read (the read then goes to the primary)."""
        now = time.monotonic()
        cache = self._volatility
        wanted = set(names)
        missing = [n for n in wanted if cache.get((target.name, n), (False, 0.0))[1] <= now]
        if missing:
            link = self._links.get(target.name)
            if link is None:  # a reload removed the replica meanwhile
                return True
            try:
                verdicts = await link.run(partial(read_volatility, names=missing), self.timeout)
            except Exception as exc:
                log.warning(
                    "cannot read function volatility; routing to the primary",
                    extra={"target": target.name, "error": _why(exc)},
                )
                return True
            if len(cache) > VOLATILITY_CACHE_MAX:
                cache.clear()
            for name, verdict in verdicts.items():
                cache[(target.name, name)] = (verdict, now + VOLATILITY_TTL)
        return any(cache[(target.name, n)][0] for n in wanted)


def _history_length(interval: float, max_lag: float) -> int:
    """Primary samples to keep: four times the lag that matters (at least 10 s) of them."""
    return max(60, int(4 * max(max_lag, 10) / interval))


def _why(exc: BaseException) -> str:
    """What to log about a failed check: our own errors' text (written without secrets),
    else only the type."""
    if isinstance(exc, ConnectionLost | PgError | OSError):
        return str(exc) or type(exc).__name__
    if isinstance(exc, TimeoutError):
        return "no answer within the check timeout"
    return type(exc).__name__
