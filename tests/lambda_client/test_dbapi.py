"""`lambda_client.dbapi` against a real broker process and Postgres: parameter styles with
tricky SQL, autocommit against transactions, executemany as one request, leases freed by a
connection closed, collected or killed, server-side cursors, and read_sql-style use."""

from __future__ import annotations

import gc
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pg8000.native
import pytest

from devtools.brokerproc import BrokerProcess
from lambda_client import BrokerClient, dbapi, errors
from tests.support import temp_table, wait_until

ROOT = Path(__file__).resolve().parents[2]
IDLE_TIMEOUT = 3.0


@pytest.fixture(scope="module")
def broker(postgres: Any) -> Iterator[BrokerProcess]:
    """A broker with a pool of 4 and an idle-transaction timeout long enough that a freed
    lease is freed by the client, not by the timeout."""
    with BrokerProcess(
        postgres.dsn + "?sslmode=disable",
        pool_size=4,
        auth="none",
        shutdown_grace=2,
        log_level="INFO",
        env={"PGBROKER_IDLE_TRANSACTION_TIMEOUT": str(IDLE_TIMEOUT)},
    ) as process:
        yield process


@pytest.fixture
def conn(broker: BrokerProcess) -> Iterator[dbapi.Connection]:
    connection = dbapi.connect(broker.target)
    yield connection
    connection.close()


@pytest.fixture
def items(postgres: Any) -> Iterator[str]:
    with temp_table(postgres, "items", "id int PRIMARY KEY, name text, price numeric") as name:
        yield name


def stats(broker: BrokerProcess) -> dict[str, int]:
    return dbapi.client_for(broker.target, {}).stats()


def count(admin: pg8000.native.Connection, table: str) -> int:
    return int(admin.run(f"SELECT count(*) FROM {table}")[0][0])


# -- module and connect -------------------------------------------------------------------


def test_module_globals() -> None:
    assert dbapi.apilevel == "2.0"
    assert dbapi.threadsafety == 1
    assert dbapi.paramstyle == "pyformat"
    assert dbapi.Error is errors.Error and dbapi.ProgrammingError is errors.ProgrammingError


def test_connect_reuses_the_process_client(broker: BrokerProcess) -> None:
    first = dbapi.connect(broker.target, autocommit=True)
    second = dbapi.connect(broker.target, autocommit=True)
    assert first.client is second.client
    first.cursor().execute("SELECT 1")
    second.cursor().execute("SELECT 1")
    assert first.client.channels_created == 1
    assert dbapi.connect(broker.target, timeout=5.0).client is first.client  # a connection option
    assert dbapi.connect(broker.target, deadline_margin=0.2).client is not first.client


def test_dbname_is_checked_against_the_database_the_broker_serves(
    broker: BrokerProcess, postgres: Any
) -> None:
    dbapi.connect(broker.target, dbname=postgres.database).close()
    with pytest.raises(dbapi.OperationalError, match=r"serves database .* not 'elsewhere'"):
        dbapi.connect(broker.target, dbname="elsewhere")


@pytest.mark.parametrize("target", ["127.0.0.1:50051/app", "dns:///broker.internal:50051/app"])
def test_a_target_naming_a_database_is_refused_clearly(target: str) -> None:
    with pytest.raises(ValueError, match=r"ends with a path \('/app'\).*dbname="):
        dbapi.connect(target)


# -- parameter styles ---------------------------------------------------------------------


def one(conn: dbapi.Connection, query: str, params: Any = None) -> tuple[Any, ...]:
    cur = conn.cursor()
    cur.execute(query, params)
    row = cur.fetchone()
    assert row is not None
    return row


