"""EMF lines for CloudWatch: valid Embedded Metric Format, carrying the figures of GetStats."""

from __future__ import annotations

import asyncio
import dataclasses
import io
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import grpc
import pytest

from broker.config import Settings
from broker.front.metrics import (
    METRIC_NAMES,
    TARGET_METRIC_NAMES,
    MetricsPublisher,
    emf_record,
    emf_records,
    emit,
)
from lambda_client._proto.pgbroker.v1 import broker_pb2 as pb
from tests.fixtures.brokers import InProcessBroker
from tests.support import request, status_of

# CloudWatch's units (the EMF specification's "Unit" values).
UNITS = {
    "Seconds", "Microseconds", "Milliseconds", "Bytes", "Kilobytes", "Megabytes", "Gigabytes",
    "Terabytes", "Bits", "Kilobits", "Megabits", "Gigabits", "Terabits", "Percent", "Count",
    "Bytes/Second", "Kilobytes/Second", "Megabytes/Second", "Gigabytes/Second",
    "Terabytes/Second", "Bits/Second", "Kilobits/Second", "Megabits/Second", "Gigabits/Second",
    "Terabits/Second", "Count/Second", "None",
}  # fmt: skip

STATS = {
    "pool_min": 4, "pool_max": 4, "pool_size": 4, "pool_available": 1, "pool_active": 3,
    "requests_waiting": 7, "maxwait": 1, "maxwait_us": 1_500_000,
    "requests_num": 120, "requests_wait_ms": 600, "rpcs_num": 118, "rpcs_failed": 2,
    "rpcs_rejected": 1, "transactions_num": 115, "transactions_ms": 230,
    "transactions_errors": 1, "connections_num": 5, "connections_errors": 1,
    "connections_lost": 1, "leases_active": 2, "leases_p50_ms": 12, "leases_num": 40,
    "leases_ended_idle_transaction_timeout": 3, "leases_ended_transaction_timeout": 1,
    "leases_ended_deadline": 2, "leases_ended_client_gone": 1,
    "streams_num": 3, "streams_rows": 5_000_000, "streams_bytes": 140_000_000,
}  # fmt: skip


def assert_valid_emf(line: str) -> dict[str, Any]:
    """Check *line* against the EMF specification; return the parsed document.

    One JSON object; ``_aws`` with an integer millisecond ``Timestamp`` and a non-empty
    ``CloudWatchMetrics`` array of directives; each directive has a ``Namespace``, a
    ``Dimensions`` array of dimension sets (arrays of at most 30 names, each a string member
    of the root) and a ``Metrics`` array (at most 100) of ``{Name, Unit}`` whose names are
    root members holding a number or an array of at most 100 numbers.
    """
    assert line.endswith("\n") and "\n" not in line[:-1], "one JSON document per line"
    doc = json.loads(line)
    assert isinstance(doc, dict)
    meta = doc["_aws"]
    assert isinstance(meta["Timestamp"], int) and meta["Timestamp"] > 1_600_000_000_000
    directives = meta["CloudWatchMetrics"]
    assert isinstance(directives, list) and directives
    for directive in directives:
        assert set(directive) <= {"Namespace", "Dimensions", "Metrics"}
        assert isinstance(directive["Namespace"], str) and 0 < len(directive["Namespace"]) <= 1024
        for dimension_set in directive["Dimensions"]:
            assert isinstance(dimension_set, list) and len(dimension_set) <= 30
            for name in dimension_set:
                assert isinstance(doc[name], str) and doc[name], f"dimension {name} has no value"
        metrics = directive["Metrics"]
        assert 0 < len(metrics) <= 100
        for metric in metrics:
            assert set(metric) <= {"Name", "Unit", "StorageResolution"}
            assert metric["Unit"] in UNITS, metric
            value = doc[metric["Name"]]
            values = value if isinstance(value, list) else [value]
            assert 0 < len(values) <= 100
            assert all(isinstance(v, int | float) and not isinstance(v, bool) for v in values)
    return doc


