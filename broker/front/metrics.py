"""CloudWatch metrics as Embedded Metric Format (EMF) lines on stdout.

Every ``interval`` seconds `MetricsPublisher` reads the broker's figures (the dict `GetStats`
returns: psycopg_pool's names plus the broker's counters), turns them into CloudWatch metrics
and writes EMF JSON lines to stdout: one with the broker's metrics, plus one per pool target and
one per failure reason (below). On ECS the awslogs driver ships the lines and CloudWatch
extracts the metrics: no agent, no ``PutMetricData`` permission, no network call from the broker.
The autoscaling policy in ``template.yaml`` tracks ``ClientConnectionsWaiting`` (``service``
dimension only).

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

With per-target stats (``target.<name>.<key>``: ``primary``, ``replica1``, ...), each target
also gets its own line, the same namespace and ``service`` plus the dimension ``Target``:

==================================== ============ =========================================
metric (dimensions service, Target)  unit         from GetStats, target.<name>.…
==================================== ============ =========================================
ClientConnectionsWaiting             Count        requests_waiting (gauge)
DatabaseConnections                  Count        pool_size (gauge)
DatabaseConnectionsCurrentlyBorrowed Count        pool_active (gauge)
PoolUtilization                      Percent      pool_active / pool_max (gauge)
ReplicaLag                           Milliseconds replica_lag_ms (gauge; replicas only)
ReplicaInRotation                    Count        in_rotation (gauge, 0 or 1; replicas only)
==================================== ============ =========================================

Failed ``Execute`` calls are also counted by reason (``rpcs_failed.<REASON>``: the ErrorInfo
reason the caller got, ``DATABASE_ERROR`` for an error Postgres raised, else the gRPC code);
each reason seen since start gets a line with ``QueryRequestsFailed`` (Count, this period) and
the dimension ``Reason``, so the reasons add up to the ``service``-only ``QueryRequestsFailed``.

Counters in `GetStats` run since start; a metric reports the change since the previous line (a
counter that went down was reset, and counts from zero). A latency with no request in the period
is left out rather than reported as 0, so it does not drag an average down. A figure missing
from the stats is left out. Namespace and the ``service`` dimension come from
``POWERTOOLS_METRICS_NAMESPACE`` (default ``pgbroker``) and ``POWERTOOLS_SERVICE_NAME``
(default ``pgbroker``; the template sets the stack name). The autoscaling policy and the
dashboard in ``template.yaml`` read these names (tests/deploy/ checks both against this module).

Each line is built by Powertools' `EphemeralMetrics` (the EMF schema, units, dimensions and its
limits). Not its `Metrics`: that class keeps its metrics in class attributes, shared by every
instance in the process, so two publishers (two brokers in one test process) would mix their
figures. Nor its ``flush_metrics``: it ``print``s to ``sys.stdout`` (the line and its newline
in two writes, which a log line from another thread can split), and writes nothing at all when
``POWERTOOLS_DEV`` is set, which a developer sets for readable logs. So `emit` writes a
period's lines itself, in one write to a stream it is given.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import sys
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, TextIO

from aws_lambda_powertools.metrics import EphemeralMetrics, MetricUnit

from broker.front.siblings import combine

__all__ = [
    "DEFAULT_NAMESPACE",
    "METRIC_NAMES",
    "MetricsPublisher",
    "emf_record",
    "emf_records",
    "emit",
    "targets",
]

log = logging.getLogger("pgbroker.metrics")

DEFAULT_NAMESPACE = "pgbroker"
# Seconds worker 0's publisher waits for every worker to answer before its first period.
WORKERS_START_WAIT = 60.0
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
# The metrics with only the ``service`` dimension (fewer than EMF's 100 per line).
METRIC_NAMES = frozenset([*GAUGES, *COUNTERS, *BYTE_COUNTERS, *LATENCIES, "PoolUtilization"])

# Per-target stats: ``target.<name>.<key>``; metric name -> (unit, key), dimension Target.
TARGET_PREFIX = "target."
TARGET_GAUGES: dict[str, tuple[MetricUnit, str]] = {
    "ClientConnectionsWaiting": (MetricUnit.Count, "requests_waiting"),
    "DatabaseConnections": (MetricUnit.Count, "pool_size"),
    "DatabaseConnectionsCurrentlyBorrowed": (MetricUnit.Count, "pool_active"),
    "ReplicaLag": (MetricUnit.Milliseconds, "replica_lag_ms"),
    "ReplicaInRotation": (MetricUnit.Count, "in_rotation"),
}
TARGET_METRIC_NAMES = frozenset([*TARGET_GAUGES, "PoolUtilization"])
# Failed calls by reason: ``rpcs_failed.<REASON>`` counters, metric below, dimension Reason.
FAILED_PREFIX = "rpcs_failed."
FAILED_BY_REASON = "QueryRequestsFailed"


def _delta(stats: Mapping[str, int], previous: Mapping[str, int] | None, key: str) -> int:
    now = int(stats[key])
    before = int(previous.get(key, 0)) if previous else 0
    return now - before if now >= before else now


def _line(
    namespace: str | None, service: str | None, timestamp_ms: int | None = None
) -> EphemeralMetrics:
    """An empty EMF document: namespace and ``service`` from the arguments or Powertools'
    environment variables, else pgbroker's defaults; timestamped now unless given one."""
    service = service or os.environ.get("POWERTOOLS_SERVICE_NAME") or DEFAULT_SERVICE
    emf = EphemeralMetrics(
        namespace=namespace or os.environ.get("POWERTOOLS_METRICS_NAMESPACE") or DEFAULT_NAMESPACE,
        service=service,
    )
    # Now rather than at serialization, so ``service`` leads every dimension set.
    emf.add_dimension(name="service", value=service)
    if timestamp_ms is not None:
        emf.set_timestamp(timestamp_ms)
    return emf


