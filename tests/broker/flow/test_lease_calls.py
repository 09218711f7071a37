"""A lease's BEGIN, key claim, COMMIT/ROLLBACK and session reset + probe as statements the
connection prepares once (broker/flow/lease.py `_begin`, `_end`), on a real Postgres: prepared
once per connection, the probe still finding what a transaction left, the end after
``DEALLOCATE ALL`` (a DDL step) in an open and in an aborted transaction, and the key's claim
at COMMIT committing once (under a mapped role too: prepared at BEGIN, as the login role)."""

from __future__ import annotations

import uuid
from typing import Any

import pytest

from broker.config import parse_database_url
from broker.flow import lease
from broker.flow.batch import Batch, StatementFailed, begin_calls
from broker.postgres import keys
from broker.postgres.audit import CLEANUP, probe_leaks
from broker.postgres.pg import PgConnection, PgError, TransactionStatus
from broker.postgres.pg import connect as connect_pg
from broker.sql.plan import RequestPlan
from lambda_client._proto.pgbroker.v1 import broker_pb2 as pb

CALLER = "arn:aws:iam::1:role/lease-calls"
# What `Lease.begin` and `Lease.commit` prepare once: BEGIN, the SET LOCALs, the end.
ONCE = ("BEGIN", "SELECT pg_catalog.set_config($1, $2, true)", *lease._END_CALLS)


@pytest.fixture
def conn(keyed_pg: PgConnection) -> PgConnection:
    return keyed_pg  # tests/fixtures/postgres.py: the key store exists


def _begin(conn: PgConnection, timeout_ms: int = 5000) -> None:
    options = Batch(statements=(), plan=RequestPlan(statements=()), application_name="pgb:t:1")
    lease._begin(conn, begin_calls(options, timeout_ms, None))
    assert conn.transaction_status is TransactionStatus.INTRANS


def _commit(conn: PgConnection, claim: keys.KeyClaim | None = None) -> None:
    after = [lease._COMMIT] if claim is None else [*keys.claim_calls(claim), lease._COMMIT]
    lease._end(conn, after, CLEANUP, True, True)


def _prepared(conn: PgConnection) -> dict[str, int]:
    """How many times each statement is prepared on *conn*'s session (protocol-level)."""
    found = conn.execute_simple(
        "SELECT statement, count(*) FROM pg_prepared_statements WHERE NOT from_sql"
        " GROUP BY statement"
    )
    return {str(sql): int(n) for sql, n in found}


def _claim(key: str) -> keys.KeyClaim:
    return keys.KeyClaim(CALLER, key, keys.request_hash(None), 60.0)


def test_the_lease_end_is_prepared_once_and_its_settings_hold(conn: PgConnection) -> None:
    at_connect = conn.execute_simple("SELECT current_setting('application_name')")
    for _ in range(3):
        _begin(conn, timeout_ms=4321)
        settings = conn.execute_simple(
            "SELECT current_setting('statement_timeout'), current_setting('application_name')"
        )
        assert settings == [["4321ms", "pgb:t:1"]]
        _commit(conn)
        assert conn.transaction_status is TransactionStatus.IDLE
        assert probe_leaks(conn.cleanup_rows) == []  # the probe ran behind COMMIT
        assert conn.execute_simple("SELECT current_setting('application_name')") == at_connect
    prepared = _prepared(conn)
    assert {sql: prepared.get(sql) for sql in ONCE} == dict.fromkeys(ONCE, 1)
    assert conn.session_dirty is None


@pytest.mark.parametrize("commit", [True, False])
def test_the_probe_behind_the_end_still_finds_a_leak(conn: PgConnection, commit: bool) -> None:
    _begin(conn)
    # Neither reset by RESET ALL nor undone by ROLLBACK: the connection must be replaced.
    conn.execute_simple("PREPARE leaked AS SELECT 1")
    if commit:
        _commit(conn)
    else:
        lease._end(conn, [lease._ROLLBACK], CLEANUP, False, True)
    assert probe_leaks(conn.cleanup_rows) == ["prepared statements"]
    assert conn.session_dirty == "prepared statements"


def test_a_rollback_after_ddl_and_a_failed_step_resets_and_probes(conn: PgConnection) -> None:
    _begin(conn)
    conn.execute_simple("CREATE TEMP TABLE lease_ddl (id int)")
    conn.drop_statements()  # as a DDL step does: DEALLOCATE ALL ahead of the next request
    with pytest.raises(PgError):
        conn.execute_simple("SELECT 1 / 0")  # the transaction is aborted now
    assert conn.transaction_status.value == "in_error"  # not narrowed: the end changes it
    # Nothing but ROLLBACK can be prepared in an aborted transaction, and the end was dropped.
    with pytest.raises(StatementFailed):
        lease._end(conn, [lease._ROLLBACK], CLEANUP, False, True)
    _begin(conn)
    conn.drop_statements()
    with pytest.raises(PgError):
        conn.execute_simple("SELECT 1 / 0")
    lease._end(conn, [lease._ROLLBACK], CLEANUP, False, False)  # `Lease.end_prepared` False
    assert conn.transaction_status is TransactionStatus.IDLE
    assert probe_leaks(conn.cleanup_rows) == []
    assert conn.session_dirty is None
    assert conn.execute_simple("SELECT to_regclass('pg_temp.lease_ddl') IS NULL") == [[True]]


