"""The CloudWatch dashboard in template.yaml plots only metrics the broker emits.

The dashboard body is JSON text in the template, so nothing at deploy time checks that a
metric name, a dimension or the namespace matches what broker/front/metrics.py writes: a
graph of a metric that does not exist is simply empty. These tests evaluate the template (as
tests/deploy/test_template.py does), parse the body, collect every metric it names (plain
metric rows and SEARCH expressions) and compare each with the EMF lines the metrics module
actually produces from a `GetStats` dict holding every figure it knows, per-target and
per-reason ones included. The autoscaling policy's metric gets the same check.
"""

from __future__ import annotations

import dataclasses
import io
import json
import re
from typing import Any

import pytest

from broker.front import metrics
from tests.deploy.test_template import BASE_PARAMS, SECRET_ARN, Stack, Token, load_template

# The figures the dashboard must cover (issue 16): waiting callers, pool use per target,
# failures by reason, replica lag, lease hold time.
REQUIRED = {
    ("ClientConnectionsWaiting", frozenset({"service"})),
    ("PoolUtilization", frozenset({"service", "Target"})),
    ("QueryRequestsFailed", frozenset({"service", "Reason"})),
    ("ReplicaLag", frozenset({"service", "Target"})),
    ("TransactionLeaseHoldP50", frozenset({"service"})),
}
# Per-period counts: across broker replicas they add up, so the dashboard sums them.
COUNTS = {*metrics.COUNTERS, *metrics.BYTE_COUNTERS}
SEARCH = re.compile(r"SEARCH\('\{([^}]*)\}((?:[^'\\]|\\.)*)',\s*'(\w+)'(?:,\s*(\d+))?\)")
TERM = re.compile(r'(\w+)="([^"]*)"')


@dataclasses.dataclass(frozen=True)
class Plotted:
    """One metric a widget plots (a SEARCH stands for every metric it can match)."""

    widget: str
    namespace: str
    name: str
    dimensions: tuple[tuple[str, str], ...]  # (name, value); a SEARCH's values are "*" but service
    stat: str

    @property
    def key(self) -> tuple[str, frozenset[str]]:
        return self.name, frozenset(d for d, _ in self.dimensions)


def full_stats() -> dict[str, int]:
    """A GetStats dict with every figure the metrics module reads, two targets and a reason."""
    stats = {key: 10 for _, key in metrics.GAUGES.values()}
    stats |= {key: 10 for key in [*metrics.COUNTERS.values(), *metrics.BYTE_COUNTERS.values()]}
    stats |= {key: 10 for pair in metrics.LATENCIES.values() for key in pair}
    stats |= {"pool_max": 20}
    for target in ("primary", "replica1"):
        stats |= {f"target.{target}.{key}": 1 for _, key in metrics.TARGET_GAUGES.values()}
        stats[f"target.{target}.pool_max"] = 4
    stats["rpcs_failed.QUEUE_FULL"] = 3
    return stats


def emitted(namespace: str, service: str) -> set[tuple[str, str, frozenset[str]]]:
    """(namespace, metric, dimension names) of every metric in the broker's EMF lines."""
    found = set()
    for doc in metrics.emf_records(full_stats(), namespace=namespace, service=service):
        for directive in doc["_aws"]["CloudWatchMetrics"]:
            for dimension_set in directive["Dimensions"]:
                assert doc["service"] == service
                for metric in directive["Metrics"]:
                    found.add((directive["Namespace"], metric["Name"], frozenset(dimension_set)))
    return found


