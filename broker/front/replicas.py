"""The read replicas of one broker process: their targets, pools, the monitor and the routing,
built from the settings, opened at start, changed by a reload, closed at stop.

Names follow positions: ``replicaN`` is the N-th URL of the current ``PGBROKER_REPLICA_URLS``,
at start and after every reload (the same names a restart would give). A reload compares the
new list with the old one position by position:

* an unchanged URL keeps its target, pool and statistics (a larger or smaller
  ``PGBROKER_REPLICA_POOL_SIZE`` resizes the pool live, as ``PGBROKER_POOL_SIZE`` does);
* a new position, or a position whose URL changed, gets a new target: its pool opens its first
  connection during the reload's check (that server's connection budget is read there) and the
  rest after; it joins the rotation once the monitor finds it healthy. A server that does not
  answer within `OPEN_WAIT` seconds is accepted, as at start, and joins once it answers;
* a position that is gone, or whose URL changed, leaves the rotation at once: its queued
  requests go to the primary (or another replica) now, running work finishes on its
  connections, then its pool closes. Its ``target.<name>.*`` figures disappear from
  ``GetStats`` (``[a, b]`` → ``[b]`` replaces ``replica1`` by a new target for ``b`` and
  removes ``replica2``; a stats consumer sees ``replica2`` go).

The check refuses, with every setting kept (the reload is all or nothing): a new replica, or a
larger replica pool, that does not fit its server's connection budget
(``PGBROKER_REPLICA_POOL_SIZE`` plus the monitor's connection, × ``PGBROKER_MAX_REPLICAS``);
the primary's budget when the first replica brings the monitor's connection there; and a
``PGBROKER_ROUTING_HOOK`` that cannot be imported. A malformed URL is refused earlier, when the
settings are read.

``PGBROKER_ROUTING``, ``PGBROKER_REPLICA_FALLBACK``, ``PGBROKER_REPLICA_WAIT`` apply to the
requests routed after the reload; ``PGBROKER_MAX_REPLICA_LAG`` and
``PGBROKER_REPLICA_CHECK_INTERVAL`` from the monitor's next round. A changed hook module is
imported once; Python does not import a module again, so new code in the same module needs a
restart.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from broker.config import Settings
from broker.configvalues import DatabaseTarget
from broker.flow.routing import Router, RoutingHook, load_hook
from broker.pooling.pool import Pool, PoolUnavailable
from broker.pooling.targets import ReplicaMonitor, Target, TargetSet
from broker.postgres.budget import BudgetExceeded, BudgetProbe
from broker.postgres.credentials import (
    CredentialSource,
    RenamedCredentials,
    connect_with_credentials,
    replica_credentials_for,
)
from broker.postgres.pg import PgConnection
from broker.security.limits import QueueWeights

__all__ = ["MONITOR_NAME", "OPEN_WAIT", "Replicas", "connect_for"]

log = logging.getLogger("pgbroker.replicas")

# Seconds start-up (or a reload) waits for a read replica's first connection: a replica that
# is down must not hold the broker's start (it joins the rotation once it answers).
OPEN_WAIT = 3.0
# The application_name of the replica monitor's connections (one per server and worker).
MONITOR_NAME = "pgbroker-monitor"


def connect_for(
    source: CredentialSource, settings: Settings, timeout: float | None = None
) -> Callable[[], PgConnection]:
    """A blocking connect function for *source* (connect and statement timeouts: *timeout*,
    else the settings')."""
    return partial(
        connect_with_credentials,
        source,
        settings.connect_timeout if timeout is None else timeout,
        settings.statement_timeout if timeout is None else timeout,
        settings.statement_cache_size,
    )


def replica_pool_share(settings: Settings) -> int:
    """Connections one worker holds on each replica: its share of the replica pool size."""
    return max(1, settings.replica_pool_size // settings.workers)


def monitor_connections(settings: Settings) -> int:
    """Connections the replica monitor holds on each server, over all workers (none without
    replicas)."""
    return settings.workers if settings.replica_urls else 0


def check_timeout(settings: Settings) -> float:
    """Seconds one monitor check may take before the server counts as down."""
    return max(2.0, 2 * settings.replica_check_interval)


@dataclass
class _Staged:
    """What a reload's check prepared for its apply: the new targets by position, and the
    routing hook."""

    urls: tuple[DatabaseTarget, ...]
    added: dict[int, Target] = field(default_factory=dict)
    budgets: dict[str, BudgetProbe] = field(default_factory=dict)
    hook: RoutingHook | None = None


class Replicas:
    """The replicas of *settings* as targets of *targets* (whose primary uses *primary*'s
    credentials, budget read by *primary_budget*), with their monitor and the `Router`."""

    def __init__(
        self,
        settings: Settings,
        primary: CredentialSource,
        primary_budget: BudgetProbe,
        targets: TargetSet,
    ) -> None:
        self.settings = settings
        self.primary = primary
        self.primary_budget = primary_budget
        self.targets = targets
        self.budgets: dict[str, BudgetProbe] = {}
        targets.set_replicas(
            [
                self._target(settings, index, url, self.budgets)
                for index, url in enumerate(settings.replica_urls, 1)
            ]
        )
        self.monitor = self._monitor(settings) if targets.replicas else None
        self.router = Router(
            targets,
            self.monitor,
            mode=settings.routing,
            fallback=settings.replica_fallback,
            wait=settings.replica_wait,
        )
        self._staged: _Staged | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._draining: set[Pool] = set()

    # -- building ----------------------------------------------------------------------------

    def _source(self, settings: Settings, url: DatabaseTarget) -> CredentialSource:
        return replica_credentials_for(settings, self.primary, url)

    def _target(
        self,
        settings: Settings,
        index: int,
        url: DatabaseTarget,
        budgets: dict[str, BudgetProbe],
    ) -> Target:
        """The target ``replica<index>``: its pool (this worker's share of the replica pool
        size), whose first connection reads that server's connection budget (its probe goes
        into *budgets*)."""
        name = f"replica{index}"
        probe = budgets[name] = BudgetProbe(connect_for(self._source(settings, url), settings))
        pool = Pool(
            probe,
            size=replica_pool_share(settings),
            max_waiting=settings.max_waiting,
            queue_timeout=settings.queue_timeout,
            max_lifetime=settings.max_lifetime,
            weights=QueueWeights.parse(settings.queue_weights),
            pg_io=settings.pg_io,
        )
        # Out of the rotation until the monitor's first check of it.
        return Target(name, pool, replica=True, in_rotation=False, out_reason="not checked yet")

    def _monitor_connect(
        self, settings: Settings, source: CredentialSource
    ) -> Callable[[], PgConnection]:
        renamed = RenamedCredentials(source, MONITOR_NAME)
        return connect_for(renamed, settings, check_timeout(settings))

    def _monitor_connects(self, settings: Settings) -> dict[str, Callable[[], PgConnection]]:
        connects = {"primary": self._monitor_connect(settings, self.primary)}
        for index, url in enumerate(settings.replica_urls, 1):
            source = self._source(settings, url)
            connects[f"replica{index}"] = self._monitor_connect(settings, source)
        return connects

    def _monitor(self, settings: Settings) -> ReplicaMonitor:
        """The replica checks, on one connection of their own per server (not pooled)."""
        return ReplicaMonitor(
            self.targets,
            self._monitor_connects(settings),
            interval=settings.replica_check_interval,
            max_lag=settings.max_replica_lag,
            timeout=check_timeout(settings),
        )

    # -- start and stop ----------------------------------------------------------------------

    async def open(self) -> None:
        """Open every replica's pool; check its connection budget on its first connection
        (raise `BudgetExceeded` when it does not fit). A replica unreachable now is logged and
        joins the rotation once it answers."""
        settings = self.settings
        replicas = dict(enumerate(self.targets.replicas))
        problems = await self._open_first(settings, replicas, self.budgets, "at start")
        if problems:
            raise BudgetExceeded(problems[0])
        for target in replicas.values():
            target.pool.fill()
        if self.monitor is not None:
            await self.monitor.start()

    async def _open_first(
        self,
        settings: Settings,
        targets: dict[int, Target],
        budgets: dict[str, BudgetProbe],
        when: str,
    ) -> list[str]:
        """Open the first connection of each of *targets* (waiting up to `OPEN_WAIT`) and
        check its server's budget (read by its probe in *budgets*); return the budget
        problems. An unreachable one is logged."""
        wait = min(settings.connect_timeout, OPEN_WAIT)
        opened = await asyncio.gather(
            *(t.pool.open(wait="first", timeout=wait, fill=False) for t in targets.values()),
            return_exceptions=True,
        )
        problems = []
        for target, result in zip(targets.values(), opened, strict=True):
            if isinstance(result, PoolUnavailable):
                log.warning(
                    "read replica unreachable %s; it joins the rotation once it answers",
                    when,
                    extra={"target": target.name, "error": str(result)},
                )
            elif isinstance(result, BaseException):
                raise result
            else:
                size = settings.replica_pool_size + monitor_connections(settings)
                try:
                    budgets[target.name].check(size, settings.max_replicas)
                except BudgetExceeded as exc:
                    problems.append(f"{target.name} (PGBROKER_REPLICA_URLS): {exc}")
        return problems

    async def close(self) -> None:
        """Stop the monitor and close every replica pool (those a reload removed too)."""
        if self.monitor is not None:
            await self.monitor.stop()
        for task in list(self._tasks):
            task.cancel()
        for target in self.targets.replicas:
            await target.pool.close()
        for pool in list(self._draining):
            await pool.close()

    # -- reload ------------------------------------------------------------------------------

    async def check(self, old: Settings, new: Settings) -> None:
        """A reload's check (see the module docstring): raise ValueError naming each problem,
        with nothing changed; else keep what `apply` installs."""
        self._staged = None
        hook = self.router.hook
        if new.routing_hook != old.routing_hook:
            hook = load_hook(new.routing_hook)  # HookError is a ValueError: refused
        problems = self._budget_problems(old, new)
        staged = _Staged(new.replica_urls, hook=hook)
        kept = self.targets.replicas
        for position, url in enumerate(new.replica_urls):
            if position < len(kept) and old.replica_urls[position] == url:
                continue
            staged.added[position] = self._target(new, position + 1, url, staged.budgets)
        if staged.added:
            try:
                problems += await self._open_first(new, staged.added, staged.budgets, "at reload")
            except BaseException:
                await _close_all(staged.added.values())
                raise
        if problems:
            await _close_all(staged.added.values())
            raise ValueError("; ".join(problems))
        self._staged = staged

    def _budget_problems(self, old: Settings, new: Settings) -> list[str]:
        """The kept replicas' budgets for a larger replica pool, and the primary's for the
        monitor's connection that the first replica brings."""
        problems = []
        size = new.replica_pool_size + monitor_connections(new)
        if size > old.replica_pool_size + monitor_connections(old) or (
            new.max_replicas > old.max_replicas
        ):
            for position, target in enumerate(self.targets.replicas):
                if position >= len(new.replica_urls):
                    continue
                if new.replica_urls[position] != old.replica_urls[position]:
                    continue
                probe = self.budgets.get(target.name)
                if probe is None or probe.budget is None:
                    continue  # not reached yet: checked when it answers, as at start
                try:
                    probe.check(size, new.max_replicas)
                except BudgetExceeded as exc:
                    problems.append(f"{target.name} (PGBROKER_REPLICA_POOL_SIZE): {exc}")
        if new.replica_urls and not old.replica_urls and self.primary_budget.budget is not None:
            try:
                self.primary_budget.check(
                    new.pool_size + monitor_connections(new), new.max_replicas
                )
            except BudgetExceeded as exc:
                problems.append(f"primary (the replica monitor's connection): {exc}")
        return problems

    def undo(self, old: Settings, new: Settings) -> None:
        """A later check refused the reload: close what `check` opened."""
        staged, self._staged = self._staged, None
        if staged is not None:
            self._spawn(_close_all(staged.added.values()))

    def apply(self, old: Settings, new: Settings) -> None:
        """Install what `check` prepared, and the routing and monitor settings."""
        staged, self._staged = self._staged, None
        assert staged is not None and staged.urls == new.replica_urls, "apply without check"
        self.settings = new
        self.router.configure(
            mode=new.routing,
            hook=staged.hook,
            fallback=new.replica_fallback,
            wait=new.replica_wait,
        )
        replicas = list(self.targets.replicas)
        kept = [
            t for p, t in enumerate(replicas) if p < len(new.replica_urls) and p not in staged.added
        ]
        for target in kept:
            target.pool.reconfigure(
                size=replica_pool_share(new),
                max_waiting=new.max_waiting,
                queue_timeout=new.queue_timeout,
                max_lifetime=new.max_lifetime,
                weights=QueueWeights.parse(new.queue_weights),
            )
        monitor = self.monitor
        if old.replica_urls != new.replica_urls:
            self._replace(replicas, kept, staged, new)
        if (
            monitor is not None
            and monitor is self.monitor
            and (
                old.replica_check_interval != new.replica_check_interval
                or old.max_replica_lag != new.max_replica_lag
            )
        ):
            monitor.configure(
                interval=new.replica_check_interval,
                max_lag=new.max_replica_lag,
                timeout=check_timeout(new),
                connect=self._monitor_connects(new),
            )

    def _replace(
        self, replicas: Sequence[Target], kept: Sequence[Target], staged: _Staged, new: Settings
    ) -> None:
        """The new replica list: kept targets stay, the others leave, the staged ones join."""
        removed = [t for t in replicas if t not in kept]
        by_position = {p: t for p, t in enumerate(replicas) if t in kept} | staged.added
        self.targets.set_replicas([by_position[p] for p in range(len(new.replica_urls))])
        for target in removed:
            self._retire(target)
        self.budgets.update(staged.budgets)
        for position, target in staged.added.items():
            target.pool.fill()
            if self.monitor is not None:
                url = new.replica_urls[position]
                self.monitor.add(target.name, self._monitor_connect(new, self._source(new, url)))
            log.info(
                "read replica added by a reload; it joins the rotation once healthy",
                extra={"target": target.name, "server": new.replica_urls[position].redacted},
            )
        if self.targets.replicas and self.monitor is None:
            self.monitor = self.router.monitor = self._monitor(new)
            self._spawn(self.monitor.start())
        elif not self.targets.replicas and self.monitor is not None:
            monitor, self.monitor, self.router.monitor = self.monitor, None, None
            self._spawn(monitor.stop())

    def _retire(self, target: Target) -> None:
        """Take *target* out of the rotation now (its queued requests go elsewhere), let its
        running work finish, then close its pool."""
        target.in_rotation, target.out_reason = False, "removed by a reload"
        self.budgets.pop(target.name, None)
        failed = target.pool.fail_waiters(f"{target.name} was removed by a reload")
        if self.monitor is not None:
            self.monitor.remove(target.name)
        stats = target.pool.get_stats()
        log.info(
            "read replica removed by a reload: out of the rotation now; its pool closes once"
            " its running work finishes",
            extra={"target": target.name, "requeued": failed, "pool_active": stats["pool_active"]},
        )
        self._draining.add(target.pool)
        self._spawn(self._drain(target))

    async def _drain(self, target: Target) -> None:
        await target.pool.wait_drained()
        await target.pool.close()
        self._draining.discard(target.pool)
        log.info("removed read replica's pool closed", extra={"target": target.name})

    def _spawn(self, work: Any) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


async def _close_all(targets: Any) -> None:
    for target in list(targets):
        await target.pool.close()
