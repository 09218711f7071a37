"""A TCP proxy for benchmarks and fault tests: adds one-way delay, cuts connections, refuses.

The kernel here has no netem, so latency between a client and a pooler is simulated in user
space. `TcpProxy` listens on a loopback port and forwards every accepted connection to a
target. Each direction has its own one-way delay: a chunk read at time *t* is written at
*t + delay*, in arrival order. Chunks are queued with their due time and one writer per
direction writes whatever is due, so a stream of chunks is delayed by *delay* once, not by
*delay* per chunk.

The proxy runs on its own asyncio loop in a background thread, so synchronous tests and the
benchmark harness can drive it::

    with TcpProxy(("127.0.0.1", pg_port), delay=0.0005) as proxy:
        connect(host=proxy.host, port=proxy.port)
        proxy.cut()          # close every proxied connection (both sides)
        proxy.refuse()       # stop listening: new connects get ECONNREFUSED
        proxy.accept()       # listen again on the same port

asyncio's own timers have millisecond resolution (epoll), which would turn a 0.5 ms delay
into about 1 ms; due writes are therefore woken by a small timer thread that sleeps with
sub-millisecond precision. A delay is a lower bound: a busy machine adds to it.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import socket
import struct
import threading
import time
from collections import deque
from collections.abc import Callable
from types import TracebackType
from typing import Any

__all__ = ["TcpProxy"]

# Pause reading from one side while the other side has this much unsent data.
_HIGH_WATER = 1 << 20


class _PreciseTimer:
    """Calls callbacks on *loop* at `time.monotonic()` deadlines with sub-ms precision.

    One daemon thread sleeps on a condition variable until the earliest deadline, then hands
    the due callbacks to the loop with ``call_soon_threadsafe``.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._heap: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = itertools.count()
        self._cond = threading.Condition()
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="tcpproxy-timer", daemon=True)
        self._thread.start()

    def call_at(self, when: float, callback: Callable[[], None]) -> None:
        with self._cond:
            heapq.heappush(self._heap, (when, next(self._seq), callback))
            if self._heap[0][2] is callback:
                self._cond.notify()

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._stopped and not self._heap:
                    self._cond.wait()
                if self._stopped:
                    return
                remaining = self._heap[0][0] - time.monotonic()
                if remaining > 0:
                    self._cond.wait(remaining)
                    continue
                due = []
                now = time.monotonic()
                while self._heap and self._heap[0][0] <= now:
                    due.append(heapq.heappop(self._heap)[2])
            for callback in due:
                with contextlib.suppress(RuntimeError):  # loop closed while stopping
                    self._loop.call_soon_threadsafe(callback)


class _Direction:
    """Bytes flowing one way (source -> destination), each chunk held until its due time."""

    def __init__(self, proxy: TcpProxy, name: str, delay: Callable[[], float]) -> None:
        self._proxy = proxy
        self.name = name  # "upstream" (client -> target) or "downstream"
        self._delay = delay
        self._queue: deque[tuple[float, bytes]] = deque()
        self._scheduled = False
        self._eof = False  # source sent EOF or went away; pass it on once the queue is written
        self._close = False  # the source went away: close the destination, not just EOF
        self.dst: asyncio.Transport | None = None

    def feed(self, data: bytes) -> None:
        if self._proxy.tap is not None:
            self._proxy.tap(self, data)
        delay = self._delay()
        if delay <= 0 and not self._queue:
            self._write(data)
            return
        self._queue.append((time.monotonic() + delay, data))
        self._schedule()

    def finish(self, close: bool) -> None:
        """The source sent EOF (*close* False) or is gone (True): pass that on after the
        queued bytes."""
        self._eof = True
        self._close = self._close or close
        if not self._queue:
            self._close_dst()

    def _schedule(self) -> None:
        if not self._scheduled and self._queue:
            self._scheduled = True
            self._proxy._timer_call_at(self._queue[0][0], self._flush)

    def _flush(self) -> None:
        self._scheduled = False
        now = time.monotonic()
        while self._queue and self._queue[0][0] <= now:
            self._write(self._queue.popleft()[1])
        if self._queue:
            self._schedule()
        elif self._eof:
            self._close_dst()

    def _write(self, data: bytes) -> None:
        if self.dst is not None and not self.dst.is_closing():
            self.dst.write(data)

    def _close_dst(self) -> None:
        if self.dst is not None and not self.dst.is_closing():
            if self._close or not self.dst.can_write_eof():
                self.dst.close()
                return
            try:
                self.dst.write_eof()
            except OSError:  # the peer is already gone (ENOTCONN): nothing left to tell it
                self.dst.close()


