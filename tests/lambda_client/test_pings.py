"""No HTTP/2 PING rides along with a call (issue 14): calls after idle spells, as a Lambda makes
them, cost one request and one reply on the wire and nothing more.

gRPC's BDP probe sends a PING with the first data after an idle spell to size its receive
window, and the peer answers it: with the probe on (gRPC's default) nearly every call of a
Lambda paid a PING and its ACK from each side. Both the client's channel options and the
broker's server options turn it off. A relay between the two parses the HTTP/2 frames each
way (a `TcpProxy` tap) and counts the PINGs.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest

from devtools.brokerproc import BrokerProcess
from devtools.tcpproxy import TcpProxy
from lambda_client import BrokerClient

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
PING = 0x6
ACK = 0x1


class FrameCounter:
    """A `TcpProxy` tap: counts the HTTP/2 frames of each direction by (type, flags), in
    ``frames["upstream"]`` (client -> broker) and ``frames["downstream"]``."""

    def __init__(self) -> None:
        self.frames: dict[str, Counter[tuple[int, int]]] = {
            "upstream": Counter(),
            "downstream": Counter(),
        }
        # Per stream: the bytes of its connection preface still to skip (the client's comes
        # before its first frame), and the bytes of a frame not yet whole.
        self._pending: dict[Any, tuple[int, bytes]] = {}
        self._lock = threading.Lock()

    def __call__(self, stream: Any, data: bytes) -> None:
        first = (len(PREFACE) if stream.name == "upstream" else 0, b"")
        skip, buffered = self._pending.get(stream, first)
        buffered += data
        taken = min(skip, len(buffered))
        skip, buffered = skip - taken, buffered[taken:]
        # A frame: 24-bit length, 8-bit type, 8-bit flags, 32-bit stream id, then the payload.
        while len(buffered) >= 9:
            end = 9 + int.from_bytes(buffered[:3], "big")
            if len(buffered) < end:
                break
            with self._lock:
                self.frames[stream.name][(buffered[3], buffered[4])] += 1
            buffered = buffered[end:]
        self._pending[stream] = (skip, buffered)

    def pings(self, direction: str) -> int:
        """PINGs that are not ACKs sent in *direction*."""
        with self._lock:
            return sum(
                n
                for (kind, flags), n in self.frames[direction].items()
                if kind == PING and not flags & ACK
            )


@pytest.fixture
def relay(broker: BrokerProcess) -> Iterator[tuple[TcpProxy, FrameCounter]]:
    host, port = broker.target.rsplit(":", 1)
    counter = FrameCounter()
    with TcpProxy((host, int(port)), tap=counter) as proxy:
        yield proxy, counter


CALLS = 12
IDLE = 0.2


def _calls_after_idle_spells(client: BrokerClient) -> None:
    for i in range(CALLS):
        time.sleep(IDLE)  # the client's connection idles between calls, as a Lambda's does
        assert client.query("SELECT $1::int", [i]).scalar() == i


def test_calls_after_idle_spells_send_no_ping_either_way(
    relay: tuple[TcpProxy, FrameCounter],
) -> None:
    proxy, counter = relay
    with BrokerClient(proxy.address, tls=False) as client:
        _calls_after_idle_spells(client)
    # Keepalive pings come after 30 s without a call; this test takes under 3 s.
    assert counter.pings("upstream") == 0, counter.frames
    assert counter.pings("downstream") == 0, counter.frames


def test_the_relay_sees_the_pings_of_a_client_that_probes(
    relay: tuple[TcpProxy, FrameCounter],
) -> None:
    """The count is real: a client with gRPC's default BDP probe sends PINGs."""
    proxy, counter = relay
    options = [("grpc.http2.bdp_probe", 1)]
    with BrokerClient(proxy.address, tls=False, options=options) as client:
        _calls_after_idle_spells(client)
    assert counter.pings("upstream") >= CALLS // 2, counter.frames
