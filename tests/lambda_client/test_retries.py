"""Which failures the client resends, against a scripted stand-in broker (a real gRPC server).

The real broker cannot be made to answer UNKNOWN or a bare transport UNAVAILABLE on demand;
the stand-in answers exactly the rich statuses the broker's contract defines.
"""

from __future__ import annotations

from typing import Any

import grpc
import pytest

import lambda_client as lc
from devtools.lambda_context import FakeLambdaContext
from tests.lambda_client.standin import bare, failure, standin
from tests.support import wait_until

SC = grpc.StatusCode


def fast_client(target: str, **kwargs: Any) -> lc.BrokerClient:
    return lc.BrokerClient(target, timeout=10, initial_backoff=0.01, max_backoff=0.02, **kwargs)


def test_queue_full_is_retried_honouring_retry_info_then_succeeds() -> None:
    full = failure(SC.RESOURCE_EXHAUSTED, "queue full", retry_after=0.05, reason="QUEUE_FULL")
    with standin(full, full) as (target, script):
        result = fast_client(target).query("SELECT 1")
    assert result.scalar() == 1
    assert len(script.requests) == 3


def test_retries_stop_after_max_attempts_and_raise_overloaded() -> None:
    full = failure(SC.RESOURCE_EXHAUSTED, "queue full", retry_after=0.01, reason="QUEUE_FULL")
    with standin(*[full] * 5) as (target, script), pytest.raises(lc.Overloaded) as info:
        fast_client(target, max_attempts=3).query("SELECT 1")
    assert len(script.requests) == 3
    assert info.value.reason == "QUEUE_FULL"
    assert info.value.retry_after == pytest.approx(0.01)
    assert isinstance(info.value.__cause__, grpc.RpcError)


def test_retry_that_would_outlive_the_deadline_is_not_made() -> None:
    slow = failure(SC.RESOURCE_EXHAUSTED, "queue full", retry_after=5.0, reason="QUEUE_FULL")
    with standin(slow) as (target, script), pytest.raises(lc.Overloaded):
        fast_client(target).query("SELECT 1", timeout=1.0)
    assert len(script.requests) == 1


@pytest.mark.parametrize(
    ("status", "error"),
    [
        (bare(SC.UNKNOWN, "connection lost during COMMIT"), lc.OutcomeUnknown),
        (
            failure(SC.UNKNOWN, "terminating", sqlstate="57P01", reason="CONNECTION_LOST"),
            lc.OutcomeUnknown,
        ),
        (failure(SC.ABORTED, "could not serialize", sqlstate="40001"), lc.SerializationFailure),
        (failure(SC.ABORTED, "deadlock detected", sqlstate="40P01"), lc.DeadlockDetected),
        (failure(SC.DEADLINE_EXCEEDED, "canceling statement", sqlstate="57014"), lc.QueryCanceled),
        (bare(SC.CANCELLED, "cancelled"), lc.Cancelled),
        # A transport failure after the request went out (a broker killed mid-call): the
        # outcome is unknown, never "Unavailable", whose meaning is that nothing ran.
        (bare(SC.UNAVAILABLE, "Socket closed"), lc.OutcomeUnknown),
        (failure(SC.INVALID_ARGUMENT, "duplicate key", sqlstate="23505"), lc.IntegrityError),
    ],
)
def test_failures_that_may_have_run_are_not_retried_without_a_key(
    status: object, error: type[lc.BrokerError]
) -> None:
    with standin(status) as (target, script), pytest.raises(error):  # type: ignore[arg-type]
        fast_client(target, idempotency=False).transaction(["SELECT 1", "SELECT 2"])
    assert len(script.requests) == 1
    assert not script.requests[0].idempotency_key


