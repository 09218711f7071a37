"""devtools.tcpproxy: bytes pass through unchanged, delay is at least as configured, cut/refuse."""

from __future__ import annotations

import contextlib
import os
import socket
import socketserver
import threading
import time
from collections.abc import Iterator

import pytest

from devtools.tcpproxy import TcpProxy


class _Echo(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        # The proxy's cut resets the connection: the echo ends (no traceback in the test log).
        with contextlib.suppress(ConnectionResetError):
            while data := self.request.recv(65536):
                self.request.sendall(data)


class _EchoServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True


@pytest.fixture
def echo() -> Iterator[tuple[str, int]]:
    server = _EchoServer(("127.0.0.1", 0), _Echo)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        host, port = server.server_address[:2]
        yield str(host), int(port)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def _connect(proxy: TcpProxy) -> socket.socket:
    sock = socket.create_connection((proxy.host, proxy.port), timeout=10)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    chunks = []
    while n:
        chunk = sock.recv(min(n, 65536))
        if not chunk:
            raise ConnectionError("closed early")
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)


def _assert_closed_by_peer(sock: socket.socket) -> None:
    """The proxy closed *sock*: reading gives EOF or a reset, never data."""
    try:
        data = sock.recv(10)
    except ConnectionResetError:
        return
    assert data == b""


def _wait_for(predicate, timeout: float = 5.0) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()


@pytest.mark.parametrize("delay", [0.0, 0.002])
def test_bytes_pass_through_unchanged_in_order(echo: tuple[str, int], delay: float) -> None:
    payload = os.urandom(3 * 1024 * 1024 + 17)
    with TcpProxy(echo, delay=delay) as proxy, _connect(proxy) as sock:
        received: list[bytes] = []
        reader = threading.Thread(
            target=lambda: received.append(_recv_exactly(sock, len(payload))), daemon=True
        )
        reader.start()
        for i in range(0, len(payload), 10_000):  # many small writes, each its own chunk
            sock.sendall(payload[i : i + 10_000])
        reader.join(timeout=30)
        assert received == [payload]


def test_round_trip_is_delayed_at_least_twice_the_one_way_delay(echo: tuple[str, int]) -> None:
    with TcpProxy(echo, delay=0.02) as proxy, _connect(proxy) as sock:
        for _ in range(3):
            started = time.monotonic()
            sock.sendall(b"ping")
            assert _recv_exactly(sock, 4) == b"ping"
            assert time.monotonic() - started >= 0.04


def test_directions_have_their_own_delay(echo: tuple[str, int]) -> None:
    with TcpProxy(echo, upstream_delay=0.03, downstream_delay=0.0) as proxy:
        assert (proxy.upstream_delay, proxy.downstream_delay) == (0.03, 0.0)
        with _connect(proxy) as sock:
            started = time.monotonic()
            sock.sendall(b"x")
            assert _recv_exactly(sock, 1) == b"x"
            assert time.monotonic() - started >= 0.03
        proxy.set_delay(0.0)
        assert (proxy.upstream_delay, proxy.downstream_delay) == (0.0, 0.0)


def test_cut_closes_every_open_connection(echo: tuple[str, int]) -> None:
    with TcpProxy(echo) as proxy:
        socks = [_connect(proxy) for _ in range(3)]
        for sock in socks:
            sock.sendall(b"hi")
            assert _recv_exactly(sock, 2) == b"hi"
        assert _wait_for(lambda: proxy.connections == 3)
        assert proxy.cut() == 3
        for sock in socks:
            _assert_closed_by_peer(sock)
            sock.close()
        assert proxy.connections == 0
        # the proxy still accepts new connections after a cut
        with _connect(proxy) as sock:
            sock.sendall(b"again")
            assert _recv_exactly(sock, 5) == b"again"


def test_cut_with_reset_makes_peers_see_connection_reset(echo: tuple[str, int]) -> None:
    with TcpProxy(echo) as proxy, _connect(proxy) as sock:
        sock.sendall(b"hi")
        assert _recv_exactly(sock, 2) == b"hi"
        proxy.cut(reset=True)
        with pytest.raises(ConnectionResetError):
            sock.recv(10)


def test_refuse_rejects_new_connections_until_accept(echo: tuple[str, int]) -> None:
    with TcpProxy(echo) as proxy:
        proxy.refuse()
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection((proxy.host, proxy.port), timeout=5)
        proxy.accept()
        with _connect(proxy) as sock:
            sock.sendall(b"back")
            assert _recv_exactly(sock, 4) == b"back"


def test_client_is_closed_when_target_is_down() -> None:
    with socket.socket() as placeholder:
        placeholder.bind(("127.0.0.1", 0))
        dead_port = placeholder.getsockname()[1]
    with TcpProxy(("127.0.0.1", dead_port)) as proxy, _connect(proxy) as sock:
        _assert_closed_by_peer(sock)


def test_a_tap_sees_each_direction_of_each_connection_in_order(echo: tuple[str, int]) -> None:
    seen: dict[object, bytearray] = {}  # by stream (kept alive: an id could be reused)

    def tap(stream, data: bytes) -> None:  # type: ignore[no-untyped-def]
        seen.setdefault(stream, bytearray()).extend(data)

    payloads = [os.urandom(200_000), os.urandom(3_000)]
    with TcpProxy(echo, delay=0.001, tap=tap) as proxy:
        for payload in payloads:
            with _connect(proxy) as sock:
                sock.sendall(payload)
                assert _recv_exactly(sock, len(payload)) == payload
    # Two connections, two streams each; every byte, in order, under its own stream.
    names = sorted(stream.name for stream in seen)  # type: ignore[attr-defined]
    assert names == ["downstream", "downstream", "upstream", "upstream"]
    assert sorted(bytes(data) for data in seen.values()) == sorted(payloads * 2)
