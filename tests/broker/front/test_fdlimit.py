"""The open-file limit (issue 15): raised to the hard limit at start, a warning with the
arithmetic when it cannot hold the callers, a warning when descriptors run out."""

from __future__ import annotations

import json
import logging
import os
import queue
import resource
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest

from broker.front.fdlimit import MARGIN, DescriptorWatch, open_descriptors, raise_nofile
from lambda_client._proto.pgbroker.v1 import broker_pb2_grpc as pb_grpc
from tests.support import request, rows


def _limited(soft: int, hard: int) -> Callable[[], None]:
    def preexec() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))

    return preexec


class Broker:
    """``python -m broker run`` under a given RLIMIT_NOFILE; its JSON log lines."""

    def __init__(self, dsn: str, soft: int, hard: int, *args: str) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PGBROKER_")}
        # One process: these tests read the limits of the process they started and the one
        # warning it logs (with workers, each worker checks its own limit and logs its own).
        argv = ["run", "--listen", "127.0.0.1:0", "--workers", "1", *args]
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "broker", *argv],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            env={**env, "PGBROKER_DATABASE_URL": dsn, "PGBROKER_AUTH": "none"},
            preexec_fn=_limited(soft, hard),
        )
        self.lines: queue.Queue[dict[str, Any]] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                self.lines.put(json.loads(line))
            except ValueError:
                self.lines.put({"message": line})

    def until_listening(self) -> list[dict[str, Any]]:
        seen = []
        while True:
            record = self.lines.get(timeout=60)
            seen.append(record)
            if str(record.get("message", "")).startswith("listening on"):
                return seen

    def soft_limit(self) -> int:
        with open(f"/proc/{self.proc.pid}/limits") as limits:
            (line,) = [x for x in limits if x.startswith("Max open files")]
        return int(line.split()[3])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


@pytest.fixture
def broker_under(postgres: Any) -> Iterator[Callable[..., Broker]]:
    started: list[Broker] = []

    def start(soft: int, hard: int, *args: str) -> Broker:
        broker = Broker(postgres.dsn + "?sslmode=disable", soft, hard, *args)
        started.append(broker)
        return broker

    yield start
    for broker in started:
        broker.stop()


def test_a_limit_too_low_for_max_waiting_is_logged_with_the_arithmetic(
    broker_under: Callable[..., Broker],
) -> None:
    broker = broker_under(256, 256, "--pool-size", "2")  # max_waiting: 2,000 by default
    lines = broker.until_listening()
    (warning,) = [r for r in lines if "file descriptor limit too low" in str(r.get("message"))]
    assert warning["level"] == "WARNING"
    needed = 2000 + 2 * 2 + MARGIN
    assert (
        f"max_waiting 2000 + 2 × pool_size 2 + {MARGIN} = {needed} file descriptors needed"
        f" > soft limit 256 (hard limit 256)" in warning["message"]
    )
    assert f"lower PGBROKER_MAX_WAITING to at most {256 - 4 - MARGIN}" in warning["message"]
    assert (warning["nofile_soft"], warning["nofile_needed"]) == (256, needed)
    # A warning, not a refusal: it serves what fits.
    port = next(r for r in lines if str(r.get("message")).startswith("listening on"))["port"]
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        reply = pb_grpc.BrokerStub(channel).Execute(request("SELECT 1"), timeout=30)
    assert rows(reply.results[0]) == [(1,)]


def test_the_soft_limit_is_raised_to_the_hard_limit(broker_under: Callable[..., Broker]) -> None:
    broker = broker_under(256, 4096, "--pool-size", "2", "--max-waiting", "100")
    lines = broker.until_listening()
    raised = [r for r in lines if str(r.get("message")).startswith("open-file limit raised")]
    assert raised and raised[0]["message"] == "open-file limit raised from 256 to 4096"
    assert not [r for r in lines if "file descriptor limit too low" in str(r.get("message"))]
    assert broker.soft_limit() == 4096


def test_raise_nofile_reports_the_budget_of_this_process() -> None:
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    budget = raise_nofile(max_waiting=10, pool_size=2)
    assert budget is not None and budget.needed == 10 + 4 + MARGIN
    assert budget.soft == resource.getrlimit(resource.RLIMIT_NOFILE)[0] >= soft


def test_the_watch_warns_when_descriptors_near_the_limit(caplog: pytest.LogCaptureFixture) -> None:
    used = open_descriptors()
    assert used is not None
    with caplog.at_level(logging.WARNING, logger="pgbroker.fdlimit"):
        assert not DescriptorWatch(limit=used * 4).check()
        watch = DescriptorWatch(limit=used + 1)
        assert watch.check() and watch.check()  # still over, but logged once a minute
    (record,) = caplog.records
    assert record.getMessage().startswith("file descriptors nearly exhausted:")
    assert f"of {used + 1} open" in record.getMessage()