@pytest.mark.parametrize(
    "status",
    [
        bare(SC.UNKNOWN, "Stream removed"),
        failure(SC.UNKNOWN, "terminating", sqlstate="57P01", reason="CONNECTION_LOST"),
        bare(SC.UNAVAILABLE, "Socket closed"),
        failure(SC.ABORTED, "in progress", retry_after=0.01, reason="IDEMPOTENCY_KEY_IN_PROGRESS"),
    ],
    ids=["stream-removed", "lost-at-commit", "socket-closed", "in-progress"],
)
def test_an_unknown_outcome_is_resent_with_the_same_key(status: object) -> None:
    with standin(status, status) as (target, script):  # type: ignore[arg-type]
        results = fast_client(target).transaction(["INSERT 1", "INSERT 2"])
    assert results[0].scalar() == 1
    keys = [r.idempotency_key for r in script.requests]
    assert len(keys) == 3 and keys[0].startswith("pgbroker-") and len(set(keys)) == 1


def test_each_logical_call_gets_its_own_key_and_a_given_key_is_sent() -> None:
    with standin() as (target, script):
        db = fast_client(target)
        db.query("INSERT 1")
        db.query("INSERT 1")
        db.transaction(["INSERT 1"], idempotency_key="sqs-msg-1:charge")
        db.transaction(["SELECT 1"], read_only=True)  # read-only work is exempt
    keys = [r.idempotency_key for r in script.requests]
    assert keys[0] != keys[1] and keys[2] == "sqs-msg-1:charge" and keys[3] == ""


def test_an_unknown_outcome_with_a_key_is_outcome_unknown_once_attempts_run_out() -> None:
    lost = bare(SC.UNAVAILABLE, "Socket closed")
    with standin(lost, lost, lost) as (target, script), pytest.raises(lc.OutcomeUnknown) as info:
        fast_client(target, max_attempts=3).query("INSERT 1", idempotency_key="k-1")
    assert len(script.requests) == 3
    assert "resending with the same key is safe" in str(info.value)


def test_without_a_key_store_the_generated_key_is_dropped_once() -> None:
    no_store = failure(SC.FAILED_PRECONDITION, "no store", reason="IDEMPOTENCY_UNAVAILABLE")
    with standin(no_store) as (target, script):
        db = fast_client(target)
        assert db.query("INSERT 1").scalar() == 1
        db.query("INSERT 2")
    keys = [r.idempotency_key for r in script.requests]
    assert keys[0] and keys[1:] == ["", ""]


@pytest.mark.parametrize("sqlstate", ["40001", "40P01"])
def test_rolled_back_transaction_is_resent_only_with_retry_serialization(sqlstate: str) -> None:
    aborted = failure(SC.ABORTED, "rolled back", sqlstate=sqlstate, retry_after=0.01)
    with standin(aborted) as (target, script):
        results = fast_client(target).transaction(["SELECT 1"], retry_serialization=True)
    assert results[0].scalar() == 1
    assert len(script.requests) == 2


def test_unavailable_the_broker_reports_before_begin_is_retried() -> None:
    down = failure(
        SC.UNAVAILABLE, "database unreachable", retry_after=0.01, reason="POOL_UNAVAILABLE"
    )
    shutting = failure(SC.UNAVAILABLE, "shutting down", reason="SHUTTING_DOWN")
    lost = failure(SC.UNAVAILABLE, "connection lost", sqlstate="08006", retry_after=0.01)
    with standin(down, shutting, lost) as (target, script):
        assert fast_client(target).query("SELECT 1").scalar() == 1
    assert len(script.requests) == 4


def test_database_error_keeps_every_detail() -> None:
    bad = failure(
        SC.INVALID_ARGUMENT, 'relation "nope" does not exist', sqlstate="42P01", statement_index=1
    )
    with standin(bad) as (target, _), pytest.raises(lc.ProgrammingError) as info:
        fast_client(target).transaction(["SELECT 1", "SELECT * FROM nope"])
    err = info.value
    assert (err.code, err.sqlstate, err.statement_index) == (SC.INVALID_ARGUMENT, "42P01", 1)
    assert (err.detail, err.hint) == ("the detail", "the hint")
    assert err.details == 'relation "nope" does not exist'
    assert isinstance(err, lc.DatabaseError)
    assert "42P01" in str(err)


