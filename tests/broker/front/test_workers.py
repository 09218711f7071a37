"""``python -m broker run --workers N``: N worker processes share the port and the pool."""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from typing import Any

import grpc
import pg8000.native
import pytest

from broker.config import MIN_POOL_PER_WORKER, task_cpus
from broker.front.workers import RESTART_LIMIT
from lambda_client._proto.pgbroker.v1 import broker_pb2 as pb
from lambda_client._proto.pgbroker.v1 import broker_pb2_grpc as pb_grpc
from tests.support import request, rows, wait_until


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("PGBROKER_")}


class Supervisor:
    """`python -m broker run --workers …` on port 0; its JSON log lines from stdout."""

    def __init__(self, dsn: str, *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "broker", "run", "--listen", "127.0.0.1:0", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**_env(), "PGBROKER_DATABASE_URL": dsn},
        )
        self.lines: queue.Queue[dict[str, Any]] = queue.Queue()
        self.listening: list[dict[str, Any]] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                record = json.loads(line)
            except ValueError:
                record = {"message": line}
            if str(record.get("message", "")).startswith("listening on"):
                self.listening.append(record)
            self.lines.put(record)

    def wait_listening(self, timeout: float = 60) -> dict[str, Any]:
        while True:
            record = self.lines.get(timeout=timeout)
            if str(record.get("message", "")).startswith("listening on"):
                return record

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie has exited
        return f.read().rpartition(")")[2].split()[0] != "Z"


@pytest.fixture
def supervisor(postgres: Any) -> Iterator[Any]:
    started: list[Supervisor] = []

    def start(*args: str) -> Supervisor:
        process = Supervisor(postgres.dsn + "?sslmode=disable", *args)
        started.append(process)
        return process

    yield start
    for process in started:
        process.stop()


def _backends(postgres: Any, application_name: str) -> int:
    conn = pg8000.native.Connection(
        postgres.user, host=postgres.host, port=postgres.port, database=postgres.database
    )
    try:
        found = conn.run(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE :name || '%'",
            name=application_name,
        )
        return int(found[0][0])
    finally:
        conn.close()


def test_two_workers_share_the_port_and_the_pool_and_stop_on_sigterm(
    supervisor: Any, postgres: Any
) -> None:
    app = f"workers_{uuid.uuid4().hex[:8]}"
    process = supervisor(
        "--workers", "2", "--pool-size", "4", "--database-url",
        postgres.dsn + f"?sslmode=disable&application_name={app}",
    )  # fmt: skip
    record = process.wait_listening()
    target = f"127.0.0.1:{record['port']}"
    worker_pids = set(record["worker_pids"])
    assert len(worker_pids) == 2 and process.proc.pid not in worker_pids

    # Each channel is one connection, which the kernel gives to one worker: 200 calls over 40
    # channels reach both workers (1 in 2^39 to reach only one by chance).
    channels = [
        grpc.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)])
        for _ in range(40)
    ]
    try:
        stubs = [pb_grpc.BrokerStub(channel) for channel in channels]
        futures = [
            stubs[i % len(stubs)].Execute.future(request(("SELECT $1::int", [i])), timeout=30)
            for i in range(200)
        ]
        assert sorted(rows(f.result().results[0])[0][0] for f in futures) == list(range(200))
        assert _backends(postgres, app) <= 4
        # Whichever worker answers GetStats, the figures are the broker's: counters added up
        # exactly over the workers, with each worker's share in the breakdown.
        for stub in stubs:
            stats = stub.GetStats(pb.GetStatsRequest(), timeout=10).stats
            assert stats["workers"] == 2 and stats["workers_answered"] == 2
            assert "worker_pid" not in stats
            assert {stats["worker.0.worker_pid"], stats["worker.1.worker_pid"]} == worker_pids
            assert stats["rpcs_num"] == 200 and stats["transactions_num"] == 200
            assert stats["worker.0.rpcs_num"] > 0 and stats["worker.1.rpcs_num"] > 0
            assert stats["worker.0.rpcs_num"] + stats["worker.1.rpcs_num"] == 200
            assert stats["pool_max"] == 4 and stats["pool_active"] == 0
    finally:
        for channel in channels:
            channel.close()

    process.proc.send_signal(signal.SIGTERM)
    assert process.proc.wait(30) == 0
    assert not [pid for pid in worker_pids if _alive(pid)]
    assert len(process.listening) == 1


def _wait_for(process: Supervisor, message: str, timeout: float = 60) -> dict[str, Any]:
    """The next log line of *process* that starts with *message*."""
    while True:
        record = process.lines.get(timeout=timeout)
        if str(record.get("message", "")).startswith(message):
            return record


