"""A keyed batch's claim and store as statements the connection prepares once (`keys.claim_calls`,
`keys.finish_call`, `PgConnection.run_many`'s `Call`s), on a real Postgres: prepared once, again
after the statements are dropped and on a new connection, the same exactly-once answers."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from broker.configvalues import parse_database_url
from broker.flow.batch import Batch, StatementFailed, run_batch, run_transaction
from broker.postgres import keys
from broker.postgres.pg import Call, PgConnection, PgError, Phase, TransactionStatus
from broker.postgres.pg import connect as connect_pg
from broker.sql.plan import plan_request
from lambda_client._proto.pgbroker.v1 import broker_pb2 as pb
from tests.support import rows

CALLER = "arn:aws:iam::1:role/keyed-calls 'é' \\"


@pytest.fixture
def conn(keyed_pg: PgConnection) -> PgConnection:
    return keyed_pg  # tests/fixtures/postgres.py


@pytest.fixture
def other(postgres: Any) -> Iterator[PgConnection]:
    """A second broker connection to the same Postgres (as after a reconnect)."""
    url = parse_database_url(postgres.dsn + "?sslmode=disable")
    pg = connect_pg(url, timeout=5, statement_timeout=30)
    yield pg
    pg.close_quietly()


def _batch(table: str, key: str, note: str = "x", **options: Any) -> Batch:
    sqls = [f"INSERT INTO {table} (note) VALUES ('{note}') RETURNING id", "SELECT current_user"]
    request = pb.ExecuteRequest(statements=[pb.Statement(sql=s) for s in sqls])
    claim = keys.KeyClaim(CALLER, key, keys.request_hash(request), 60.0)
    return Batch(
        statements=request.statements,
        plan=plan_request(sqls),
        claim=claim,
        **options,
    )


def _calls() -> list[Call]:
    """The claim's and the store's statements, as a batch sends them (the claim's INSERT
    alone: the delete of an expired key only when the key met had expired)."""
    claim = keys.KeyClaim(CALLER, "k", b"\x01", 60.0)
    return [*keys.claim_calls(claim, delete_expired=False), keys.finish_call(claim, b"response")]


def _count(conn: PgConnection, table: str) -> int:
    return int(conn.execute_simple(f"SELECT count(*) FROM {table}")[0][0])


def _prepared(conn: PgConnection, sql: str) -> int:
    """How many times *sql* is prepared on *conn*'s session."""
    found = conn.execute_simple(
        "SELECT count(*) FROM pg_prepared_statements WHERE statement = " + keys._literal(sql)
    )
    return int(found[0][0])


def _stored(conn: PgConnection, key: str) -> tuple[bytes, bytes | None]:
    found = conn.execute_simple(
        f"SELECT request_hash, response FROM {keys.TABLE} WHERE caller = {keys._literal(CALLER)}"
        f" AND key = {keys._literal(key)}"
    )
    assert len(found) == 1, found
    return found[0][0], found[0][1]


@pytest.fixture
def notes(conn: PgConnection, table: str) -> str:
    conn.execute_simple(f"CREATE TABLE {table} (id serial, note text)")
    return table


def test_the_claim_and_the_store_are_prepared_once_per_connection(
    conn: PgConnection, notes: str
) -> None:
    """Postgres no longer parses and plans them on every keyed transaction."""
    for n in range(3):
        key = f"once-{uuid.uuid4()}"
        results = run_transaction(conn, _batch(notes, key), None, 30)
        assert rows(results[0]) == [(n + 1,)]
        response = _stored(conn, key)[1]
        assert response is not None
        assert list(pb.ExecuteResponse.FromString(response).results) == results
    for call in _calls():
        assert _prepared(conn, call.sql) == 1, call.sql
    assert conn.transaction_status is TransactionStatus.IDLE and conn.session_dirty is None


