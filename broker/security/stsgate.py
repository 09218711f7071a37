"""Bounds on the STS calls that unverified IAM proofs cause (issue 15, item 7).

Anyone who reaches the port can send a well-formed proof with a made-up signature, and only
STS can tell it is forged: without bounds each one costs an STS call, and a flood of them
queues real callers' first calls behind it. `VerifyGate` keeps that bounded, per *source*
(the caller's network address as gRPC reports it, without the port; the claimed access key
when no address is known):

* at most ``concurrency`` STS calls run at once, broker-wide;
* at most ``per_source`` verifications of one source wait or run at once; one more is refused
  at once, without calling STS (UNAVAILABLE, ``AUTH_UNAVAILABLE``, retry after 1 s);
* when a call slot frees up it goes to the next *source* in round-robin order, not to the
  oldest proof, so a valid caller's first call waits for at most one STS call per other
  source, however many proofs a flooding source has queued;
* a source whose proofs STS refused ``refusals`` times within ``window`` seconds is refused
  at once for the rest of that window (its already-verified callers are cached and unaffected;
  a new caller sharing its address — behind the same NAT — gets the retryable refusal).

These refusals are retryable and cost no STS call; the gate in front of the services may hold
them before they are answered (`broker.security.tarpit.Tarpit`), so that a flood waiting for
its answers slows down. So one source costs at most ``refusals + per_source`` STS calls per
window, whatever it sends; `broker.security.iam.IamAuth` also caches refusals by the exact
signed request, so a replayed forged proof costs nothing. Event-loop confined, no locks.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

from broker.security.identity import AuthUnavailable, SourceThrottled

__all__ = ["VerifyGate", "peer_host"]

STS_CONCURRENCY = 32  # STS calls in flight at once, broker-wide
PER_SOURCE = 64  # verifications of one source waiting or running at once
REFUSALS_PER_WINDOW = 32  # STS refusals of one source before it is refused at once
WINDOW = 10.0  # seconds
MAX_SOURCES = 10_000  # refusal windows kept (oldest dropped first)


def peer_host(peer: str | None) -> str:
    """The address part of a gRPC peer string (``ipv4:10.0.0.1:5432`` → ``ipv4:10.0.0.1``,
    ``ipv6:[::1]:5432`` → ``ipv6:[::1]``); "" when unknown."""
    if not peer:
        return ""
    if peer.startswith(("ipv4:", "ipv6:")):
        host, sep, port = peer.rpartition(":")
        return host if sep and port.isdigit() else peer
    return peer  # unix:… and others: the whole string


@dataclass
class _Window:
    started: float
    refusals: int = 0


class VerifyGate:
    """Admission and round-robin scheduling of STS verifications (see the module docstring)."""

    def __init__(
        self,
        *,
        concurrency: int = STS_CONCURRENCY,
        per_source: int = PER_SOURCE,
        refusals: int = REFUSALS_PER_WINDOW,
        window: float = WINDOW,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.concurrency = concurrency
        self.per_source = per_source
        self.refusals = refusals
        self.window = window
        self._clock = clock
        self._running = 0
        self._pending: dict[str, int] = {}  # source -> waiting + running
        self._queues: OrderedDict[str, deque[asyncio.Future[None]]] = OrderedDict()
        self._windows: OrderedDict[str, _Window] = OrderedDict()
        self.throttled = 0  # proofs refused here without an STS call

    @asynccontextmanager
    async def verifying(self, source: str) -> AsyncIterator[None]:
        """Hold one STS call slot for *source* while the block runs.

        Raise `AuthUnavailable` at once (nothing sent to STS) when *source* already has
        ``per_source`` verifications pending or ran out of refusals for this window."""
        self._admit(source)
        self._pending[source] = self._pending.get(source, 0) + 1
        try:
            await self._acquire(source)
            try:
                yield
            finally:
                self._release()
        finally:
            left = self._pending[source] - 1
            if left:
                self._pending[source] = left
            else:
                del self._pending[source]

    def refused(self, source: str) -> None:
        """Count an STS refusal of a proof from *source* (towards its window's budget)."""
        window = self._window(source)
        window.refusals += 1

    def queued(self) -> int:
        """Verifications waiting for a call slot."""
        return sum(len(q) for q in self._queues.values())

    def _admit(self, source: str) -> None:
        window = self._windows.get(source)
        if (
            window is not None
            and window.refusals >= self.refusals
            and self._clock() - window.started < self.window
        ):
            self.throttled += 1
            raise SourceThrottled(
                f"too many proofs from this address failed verification ({window.refusals}"
                f" in {self.window:g} s); new callers from it are refused for now",
                retry_after=max(1.0, round(window.started + self.window - self._clock(), 1)),
            )
        if self._pending.get(source, 0) >= self.per_source:
            self.throttled += 1
            raise AuthUnavailable(
                f"{self.per_source} proofs from this address are already being verified;"
                " retry shortly",
                retry_after=1.0,
            )

    async def _acquire(self, source: str) -> None:
        if self._running < self.concurrency and not self._queues:
            self._running += 1
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queues.setdefault(source, deque()).append(future)
        try:
            await future  # resolved by _release, which hands its slot over
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():
                self._release()  # the slot was handed over as we were cancelled: pass it on
            else:
                self._forget(source, future)
            raise

    def _release(self) -> None:
        """Hand the freed slot to the next source's oldest waiter, round-robin."""
        while self._queues:
            source, queue = self._queues.popitem(last=False)
            future = queue.popleft()
            if queue:
                self._queues[source] = queue  # to the back of the rotation
            if not future.done():
                future.set_result(None)
                return
        self._running -= 1

    def _forget(self, source: str, future: asyncio.Future[None]) -> None:
        queue = self._queues.get(source)
        if queue is None:
            return
        try:
            queue.remove(future)
        except ValueError:
            return
        if not queue:
            del self._queues[source]

    def _window(self, source: str) -> _Window:
        now = self._clock()
        window = self._windows.get(source)
        if window is None or now - window.started >= self.window:
            window = _Window(now)
            self._windows[source] = window
        self._windows.move_to_end(source)
        while len(self._windows) > MAX_SOURCES:
            self._windows.popitem(last=False)
        return window