def test_a_killed_worker_is_restarted_and_calls_keep_succeeding(supervisor: Any) -> None:
    process = supervisor("--workers", "2", "--pool-size", "2")
    record = process.wait_listening()
    pids = record["worker_pids"]
    target = f"127.0.0.1:{record['port']}"
    failed: list[BaseException] = []
    succeeded = 0
    stop = threading.Event()

    def call_continuously() -> None:
        nonlocal succeeded
        while not stop.is_set():
            # A new connection per call, so calls reach both workers (and the new one).
            with grpc.insecure_channel(
                target, options=[("grpc.use_local_subchannel_pool", 1)]
            ) as channel:
                try:
                    stub = pb_grpc.BrokerStub(channel)
                    reply = stub.Execute(request("SELECT 1"), timeout=10, wait_for_ready=True)
                    assert rows(reply.results[0]) == [(1,)]
                    succeeded += 1
                except grpc.RpcError as exc:
                    failed.append(exc)

    caller = threading.Thread(target=call_continuously)
    caller.start()
    try:
        wait_until(lambda: succeeded >= 20, what="calls before the kill")
        os.kill(pids[0], signal.SIGKILL)
        died = _wait_for(process, "worker 0 was killed by SIGKILL; restarting it")
        assert died["level"] == "ERROR" and died["pid"] == pids[0]
        restarted = _wait_for(process, "worker 0 restarted")
        assert restarted["pid"] not in pids and _alive(restarted["pid"])
        before = succeeded
        wait_until(lambda: succeeded >= before + 20, what="calls after the restart")
    finally:
        stop.set()
        caller.join(30)
    assert process.proc.poll() is None and _alive(pids[1])
    # Only a call in flight on the killed worker's connection may fail.
    assert len(failed) <= 2, failed
    process.proc.send_signal(signal.SIGTERM)
    assert process.proc.wait(30) == 0


def test_a_worker_that_keeps_dying_stops_the_broker(supervisor: Any) -> None:
    process = supervisor("--workers", "2", "--pool-size", "2")
    pids = process.wait_listening()["worker_pids"]
    seen = list(pids)
    os.kill(pids[0], signal.SIGKILL)
    for _ in range(RESTART_LIMIT):
        pid = _wait_for(process, "worker 0 restarted")["pid"]
        seen.append(pid)
        os.kill(pid, signal.SIGKILL)
    assert process.proc.wait(30) == 1
    stopped = _wait_for(process, "worker 0 was killed by SIGKILL, the 6th worker exit within")
    assert stopped["level"] == "ERROR"
    assert not [pid for pid in seen if _alive(pid)]


def test_fewer_connections_than_workers_is_refused_with_exit_2(postgres: Any) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "broker", "run", "--workers", "3", "--pool-size", "2"],
        capture_output=True,
        text=True,
        env={**_env(), "PGBROKER_DATABASE_URL": postgres.dsn},
        timeout=30,
    )
    assert result.returncode == 2
    assert "--workers=3: more workers than pool_size 2" in result.stderr


def test_workers_stop_when_the_supervisor_is_killed(supervisor: Any) -> None:
    process = supervisor("--workers", "2", "--pool-size", "2", "--shutdown-grace", "1")
    pids = process.wait_listening()["worker_pids"]
    process.proc.kill()
    process.proc.wait(10)
    wait_until(lambda: not [pid for pid in pids if _alive(pid)], what="workers gone")


def test_a_port_taken_by_another_broker_is_refused(supervisor: Any) -> None:
    first = supervisor("--pool-size", "1")
    port = first.wait_listening()["port"]
    second = supervisor("--workers", "2", "--pool-size", "2", "--listen", f"127.0.0.1:{port}")
    assert second.proc.wait(30) == 1
    assert second.proc.stderr is not None
    assert f"cannot listen on 127.0.0.1:{port}" in second.proc.stderr.read()


def test_by_default_one_worker_per_cpu_and_the_log_says_why(supervisor: Any) -> None:
    cpus, why = task_cpus()
    expected = min(8 // MIN_POOL_PER_WORKER, cpus)  # each worker holds at least 4 connections
    record = supervisor("--pool-size", "8").wait_listening()
    assert record["workers"] == expected
    assert f"with {expected} worker process" in record["message"] and why in record["message"]
    assert len(record.get("worker_pids", [None])) == expected


def test_an_explicit_worker_count_wins_and_the_log_says_so(supervisor: Any) -> None:
    record = supervisor("--workers", "1", "--pool-size", "8").wait_listening()
    assert record["workers"] == 1 and "worker_pids" not in record
    assert "with 1 worker process (PGBROKER_WORKERS / --workers (flag))" in record["message"]
