"""Least privilege: PGBROKER_ROLE_MAP gives each caller its own Postgres role per transaction."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import grpc
import pytest

from broker.security.identity import Identity
from broker.security.roles import RoleMap, RoleRefused
from tests.fixtures.brokers import InProcessBroker
from tests.support import connect, request, rows, status_of

READER = "reader-token-0123456789abcdef"
WRITER = "writer-token-0123456789abcdef"
STRANGER = "stranger-token-0123456789abc"


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


@pytest.fixture(scope="module")
def schema(postgres: Any) -> Iterator[dict[str, str]]:
    suffix = uuid.uuid4().hex[:6]
    names = {"ro": f"app_ro_{suffix}", "rw": f"app_rw_{suffix}", "table": f"notes_{suffix}"}
    admin = connect(postgres)
    admin.run(f"CREATE ROLE {names['ro']} NOLOGIN")
    admin.run(f"CREATE ROLE {names['rw']} NOLOGIN")
    admin.run(f"CREATE TABLE {names['table']} (id serial PRIMARY KEY, body text)")
    admin.run(f"GRANT SELECT ON {names['table']} TO {names['ro']}")
    admin.run(f"GRANT SELECT, INSERT ON {names['table']} TO {names['rw']}")
    admin.run(f"GRANT USAGE ON SEQUENCE {names['table']}_id_seq TO {names['rw']}")
    try:
        yield names
    finally:
        admin.run(f"DROP TABLE {names['table']}")
        admin.run(f"DROP ROLE {names['ro']}")
        admin.run(f"DROP ROLE {names['rw']}")
        admin.close()


@pytest.fixture(scope="module")
def broker(postgres: Any, schema: dict[str, str]) -> Iterator[InProcessBroker]:
    with InProcessBroker(
        postgres.dsn,
        auth="token",
        tokens=f"reader:{READER},writer:{WRITER},stranger:{STRANGER}",
        role_map=f"reader={schema['ro']},writ*={schema['rw']}",
        pool_size=1,  # every request shares the one pooled connection
    ) as started:
        yield started


def run(broker: InProcessBroker, token: str, *statements: Any) -> Any:
    return broker.stub().Execute(request(*statements), metadata=bearer(token), timeout=10)


def test_read_only_caller_cannot_write(broker: InProcessBroker, schema: dict[str, str]) -> None:
    reply = run(broker, READER, "SELECT current_user", f"SELECT count(*) FROM {schema['table']}")
    assert rows(reply.results[0]) == [(schema["ro"],)]
    with pytest.raises(grpc.RpcError) as caught:
        run(broker, READER, (f"INSERT INTO {schema['table']} (body) VALUES ($1)", ["x"]))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "permission denied" in (caught.value.details() or "")


def test_next_caller_on_the_same_connection_has_its_own_role(
    broker: InProcessBroker, schema: dict[str, str]
) -> None:
    first = run(broker, READER, "SELECT current_user, pg_backend_pid()")
    second = run(broker, WRITER, "SELECT current_user, pg_backend_pid()")
    third = run(broker, READER, "SELECT current_user, pg_backend_pid()")
    (reader_role, pid1), (writer_role, pid2), (again, pid3) = (
        rows(first.results[0])[0],
        rows(second.results[0])[0],
        rows(third.results[0])[0],
    )
    assert pid1 == pid2 == pid3  # the same pooled connection
    assert (reader_role, writer_role, again) == (schema["ro"], schema["rw"], schema["ro"])
    run(broker, WRITER, (f"INSERT INTO {schema['table']} (body) VALUES ($1)", ["ok"]))


def test_single_statements_also_run_under_the_mapped_role(
    broker: InProcessBroker, schema: dict[str, str]
) -> None:
    reply = run(broker, READER, "SELECT current_user")
    assert rows(reply.results[0]) == [(schema["ro"],)]


def test_caller_without_a_mapping_or_default_is_permission_denied(broker: InProcessBroker) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        run(broker, STRANGER, "SELECT 1")
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    info = status_of(caught.value)
    assert info is not None and info.reason == "PERMISSION_DENIED"
    assert "PGBROKER_DEFAULT_ROLE" in (caught.value.details() or "")


@pytest.mark.parametrize(
    "sql",
    [
        "SET LOCAL ROLE postgres",
        "RESET ROLE",
        "SET ROLE NONE",
        "SELECT set_config('role', 'postgres', true)",
        "SELECT set_config($1, 'postgres', true)",
        "DO $$ BEGIN EXECUTE 'SET LOCAL ROLE postgres'; END $$",
        "SET LOCAL SESSION AUTHORIZATION postgres",
    ],
)
def test_mapped_callers_cannot_switch_back_to_the_login_role(
    broker: InProcessBroker, sql: str
) -> None:
    statement = (sql, ["role"]) if "$1" in sql else sql
    with pytest.raises(grpc.RpcError) as caught:
        run(broker, READER, statement, "SELECT current_user")
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    info = status_of(caught.value)
    assert info is not None and info.reason == "SESSION_STATE"


def test_default_role_applies_to_unmapped_callers(postgres: Any, schema: dict[str, str]) -> None:
    with InProcessBroker(
        postgres.dsn,
        auth="token",
        tokens=f"stranger:{STRANGER}",
        role_map=f"nobody={schema['rw']}",
        default_role=schema["ro"],
        pool_size=1,
    ) as broker:
        reply = run(broker, STRANGER, "SELECT current_user")
    assert rows(reply.results[0]) == [(schema["ro"],)]


def test_role_map_parses_json_and_pairs_and_refuses_sql_in_names() -> None:
    pairs = RoleMap.parse("app-role=app_rw, reporting-*=app_ro")
    as_json = RoleMap.parse('{"app-role": "app_rw", "reporting-*": "app_ro"}')
    assert pairs == as_json
    assert pairs is not None
    caller = Identity("iam", "reporting-nightly", arn="arn:aws:sts::1:assumed-role/x/y")
    assert pairs.role_for(caller) == "app_ro"
    with pytest.raises(RoleRefused):
        pairs.role_for(Identity("iam", "other"))
    assert RoleMap.parse("", "") is None
    for bad in ('a=x"; DROP TABLE t; --', "a=", "just-a-name", '{"a": "b c"}', "{not json"):
        with pytest.raises(ValueError):
            RoleMap.parse(bad)
