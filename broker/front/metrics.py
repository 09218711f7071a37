"""CloudWatch metrics as Embedded Metric Format (EMF) lines on stdout.

Every ``interval`` seconds `MetricsPublisher` reads the broker's figures (the dict `GetStats`
returns: psycopg_pool's names plus the broker's counters), turns them into CloudWatch metrics
and writes one EMF JSON line to stdout. On ECS the awslogs driver ships the line and CloudWatch
extracts the metrics: no agent, no ``PutMetricData`` permission, no network call from the broker.
The autoscaling policy in ``template.yaml`` tracks ``ClientConnectionsWaiting``.

Names follow RDS Proxy's metrics where one means the same thing, so an operator who watched a
proxy reads these without a legend:

==================================== ============ =========================================
metric                               unit         from GetStats
==================================== ============ =========================================
ClientConnectionsWaiting             Count        requests_waiting (gauge; pgbroker's own)
MaxWait                              Microseconds maxwait_us (gauge; PgBouncer's maxwait)
DatabaseConnections                  Count        pool_size (gauge)
DatabaseConnectionsCurrentlyBorrowed Count        pool_active (gauge)
MaxDatabaseConnectionsAllowed        Count        pool_max (gauge)
PoolUtilization                      Percent      pool_active / pool_max (gauge)
DatabaseConnectionsBorrowLatency     Microseconds requests_wait_ms / requests_num, this period
QueryDatabaseResponseLatency         Microseconds transactions_ms / transactions_num, this period
QueryRequests                        Count        rpcs_num, this period
QueryRequestsRejected                Count        rpcs_rejected, this period
QueryRequestsFailed                  Count        rpcs_failed, this period
Transactions                         Count        transactions_num, this period
TransactionErrors                    Count        transactions_errors, this period
DatabaseConnectionRequests           Count        connections_num, this period
DatabaseConnectionsSetupFailed       Count        connections_errors, this period
DatabaseConnectionsLost              Count        connections_lost, this period
TransactionLeases                    Count        leases_active (gauge; Transact, pgbroker's own)
TransactionLeaseHoldP50              Milliseconds leases_p50_ms (gauge: median of the last 1,000)
TransactionLeasesOpened              Count        leases_num, this period
TransactionLeasesIdleTimeout         Count        leases_ended_idle_transaction_timeout, period
TransactionLeasesTimeout             Count        leases_ended_transaction_timeout, this period
TransactionLeasesDeadline            Count        leases_ended_deadline, this period
TransactionLeasesClientGone          Count        leases_ended_client_gone, this period
StreamedResults                      Count        streams_num (Stream calls and tx.stream), period
StreamedRows                         Count        streams_rows, this period
StreamedBytes                        Bytes        streams_bytes (encoded rows), this period
==================================== ============ =========================================

Counters in `GetStats` run since start; a metric reports the change since the previous line (a
counter that went down was reset, and counts from zero). A latency with no request in the period
is left out rather than reported as 0, so it does not drag an average down. A figure missing
from the stats is left out. Namespace and the ``service`` dimension come from
``POWERTOOLS_METRICS_NAMESPACE`` (default ``pgbroker``) and ``POWERTOOLS_SERVICE_NAME``
(default ``pgbroker``; the template sets the stack name).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import sys
from collections.abc import Callable, Mapping
from typing import Any, TextIO

from aws_lambda_powertools.metrics import MetricUnit
from aws_lambda_powertools.metrics.provider.cloudwatch_emf.cloudwatch import (
    AmazonCloudWatchEMFProvider,
)

__all__ = ["DEFAULT_NAMESPACE", "METRIC_NAMES", "MetricsPublisher", "emf_record", "emit"]

log = logging.getLogger("pgbroker.metrics")

DEFAULT_NAMESPACE = "pgbroker"
DEFAULT_SERVICE = "pgbroker"

# metric name -> (unit, stats key): reported as they are now.
GAUGES: dict[str, tuple[MetricUnit, str]] = {
    "ClientConnectionsWaiting": (MetricUnit.Count, "requests_waiting"),
    "MaxWait": (MetricUnit.Microseconds, "maxwait_us"),
    "DatabaseConnections": (MetricUnit.Count, "pool_size"),
    "DatabaseConnectionsCurrentlyBorrowed": (MetricUnit.Count, "pool_active"),
    "MaxDatabaseConnectionsAllowed": (MetricUnit.Count, "pool_max"),
    "TransactionLeases": (MetricUnit.Count, "leases_active"),
    "TransactionLeaseHoldP50": (MetricUnit.Milliseconds, "leases_p50_ms"),
}
# metric name -> stats key: counters, reported as the change since the previous line.
COUNTERS: dict[str, str] = {
    "QueryRequests": "rpcs_num",
    "QueryRequestsRejected": "rpcs_rejected",
    "QueryRequestsFailed": "rpcs_failed",
    "Transactions": "transactions_num",
    "TransactionErrors": "transactions_errors",
    "DatabaseConnectionRequests": "connections_num",
    "DatabaseConnectionsSetupFailed": "connections_errors",
    "DatabaseConnectionsLost": "connections_lost",
    "TransactionLeasesOpened": "leases_num",
    "TransactionLeasesIdleTimeout": "leases_ended_idle_transaction_timeout",
    "TransactionLeasesTimeout": "leases_ended_transaction_timeout",
    "TransactionLeasesDeadline": "leases_ended_deadline",
    "TransactionLeasesClientGone": "leases_ended_client_gone",
    "StreamedResults": "streams_num",
    "StreamedRows": "streams_rows",
}
# metric name -> stats key: byte counters, reported as the change since the previous line.
BYTE_COUNTERS: dict[str, str] = {"StreamedBytes": "streams_bytes"}
# metric name -> (total ms counter, count counter): mean over the period, in microseconds.
LATENCIES: dict[str, tuple[str, str]] = {
    "DatabaseConnectionsBorrowLatency": ("requests_wait_ms", "requests_num"),
    "QueryDatabaseResponseLatency": ("transactions_ms", "transactions_num"),
}
METRIC_NAMES = frozenset([*GAUGES, *COUNTERS, *BYTE_COUNTERS, *LATENCIES, "PoolUtilization"])


def _delta(stats: Mapping[str, int], previous: Mapping[str, int] | None, key: str) -> int:
    now = int(stats[key])
    before = int(previous.get(key, 0)) if previous else 0
    return now - before if now >= before else now


def emf_record(
    stats: Mapping[str, int],
    previous: Mapping[str, int] | None = None,
    *,
    namespace: str | None = None,
    service: str | None = None,
    timestamp_ms: int | None = None,
) -> dict[str, Any]:
    """The EMF document for *stats* (a `GetStats` dict), counters taken since *previous*.

    Raise `aws_lambda_powertools.metrics.SchemaValidationError` if *stats* yields no metric.
    """
    emf = AmazonCloudWatchEMFProvider(
        namespace=namespace or os.environ.get("POWERTOOLS_METRICS_NAMESPACE") or DEFAULT_NAMESPACE,
        service=service or os.environ.get("POWERTOOLS_SERVICE_NAME") or DEFAULT_SERVICE,
    )
    for name, (unit, key) in GAUGES.items():
        if key in stats:
            emf.add_metric(name=name, unit=unit, value=int(stats[key]))
    if stats.get("pool_max", 0) > 0 and "pool_active" in stats:
        utilization = 100.0 * int(stats["pool_active"]) / int(stats["pool_max"])
        emf.add_metric(name="PoolUtilization", unit=MetricUnit.Percent, value=utilization)
    for name, key in COUNTERS.items():
        if key in stats:
            emf.add_metric(name=name, unit=MetricUnit.Count, value=_delta(stats, previous, key))
    for name, key in BYTE_COUNTERS.items():
        if key in stats:
            emf.add_metric(name=name, unit=MetricUnit.Bytes, value=_delta(stats, previous, key))
    for name, (total_key, count_key) in LATENCIES.items():
        if total_key in stats and count_key in stats:
            count = _delta(stats, previous, count_key)
            if count > 0:
                mean_us = 1000.0 * _delta(stats, previous, total_key) / count
                emf.add_metric(name=name, unit=MetricUnit.Microseconds, value=mean_us)
    if timestamp_ms is not None:
        emf.set_timestamp(timestamp_ms)
    return dict(emf.serialize_metric_set())


def emit(
    stats: Mapping[str, int],
    previous: Mapping[str, int] | None = None,
    *,
    stream: TextIO | None = None,
    namespace: str | None = None,
    service: str | None = None,
) -> dict[str, Any]:
    """Write the EMF line for *stats* to *stream* (default stdout) and return its document."""
    record = emf_record(stats, previous, namespace=namespace, service=service)
    out = stream or sys.stdout
    out.write(json.dumps(record, separators=(",", ":")) + "\n")
    out.flush()
    return record


class MetricsPublisher:
    """Emit one EMF line every *interval* seconds from *get_stats* while running.

    `start` begins the loop on the running event loop; `stop` ends it and writes a last line, so
    a draining replica reports what it did since the previous one. A failure to read or write
    is logged and the loop goes on: metrics never stop the broker.
    """

    def __init__(
        self,
        get_stats: Callable[[], Mapping[str, int]],
        interval: float = 60.0,
        *,
        stream: TextIO | None = None,
        namespace: str | None = None,
        service: str | None = None,
    ) -> None:
        if interval <= 0:
            raise ValueError("interval must be greater than 0")
        self.get_stats = get_stats
        self.interval = interval
        self.stream = stream
        self.namespace = namespace
        self.service = service
        self.lines = 0
        self._previous: dict[str, int] | None = None
        self._task: asyncio.Task[None] | None = None

    def publish(self) -> dict[str, Any] | None:
        """Emit one line now; return its document, or None if it failed (and was logged)."""
        try:
            stats = dict(self.get_stats())
            record = emit(
                stats,
                self._previous,
                stream=self.stream,
                namespace=self.namespace,
                service=self.service,
            )
        except Exception:
            log.exception("cannot publish metrics")
            return None
        self._previous = stats
        self.lines += 1
        return record

    def start(self) -> MetricsPublisher:
        """Start publishing on the running event loop; return self."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())
        return self

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            self.publish()

    async def stop(self) -> None:
        """Stop the loop and emit a last line with the figures since the previous one."""
        if self._task is None:
            return
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self._task = None
        self.publish()
