"""`python -m broker` as a real process: startup line, SIGTERM drain, bad config, CLI tools."""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from devtools.localpg import free_port
from lambda_client._proto.pgbroker.v1 import broker_pb2 as pb
from lambda_client._proto.pgbroker.v1 import broker_pb2_grpc as pb_grpc
from tests.support import request, rows, wait_until


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("PGBROKER_")}


class BrokerCommand:
    """`python -m broker run` on port 0; its JSON log lines collected from stdout. Not the
    shared `BrokerProcess` fixture: these tests drive the command line itself (the URL as a
    flag, the exit status, the log stream as it comes)."""

    def __init__(self, *args: str, env: dict[str, str] | None = None) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "broker", "run", "--listen", "127.0.0.1:0", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**_env(), **(env or {})},
        )
        self.lines: queue.Queue[dict[str, Any]] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        self.port = 0

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                self.lines.put(json.loads(line))
            except ValueError:
                self.lines.put({"message": line})

    def wait_listening(self, timeout: float = 30) -> int:
        while True:
            record = self.lines.get(timeout=timeout)
            if str(record.get("message", "")).startswith("listening on") and "port" in record:
                self.port = int(record["port"])
                return self.port

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


@pytest.fixture
def broker_command(postgres: Any) -> Iterator[Any]:
    started: list[BrokerCommand] = []

    def start(*args: str) -> BrokerCommand:
        process = BrokerCommand("--database-url", postgres.dsn + "?sslmode=disable", *args)
        started.append(process)
        process.wait_listening()
        return process

    yield start
    for process in started:
        process.stop()


def test_startup_logs_the_bound_port_as_json(broker_command: Any) -> None:
    process = broker_command("--pool-size", "1")
    with grpc.insecure_channel(process.target) as channel:
        reply = pb_grpc.BrokerStub(channel).Execute(request("SELECT 1"), timeout=10)
    assert rows(reply.results[0]) == [(1,)]


LOCK_KEY = 4344


def _refused(target: str) -> bool:
    """Whether a new call to *target* is turned away as UNAVAILABLE (the server has stopped
    accepting calls); a slow answer is not taken for a refusal."""
    with grpc.insecure_channel(target) as channel:
        try:
            pb_grpc.BrokerStub(channel).GetStats(pb.GetStatsRequest(), timeout=5)
        except grpc.RpcError as exc:
            return exc.code() == grpc.StatusCode.UNAVAILABLE
    return False


def test_sigterm_lets_in_flight_requests_finish_and_exits_0(
    broker_command: Any, admin: Any
) -> None:
    # One process: the four calls share one channel, which reaches one worker; the two
    # running and two queued below need the whole pool of 2 in that process.
    process = broker_command("--pool-size", "2", "--shutdown-grace", "20", "--workers", "1")
    # Every request waits on an advisory lock the test holds, so two stay running and two
    # queued until the test releases it, after the broker has stopped accepting calls.
    admin.run("SELECT pg_advisory_lock(:k)", k=LOCK_KEY)
    try:
        with grpc.insecure_channel(process.target) as channel:
            stub = pb_grpc.BrokerStub(channel)
            futures = [
                stub.Execute.future(
                    request((f"SELECT $1::int FROM pg_advisory_xact_lock({LOCK_KEY})", [i])),
                    timeout=30,
                )
                for i in range(4)
            ]

            def busy() -> bool:
                stats = stub.GetStats(pb.GetStatsRequest(), timeout=5).stats
                return stats["pool_active"] == 2 and stats["requests_waiting"] == 2

            wait_until(busy, what="2 running and 2 queued requests")
            process.proc.send_signal(signal.SIGTERM)
            wait_until(lambda: _refused(process.target), timeout=20, what="new calls refused")
            assert not any(f.done() for f in futures)  # all four still in flight
            admin.run("SELECT pg_advisory_unlock_all()")
            assert [rows(f.result().results[0]) for f in futures] == [[(i,)] for i in range(4)]
    finally:
        admin.run("SELECT pg_advisory_unlock_all()")
    assert process.proc.wait(20) == 0


def test_health_and_stats_commands(broker_command: Any) -> None:
    process = broker_command("--pool-size", "1")
    health = subprocess.run(
        [sys.executable, "-m", "broker", "health", "--target", process.target],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=30,
    )
    assert (health.returncode, health.stdout.strip()) == (0, "SERVING")
    stats = subprocess.run(
        [sys.executable, "-m", "broker", "stats", "--json", "--target", process.target],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=30,
    )
    figures = json.loads(stats.stdout)
    assert figures["pool_size"] == 1
    assert {"requests_waiting", "requests_wait_ms", "connections_lost", "maxwait"} <= set(figures)


def test_health_command_fails_when_no_broker_listens() -> None:
    health = subprocess.run(
        [sys.executable, "-m", "broker", "health", "--target", f"127.0.0.1:{free_port()}"],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=30,
    )
    assert health.returncode == 1


def test_reflection_lists_the_broker_service(broker_command: Any) -> None:
    process = broker_command("--pool-size", "1")
    with grpc.insecure_channel(process.target) as channel:
        services = set(ProtoReflectionDescriptorDatabase(channel).get_services())
    assert {"pgbroker.v1.Broker", "grpc.health.v1.Health"} <= services


@pytest.mark.parametrize(
    ("args", "env", "expected"),
    [
        (["--pool-size", "0"], {}, "--pool-size='0': must be at least 1"),
        (["--database-url", "not a url:pw@"], {}, "--database-url=<redacted>"),
        ([], {"PGBROKER_QUEUE_TIMEOUT": "soon"}, "PGBROKER_QUEUE_TIMEOUT='soon'"),
        (["--listen", "0.0.0.0:1"], {}, "PGBROKER_AUTH is required"),
    ],
    ids=["pool-size-0", "bad-url", "bad-duration", "no-auth-off-loopback"],
)
def test_bad_config_prints_one_clear_line_and_exits_2(
    postgres: Any, args: list[str], env: dict[str, str], expected: str
) -> None:
    run = subprocess.run(
        [sys.executable, "-m", "broker", "run", "--database-url", postgres.dsn, *args],
        capture_output=True,
        text=True,
        env={**_env(), **env},
        timeout=30,
    )
    assert run.returncode == 2
    assert len(run.stderr.strip().splitlines()) == 1
    assert expected in run.stderr
    assert "pw@" not in run.stderr


def test_unreachable_database_exits_nonzero_with_one_line() -> None:
    port = free_port()
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "broker",
            "run",
            "--listen",
            "127.0.0.1:0",
            "--database-url",
            f"postgresql://app:secret@127.0.0.1:{port}/db?sslmode=disable",
            "--connect-timeout",
            "1",
        ],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=30,
    )
    assert run.returncode == 1
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1
    assert f"127.0.0.1:{port}" in lines[0]
    assert "secret" not in run.stderr + run.stdout