@pytest.mark.parametrize(
    ("query", "params", "expected"),
    [
        ("SELECT '100%%', %s::int", [1], ("100%", 1)),
        ("SELECT $$a%%b$$, %s::text", ["x"], ("a%b", "x")),
        ("SELECT '50%'", None, ("50%",)),
        ("SELECT '50%%'", None, ("50%%",)),  # untouched without parameters
        ("SELECT '100%%'", [], ("100%",)),  # empty parameters still format
        ("SELECT %(a)s::int + %(a)s::int, %(b)s::text", {"a": 20, "b": "y"}, (40, "y")),
        ("SELECT %(a)s::int", {"a": 1, "unused": 2}, (1,)),
        ("SELECT 7 %% 4, %s::int", [2], (3, 2)),
        ("SELECT %s::text LIKE 'ab%%'", ["abc"], (True,)),
    ],
)
def test_parameter_styles(conn: dbapi.Connection, query: str, params: Any, expected: Any) -> None:
    assert one(conn, query, params) == expected


def test_a_name_used_twice_is_sent_once(conn: dbapi.Connection) -> None:
    cur = conn.cursor()
    cur.execute("SELECT %(x)s::int, pg_typeof(%(x)s)::text", {"x": 5})
    assert cur.fetchall() == [(5, "smallint")]


@pytest.mark.parametrize(
    ("query", "params", "message"),
    [
        ("SELECT %d", [1], "'%d' at position 7"),
        ("SELECT 1 %", [], "at the end"),
        ("SELECT '50%'", [], "at position 10: only %s"),
        ("SELECT %(a", {"a": 1}, "incomplete placeholder"),
        ("SELECT %s, %(a)s", [1], "cannot be mixed"),
        ("SELECT %s, %s", [1], "2 placeholders but 1 parameter"),
        ("SELECT %(a)s", [1], "pass a mapping"),
        ("SELECT %s", {"a": 1}, "pass a sequence"),
        ("SELECT %(a)s", {"b": 1}, "missing: a"),
    ],
)
def test_bad_placeholders_raise_programming_error_before_sending(
    conn: dbapi.Connection, query: str, params: Any, message: str
) -> None:
    with pytest.raises(dbapi.ProgrammingError, match=message):
        conn.cursor().execute(query, params)
    assert not conn.in_transaction  # nothing was sent, no lease taken


def test_unsendable_parameters_are_programming_errors(conn: dbapi.Connection) -> None:
    with pytest.raises(dbapi.ProgrammingError, match="cannot send a value of type set"):
        conn.cursor().execute("SELECT %s", [{1, 2}])


def test_broker_client_query_points_at_dollar_placeholders(broker: BrokerProcess) -> None:
    db = BrokerClient(broker.target)
    with pytest.raises(ValueError, match=r"takes Postgres' \$1.*lambda_client\.dbapi"):
        db.query("SELECT %s::int", [1])
    assert db.channels_created == 0  # refused before anything was sent
    assert db.query("SELECT format('%s', $1::text)", ["x"]).scalar() == "x"


# -- cursors ------------------------------------------------------------------------------


def test_description_rowcount_and_fetching(conn: dbapi.Connection) -> None:
    cur = conn.cursor()
    cur.execute("SELECT g AS n, g::text AS s, now() AS t FROM generate_series(1, 5) g")
    assert [c.name for c in cur.description or []] == ["n", "s", "t"]
    assert [c[1] for c in cur.description or []] == [23, 25, 1184]
    assert cur.description[0][1] == dbapi.NUMBER and cur.description[1][1] == dbapi.STRING
    assert cur.description[2].type_code == dbapi.DATETIME
    assert len(cur.description[0]) == 7
    assert cur.rowcount == 5 and cur.rownumber == 0
    assert cur.fetchone()[:2] == (1, "1")
    cur.arraysize = 2
    assert [r[0] for r in cur.fetchmany()] == [2, 3]
    assert [r[0] for r in cur.fetchall()] == [4, 5]
    assert cur.fetchone() is None and cur.fetchmany(3) == [] and cur.rownumber == 5
    cur.execute("SELECT 1 WHERE false")
    assert cur.rowcount == 0 and cur.description is not None and cur.fetchall() == []