def test_a_retry_replays_on_another_connection_and_after_the_statements_were_dropped(
    conn: PgConnection, other: PgConnection, notes: str
) -> None:
    key = f"replay-{uuid.uuid4()}"
    first = run_transaction(conn, _batch(notes, key), None, 30)
    # DDL committed: the pool drops every prepared statement (DEALLOCATE ALL ahead of the
    # next request), the claim's and the store's too; they are prepared again.
    conn.drop_statements()
    again = run_transaction(conn, _batch(notes, key), None, 30)
    assert again == first
    assert _count(conn, notes) == 1
    second_key = f"after-drop-{uuid.uuid4()}"
    run_transaction(conn, _batch(notes, second_key), None, 30)
    assert _stored(conn, second_key)[1] is not None
    assert all(_prepared(conn, call.sql) == 1 for call in _calls())
    # A new connection (a reconnect) prepares them afresh and finds the committed key.
    assert run_transaction(other, _batch(notes, key), None, 30) == first
    assert run_transaction(other, _batch(notes, second_key), None, 30) != first
    assert _count(conn, notes) == 2


def test_the_claim_still_works_when_the_store_changed_under_its_plan(
    conn: PgConnection, notes: str
) -> None:
    run_transaction(conn, _batch(notes, f"plan-{uuid.uuid4()}"), None, 30)
    conn.execute_simple(f"ALTER TABLE {keys.TABLE} ADD COLUMN plan_change_test text")
    try:
        key = f"plan-{uuid.uuid4()}"
        first = run_transaction(conn, _batch(notes, key), None, 30)
        assert run_transaction(conn, _batch(notes, key), None, 30) == first
    finally:
        conn.execute_simple(f"ALTER TABLE {keys.TABLE} DROP COLUMN plan_change_test")
    assert _count(conn, notes) == 2


def test_an_expired_key_is_claimed_again_by_another_request(conn: PgConnection, notes: str) -> None:
    key = f"expired-{uuid.uuid4()}"
    first = run_transaction(conn, _batch(notes, key), None, 30)
    with pytest.raises(keys.KeyReused):
        run_transaction(conn, _batch(notes, key, note="other"), None, 30)
    conn.execute_simple(
        f"UPDATE {keys.TABLE} SET expires_at = now() - interval '1 s'"
        f" WHERE key = {keys._literal(key)}"
    )
    batch = _batch(notes, key, note="other")
    fresh = run_transaction(conn, batch, None, 30)
    assert fresh != first and rows(fresh[0]) == [(2,)]
    assert batch.claim is not None
    digest, response = _stored(conn, key)
    assert digest == batch.claim.digest
    assert response is not None and list(pb.ExecuteResponse.FromString(response).results) == fresh


def _expire(conn: PgConnection, key: str) -> None:
    conn.execute_simple(
        f"UPDATE {keys.TABLE} SET expires_at = now() - interval '1 s'"
        f" WHERE key = {keys._literal(key)}"
    )


def test_an_expired_key_reused_by_the_same_request_runs_it_again_and_commits_once(
    conn: PgConnection, notes: str
) -> None:
    """The claim's INSERT alone meets the expired key (23505); the replay read sees it expired,
    and the batch runs once more with the delete ahead of the INSERT: the statements behind
    the failed claim did not run, the second run's did, once, and its response is stored."""
    key = f"expired-same-{uuid.uuid4()}"
    first = run_transaction(conn, _batch(notes, key), None, 30)
    assert run_transaction(conn, _batch(notes, key), None, 30) == first  # live: a replay
    assert _count(conn, notes) == 1
    delete = keys.claim_calls(keys.KeyClaim(CALLER, key, b"", 60.0))[0]
    assert _prepared(conn, delete.sql) == 0  # the fast path sends the INSERT alone
    _expire(conn, key)
    again = run_transaction(conn, _batch(notes, key), None, 30)
    assert rows(again[0]) == [(2,)] and again != first
    assert _count(conn, notes) == 2  # ran once, not twice
    assert _prepared(conn, delete.sql) == 1  # the second run deleted the expired key
    _, response = _stored(conn, key)
    assert response is not None and list(pb.ExecuteResponse.FromString(response).results) == again
    assert conn.execute_simple(
        f"SELECT expires_at > now() FROM {keys.TABLE} WHERE key = {keys._literal(key)}"
    ) == [[True]]
    # Live again: a retry replays the second run.
    assert run_transaction(conn, _batch(notes, key), None, 30) == again
    assert _count(conn, notes) == 2
    assert conn.transaction_status is TransactionStatus.IDLE and conn.session_dirty is None


