"""``--workers N``: the broker's figures over all workers (broker/front/siblings.py), and the
EMF metrics one worker publishes for all of them."""

from __future__ import annotations

import asyncio
import io
import os
import stat
import tempfile
from collections.abc import Iterator
from typing import Any

import pytest

from broker.front.metrics import MetricsPublisher
from broker.front.siblings import Siblings, combine, merge_callers, socket_path
from lambda_client._proto.pgbroker.v1 import broker_pb2 as pb

WORKER_0 = {
    "worker": 0,
    "workers": 2,
    "worker_pid": 100,
    "rpcs_num": 7,
    "pool_size": 10,
    "pool_max": 10,
    "pool_active": 3,
    "requests_waiting": 4,
    "maxwait_us": 900,
    "maxwait": 0,
    "pool_active_max_ms": 50,
    "leases_max_ms": 70,
    "leases_p50_ms": 5,
    "pool_paused": 0,
    "target.replica1.replica_lag_ms": 30,
    "target.replica1.in_rotation": 1,
    "target.replica1.pool_active": 1,
    "rpcs_failed.DATABASE_ERROR": 2,
}
WORKER_1 = {
    **WORKER_0,
    "worker": 1,
    "worker_pid": 101,
    "rpcs_num": 5,
    "pool_active": 2,
    "requests_waiting": 0,
    "maxwait_us": 2500,
    "maxwait": 2,
    "pool_active_max_ms": 20,
    "leases_max_ms": 90,
    "leases_p50_ms": 8,
    "pool_paused": 1,
    "target.replica1.replica_lag_ms": 10,
    "target.replica1.in_rotation": 0,
    "target.replica1.pool_active": 2,
    "transactions_num": 4,  # a key only one worker has counts from that one
}


def test_counters_and_gauges_add_up_and_maxima_take_the_largest() -> None:
    combined = combine([WORKER_0, WORKER_1])
    # Sums: counters and the gauges of the pools and queues.
    assert combined["rpcs_num"] == 12
    assert combined["rpcs_failed.DATABASE_ERROR"] == 4
    assert combined["transactions_num"] == 4
    assert combined["pool_size"] == combined["pool_max"] == 20
    assert combined["pool_active"] == 5 and combined["requests_waiting"] == 4
    assert combined["target.replica1.pool_active"] == 3
    # Maxima: the oldest wait, the longest checkout and lease, any pool paused, the worst lag.
    assert combined["maxwait_us"] == 2500 and combined["maxwait"] == 2
    assert combined["pool_active_max_ms"] == 50 and combined["leases_max_ms"] == 90
    assert combined["leases_p50_ms"] == 8 and combined["pool_paused"] == 1
    assert combined["target.replica1.replica_lag_ms"] == 30
    # In rotation only if it is on every worker; the worker count is the same everywhere.
    assert combined["target.replica1.in_rotation"] == 0
    assert combined["workers"] == 2 and combined["workers_answered"] == 2
    # Which worker answered means nothing in a sum; each one's share is in the breakdown.
    assert "worker" not in combined and "worker_pid" not in combined
    assert combined["worker.0.rpcs_num"] == 7 and combined["worker.1.rpcs_num"] == 5
    assert combined["worker.0.worker_pid"] == 100 and combined["worker.1.worker_pid"] == 101
    assert combined["worker.1.pool_active"] == 2 and combined["worker.0.requests_waiting"] == 4


def test_the_callers_of_all_workers_add_up_busiest_first() -> None:
    first = pb.ShowCallersResponse()
    first.callers.add(caller="fn-a", in_flight=3, waiting=1)
    first.callers.add(caller="fn-b", in_flight=1, waiting=0)
    first.leases.add(caller="fn-a", held_ms=100, idle_ms=5)
    second = pb.ShowCallersResponse()
    second.callers.add(caller="fn-b", in_flight=4, waiting=2)
    second.leases.add(caller="fn-b", held_ms=900, idle_ms=1)
    second.leases.add(caller="fn-c", held_ms=10, idle_ms=1)
    merged = merge_callers([first, second], limit=2)
    assert [(c.caller, c.in_flight, c.waiting) for c in merged.callers] == [
        ("fn-b", 5, 2),
        ("fn-a", 3, 1),
    ]
    assert [(lease.caller, lease.held_ms) for lease in merged.leases] == [
        ("fn-b", 900),
        ("fn-a", 100),
    ]