def assert_valid_emf_lines(text: str) -> list[dict[str, Any]]:
    """Every line of *text* checked with `assert_valid_emf`; their documents, in order."""
    assert text.endswith("\n")
    return [assert_valid_emf(line) for line in text.splitlines(keepends=True)]


def dimensions(doc: dict[str, Any]) -> list[list[str]]:
    (directive,) = doc["_aws"]["CloudWatchMetrics"]
    return list(directive["Dimensions"])


def by_dimension(docs: list[dict[str, Any]], name: str) -> dict[str, dict[str, Any]]:
    """The documents carrying dimension *name*, by its value; each value at most once."""
    found = {doc[name]: doc for doc in docs if [["service", name]] == dimensions(doc)}
    assert len(found) == sum(1 for doc in docs if name in doc)
    return found


def value(doc: dict[str, Any], name: str) -> float:
    (single,) = doc[name] if isinstance(doc[name], list) else [doc[name]]
    return float(single)


def metric_names(doc: dict[str, Any]) -> set[str]:
    return {m["Name"] for d in doc["_aws"]["CloudWatchMetrics"] for m in d["Metrics"]}


def test_emf_line_is_valid_with_namespace_service_dimension_and_every_metric() -> None:
    out = io.StringIO()
    emit(STATS, stream=out, namespace="pgbroker", service="orders-stack")
    doc = assert_valid_emf(out.getvalue())
    (directive,) = doc["_aws"]["CloudWatchMetrics"]
    assert directive["Namespace"] == "pgbroker"
    assert directive["Dimensions"] == [["service"]]
    assert doc["service"] == "orders-stack"
    assert metric_names(doc) == METRIC_NAMES


def test_emf_figures_follow_getstats() -> None:
    doc = emf_record(STATS)
    assert value(doc, "ClientConnectionsWaiting") == 7
    assert value(doc, "MaxWait") == 1_500_000
    assert value(doc, "DatabaseConnections") == 4
    assert value(doc, "DatabaseConnectionsCurrentlyBorrowed") == 3
    assert value(doc, "MaxDatabaseConnectionsAllowed") == 4
    assert value(doc, "PoolUtilization") == 75.0
    assert value(doc, "QueryRequests") == 118
    assert value(doc, "QueryRequestsRejected") == 1
    assert value(doc, "QueryRequestsFailed") == 2
    assert value(doc, "Transactions") == 115
    assert value(doc, "TransactionErrors") == 1
    assert value(doc, "DatabaseConnectionRequests") == 5
    assert value(doc, "DatabaseConnectionsSetupFailed") == 1
    assert value(doc, "DatabaseConnectionsLost") == 1
    assert value(doc, "TransactionLeases") == 2
    assert value(doc, "TransactionLeaseHoldP50") == 12
    assert value(doc, "TransactionLeasesOpened") == 40
    assert value(doc, "TransactionLeasesIdleTimeout") == 3
    assert value(doc, "TransactionLeasesTimeout") == 1
    assert value(doc, "TransactionLeasesDeadline") == 2
    assert value(doc, "TransactionLeasesClientGone") == 1
    assert value(doc, "StreamedResults") == 3
    assert value(doc, "StreamedRows") == 5_000_000
    assert value(doc, "StreamedBytes") == 140_000_000
    assert value(doc, "DatabaseConnectionsBorrowLatency") == 600 / 120 * 1000
    assert value(doc, "QueryDatabaseResponseLatency") == 230 / 115 * 1000


def test_counters_report_the_change_since_the_previous_line() -> None:
    later = dict(STATS, rpcs_num=130, requests_num=140, requests_wait_ms=700, connections_lost=0)
    doc = emf_record(later, STATS)
    assert value(doc, "QueryRequests") == 12
    assert value(doc, "DatabaseConnectionsBorrowLatency") == 100 / 20 * 1000
    # A counter that went down was reset: it counts from zero again.
    assert value(doc, "DatabaseConnectionsLost") == 0
    assert value(doc, "ClientConnectionsWaiting") == 7  # gauges are not differenced


