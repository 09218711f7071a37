"""The bound on interactive transactions open at once on one blocking client's channel.

Apart from `lambda_client.transaction` (loaded on a client's first `begin`) because every
`BrokerClient` builds its slots, and a cold start's import must stay small.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from lambda_client import errors
from lambda_client._grpc import grpc

__all__ = ["DEFAULT_MAX_OPEN_TRANSACTIONS", "TransactionSlots"]

# Well under the thousand or so streams where gRPC's blocking API stalls (TransactionSlots).
DEFAULT_MAX_OPEN_TRANSACTIONS = 200


class TransactionSlots:
    """At most *limit* ``Transact`` streams open at once on one blocking client's channel;
    a `begin` past it waits here, within its deadline, for one to end.

    Why: gRPC's blocking API spends two threads on each open stream (the caller reading,
    gRPC's request sender), and each wakes every 0.1 s while it waits (``grpc._common.wait``),
    while one thread per channel delivers every stream's events under one channel-wide lock.
    With about a thousand streams open on one channel (a threaded server's transactions,
    most of them queued at the broker for a pooled connection), those wake-ups outrun the
    GIL and the delivery thread starves: the steps of leased transactions stop reaching the
    broker, which rolls them back at ``PGBROKER_IDLE_TRANSACTION_TIMEOUT`` (docs/client.md,
    "Threads"). A thread waiting here sleeps until a slot frees, without polling."""

    def __init__(self, limit: int) -> None:
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise ValueError(f"max_open_transactions must be an integer ≥ 1, not {limit!r}")
        self.limit = limit
        self._free = threading.BoundedSemaphore(limit)

    def take(self, timeout: float) -> Callable[[], None]:
        """Wait up to *timeout* seconds for a slot and return the callable that gives it back
        (once, however often it is called); `errors.Overloaded` (``QUEUE_TIMEOUT``, nothing
        was sent) when none freed in time."""
        if not self._free.acquire(timeout=max(0.0, timeout)):
            raise errors.Overloaded(
                f"no interactive transaction could start within the deadline: "
                f"{self.limit} are open on this client's channel (max_open_transactions) and "
                "none ended; nothing was sent. Keep transactions short, or give groups of "
                "threads a client each",
                code=grpc.StatusCode.RESOURCE_EXHAUSTED,
                reason="QUEUE_TIMEOUT",
            )
        given_back = threading.Lock()

        def release() -> None:
            if given_back.acquire(blocking=False):
                self._free.release()

        return release
