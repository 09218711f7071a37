"""Read routing: which target (primary or a read replica) runs a request (no gRPC here).

With no replica configured nothing here runs: every request goes to the primary as before,
and no commit position is read.

With replicas (broker/pooling/targets.py), `Router.choose` decides per request:

1. ``PGBROKER_ROUTING_HOOK`` (``module:function``), if set, is called first with the caller
   and the SQL texts (pgbouncer-rr's ``routing_rules``); a target name it returns is used,
   None leaves the choice to the rules below. Anything else it returns, or raises, is logged
   (once per kind of mistake) and the request goes to the primary.
2. A read may go to a replica when the caller marked it ``read_only`` or, with
   ``PGBROKER_ROUTING=auto``, when its plan proves it read-only (`RequestPlan.replica_safe`)
   and every function it calls is stable or immutable on that replica (``pg_proc``, cached).
   ``SERIALIZABLE`` work always goes to the primary: a hot standby refuses it.
   Everything else goes to the primary, including interactive transactions not begun
   ``read_only``.
3. Read-your-writes: a read carrying the caller's position (``after_lsn``) goes only to a
   replica whose replay position has reached it. When no replica may take a read (all out of
   the rotation, or behind the position), it goes to the primary at once
   (``PGBROKER_REPLICA_FALLBACK=primary``), or after waiting up to ``PGBROKER_REPLICA_WAIT``
   seconds for one (``wait``).

A read sent to a replica that fails before it returned anything (the replica went down, its
queue was failed over, its connection broke, or Postgres cancelled it for a recovery
conflict) runs again on the primary (`run_on_replica_or_primary`): a read changes nothing, so
running it twice is safe. Work that ran on the primary and may have written reads the commit's
WAL position behind its COMMIT (`Batch.report_position`), which the caller keeps.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from broker.flow.batch import StatementFailed, TransactionLost
from broker.pooling.pool import PoolClosed, PoolUnavailable, QueueFull
from broker.pooling.targets import ReplicaMonitor, Target, TargetSet
from broker.sql.plan import RequestPlan
from lambda_client._proto.pgbroker.v1 import broker_pb2 as pb

__all__ = [
    "HookError",
    "Router",
    "Routing",
    "load_hook",
    "run_on_replica_or_primary",
    "stream_on_replica_or_primary",
]

log = logging.getLogger("pgbroker.routing")

_T = TypeVar("_T")
# SQLSTATEs after which a read that ran on a replica is run again on the primary: a recovery
# conflict (40001 "canceling statement due to conflict with recovery") and the server going
# away (57P01 admin shutdown, 57P02/57P03 crash and start-up, class 08 connection failures).
_REPLICA_RETRY_SQLSTATES = ("40001", "57P01", "57P02", "57P03")

RoutingHook = Callable[[str | None, list[str]], object]


class HookError(ValueError):
    """``PGBROKER_ROUTING_HOOK`` does not name a callable (raised at start)."""


def load_hook(spec: str) -> RoutingHook | None:
    """The function ``module:function`` names (None for ""); raise `HookError` saying why it
    cannot be used."""
    if not spec:
        return None
    module_name, _, function_name = spec.partition(":")
    try:
        module = importlib.import_module(module_name.strip())
    except Exception as exc:
        raise HookError(
            f"PGBROKER_ROUTING_HOOK={spec!r}: cannot import {module_name.strip()!r}: {exc}"
        ) from exc
    hook = getattr(module, function_name.strip(), None)
    if not callable(hook):
        raise HookError(
            f"PGBROKER_ROUTING_HOOK={spec!r}: {module_name.strip()} has no function"
            f" {function_name.strip()!r}"
        )
    return hook  # type: ignore[no-any-return]


@dataclass(frozen=True)
class Routing:
    """Where a request runs, and whether to read its commit position there."""

    target: Target
    report_position: bool = False


class Router:
    """Chooses targets (see the module docstring). *monitor* is None without replicas."""

    def __init__(
        self,
        targets: TargetSet,
        monitor: ReplicaMonitor | None = None,
        *,
        mode: str = "explicit",
        hook: RoutingHook | None = None,
        fallback: str = "primary",
        wait: float = 1.0,
    ) -> None:
        self.targets = targets
        self.monitor = monitor
        self.hook: RoutingHook | None = None
        self._hook_mistakes: set[str] = set()
        self.stats = dict.fromkeys(("replica_fallbacks", "replica_retries", "hook_errors"), 0)
        self.configure(mode=mode, hook=hook, fallback=fallback, wait=wait)

    def configure(self, *, mode: str, hook: RoutingHook | None, fallback: str, wait: float) -> None:
        """Set the routing rules (at start, and by a reload for the requests after it)."""
        self.auto = mode == "auto"
        if hook is not self.hook:
            self._hook_mistakes.clear()  # a new hook's mistakes are logged again
        self.hook = hook
        self.wait = wait if fallback == "wait" else 0.0

    @property
    def replicas(self) -> bool:
        return bool(self.targets.replicas)

    @property
    def primary(self) -> Target:
        return self.targets.primary

    async def choose(
        self,
        *,
        read_only: bool,
        plan: RequestPlan | None,
        sqls: Sequence[str],
        caller: str | None,
        after_lsn: int = 0,
        isolation: int = pb.ISOLATION_LEVEL_UNSPECIFIED,
    ) -> Routing:
        """The target for one request (a batch, a stream or an interactive transaction's
        BEGIN: *plan* None, *sqls* empty). Never raises: a broken hook means the primary."""
        if not self.targets.replicas:
            return Routing(self.primary)
        # A call of a function may write (a volatile user function): its position is read.
        proven_read = plan is not None and plan.replica_safe and not plan.functions
        may_write = not read_only and not proven_read
        if self.hook is not None and sqls:
            named = self._ask_hook(caller, sqls)
            if named is not None:
                return await self._to_named(named, after_lsn, may_write)
        if isolation == pb.ISOLATION_LEVEL_SERIALIZABLE:
            return self._to_primary(may_write)
        if read_only or (self.auto and plan is not None and plan.replica_safe):
            replica = await self._replica_for(after_lsn, None if read_only else plan)
            if replica is not None:
                return self._to_replica(replica)
        return self._to_primary(may_write)

    def _to_primary(self, may_write: bool) -> Routing:
        self.primary.routed += 1
        return Routing(self.primary, report_position=may_write)

    def _to_replica(self, replica: Target) -> Routing:
        replica.routed += 1
        return Routing(replica)

    async def _replica_for(self, after_lsn: int, plan: RequestPlan | None) -> Target | None:
        """A replica that may run the read (with *plan*: whose functions are not volatile
        there), waiting up to ``PGBROKER_REPLICA_WAIT`` when none may yet."""
        give_up_at = time.monotonic() + self.wait
        while True:
            replica = self.targets.pick(after_lsn)
            if replica is not None:
                if plan is not None and plan.functions and await self._volatile(replica, plan):
                    return None  # a volatile call: the primary, not a wait
                return replica
            left = give_up_at - time.monotonic()
            if left <= 0 or self.monitor is None:
                self.stats["replica_fallbacks"] += 1
                return None
            await self.monitor.wait_for_check(left)

    async def _volatile(self, replica: Target, plan: RequestPlan) -> bool:
        assert self.monitor is not None
        return await self.monitor.volatile(replica, plan.functions)

    async def _to_named(self, name: str, after_lsn: int, may_write: bool) -> Routing:
        target = self.targets.get(name)
        if target is None:
            self._hook_mistake(
                f"unknown target {name!r}",
                f"the routing hook named target {name!r}; known: {', '.join(self.targets.names())}",
            )
            return self._to_primary(may_write)
        if not target.replica:
            return self._to_primary(may_write)
        # The named replica, when it may take the read now; else the fallback rules.
        if target.in_rotation and (not after_lsn or target.replay_lsn >= after_lsn):
            return self._to_replica(target)
        replica = await self._replica_for(after_lsn, None)
        if replica is not None:
            return self._to_replica(replica)
        return self._to_primary(may_write)

    def _ask_hook(self, caller: str | None, sqls: Sequence[str]) -> str | None:
        assert self.hook is not None
        try:
            named = self.hook(caller, list(sqls))
        except Exception as exc:
            self._hook_mistake(
                f"raised {type(exc).__name__}",
                f"the routing hook raised {type(exc).__name__}: {exc}; routing to the primary",
            )
            return "primary"
        if named is None or isinstance(named, str):
            return named
        self._hook_mistake(
            f"returned {type(named).__name__}",
            f"the routing hook returned {type(named).__name__}, not a target name or None;"
            " routing to the primary",
        )
        return "primary"

    def _hook_mistake(self, kind: str, message: str) -> None:
        """Count a hook mistake; log each kind once (a hook called per request would flood)."""
        self.stats["hook_errors"] += 1
        if kind not in self._hook_mistakes:
            self._hook_mistakes.add(kind)
            log.error(message, extra={"hook_error": kind})

    def replica_failed(self, target: Target, exc: BaseException) -> None:
        """A read on *target* failed before answering: it runs again on the primary."""
        self.stats["replica_retries"] += 1
        log.info(
            "read failed on a replica; running it on the primary",
            extra={"target": target.name, "error": str(exc)},
        )

    def get_stats(self) -> dict[str, int]:
        """``target.<name>.*`` for each target, and the routing's counters."""
        stats = self.targets.get_stats()
        if self.targets.replicas:
            stats.update(self.stats)
        return stats


