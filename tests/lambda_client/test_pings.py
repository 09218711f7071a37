"""No HTTP/2 PING rides along with a call (issue 14): calls after idle spells, as a Lambda makes
them, cost one request and one reply on the wire and nothing more.

gRPC's BDP probe sends a PING with the first data after an idle spell to size its receive
window, and the peer answers it: with the probe on (gRPC's default) nearly every call of a
Lambda paid a PING and its ACK from each side. Both the client's channel options and the
broker's server options turn it off. A relay between the two parses the HTTP/2 frames each
way and counts the PINGs.
"""

from __future__ import annotations

import socket
import threading
import time
from collections import Counter
from collections.abc import Iterator

import pytest

from devtools.brokerproc import BrokerProcess
from lambda_client import BrokerClient

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
PING = 0x6
ACK = 0x1


class FrameCountingRelay:
    """Relays every TCP connection it accepts to *target*; counts the HTTP/2 frames each way
    by (type, flags) in ``frames["to_broker"]`` and ``frames["to_client"]``."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.frames: dict[str, Counter[tuple[int, int]]] = {
            "to_broker": Counter(),
            "to_client": Counter(),
        }
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def pings(self, direction: str) -> int:
        """PINGs that are not ACKs sent in *direction*."""
        with self._lock:
            return sum(
                n
                for (kind, flags), n in self.frames[direction].items()
                if kind == PING and not flags & ACK
            )

    def _accept(self) -> None:
        while True:
            try:
                downstream, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            for source, sink, direction, skip in (
                (downstream, upstream, "to_broker", len(PREFACE)),
                (upstream, downstream, "to_client", 0),
            ):
                args = (source, sink, direction, skip)
                threading.Thread(target=self._pump, args=args, daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, direction: str, skip: int) -> None:
        buffered = b""
        while True:
            try:
                data = source.recv(65536)
                if data:
                    sink.sendall(data)
            except OSError:  # the other direction closed both sockets
                data = b""
            if not data:
                for sock in (source, sink):
                    sock.close()
                return
            buffered += data
            if skip:  # the client's connection preface comes before its first frame
                taken = min(skip, len(buffered))
                buffered, skip = buffered[taken:], skip - taken
            buffered = self._count(buffered, direction)

    def _count(self, buffered: bytes, direction: str) -> bytes:
        # A frame: 24-bit length, 8-bit type, 8-bit flags, 32-bit stream id, then the payload.
        while len(buffered) >= 9:
            length = int.from_bytes(buffered[:3], "big")
            if len(buffered) < 9 + length:
                break
            with self._lock:
                self.frames[direction][(buffered[3], buffered[4])] += 1
            buffered = buffered[9 + length :]
        return buffered

    def close(self) -> None:
        self.listener.close()


@pytest.fixture
def relay(broker: BrokerProcess) -> Iterator[FrameCountingRelay]:
    host, port = broker.target.rsplit(":", 1)
    relay = FrameCountingRelay((host, int(port)))
    yield relay
    relay.close()


CALLS = 12
IDLE = 0.2


def _calls_after_idle_spells(client: BrokerClient) -> None:
    for i in range(CALLS):
        time.sleep(IDLE)  # the client's connection idles between calls, as a Lambda's does
        assert client.query("SELECT $1::int", [i]).scalar() == i


def test_calls_after_idle_spells_send_no_ping_either_way(relay: FrameCountingRelay) -> None:
    with BrokerClient(f"127.0.0.1:{relay.port}", tls=False) as client:
        _calls_after_idle_spells(client)
    # Keepalive pings come after 30 s without a call; this test takes under a second.
    assert relay.pings("to_broker") == 0, relay.frames
    assert relay.pings("to_client") == 0, relay.frames


def test_the_relay_sees_the_pings_of_a_client_that_probes(relay: FrameCountingRelay) -> None:
    """The relay's count is real: a client with gRPC's default BDP probe sends PINGs."""
    options = [("grpc.http2.bdp_probe", 1)]
    with BrokerClient(f"127.0.0.1:{relay.port}", tls=False, options=options) as client:
        _calls_after_idle_spells(client)
    assert relay.pings("to_broker") >= CALLS // 2, relay.frames
