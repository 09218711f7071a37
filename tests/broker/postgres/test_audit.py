"""The session audit (`broker.postgres.audit`) against the real test Postgres: a session left
as it was found passes; each kind of state that outlives a transaction is named."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pg8000.native
import pytest

from broker.config import parse_database_url
from broker.postgres.audit import audit_session, read_builtin_functions
from broker.postgres.pg import PgConnection, TransactionStatus, connect


@pytest.fixture
def session(postgres: Any) -> Iterator[PgConnection]:
    """A fresh server connection, as the pool opens one; closed after the test (it may be
    dirty on purpose)."""
    conn = connect(
        parse_database_url(postgres.dsn + "?sslmode=disable"), timeout=5, statement_timeout=30
    )
    yield conn
    conn.close_quietly()


@pytest.fixture
def role(admin: pg8000.native.Connection) -> Iterator[str]:
    name = f"audit_role_{uuid.uuid4().hex[:8]}"
    admin.run(f"CREATE ROLE {name}")
    yield name
    admin.run(f"DROP ROLE IF EXISTS {name}")


def test_a_new_session_is_clean(session: PgConnection) -> None:
    assert audit_session(session) == []


def test_state_that_ends_with_its_transaction_leaves_the_session_clean(
    session: PgConnection,
) -> None:
    session.execute_simple("BEGIN")
    session.execute_simple("SET LOCAL work_mem = '8MB'")
    session.run("SELECT pg_advisory_xact_lock(4242)")
    session.execute_simple("CREATE TEMP TABLE gone (x int) ON COMMIT DROP")
    session.execute_simple("DECLARE c CURSOR FOR SELECT 1")
    session.execute_simple("COMMIT")
    session.run("SELECT 1")  # an ordinary statement in autocommit
    assert audit_session(session) == []


@pytest.mark.parametrize(
    ("sql", "found"),
    [
        ("SET work_mem = '8MB'", ["settings"]),
        ("SELECT set_config('search_path', 'pg_catalog', false)", ["settings"]),
        ("LISTEN audit_channel", ["listen"]),
        ("PREPARE audit_plan AS SELECT 1", ["prepared statements"]),
        ("DECLARE audit_cursor CURSOR WITH HOLD FOR SELECT 1", ["cursors"]),
        ("SELECT pg_advisory_lock(4243)", ["advisory locks"]),
        ("SELECT pg_try_advisory_lock_shared(4244)", ["advisory locks"]),
        ("CREATE TEMP TABLE audit_kept (x int)", ["temporary relations"]),
        ("CREATE TEMP VIEW audit_view AS SELECT 1 AS one", ["temporary relations"]),
    ],
)
def test_each_kind_of_session_state_is_named(
    session: PgConnection, sql: str, found: list[str]
) -> None:
    session.run(sql)
    assert audit_session(session) == found


def test_a_role_other_than_the_login_role_is_named(session: PgConnection, role: str) -> None:
    session.execute_simple(f"SET ROLE {role}")
    assert audit_session(session) == ["role"]
    session.execute_simple("RESET ROLE")
    assert audit_session(session) == []


def test_several_kinds_are_named_in_one_round_trip(session: PgConnection) -> None:
    session.execute_simple("SET TimeZone = 'Asia/Tokyo'")
    session.execute_simple("LISTEN audit_channel")
    session.run("SELECT pg_advisory_lock(4245)")
    session.execute_simple("CREATE TEMP TABLE audit_many (x int)")
    assert audit_session(session) == [
        "settings",
        "listen",
        "advisory locks",
        "temporary relations",
    ]


def test_state_undone_before_the_audit_is_not_reported(session: PgConnection) -> None:
    session.execute_simple("SET work_mem = '8MB'")
    session.execute_simple("LISTEN audit_channel")
    session.run("SELECT pg_advisory_lock(4246)")
    session.execute_simple("RESET work_mem")
    session.execute_simple("UNLISTEN *")
    session.run("SELECT pg_advisory_unlock(4246)")
    assert audit_session(session) == []


def test_a_session_inside_a_transaction_is_not_audited(session: PgConnection) -> None:
    # Only an idle connection can be checked; the broker audits after the transaction ends.
    session.execute_simple("BEGIN")
    session.execute_simple("CREATE TEMP TABLE audit_open (x int)")
    assert session.transaction_status is TransactionStatus.INTRANS
    assert audit_session(session) == []
    session.execute_simple("ROLLBACK")
    assert audit_session(session) == []


def test_a_closed_connection_is_not_audited(session: PgConnection) -> None:
    session.close_quietly()
    assert audit_session(session) == []


def test_builtin_functions_leave_out_names_a_user_function_shares(session: PgConnection) -> None:
    builtins = read_builtin_functions(session)
    assert {"lower", "now", "pg_advisory_lock", "set_config"} <= builtins
    session.execute_simple("BEGIN")
    try:
        session.execute_simple(
            "CREATE FUNCTION public.lower(a int, b int) RETURNS int LANGUAGE sql RETURN a"
        )
        shadowed = read_builtin_functions(session)
    finally:
        session.execute_simple("ROLLBACK")
    assert "lower" not in shadowed
    assert builtins - shadowed == {"lower"}
