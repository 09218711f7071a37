"""A burst of calls on brand-new channels that reach the broker faster than its event loop takes
them (W3 in the bench: 2,000 new Lambda sandboxes at once): every call succeeds.

gRPC holds received calls until the grpc.aio loop picks them up, and past 1,000 such calls it
cancels new ones at random (a bare CANCELLED, before the broker sees the request). The test
makes the burst arrive at once: the broker is stopped (SIGSTOP) while the calls are sent, so
they wait in its socket buffers and gRPC reads them all as soon as it runs again.
"""

from __future__ import annotations

import asyncio
import os
import resource
import signal
from collections import Counter
from collections.abc import Callable, Iterator

import pytest

from devtools.brokerproc import BrokerProcess
from lambda_client.aio import AsyncBrokerClient

CHANNELS = 400
CALLS_PER_CHANNEL = 4  # 1,600 calls at once, well over gRPC's default backlog of 1,000


async def _burst(target: str, freeze: Callable[[], None], thaw: Callable[[], None]) -> Counter[str]:
    """Connect CHANNELS new clients, stop the broker, send CALLS_PER_CHANNEL queries on each,
    let the broker run; return the failures by kind."""
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
        tasks = [
            asyncio.create_task(call(client, i))
            for client in clients
            for i in range(CALLS_PER_CHANNEL)
        ]
        await asyncio.sleep(1.0)  # every call sent, waiting in the stopped broker's buffers
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
    start_broker: Callable[..., BrokerProcess], many_descriptors: None
) -> None:
    broker = start_broker(pool_size=2)
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