def plotted(widget: dict[str, Any]) -> list[Plotted]:
    """Every metric a metric widget names: plain rows (``"."`` repeats the row above) and the
    metrics a SEARCH expression selects (its schema and its ``Name="value"`` terms)."""
    props = widget["properties"]
    title = props["title"]
    found: list[Plotted] = []
    previous: list[Any] = []
    for row in props["metrics"]:
        options = row[-1] if isinstance(row[-1], dict) else {}
        if isinstance(row[0], dict):
            expression = row[0]["expression"]
            match = SEARCH.fullmatch(expression)
            assert match, f"{title}: only SEARCH expressions are checked, not {expression!r}"
            namespace, *names = (p.strip() for p in match.group(1).split(","))
            terms = dict(TERM.findall(match.group(2)))
            assert set(terms) <= {"MetricName", *names}, f"{title}: {expression}"
            dims = tuple((n, terms.get(n, "*")) for n in names)
            found.append(Plotted(title, namespace, terms["MetricName"], dims, match.group(3)))
            continue
        fields = [f for f in row if not isinstance(f, dict)]
        fields = [previous[i] if f == "." else f for i, f in enumerate(fields)]
        previous = fields
        namespace, name, *pairs = fields
        assert len(pairs) % 2 == 0, f"{title}: {row}"
        dims = tuple(zip(pairs[::2], pairs[1::2], strict=True))
        stat = options.get("stat", props.get("stat", "Average"))
        found.append(Plotted(title, namespace, name, dims, stat))
    return found


@pytest.fixture(scope="module")
def stack() -> Stack:
    return Stack(load_template(), **BASE_PARAMS, DatabaseSecretArn=SECRET_ARN)


@pytest.fixture(scope="module")
def dashboard(stack: Stack) -> dict[str, Any]:
    _, props = stack.one("AWS::CloudWatch::Dashboard")
    assert "pgbroker-test" in props["DashboardName"]  # one per stack
    body = json.loads(props["DashboardBody"])
    assert isinstance(body, dict)
    return body


@pytest.fixture(scope="module")
def all_plotted(dashboard: dict[str, Any]) -> list[Plotted]:
    found = [p for w in dashboard["widgets"] if w["type"] == "metric" for p in plotted(w)]
    assert found
    return found


def test_dashboard_plots_only_metrics_the_broker_emits(
    stack: Stack, all_plotted: list[Plotted]
) -> None:
    env = stack.broker_env()
    namespace, service = env["POWERTOOLS_METRICS_NAMESPACE"], env["POWERTOOLS_SERVICE_NAME"]
    broker = emitted(namespace, service)
    ours = [p for p in all_plotted if p.namespace != "AWS/ECS"]
    for p in ours:
        assert p.namespace == namespace, p
        assert (p.namespace, *p.key) in broker, f"the broker emits no {p.key} ({p.widget})"
        assert dict(p.dimensions)["service"] == service, p
    assert {p.key for p in ours} >= REQUIRED


def test_dashboard_sums_counts_and_never_sums_gauges(all_plotted: list[Plotted]) -> None:
    for p in all_plotted:
        if p.namespace == "AWS/ECS":
            continue
        if p.name in COUNTS:
            assert p.stat == "Sum", f"{p.name} is a count per period: sum it ({p.widget})"
        else:  # a gauge sampled once per period per replica: a sum would depend on both
            assert p.stat in {"Average", "Maximum", "Minimum"}, p


def test_dashboard_cpu_graph_is_the_stacks_broker_service(all_plotted: list[Plotted]) -> None:
    ecs = [p for p in all_plotted if p.namespace == "AWS/ECS"]
    assert {p.name for p in ecs} == {"CPUUtilization", "MemoryUtilization"}
    for p in ecs:
        assert dict(p.dimensions) == {
            "ClusterName": str(Token("BrokerCluster")),
            "ServiceName": str(Token("BrokerService", "Name")),
        }


def test_dashboard_widgets_fit_the_grid_without_overlap(dashboard: dict[str, Any]) -> None:
    cells: dict[tuple[int, int], str] = {}
    for widget in dashboard["widgets"]:
        x, y, w, h = (int(widget[k]) for k in ("x", "y", "width", "height"))
        assert x >= 0 and x + w <= 24 and y >= 0 and h > 0, widget
        name = widget["properties"].get("title", widget["type"])
        for cell in ((i, j) for i in range(x, x + w) for j in range(y, y + h)):
            assert cell not in cells, f"{name} overlaps {cells[cell]}"
            cells[cell] = name
        if widget["type"] == "metric":
            assert widget["properties"]["region"] == "us-east-1"


def test_dashboard_url_output_opens_this_dashboard(stack: Stack) -> None:
    name, _ = stack.one("AWS::CloudWatch::Dashboard")
    url = stack.resolve(stack.template["Outputs"]["DashboardUrl"]["Value"])
    assert url.startswith(
        "https://us-east-1.console.aws.amazon.com/cloudwatch/home?region=us-east-1"
    )
    assert url.endswith(f"#dashboards/dashboard/{Token(name)}")


