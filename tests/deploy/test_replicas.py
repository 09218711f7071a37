"""Replicas share the load and one is replaced under load without a failed call.

What ECS does in a rolling deploy, on loopback: three broker processes on 127.0.0.1, .2 and .3
(same port), one client whose target lists them and a fourth address, steady load from a few
threads; a new replica starts on 127.0.0.4, turns SERVING, then the replica on .1 gets SIGTERM
and drains. Every call succeeds, every replica serves calls, and Postgres never sees more
backends than the pools of the replicas running at once.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

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


class Replica:
    """One `python -m broker run` process on *host*:*port*, logging to a file."""

    def __init__(self, host: str, port: int, dsn: str, log_dir: Path) -> None:
        self.host, self.port = host, port
        self.target = f"{host}:{port}"
        env = dict(os.environ)
        env.update(
            PGBROKER_DATABASE_URL=dsn,
            PGBROKER_LISTEN=self.target,
            PGBROKER_POOL_SIZE=str(POOL_SIZE),
            PGBROKER_SHUTDOWN_GRACE=str(SHUTDOWN_GRACE),
            PGBROKER_AUTH="none",
            PGBROKER_LOG_LEVEL="WARNING",
        )
        self.log = open(log_dir / f"broker-{host}.log", "w")  # noqa: SIM115 (closed in stop)
        self.process = subprocess.Popen(
            [sys.executable, "-m", "broker", "run"],
            env=env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.channel = grpc.insecure_channel(self.target)

    def serving(self) -> bool:
        try:
            reply = health_pb2_grpc.HealthStub(self.channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=1
            )
        except grpc.RpcError:
            return False
        return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)

    def wait_serving(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while not self.serving():
            if self.process.poll() is not None:
                pytest.fail(f"broker on {self.target} exited: {self.process.returncode}")
            if time.monotonic() > deadline:
                pytest.fail(f"broker on {self.target} not SERVING after {timeout}s")
            time.sleep(0.05)

    def stats(self) -> dict[str, int]:
        reply = pb_grpc.BrokerStub(self.channel).GetStats(pb.GetStatsRequest(), timeout=5)
        return dict(reply.stats)

    def stop(self) -> None:
        """End the process if it still runs (by its own pid), then release the files."""
        self.channel.close()
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)
        self.log.close()


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
def replicas(tmp_path: Path) -> Iterator[list[Replica]]:
    started: list[Replica] = []
    yield started
    for replica in started:
        replica.stop()


def test_replica_replaced_under_load_loses_no_call(
    own_postgres: Any, replicas: list[Replica], tmp_path: Path
) -> None:
    hosts = ["127.0.0.1", "127.0.0.2", "127.0.0.3", "127.0.0.4"]
    port = port_free_on(hosts)
    dsn = own_postgres.dsn + "?sslmode=disable"
    for host in hosts[:3]:
        replicas.append(Replica(host, port, dsn, tmp_path))
    for replica in replicas:
        replica.wait_serving()

    monitor = BackendMonitor(lambda: connect(own_postgres), interval=0.02).start()
    client = BrokerClient("ipv4:" + ",".join(f"{h}:{port}" for h in hosts), timeout=10)
    try:
        with Load(client, LOAD_THREADS) as load:
            time.sleep(STEADY_SECONDS)
            # Rolling deploy: the new task is healthy before the old one is told to stop.
            new = Replica(hosts[3], port, dsn, tmp_path)
            replicas.append(new)
            new.wait_serving()
            old = replicas[0]
            served_by_old = old.stats()["rpcs_num"]
            old.process.send_signal(signal.SIGTERM)
            exit_code = old.process.wait(SHUTDOWN_GRACE + 20)
            time.sleep(STEADY_SECONDS)
        served = {r.host: r.stats()["rpcs_num"] for r in replicas[1:]}
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
