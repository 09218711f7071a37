"""The idempotency-key store's SQL (`broker.postgres.keys`) on a real Postgres."""

from __future__ import annotations

import pytest

from broker.postgres import keys
from broker.postgres.pg import PgConnection

CALLER = "arn:aws:iam::1:role/it's \\ odd é"


@pytest.fixture
def conn(keyed_pg: PgConnection) -> PgConnection:
    return keyed_pg  # tests/fixtures/postgres.py


def _plan(conn: PgConnection, sql: str) -> str:
    return "\n".join(str(row[0]) for row in conn.execute_simple("EXPLAIN " + sql))


def test_claim_and_store_find_the_key_by_the_primary_key_in_a_large_store(
    conn: PgConnection,
) -> None:
    """Every keyed transaction claims and then updates its key: a scan of the whole store there
    made each one slower than the last (the store keeps a day of keys)."""
    conn.execute_simple("BEGIN")
    try:
        conn.execute_simple(
            f"INSERT INTO {keys.TABLE} (caller, key, request_hash, expires_at)"
            " SELECT 'other', 'k' || g, '\\x00', now() - interval '1 s'"
            " FROM generate_series(1, 20000) AS g; ANALYZE " + keys.TABLE
        )
        delete, _ = keys.claim_sql(CALLER, "key-1", b"\x01", 60).split("; ")
        for sql in (delete, keys.finish_sql(CALLER, "key-1", b"response")):
            plan = _plan(conn, sql)
            assert "idempotency_keys_pkey" in plan, plan
            assert "Seq Scan" not in plan, plan
    finally:
        conn.execute_simple("ROLLBACK")


def test_callers_and_keys_with_quotes_and_backslashes_round_trip(conn: PgConnection) -> None:
    key = "k'\\x"
    conn.execute_simple("BEGIN")
    try:
        conn.execute_simple(keys.claim_sql(CALLER, key, b"\x01", 60))
        conn.execute_simple(keys.finish_sql(CALLER, key, b"\x00\xffresponse"))
        conn.execute_simple("SET LOCAL standard_conforming_strings = off")
        conn.execute_simple(keys.finish_sql(CALLER, key, b"again"))
        stored = conn.execute_simple(
            f"SELECT caller, key, response FROM {keys.TABLE} WHERE key = {keys._literal(key)}"
        )
        assert stored == [[CALLER, key, b"again"]]
    finally:
        conn.execute_simple("ROLLBACK")
