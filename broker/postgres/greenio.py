"""pg8000's blocking protocol code on the event loop, in a greenlet per running transaction
(``PGBROKER_PG_IO=loop``; SQLAlchemy's asyncio bridge does the same: ``greenlet_spawn``).
The greenlets are long-lived runners that take transaction after transaction
(`broker.pooling.loopio`): a fresh greenlet per request cost an ``mmap``/``munmap`` of its
frame stack.

pg8000 reads and writes its socket through a buffered file (``CoreConnection._sock``). `install`
puts `LoopSocketIO` under that file instead of ``socket.makefile``: the socket is made
non-blocking, and a read or write that would block asks to wait:

* inside an `IoGreenlet` (driven on the event loop by `broker.pooling.loopio`), it switches to
  the parent greenlet with a `Wait` (the descriptor and whether to read or write); the loop
  side awaits readiness (``loop.add_reader`` / ``add_writer``) and switches back, so pg8000's
  code (retries, prepare round trips, cleanup) runs unchanged between waits;
* on any other thread (a heavy request on a pool worker, a connect, a close) it polls the
  descriptor itself: blocking, as a plain socket would.

Neither blocks the loop on the network. CPU is bounded too: once the greenlet has run
`SLICE_SECONDS` since the loop last had a turn, the next read of the buffer (every
`BUFFER_SIZE` bytes) or `cooperate` call (every few result rows) gives the loop a turn
(`TURN`), so a large result is parsed in slices while other callers are served. Slices are
measured in time, not bytes: a request on the loop takes a dozen loop turns, each of which may
wait for one slice of a large result, so the slice bounds other callers' latency.

TLS: a non-blocking ``SSLSocket`` raises ``SSLWantReadError`` / ``SSLWantWriteError`` (a
renegotiation may need the other direction); bytes it has already decrypted are returned by
the next ``recv_into`` without touching the socket, so readiness is only awaited when the
TLS layer has nothing buffered.

A timeout (the socket's, if one was set: the broker's connections have none, TCP keepalive and
TCP_USER_TIMEOUT detect a dead peer) raises ``TimeoutError`` in the read, as the blocking
socket did, so pg8000 reports the same network error.
"""

from __future__ import annotations

import io
import select
import socket
import ssl
from time import perf_counter
from typing import Any, NamedTuple

from greenlet import getcurrent, greenlet

__all__ = [
    "BUFFER_SIZE",
    "READ",
    "SLICE_SECONDS",
    "TURN",
    "WRITE",
    "IoGreenlet",
    "LoopSocketIO",
    "Wait",
    "cooperate",
    "in_io_greenlet",
    "install",
]

# Seconds a greenlet runs before it gives the event loop a turn (at its next buffer read or
# `cooperate` call). A small request needs 10-20 loop turns, so each waits this long at most
# behind a large result being parsed.
SLICE_SECONDS = 0.001

# What a `Wait` waits for.
TURN = 0  # nothing: one turn of the event loop (call_soon)
READ = 1
WRITE = 2

# As pg8000's own buffered file (the io default): parsing one buffer's worth of rows takes
# about a slice, so the time check at each read bounds the slice.
BUFFER_SIZE = io.DEFAULT_BUFFER_SIZE


class Wait(NamedTuple):
    """What an `IoGreenlet` waits for: *events* (`READ`, `WRITE` or `TURN`) on *fd*, at most
    *timeout* seconds (None: no limit)."""

    fd: int
    events: int
    timeout: float | None


class IoGreenlet(greenlet):  # type: ignore[misc]
    """A greenlet whose socket waits go to its parent (the event loop's driver)."""

    # When it last came back from the loop (`time.perf_counter`): its slice started then.
    resumed_at = 0.0
    # The job the loop side hands it next (broker/pooling/loopio.py; taken when it starts).
    job: Any = None

    def wait(self, wait: Wait) -> None:
        """Switch to the loop until *wait* is over; raise what the driver throws in."""
        self.parent.switch(wait)
        self.resumed_at = perf_counter()


def in_io_greenlet() -> bool:
    """True when running in an `IoGreenlet` (on the event loop), False on any thread."""
    return type(getcurrent()) is IoGreenlet


_TURN = Wait(-1, TURN, None)


def cooperate() -> None:
    """Give the event loop a turn if running in an `IoGreenlet` whose slice is used up (call
    it between pieces of CPU work such as encoding a large result); elsewhere do nothing."""
    current = getcurrent()
    if type(current) is IoGreenlet and perf_counter() - current.resumed_at >= SLICE_SECONDS:
        current.wait(_TURN)


class LoopSocketIO(io.RawIOBase):
    """A raw file over a non-blocking socket that waits by greenlet switch or by poll."""

    def __init__(self, sock: socket.socket, timeout: float | None) -> None:
        super().__init__()
        self._sock = sock
        self._fd = sock.fileno()
        self._timeout = timeout
        sock.settimeout(0.0)

    def readable(self) -> bool:
        return True

    def writable(self) -> bool:
        return True

    def fileno(self) -> int:
        return self._fd

    def readinto(self, buffer: Any) -> int:
        sock = self._sock
        while True:
            try:
                received = sock.recv_into(buffer)
            except (BlockingIOError, InterruptedError, ssl.SSLWantReadError):
                self._wait(READ)
                continue
            except ssl.SSLWantWriteError:
                self._wait(WRITE)
                continue
            cooperate()  # pg8000 parsed the last buffer since the previous read
            return received

    def write(self, data: Any) -> int:
        sock = self._sock
        while True:
            try:
                return sock.send(data)
            except (BlockingIOError, InterruptedError, ssl.SSLWantWriteError):
                self._wait(WRITE)
            except ssl.SSLWantReadError:
                self._wait(READ)

    def close(self) -> None:
        # pg8000 closes the socket itself (``CoreConnection.close``); only mark closed here.
        super().close()

    def _wait(self, events: int) -> None:
        current = getcurrent()
        if type(current) is IoGreenlet:
            # Returns when the driver saw the descriptor ready; raises what it throws in
            # (TimeoutError when the timeout passed).
            current.wait(Wait(self._fd, events, self._timeout))
            return
        poller = select.poll()
        poller.register(self._fd, select.POLLIN if events == READ else select.POLLOUT)
        timeout_ms = None if self._timeout is None else int(self._timeout * 1000)
        if not poller.poll(timeout_ms):
            raise TimeoutError("timed out")


def install(usock: socket.socket, timeout: float | None) -> io.BufferedRWPair:
    """The buffered file to put in pg8000's ``CoreConnection._sock`` for *usock*: it works on
    a loop greenlet and on any thread alike. *timeout*: what the socket had."""
    raw = LoopSocketIO(usock, timeout)
    return io.BufferedRWPair(raw, raw, BUFFER_SIZE)