def test_the_replay_after_a_claim_without_the_delete_tells_an_expired_or_gone_key(
    conn: PgConnection, notes: str
) -> None:
    """`keys.replay` with ``expired_claims``: `ClaimExpired` (claim again) for a key that expired or
    is gone (swept since the INSERT met it); otherwise as before: the stored results,
    `KeyReused`, `KeyInProgress` for a key that is gone."""
    key = f"replay-expiry-{uuid.uuid4()}"
    batch = _batch(notes, key)
    first = run_transaction(conn, batch, None, 30)
    assert batch.claim is not None
    digest = batch.claim.digest
    for expired_claims in (False, True):
        assert keys.replay(conn, CALLER, key, digest, expired_claims=expired_claims) == first
        with pytest.raises(keys.KeyReused):
            keys.replay(conn, CALLER, key, b"other", expired_claims=expired_claims)
    _expire(conn, key)
    for digest_sent in (digest, b"other"):
        with pytest.raises(keys.ClaimExpired):
            keys.replay(conn, CALLER, key, digest_sent, expired_claims=True)
    assert keys.replay(conn, CALLER, key, digest) == first  # the claim deleted it first
    keys.sweep(conn)
    with pytest.raises(keys.ClaimExpired):
        keys.replay(conn, CALLER, key, digest, expired_claims=True)
    with pytest.raises(keys.KeyInProgress):
        keys.replay(conn, CALLER, key, digest)


def test_a_failed_store_commits_neither_the_work_nor_the_key(
    conn: PgConnection, notes: str
) -> None:
    """The store and COMMIT travel as separate messages: COMMIT behind a failed store must
    roll back, and the store's error reach the caller."""
    key = f"store-fails-{uuid.uuid4()}"
    trigger = f"{notes}_refuse"
    conn.execute_simple(
        f"CREATE FUNCTION {trigger}() RETURNS trigger LANGUAGE plpgsql AS"
        " $$BEGIN RAISE EXCEPTION 'refused store' USING ERRCODE = 'P0001'; END$$;"
        f" CREATE TRIGGER {trigger} BEFORE UPDATE ON {keys.TABLE} FOR EACH ROW"
        f" WHEN (NEW.key = {keys._literal(key)}) EXECUTE FUNCTION {trigger}()"
    )
    try:
        with pytest.raises(StatementFailed) as failure:
            run_transaction(conn, _batch(notes, key), None, 30)
    finally:
        conn.execute_simple(f"DROP TRIGGER {trigger} ON {keys.TABLE}; DROP FUNCTION {trigger}()")
    assert failure.value.error.sqlstate == "P0001"
    assert failure.value.error.phase is Phase.AFTER
    assert conn.transaction_status is TransactionStatus.IDLE
    assert _count(conn, notes) == 0
    assert conn.execute_simple(
        f"SELECT count(*) FROM {keys.TABLE} WHERE key = {keys._literal(key)}"
    ) == [[0]]
    run_transaction(conn, _batch(notes, key), None, 30)  # the key is free: it runs now
    assert _count(conn, notes) == 1


