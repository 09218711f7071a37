"""A fixed pool of Postgres server connections with a fair queue of waiting requests.

The pool knows nothing of gRPC. Its bookkeeping runs on the asyncio event loop (one thread,
no locks); pg8000 is blocking, so connects run on a maintenance thread pool and transactions
on a worker thread pool sized to the pool (`run_in_worker`), or, with ``PGBROKER_PG_IO=loop``,
small ones in a greenlet on the loop itself (`run_io`, broker/pooling/loopio.py).

Behaviour, in PgBouncer's terms:

* ``pool_size`` server connections are opened at start and kept: a connection that breaks
  (server restart, ``pg_terminate_backend``, network loss) or outlives ``max_lifetime`` is
  closed — always with a logged reason — and replaced, retrying with exponential backoff and
  jitter while the database is down.
* A request that finds no idle connection waits (``requests_waiting``). Waiters are served by
  weighted fair queuing over their caller keys (`broker.pooling.fairqueue`: the identity and
  Lambda function a request comes from, ``PGBROKER_QUEUE_WEIGHTS``), strict FIFO within one
  key, so one caller's backlog delays another's request by about one turn, not by the
  backlog; PgBouncer has no such rule. At ``max_waiting`` waiters, one more is rejected at
  once with `QueueFull`. A waiter gives up
  after ``queue_timeout`` (`QueueTimeout`, or `PoolUnavailable` when no server connection
  exists, i.e. the database is unreachable) or when its caller's deadline can no longer be met
  (`DeadlineExpired`); a waiter that gave up is skipped when a connection frees up, so no
  connection is ever handed to nobody.
* Deadlines are `time.monotonic()` values (the event loop's clock).
* Statement cache: each connection keeps its prepared statements. When DDL commits through
  the broker, the flow calls `Pool.statements_changed`, which bumps the pool's statement
  generation; a connection prepared under an older one drops its statements as it is handed
  out (`PgConnection.drop_statements`: DEALLOCATE ALL rides on the request's first round
  trip), so no request meets a plan whose table changed (0A000).

Operator controls (broker/front/admin.py): `pause` makes every new request queue, even when a
connection is idle, while running work (and open leases) finishes and returns its connection
to the idle list (PgBouncer's PAUSE, except that the server connections stay open, so `resume`
is instant); queued requests keep their ``queue_timeout`` and deadline. `resume` hands the
idle connections to the waiters in fair order. `reconfigure` changes the size and the queue's
bounds live: a larger pool opens the new connections in the background, a smaller one closes
idle connections at once and busy ones as they come back.

A server connection is in one `ServerState` (PgBouncer's names): ``SV_IDLE`` in the pool,
``SV_ACTIVE`` handed to a request, ``SV_JUSTFREE`` closed. Returning a connection that is not
active (twice, or one never handed out) fails loudly rather than pooling it twice.

Every failure here is a `broker.errors.BrokerFailure` declaring the status the caller gets
(`lambda_client._status.Code`, no gRPC import): nothing reached the database in any of them.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import random
import select
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import count
from typing import Any, TypeVar

from broker.errors import RETRY_SOON, BrokerFailure, Code, Reason
from broker.pooling.fairqueue import FairQueue
from broker.pooling.loopio import run_on_loop
from broker.postgres.pg import STATEMENT_COUNTERS, ConnectionLost, PgConnection
from broker.security.limits import QueueWeights

__all__ = [
    "DeadlineExpired",
    "Pool",
    "PoolClosed",
    "PoolUnavailable",
    "QueueFull",
    "QueueTimeout",
    "ServerConnection",
    "ServerState",
]

log = logging.getLogger("pgbroker.pool")

# A request whose caller has less than this left when a connection frees up is dropped: it
# could not even complete a round trip to Postgres.
MIN_RUN_TIME = 0.005

_T = TypeVar("_T")


class QueueFull(BrokerFailure):
    """``max_waiting`` requests are already queued: RESOURCE_EXHAUSTED, retry soon."""

    code = Code.RESOURCE_EXHAUSTED
    reason = Reason.QUEUE_FULL
    retry_after = RETRY_SOON


class QueueTimeout(BrokerFailure):
    """The request waited ``queue_timeout`` seconds without getting a connection:
    RESOURCE_EXHAUSTED, no retry hint (the broker is saturated)."""

    code = Code.RESOURCE_EXHAUSTED
    reason = Reason.QUEUE_TIMEOUT


class PoolUnavailable(QueueTimeout):
    """The wait ended while no server connection existed: the database is unreachable.
    UNAVAILABLE, retry after a second."""

    code = Code.UNAVAILABLE
    reason = Reason.POOL_UNAVAILABLE
    retry_after = 1.0


class DeadlineExpired(BrokerFailure):
    """The caller's deadline passed (or was too close to run anything) while queued:
    DEADLINE_EXCEEDED, reason QUEUE_TIMEOUT with metadata ``cause=deadline``."""

    code = Code.DEADLINE_EXCEEDED
    reason = Reason.QUEUE_TIMEOUT

    def __init__(self, message: str) -> None:
        super().__init__(message, metadata={"cause": "deadline"})


class PoolClosed(BrokerFailure):
    """The pool is closing (broker shutting down): UNAVAILABLE, retry soon (elsewhere)."""

    code = Code.UNAVAILABLE
    reason = Reason.SHUTTING_DOWN
    retry_after = RETRY_SOON


class ServerState(enum.Enum):
    """A server connection's state, in PgBouncer's names (``include/bouncer.h``)."""

    SV_IDLE = "idle"  # in the pool, ready for a request
    SV_ACTIVE = "active"  # handed to a request
    SV_JUSTFREE = "closed"  # closed; never handed out again


@dataclass(eq=False)
class ServerConnection:
    """A pooled server connection (PgBouncer's server object) and its bookkeeping."""

    id: int
    pg: PgConnection
    expire_at: float
    state: ServerState = ServerState.SV_IDLE
    checked_out_at: float = 0.0
    idle_since: float = field(default_factory=time.monotonic)
    # The pool's statement generation its prepared statements belong to (`Pool._activate`).
    statement_generation: int = 0


@dataclass(eq=False, slots=True)
class _Waiter:
    future: asyncio.Future[ServerConnection]
    deadline: float | None
    enqueued_at: float


MAX_PARALLEL_CONNECTS = 16


class Pool:
    """Fixed pool of ``size`` server connections made by *connect* (a blocking callable)."""

    def __init__(
        self,
        connect: Callable[[], PgConnection],
        *,
        size: int,
        max_waiting: int,
        queue_timeout: float,
        max_lifetime: float,
        reconnect_initial: float = 0.05,
        reconnect_max: float = 2.0,
        weights: QueueWeights | None = None,
        pg_io: str = "threads",
    ) -> None:
        self.size = size
        # PGBROKER_PG_IO: "loop" runs small requests in a greenlet on the loop (`run_io`).
        self.pg_io = pg_io
        self.max_waiting = max_waiting
        self.queue_timeout = queue_timeout
        self.max_lifetime = max_lifetime
        self._connect = connect
        self._reconnect_initial = reconnect_initial
        self._reconnect_max = reconnect_max
        self._idle: deque[ServerConnection] = deque()
        self._active: set[ServerConnection] = set()
        self.weights = weights or QueueWeights()
        # Read through self.weights, so a reload's new weights apply to flows starting after it.
        self._waiters: FairQueue[_Waiter] = FairQueue(lambda key: self.weights.weight_for(key))
        self._connecting = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._ids = count(1)
        self._closed = False
        self._opened = False
        self._filled = asyncio.Event()
        self._first = asyncio.Event()
        self.last_connect_error: str | None = None
        self._outage = False
        self._filling = False
        # At most this many connects at once: a pool of thousands (or a database refusing
        # them) must not become thousands of threads each holding a half-open socket.
        self._connect_slots = asyncio.Semaphore(min(size, MAX_PARALLEL_CONNECTS))
        self._workers = ThreadPoolExecutor(size, thread_name_prefix="pgbroker-worker")
        # Connects, closes and cancel requests never queue behind running transactions.
        self._maintenance = ThreadPoolExecutor(size + 2, thread_name_prefix="pgbroker-maint")
        self._stats: dict[str, int] = dict.fromkeys(_COUNTERS, 0)
        # Bumped when DDL commits through the broker (`statements_changed`).
        self.statement_generation = 0
        # PAUSE: new requests queue even when a connection is idle (`pause`, `resume`).
        self.paused = False
        # Futures of `wait_drained` callers, resolved when no connection is active.
        self._drain_waiters: list[asyncio.Future[None]] = []

    # -- lifecycle ---------------------------------------------------------------------------

    async def open(
        self, wait: str | None = "filled", timeout: float = 30.0, *, fill: bool = True
    ) -> None:
        """Start opening ``size`` connections in the background (retrying until closed).

        With *wait* ``"filled"`` return once all are open, with ``"first"`` once one is;
        raise `PoolUnavailable` (naming the last connect error) if that takes longer than
        *timeout* seconds. With *fill* False only the first connection is opened, and `fill`
        opens the rest: the server checks the connection budget on the first one in between.
        """
        if not self._opened:
            self._opened = True
            self._loop = asyncio.get_running_loop()
            self._spawn_connector("pool start")
            self._spawn(self._expire_idle_loop())
        if fill:
            self.fill()
        if wait is None:
            return
        event = self._filled if wait == "filled" else self._first
        try:
            await asyncio.wait_for(event.wait(), timeout)
        except TimeoutError:
            raise PoolUnavailable(
                f"no database connection within {timeout:g}s: "
                f"{self.last_connect_error or 'no error reported'}"
            ) from None

    def fill(self) -> None:
        """Open, in the background, the connections `open` (``fill=False``) left for later."""
        if not self._filling:
            self._filling = True
            for _ in range(self.size - 1):
                self._spawn_connector("pool start")

    async def wait_filled(self) -> None:
        """Return once every connection has been opened at least once."""
        await self._filled.wait()

    @property
    def filled(self) -> bool:
        """True once every connection has been opened at least once (health: SERVING)."""
        return self._filled.is_set()

    async def close(self) -> None:
        """Fail every waiter with `PoolClosed`, stop reconnecting, close idle connections.

        Connections still active are closed as they come back (`putconn`).
        """
        if self._closed:
            return
        self._closed = True
        while (waiter := self._waiters.pop()) is not None:
            if not waiter.future.done():
                waiter.future.set_exception(PoolClosed("the broker is shutting down"))
        for task in list(self._tasks):
            task.cancel()
        while self._idle:
            self._retire(self._idle.pop(), "pool closed")
        self._maintenance.shutdown(wait=False)
        self._workers.shutdown(wait=False)

    # -- operator controls -------------------------------------------------------------------

    def pause(self) -> bool:
        """PgBouncer's PAUSE: from now on every request queues; running work finishes. Return
        False if the pool was paused already."""
        if self.paused:
            return False
        self.paused = True
        return True

    def resume(self) -> bool:
        """PgBouncer's RESUME: hand the idle connections to the queued requests in fair order.
        Return False if the pool was not paused."""
        if not self.paused:
            return False
        self.paused = False
        self._serve_waiters()
        return True

    async def wait_drained(self, timeout: float | None = None) -> bool:
        """Wait until no connection is active (handed to a request or a lease); return False
        if that took longer than *timeout* seconds."""
        if not self._active:
            return True
        future: asyncio.Future[None] = self._loop.create_future()
        self._drain_waiters.append(future)
        try:
            await asyncio.wait_for(asyncio.shield(future), timeout)
        except TimeoutError:
            return False
        finally:
            if future in self._drain_waiters:
                self._drain_waiters.remove(future)
        return True

    def reconfigure(
        self,
        *,
        size: int,
        max_waiting: int,
        queue_timeout: float,
        max_lifetime: float,
        weights: QueueWeights,
    ) -> None:
        """Apply a reload's values. A larger *size* opens the new connections in the
        background; a smaller one closes idle connections beyond it now and busy ones as they
        are returned. *max_lifetime* applies to connections opened from now on."""
        self.max_waiting = max_waiting
        self.queue_timeout = queue_timeout
        self.max_lifetime = max_lifetime
        self.weights = weights
        if size == self.size:
            return
        self.size = size
        if not self._opened or self._closed:
            return
        if self._pooled() < size:
            self._grow_threads(size)
            for _ in range(size - self._pooled()):
                self._spawn_connector("pool_size raised")
            return
        while self._idle and self._pooled() > size:
            self._retire(self._idle.popleft(), "pool_size lowered")  # least recently used

    def _grow_threads(self, size: int) -> None:
        """Room for *size* transactions and connects at once: new executors; the old ones
        finish what they run (shutdown without waiting)."""
        old_workers, old_maintenance = self._workers, self._maintenance
        self._workers = ThreadPoolExecutor(size, thread_name_prefix="pgbroker-worker")
        self._maintenance = ThreadPoolExecutor(size + 2, thread_name_prefix="pgbroker-maint")
        self._connect_slots = asyncio.Semaphore(min(size, MAX_PARALLEL_CONNECTS))
        old_workers.shutdown(wait=False)
        old_maintenance.shutdown(wait=False)

    def _pooled(self) -> int:
        """Server connections open or being opened."""
        return len(self._idle) + len(self._active) + self._connecting

    def _serve_waiters(self) -> None:
        while self._waiters:
            conn = self._take_idle()
            if conn is None:
                return
            self._active.discard(conn)  # _hand_over activates it again for its waiter
            self._hand_over(conn)

    def _note_drained(self) -> None:
        if self._active or not self._drain_waiters:
            return
        for future in self._drain_waiters:
            if not future.done():
                future.set_result(None)
        self._drain_waiters.clear()

    # -- requests ----------------------------------------------------------------------------

    async def getconn(
        self, deadline: float | None = None, *, key: str | None = None
    ) -> ServerConnection:
        """Return a server connection, waiting in fair order if none is idle: among the
        requests of caller *key* (a plain string, `broker.security.limits.caller_key`; None
        for unknown callers, who share one queue) in FIFO order.

        Raise `QueueFull` at once if ``max_waiting`` requests already wait; `QueueTimeout` /
        `PoolUnavailable` after ``queue_timeout`` seconds; `DeadlineExpired` when *deadline*
        (monotonic) passes or leaves less than `MIN_RUN_TIME`; `PoolClosed` when closing.
        """
        now = time.monotonic()
        if self._closed:
            raise PoolClosed("the broker is shutting down")
        if deadline is not None and deadline - now < MIN_RUN_TIME:
            self._count_error("requests_expired")
            raise DeadlineExpired("the caller's deadline passed before the request was queued")
        self._stats["requests_num"] += 1
        if not self._waiters and not self.paused:
            conn = self._take_idle()
            if conn is not None:
                return conn
        if len(self._waiters) >= self.max_waiting:
            self._count_error("requests_rejected")
            raise QueueFull(f"{len(self._waiters)} requests already waiting (max_waiting)")
        return await self._wait(now, deadline, key)

    async def _wait(self, now: float, deadline: float | None, key: str | None) -> ServerConnection:
        waiter = _Waiter(self._loop.create_future(), deadline, now)
        self._waiters.push(waiter, key)
        self._stats["requests_queued"] += 1
        give_up_at = now + self.queue_timeout
        if deadline is not None:
            give_up_at = min(give_up_at, deadline - MIN_RUN_TIME)
        timer = self._loop.call_at(give_up_at, self._give_up, waiter)
        try:
            return await waiter.future
        except asyncio.CancelledError:
            # The caller went away. If a connection was handed over meanwhile, give it back.
            future = waiter.future
            if future.done() and not future.cancelled() and future.exception() is None:
                self.putconn(future.result())
            else:
                future.cancel()
                self._discard_waiter(waiter)
            raise
        finally:
            timer.cancel()
            self._stats["requests_wait_ms"] += int((time.monotonic() - now) * 1000)

    def _give_up(self, waiter: _Waiter) -> None:
        if waiter.future.done():
            return
        self._discard_waiter(waiter)
        queue_limit = waiter.enqueued_at + self.queue_timeout
        if waiter.deadline is not None and waiter.deadline - MIN_RUN_TIME <= queue_limit:
            self._count_error("requests_expired")
            error: BrokerFailure = DeadlineExpired("the caller's deadline passed while queued")
        elif not self._idle and not self._active:
            self._count_error("requests_timeouts")
            error = PoolUnavailable(
                f"no database connection within {self.queue_timeout:g}s "
                f"(queue_timeout); last error: {self.last_connect_error or 'none'}"
            )
        else:
            self._count_error("requests_timeouts")
            paused = " while the broker was paused" if self.paused else ""
            error = QueueTimeout(
                f"waited {self.queue_timeout:g}s (queue_timeout) for a connection{paused}"
            )
        waiter.future.set_exception(error)

    def fail_waiters(self, why: str) -> int:
        """Fail every waiting request at once with `PoolUnavailable` (*why*), e.g. when its
        read replica left the rotation and the request should go elsewhere now rather than
        after ``queue_timeout``; return how many there were. Nothing they asked for ran."""
        failed = 0
        while (waiter := self._waiters.pop()) is not None:
            if not waiter.future.done():
                self._count_error("requests_timeouts")
                waiter.future.set_exception(PoolUnavailable(why))
                failed += 1
        return failed

    def _discard_waiter(self, waiter: _Waiter) -> None:
        self._waiters.remove(waiter)

    def _count_error(self, key: str) -> None:
        self._stats["requests_errors"] += 1
        self._stats[key] += 1

    def putconn(self, conn: ServerConnection, close_reason: str | None = None) -> None:
        """Return *conn*; with *close_reason* (or if broken, closing, expired) replace it.

        Raise RuntimeError if *conn* is not active (returned twice, or never handed out):
        pooling it again would hand one connection to two requests."""
        if conn.state is not ServerState.SV_ACTIVE:
            raise RuntimeError(f"server connection {conn.id} returned while {conn.state.name}")
        self._active.discard(conn)
        self._stats["usage_ms"] += int((time.monotonic() - conn.checked_out_at) * 1000)
        for key, value in conn.pg.take_counts().items():  # no worker runs on it now
            self._stats[key] += value
        if close_reason is not None or conn.pg.closed:
            self._stats["returns_bad"] += 1
        if conn.pg.closed:
            self._stats["connections_lost"] += 1
            close_reason = close_reason or "server connection lost"
        elif close_reason is None and self._closed:
            close_reason = "pool closed"
        elif close_reason is None and time.monotonic() >= conn.expire_at:
            close_reason = "max_lifetime reached"
        elif close_reason is None and self._pooled() >= self.size:
            close_reason = "pool_size lowered"  # itself not counted: one too many
        if close_reason is not None:
            self._retire(conn, close_reason)
        else:
            self._hand_over(conn)
        self._note_drained()

    def _take_idle(self) -> ServerConnection | None:
        """Pop the most recently used idle connection (PgBouncer's LIFO), skipping dead ones."""
        while self._idle:
            conn = self._idle.pop()
            if time.monotonic() >= conn.expire_at:
                self._retire(conn, "max_lifetime reached")
                continue
            if _has_pending_input(conn.pg):
                # An idle server connection has nothing to say unless it is going away
                # (FATAL 57P01 on shutdown / pg_terminate_backend, or EOF).
                self._stats["connections_lost"] += 1
                self._retire(conn, "server closed the idle connection")
                continue
            self._activate(conn)
            return conn
        return None

    def statements_changed(self) -> None:
        """DDL committed: every connection drops its prepared statements before its next
        request (their plans may no longer fit the tables). Connections busy now drop them
        when handed out next."""
        self.statement_generation += 1

    def _activate(self, conn: ServerConnection) -> None:
        if conn.statement_generation != self.statement_generation:
            # Idle here: no worker touches the connection, and dropping is local.
            conn.pg.drop_statements()
            conn.statement_generation = self.statement_generation
        conn.state = ServerState.SV_ACTIVE
        conn.checked_out_at = time.monotonic()
        self._active.add(conn)

    def _hand_over(self, conn: ServerConnection) -> None:
        """Give *conn* to the next waiter in fair order still waiting, else make it idle (also
        while paused)."""
        while not self.paused and (waiter := self._waiters.pop()) is not None:
            if waiter.future.done():
                continue  # gave up already: skip, never hand a connection to nobody
            if waiter.deadline is not None and waiter.deadline - time.monotonic() < MIN_RUN_TIME:
                self._count_error("requests_expired")
                waiter.future.set_exception(DeadlineExpired("deadline passed while queued"))
                continue
            self._activate(conn)
            waiter.future.set_result(conn)
            return
        conn.state = ServerState.SV_IDLE
        conn.idle_since = time.monotonic()
        self._idle.append(conn)

    def run_in_worker(self, fn: Callable[..., _T], *args: Any) -> asyncio.Future[_T]:
        """Run blocking *fn* on a worker thread (one per pooled connection)."""
        return self._loop.run_in_executor(self._workers, fn, *args)

    def run_io(self, small: bool, fn: Callable[..., _T], *args: Any) -> asyncio.Future[_T]:
        """Run blocking *fn* (pg8000 work on a connection) where ``PGBROKER_PG_IO`` says: with
        ``loop`` and a *small* request, in a greenlet on the event loop (`run_on_loop`, no
        thread hand-off); otherwise on a worker thread. Either way the future's work runs to
        its end even if the awaiting task is cancelled."""
        if small and self.pg_io == "loop":
            return run_on_loop(self._loop, fn, *args)
        return self._loop.run_in_executor(self._workers, fn, *args)

    async def cancel_backend(self, conn: ServerConnection) -> bool:
        """Send a cancel request for *conn*'s running query (never queues behind workers)."""
        try:
            return await self._loop.run_in_executor(self._maintenance, conn.pg.cancel)
        except RuntimeError:  # executor shut down
            return False

    # -- maintenance -------------------------------------------------------------------------

    def _retire(self, conn: ServerConnection, reason: str) -> None:
        """Close *conn* (reason logged) and, unless closing or the pool has ``size``
        connections without it (lowered by a reload), start a replacement."""
        conn.state = ServerState.SV_JUSTFREE
        log.info(
            "closing server connection",
            extra={"server_id": conn.id, "backend_pid": conn.pg.backend_pid, "reason": reason},
        )
        try:
            self._loop.run_in_executor(self._maintenance, conn.pg.close_quietly)
        except RuntimeError:
            conn.pg.close_quietly()
        if not self._closed and self._pooled() < self.size:
            self._spawn_connector(reason)

    def _spawn(self, coro: Any) -> None:
        task = self._loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _spawn_connector(self, reason: str) -> None:
        self._connecting += 1
        self._spawn(self._connector(reason))

    async def _connector(self, reason: str) -> None:
        """Open one connection, retrying with exponential backoff and jitter until it works."""
        delay = self._reconnect_initial
        try:
            while not self._closed:
                started = time.monotonic()
                try:
                    pg = await self._attempt_connect()
                except Exception as exc:
                    # Not only the network: a credentials fetch (Secrets Manager throttling,
                    # an RDS IAM token) can fail too, and the slot must keep retrying.
                    self._stats["connections_errors"] += 1
                    self.last_connect_error = _connect_error_text(exc)
                    wait = delay * random.uniform(0.8, 1.2)
                    # One warning per outage, not one per connector and attempt.
                    level = logging.DEBUG if self._outage else logging.WARNING
                    self._outage = True
                    log.log(
                        level,
                        "connect failed",
                        extra={
                            "error": self.last_connect_error,
                            "retry_in_s": round(wait, 3),
                            "cause": reason,
                        },
                    )
                    await asyncio.sleep(wait)
                    delay = min(delay * 2, self._reconnect_max)
                    continue
                self._connected(pg, started)
                return
        finally:
            self._connecting -= 1

    async def _attempt_connect(self) -> PgConnection:
        """One connect, in a maintenance thread, among at most MAX_PARALLEL_CONNECTS."""
        async with self._connect_slots:
            attempt = self._loop.run_in_executor(self._maintenance, self._connect)
            try:
                return await asyncio.shield(attempt)
            except asyncio.CancelledError:
                # Closing while a connect is in flight: close what it opens, never leak it.
                attempt.add_done_callback(_close_opened)
                raise

    def _connected(self, pg: PgConnection, started: float) -> None:
        now = time.monotonic()
        self._stats["connections_num"] += 1
        self._stats["connections_ms"] += int((now - started) * 1000)
        self.last_connect_error = None
        if self._outage:
            self._outage = False
            log.info("database reachable again", extra={"backend_pid": pg.backend_pid})
        # Jitter the lifetime (-5%, as psycopg_pool) so connections do not all expire at once.
        conn = ServerConnection(
            next(self._ids), pg, expire_at=now + self.max_lifetime * random.uniform(0.95, 1.0)
        )
        conn.statement_generation = self.statement_generation  # nothing prepared yet
        if self.pg_io == "loop":
            pg.use_loop_io()  # not handed out yet: nothing runs on it
        if self._closed:
            self._retire(conn, "pool closed")
            return
        if self._pooled() > self.size:  # the size was lowered while it connected
            self._retire(conn, "pool_size lowered")
            return
        log.debug(
            "server connection open", extra={"server_id": conn.id, "backend_pid": pg.backend_pid}
        )
        self._hand_over(conn)
        self._first.set()
        if len(self._idle) + len(self._active) >= self.size:
            self._filled.set()

    async def _expire_idle_loop(self) -> None:
        """Retire idle connections past max_lifetime even when nobody asks for them."""
        period = max(0.5, min(30.0, self.max_lifetime / 4))
        while not self._closed:
            await asyncio.sleep(period)
            now = time.monotonic()
            for conn in [c for c in self._idle if now >= c.expire_at]:
                self._idle.remove(conn)
                self._retire(conn, "max_lifetime reached")

    # -- statistics --------------------------------------------------------------------------

    def get_stats(self) -> dict[str, int]:
        """psycopg_pool's figures (gauges computed now, counters since start) plus maxwait."""
        now = time.monotonic()
        oldest = self._waiters.oldest(_enqueued_at, now)
        stats = {
            "pool_min": self.size,
            "pool_max": self.size,
            "pool_size": len(self._idle) + len(self._active) + self._connecting,
            "pool_available": len(self._idle),
            "pool_active": len(self._active),
            "pool_connecting": self._connecting,
            "requests_waiting": len(self._waiters),
            "requests_waiting_callers": self._waiters.flows_waiting(),
            "maxwait": int(now - oldest),
            "maxwait_us": int((now - oldest) * 1_000_000),
            "pool_paused": int(self.paused),
            "pool_active_max_ms": self._longest_checkout_ms(now),
        }
        stats.update(self._stats)
        return stats

    def waiting_by_caller(self) -> dict[str | None, int]:
        """Queued requests per caller key (`broker.security.limits.caller_key`)."""
        return self._waiters.waiting_by_key()

    def _longest_checkout_ms(self, now: float) -> int:
        """How long the longest-held active connection has been out (a batch or a lease)."""
        if not self._active:
            return 0
        return int((now - min(conn.checked_out_at for conn in self._active)) * 1000)


_COUNTERS = (
    *STATEMENT_COUNTERS,
    "requests_num",
    "requests_queued",
    "requests_wait_ms",
    "requests_errors",
    "requests_timeouts",
    "requests_expired",
    "requests_rejected",
    "usage_ms",
    "returns_bad",
    "connections_num",
    "connections_ms",
    "connections_errors",
    "connections_lost",
)


def _enqueued_at(waiter: _Waiter) -> float:
    return waiter.enqueued_at


def _close_opened(attempt: asyncio.Future[PgConnection]) -> None:
    if not attempt.cancelled() and attempt.exception() is None:
        attempt.result().close_quietly()


def _connect_error_text(exc: BaseException) -> str:
    """What to log about a failed connect: our own errors are written without secrets; for
    anything else (botocore, pg8000 internals) only its type, which cannot leak one."""
    if isinstance(exc, ConnectionLost | OSError):
        return str(exc)
    return f"{type(exc).__name__} while connecting"


def _has_pending_input(pg: PgConnection) -> bool:
    """True if an idle connection's socket is readable (server sent FATAL, or EOF)."""
    sock = pg.socket
    if sock is None:
        return True
    # poll(), not select(): select() cannot take descriptors above 1023, and a broker with a
    # thousand client connections has those.
    poller = select.poll()
    try:
        poller.register(sock, select.POLLIN)
        return bool(poller.poll(0))
    except (OSError, ValueError):
        return True