def test_latency_is_left_out_of_a_period_without_requests() -> None:
    doc = emf_record(STATS, STATS)
    assert "DatabaseConnectionsBorrowLatency" not in metric_names(doc)
    assert "QueryDatabaseResponseLatency" not in metric_names(doc)
    assert value(doc, "QueryRequests") == 0


def test_namespace_and_service_come_from_powertools_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("POWERTOOLS_METRICS_NAMESPACE", "pgbroker-staging")
    monkeypatch.setenv("POWERTOOLS_SERVICE_NAME", "billing")
    doc = emf_record(STATS)
    assert doc["_aws"]["CloudWatchMetrics"][0]["Namespace"] == "pgbroker-staging"
    assert doc["service"] == "billing"


TARGETS = {
    "target.primary.pool_size": 4, "target.primary.pool_active": 3,
    "target.primary.pool_max": 4, "target.primary.requests_waiting": 7,
    "target.replica1.pool_size": 2, "target.replica1.pool_active": 1,
    "target.replica1.pool_max": 4, "target.replica1.requests_waiting": 0,
    "target.replica1.replica_lag_ms": 250, "target.replica1.in_rotation": 1,
    "target.replica2.pool_size": 0, "target.replica2.pool_active": 0,
    "target.replica2.pool_max": 4, "target.replica2.requests_waiting": 0,
    "target.replica2.replica_lag_ms": 90_000, "target.replica2.in_rotation": 0,
}  # fmt: skip


def test_each_target_gets_a_line_with_the_target_dimension() -> None:
    out = io.StringIO()
    emit({**STATS, **TARGETS}, stream=out, service="orders-stack")
    docs = assert_valid_emf_lines(out.getvalue())
    # The service-only line comes first and is the same as without targets: the autoscaling
    # policy and the existing graphs keep reading it.
    assert dimensions(docs[0]) == [["service"]]
    assert metric_names(docs[0]) == METRIC_NAMES
    assert value(docs[0], "ClientConnectionsWaiting") == 7
    per_target = by_dimension(docs, "Target")
    assert list(per_target) == ["primary", "replica1", "replica2"]
    assert len(docs) == 4
    for doc in per_target.values():
        assert doc["service"] == "orders-stack"
        assert doc["_aws"]["CloudWatchMetrics"][0]["Namespace"] == "pgbroker"
        assert doc["_aws"]["Timestamp"] == docs[0]["_aws"]["Timestamp"]
    primary, replica1, replica2 = per_target.values()
    # The primary has no lag and no rotation: those metrics are left out, not sent as 0.
    assert metric_names(primary) == TARGET_METRIC_NAMES - {"ReplicaLag", "ReplicaInRotation"}
    assert metric_names(replica1) == metric_names(replica2) == TARGET_METRIC_NAMES
    assert value(primary, "DatabaseConnections") == 4
    assert value(primary, "DatabaseConnectionsCurrentlyBorrowed") == 3
    assert value(primary, "ClientConnectionsWaiting") == 7
    assert value(primary, "PoolUtilization") == 75.0
    assert value(replica1, "PoolUtilization") == 25.0
    assert value(replica1, "ReplicaLag") == 250
    assert value(replica1, "ReplicaInRotation") == 1
    assert value(replica2, "ReplicaLag") == 90_000
    assert value(replica2, "ReplicaInRotation") == 0
    assert value(replica2, "PoolUtilization") == 0.0
    units = {m["Name"]: m["Unit"] for m in replica1["_aws"]["CloudWatchMetrics"][0]["Metrics"]}
    assert units == {
        "DatabaseConnections": "Count",
        "DatabaseConnectionsCurrentlyBorrowed": "Count",
        "ClientConnectionsWaiting": "Count",
        "PoolUtilization": "Percent",
        "ReplicaLag": "Milliseconds",
        "ReplicaInRotation": "Count",
    }


