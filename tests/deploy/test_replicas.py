"""Replicas share the load and one is replaced under load without a failed call.

What ECS does in a rolling deploy, on loopback: three broker processes on 127.0.0.1, .2 and .3
(same port), one client whose target lists them and a fourth address, steady load from a few
threads; a new replica starts on 127.0.0.4, turns SERVING, then the replica on .1 gets SIGTERM
and drains. Every call succeeds, every replica serves calls, and Postgres never sees more
backends than the pools of the replicas running at once.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator
from typing import Any

import grpc
import pytest

from devtools.brokerproc import BrokerProcess
from devtools.pgmonitor import BackendMonitor
from lambda_client import BrokerClient
from lambda_client._proto.pgbroker.v1 import broker_pb2 as pb
from lambda_client._proto.pgbroker.v1 import broker_pb2_grpc as pb_grpc
from tests.support import connect, port_free_on

pytestmark = pytest.mark.slow

POOL_SIZE = 3
SHUTDOWN_GRACE = 5
LOAD_THREADS = 6
STEADY_SECONDS = 6.0  # load before the replacement, and again after it


def replica(host: str, port: int, dsn: str, started: list[BrokerProcess]) -> BrokerProcess:
    """One broker process on *host*:*port*, added to *started* (stopped at teardown) and
    waited for until SERVING (its pool filled)."""
    process = BrokerProcess(
        dsn,
        listen=f"{host}:{port}",
        log_level="INFO",
        pool_size=POOL_SIZE,
        shutdown_grace=SHUTDOWN_GRACE,
        auth="none",
    )
    started.append(process)
    process.start()
    assert process.wait_serving(), f"broker on {process.target} not SERVING:\n{process.log()}"
    return process


def stats(process: BrokerProcess) -> dict[str, int]:
    with grpc.insecure_channel(process.target) as channel:
        reply = pb_grpc.BrokerStub(channel).GetStats(pb.GetStatsRequest(), timeout=5)
    return dict(reply.stats)


class Load:
    """*threads* callers running short queries through one client until stopped."""

    def __init__(self, client: BrokerClient, threads: int) -> None:
        self.client = client
        self.ok = 0
        self.failures: list[str] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.client.query("SELECT pg_sleep(0.005)", timeout=10)
            except Exception as exc:  # every failure is a finding
                with self._lock:
                    self.failures.append(repr(exc))
            else:
                with self._lock:
                    self.ok += 1

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(30)


@pytest.fixture
def replicas() -> Iterator[list[BrokerProcess]]:
    started: list[BrokerProcess] = []
    yield started
    for process in started:
        process.close()


def test_replica_replaced_under_load_loses_no_call(
    own_postgres: Any, replicas: list[BrokerProcess]
) -> None:
    hosts = ["127.0.0.1", "127.0.0.2", "127.0.0.3", "127.0.0.4"]
    port = port_free_on(hosts)
    dsn = own_postgres.dsn + "?sslmode=disable"
    for host in hosts[:3]:
        replica(host, port, dsn, replicas)

    monitor = BackendMonitor(lambda: connect(own_postgres), interval=0.02).start()
    client = BrokerClient("ipv4:" + ",".join(f"{h}:{port}" for h in hosts), timeout=10)
    try:
        with Load(client, LOAD_THREADS) as load:
            time.sleep(STEADY_SECONDS)
            # Rolling deploy: the new task is healthy before the old one is told to stop.
            replica(hosts[3], port, dsn, replicas)
            old = replicas[0]
            served_by_old = stats(old)["rpcs_num"]
            assert old.proc is not None
            old.proc.send_signal(signal.SIGTERM)
            exit_code = old.proc.wait(SHUTDOWN_GRACE + 20)
            time.sleep(STEADY_SECONDS)
        served = {r.host: stats(r)["rpcs_num"] for r in replicas[1:]}
    finally:
        client.close()
        monitor.stop()

    served[old.host] = served_by_old
    peak = monitor.peak()
    print(
        f"\nreplicas: calls ok {load.ok}, failed {len(load.failures)}; served per replica "
        f"{dict(sorted(served.items()))}; peak Postgres backends {peak} "
        f"(pools {POOL_SIZE} × 4 = {POOL_SIZE * 4}, {len(monitor.samples)} samples)"
    )
    assert load.failures == []
    assert exit_code == 0
    assert load.ok > 0
    assert all(count > 0 for count in served.values()), served
    # Four replicas overlap while the old one drains: never more than their pools together.
    assert 0 < peak <= POOL_SIZE * 4