def test_commands_without_rows_have_no_description(conn: dbapi.Connection, items: str) -> None:
    cur = conn.cursor()
    cur.execute(f"INSERT INTO {items} VALUES (1, 'a', 1.5), (2, 'b', 2)")
    assert cur.description is None and cur.rowcount == 2 and cur.statusmessage == "INSERT 0 2"
    with pytest.raises(dbapi.ProgrammingError, match="no results"):
        cur.fetchone()
    cur.execute(f"UPDATE {items} SET name = 'c' WHERE id = %s RETURNING id", [2])
    assert cur.fetchall() == [(2,)] and cur.rowcount == 1
    conn.rollback()


def test_read_sql_style_use(conn: dbapi.Connection, items: str) -> None:
    """What pandas.read_sql does with a DB-API connection: execute, column names from
    description, fetchall; and the dicts a handler builds from them."""
    conn.autocommit = True
    cur = conn.cursor()
    cur.executemany(
        f"INSERT INTO {items} VALUES (%s, %s, %s)", [(i, f"n{i}", i * 1.5) for i in range(4)]
    )
    cur.execute(
        f"SELECT id, name, price FROM {items} WHERE price > %(min)s ORDER BY id", {"min": 1}
    )
    columns = [c[0] for c in cur.description or []]
    frame = {
        name: list(values)
        for name, values in zip(columns, zip(*cur.fetchall(), strict=True), strict=True)
    }
    assert frame["id"] == [1, 2, 3] and frame["name"] == ["n1", "n2", "n3"]
    with conn.cursor() as cur2:
        rows = [
            dict(zip(columns, row, strict=True))
            for row in cur2.execute(f"SELECT id, name, price FROM {items} ORDER BY id")
        ]
    assert len(rows) == 4 and rows[0]["name"] == "n0"
    assert cur2.closed


def test_callproc_calls_a_function(conn: dbapi.Connection) -> None:
    cur = conn.cursor()
    assert cur.callproc("lower", ("FOO",)) == ("FOO",)
    assert cur.fetchall() == [("foo",)]
    cur.callproc("pg_catalog.now")
    assert cur.rowcount == 1
    with pytest.raises(dbapi.ProgrammingError, match="procname"):
        cur.callproc("now(); DROP TABLE x; --")


def test_closed_cursor_and_connection_refuse_use(broker: BrokerProcess) -> None:
    conn = dbapi.connect(broker.target)
    cur = conn.cursor()
    cur.close()
    with pytest.raises(dbapi.InterfaceError, match="cursor is closed"):
        cur.execute("SELECT 1")
    conn.close()
    conn.close()
    with pytest.raises(dbapi.InterfaceError, match="connection is closed"):
        conn.cursor()
    assert cur.nextset is not None


# -- transactions -------------------------------------------------------------------------


def test_autocommit_runs_each_statement_on_its_own(
    broker: BrokerProcess, items: str, admin: pg8000.native.Connection
) -> None:
    conn = dbapi.connect(broker.target, autocommit=True)
    before = stats(broker)
    conn.cursor().execute(f"INSERT INTO {items} VALUES (1, 'a', 1)")
    assert count(admin, items) == 1  # committed at once
    conn.rollback()  # nothing to roll back
    assert count(admin, items) == 1
    after = stats(broker)
    assert after["rpcs_num"] - before["rpcs_num"] == 1
    assert after["leases_num"] == before["leases_num"]


def test_a_transaction_holds_one_lease_until_commit(
    conn: dbapi.Connection, broker: BrokerProcess, items: str, admin: pg8000.native.Connection
) -> None:
    before = stats(broker)
    cur = conn.cursor()
    cur.execute(f"INSERT INTO {items} VALUES (1, 'a', 1)")
    cur.execute(f"INSERT INTO {items} VALUES (2, 'b', 2)")
    assert conn.in_transaction and count(admin, items) == 0
    assert stats(broker)["leases_active"] == before["leases_active"] + 1
    conn.commit()
    assert not conn.in_transaction and count(admin, items) == 2
    after = stats(broker)
    assert after["leases_num"] - before["leases_num"] == 1
    assert after["rpcs_num"] == before["rpcs_num"] + 0  # stats() itself is not counted
    cur.execute(f"DELETE FROM {items}")
    conn.rollback()
    assert count(admin, items) == 2


