"""Zero session leaks through SQL the parser cannot see: functions, triggers, views, DO.

Behind every transaction the broker resets the session and probes what cannot be reset in
the same flush (broker/postgres/audit.py ``RESET_SQL``); a pool of one connection makes the
next caller land on the very connection the last one used.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest

import lambda_client as lc
from tests.support import request, rows, wait_until


@pytest.fixture(params=["opaque", "always"])
def broker(start_inproc_broker: Any, request: Any) -> Any:
    return start_inproc_broker(pool_size=1, session_audit=request.param)


@pytest.fixture
def setter(admin: Any, table: str) -> Iterator[str]:
    """A function that sets a custom setting and search_path at session level, as a
    careless or hostile one would; the view and trigger call it without naming it."""
    admin.run(
        f"CREATE FUNCTION {table}_set() RETURNS int LANGUAGE plpgsql AS $$ BEGIN"
        " PERFORM set_config('app.tenant_id', '42', false);"
        " PERFORM set_config('search_path', 'evil', false); RETURN 1; END $$"
    )
    admin.run(f"CREATE VIEW {table}_view AS SELECT {table}_set() AS one")
    admin.run(f"CREATE TABLE {table}_rows (id int)")
    admin.run(
        f"CREATE FUNCTION {table}_trig() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN"
        f" PERFORM {table}_set(); RETURN NEW; END $$"
    )
    admin.run(
        f"CREATE TRIGGER {table}_t BEFORE INSERT ON {table}_rows"
        f" FOR EACH ROW EXECUTE FUNCTION {table}_trig()"
    )
    admin.run(f"CREATE FUNCTION {table}_plain() RETURNS int LANGUAGE sql AS 'SELECT 7'")
    yield table
    admin.run(f"DROP TABLE {table}_rows")
    admin.run(f"DROP VIEW {table}_view")
    admin.run(f"DROP FUNCTION {table}_trig(), {table}_set(), {table}_plain()")


def _next_caller_sees(broker: Any, table: str) -> tuple[Any, Any, Any]:
    result = broker.execute(
        request(
            "SELECT current_setting('app.tenant_id', true), current_setting('search_path'),"
            f" {table}_plain()"  # unqualified: 42883 under search_path 'evil'
        )
    )
    return rows(result.results[0])[0]


def _clean(seen: tuple[Any, Any, Any]) -> None:
    tenant, search_path, plain = seen
    assert tenant in (None, "")  # never '42'
    assert search_path == '"$user", public'
    assert plain == 7


@pytest.mark.parametrize(
    "how",
    [
        "DO $$ BEGIN PERFORM set_config('app.tenant_id', '42', false); END $$",
        "SELECT {t}_set()",
        "SELECT * FROM {t}_view",
        "INSERT INTO {t}_rows VALUES (1)",
    ],
    ids=["do-block", "function", "view", "trigger"],
)
def test_session_settings_set_out_of_sight_do_not_reach_the_next_caller(
    broker: Any, setter: str, how: str
) -> None:
    sql = how.format(t=setter)
    broker.execute(request(sql))  # autocommit
    _clean(_next_caller_sees(broker, setter))
    broker.execute(request(sql, "SELECT 1"))  # BEGIN … COMMIT
    _clean(_next_caller_sees(broker, setter))
    keyed = request(sql, "SELECT 2")
    keyed.idempotency_key = f"reset-{uuid.uuid4()}"
    broker.execute(keyed)  # the keyed COMMIT path
    _clean(_next_caller_sees(broker, setter))
    assert broker.stats()["pool_size"] == 1


def test_an_interactive_transaction_leaves_nothing_behind(broker: Any, setter: str) -> None:
    db = lc.BrokerClient(broker.target, auth=lambda: ())
    with db.begin() as tx:
        tx.query(f"SELECT * FROM {setter}_view")
    _clean(_next_caller_sees(broker, setter))
    with pytest.raises(RuntimeError), db.begin() as tx:
        tx.query(f"SELECT {setter}_set()")
        raise RuntimeError("rolled back")  # set_config(…, false) is undone by ROLLBACK too
    _clean(_next_caller_sees(broker, setter))
    db.close()


def test_a_session_advisory_lock_taken_out_of_sight_is_released(broker: Any, admin: Any) -> None:
    broker.execute(request("DO $$ BEGIN PERFORM pg_advisory_lock(424242); END $$"))
    held = admin.run("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND objid = 424242")
    assert held == [[0]]


def test_state_that_cannot_be_reset_in_place_replaces_the_connection(broker: Any) -> None:
    pid = rows(broker.execute(request("SELECT pg_backend_pid()")).results[0])[0][0]
    broker.execute(request("DO $$ BEGIN EXECUTE 'LISTEN leak_channel'; END $$"))
    after = rows(broker.execute(request("SELECT pg_backend_pid()")).results[0])[0][0]
    assert after != pid
    assert rows(
        broker.execute(request("SELECT count(*) FROM pg_listening_channels()")).results[0]
    ) == [(0,)]


def test_a_streamed_read_leaves_nothing_behind(broker: Any, setter: str) -> None:
    """``Broker.Stream`` commits its READ ONLY transaction with the reset behind it, and
    ``tx.stream`` runs inside a lease whose COMMIT carries it, as a batch's does."""
    db = lc.BrokerClient(broker.target, auth=lambda: ())
    with db.stream(f"SELECT * FROM {setter}_view") as streamed:
        assert [tuple(row) for row in streamed] == [(1,)]
    _clean(_next_caller_sees(broker, setter))
    with db.begin() as tx, tx.stream(f"SELECT * FROM {setter}_view") as streamed:
        assert [tuple(row) for row in streamed] == [(1,)]
    _clean(_next_caller_sees(broker, setter))
    assert broker.stats()["pool_size"] == 1
    db.close()


def test_a_stream_stopped_early_leaves_no_advisory_lock(
    broker: Any, admin: Any, table: str
) -> None:
    """A stream the reader closes mid-way is rolled back and audited on release, as a failed
    batch is: a session advisory lock (taken out of the guard's sight) survives a rollback."""
    admin.run(
        f"CREATE FUNCTION {table}_lock() RETURNS int LANGUAGE plpgsql AS $$ BEGIN"
        " PERFORM pg_advisory_lock(434343); RETURN 1; END $$"
    )
    db = lc.BrokerClient(broker.target, auth=lambda: ())
    sql = f"SELECT {table}_lock(), g FROM generate_series(1, 100000) AS g"
    with db.stream(sql, chunk_rows=10) as streamed:
        next(iter(streamed))  # stop after the first row
    held = "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND objid = 434343"
    wait_until(lambda: admin.run(held) == [[0]], what="the advisory lock released")
    wait_until(lambda: broker.stats()["pool_size"] == 1, what="the pool back to its size")
    db.close()
    admin.run(f"DROP FUNCTION {table}_lock()")