def test_target_keys_without_a_known_figure_make_no_line() -> None:
    stats = {**STATS, "target.replica3.some_future_key": 1, "target.": 2, "target.x": 3}
    (doc,) = emf_records(stats)
    assert dimensions(doc) == [["service"]]
    # A target without pool_max (or with 0) has no utilization, its other figures still go.
    docs = emf_records({**STATS, "target.replica1.pool_active": 2, "target.replica1.pool_max": 0})
    assert [d.get("Target") for d in docs] == [None, "replica1"]
    assert metric_names(docs[1]) == {"DatabaseConnectionsCurrentlyBorrowed"}


def test_failures_by_reason_are_counted_since_the_previous_line() -> None:
    before = {**STATS, "rpcs_failed.QUEUE_FULL": 1}
    now = {**STATS, "rpcs_failed.QUEUE_FULL": 4, "rpcs_failed.DATABASE_ERROR": 2}
    stamp = int(time.time() * 1000) - 1000
    docs = emf_records(now, before, timestamp_ms=stamp)
    for doc in docs:
        assert_valid_emf(json.dumps(doc) + "\n")
        assert doc["_aws"]["Timestamp"] == stamp
    reasons = by_dimension(docs, "Reason")
    assert set(reasons) == {"QUEUE_FULL", "DATABASE_ERROR"}
    assert value(reasons["QUEUE_FULL"], "QueryRequestsFailed") == 3
    # A reason first seen in this period counts from zero.
    assert value(reasons["DATABASE_ERROR"], "QueryRequestsFailed") == 2
    # A reason with no new failure still reports 0, so its graph shows a quiet period.
    (quiet,) = by_dimension(emf_records(now, now), "Reason")["QUEUE_FULL"]["QueryRequestsFailed"]
    assert quiet == 0


def test_publisher_emits_periodically_and_a_last_line_on_stop() -> None:
    out = io.StringIO()
    stats = dict(STATS)

    async def scenario() -> MetricsPublisher:
        publisher = MetricsPublisher(lambda: stats, interval=0.02, stream=out).start()
        for _ in range(500):  # bounded poll: at most ~5 s
            if publisher.lines >= 2:
                break
            await asyncio.sleep(0.01)
        stats["rpcs_num"] += 5
        await publisher.stop()
        return publisher

    publisher = asyncio.run(scenario())
    lines = out.getvalue().splitlines(keepends=True)
    assert publisher.lines == len(lines) >= 3
    docs = [assert_valid_emf(line) for line in lines]
    assert value(docs[0], "QueryRequests") == 118
    assert value(docs[-1], "QueryRequests") == 5


def test_publisher_survives_a_failing_stats_source() -> None:
    out = io.StringIO()

    def broken() -> dict[str, int]:
        raise RuntimeError("stats unavailable")

    publisher = MetricsPublisher(broken, interval=60, stream=out)
    assert publisher.publish() is None
    assert out.getvalue() == "" and publisher.lines == 0


