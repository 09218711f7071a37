"""Database credentials from Secrets Manager (moto, signatures checked), re-read after a
rotation; RDS IAM auth tokens generated and refreshed before they expire."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pg8000.native
import pytest

from broker.config import parse_database_url
from broker.pooling.pool import PoolUnavailable
from broker.postgres.credentials import IamTokenCredentials, SecretCredentials
from devtools.localpg import LocalPostgres
from tests.fixtures.aws import REGION, MotoAws
from tests.fixtures.brokers import InProcessBroker
from tests.support import request, rows

USER = "app_user"


@pytest.fixture(scope="module")
def password_postgres() -> Iterator[LocalPostgres]:
    """A Postgres that checks passwords (scram) for every user but the superuser."""
    with LocalPostgres(max_connections=20) as server:
        hba = Path(server.datadir) / "pg_hba.conf"
        hba.write_text(
            "local all all trust\n"
            "host all postgres 127.0.0.1/32 trust\n"
            "host all all 127.0.0.1/32 scram-sha-256\n"
        )
        admin = _admin(server)
        admin.run("SELECT pg_reload_conf()")
        admin.run(f"CREATE ROLE {USER} LOGIN PASSWORD 'pw-one-0123456789'")
        admin.close()
        yield server


def _admin(server: LocalPostgres) -> pg8000.native.Connection:
    return pg8000.native.Connection(
        "postgres", host=server.host, port=server.port, database="postgres"
    )


@pytest.fixture
def aws_env(moto_aws: MotoAws, monkeypatch: pytest.MonkeyPatch) -> MotoAws:
    monkeypatch.setenv("AWS_ENDPOINT_URL_SECRETS_MANAGER", moto_aws.url)
    monkeypatch.setenv("AWS_DEFAULT_REGION", REGION)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", moto_aws.user_credentials.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", moto_aws.user_credentials.secret_key)
    return moto_aws


def _secret(aws: MotoAws, password: str) -> tuple[Any, str]:
    secrets = aws.client("secretsmanager")
    name = "pgbroker/db-" + uuid.uuid4().hex[:8]
    secrets.create_secret(
        Name=name, SecretString=json.dumps({"username": USER, "password": password})
    )
    return secrets, name


def _query_until_ok(broker: InProcessBroker, sql: str, timeout: float = 30) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        try:
            return broker.stub().Execute(request(sql), timeout=5)
        except grpc.RpcError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def test_credentials_come_from_the_secret_and_follow_a_rotation(
    password_postgres: LocalPostgres, aws_env: MotoAws
) -> None:
    secrets, name = _secret(aws_env, "pw-one-0123456789")
    dsn = f"postgresql://nobody@127.0.0.1:{password_postgres.port}/postgres?sslmode=disable"
    with InProcessBroker(dsn, database_secret_id=name, pool_size=1) as broker:
        reply = broker.stub().Execute(request("SELECT current_user"), timeout=10)
        assert rows(reply.results[0]) == [(USER,)]
        assert broker.server.credentials.reads == 1  # type: ignore[attr-defined]

        # Rotation: the database and the secret get a new password; live connections end.
        admin = _admin(password_postgres)
        admin.run(f"ALTER ROLE {USER} PASSWORD 'pw-two-0123456789'")
        secrets.put_secret_value(
            SecretId=name,
            SecretString=json.dumps({"username": USER, "password": "pw-two-0123456789"}),
        )
        admin.run(
            f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = '{USER}'"
        )
        admin.close()

        reply = _query_until_ok(broker, "SELECT current_user")
        assert rows(reply.results[0]) == [(USER,)]
        assert broker.server.credentials.reads == 2  # type: ignore[attr-defined]


def test_wrong_password_in_the_secret_fails_start_without_leaking_it(
    password_postgres: LocalPostgres, aws_env: MotoAws
) -> None:
    _, name = _secret(aws_env, "definitely-wrong-password")
    dsn = f"postgresql://127.0.0.1:{password_postgres.port}/postgres?sslmode=disable"
    with pytest.raises(PoolUnavailable) as caught:
        InProcessBroker(dsn, database_secret_id=name, pool_size=1, connect_timeout=2)
    assert "28P01" in str(caught.value) or "password" in str(caught.value)
    assert "definitely-wrong-password" not in str(caught.value)


def test_secret_that_is_not_rds_json_is_refused_naming_only_the_secret() -> None:
    base = parse_database_url("postgresql://db.internal/app")
    source = SecretCredentials(base, "arn:secret:x", load=lambda: "hunter2-not-json")
    with pytest.raises(ValueError) as caught:
        source.target()
    assert "arn:secret:x" in str(caught.value)
    assert "hunter2" not in str(caught.value)


def test_secret_can_supply_host_port_and_database() -> None:
    base = parse_database_url("postgresql://placeholder/app?sslmode=verify-full")
    secret = {"username": "u", "password": "p", "host": "db.rds", "port": 6432, "dbname": "x"}
    target = SecretCredentials(base, "s", load=lambda: json.dumps(secret)).target()
    assert (target.host, target.port, target.database, target.user) == ("db.rds", 6432, "x", "u")
    assert "password" not in repr(target)


def test_rds_iam_token_is_generated_and_refreshed_before_expiry(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAIOSFODNN7EXAMPLE")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY")
    now = [0.0]
    base = parse_database_url("postgresql://iam_user@db.example.rds:5432/app?sslmode=verify-full")
    source = IamTokenCredentials(base, REGION, clock=lambda: now[0])
    first = source.target()
    assert first.password is not None
    assert first.password.startswith("db.example.rds:5432/?")
    assert "Action=connect" in first.password
    assert "DBUser=iam_user" in first.password
    assert "X-Amz-Expires=900" in first.password
    assert "password" not in repr(first)
    now[0] += 599
    assert source.target() is first  # reused while fresh
    now[0] += 2
    assert source.target() is not first  # regenerated after 10 minutes, before the 15


def test_rds_iam_auth_refuses_plaintext() -> None:
    base = parse_database_url("postgresql://iam_user@db.example.rds/app?sslmode=disable")
    with pytest.raises(ValueError, match="TLS"):
        IamTokenCredentials(base, REGION, generate=lambda t: "token")