def test_autoscaling_tracks_a_metric_the_broker_emits_with_those_dimensions(stack: Stack) -> None:
    (policy,) = [
        r["Properties"]["TargetTrackingScalingPolicyConfiguration"]
        for r in stack.of_type("AWS::ApplicationAutoScaling::ScalingPolicy").values()
        if "CustomizedMetricSpecification"
        in r["Properties"]["TargetTrackingScalingPolicyConfiguration"]
    ]
    spec = policy["CustomizedMetricSpecification"]
    env = stack.broker_env()
    names = frozenset(d["Name"] for d in spec["Dimensions"])
    broker = emitted(env["POWERTOOLS_METRICS_NAMESPACE"], env["POWERTOOLS_SERVICE_NAME"])
    # Exactly these dimensions: a metric is its name plus its whole dimension set, so the
    # per-target ClientConnectionsWaiting (service, Target) would not match this policy.
    assert (spec["Namespace"], spec["MetricName"], names) in broker
    assert names == {"service"}
    assert spec["Dimensions"] == [{"Name": "service", "Value": env["POWERTOOLS_SERVICE_NAME"]}]


LAG_SEARCH = (
    """SEARCH('{pgbroker,Target,service} MetricName="ReplicaLag" service="s"', 'Maximum', 60)"""
)


def test_a_metric_the_broker_does_not_emit_is_caught() -> None:
    """The checks above can fail: a misspelt name or a dimension the broker never adds."""
    broker = emitted("pgbroker", "s")
    for wrong in [
        ("pgbroker", "PoolUtilisation", frozenset({"service", "Target"})),
        ("pgbroker", "ReplicaLag", frozenset({"service"})),
        ("pgbroker", "TransactionLeaseHoldP50", frozenset({"service", "Target"})),
        ("pgbroker", "QueryRequestsFailed", frozenset({"service", "Target"})),
    ]:
        assert wrong not in broker
    widget = {
        "properties": {
            "title": "t",
            "metrics": [
                [{"expression": LAG_SEARCH, "id": "a"}],
                ["pgbroker", "QueryRequests", "service", "s", {"stat": "Sum"}],
                [".", "QueryRequestsFailed", ".", ".", {"stat": "Sum"}],
            ],
        }
    }  # fmt: skip
    lag, calls, failed = plotted(widget)
    assert lag.key == ("ReplicaLag", frozenset({"Target", "service"})) and lag.stat == "Maximum"
    assert dict(lag.dimensions) == {"Target": "*", "service": "s"}
    assert calls.key == ("QueryRequests", frozenset({"service"}))
    assert failed.key == ("QueryRequestsFailed", frozenset({"service"}))
    assert dict(failed.dimensions) == {"service": "s"}


def _metrics_of(docs: list[dict[str, Any]]) -> set[tuple[str, str, frozenset[str]]]:
    return {
        (directive["Namespace"], metric["Name"], frozenset(dimension_set))
        for doc in docs
        for directive in doc["_aws"]["CloudWatchMetrics"]
        for dimension_set in directive["Dimensions"]
        for metric in directive["Metrics"]
    }


def test_a_task_with_two_workers_publishes_what_one_process_does_for_the_whole_task() -> None:
    """With PGBROKER_WORKERS=2, worker 0 publishes once per period for both workers: the same
    metrics and dimensions as a single process (so every check above holds), with the task's
    sums, so the dashboard's and the autoscaling's "per broker task" stays per task."""
    parts = [
        {**full_stats(), "worker": index, "worker_pid": 100 + index, "workers": 2}
        for index in (0, 1)
    ]
    publisher = metrics.MetricsPublisher(dict, 60, stream=io.StringIO(), namespace="ns")
    docs = publisher.publish(parts)
    assert docs is not None
    assert _metrics_of(docs) == _metrics_of(metrics.emf_records(full_stats(), namespace="ns"))
    service_line = docs[0]
    assert service_line["ClientConnectionsWaiting"] == [2 * full_stats()["requests_waiting"]]
    assert service_line["QueryRequests"] == [2 * full_stats()["rpcs_num"]]
