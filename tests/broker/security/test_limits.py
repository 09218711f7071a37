"""Limits through a real broker on a real Postgres: RESOURCE_EXHAUSTED + LIMIT_EXCEEDED naming
the limit, nothing run for request limits, and the pool healthy afterwards."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import grpc
import pytest

from broker.security.limits import (
    InflightLimiter,
    LimitExceeded,
    Limits,
    ResultBudget,
    check_request,
    check_results,
)
from lambda_client._proto.pgbroker.v1 import broker_pb2 as pb
from tests.fixtures.brokers import InProcessBroker
from tests.support import connect, request, rows, status_of, temp_table, wait_until

TOKEN = "limits-test-token-0123456789"
BEARER = (("authorization", f"Bearer {TOKEN}"),)


@pytest.fixture(scope="module")
def broker(postgres: Any) -> Iterator[InProcessBroker]:
    with InProcessBroker(
        postgres.dsn,
        auth="token",
        tokens=f"app:{TOKEN}",
        max_statements=5,
        max_request_bytes=64 * 1024,
        max_result_rows=100,
        max_result_bytes=16 * 1024,
        max_inflight_per_caller=1,
        pool_size=2,
    ) as started:
        yield started


@pytest.fixture
def table(postgres: Any) -> Iterator[str]:
    with temp_table(postgres, "limits", "id int PRIMARY KEY, body text") as name:
        yield name


def refused(broker: InProcessBroker, req: pb.ExecuteRequest) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        broker.stub().Execute(req, metadata=BEARER, timeout=10)
    return caught.value


def count(broker: InProcessBroker, table: str) -> int:
    reply = broker.stub().Execute(request(f"SELECT count(*) FROM {table}"), metadata=BEARER)
    return int(rows(reply.results[0])[0][0])


def test_too_many_statements_is_refused_before_anything_runs(
    broker: InProcessBroker, table: str
) -> None:
    inserts = [(f"INSERT INTO {table} VALUES ($1, 'x')", [i]) for i in range(6)]
    error = refused(broker, request(*inserts))
    info = status_of(error)
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert info is not None and info.reason == "LIMIT_EXCEEDED"
    assert info.metadata["limit"] == "PGBROKER_MAX_STATEMENTS"
    assert info.metadata["maximum"] == "5"
    assert info.metadata["observed"] == "6"
    assert "PGBROKER_MAX_STATEMENTS" in (error.details() or "")
    assert status_of(error).retry_after is None
    assert count(broker, table) == 0


def test_oversized_request_is_refused_before_anything_runs(
    broker: InProcessBroker, table: str
) -> None:
    big = "x" * (70 * 1024)
    error = refused(broker, request((f"INSERT INTO {table} VALUES (1, $1)", [big])))
    info = status_of(error)
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert info is not None and info.metadata["limit"] == "PGBROKER_MAX_REQUEST_BYTES"
    assert count(broker, table) == 0


def test_too_many_result_rows_names_the_limit_and_how_to_page(broker: InProcessBroker) -> None:
    error = refused(broker, request("SELECT g FROM generate_series(1, 101) AS g"))
    info = status_of(error)
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert info is not None and info.metadata["limit"] == "PGBROKER_MAX_RESULT_ROWS"
    assert info.metadata["observed"] == "101"
    assert info.metadata["completed"] == "true"
    assert "ORDER BY key LIMIT" in (error.details() or "")


def test_a_result_far_over_the_row_limit_is_counted_whole_but_not_kept(
    broker: InProcessBroker,
) -> None:
    """Past the limit the broker reads the rest of the rows without keeping them (memory stays
    at the limit's worth); the refusal still counts them all, here over three statements."""
    error = refused(
        broker,
        request(
            "SELECT g FROM generate_series(1, 200000) AS g",
            "SELECT 1",
            "SELECT g FROM generate_series(1, 50) AS g",
        ),
    )
    info = status_of(error)
    assert info is not None and info.metadata["limit"] == "PGBROKER_MAX_RESULT_ROWS"
    assert info.metadata["observed"] == "200051"
    assert "200051 rows" in (error.details() or "")
    reply = broker.stub().Execute(request("SELECT 1"), metadata=BEARER, timeout=10)
    assert rows(reply.results[0]) == [(1,)]  # the pool is fine


def test_a_result_far_over_the_byte_limit_is_refused_as_at_least_its_kept_size(
    broker: InProcessBroker,
) -> None:
    error = refused(broker, request("SELECT repeat('x', 1000) FROM generate_series(1, 90)"))
    info = status_of(error)
    assert info is not None and info.metadata["limit"] == "PGBROKER_MAX_RESULT_BYTES"
    # About 65 rows (4 x 16 KiB of row messages) kept, the other ~25 counted at a quarter of
    # their row messages: more than was kept, no more than the whole (~1 kB a row).
    assert 4 * 16 * 1024 < int(info.metadata["observed"]) <= 90 * 1010
    assert "at least" in (error.details() or "")


def test_rows_over_several_statements_add_up(broker: InProcessBroker) -> None:
    half = "SELECT g FROM generate_series(1, 60) AS g"
    error = refused(broker, request(half, half))
    info = status_of(error)
    assert info is not None and info.metadata["limit"] == "PGBROKER_MAX_RESULT_ROWS"
    assert info.metadata["observed"] == "120"


def test_a_write_batch_whose_result_is_over_its_limit_commits_nothing(
    broker: InProcessBroker, table: str
) -> None:
    # Issue 11: refused before COMMIT (the old behaviour committed and said completed=true).
    error = refused(
        broker,
        request(
            (f"INSERT INTO {table} VALUES (1, 'x')", []),
            "SELECT g FROM generate_series(1, 101) AS g",
            (f"INSERT INTO {table} VALUES (2, 'y')", []),
        ),
    )
    info = status_of(error)
    assert info is not None and info.metadata["limit"] == "PGBROKER_MAX_RESULT_ROWS"
    assert "completed" not in info.metadata
    assert "rolled back, nothing committed" in (error.details() or "")
    assert count(broker, table) == 0
    # The connection went back clean: the next batch commits.
    broker.stub().Execute(
        request((f"INSERT INTO {table} VALUES (3, 'z')", []), "SELECT 1"), metadata=BEARER
    )
    assert count(broker, table) == 1


def test_a_write_batch_over_the_byte_limit_commits_nothing(
    broker: InProcessBroker, table: str
) -> None:
    error = refused(
        broker,
        request(
            (f"INSERT INTO {table} VALUES (1, repeat('x', 20000)) RETURNING body", []),
            "SELECT 1",
        ),
    )
    info = status_of(error)
    assert info is not None and info.metadata["limit"] == "PGBROKER_MAX_RESULT_BYTES"
    assert count(broker, table) == 0


def test_a_keyed_batch_over_its_limit_commits_nothing_and_leaves_its_key_free(
    broker: InProcessBroker, table: str
) -> None:
    """The limits see the results before the key's response is stored and COMMIT is sent (one
    round trip for both): a refused batch claims no key, so it is not replayed, and the key
    still runs a request that fits."""
    key = f"limits-{uuid.uuid4()}"
    over = request(
        (f"INSERT INTO {table} VALUES (1, 'x')", []), "SELECT g FROM generate_series(1, 101) AS g"
    )
    over.idempotency_key = key
    for _ in range(2):  # the resend is refused again, not answered from a stored response
        info = status_of(refused(broker, over))
        assert info is not None and info.metadata["limit"] == "PGBROKER_MAX_RESULT_ROWS"
        assert count(broker, table) == 0
    fits = request(
        (f"INSERT INTO {table} VALUES (1, 'x')", []), "SELECT g FROM generate_series(1, 3) AS g"
    )
    fits.idempotency_key = key  # a claimed key would be IDEMPOTENCY_KEY_REUSED here
    for _ in range(2):  # committed once, then replayed
        reply = broker.stub().Execute(fits, metadata=BEARER, timeout=10)
        assert rows(reply.results[1]) == [(1,), (2,), (3,)]
        assert count(broker, table) == 1


def test_a_keyed_interactive_commit_after_a_refused_step_claims_nothing(
    broker: InProcessBroker, table: str
) -> None:
    """A step over its limit ends the lease before COMMIT (rolled back), so the COMMIT's key
    is never claimed: re-running the transaction with it commits, once."""
    from lambda_client import BrokerClient, Overloaded

    key = f"limits-tx-{uuid.uuid4()}"
    client = BrokerClient(broker.target, auth=lambda: BEARER, timeout=10)
    try:
        with pytest.raises(Overloaded), client.begin(idempotency_key=key) as tx:
            tx.query(f"INSERT INTO {table} VALUES (1, 'x')")
            tx.query("SELECT g FROM generate_series(1, 101) AS g")
        assert count(broker, table) == 0
        replayed = []
        for row_id in (1, 2):  # the re-run's own row is rolled back: the first one stands
            with client.begin(idempotency_key=key) as tx:
                tx.query(f"INSERT INTO {table} VALUES ($1, 'x')", [row_id])
            replayed.append(tx.replayed)
        assert replayed == [False, True]
        reply = broker.stub().Execute(request(f"SELECT id FROM {table}"), metadata=BEARER)
        assert rows(reply.results[0]) == [(1,)]
    finally:
        client.close()


def test_too_many_result_bytes_names_the_limit(broker: InProcessBroker) -> None:
    error = refused(broker, request("SELECT repeat('x', 20000)"))
    info = status_of(error)
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert info is not None and info.metadata["limit"] == "PGBROKER_MAX_RESULT_BYTES"


def test_results_at_the_limit_are_sent(broker: InProcessBroker) -> None:
    reply = broker.stub().Execute(
        request("SELECT g FROM generate_series(1, 100) AS g"), metadata=BEARER, timeout=10
    )
    assert len(reply.results[0].rows) == 100


def test_one_caller_cannot_exceed_its_in_flight_limit(
    broker: InProcessBroker, postgres: Any
) -> None:
    done: list[Any] = []
    # The first request waits on a lock the test holds, so it stays in flight until released.
    admin = connect(postgres)
    admin.run("SELECT pg_advisory_lock(8675309)")

    def held() -> None:
        req = request("SELECT pg_advisory_xact_lock(8675309)")
        done.append(broker.stub().Execute(req, metadata=BEARER, timeout=30))

    worker = threading.Thread(target=held)
    worker.start()
    try:
        wait_until(
            lambda: broker.server.service.inflight.in_flight("token:app") == 1,
            what="the first request to be in flight",
        )
        error = refused(broker, request("SELECT 1"))
    finally:
        admin.run("SELECT pg_advisory_unlock(8675309)")
        admin.close()
        worker.join(30)
    info = status_of(error)
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert info is not None and info.metadata["limit"] == "PGBROKER_MAX_INFLIGHT_PER_CALLER"
    assert status_of(error).retry_after is not None  # clears when the caller's other request ends
    assert len(done) == 1
    # Once the first request finished, the same caller gets through again.
    reply = broker.stub().Execute(request("SELECT 1"), metadata=BEARER, timeout=10)
    assert rows(reply.results[0]) == [(1,)]


def test_client_does_not_retry_a_crossed_limit(broker: InProcessBroker) -> None:
    from lambda_client import BrokerClient, Overloaded

    before = broker.stats()["rpcs_num"]
    client = BrokerClient(broker.target, auth=lambda: BEARER, max_attempts=5, timeout=10)
    try:
        with pytest.raises(Overloaded) as caught:
            client.query("SELECT g FROM generate_series(1, 1000) AS g")
    finally:
        client.close()
    assert caught.value.reason == "LIMIT_EXCEEDED"
    assert broker.stats()["rpcs_num"] - before == 1


def test_pool_stays_healthy_after_limit_errors(broker: InProcessBroker) -> None:
    for _ in range(3):
        refused(broker, request("SELECT g FROM generate_series(1, 500) AS g"))
        refused(broker, request(*["SELECT 1"] * 6))
    reply = broker.stub().Execute(request("SELECT 40 + 2"), metadata=BEARER, timeout=10)
    assert rows(reply.results[0]) == [(42,)]
    stats = broker.stats()
    assert stats["limits_exceeded"] >= 6
    assert stats["pool_size"] == 2


def test_limits_read_from_the_environment() -> None:
    from broker.config import ConfigError, load_settings
    from broker.front.server import limits_for

    url = {"PGBROKER_DATABASE_URL": "postgresql://app@db.internal/app"}
    settings = load_settings(
        environ={**url, "PGBROKER_MAX_RESULT_BYTES": "2MiB", "PGBROKER_MAX_STATEMENTS": "0"}
    )
    limits = limits_for(settings)
    assert limits.max_result_bytes == 2 * 1024 * 1024
    assert limits.max_statements == 0
    with pytest.raises(ConfigError, match="PGBROKER_MAX_RESULT_ROWS"):
        load_settings(environ={**url, "PGBROKER_MAX_RESULT_ROWS": "lots"})


def test_default_limits_are_the_settings_defaults() -> None:
    from broker.config import load_settings
    from broker.front.server import limits_for

    settings = load_settings({"database_url": "postgresql://app@db.internal/app"}, environ={})
    limits = limits_for(settings)
    assert limits.max_inflight_per_caller == (20 + 2000) // 2
    assert (limits.max_statements, limits.max_result_rows) == (1000, 1_000_000)


def test_in_flight_counts_are_released_when_a_request_fails() -> None:
    limiter = InflightLimiter(1)
    with pytest.raises(RuntimeError), limiter.hold("arn:a"):
        raise RuntimeError("the transaction failed")
    assert limiter.in_flight("arn:a") == 0
    with limiter.hold("arn:a"), pytest.raises(LimitExceeded), limiter.hold("arn:a"):
        pass
    with limiter.hold(None), limiter.hold(None):
        pass  # anonymous callers (auth none) are not limited per caller


def test_stats_command_authenticates_like_a_client(broker: InProcessBroker) -> None:
    import os
    import subprocess
    import sys

    def stats(**env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "broker", "stats", "--json", "--target", broker.target],
            capture_output=True,
            text=True,
            timeout=60,
            env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **env},
        )

    assert stats().returncode == 1  # GetStats is a InProcessBroker method: credentials required
    allowed = stats(PGBROKER_AUTH="token", PGBROKER_TOKEN=TOKEN)
    assert allowed.returncode == 0, allowed.stderr
    assert "auth_failures" in allowed.stdout


