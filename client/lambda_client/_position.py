"""Read-your-writes: the newest commit position this process has seen, per broker target.

A broker with read replicas answers every write that committed on the primary with the
commit's WAL position (``commit_lsn``). The client keeps the highest one per target (a
process-wide, thread-safe maximum: it never goes back) and sends it with every later request
(``after_lsn``), so the broker runs a read on a replica only once that replica has replayed
the write. Every client in the process (`BrokerClient`, `AsyncBrokerClient`, transactions,
``lambda_client.dbapi`` connections) shares it, so a read after a write by any of them sees
that write. Without replicas the broker sends no position and nothing is kept.

It lives as long as the process: a warm Lambda container keeps it across invocations; a new
container starts without one (its reads may use any healthy replica).
"""

from __future__ import annotations

import threading

__all__ = ["latest", "seen"]

_lock = threading.Lock()
_positions: dict[str, int] = {}


def seen(target: str, commit_lsn: int) -> None:
    """Keep *commit_lsn* for *target* if it is newer than the one kept (0: nothing)."""
    if commit_lsn and commit_lsn > _positions.get(target, 0):
        with _lock:
            if commit_lsn > _positions.get(target, 0):
                _positions[target] = commit_lsn


def latest(target: str) -> int:
    """The newest commit position seen for *target* (0: none)."""
    return _positions.get(target, 0)
