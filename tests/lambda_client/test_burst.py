"""A burst of calls on brand-new channels that reach the broker faster than its event loop takes
them (W3 in the bench: 2,000 new Lambda sandboxes at once): every call succeeds.

gRPC holds received calls until the grpc.aio loop picks them up, and past 1,000 such calls it
cancels new ones at random (a bare CANCELLED, before the broker sees the request). The test
makes the burst arrive at once: the broker is stopped (SIGSTOP) while the calls are sent, so
they wait in its socket buffers and gRPC reads them all as soon as it runs again. It resumes
the broker only once every call is observably pending: gRPC's channelz counts the messages the
client wrote on its connections to the broker, and the kernel shows unread bytes on every one of
the broker's connections.
"""

from __future__ import annotations

import asyncio
import json
import os
import resource
import signal
from collections import Counter
from collections.abc import Callable, Iterator

import pytest
from grpc._cython import cygrpc  # channelz, the same calls the grpcio-channelz service makes

from devtools.brokerproc import BrokerProcess
from lambda_client._proto.pgbroker.v1 import broker_pb2 as pb
from lambda_client.aio import AsyncBrokerClient

CHANNELS = 400
CALLS_PER_CHANNEL = 4  # 1,600 calls at once, well over gRPC's default backlog of 1,000
CALLS = CHANNELS * CALLS_PER_CHANNEL
# A call's request on the wire is at least an HTTP/2 DATA frame header (9 bytes), gRPC's message
# prefix (5) and the message (here without its parameter, so a lower bound).
MESSAGE_BYTES_AT_LEAST = (
    9 + 5 + pb.ExecuteRequest(statements=[pb.Statement(sql="SELECT $1::int")]).ByteSize()
)


def messages_sent_to(port: int) -> int:
    """Messages this process's gRPC channels have written on their connections to *port*
    (channelz counts a message when the transport writes it)."""
    total = 0
    start = 0
    while True:
        page = json.loads(cygrpc.channelz_get_top_channels(start))
        channels = page.get("channel", [])
        for channel in channels:
            for ref in channel.get("subchannelRef", []):
                sub = json.loads(cygrpc.channelz_get_subchannel(int(ref["subchannelId"])))
                for sock in sub["subchannel"].get("socketRef", []):
                    socket = json.loads(cygrpc.channelz_get_socket(int(sock["socketId"])))
                    data, remote = socket["socket"]["data"], socket["socket"].get("remote", {})
                    if int(remote.get("tcpipAddress", {}).get("port", 0)) == port:
                        total += int(data.get("messagesSent", 0))
        if page.get("end", True) or not channels:
            return total
        start = max(int(c["ref"]["channelId"]) for c in channels) + 1


def unread_bytes_by_connection(port: int) -> list[int]:
    """Bytes received but not yet read, for each established TCP connection whose local end
    is *port* (the broker's side), from /proc/net/tcp."""
    out = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as lines:
            next(lines)
            for line in lines:
                fields = line.split()
                if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == "01":
                    out.append(int(fields[4].split(":")[1], 16))
    return out


async def _poll(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    """Await *predicate* (checked every 10 ms); fail the test after *timeout* seconds."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.01)


async def _burst(target: str, freeze: Callable[[], None], thaw: Callable[[], None]) -> Counter[str]:
    """Connect CHANNELS new clients, stop the broker, send CALLS_PER_CHANNEL queries on each,
    let the broker run once all are pending in its socket buffers; return the failures by
    kind."""
    port = int(target.rsplit(":", 1)[1])
    clients = [AsyncBrokerClient(target, timeout=60) for _ in range(CHANNELS)]
    failures: Counter[str] = Counter()

    async def call(client: AsyncBrokerClient, index: int) -> None:
        try:
            await client.query("SELECT $1::int", [index])
        except Exception as exc:  # the test counts every kind of failure
            failures[f"{type(exc).__name__}: {exc}"] += 1

    # Channels connected (and watching health) before the burst, so its calls leave at once.
    await asyncio.gather(*(client.query("SELECT 1") for client in clients))
    freeze()
    try:
        before = messages_sent_to(port)
        tasks = [
            asyncio.create_task(call(client, i))
            for client in clients
            for i in range(CALLS_PER_CHANNEL)
        ]
        await _poll(
            lambda: messages_sent_to(port) - before >= CALLS, 60, f"{CALLS} requests written"
        )
        # Every request is on the wire and the stopped broker has read none of it: each of its
        # connections (one per channel) holds at least the calls' request messages unread.
        smallest = CALLS_PER_CHANNEL * MESSAGE_BYTES_AT_LEAST
        await _poll(
            lambda: sum(n >= smallest for n in unread_bytes_by_connection(port)) >= CHANNELS,
            60,
            f"{CHANNELS} broker connections holding their requests unread",
        )
        assert not any(task.done() for task in tasks)  # all CALLS in flight when it resumes
    finally:
        thaw()
    await asyncio.wait_for(asyncio.gather(*tasks), timeout=90)
    await asyncio.gather(*(client.close() for client in clients))
    return failures


@pytest.fixture
def many_descriptors() -> Iterator[None]:
    """Hundreds of channels need more than the usual 1,024 file descriptors."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 8192 if hard == resource.RLIM_INFINITY else min(hard, 8192)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_burst_of_calls_on_new_channels_is_never_cancelled(
    start_broker_process: Callable[..., BrokerProcess], many_descriptors: None
) -> None:
    # One process: SIGSTOP must stop the process serving the calls (not a supervisor).
    broker = start_broker_process(pool_size=2, workers=1)
    assert broker.proc is not None
    pid = broker.proc.pid
    failures = asyncio.run(
        _burst(
            broker.target,
            lambda: os.kill(pid, signal.SIGSTOP),
            lambda: os.kill(pid, signal.SIGCONT),
        )
    )
    assert not failures, dict(failures)