def _add_utilization(emf: EphemeralMetrics, stats: Mapping[str, int]) -> None:
    if int(stats.get("pool_max", 0)) > 0 and "pool_active" in stats:
        utilization = 100.0 * int(stats["pool_active"]) / int(stats["pool_max"])
        emf.add_metric(name="PoolUtilization", unit=MetricUnit.Percent, value=utilization)


def _fill_service(
    emf: EphemeralMetrics, stats: Mapping[str, int], previous: Mapping[str, int] | None
) -> None:
    """The ``service``-only metrics (the first table of the module docstring)."""
    for name, (unit, key) in GAUGES.items():
        if key in stats:
            emf.add_metric(name=name, unit=unit, value=int(stats[key]))
    _add_utilization(emf, stats)
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


def emf_record(
    stats: Mapping[str, int],
    previous: Mapping[str, int] | None = None,
    *,
    namespace: str | None = None,
    service: str | None = None,
    timestamp_ms: int | None = None,
) -> dict[str, Any]:
    """The ``service``-only EMF document for *stats* (a `GetStats` dict), counters taken since
    *previous*.

    Raise `aws_lambda_powertools.metrics.SchemaValidationError` if *stats* yields no metric.
    """
    emf = _line(namespace, service, timestamp_ms)
    _fill_service(emf, stats, previous)
    return dict(emf.serialize_metric_set())


def targets(stats: Mapping[str, int]) -> dict[str, dict[str, int]]:
    """The per-target figures in *stats*: ``{"replica1": {"pool_size": 4, ...}, ...}`` from
    its ``target.<name>.<key>`` entries, targets in the order they first appear."""
    found: dict[str, dict[str, int]] = {}
    for full_key, figure in stats.items():
        if full_key.startswith(TARGET_PREFIX):
            name, _, key = full_key[len(TARGET_PREFIX) :].partition(".")
            if name and key:
                found.setdefault(name, {})[key] = int(figure)
    return found


def _target_record(
    name: str, figures: Mapping[str, int], emf: EphemeralMetrics
) -> dict[str, Any] | None:
    """The document of one target (dimension Target), or None if it has no figure we know."""
    emf.add_dimension(name="Target", value=name)
    for metric, (unit, key) in TARGET_GAUGES.items():
        if key in figures:
            emf.add_metric(name=metric, unit=unit, value=figures[key])
    _add_utilization(emf, figures)
    return dict(emf.serialize_metric_set()) if emf.metric_set else None


def _reason_record(reason: str, failed: int, emf: EphemeralMetrics) -> dict[str, Any]:
    emf.add_dimension(name="Reason", value=reason)
    emf.add_metric(name=FAILED_BY_REASON, unit=MetricUnit.Count, value=failed)
    return dict(emf.serialize_metric_set())


def emf_records(
    stats: Mapping[str, int],
    previous: Mapping[str, int] | None = None,
    *,
    namespace: str | None = None,
    service: str | None = None,
    timestamp_ms: int | None = None,
) -> list[dict[str, Any]]:
    """Every EMF document for one period: the ``service``-only one (`emf_record`), then one
    per target (dimension Target), then one per failure reason seen (dimension Reason), all
    with one timestamp. A Target or Reason is a dimension value, a member of the document's
    root, so each value needs its own document."""
    stamp = timestamp_ms if timestamp_ms is not None else int(time.time() * 1000)
    records = [
        emf_record(stats, previous, namespace=namespace, service=service, timestamp_ms=stamp)
    ]
    for name, figures in targets(stats).items():
        if (record := _target_record(name, figures, _line(namespace, service, stamp))) is not None:
            records.append(record)
    for key in stats:
        if key.startswith(FAILED_PREFIX) and len(key) > len(FAILED_PREFIX):
            failed = _delta(stats, previous, key)
            emf = _line(namespace, service, stamp)
            records.append(_reason_record(key[len(FAILED_PREFIX) :], failed, emf))
    return records