def test_in_flight_default_is_half_of_what_the_broker_admits() -> None:
    from broker.config import load_settings

    url = {"database_url": "postgresql://app@db.internal/app"}
    assert load_settings(url, environ={}).max_inflight_per_caller == (20 + 2000) // 2
    small = load_settings({**url, "pool_size": 4, "max_waiting": 100}, environ={})
    assert small.max_inflight_per_caller == 52
    explicit = load_settings({**url, "max_inflight_per_caller": 7}, environ={})
    assert explicit.max_inflight_per_caller == 7


def test_more_parameters_than_postgres_accepts_is_refused_before_running() -> None:
    req = pb.ExecuteRequest()
    req.statements.add(sql="SELECT 1").params.extend(pb.Value(int64=i) for i in range(65_536))
    with pytest.raises(LimitExceeded) as caught:
        check_request(req, Limits(0, 0, 0, 0, 0))  # every limit off: Postgres' own still holds
    assert caught.value.limit == "postgres_max_parameters"
    assert caught.value.observed == 65_536


# The result limits alone: 3 rows, 1000 encoded bytes.
LIMITS = replace(Limits(0, 0, 0, 0, 0), max_result_rows=3, max_result_bytes=1000)


def _result(*cells: str) -> pb.StatementResult:
    result = pb.StatementResult()
    for cell in cells:
        result.rows.add().values.add(text=cell)
    return result


