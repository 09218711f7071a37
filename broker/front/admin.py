"""The operator's controls: PgBouncer's PAUSE, RESUME, RELOAD and SHOW, as the
``pgbroker.v1.Admin`` service and as signals.

=================  ======================  =========================  ==========================
control            Admin RPC               signal (PgBouncer's too)   CLI
=================  ======================  =========================  ==========================
PAUSE              ``Pause``               SIGUSR1                    ``python -m broker pause``
RESUME             ``Resume``              SIGUSR2                    ``… resume``
RELOAD             ``Reload``              SIGHUP                     ``… reload [key=value]``
SHOW CLIENTS       ``ShowCallers``         —                          ``… top``
=================  ======================  =========================  ==========================

`Controls` does each one in this process and logs it (PgBouncer logs every PAUSE, RESUME and
RELOAD); `AdminService` serves the RPCs behind the admin gate (broker/security/admin.py).

With ``--workers N`` a call reaches one worker, so a worker does not act on its own: it sends
the signal to its supervisor, which forwards it to every worker (broker/front/workers.py), and
the RPC answers once this worker has acted (its reload's outcome, or its refusal). A reload's
``key=value`` overrides cannot travel in a signal: the worker asked reloads with them first (a
refusal changes nothing anywhere), then asks each sibling to do the same over its private
socket (broker/front/siblings.py); a sibling that did not is named in the failure. Each
worker that reloads records the overrides (none, after a plain reload) for a worker restarted
later (broker/front/workers.py). ``Pause`` and ``Resume`` answer once every worker that gives
its figures is paused (resumed), ``Pause(wait=true)`` once none of them has a connection
active, and a reply's figures are the broker's, as GetStats' (a few sibling round trips of
about a millisecond each, on a rare call). ``ShowCallers`` answers for every worker too.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from broker.errors import BrokerFailure, Code, Reason
from broker.front.reload import Reloader, ReloadOutcome, ReloadRefused
from broker.front.siblings import Siblings
from broker.front.status import failure_for, status_for
from broker.pooling.pool import Pool
from broker.security.identity import current_identity
from broker.security.limits import InflightLimiter
from lambda_client._proto.pgbroker.v1 import broker_pb2 as pb
from lambda_client._proto.pgbroker.v1 import broker_pb2_grpc as pb_grpc

__all__ = ["SIGNALS", "AdminService", "Controls"]

log = logging.getLogger("pgbroker.admin")

# PgBouncer's signals: SIGHUP reloads, SIGUSR1 pauses, SIGUSR2 resumes.
SIGNALS = (signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2)
# How long a worker waits for the supervisor's forwarded signal to reach it.
FANOUT_TIMEOUT = 5.0
# Seconds between two looks at the other workers' figures while waiting for their state.
_WORKERS_POLL = 0.05
# Seconds `pause --wait` keeps of its call's deadline to answer (with --workers N the reply
# gathers every worker's figures).
_REPLY_TIME = 0.25
DEFAULT_SHOWN = 20


class NotForwardable(BrokerFailure):
    """A reload with overrides that did not reach every worker: FAILED_PRECONDITION, saying
    which workers it changed."""

    code = Code.FAILED_PRECONDITION
    reason = Reason.BAD_REQUEST


class FanoutTimeout(BrokerFailure):
    """The supervisor did not forward the signal back in time: UNAVAILABLE."""

    code = Code.UNAVAILABLE


class Controls:
    """Pause, resume and reload this process (*pool*, *reloader*), logged; *supervisor*: the
    pid of the ``--workers`` supervisor that fans a control out to every worker (None for a
    single process)."""

    def __init__(self, pool: Pool, reloader: Reloader, supervisor: int | None = None) -> None:
        self.pool = pool
        self.reloader = reloader
        self.supervisor = supervisor
        self.reload_attempts = 0
        self.last_reload: ReloadOutcome | ReloadRefused = ReloadOutcome()
        self._reloading: set[asyncio.Task[None]] = set()
        # With --workers N: told the overrides of each reload that succeeds, so that a worker
        # started later starts with them (`WorkerRole.record_overrides`).
        self.record: Callable[[Mapping[str, str]], None] | None = None

    def pause(self, why: str) -> None:
        if self.pool.pause():
            stats = self.pool.get_stats()
            log.info(
                "PAUSE (%s): new work queues, running work finishes",
                why,
                extra={k: stats[k] for k in ("pool_active", "requests_waiting")},
            )

    def resume(self, why: str) -> None:
        waiting = self.pool.get_stats()["requests_waiting"]
        if self.pool.resume():
            log.info("RESUME (%s): queued work starts", why, extra={"requests_waiting": waiting})

    async def reload(
        self, overrides: Mapping[str, str] | None = None, why: str = ""
    ) -> ReloadOutcome:
        """`Reloader.reload`; the outcome (or refusal) is kept for a worker's RPC, and
        ``reload_attempts`` counts the reloads done (refused ones too)."""
        try:
            outcome = await self.reloader.reload(overrides, why=why)
        except ReloadRefused as exc:
            self.last_reload = exc
            raise
        finally:
            self.reload_attempts += 1
        self.last_reload = outcome
        if self.record is not None:
            try:
                self.record(overrides or {})
            except OSError as exc:  # this reload stands; a worker started later lacks it
                log.error("cannot record the reload's overrides for restarted workers: %s", exc)
        return outcome

    async def _reload_on_signal(self, why: str) -> None:
        # A refusal is logged by the reloader; the broker keeps serving.
        with contextlib.suppress(ReloadRefused):
            await self.reload(why=why)

    def on_signal(self, signum: int) -> None:
        """The handler of `SIGNALS` on the event loop."""
        why = signal.Signals(signum).name
        if signum == signal.SIGHUP:
            # A reload may connect to a new read replica: it runs as a task of its own.
            task = asyncio.get_running_loop().create_task(self._reload_on_signal(why))
            self._reloading.add(task)
            task.add_done_callback(self._reloading.discard)
        elif signum == signal.SIGUSR1:
            self.pause(why)
        elif signum == signal.SIGUSR2:
            self.resume(why)

    async def fan_out(self, signum: int, done: Callable[[], bool]) -> None:
        """As a worker: ask the supervisor to send *signum* to every worker, and wait until
        *done* says it reached this one."""
        assert self.supervisor is not None
        os.kill(self.supervisor, signum)
        deadline = time.monotonic() + FANOUT_TIMEOUT
        while not done():
            if time.monotonic() > deadline:
                raise FanoutTimeout(
                    f"the supervisor did not forward {signal.Signals(signum).name} within"
                    f" {FANOUT_TIMEOUT:g}s"
                )
            await asyncio.sleep(0.02)


class AdminService(pb_grpc.AdminServicer):
    """``pgbroker.v1.Admin``: *controls* act, *stats* is GetStats' figures, *inflight* and
    *holds* (caller key, BEGIN, last step of each open lease) feed ShowCallers."""

    def __init__(
        self,
        controls: Controls,
        stats: Callable[[], dict[str, int]],
        inflight: InflightLimiter,
        holds: Callable[[], list[tuple[str, float, float]]],
    ) -> None:
        self.controls = controls
        self.stats = stats
        self.inflight = inflight
        self.holds = holds
        # With --workers N (broker/front/siblings.py): ShowCallers answers for all workers.
        self.siblings: Siblings | None = None

    async def Pause(self, request: pb.PauseRequest, context: Any) -> pb.AdminReply:
        async def act() -> str:
            pool = self.controls.pool
            if self.controls.supervisor is not None:
                await self.controls.fan_out(signal.SIGUSR1, lambda: pool.paused)
                await self._until_workers(_paused, FANOUT_TIMEOUT)
            else:
                self.controls.pause(_who())
            if not request.wait:
                return "paused: new work queues; running work finishes"
            remaining = context.time_remaining()
            deadline = None if remaining is None else time.monotonic() + remaining - _REPLY_TIME
            drained = await pool.wait_drained(_left(deadline)) and await self._until_workers(
                _drained, _left(deadline)
            )
            if not drained:
                return "paused, but work still runs (the call's deadline came first)"
            return "paused: nothing runs"

        return await self._reply(act, context)

    async def Resume(self, request: pb.ResumeRequest, context: Any) -> pb.AdminReply:
        async def act() -> str:
            pool = self.controls.pool
            if self.controls.supervisor is not None:
                await self.controls.fan_out(signal.SIGUSR2, lambda: not pool.paused)
                await self._until_workers(lambda part: not _paused(part), FANOUT_TIMEOUT)
            else:
                self.controls.resume(_who())
            return "resumed"

        return await self._reply(act, context)

    async def _until_workers(
        self, done: Callable[[Mapping[str, int]], bool], timeout: float | None
    ) -> bool:
        """With --workers N: wait until *done* holds for the figures of every worker that
        answers (each got the supervisor's signal at about the same time as this one); False
        after *timeout* seconds (None: no limit). True at once for a single process."""
        if self.siblings is None:
            return True
        deadline = None if timeout is None else time.monotonic() + timeout
        while not all(done(part) for part in await self.siblings.parts()):
            left = _left(deadline)
            if left is not None and left < _WORKERS_POLL:  # no time for another look
                return False
            await asyncio.sleep(_WORKERS_POLL)
        return True

    async def _figures(self) -> dict[str, int]:
        """The figures of a reply: the broker's (every worker's, as GetStats) with workers."""
        if self.siblings is not None:
            return await self.siblings.get_stats()
        return self.stats()

    async def Reload(self, request: pb.ReloadRequest, context: Any) -> pb.AdminReply:
        changed: list[str] = []
        restart: list[str] = []

        async def act() -> str:
            outcome = await self._reload(dict(request.overrides))
            changed.extend(outcome.changed)
            restart.extend(outcome.restart_needed)
            return outcome.message

        reply = await self._reply(act, context)
        reply.changed.extend(changed)
        reply.restart_needed.extend(restart)
        return reply

    async def _reload(self, overrides: dict[str, str]) -> ReloadOutcome:
        controls = self.controls
        if controls.supervisor is None:
            return await controls.reload(overrides, why=_who())
        if overrides:
            return await self._reload_workers(overrides)
        attempts = controls.reload_attempts
        await controls.fan_out(signal.SIGHUP, lambda: controls.reload_attempts > attempts)
        if isinstance(controls.last_reload, ReloadRefused):
            raise controls.last_reload
        return controls.last_reload

    async def _reload_workers(self, overrides: dict[str, str]) -> ReloadOutcome:
        """With --workers N, a reload with key=value overrides: a signal cannot carry them, so
        this worker reloads first (a refusal changes nothing anywhere: every worker resolves
        the same values) and then asks each sibling over its socket to do the same."""
        if self.siblings is None:
            raise NotForwardable(
                "with --workers N, a reload cannot carry key=value overrides here: put them in"
                " PGBROKER_CONFIG_FILE and reload; nothing changed"
            )
        outcome = await self.controls.reload(overrides, why=_who())
        problems = await self.siblings.reload_others(overrides)
        if problems:  # the operator must see it: the workers now differ
            text = f"this worker {outcome.message}; NOT on " + "; ".join(problems)
            log.error("reload with overrides not applied on every worker: %s", text)
            raise NotForwardable(text)
        return outcome

    async def ShowCallers(
        self, request: pb.ShowCallersRequest, context: Any
    ) -> pb.ShowCallersResponse:
        if self.siblings is not None:  # --workers N: every worker's callers and leases
            return await self.siblings.show_callers(request, _limit(request))
        return await self.own_callers(request)

    async def own_callers(self, request: pb.ShowCallersRequest) -> pb.ShowCallersResponse:
        """This process's busiest callers and longest leases."""
        limit = _limit(request)
        waiting = self.controls.pool.waiting_by_caller()
        reply = pb.ShowCallersResponse()
        for key, in_flight in self.inflight.busiest(limit):
            queued = waiting.get(key or None, 0)
            reply.callers.add(caller=key or "anonymous", in_flight=in_flight, waiting=queued)
        now = time.monotonic()
        holds = sorted(self.holds(), key=lambda hold: hold[1])[:limit]
        for caller, began_at, last_active in holds:
            reply.leases.add(
                caller=caller,
                held_ms=int((now - began_at) * 1000),
                idle_ms=int((now - last_active) * 1000),
            )
        return reply

    async def _reply(self, act: Callable[[], Awaitable[str]], context: Any) -> pb.AdminReply:
        try:
            message = await act()
        except Exception as exc:
            failure = failure_for(exc)
            await context.abort_with_status(status_for(failure))
            raise AssertionError("unreachable") from exc  # abort_with_status raises
        stats = await self._figures()
        # With --workers N: paused while any worker is (the figures' largest pool_paused).
        paused = bool(stats.get("pool_paused", self.controls.pool.paused))
        return pb.AdminReply(message=message, paused=paused, stats=stats)


def _paused(part: Mapping[str, int]) -> bool:
    return bool(part.get("pool_paused"))


def _drained(part: Mapping[str, int]) -> bool:
    return not part.get("pool_active")


def _left(deadline: float | None) -> float | None:
    return None if deadline is None else max(0.0, deadline - time.monotonic())


def _limit(request: pb.ShowCallersRequest) -> int:
    return request.limit if request.limit > 0 else DEFAULT_SHOWN


def _who() -> str:
    """Who asked, for the log: the admin identity of the call."""
    identity = current_identity.get()
    return f"admin RPC by {identity}" if identity is not None else "admin RPC"