class _Side(asyncio.Protocol):
    """One socket of a proxied connection; its peer is the other socket."""

    def __init__(self, conn: _Connection, outgoing: _Direction, incoming: _Direction) -> None:
        self.conn = conn
        self.outgoing = outgoing  # bytes this side reads, headed for the peer
        self.incoming = incoming  # bytes headed for this side
        self.transport: asyncio.Transport | None = None
        self.peer: _Side | None = None
        self.half_closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.incoming.dst = transport
        transport.set_write_buffer_limits(high=_HIGH_WATER)

    def data_received(self, data: bytes) -> None:
        self.outgoing.feed(data)

    def eof_received(self) -> bool:
        self.half_closed = True
        self.outgoing.finish(close=False)
        if self.peer is not None and self.peer.half_closed and self.transport is not None:
            self.transport.close()
        return True  # keep our write side open until the peer is done too

    def connection_lost(self, exc: Exception | None) -> None:
        self.outgoing.finish(close=True)
        self.conn.side_lost(self)

    def pause_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            with contextlib.suppress(RuntimeError):
                self.peer.transport.resume_reading()


class _Connection:
    """A client connection and its upstream connection to the target."""

    def __init__(self, proxy: TcpProxy) -> None:
        self.proxy = proxy
        upstream = _Direction(proxy, "upstream", lambda: proxy.upstream_delay)
        downstream = _Direction(proxy, "downstream", lambda: proxy.downstream_delay)
        self.client: _Side = _ClientSide(self, outgoing=upstream, incoming=downstream)
        self.server = _Side(self, outgoing=downstream, incoming=upstream)
        self.client.peer, self.server.peer = self.server, self.client

    def side_lost(self, side: _Side) -> None:
        other = side.peer
        if other is None or other.transport is None or other.transport.is_closing():
            self.proxy._connections.discard(self)

    def abort(self, reset: bool) -> None:
        for side in (self.client, self.server):
            if side.transport is None:
                continue
            if reset:
                sock = side.transport.get_extra_info("socket")
                if sock is not None:
                    with contextlib.suppress(OSError):
                        sock.setsockopt(
                            socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                        )
            side.transport.abort()
        self.proxy._connections.discard(self)


