"""The idempotency-key store's SQL (`broker.postgres.keys`) on a real Postgres."""

from __future__ import annotations

import pytest

from broker.postgres import keys
from broker.postgres.pg import Call, PgConnection

CALLER = "arn:aws:iam::1:role/it's \\ odd é"


@pytest.fixture
def conn(keyed_pg: PgConnection) -> PgConnection:
    return keyed_pg  # tests/fixtures/postgres.py


def _plan(conn: PgConnection, sql: str) -> str:
    return "\n".join(str(row[0]) for row in conn.execute_simple("EXPLAIN " + sql))


def _generic_plan(conn: PgConnection, call: Call, types: str) -> str:
    """EXPLAIN of *call*'s generic plan: the one a connection that prepared it once uses
    after a few runs, whatever its parameters."""
    values = ", ".join("NULL" if v is None else keys._literal(v) for v in call.params)
    conn.execute_simple("SET LOCAL plan_cache_mode = force_generic_plan")
    conn.execute_simple(f"PREPARE plan_check({types}) AS {call.sql}")
    try:
        return _plan(conn, f"EXECUTE plan_check({values})")
    finally:
        conn.execute_simple("DEALLOCATE plan_check")


def test_claim_and_store_find_the_key_by_the_primary_key_in_a_large_store(
    conn: PgConnection,
) -> None:
    """Every keyed transaction claims and then updates its key: a scan of the whole store there
    made each one slower than the last (the store keeps a day of keys)."""
    claim = keys.KeyClaim(CALLER, "key-1", b"\x01", 60)
    delete, _ = keys.claim_calls(claim)
    conn.execute_simple("BEGIN")
    try:
        conn.execute_simple(
            f"INSERT INTO {keys.TABLE} (caller, key, request_hash, expires_at)"
            " SELECT 'other', 'k' || g, '\\x00', now() - interval '1 s'"
            " FROM generate_series(1, 20000) AS g; ANALYZE " + keys.TABLE
        )
        for call, types in (
            (delete, "text, text"),
            (keys.finish_call(claim, b"response"), "text, text, bytea"),
        ):
            plan = _generic_plan(conn, call, types)
            assert "idempotency_keys_pkey" in plan, plan
            assert "Seq Scan" not in plan, plan
        # The simple-protocol claim an interactive transaction's COMMIT sends under a role.
        delete_sql, _ = keys.claim_sql(CALLER, "key-1", b"\x01", 60).split("; ")
        plan = _plan(conn, delete_sql)
        assert "idempotency_keys_pkey" in plan and "Seq Scan" not in plan, plan
    finally:
        conn.execute_simple("ROLLBACK")


def test_callers_and_keys_with_quotes_and_backslashes_round_trip(conn: PgConnection) -> None:
    """The claim and the store as prepared statements (what a keyed batch sends), and the
    claim as SQL with literals (what a keyed COMMIT under a mapped role sends), with
    standard_conforming_strings off, as a session may have it."""
    key = "k'\\x"
    claim = keys.KeyClaim(CALLER, key, b"\x01", 60)
    stored = f"SELECT caller, key, response FROM {keys.TABLE} WHERE key = {keys._literal(key)}"
    odd = "SET LOCAL standard_conforming_strings = off"
    prepared: list[str | Call] = ["BEGIN", odd, *keys.claim_calls(claim)]
    literal: list[str | Call] = ["BEGIN", odd, keys.claim_sql(CALLER, key, b"\x01", 60)]
    for begin in (prepared, literal):
        try:
            conn.run_many(
                [(stored, [])],
                before=begin,
                after=[keys.finish_call(claim, b"\x00\xffresponse")],
            )
            assert conn.execute_simple(stored) == [[CALLER, key, b"\x00\xffresponse"]]
        finally:
            conn.execute_simple("ROLLBACK")
