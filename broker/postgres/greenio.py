"""pg8000's blocking protocol code on the event loop, one greenlet per transaction
(``PGBROKER_PG_IO=loop``; SQLAlchemy's asyncio bridge does the same: ``greenlet_spawn``).

pg8000 reads and writes its socket through a buffered file (``CoreConnection._sock``). `install`
puts `LoopSocketIO` under that file instead of ``socket.makefile``: the socket is made
non-blocking, and a read or write that would block asks to wait:

* inside an `IoGreenlet` (driven on the event loop by `broker.pooling.loopio`), it switches to
  the parent greenlet with a `Wait` (the descriptor and whether to read or write); the loop
  side awaits readiness (``loop.add_reader`` / ``add_writer``) and switches back, so pg8000's
  code (retries, prepare round trips, cleanup) runs unchanged between waits;
* on any other thread (a heavy request on a pool worker, a connect, a close) it polls the
  descriptor itself: blocking, as a plain socket would.

Neither blocks the loop on the network. CPU is bounded too: after every `SLICE` bytes received
without a wait, and every so many result cells (`cooperate`), the greenlet gives the loop a
turn (`TURN`), so a large result is parsed in slices while other callers are served.

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
from typing import Any, NamedTuple

from greenlet import getcurrent, greenlet

__all__ = ["READ", "SLICE", "TURN", "WRITE", "IoGreenlet", "LoopSocketIO", "Wait", "cooperate"]

# Bytes received without a wait after which the greenlet gives the event loop a turn: about
# 0.1-0.5 ms of pg8000 parsing, so the loop's other callers wait at most that long.
SLICE = 64 * 1024

# What a `Wait` waits for.
TURN = 0  # nothing: one turn of the event loop (call_soon)
READ = 1
WRITE = 2

# pg8000's own buffered file uses the io default (8 KiB); a larger buffer means fewer recv
# calls for a large result and the same one call for a small one.
BUFFER_SIZE = 64 * 1024


class Wait(NamedTuple):
    """What an `IoGreenlet` waits for: *events* (`READ`, `WRITE` or `TURN`) on *fd*, at most
    *timeout* seconds (None: no limit)."""

    fd: int
    events: int
    timeout: float | None


class IoGreenlet(greenlet):  # type: ignore[misc]
    """A greenlet whose socket waits go to its parent (the event loop's driver)."""


def in_io_greenlet() -> bool:
    return type(getcurrent()) is IoGreenlet


def cooperate() -> None:
    """Give the event loop a turn if running in an `IoGreenlet` (between slices of CPU work
    such as encoding a large result); elsewhere do nothing."""
    current = getcurrent()
    if type(current) is IoGreenlet:
        current.parent.switch(Wait(-1, TURN, None))


class LoopSocketIO(io.RawIOBase):
    """A raw file over a non-blocking socket that waits by greenlet switch or by poll."""

    def __init__(self, sock: socket.socket, timeout: float | None) -> None:
        super().__init__()
        self._sock = sock
        self._fd = sock.fileno()
        self._timeout = timeout
        self._received = 0  # bytes received since the loop last had a turn
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
            self._received += received
            if self._received >= SLICE:
                self._received = 0
                cooperate()
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
        self._received = 0
        current = getcurrent()
        if type(current) is IoGreenlet:
            # Returns when the driver saw the descriptor ready; raises what it throws in
            # (TimeoutError when the timeout passed).
            current.parent.switch(Wait(self._fd, events, self._timeout))
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
