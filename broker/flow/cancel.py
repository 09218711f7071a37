"""Cancel requests and the verdict on a connection after work ran on it (no gRPC).

Shared by the batch flow (`broker.flow.batch`) and leases (`broker.flow.lease`): an `Attempt`
records the work a worker thread (or a greenlet on the loop: `Pool.run_io`) runs on a pooled
connection and the cancel requests sent to its backend; `send_cancel` sends one (once per
attempt, delivery retried while the work runs); `settle` waits for the work even when the
waiting task is cancelled; `close_reason` says why the connection must not go back to the pool
(None when it is idle and clean, and no cancel request can still hit the next caller's query).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Any

from broker.pooling.pool import Pool, ServerConnection
from broker.postgres.pg import TransactionStatus

__all__ = ["Attempt", "close_reason", "send_cancel", "settle"]

log = logging.getLogger("pgbroker.execute")


@dataclass
class Attempt:
    """What the event loop knows about a transaction running on a worker."""

    conn: ServerConnection
    work: asyncio.Future[Any] | None = None
    cancel_sent: bool = False
    cancel_tasks: list[asyncio.Task[bool]] = field(default_factory=list)


async def settle(work: asyncio.Future[Any]) -> BaseException | None:
    """Wait for the worker even though our task was cancelled; return its exception."""
    while not work.done():
        try:
            await asyncio.shield(work)
        except asyncio.CancelledError:
            continue
        except BaseException:
            break
    return None if work.cancelled() else work.exception()


def send_cancel(pool: Pool, attempt: Attempt, why: str) -> None:
    if attempt.cancel_sent:
        return
    attempt.cancel_sent = True
    log.info(
        "cancelling backend query",
        extra={"backend_pid": attempt.conn.pg.backend_pid, "reason": why},
    )
    attempt.cancel_tasks.append(asyncio.ensure_future(_deliver_cancel(pool, attempt)))


async def _deliver_cancel(pool: Pool, attempt: Attempt, tries: int = 3) -> bool:
    """Send the cancel request; on a failed delivery (a slow or busy server) try again while
    the statement still runs. Return True once the postmaster took one."""
    for _ in range(tries):
        if await pool.cancel_backend(attempt.conn):
            return True
        if attempt.work is None or attempt.work.done():
            return False
        await asyncio.sleep(0.1)
    return False


def _cancel_delivered(attempt: Attempt) -> bool:
    """True once the postmaster has taken every cancel request we sent (it closed the socket).

    The signal has then reached the backend: it stopped the running statement (an error we
    read), or, arriving while the backend waited for the next command, it was dropped — a
    delivered cancel cannot reach a later query on this connection.
    """
    return all(
        task.done() and not task.cancelled() and task.exception() is None and task.result()
        for task in attempt.cancel_tasks
    )


def close_reason(
    conn: ServerConnection, attempt: Attempt, error: BaseException | None
) -> str | None:
    """Why *conn* must not go back to the pool, or None if it is idle and clean."""
    if conn.pg.closed:
        return "server connection lost"
    if conn.pg.transaction_status is not TransactionStatus.IDLE:
        return f"not idle after the transaction ({conn.pg.transaction_status.value})"
    # Session state the caller left behind (broker/postgres/audit.py): replace, never hand on.
    if changed := conn.pg.reported_changes():
        return f"session state changed ({', '.join(changed)})"
    if conn.pg.session_dirty:
        return f"session state left behind ({conn.pg.session_dirty})"
    if attempt.cancel_sent and not _cancel_delivered(attempt):
        # A cancel request still in flight could hit the next caller's query.
        return "cancel request not confirmed delivered"
    return None
