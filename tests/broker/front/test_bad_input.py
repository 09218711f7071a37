"""Bad statements refused with a clear message: wrong parameter counts, NUL bytes. Each is
refused before anything of the request runs, and leaves the connection usable."""

from __future__ import annotations

import uuid
from typing import Any

import grpc
import pytest

from lambda_client import errors
from tests.support import request, rows, status_of


@pytest.fixture
def broker(start_inproc_broker: Any) -> Any:
    # One connection: every request after a failure runs on the connection that failed.
    return start_inproc_broker(pool_size=1)


def _refused(broker: Any, req: Any) -> tuple[grpc.RpcError, Any]:
    with pytest.raises(grpc.RpcError) as failure:
        broker.execute(req)
    assert failure.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    return failure.value, status_of(failure.value).database_error


def _still_works(broker: Any) -> None:
    assert rows(broker.execute(request(("SELECT $1::int + 1", [41]))).results[0]) == [(42,)]


@pytest.mark.parametrize(
    ("sql", "params", "expected"),
    [
        (
            "SELECT $1::int + $2::int",
            [1],
            "the statement has 2 parameters ($1..$2) but 1 value was",
        ),
        ("SELECT $1::int", [1, 2], "the statement has 1 parameter ($1) but 2 values were"),
        ("SELECT 1", [1], "the statement has no parameters but 1 value was"),
        (
            "SELECT '$1', $$ $2 $$ /* $3 */ -- $4",
            [7],
            "the statement has no parameters but 1 value was",
        ),
    ],
    ids=["too-few", "too-many", "none-expected", "dollar-signs-in-literals-and-comments"],
)
def test_wrong_parameter_count_is_refused_naming_the_counts(
    broker: Any, sql: str, params: list[object], expected: str
) -> None:
    error, db_error = _refused(broker, request((sql, params)))
    assert error.details() == f"statement 0: {expected} given"
    assert (db_error.sqlstate, db_error.statement_index) == ("42601", 0)
    assert "pg8000" not in error.details()
    assert errors.error_class("INVALID_ARGUMENT", db_error.sqlstate) is errors.SyntaxError
    assert issubclass(errors.SyntaxError, errors.ProgrammingError)
    _still_works(broker)


def test_wrong_parameter_count_of_a_cached_statement_is_refused(broker: Any) -> None:
    sql = "SELECT $1::int * 2"
    assert rows(broker.execute(request((sql, [2]))).results[0]) == [(4,)]  # now prepared
    _, db_error = _refused(broker, request((sql, [2, 3])))
    assert db_error.sqlstate == "42601"
    _still_works(broker)


def test_wrong_parameter_count_in_a_batch_sends_nothing_of_it(broker: Any, table: str) -> None:
    # nextval is not rolled back: had the statements before the bad one been sent (BEGIN,
    # then the first group before preparing the third), the sequence would have moved.
    broker.execute(request(f"CREATE TABLE {table} (id serial)"))
    sequence = f"{table}_id_seq"
    error, db_error = _refused(
        broker,
        request(
            f"SELECT nextval('{sequence}')",
            (f"SELECT nextval('{sequence}') + $1", [1]),
            ("SELECT $1::int + $2::int", [2]),
        ),
    )
    assert db_error.statement_index == 2
    assert error.details().startswith("statement 2: the statement has 2 parameters")
    called = broker.execute(request(f"SELECT is_called FROM {sequence}"))
    assert rows(called.results[0]) == [(False,)]
    _still_works(broker)


def test_nul_byte_in_sql_is_refused_before_it_is_sent(broker: Any, table: str) -> None:
    error, db_error = _refused(broker, request("SELECT 'a\x00b'"))
    assert error.details() == (
        "statement 0: SQL text contains a NUL byte (\\x00), which Postgres does not accept"
    )
    assert (db_error.sqlstate, db_error.statement_index) == ("22021", 0)
    _still_works(broker)
    _, db_error = _refused(
        broker, request(f"CREATE TABLE {table} (id int)", f"SELECT 1 -- \x00 {table}")
    )
    assert db_error.statement_index == 1
    exists = broker.execute(request(("SELECT to_regclass($1) IS NULL", [table])))
    assert rows(exists.results[0]) == [(True,)]


def test_nul_byte_in_a_text_parameter_is_refused_by_postgres(broker: Any, table: str) -> None:
    error, db_error = _refused(broker, request(("SELECT $1::text", ["a\x00b"])))
    assert db_error.sqlstate == "22021"
    assert "0x00" in error.details()
    _still_works(broker)
    broker.execute(request(f"CREATE TABLE {table} (s text)"))
    _, db_error = _refused(
        broker,
        request(
            (f"INSERT INTO {table} VALUES ($1)", ["ok"]),
            (f"INSERT INTO {table} VALUES ($1)", ["\x00"]),
        ),
    )
    assert (db_error.sqlstate, db_error.statement_index) == ("22021", 1)
    assert rows(broker.execute(request(f"SELECT count(*) FROM {table}")).results[0]) == [(0,)]


def test_a_function_body_using_its_own_arguments_needs_no_values(broker: Any, admin: Any) -> None:
    """``$1`` in a SQL-standard function body is the function's argument, not a placeholder."""
    name = "add_one_" + uuid.uuid4().hex[:8]
    try:
        broker.execute(
            request(f"CREATE FUNCTION {name}(int) RETURNS int LANGUAGE sql RETURN $1 + 1")
        )
        assert rows(broker.execute(request((f"SELECT {name}($1)", [41]))).results[0]) == [(42,)]
    finally:
        admin.run(f"DROP FUNCTION IF EXISTS {name}(int)")