def _stored(conn: PgConnection, key: str) -> list[list[Any]]:
    return conn.execute_simple(
        f"SELECT request_hash FROM {keys.TABLE} WHERE caller = {keys._literal(CALLER)}"
        f" AND key = {keys._literal(key)}"
    )


def test_the_keyed_commit_after_deallocate_all_commits_the_key_once(
    conn: PgConnection, table: str
) -> None:
    conn.execute_simple(f"CREATE TABLE {table} (id int)")
    key = f"lease-{uuid.uuid4()}"
    _begin(conn)
    conn.execute_simple(f"ALTER TABLE {table} ADD COLUMN note text")  # a DDL step
    conn.drop_statements()
    conn.execute_simple(f"INSERT INTO {table} VALUES (1)")
    _commit(conn, _claim(key))
    assert _stored(conn, key) == [[keys.request_hash(None)]]
    assert probe_leaks(conn.cleanup_rows) == []
    # The application's retry: the claim meets the committed key, nothing more commits.
    _begin(conn)
    conn.execute_simple(f"INSERT INTO {table} VALUES (2)")
    with pytest.raises(StatementFailed) as failure:
        _commit(conn, _claim(key))
    assert keys.is_claimed(failure.value.error)
    lease._replayed(conn, _claim(key))  # an earlier COMMIT's key: it stands
    assert conn.transaction_status is TransactionStatus.IDLE and conn.session_dirty is None
    assert conn.execute_simple(f"SELECT id FROM {table}") == [[1]]
    prepared = _prepared(conn)
    assert all(prepared.get(call.sql) == 1 for call in keys.claim_calls(_claim(key)))
    # An Execute's key (stored with another request's hash) is refused at COMMIT.
    other = keys.KeyClaim(CALLER, f"ex-{uuid.uuid4()}", keys.request_hash(pb.ExecuteRequest()), 60)
    _begin(conn)
    _commit(conn, other)
    _begin(conn)
    with pytest.raises(StatementFailed):
        _commit(conn, _claim(other.key))
    with pytest.raises(keys.KeyReused):
        lease._replayed(conn, _claim(other.key))


def test_a_keyed_commit_under_a_mapped_role_claims_as_the_login_role(
    conn: PgConnection, admin: Any
) -> None:
    role = f"lease_r_{uuid.uuid4().hex[:8]}"
    admin.run(f"CREATE ROLE {role}")  # no USAGE on the store's schema
    try:
        options = Batch(statements=(), plan=RequestPlan(statements=()), role=role)
        mapped = lease.Lease.__new__(lease.Lease)  # only its role and claim_prepared are read
        mapped.role = role
        # Prepared as the mapped role, the claim cannot even be parsed: hence prepared at BEGIN.
        lease._begin(conn, begin_calls(options, 5000, None))
        with pytest.raises(StatementFailed) as failure:
            lease._end(conn, [*keys.claim_calls(_claim("x")), lease._COMMIT], CLEANUP, True, True)
        assert failure.value.error.sqlstate == "42501"
        # Prepared at BEGIN (before SET LOCAL ROLE), as statements; else, as simple SQL.
        for ahead in (True, False):
            key = f"role-{uuid.uuid4()}"
            for replayed in (False, True):
                mapped.claim_prepared = lease._begin(conn, begin_calls(options, 5000, None), ahead)
                assert mapped.claim_prepared is ahead
                assert conn.execute_simple("SELECT current_user") == [[role]]
                after = mapped._keyed_commit(_claim(key))
                assert all(isinstance(part, str) for part in after) is not ahead
                if replayed:
                    with pytest.raises(StatementFailed) as failure:
                        lease._end(conn, after, CLEANUP, True, True)
                    assert keys.is_claimed(failure.value.error)
                else:
                    lease._end(conn, after, CLEANUP, True, True)
                assert conn.transaction_status is TransactionStatus.IDLE
                assert conn.session_dirty is None
            assert _stored(conn, key) == [[keys.request_hash(None)]]
        prepared = _prepared(conn)
        assert {sql: prepared.get(sql) for sql in lease._CLAIM_AHEAD} == dict.fromkeys(
            lease._CLAIM_AHEAD, 1
        )
    finally:
        admin.run(f"DROP ROLE IF EXISTS {role}")


def test_a_claim_that_cannot_be_prepared_costs_no_transaction_its_begin(
    postgres: Any, admin: Any
) -> None:
    """A store dropped since start (here: a database without one): BEGIN still opens the
    transaction, and says the claim is not prepared (a keyed COMMIT then reports why)."""
    database = f"nostore_{uuid.uuid4().hex[:8]}"
    admin.run(f"CREATE DATABASE {database}")
    try:
        url = postgres.dsn.rsplit("/", 1)[0] + f"/{database}?sslmode=disable"
        bare = connect_pg(parse_database_url(url), timeout=5, statement_timeout=30)
        try:
            options = Batch(statements=(), plan=RequestPlan(statements=()), role="pg_monitor")
            assert lease._begin(bare, begin_calls(options, 5000, None), True) is False
            assert bare.transaction_status is TransactionStatus.INTRANS
            assert bare.execute_simple("SELECT current_user") == [["pg_monitor"]]
            lease._end(bare, [lease._ROLLBACK], CLEANUP, False, True)
            assert bare.transaction_status is TransactionStatus.IDLE
        finally:
            bare.close_quietly()
    finally:
        admin.run(f"DROP DATABASE IF EXISTS {database}")
