"""The pool's queue of waiting requests: weighted fair queuing by caller key, FIFO within one.

PgBouncer and psycopg_pool serve waiters in plain FIFO order, so one function's flood of
queued requests delays every other caller by the whole backlog. Here each caller key (a plain
string, `broker.security.limits.caller_key`: the identity and the Lambda function name) has
its own FIFO, and a freed connection goes to the head of the flow with the smallest virtual
finish tag (start-time fair queuing with unit cost, one connection turn per request):

* a request's tag is ``max(V, last tag of its flow) + 1 / weight``, where ``V`` is the tag of
  the request served last; ties go to the earlier arrival;
* so a caller that had nothing queued is served after at most one queued request of each
  other flow, however long their backlogs, and under a steady backlog flows are served in
  proportion to their weights (``PGBROKER_QUEUE_WEIGHTS``);
* within one flow tags only grow: strict FIFO. With one caller key the order is exactly FIFO.

A waiter removed before being served (timed out, cancelled) stays in its flow as a dead entry
until it reaches the head, so removal is O(1); ``len()`` counts live waiters only, and the dead
are swept out when they outnumber the live. Event-loop confined, no locks.
"""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from itertools import count
from typing import Generic, TypeVar

__all__ = ["FairQueue"]

_T = TypeVar("_T")

# Sweep dead entries when there are more of them than live ones plus this.
_SWEEP_SLACK = 256


@dataclass(eq=False)
class _Entry(Generic[_T]):
    item: _T
    tag: float
    seq: int
    live: bool = True


@dataclass(eq=False)
class _Flow(Generic[_T]):
    weight: float
    last_tag: float
    entries: deque[_Entry[_T]] = field(default_factory=deque)


class FairQueue(Generic[_T]):
    """Waiters by caller key; *weight_for* gives a key's weight (> 0), read when its flow
    starts. Items must be hashable by identity."""

    def __init__(self, weight_for: Callable[[str | None], float]) -> None:
        self._weight_for = weight_for
        self._flows: dict[str | None, _Flow[_T]] = {}
        self._entries: dict[_T, _Entry[_T]] = {}
        # (tag of the flow's head, its seq, key): one per non-empty flow.
        self._heads: list[tuple[float, int, str | None]] = []
        self._virtual_time = 0.0
        self._seq = count()
        self._dead = 0

    def __len__(self) -> int:
        return len(self._entries)

    def push(self, item: _T, key: str | None) -> None:
        """Queue *item* at the tail of *key*'s flow."""
        flow = self._flows.get(key)
        if flow is None:
            flow = _Flow(self._weight_for(key), self._virtual_time)
            self._flows[key] = flow
        tag = max(self._virtual_time, flow.last_tag) + 1.0 / flow.weight
        flow.last_tag = tag
        entry = _Entry(item, tag, next(self._seq))
        if not flow.entries:
            heapq.heappush(self._heads, (tag, entry.seq, key))
        flow.entries.append(entry)
        self._entries[item] = entry

    def pop(self) -> _T | None:
        """The next live item in fair order (removed from the queue), or None if none."""
        while self._heads:
            _, _, key = heapq.heappop(self._heads)
            flow = self._flows[key]
            entry = flow.entries.popleft()
            self._virtual_time = max(self._virtual_time, entry.tag)
            if flow.entries:
                head = flow.entries[0]
                heapq.heappush(self._heads, (head.tag, head.seq, key))
            else:
                # Its last tag is <= V now: a new request of this key starts from V anyway.
                del self._flows[key]
            if entry.live:
                del self._entries[entry.item]
                return entry.item
            self._dead -= 1
        return None

    def remove(self, item: _T) -> bool:
        """Take *item* out of the queue (it gave up); False if it was not queued."""
        entry = self._entries.pop(item, None)
        if entry is None:
            return False
        entry.live = False
        self._dead += 1
        if self._dead > len(self._entries) + _SWEEP_SLACK:
            self._sweep()
        return True

    def items(self) -> Iterator[_T]:
        """The live items, flow by flow (each in FIFO order)."""
        for flow in self._flows.values():
            for entry in flow.entries:
                if entry.live:
                    yield entry.item

    def oldest(self, enqueued_at: Callable[[_T], float], default: float) -> float:
        """The smallest *enqueued_at* among live items (each flow's first live one), or
        *default* when none waits."""
        oldest = default
        for flow in self._flows.values():
            for entry in flow.entries:
                if entry.live:
                    oldest = min(oldest, enqueued_at(entry.item))
                    break
        return oldest

    def waiting_by_key(self) -> dict[str | None, int]:
        """How many live waiters each caller key has (keys without one left out)."""
        counts = {key: sum(e.live for e in flow.entries) for key, flow in self._flows.items()}
        return {key: n for key, n in counts.items() if n}

    def flows_waiting(self) -> int:
        """How many caller keys have a live waiter."""
        return sum(any(e.live for e in flow.entries) for flow in self._flows.values())

    def _sweep(self) -> None:
        """Drop dead entries (tags kept, so order and fairness are unchanged)."""
        self._heads = []
        for key, flow in list(self._flows.items()):
            flow.entries = deque(e for e in flow.entries if e.live)
            if flow.entries:
                head = flow.entries[0]
                self._heads.append((head.tag, head.seq, key))
            elif flow.last_tag <= self._virtual_time:
                del self._flows[key]
        heapq.heapify(self._heads)
        self._dead = 0
