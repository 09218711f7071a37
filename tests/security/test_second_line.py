"""The second line: session state the parser cannot see (DO blocks, functions) never reaches the
next caller — the connection that carries it is replaced."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from support import connect

from broker.sessionstate import needs_audit

from .harness import Broker, request, rows


def one(broker: Broker, sql: str) -> Any:
    reply = broker.stub().Execute(request(sql), timeout=10)
    return rows(reply.results[0])[0] if reply.results[0].rows else None


def pid(broker: Broker) -> int:
    return int(one(broker, "SELECT pg_backend_pid()")[0])


@pytest.fixture(scope="module")
def broker(postgres: Any) -> Iterator[Broker]:
    with Broker(postgres.dsn, pool_size=1) as started:  # every caller gets the same connection
        yield started


def test_do_block_changing_an_unreported_setting_does_not_leak(broker: Broker) -> None:
    before = pid(broker)
    one(broker, "DO $$ BEGIN PERFORM set_config('search_path', 'leaked', false); END $$")
    assert one(broker, "SELECT current_setting('search_path')") == ('"$user", public',)
    assert pid(broker) != before  # the connection that carried it was replaced


def test_do_block_changing_a_reported_setting_does_not_leak(broker: Broker) -> None:
    one(broker, "DO $$ BEGIN EXECUTE 'SET TIME ZONE ''Asia/Tokyo'''; END $$")
    assert one(broker, "SELECT current_setting('TimeZone')") == ("Etc/UTC",)


def test_do_block_in_a_batch_does_not_leak(broker: Broker) -> None:
    broker.stub().Execute(
        request("SELECT 1", "DO $$ BEGIN EXECUTE 'SET work_mem = ''77MB'''; END $$"), timeout=10
    )
    assert one(broker, "SELECT current_setting('work_mem')") == ("4MB",)


def test_session_lock_taken_in_a_failed_do_block_is_released(broker: Broker, postgres: Any) -> None:
    key = 424242
    with pytest.raises(grpc.RpcError):
        broker.stub().Execute(
            request(
                f"DO $$ BEGIN PERFORM pg_advisory_lock({key}); "
                "RAISE EXCEPTION 'fail after locking'; END $$"
            ),
            timeout=10,
        )
    one(broker, "SELECT 1")  # the next caller runs on a fresh connection
    admin = connect(postgres)
    try:
        held = admin.run(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND objid = :k", k=key
        )
    finally:
        admin.close()
    assert held == [[0]]


def test_clean_do_block_keeps_the_connection(broker: Broker) -> None:
    before = pid(broker)
    one(broker, "DO $$ BEGIN PERFORM 1; END $$")
    assert pid(broker) == before


def test_ordinary_requests_are_not_audited() -> None:
    assert not needs_audit(["SELECT 1", "INSERT INTO t VALUES ($1)", "SET LOCAL x.y = 1"])
    assert needs_audit(["SELECT 1", "DO $$ BEGIN END $$"])
    assert needs_audit(["CALL app.refresh()"])
    assert needs_audit(["SELEC garbage"])  # what the parser cannot read is audited


@pytest.fixture
def leaky_function(postgres: Any) -> Iterator[str]:
    name = "leaky_" + uuid.uuid4().hex[:8]
    admin = connect(postgres)
    admin.run(
        f"CREATE FUNCTION {name}() RETURNS text LANGUAGE sql "
        "AS $$ SELECT set_config('search_path', 'leaked', false) $$"
    )
    try:
        yield name
    finally:
        admin.run(f"DROP FUNCTION {name}()")
        admin.close()


def test_audit_always_catches_a_function_with_session_side_effects(
    postgres: Any, leaky_function: str
) -> None:
    with Broker(postgres.dsn, pool_size=1, session_audit="always") as broker:
        one(broker, f"SELECT {leaky_function}()")
        assert one(broker, "SELECT current_setting('search_path')") == ('"$user", public',)