@pytest.fixture
def sibling_dir() -> Iterator[str]:
    with tempfile.TemporaryDirectory(prefix="pgbroker-workers-") as directory:
        yield directory


def _siblings(directory: str, figures: list[dict[str, int]]) -> list[Siblings]:
    def callers_of(index: int) -> Any:
        async def callers(request: pb.ShowCallersRequest) -> pb.ShowCallersResponse:
            reply = pb.ShowCallersResponse()
            reply.callers.add(caller="fn", in_flight=index + 1, waiting=0)
            return reply

        return callers

    return [
        Siblings(directory, index, len(figures), lambda f=f: dict(f), callers_of(index))
        for index, f in enumerate(figures)
    ]


def test_any_worker_answers_with_every_workers_figures(sibling_dir: str) -> None:
    async def run() -> None:
        workers = _siblings(sibling_dir, [WORKER_0, WORKER_1])
        for worker in workers:
            await worker.start()
        try:
            # The socket is in the supervisor's private directory (mkdtemp: mode 0700).
            assert stat.S_IMODE(os.stat(sibling_dir).st_mode) == 0o700
            assert os.path.exists(socket_path(sibling_dir, 1))
            for worker in workers:
                assert await worker.get_stats() == combine([WORKER_0, WORKER_1])
            callers = await workers[1].show_callers(pb.ShowCallersRequest(), limit=10)
            assert [(c.caller, c.in_flight) for c in callers.callers] == [("fn", 3)]
            # A worker that does not answer (restarting) is left out, and the figures say so.
            await workers[1].stop()
            assert not os.path.exists(socket_path(sibling_dir, 1))
            await workers[0].linger(1)  # returns at once: worker 1 serves no more
            stats = await workers[0].get_stats()
            assert stats["workers_answered"] == 1 and stats["rpcs_num"] == 7
        finally:
            for worker in workers:
                await worker.stop()

    asyncio.run(run())


def _published(publisher: MetricsPublisher, parts: list[dict[str, int]]) -> dict[str, Any]:
    records = publisher.publish(parts)
    assert records is not None
    return _values(records[0])


def _values(record: dict[str, Any]) -> dict[str, Any]:
    """An EMF document's metrics by name (Powertools puts each value in a list)."""
    return {k: v[0] if isinstance(v, list) and len(v) == 1 else v for k, v in record.items()}


def test_one_publisher_reports_the_change_of_all_workers_across_a_restart() -> None:
    publisher = MetricsPublisher(dict, 60, stream=io.StringIO(), namespace="t", service="t")
    assert _published(publisher, [WORKER_0, WORKER_1])["QueryRequests"] == 12  # since start
    later_0 = {**WORKER_0, "rpcs_num": 17}
    later_1 = {**WORKER_1, "rpcs_num": 8}
    first = _published(publisher, [later_0, later_1])
    assert first["QueryRequests"] == (17 - 7) + (8 - 5)
    assert first["ClientConnectionsWaiting"] == 4 and first["DatabaseConnections"] == 20
    # Worker 1 restarted (a new pid, counting from zero): no drop, no spike.
    restarted = {**WORKER_1, "worker_pid": 102, "rpcs_num": 2}
    second = _published(publisher, [{**later_0, "rpcs_num": 20}, restarted])
    assert second["QueryRequests"] == 3 + 2
    # Worker 1 missed a period: its change shows when it answers again.
    third = _published(publisher, [{**later_0, "rpcs_num": 21}])
    assert third["QueryRequests"] == 1
    fourth = _published(publisher, [{**later_0, "rpcs_num": 21}, {**restarted, "rpcs_num": 9}])
    assert fourth["QueryRequests"] == 7


def test_a_single_process_publisher_is_unchanged() -> None:
    figures = {"rpcs_num": 5, "requests_waiting": 1}
    publisher = MetricsPublisher(lambda: figures, 60, stream=io.StringIO(), namespace="t")
    assert _published_own(publisher)["QueryRequests"] == 5
    figures["rpcs_num"] = 8
    assert _published_own(publisher)["QueryRequests"] == 3


def _published_own(publisher: MetricsPublisher) -> dict[str, Any]:
    records = publisher.publish()
    assert records is not None
    return _values(records[0])