def test_a_failed_statement_aborts_the_transaction_until_rollback(
    conn: dbapi.Connection, items: str
) -> None:
    cur = conn.cursor()
    cur.execute(f"INSERT INTO {items} VALUES (1, 'a', 1)")
    with pytest.raises(errors.UniqueViolation):
        cur.execute(f"INSERT INTO {items} VALUES (1, 'a', 1)")
    with pytest.raises(errors.InFailedSqlTransaction):
        cur.execute("SELECT 1")
    conn.rollback()
    assert one(conn, f"SELECT count(*) FROM {items}") == (0,)
    cur.execute("SELECT 1")
    with pytest.raises(dbapi.ProgrammingError):
        cur.execute("SELECT * FROM no_such_table")
    with pytest.raises(dbapi.ProgrammingError, match="no results"):  # not the earlier row
        cur.fetchall()
    assert cur.description is None and cur.rowcount == -1
    conn.rollback()


def test_context_manager_commits_or_rolls_back_and_closes(
    broker: BrokerProcess, items: str, admin: pg8000.native.Connection
) -> None:
    with dbapi.connect(broker.target) as conn:
        conn.cursor().execute(f"INSERT INTO {items} VALUES (1, 'a', 1)")
    assert conn.closed and count(admin, items) == 1
    with pytest.raises(ZeroDivisionError), dbapi.connect(broker.target) as conn:
        conn.cursor().execute(f"INSERT INTO {items} VALUES (2, 'b', 2)")
        raise ZeroDivisionError
    assert conn.closed and count(admin, items) == 1


def test_explicit_transaction_blocks_in_autocommit(
    broker: BrokerProcess, items: str, admin: pg8000.native.Connection
) -> None:
    conn = dbapi.connect(broker.target, autocommit=True)
    cur = conn.cursor()
    with conn.transaction():
        cur.execute(f"INSERT INTO {items} VALUES (1, 'a', 1)")
        assert count(admin, items) == 0
        with pytest.raises(errors.UniqueViolation), conn.transaction():  # a savepoint
            cur.execute(f"INSERT INTO {items} VALUES (1, 'a', 1)")
        cur.execute(f"INSERT INTO {items} VALUES (2, 'b', 2)")
    assert count(admin, items) == 2 and not conn.in_transaction
    with pytest.raises(RuntimeError), conn.transaction():
        cur.execute(f"DELETE FROM {items}")
        raise RuntimeError
    assert count(admin, items) == 2


def test_isolation_read_only_and_deferrable_apply_per_transaction(conn: dbapi.Connection) -> None:
    conn.isolation_level = "serializable"
    conn.read_only = True
    conn.deferrable = True
    assert conn.isolation_level is dbapi.IsolationLevel.SERIALIZABLE
    assert one(conn, "SHOW transaction_isolation") == ("serializable",)
    assert one(conn, "SHOW transaction_read_only") == ("on",)
    assert one(conn, "SHOW transaction_deferrable") == ("on",)
    with pytest.raises(dbapi.ProgrammingError, match="while a transaction is open"):
        conn.isolation_level = None
    with pytest.raises(dbapi.ProgrammingError, match="while a transaction is open"):
        conn.autocommit = True
    conn.commit()
    conn.isolation_level = dbapi.IsolationLevel.REPEATABLE_READ
    conn.read_only = None
    assert one(conn, "SHOW transaction_isolation") == ("repeatable read",)
    assert one(conn, "SHOW transaction_read_only") == ("off",)
    conn.rollback()
    conn.isolation_level = None
    assert one(conn, "SHOW transaction_isolation") == ("read committed",)  # server default
    conn.rollback()
    with pytest.raises(ValueError, match="isolation_level"):
        conn.isolation_level = "chaos"