class TcpProxy:
    """Forward ``listen_host:listen_port`` to *target* with a one-way delay per direction.

    *delay* (seconds) applies to both directions unless *upstream_delay* (client -> target)
    or *downstream_delay* (target -> client) is given. Delays can be changed while running
    (`set_delay`); they apply to bytes read from then on. `start()` binds the port (0: any
    free port) and returns self; `stop()` closes everything and joins the thread. With
    *source_host* (e.g. ``127.0.0.2``) the target sees connections from that address, so a
    test can present a second client address on loopback. With *tap*, ``tap(stream, data)``
    sees every chunk read, in order, before its delay (on the proxy's thread): *stream* is
    one direction of one proxied connection, the same object for all of its bytes, and
    ``stream.name`` is ``"upstream"`` (client -> target) or ``"downstream"``.
    """

    def __init__(
        self,
        target: tuple[str, int],
        *,
        listen_host: str = "127.0.0.1",
        listen_port: int = 0,
        delay: float = 0.0,
        upstream_delay: float | None = None,
        downstream_delay: float | None = None,
        source_host: str | None = None,
        tap: Callable[[Any, bytes], None] | None = None,
    ) -> None:
        self.target = target
        self.tap = tap
        self.source_host = source_host
        self.host = listen_host
        self.port = listen_port
        self.upstream_delay = delay if upstream_delay is None else upstream_delay
        self.downstream_delay = delay if downstream_delay is None else downstream_delay
        self.accepted = 0  # connections accepted since start
        self._connections: set[_Connection] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.AbstractServer | None = None
        self._timer: _PreciseTimer | None = None

    # -- control (any thread) -------------------------------------------------------------

    @property
    def address(self) -> str:
        """``host:port`` clients should connect to."""
        return f"{self.host}:{self.port}"

    @property
    def connections(self) -> int:
        """Proxied connections currently open."""
        return len(self._connections)

    def start(self) -> TcpProxy:
        """Start the loop thread and listen; raise OSError if the port cannot be bound."""
        if self._thread is not None:
            raise RuntimeError("TcpProxy already started")
        loop = asyncio.new_event_loop()
        self._loop = loop
        self._timer = _PreciseTimer(loop)
        self._thread = threading.Thread(
            target=loop.run_forever, name=f"tcpproxy-{self.target[1]}", daemon=True
        )
        self._thread.start()
        try:
            self._call(self._listen())
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Close the listener and every connection, stop the loop and its thread."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        if loop.is_running():
            with contextlib.suppress(Exception):
                self._call(self._shutdown(), timeout=5)
            loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=5)
        if self._timer is not None:
            self._timer.stop()
        if not loop.is_running():
            loop.close()
        self._loop = self._thread = self._timer = None

    def set_delay(
        self,
        delay: float | None = None,
        *,
        upstream: float | None = None,
        downstream: float | None = None,
    ) -> None:
        """Change the one-way delay (both directions, or one of them) for bytes read next."""
        if delay is not None:
            self.upstream_delay = self.downstream_delay = delay
        if upstream is not None:
            self.upstream_delay = upstream
        if downstream is not None:
            self.downstream_delay = downstream

    def cut(self, *, reset: bool = False) -> int:
        """Close every open proxied connection on both sides and return how many there were.

        With *reset* the sockets are closed with SO_LINGER 0, so peers see ECONNRESET instead
        of an orderly EOF. New connections are still accepted (see `refuse`).
        """
        return self._call(self._cut(reset))

    def refuse(self) -> None:
        """Stop listening: new connects fail with ECONNREFUSED; open connections carry on."""
        self._call(self._close_listener())

    def accept(self) -> None:
        """Listen again (same port) after `refuse`."""
        self._call(self._listen())

    def __enter__(self) -> TcpProxy:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- loop side ------------------------------------------------------------------------

    def _call(self, coro, timeout: float = 10.0):  # type: ignore[no-untyped-def]
        if self._loop is None:
            coro.close()
            raise RuntimeError("TcpProxy is not started")
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def _timer_call_at(self, when: float, callback: Callable[[], None]) -> None:
        assert self._timer is not None
        self._timer.call_at(when, callback)

    async def _listen(self) -> None:
        if self._server is not None:
            return
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            self._accepted, self.host, self.port, reuse_address=True, backlog=4096
        )
        self.port = self._server.sockets[0].getsockname()[1]

    async def _close_listener(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def _cut(self, reset: bool) -> int:
        conns = list(self._connections)
        for conn in conns:
            conn.abort(reset)
        return len(conns)

    async def _shutdown(self) -> None:
        await self._cut(reset=False)
        await self._close_listener()

    def _accepted(self) -> asyncio.Protocol:
        conn = _Connection(self)
        self._connections.add(conn)
        self.accepted += 1
        asyncio.get_running_loop().create_task(self._connect_upstream(conn))
        return conn.client

    async def _connect_upstream(self, conn: _Connection) -> None:
        loop = asyncio.get_running_loop()
        try:
            local = (self.source_host, 0) if self.source_host else None
            await loop.create_connection(lambda: conn.server, *self.target, local_addr=local)
        except OSError:
            # The target is down: the client sees its connection closed, as with a real hop.
            conn.abort(reset=False)
            return
        client = conn.client.transport
        if client is not None and not client.is_closing():
            client.resume_reading()
        else:
            conn.abort(reset=False)


class _ClientSide(_Side):
    """The accepted socket: reading waits until the upstream connection exists."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        assert isinstance(transport, asyncio.Transport)
        transport.pause_reading()