def test_emf_carries_the_figures_a_real_broker_reports_in_getstats(
    start_inproc_broker: Callable[..., InProcessBroker],
) -> None:
    broker = start_inproc_broker(pool_size=2)
    for _ in range(3):
        broker.execute(request("SELECT 1"))
    # Two failures of different kinds: one Postgres raises, one the broker refuses.
    with pytest.raises(grpc.RpcError) as raised:
        broker.execute(request("SELECT 1/0"))
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError) as raised:
        broker.execute(pb.ExecuteRequest())  # no statement
    assert status_of(raised.value).reason == "BAD_REQUEST"
    reply = broker.stub().GetStats(pb.GetStatsRequest(), timeout=10)
    stats = dict(reply.stats)
    out = io.StringIO()
    records = emit(stats, stream=out, service="replica-test")
    docs = assert_valid_emf_lines(out.getvalue())
    assert [d["_aws"]["Timestamp"] for d in docs] == [r["_aws"]["Timestamp"] for r in records]
    doc = docs[0]
    assert dimensions(doc) == [["service"]]
    assert stats["rpcs_num"] >= 5 and stats["transactions_num"] >= 3
    assert value(doc, "QueryRequests") == stats["rpcs_num"]
    assert value(doc, "Transactions") == stats["transactions_num"]
    assert value(doc, "QueryRequestsFailed") == stats["rpcs_failed"] == 2
    assert value(doc, "ClientConnectionsWaiting") == stats["requests_waiting"] == 0
    assert value(doc, "MaxDatabaseConnectionsAllowed") == stats["pool_max"] == 2
    assert value(doc, "DatabaseConnections") == stats["pool_size"]
    assert value(doc, "DatabaseConnectionsCurrentlyBorrowed") == stats["pool_active"] == 0
    # Failures by reason: the broker counted each, and each is a line with dimension Reason.
    assert stats["rpcs_failed.DATABASE_ERROR"] == stats["rpcs_failed.BAD_REQUEST"] == 1
    reasons = by_dimension(docs, "Reason")
    assert set(reasons) == {"DATABASE_ERROR", "BAD_REQUEST"}
    for doc in reasons.values():
        assert metric_names(doc) == {"QueryRequestsFailed"}
        assert value(doc, "QueryRequestsFailed") == 1
    # Per-target lines follow the target.<name>.* keys the broker reports (the primary's, and
    # each replica's, when the broker has them).
    per_target = by_dimension(docs, "Target")
    assert set(per_target) == {k.split(".")[1] for k in stats if k.startswith("target.")}
    for name, doc in per_target.items():
        assert value(doc, "DatabaseConnections") == stats[f"target.{name}.pool_size"]
        assert value(doc, "ClientConnectionsWaiting") == stats[f"target.{name}.requests_waiting"]
    assert len(docs) == 1 + len(reasons) + len(per_target)


@pytest.mark.skipif(
    "metrics_interval" not in {f.name for f in dataclasses.fields(Settings)},
    reason="the broker has no PGBROKER_METRICS_INTERVAL yet",
)
def test_running_broker_writes_emf_lines_and_a_last_one_on_sigterm(postgres: Any) -> None:
    dsn = postgres.dsn + ("&" if "?" in postgres.dsn else "?") + "sslmode=disable"
    env = dict(
        os.environ,
        PGBROKER_DATABASE_URL=dsn,
        PGBROKER_LISTEN="127.0.0.1:0",
        PGBROKER_POOL_SIZE="2",
        PGBROKER_METRICS_INTERVAL="0.2",
        POWERTOOLS_SERVICE_NAME="emf-test",
    )
    process = subprocess.Popen(
        [sys.executable, "-m", "broker", "run"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    lines: queue.Queue[str | None] = queue.Queue()
    stdout = process.stdout
    assert stdout is not None

    def pump() -> None:  # a reader thread, so every wait below has a timeout
        for line in stdout:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    emf: list[dict[str, Any]] = []
    periods = 0  # service-only lines, one per period (per-target lines come after each)
    try:
        deadline = time.monotonic() + 30
        while (line := lines.get(timeout=max(0.1, deadline - time.monotonic()))) is not None:
            if '"_aws"' in line:
                emf.append(assert_valid_emf(line))
                if dimensions(emf[-1]) == [["service"]]:
                    periods += 1
                    if periods == 2:
                        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
    service_only = [doc for doc in emf if dimensions(doc) == [["service"]]]
    assert len(service_only) >= 3  # two periods, then the last one written while draining
    for doc in emf:
        assert doc["service"] == "emf-test"
    for doc in service_only:
        assert value(doc, "MaxDatabaseConnectionsAllowed") == 2