def test_a_transaction_the_broker_ended_fails_until_rollback(conn: dbapi.Connection) -> None:
    cur = conn.cursor()
    cur.execute("SELECT 1")
    time.sleep(IDLE_TIMEOUT + 0.5)  # idle in a transaction: the broker ends it
    with pytest.raises(errors.DeadlineExceeded, match="IDLE_TRANSACTION_TIMEOUT"):
        cur.execute("SELECT 1")
    with pytest.raises(errors.InFailedSqlTransaction, match="rollback"):
        cur.execute("SELECT 1")
    with pytest.raises(errors.InFailedSqlTransaction), conn.transaction():
        pass  # no savepoint in a transaction that is gone
    conn.rollback()
    assert one(conn, "SELECT 2") == (2,)
    conn.rollback()


# -- executemany --------------------------------------------------------------------------


@pytest.mark.parametrize("autocommit", [True, False])
def test_executemany_of_10000_rows_is_one_request(
    broker: BrokerProcess, items: str, admin: pg8000.native.Connection, autocommit: bool
) -> None:
    conn = dbapi.connect(broker.target, autocommit=autocommit)
    rows = [(i, f"name {i}", i / 4) for i in range(10_000)]
    before = stats(broker)
    cur = conn.cursor()
    cur.executemany(f"INSERT INTO {items} (id, name, price) VALUES (%s, %s, %s)", rows)
    conn.commit()
    after = stats(broker)
    assert cur.rowcount == 10_000 and count(admin, items) == 10_000
    requests = (after["rpcs_num"] - before["rpcs_num"]) + (
        after["leases_num"] - before["leases_num"]
    )
    assert requests == 1  # one Transact stream: 10 steps of the broker's 1000 statements


def test_executemany_within_max_statements_is_one_execute_batch(
    broker: BrokerProcess, items: str, admin: pg8000.native.Connection
) -> None:
    conn = dbapi.connect(broker.target, autocommit=True)
    before = stats(broker)
    cur = conn.cursor()
    cur.executemany(
        f"INSERT INTO {items} (id, name) VALUES (%(id)s, %(name)s)",
        [{"id": i, "name": "x"} for i in range(1000)],
    )
    after = stats(broker)
    assert (
        after["rpcs_num"] - before["rpcs_num"] == 1 and after["leases_num"] == before["leases_num"]
    )
    assert cur.rowcount == 1000 and count(admin, items) == 1000
    with pytest.raises(errors.UniqueViolation):  # one batch: all or nothing
        cur.executemany(f"INSERT INTO {items} (id) VALUES (%s)", [(5000,), (0,)])
    assert count(admin, items) == 1000
    cur.executemany(f"INSERT INTO {items} (id) VALUES (%s)", [])
    assert cur.rowcount == 0


# -- leases are freed ---------------------------------------------------------------------


def test_close_without_commit_frees_the_lease(
    broker: BrokerProcess, items: str, admin: pg8000.native.Connection
) -> None:
    active = stats(broker)["leases_active"]
    conn = dbapi.connect(broker.target)
    conn.cursor().execute(f"INSERT INTO {items} VALUES (1, 'a', 1)")
    assert stats(broker)["leases_active"] == active + 1
    conn.close()
    assert stats(broker)["leases_active"] == active  # rolled back at close, not at a timeout
    assert count(admin, items) == 0


def test_a_collected_connection_frees_its_lease(
    broker: BrokerProcess, items: str, admin: pg8000.native.Connection
) -> None:
    active = stats(broker)["leases_active"]
    conn = dbapi.connect(broker.target)
    cur = conn.cursor()
    cur.execute(f"INSERT INTO {items} VALUES (1, 'a', 1)")
    del conn, cur
    gc.collect()
    wait_until(lambda: stats(broker)["leases_active"] == active, timeout=IDLE_TIMEOUT / 2)
    assert count(admin, items) == 0


