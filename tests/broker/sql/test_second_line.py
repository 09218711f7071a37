"""The second line: session state the parser cannot see (DO blocks, functions) never reaches the
next caller — settings are reset behind the transaction, other state replaces the connection."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import grpc
import pytest

from broker.sql.plan import plan_request
from tests.fixtures.brokers import InProcessBroker
from tests.support import connect, request, rows


def needs_audit(sqls: list[str]) -> bool:
    return plan_request(sqls).needs_audit


def calls_unknown_function(sqls: list[str], known: frozenset[str] | None) -> bool:
    return plan_request(sqls).calls_unknown_function(known)


def one(broker: InProcessBroker, sql: str) -> Any:
    reply = broker.stub().Execute(request(sql), timeout=10)
    return rows(reply.results[0])[0] if reply.results[0].rows else None


def pid(broker: InProcessBroker) -> int:
    return int(one(broker, "SELECT pg_backend_pid()")[0])


@pytest.fixture(scope="module")
def broker(postgres: Any) -> Iterator[InProcessBroker]:
    with InProcessBroker(
        postgres.dsn, pool_size=1
    ) as started:  # every caller gets the same connection
        yield started


def test_do_block_changing_an_unreported_setting_does_not_leak(broker: InProcessBroker) -> None:
    before = pid(broker)
    one(broker, "DO $$ BEGIN PERFORM set_config('search_path', 'leaked', false); END $$")
    assert one(broker, "SELECT current_setting('search_path')") == ('"$user", public',)
    # Settings are reset behind the statement in the same flush (RESET ALL): the
    # connection that carried it is kept, clean.
    assert pid(broker) == before


def test_do_block_changing_a_reported_setting_does_not_leak(broker: InProcessBroker) -> None:
    one(broker, "DO $$ BEGIN EXECUTE 'SET TIME ZONE ''Asia/Tokyo'''; END $$")
    assert one(broker, "SELECT current_setting('TimeZone')") == ("Etc/UTC",)


def test_do_block_in_a_batch_does_not_leak(broker: InProcessBroker) -> None:
    broker.stub().Execute(
        request("SELECT 1", "DO $$ BEGIN EXECUTE 'SET work_mem = ''77MB'''; END $$"), timeout=10
    )
    assert one(broker, "SELECT current_setting('work_mem')") == ("4MB",)


def test_session_lock_taken_in_a_failed_do_block_is_released(
    broker: InProcessBroker, postgres: Any
) -> None:
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


def test_clean_do_block_keeps_the_connection(broker: InProcessBroker) -> None:
    before = pid(broker)
    one(broker, "DO $$ BEGIN PERFORM 1; END $$")
    assert pid(broker) == before


def test_ordinary_requests_are_not_audited() -> None:
    assert not needs_audit(["SELECT 1", "INSERT INTO t VALUES ($1)", "SET LOCAL x.y = 1"])
    assert needs_audit(["SELECT 1", "DO $$ BEGIN END $$"])
    assert needs_audit(["CALL app.refresh()"])
    assert needs_audit(["SELEC garbage"])  # what the parser cannot read is audited


def test_calls_of_functions_outside_pg_catalog_are_audited() -> None:
    known = frozenset({"lower", "now", "count"})
    assert not calls_unknown_function(["SELECT lower($1), now()", "SELECT count(*) FROM t"], known)
    assert not calls_unknown_function(["SELECT pg_catalog.lower('x')"], known)
    assert calls_unknown_function(["SELECT 1", "SELECT make_temp_table()"], known)
    assert calls_unknown_function(["SELECT app.lower('x')"], known)  # qualified elsewhere
    assert calls_unknown_function(["INSERT INTO t VALUES (app_default())"], known)
    # pg_catalog's names not read at start: every function call is audited, plain SQL is not.
    assert calls_unknown_function(["SELECT now()"], None)
    assert not calls_unknown_function(["SELECT a FROM t WHERE b = $1"], None)


@pytest.fixture
def session_state_function(postgres: Any) -> Iterator[str]:
    """A user function that leaves a temporary table, a session lock and a LISTEN behind."""
    name = "mktemp_" + uuid.uuid4().hex[:8]
    admin = connect(postgres)
    admin.run(
        f"CREATE FUNCTION {name}() RETURNS int LANGUAGE plpgsql AS $$BEGIN "
        "CREATE TEMP TABLE leak (secret text); INSERT INTO leak VALUES ('from caller A'); "
        "PERFORM pg_advisory_lock(4711); EXECUTE 'LISTEN chan'; RETURN 1; END$$"
    )
    try:
        yield name
    finally:
        admin.run(f"DROP FUNCTION {name}()")
        admin.close()


def test_a_user_function_leaving_session_state_does_not_leak(
    broker: InProcessBroker, session_state_function: str
) -> None:
    before = pid(broker)
    assert one(broker, f"SELECT {session_state_function}()") == (1,)
    # The next caller gets a fresh connection: no temporary table, lock or LISTEN of A's.
    assert pid(broker) != before
    leftovers = one(
        broker,
        "SELECT to_regclass('pg_temp.leak') IS NULL,"
        " NOT EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory'),"
        " NOT EXISTS (SELECT 1 FROM pg_listening_channels())",
    )
    assert leftovers == (True, True, True)
    assert broker.stats()["returns_bad"] >= 1


def test_calls_of_built_in_functions_keep_the_connection(broker: InProcessBroker) -> None:
    before = pid(broker)
    one(broker, "SELECT lower('A'), now(), pg_catalog.upper('b'), count(*) FROM pg_class")
    assert pid(broker) == before


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
    with InProcessBroker(postgres.dsn, pool_size=1, session_audit="always") as broker:
        one(broker, f"SELECT {leaky_function}()")
        assert one(broker, "SELECT current_setting('search_path')") == ('"$user", public',)


def test_a_user_overload_of_a_built_in_name_is_audited(postgres: Any) -> None:
    """public.lower(int, int) makes an unqualified lower(…) possibly the user's function."""
    name = "lower"
    admin = connect(postgres)
    admin.run(
        f"CREATE FUNCTION public.{name}(int, int) RETURNS int LANGUAGE plpgsql AS $$BEGIN "
        "CREATE TEMP TABLE IF NOT EXISTS overload_leak (n int); RETURN $1 + $2; END$$"
    )
    try:
        with InProcessBroker(postgres.dsn, pool_size=1) as broker:
            before = pid(broker)
            assert one(broker, "SELECT lower(1, 2)") == (3,)
            assert one(broker, "SELECT to_regclass('pg_temp.overload_leak') IS NULL") == (True,)
            assert pid(broker) != before
    finally:
        admin.run(f"DROP FUNCTION public.{name}(int, int)")
        admin.close()