def test_a_budget_keeps_one_row_past_a_limit_and_counts_the_rest() -> None:
    budget = ResultBudget(LIMITS)
    assert [budget.keep(10) for _ in range(6)] == [True, True, True, True, False, False]
    assert (budget.rows, budget.dropped_rows, budget.dropped_bytes) == (4, 2, 20)
    with pytest.raises(LimitExceeded) as refusal:
        check_results([_result("a", "b", "c", "d")], LIMITS, budget=budget)
    assert (refusal.value.limit, refusal.value.observed) == ("PGBROKER_MAX_RESULT_ROWS", 6)
    budget.reset()
    assert (budget.rows, budget.dropped_rows, budget.full) == (0, 0, False)
    check_results([_result("a", "b")], LIMITS, budget=budget)  # under both: passes


def test_a_result_missing_rows_is_never_passed() -> None:
    """Filled by row-message bytes (4 x the byte limit), the kept rows may encode under the
    byte limit when text is the shorter form: the result still lacks rows, so it is refused."""
    budget = ResultBudget(LIMITS)
    assert budget.keep(4001) and budget.full
    assert not budget.keep(7)
    with pytest.raises(LimitExceeded) as refusal:
        check_results([_result("short")], LIMITS, budget=budget)
    assert refusal.value.limit == "PGBROKER_MAX_RESULT_BYTES"
    assert refusal.value.observed > LIMITS.max_result_bytes
    assert "at least" in str(refusal.value)
