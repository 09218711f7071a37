"""End to end through a real broker and a real Postgres: IAM callers via `BrokerClient`,
session-state SQL refused before anything runs, injection attempts stored verbatim, and
``PGBROKER_AUTH=none`` refused off loopback."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from lambda_client import BrokerClient, InvalidRequest, PermissionDenied, Unauthenticated
from lambda_client import auth as client_auth
from tests.fixtures.aws import REGION, MotoAws
from tests.fixtures.brokers import InProcessBroker
from tests.support import request, rows, status_of, temp_table

AUDIENCE = "dns:///broker.security-test:50051"


@pytest.fixture(scope="module")
def iam_broker(postgres: Any, moto_aws: MotoAws) -> Iterator[InProcessBroker]:
    with InProcessBroker(
        postgres.dsn,
        auth="iam",
        auth_audience=AUDIENCE,
        iam_allowed_roles="app-role,arn:aws:iam::123456789012:role/reporting-*",
        sts_endpoint=moto_aws.url,
    ) as broker:
        yield broker


def iam_client(broker: InProcessBroker, moto_aws: MotoAws, role: str) -> BrokerClient:
    signer = client_auth.IamAuth(
        AUDIENCE,
        sts_endpoint=moto_aws.url,
        region=REGION,
        credentials=moto_aws.role_credentials[role],
    )
    return BrokerClient(broker.target, auth=signer, max_attempts=1, timeout=10)


def test_iam_caller_queries_and_sts_is_asked_once(
    iam_broker: InProcessBroker, moto_aws: MotoAws
) -> None:
    before = iam_broker.stats()["auth_sts_calls"]
    client = iam_client(iam_broker, moto_aws, "app-role")
    try:
        answers = [client.query("SELECT $1::int + 1", [i]).scalar() for i in range(25)]
    finally:
        client.close()
    assert answers == [i + 1 for i in range(25)]
    assert iam_broker.stats()["auth_sts_calls"] - before == 1


def test_iam_caller_whose_role_is_not_allowed_gets_permission_denied(
    iam_broker: InProcessBroker, moto_aws: MotoAws
) -> None:
    failures = iam_broker.stats()["auth_failures"]
    client = iam_client(iam_broker, moto_aws, "batch-role")
    try:
        with pytest.raises(PermissionDenied) as caught:
            client.query("SELECT 1")
    finally:
        client.close()
    assert caught.value.reason == "PERMISSION_DENIED"
    assert "batch-role" in caught.value.details
    assert iam_broker.stats()["auth_failures"] == failures + 1


def test_call_without_credentials_is_unauthenticated(iam_broker: InProcessBroker) -> None:
    client = BrokerClient(iam_broker.target, auth=lambda: (), max_attempts=1, timeout=5)
    try:
        with pytest.raises(Unauthenticated) as caught:
            client.query("SELECT 1")
    finally:
        client.close()
    assert caught.value.reason == "UNAUTHENTICATED"


def test_get_stats_needs_credentials_but_health_does_not(iam_broker: InProcessBroker) -> None:
    from lambda_client._proto.pgbroker.v1 import broker_pb2 as pb

    with pytest.raises(grpc.RpcError) as caught:
        iam_broker.stub().GetStats(pb.GetStatsRequest(), timeout=5)
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with grpc.insecure_channel(iam_broker.target) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=5
        )
    assert reply.status in (
        health_pb2.HealthCheckResponse.SERVING,
        health_pb2.HealthCheckResponse.NOT_SERVING,  # still filling the pool
    )


def test_client_reads_iam_settings_from_the_environment(
    iam_broker: InProcessBroker, moto_aws: MotoAws, monkeypatch: pytest.MonkeyPatch
) -> None:
    creds = moto_aws.role_credentials["reporting-role"]
    for name, value in {
        "PGBROKER_AUTH": "iam",
        "PGBROKER_AUTH_AUDIENCE": AUDIENCE,
        "PGBROKER_STS_ENDPOINT": moto_aws.url,
        "AWS_REGION": REGION,
        "AWS_ACCESS_KEY_ID": creds.access_key,
        "AWS_SECRET_ACCESS_KEY": creds.secret_key,
        "AWS_SESSION_TOKEN": creds.token,
    }.items():
        monkeypatch.setenv(name, value)
    client = BrokerClient(iam_broker.target, max_attempts=1, timeout=10)
    try:
        assert client.query("SELECT 'from env'").scalar() == "from env"
    finally:
        client.close()


# -- session state and injection ----------------------------------------------------------


@pytest.fixture(scope="module")
def broker(postgres: Any) -> Iterator[InProcessBroker]:
    with InProcessBroker(postgres.dsn, pool_size=1) as started:
        yield started


@pytest.fixture
def table(postgres: Any) -> Iterator[str]:
    with temp_table(postgres, "sec", "id serial PRIMARY KEY, body text") as name:
        yield name


REFUSED_END_TO_END = [
    "/* comment first */ SET search_path = public",
    "set\tSESSION statement_timeout = 0",
    "SELECT set_config('search_path', 'public', false)",
    "SELECT \"set_config\"('app.x', $$y$$, FALSE)",
    "LISTEN jobs",
    "PREPARE q AS SELECT 1",
    "DECLARE c CURSOR WITH HOLD FOR SELECT 1",
    "CREATE TEMP TABLE scratch (id int)",
    "SELECT pg_advisory_lock(1)",
    "SELECT 1; SELECT 2",
    "COMMIT",
    "DISCARD ALL",
    "LOAD 'auto_explain'",
]


@pytest.mark.parametrize("sql", REFUSED_END_TO_END)
def test_session_state_sql_is_refused_before_anything_runs(
    broker: InProcessBroker, table: str, sql: str
) -> None:
    batch = request((f"INSERT INTO {table} (body) VALUES ('before')", []), sql)
    with pytest.raises(grpc.RpcError) as caught:
        broker.stub().Execute(batch, timeout=10)
    info = status_of(caught.value)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info is not None and info.reason in ("SESSION_STATE", "BAD_REQUEST")
    assert info.metadata["statement_index"] == "1"
    assert (caught.value.details() or "").startswith("statement 1: ")
    reply = broker.stub().Execute(request(f"SELECT count(*) FROM {table}"), timeout=10)
    assert rows(reply.results[0]) == [(0,)]  # the INSERT before it never ran


def test_client_sees_invalid_request_naming_the_alternative(broker: InProcessBroker) -> None:
    client = BrokerClient(broker.target, auth=lambda: (), max_attempts=1, timeout=5)
    try:
        with pytest.raises(InvalidRequest) as caught:
            client.query("SELECT pg_advisory_lock(7)")
    finally:
        client.close()
    assert caught.value.reason == "SESSION_STATE"
    assert "pg_advisory_xact_lock" in caught.value.details


INJECTIONS = [
    "'); DROP TABLE users; --",
    "x' OR '1'='1",
    "$$; SET ROLE postgres; $$",
    "\\'; SELECT pg_sleep(10); --",
    "SET search_path = evil",
    "Robert'); DISCARD ALL;--",
    "$1",
    "ünïcødé ✓ \t\n",
]


def test_injection_attempts_through_parameters_are_stored_verbatim(
    broker: InProcessBroker, table: str
) -> None:
    inserts = [(f"INSERT INTO {table} (body) VALUES ($1)", [text]) for text in INJECTIONS]
    broker.stub().Execute(request(*inserts), timeout=10)
    reply = broker.stub().Execute(request(f"SELECT body FROM {table} ORDER BY id"), timeout=10)
    assert [row[0] for row in rows(reply.results[0])] == INJECTIONS


def test_session_words_inside_literals_run(broker: InProcessBroker, table: str) -> None:
    sql = f"INSERT INTO {table} (body) VALUES ('SET search_path = x; LISTEN y; DISCARD ALL')"
    broker.stub().Execute(request(sql, f"SELECT body FROM {table}"), timeout=10)
    reply = broker.stub().Execute(request(f"SELECT body FROM {table}"), timeout=10)
    assert rows(reply.results[0]) == [("SET search_path = x; LISTEN y; DISCARD ALL",)]


def test_set_local_and_transaction_advisory_locks_work(broker: InProcessBroker) -> None:
    reply = broker.stub().Execute(
        request(
            "SET LOCAL search_path = pg_catalog",
            "SELECT pg_advisory_xact_lock(42)",
            "SELECT current_setting('search_path')",
        ),
        timeout=10,
    )
    assert rows(reply.results[2]) == [("pg_catalog",)]
    after = broker.stub().Execute(request("SELECT current_setting('search_path')"), timeout=10)
    assert rows(after.results[0]) == [('"$user", public',)]


def _raw_execute(broker: InProcessBroker, payload: bytes) -> grpc.RpcError:
    channel = grpc.insecure_channel(broker.target)
    try:
        call = channel.unary_unary(
            "/pgbroker.v1.Broker/Execute",
            request_serializer=lambda raw: raw,
            response_deserializer=lambda raw: raw,
        )
        with pytest.raises(grpc.RpcError) as caught:
            call(payload, timeout=5)
        return caught.value
    finally:
        channel.close()


@pytest.mark.parametrize(
    "payload",
    [
        b"\x0a\x05\x0a\x03\xff\xfe\xfd",  # statements { sql: invalid UTF-8 }
        b"\xff\xff\xff\xff",  # not protobuf at all
    ],
    ids=["bad-utf8", "garbage"],
)
def test_malformed_protobuf_is_invalid_argument(broker: InProcessBroker, payload: bytes) -> None:
    error = _raw_execute(broker, payload)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    info = status_of(error)
    assert info is not None and info.reason == "BAD_REQUEST"


def test_unknown_isolation_level_is_a_bad_request(broker: InProcessBroker) -> None:
    from lambda_client._proto.pgbroker.v1 import broker_pb2 as pb

    req = request("SELECT 1", "SELECT 2")
    req.options.isolation = 99  # type: ignore[assignment]
    with pytest.raises(grpc.RpcError) as caught:
        broker.stub().Execute(req, timeout=10)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    info = status_of(caught.value)
    assert info is not None and info.reason == "BAD_REQUEST"
    assert pb.ISOLATION_LEVEL_SERIALIZABLE in pb.IsolationLevel.values()


def test_too_deeply_nested_parameter_is_invalid_argument(broker: InProcessBroker) -> None:
    def varint(n: int) -> bytes:
        out = b""
        while True:
            low, n = n & 0x7F, n >> 7
            out += bytes([low | (0x80 if n else 0)])
            if not n:
                return out

    value = b"\x18\x01"  # Value { int64: 1 }
    for _ in range(300):  # Value { array: Array { values: [value] } }
        array = b"\x12" + varint(len(value)) + value
        value = b"\x82\x01" + varint(len(array)) + array
    sql = b"SELECT $1"
    statement = b"\x0a" + varint(len(sql)) + sql + b"\x12" + varint(len(value)) + value
    error = _raw_execute(broker, b"\x0a" + varint(len(statement)) + statement)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_call_without_deadline_cannot_hold_a_connection_by_disabling_the_timeout(
    postgres: Any,
) -> None:
    with InProcessBroker(postgres.dsn, pool_size=1, queue_timeout=1, statement_timeout=1) as broker:
        with pytest.raises(grpc.RpcError) as caught:
            broker.stub().Execute(  # no timeout: the call itself has no deadline
                request("SET LOCAL statement_timeout = 0", "SELECT pg_sleep(30)")
            )
        assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        reply = broker.stub().Execute(request("SELECT 1"), timeout=10)
    assert rows(reply.results[0]) == [(1,)]


# -- none off loopback ----------------------------------------------------------------------


def test_none_auth_on_a_non_loopback_listener_refuses_to_start_with_one_line(
    postgres: Any,
) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "broker",
            "run",
            "--listen",
            "0.0.0.0:0",
            "--auth",
            "none",
            "--database-url",
            postgres.dsn,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin"},
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1
    assert "loopback" in lines[0]


def test_no_auth_setting_on_a_non_loopback_listener_refuses_to_start(postgres: Any) -> None:
    from broker.config import ConfigError, load_settings

    with pytest.raises(ConfigError, match="PGBROKER_AUTH is required"):
        load_settings({"database_url": postgres.dsn, "listen": "0.0.0.0:50051"}, environ={})