def retry_on_primary(exc: BaseException) -> bool:
    """Whether a read that failed this way on a replica runs again on the primary: nothing
    was answered (the replica's queue, connection or server failed, a reload removed it and
    closed its pool, or a recovery conflict cancelled it)."""
    if isinstance(exc, TransactionLost | PoolUnavailable | QueueFull | PoolClosed):
        return True
    if isinstance(exc, StatementFailed):
        sqlstate = exc.error.sqlstate
        return sqlstate in _REPLICA_RETRY_SQLSTATES or sqlstate.startswith("08")
    return False


async def run_on_replica_or_primary(
    router: Router, routing: Routing, run: Callable[[Target], Awaitable[_T]]
) -> tuple[_T, Target]:
    """``run(target)`` on the routed target; a read that fails on a replica before answering
    (`retry_on_primary`) runs once more on the primary. Return the result and where it ran."""
    target = routing.target
    if target.replica:
        try:
            return await run(target), target
        except Exception as exc:
            if not retry_on_primary(exc):
                raise
            router.replica_failed(target, exc)
        target = router.primary
    return await run(target), target


async def stream_on_replica_or_primary(
    router: Router, routing: Routing, open_stream: Callable[[Target], AsyncIterator[_T]]
) -> AsyncGenerator[_T, None]:
    """The items of ``open_stream(target)``; a stream that fails on a replica before its
    first item runs on the primary instead (`run_on_replica_or_primary`)."""
    target = routing.target
    if target.replica:
        items = open_stream(target)
        try:
            first = await anext(items)
        except StopAsyncIteration:
            return
        except Exception as exc:
            await _close(items)
            if not retry_on_primary(exc):
                raise
            router.replica_failed(target, exc)
        else:
            try:
                yield first
                async for item in items:
                    yield item
            finally:
                await _close(items)
            return
    items = open_stream(router.primary)
    try:
        async for item in items:
            yield item
    finally:
        await _close(items)


async def _close(items: AsyncIterator[Any]) -> None:
    aclose = getattr(items, "aclose", None)
    if aclose is not None:
        await asyncio.shield(aclose())