def emit(
    stats: Mapping[str, int],
    previous: Mapping[str, int] | None = None,
    *,
    stream: TextIO | None = None,
    namespace: str | None = None,
    service: str | None = None,
) -> list[dict[str, Any]]:
    """Write the EMF lines for *stats* to *stream* (default stdout), in one write, and return
    their documents (the ``service``-only one first)."""
    records = emf_records(stats, previous, namespace=namespace, service=service)
    out = stream or sys.stdout
    out.write("".join(json.dumps(r, separators=(",", ":")) + "\n" for r in records))
    out.flush()
    return records


class MetricsPublisher:
    """Emit one period's EMF lines every *interval* seconds from *get_stats* while running
    (`lines` counts the lines written).

    With ``--workers N``, *collect* gives each worker's figures (broker/front/siblings.py) and
    one publisher reports their sum. A counter's change is then taken worker by worker (by
    ``worker_pid``): a restarted worker counts from zero, and a worker that missed a period
    reports its change since the last period it answered, so neither shows up as a spike or a
    gap. The figures at `start` are the baseline, so a restarted worker 0 does not report the
    others' counts since their start again; the first period waits (up to
    `WORKERS_START_WAIT` seconds) until all *workers* answer, so it does not report a task
    that is still starting as a smaller one.

    `start` begins the loop on the running event loop; `stop` ends it and writes a last period,
    so a draining replica reports what it did since the previous one. A failure to read or write
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
        collect: Callable[[], Awaitable[list[dict[str, int]]]] | None = None,
        workers: int = 1,
    ) -> None:
        if interval <= 0:
            raise ValueError("interval must be greater than 0")
        self.get_stats = get_stats
        self.collect = collect
        self.workers = workers
        self.interval = interval
        self.stream = stream
        self.namespace = namespace
        self.service = service
        self.lines = 0
        # Each worker's figures at the previous period, by worker_pid (0: a single process).
        self._previous: dict[int, dict[str, int]] | None = None
        self._task: asyncio.Task[None] | None = None

    def publish(
        self, parts: Sequence[Mapping[str, int]] | None = None
    ) -> list[dict[str, Any]] | None:
        """Emit one period's lines now, from each worker's figures (*parts*; default: this
        process's); return their documents (the ``service``-only one first), or None if it
        failed (and was logged)."""
        try:
            now = [dict(part) for part in parts] if parts else [dict(self.get_stats())]
            stats = combine(now) if len(now) > 1 else now[0]
            records = emit(
                stats,
                self._baseline(now),
                stream=self.stream,
                namespace=self.namespace,
                service=self.service,
            )
        except Exception:
            log.exception("cannot publish metrics")
            return None
        self._remember(now)
        self.lines += len(records)
        return records

    def _remember(self, now: list[dict[str, int]]) -> None:
        """Keep *now* as the previous period's figures; a worker that did not answer keeps
        its older ones, until another process answers as that worker (it was restarted)."""
        previous = self._previous or {}
        replaced = {part.get("worker") for part in now}
        kept = {
            pid: part
            for pid, part in previous.items()
            if "worker" in part and part["worker"] not in replaced
        }
        self._previous = {**kept, **_by_worker(now)}

    def _baseline(self, now: list[dict[str, int]]) -> dict[str, int] | None:
        """What the counters of *now*'s workers were at the previous period (a worker not
        seen then: zero)."""
        if self._previous is None:
            return None
        before = [self._previous.get(_worker_pid(part), {}) for part in now]
        return combine(before) if len(before) > 1 else before[0]

    async def _baseline_at_start(
        self, collect: Callable[[], Awaitable[list[dict[str, int]]]]
    ) -> None:
        deadline = time.monotonic() + WORKERS_START_WAIT
        while True:
            with contextlib.suppress(Exception):
                parts = await collect()
                self._previous = _by_worker(parts)
                if len(parts) >= self.workers:
                    return
            if time.monotonic() > deadline:
                return
            await asyncio.sleep(0.1)

    async def _collect_and_publish(self) -> None:
        parts = None
        if self.collect is not None:
            try:
                parts = await self.collect()
            except Exception:
                log.exception("cannot collect the workers' figures")
                return
        self.publish(parts)

    def start(self) -> MetricsPublisher:
        """Start publishing on the running event loop; return self."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())
        return self

    async def _run(self) -> None:
        if self.collect is not None:
            await self._baseline_at_start(self.collect)
        while True:
            await asyncio.sleep(self.interval)
            await self._collect_and_publish()

    async def stop(self) -> None:
        """Stop the loop and emit a last period with the figures since the previous one."""
        if self._task is None:
            return
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self._task = None
        await self._collect_and_publish()


def _worker_pid(stats: Mapping[str, int]) -> int:
    return int(stats.get("worker_pid", 0))


def _by_worker(parts: Sequence[Mapping[str, int]]) -> dict[int, dict[str, int]]:
    return {_worker_pid(part): dict(part) for part in parts}