def test_lambda_request_id_and_function_name_travel_as_metadata() -> None:
    context = FakeLambdaContext(remaining=5, function_name="orders-api")
    with standin() as (target, script):
        fast_client(target, correlation_id=lambda: "corr-1").query("SELECT 1", context=context)
    seen = script.metadata[0]
    assert seen["x-lambda-request-id"] == context.aws_request_id
    assert seen["x-lambda-function-name"] == "orders-api"
    assert seen["x-correlation-id"] == "corr-1"


def test_auth_hook_metadata_is_sent_on_every_attempt() -> None:
    calls = []

    def auth() -> list[tuple[str, str]]:
        calls.append(1)
        return [("authorization", f"Bearer token-{len(calls)}")]

    full = failure(SC.RESOURCE_EXHAUSTED, "queue full", retry_after=0.01, reason="QUEUE_FULL")
    with standin(full) as (target, script):
        fast_client(target, auth=auth).query("SELECT 1")
    assert [m["authorization"] for m in script.metadata] == ["Bearer token-1", "Bearer token-2"]


def test_context_with_no_time_left_fails_without_sending() -> None:
    with standin() as (target, script):
        client = fast_client(target, deadline_margin=0.5)
        with pytest.raises(lc.DeadlineExceeded):
            client.query("SELECT 1", context=FakeLambdaContext(remaining=0.4))
    assert script.requests == []
    assert client.channels_created == 0


def test_powertools_logger_correlation_id_travels_as_metadata() -> None:
    from aws_lambda_powertools import Logger

    logger = Logger(service="orders")
    logger.set_correlation_id("corr-from-powertools")
    with standin() as (target, script):
        fast_client(target, correlation_id=logger.get_correlation_id).query("SELECT 1")
    assert script.metadata[0]["x-correlation-id"] == "corr-from-powertools"


def test_round_robin_skips_a_replica_that_reports_not_serving() -> None:
    from grpc_health.v1 import health, health_pb2

    draining = health.HealthServicer()
    draining.set("pgbroker.v1.Broker", health_pb2.HealthCheckResponse.NOT_SERVING)
    with standin(health=draining) as (a, on_a), standin() as (b, on_b):
        db = fast_client(f"ipv4:{a},{b}")
        for _ in range(10):
            db.query("SELECT 1")
        assert (len(on_a.requests), len(on_b.requests)) == (0, 10)
        draining.set("pgbroker.v1.Broker", health_pb2.HealthCheckResponse.SERVING)
        wait_until(lambda: db.query("SELECT 1") and on_a.requests, what="calls to the replica")


def test_a_broker_that_stays_not_serving_gets_nothing_and_raises_unavailable() -> None:
    from grpc_health.v1 import health, health_pb2

    draining = health.HealthServicer()
    draining.set("pgbroker.v1.Broker", health_pb2.HealthCheckResponse.NOT_SERVING)
    with standin(health=draining) as (target, script), pytest.raises(lc.Unavailable) as info:
        fast_client(target).transaction(["SELECT 1"], timeout=0.5)
    assert script.requests == []
    assert info.value.reason == "BROKER_UNREACHABLE"
    assert "nothing was sent" in str(info.value)


def test_a_new_channels_first_call_waits_for_the_channel_without_a_health_check_rpc() -> None:
    from grpc_health.v1 import health, health_pb2

    class CountingHealth(health.HealthServicer):
        def __init__(self) -> None:
            super().__init__()
            self.checks = 0

        def Check(self, request: Any, context: Any) -> Any:
            self.checks += 1
            return super().Check(request, context)

    watched = CountingHealth()
    watched.set("pgbroker.v1.Broker", health_pb2.HealthCheckResponse.SERVING)
    with standin(health=watched) as (target, script):
        db = fast_client(target)
        db.query("SELECT 1")
        db.query("SELECT 1")
    # One request per call, and the reachability wait made no RPC of its own.
    assert (len(script.requests), watched.checks) == (2, 0)