@pytest.mark.parametrize("how", ["killed", "exits"])
def test_a_process_ending_in_a_transaction_frees_its_lease(
    broker: BrokerProcess, items: str, admin: pg8000.native.Connection, how: str
) -> None:
    active = stats(broker)["leases_active"]
    code = (
        "import sys, time\n"
        "from lambda_client import dbapi\n"
        f"conn = dbapi.connect({broker.target!r})\n"
        f"conn.cursor().execute('INSERT INTO {items} VALUES (1, %s, 1)', ['a'])\n"
        "print('open', flush=True)\n" + ("time.sleep(60)\n" if how == "killed" else "sys.exit(0)\n")
    )
    child = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, cwd=ROOT, env=dict(os.environ)
    )
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == b"open"
        if how == "killed":
            child.send_signal(signal.SIGKILL)
        child.wait(timeout=IDLE_TIMEOUT)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    wait_until(lambda: stats(broker)["leases_active"] == active, timeout=IDLE_TIMEOUT / 2)
    assert count(admin, items) == 0


# -- server-side cursors ------------------------------------------------------------------


def test_a_named_cursor_fetches_in_chunks_within_the_transaction(conn: dbapi.Connection) -> None:
    cur = conn.cursor("big")
    cur.execute("SELECT g, repeat('x', 10) FROM generate_series(1, %s) g", [1000])
    assert [c.name for c in cur.description or []] == ["g", "repeat"]
    assert cur.fetchone() == (1, "x" * 10)
    assert [r[0] for r in cur.fetchmany(3)] == [2, 3, 4]
    cur.itersize = 250
    assert sum(1 for _ in cur) == 996
    assert cur.fetchall() == [] and cur.rowcount == 1000
    cur.execute("SELECT %s::text", ["again"])  # redeclared under the same name
    assert cur.fetchall() == [("again",)]
    cur.close()
    cur = conn.cursor("ends_with_commit")
    cur.execute("SELECT 1")
    conn.commit()
    with pytest.raises(dbapi.ProgrammingError, match="ended with the transaction"):
        cur.fetchone()
    assert not conn.in_transaction  # no transaction opened just to fail
    cur.close()


def test_named_cursor_rules(broker: BrokerProcess) -> None:
    conn = dbapi.connect(broker.target, autocommit=True)
    with pytest.raises(dbapi.NotSupportedError, match="WITH HOLD"):
        conn.cursor("held", withhold=True)
    streamed = conn.cursor("c")  # autocommit: a stream (tests/lambda_client/test_dbapi_stream.py)
    assert streamed.execute("SELECT 1").fetchall() == [(1,)]
    with conn.transaction():
        cur = conn.cursor("c")
        cur.execute("SELECT 1")
        assert cur.fetchall() == [(1,)]
    with pytest.raises(errors.InvalidRequest, match="WITH HOLD"):
        conn.cursor().execute("DECLARE h CURSOR WITH HOLD FOR SELECT 1")


def test_executemany_of_big_values_stays_under_the_request_size_limit(
    broker: BrokerProcess, postgres: Any, admin: pg8000.native.Connection
) -> None:
    """40 values of 300 kB (12 MB) exceed the broker's 8 MiB per request: they go as several
    steps of one Transact stream, still one request in the stats."""
    with temp_table(postgres, "blobs", "id int, body text") as table:
        conn = dbapi.connect(broker.target, autocommit=True)
        body = "x" * 300_000
        before = stats(broker)
        conn.cursor().executemany(
            f"INSERT INTO {table} VALUES (%s, %s)", [(i, body) for i in range(40)]
        )
        after = stats(broker)
        assert count(admin, table) == 40
        assert after["leases_num"] - before["leases_num"] == 1
        assert after["rpcs_num"] == before["rpcs_num"]


def test_executemany_chunks() -> None:
    from lambda_client.dbapi._connection import _chunks

    sets = [[i] for i in range(10)]
    assert [len(c) for c in _chunks("q", sets, 4, 10**6)] == [4, 4, 2]
    assert [len(c) for c in _chunks("q", [["x" * 100]] * 5, 100, 250)] == [2, 2, 1]
    assert [len(c) for c in _chunks("q", [["x" * 1000]] * 2, 100, 10)] == [1, 1]  # never empty
    assert _chunks("q", [], 4, 10) == [[]]