def test_a_keyed_batch_with_a_role_claims_as_the_login_role_and_reports_its_position(
    conn: PgConnection, notes: str
) -> None:
    role = f"{notes}_role"
    conn.execute_simple(
        f"CREATE ROLE {role}; GRANT INSERT, SELECT ON {notes} TO {role};"
        f" GRANT USAGE ON SEQUENCE {notes}_id_seq TO {role}"
    )
    try:
        key = f"role-{uuid.uuid4()}"
        ran = run_batch(conn, _batch(notes, key, role=role, report_position=True), None, 30)
        assert rows(ran.results[1]) == [(role,)]  # the work ran as the role
        assert ran.commit_lsn  # read behind COMMIT, in the same flush
        assert _stored(conn, key)[1] is not None  # the store written as the login role
        again = run_batch(conn, _batch(notes, key, role=role, report_position=True), None, 30)
        assert again.results == ran.results and again.commit_lsn
    finally:
        conn.execute_simple(f"DROP OWNED BY {role}; DROP ROLE {role}")
    assert _count(conn, notes) == 1


def test_a_call_that_cannot_be_prepared_fails_its_phase_and_leaves_the_connection_usable(
    conn: PgConnection,
) -> None:
    with pytest.raises(PgError) as failure:
        conn.run_many([("SELECT 1", [])], before=["BEGIN", Call("SELECT * FROM no_such_table")])
    assert failure.value.sqlstate == "42P01" and failure.value.phase is Phase.BEFORE
    assert conn.transaction_status is TransactionStatus.IDLE  # nothing was sent
    result = conn.run_many(
        [("SELECT $1::int", [pb.Value(int64=7)])],
        before=["BEGIN", Call("SELECT set_config('application_name', $1, true)", ("calls",))],
        after=[Call("SELECT 1"), "SELECT current_setting('application_name'); COMMIT"],
    )
    assert rows(result[0]) == [(7,)]
    assert conn.after_rows == [["calls"]]  # the rows of the last simple-protocol SQL
    assert conn.transaction_status is TransactionStatus.IDLE


def test_the_settings_of_a_keyed_batch_hold_for_its_claim_and_its_statements(
    conn: PgConnection, other: PgConnection, notes: str
) -> None:
    """BEGIN and the SET LOCALs go as prepared statements with the claim: the request's
    statement timeout (cut to its deadline) bounds the claim's wait for another attempt."""
    sqls = [
        f"INSERT INTO {notes} (note) VALUES ('x')",
        "SELECT current_setting('application_name'), current_setting('statement_timeout')",
    ]
    request = pb.ExecuteRequest(statements=[pb.Statement(sql=s) for s in sqls])
    key = f"settings-{uuid.uuid4()}"
    claim = keys.KeyClaim(CALLER, key, keys.request_hash(request), 60.0)
    batch = Batch(
        statements=request.statements,
        plan=plan_request(sqls),
        claim=claim,
        application_name="pgbroker:fn:req-1",
    )
    results = run_transaction(conn, batch, time.monotonic() + 20, 30)
    name, timeout = rows(results[1])[0]
    assert name == "pgbroker:fn:req-1"
    assert timeout.endswith("ms") and 17_000 <= int(timeout[:-2]) < 20_000, timeout
    # Another attempt holds a key uncommitted: the claim waits, up to this request's timeout.
    held = f"held-{uuid.uuid4()}"
    other.execute_simple("BEGIN; " + keys.claim_sql(CALLER, held, b"\x01", 60))
    try:
        started = time.monotonic()
        with pytest.raises(keys.KeyInProgress):
            run_transaction(conn, _batch(notes, held), time.monotonic() + 1.0, 30)
        assert 0.5 < time.monotonic() - started < 5
    finally:
        other.execute_simple("ROLLBACK")
    assert conn.transaction_status is TransactionStatus.IDLE
    assert _count(conn, notes) == 1
    run_transaction(conn, _batch(notes, held), None, 30)  # released: it claims now
    assert _count(conn, notes) == 2
