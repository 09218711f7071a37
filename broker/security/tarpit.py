"""Refusals held for sources that keep failing authentication (a tarpit; issue 15, item 7).

A refused call costs the broker little of its own work, but gRPC's per-call work (HTTP/2
frames, the call object, the status) is paid on the broker's one event loop whatever the
answer. A client that sends its next call as soon as the last is refused — a script, a
flood of forged IAM proofs, an SDK retrying — is then a closed loop running as fast as the
broker can refuse it: thousands of calls a second, which took the loop from real callers
(a valid caller's first call 6.6–19× slower under 150 forged proofs at a time,
docs/security.md).

So a *source* (the caller's address without its port, `broker.security.stsgate.peer_host`)
whose calls were refused ``budget`` times within ``window`` seconds has its refusals *held*
``hold`` seconds before they are answered, for ``window`` seconds after its latest refusal
past the budget. Counted are the refusals that are the caller's doing
(``AuthError.counts_against_source``): UNAUTHENTICATED, PERMISSION_DENIED, and the STS
bounds' refusal of an address over its STS refusal budget — not UNAVAILABLE for STS out of
reach, which every caller gets alike. The answer is the same refusal, only later. A held call
costs a sleeping task, and a closed loop slows to about its concurrency / ``hold`` calls a
second. Accepted calls (a cached identity, a valid token) are never held, whatever their
address.

Each held call waits its own time, drawn uniformly between ``1 - SPREAD`` and ``1 + SPREAD``
times ``hold`` (``hold`` on average): with one fixed hold, calls of a flood that arrived
together were answered in the same loop turn and came back together, in step for as long as
the flood lasted. With more than ``releases`` held at once each is held longer, in
proportion, so that about ``releases`` are answered per hold however many are held: answering
3,000 held calls a second took the loop as surely as refusing them at once did.

Each source may hold ``per_source`` calls at once, and more while ``per_source`` places stay
free broker-wide for other sources; never more than ``total`` broker-wide. So one flood larger
than ``per_source`` is held whole rather than spinning on instant refusals (1,300 forged
proofs at a time: a valid first call 1.6x slower in the median, against 19x with a fixed hold
capped at ``per_source`` and 83x with none; docs/security.md), and another source still finds
room. Past the caps a refusal is answered at once, as without a hold, so memory stays bounded.
A flood that never waits for answers (open loop) is bounded only by those caps and the
network.
Event-loop confined, no locks.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["Tarpit"]

HOLD = 1.0  # seconds (PGBROKER_AUTH_REFUSAL_HOLD), on average
SPREAD = 0.5  # a held call waits hold x uniform(1 - SPREAD, 1 + SPREAD)
# Held calls answered per hold broker-wide, about, at most: with more held at once each waits
# longer (3,072 held: 3 holds), since their answers, and the flood's calls that follow them,
# would otherwise take more of the loop than the instant refusals the hold replaced.
RELEASES = 1024
BUDGET = 32  # refusals of one source within WINDOW before its refusals are held
WINDOW = 10.0  # seconds
# Calls held at once. Per source, well above a closed-loop flood's usual concurrency (150 in
# devtools/stsflood.py), so that no part of it spins on instant refusals; broker-wide, a
# bound on what held calls take: ~40 KB each measured (a gRPC call, its metadata, a task),
# so ~160 MB at most.
PER_SOURCE = 1024
TOTAL = 4096
MAX_SOURCES = 10_000  # sources remembered (least recently refused dropped first)


@dataclass
class _Record:
    started: float  # this window's start
    refusals: int = 0  # in this window
    held_until: float = 0.0  # refusals are held until then


class Tarpit:
    """Counts refusals per source and holds those of sources over their budget (see the
    module docstring). ``hold`` 0 turns holding off."""

    def __init__(
        self,
        *,
        hold: float = HOLD,
        budget: int = BUDGET,
        window: float = WINDOW,
        per_source: int = PER_SOURCE,
        total: int = TOTAL,
        releases: int = RELEASES,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.hold = hold
        self.budget = budget
        self.window = window
        self.per_source = per_source
        self.total = total
        self.releases = releases
        self._clock = clock
        self._records: OrderedDict[str, _Record] = OrderedDict()
        self._holding: dict[str, int] = {}  # source -> calls held now
        self._held_now = 0
        self.held = 0  # calls held so far

    def _count(self, source: str) -> None:
        if not source:
            return  # no address known: nothing to count it against
        now = self._clock()
        record = self._records.get(source)
        if record is None or now - record.started >= self.window:
            held_until = record.held_until if record else 0.0
            record = _Record(now, held_until=held_until)
            self._records[source] = record
        record.refusals += 1
        if record.refusals >= self.budget:
            record.held_until = now + self.window
        self._records.move_to_end(source)
        while len(self._records) > MAX_SOURCES:
            self._records.popitem(last=False)

    def over_budget(self, source: str) -> bool:
        """Whether refusals of *source* are held now."""
        record = self._records.get(source)
        return record is not None and self._clock() < record.held_until

    async def hold_refusal(self, source: str, *, count: bool = True) -> bool:
        """Before a refusal of *source* is answered: count it (if *count*) and, if *source*
        was already over its budget, sleep ``hold`` seconds unless the caps on held calls are
        reached. Whether it was held."""
        over = self.over_budget(source)
        if count:
            self._count(source)
        if not over or self.hold <= 0:
            return False
        if not self._has_room(source):
            return False  # answered at once: memory stays bounded
        self._holding[source] = self._holding.get(source, 0) + 1
        self._held_now += 1
        self.held += 1
        try:
            await asyncio.sleep(self._drawn_hold())
        finally:
            self._held_now -= 1
            left = self._holding[source] - 1
            if left:
                self._holding[source] = left
            else:
                del self._holding[source]
        return True

    def _drawn_hold(self) -> float:
        """This call's hold: ``hold``, longer when more than ``releases`` are held
        (`RELEASES`), times a drawn factor around 1 (`SPREAD`)."""
        scale = max(1.0, self._held_now / self.releases)
        return self.hold * scale * random.uniform(1 - SPREAD, 1 + SPREAD)

    def _has_room(self, source: str) -> bool:
        """Whether one more call of *source* may be held: within its own ``per_source``, or
        past it while ``per_source`` places stay free broker-wide for other sources; never
        past ``total``."""
        if self._held_now >= self.total:
            return False
        if self._holding.get(source, 0) < self.per_source:
            return True
        return self._held_now + self.per_source < self.total

    def holding(self, source: str | None = None) -> int:
        """Calls held now, of *source* or of all."""
        return self._held_now if source is None else self._holding.get(source, 0)
