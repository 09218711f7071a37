"""Batches through a real broker on a real Postgres: atomicity, errors, values, session SQL."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import UTC, date, datetime, time, timedelta, timezone
from decimal import Decimal
from typing import Any

import grpc
import pytest

from broker.postgres.audit import CLEANUP
from lambda_client import codec
from lambda_client._proto.pgbroker.v1 import broker_pb2 as pb
from tests.fixtures.brokers import InProcessBroker
from tests.support import request, rows, status_of


@pytest.fixture
def broker(start_inproc_broker: Any) -> Any:
    return start_inproc_broker(pool_size=1)


def test_batch_commits_atomically(broker: Any, table: str) -> None:
    reply = broker.execute(
        request(
            f"CREATE TABLE {table} (id int PRIMARY KEY, balance int)",
            (f"INSERT INTO {table} VALUES ($1, $2), ($3, $4)", [1, 100, 2, 0]),
            (f"UPDATE {table} SET balance = balance - $1 WHERE id = $2", [10, 1]),
            (f"UPDATE {table} SET balance = balance + $1 WHERE id = $2", [10, 2]),
        )
    )
    assert [r.command_tag for r in reply.results] == [
        "CREATE TABLE",
        "INSERT 0 2",
        "UPDATE 1",
        "UPDATE 1",
    ]
    assert [r.rows_affected for r in reply.results] == [-1, 2, 1, 1]
    check = broker.execute(request(f"SELECT id, balance FROM {table} ORDER BY id"))
    assert rows(check.results[0]) == [(1, 90), (2, 10)]
    assert [c.name for c in check.results[0].columns] == ["id", "balance"]
    assert [c.type_oid for c in check.results[0].columns] == [23, 23]


def test_failing_statement_rolls_back_the_batch_and_names_it(broker: Any, table: str) -> None:
    broker.execute(request(f"CREATE TABLE {table} (id int PRIMARY KEY)"))
    with pytest.raises(grpc.RpcError) as failure:
        broker.execute(
            request(
                (f"INSERT INTO {table} VALUES ($1)", [1]),
                (f"INSERT INTO {table} VALUES ($1)", [2]),
                (f"INSERT INTO {table} VALUES ($1)", [1]),
                (f"INSERT INTO {table} VALUES ($1)", [3]),
            )
        )
    assert failure.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    error = status_of(failure.value).database_error
    assert (error.sqlstate, error.statement_index) == ("23505", 2)
    assert "duplicate key" in error.message
    # Nothing of the batch stayed, and the same (only) pooled connection still works.
    reply = broker.execute(request(f"SELECT count(*) FROM {table}"))
    assert rows(reply.results[0]) == [(0,)]
    assert broker.stats()["connections_num"] == 1


def test_error_in_last_statement_rolls_back(broker: Any, table: str) -> None:
    broker.execute(request(f"CREATE TABLE {table} (id int PRIMARY KEY)"))
    with pytest.raises(grpc.RpcError) as failure:
        broker.execute(
            request((f"INSERT INTO {table} VALUES ($1)", [1]), "SELECT 1/0"),
        )
    error = status_of(failure.value).database_error
    assert (error.sqlstate, error.statement_index) == ("22012", 1)
    assert rows(broker.execute(request(f"SELECT count(*) FROM {table}")).results[0]) == [(0,)]


def test_single_statement_runs_without_a_transaction_block(broker: Any, table: str) -> None:
    broker.execute(request(f"CREATE TABLE {table} (id int)"))
    # CREATE INDEX CONCURRENTLY refuses to run inside BEGIN … COMMIT.
    reply = broker.execute(request(f"CREATE INDEX CONCURRENTLY ON {table} (id)"))
    assert reply.results[0].command_tag == "CREATE INDEX"


def test_syntax_error_reports_sqlstate_42601(broker: Any) -> None:
    with pytest.raises(grpc.RpcError) as failure:
        broker.execute(request("SELEC 1"))
    assert failure.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    error = status_of(failure.value).database_error
    assert (error.sqlstate, error.statement_index) == ("42601", 0)


def test_options_begin_a_read_only_serializable_transaction(broker: Any) -> None:
    reply = broker.execute(
        request(
            "SELECT current_setting('transaction_isolation'), "
            "current_setting('transaction_read_only')",
            isolation=pb.ISOLATION_LEVEL_SERIALIZABLE,
            read_only=True,
        )
    )
    assert rows(reply.results[0]) == [("serializable", "on")]


def test_read_only_transaction_refuses_writes(broker: Any, table: str) -> None:
    broker.execute(request(f"CREATE TABLE {table} (id int)"))
    with pytest.raises(grpc.RpcError) as failure:
        broker.execute(request(f"INSERT INTO {table} VALUES (1)", read_only=True))
    assert status_of(failure.value).database_error.sqlstate == "25006"


def test_application_name_shows_the_lambda_invocation(broker: Any, admin: Any) -> None:
    metadata = (("x-lambda-request-id", "req-123"), ("x-lambda-function-name", "orders"))
    single = broker.execute(
        request("SELECT current_setting('application_name')"), metadata=metadata
    )
    batch = broker.execute(
        request("SELECT 1", "SELECT current_setting('application_name')"), metadata=metadata
    )
    assert rows(single.results[0]) == [("pgbroker:orders:req-123",)]
    assert rows(batch.results[1]) == [("pgbroker:orders:req-123",)]
    # Reset afterwards: the idle connection no longer claims the invocation.
    [(pid,)] = rows(broker.execute(request("SELECT pg_backend_pid()")).results[0])
    [[idle_name]] = admin.run("SELECT application_name FROM pg_stat_activity WHERE pid = :p", p=pid)
    assert "req-123" not in idle_name and "pgbroker:-:-" not in idle_name


def test_application_name_keeps_the_whole_request_id_of_a_long_function_name(
    broker: Any,
) -> None:
    request_id = str(uuid.uuid4())
    metadata = (
        ("x-lambda-request-id", request_id),
        ("x-lambda-function-name", "orders-service-prod-ProcessOrderFunction-AbCdEf123456"),
    )
    reply = broker.execute(request("SELECT current_setting('application_name')"), metadata=metadata)
    [(name,)] = rows(reply.results[0])
    assert name.startswith("pgbroker:orders-service")
    assert name.endswith(":" + request_id)
    assert len(name) == 63


@pytest.mark.parametrize(
    "sql",
    ["BEGIN", "commit", "SET search_path = x", "LISTEN x", "PREPARE p AS SELECT 1", "DISCARD ALL"],
)
def test_session_state_sql_is_refused_before_queueing(broker: Any, sql: str) -> None:
    with pytest.raises(grpc.RpcError) as failure:
        broker.execute(request(sql))
    assert failure.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert status_of(failure.value).reason == "SESSION_STATE"


def test_set_local_is_allowed(broker: Any) -> None:
    reply = broker.execute(
        request("SET LOCAL work_mem = '8MB'", "SELECT current_setting('work_mem')")
    )
    assert rows(reply.results[1]) == [("8MB",)]


def test_empty_request_is_a_bad_request(broker: Any) -> None:
    with pytest.raises(grpc.RpcError) as failure:
        broker.execute(pb.ExecuteRequest())
    assert failure.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert status_of(failure.value).reason == "BAD_REQUEST"


def test_response_reports_wait_and_run_time(broker: Any) -> None:
    reply = broker.execute(request("SELECT pg_sleep(0.01)"))
    assert reply.run_us >= 10_000
    assert reply.wait_us >= 0


@pytest.fixture(scope="module")
def value_broker(postgres: Any) -> Iterator[Any]:
    """One broker for the whole value matrix."""
    broker = InProcessBroker(postgres.dsn)
    yield broker
    broker.close()


_VALUES = [
    None,
    True,
    False,
    0,
    -(2**15),
    2**31,
    -(2**63),
    2**63 - 1,
    1.5,
    -0.0,
    float("inf"),
    1e308,
    Decimal("123456789012345678901234567890.123456789012345678901234567890"),
    Decimal("-0.000000000000000000000000000001"),
    Decimal("NaN"),
    "",
    "unicode: żółć ☃ 🐘 \u00a0",
    'quote " backslash \\ comma , braces {}',
    b"",
    b"\x00\x01\xff\x00",
    date(2024, 2, 29),
    date(1, 1, 1),
    time(0, 0),
    time(23, 59, 59, 999999),
    datetime(2024, 1, 2, 3, 4, 5, 678901),
    datetime(2024, 3, 31, 1, 30, tzinfo=timezone(timedelta(hours=-7))),
    datetime(1999, 12, 31, 23, 59, 59, 999999, tzinfo=timezone(timedelta(hours=13, minutes=45))),
    datetime(2024, 1, 1, tzinfo=UTC),
    timedelta(days=-3, microseconds=1),
    timedelta(days=400, hours=5),
    codec.Interval(months=14, days=-3, microseconds=-14_706_789_000),
    uuid.UUID("12345678-1234-5678-1234-567812345678"),
    {"a": [1, 2.5, None, True], "b": {"c": "ü"}},
    codec.Jsonb([1, "two", {"three": 3}]),
    [1, 2, None],
    [[1, 2], [3, 4]],
    [2**40, -1],
    ["a", 'b"c', "d\\e", None, ""],
    [[["deep"]]],
    [Decimal("1.10"), Decimal("2.000000000000000000000000000001")],
    [b"\x00", b"\xff"],
    [date(2020, 1, 1), None],
    [uuid.UUID(int=1)],
    [True, False],
    [1.5, -2.25],
]


@pytest.mark.parametrize("value", _VALUES, ids=lambda v: type(v).__name__)
def test_every_value_type_round_trips_exactly(value_broker: Any, value: Any) -> None:
    broker = value_broker
    reply = broker.execute(request(("SELECT $1", [value])))
    back = codec.decode(reply.results[0].rows[0].values[0])
    expected = value.obj if isinstance(value, codec.Jsonb) else value
    if isinstance(value, Decimal) and value.is_nan():
        assert back.is_nan()
    elif isinstance(value, datetime) and value.tzinfo is not None:
        assert back == value and back.utcoffset() == timedelta(0)
    else:
        assert back == expected
        assert type(back) is type(expected)


def test_values_keep_their_types_in_a_table(value_broker: Any, table: str) -> None:
    broker = value_broker
    columns = (
        "n numeric, t text, v varchar(10), b bytea, ts timestamptz, i interval, "
        "j json, jb jsonb, a int[], ta text[]"
    )
    values = [
        Decimal("3.141592653589793238462643383279"),
        "tekst",
        "short",
        b"\x00\x00",
        datetime(2020, 6, 1, 12, tzinfo=timezone(timedelta(hours=2))),
        codec.Interval(1, 2, 3),
        codec.Json({"k": [1]}),
        {"k": "v"},
        [[1, None], [3, 4]],
        ["x", "y"],
    ]
    placeholders = ", ".join(f"${i}" for i in range(1, len(values) + 1))
    reply = broker.execute(
        request(
            f"CREATE TABLE {table} ({columns})",
            (f"INSERT INTO {table} VALUES ({placeholders})", values),
            f"SELECT * FROM {table}",
        )
    )
    (row,) = rows(reply.results[2])
    expected = list(values)
    expected[6] = {"k": [1]}
    assert list(row) == expected
    kinds = [v.WhichOneof("kind") for v in reply.results[2].rows[0].values]
    assert kinds[6:8] == ["json", "jsonb"]


def test_wrong_parameter_count_is_invalid_argument(broker: Any) -> None:
    with pytest.raises(grpc.RpcError) as failure:
        broker.execute(request(("SELECT $1::int + $2::int", [1])))
    assert failure.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert status_of(failure.value).database_error.sqlstate == "42601"
    assert rows(broker.execute(request("SELECT 1")).results[0]) == [(1,)]


def test_repeated_batch_is_pipelined_and_a_failure_names_the_first_bad_statement(
    broker: Any, table: str
) -> None:
    broker.execute(request(f"CREATE TABLE {table} (id int PRIMARY KEY, n int)"))

    def batch(first: int, second: int) -> pb.ExecuteRequest:
        return request(
            (f"INSERT INTO {table} VALUES ($1, 0)", [first]),
            (f"INSERT INTO {table} VALUES ($1, 0)", [second]),
            (f"UPDATE {table} SET n = n + 1 WHERE id = $1", [first]),
            f"SELECT count(*) FROM {table}",
        )

    # The second and third runs find every statement prepared: one round trip each.
    for i in range(3):
        reply = broker.execute(batch(10 * i + 1, 10 * i + 2))
        assert rows(reply.results[3]) == [(2 * (i + 1),)]
    with pytest.raises(grpc.RpcError) as failure:
        broker.execute(batch(100, 1))  # the second INSERT hits an existing key
    error = status_of(failure.value).database_error
    assert (error.sqlstate, error.statement_index) == ("23505", 1)
    reply = broker.execute(request(f"SELECT count(*), sum(n) FROM {table}"))
    assert rows(reply.results[0]) == [(6, 3)]  # nothing of the failed batch stayed


def test_prepared_statements_are_kept_per_connection_in_an_lru(start_inproc_broker: Any) -> None:
    broker = start_inproc_broker(pool_size=1, statement_cache_size=3)
    broker.execute(request("SELECT 'warm'"))  # the broker's own first-request queries
    before = broker.stats()
    for i in range(6):
        for _ in range(2):  # a text's first run is unnamed; its second is prepared
            assert rows(broker.execute(request(f"SELECT {i}")).results[0]) == [(i,)]
    reply = broker.execute(request("SELECT count(*) FROM pg_prepared_statements"))
    # Evicted statements were closed on the server: only the cache's three remain, besides
    # the broker's own session reset and probe (prepared once, outside the cache).
    assert rows(reply.results[0]) == [(3 + len(CLEANUP),)]
    counts = _statement_counts(before, broker.stats())
    assert (counts["statements_unnamed"], counts["statements_prepared"]) == (7, 6)


def test_a_text_run_once_is_not_prepared(start_inproc_broker: Any) -> None:
    """SQL with literals written in (Django's) runs as the unnamed statement: one round trip,
    and the statements that repeat stay cached."""
    broker = start_inproc_broker(pool_size=1, statement_cache_size=2)
    broker.execute(request("SELECT 'warm'"))
    before = broker.stats()
    query = request(("SELECT $1::int + 1", [1]))
    for _ in range(3):
        assert rows(broker.execute(query).results[0]) == [(2,)]
    for i in range(20):
        assert rows(broker.execute(request(f"SELECT {i}, 'x{i}'")).results[0]) == [(i, f"x{i}")]
    assert rows(broker.execute(query).results[0]) == [(2,)]
    counts = _statement_counts(before, broker.stats())
    assert counts["statements_prepared"] == 1  # the repeated query, once; the 20 never
    assert counts["statements_reused"] == 2
    assert counts["statements_unnamed"] == 21
    reply = broker.execute(request("SELECT statement FROM pg_prepared_statements"))
    left = sorted(rows(reply.results[0]))  # besides the broker's own reset and probe
    assert left == sorted([("SELECT $1::int + 1",), *((sql,) for sql in CLEANUP)])


def _statement_counts(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    keys = ("statements_reused", "statements_unnamed", "statements_prepared")
    return {key: after[key] - before[key] for key in keys}


def test_a_call_that_committed_before_its_session_ended_is_not_retried(
    broker: Any, table: str
) -> None:
    """A procedure may COMMIT inside; a FATAL after that must not look like "nothing ran"."""
    broker.execute(request(f"CREATE TABLE {table} (id int)"))
    broker.execute(
        request(
            f"CREATE PROCEDURE {table}_p() LANGUAGE plpgsql AS $$ BEGIN "
            f"INSERT INTO {table} VALUES (1); COMMIT; "
            "PERFORM pg_terminate_backend(pg_backend_pid()); END $$"
        )
    )
    try:
        with pytest.raises(grpc.RpcError) as failure:
            broker.execute(request(f"CALL {table}_p()"))
        assert failure.value.code() == grpc.StatusCode.UNKNOWN
        assert rows(broker.execute(request(f"SELECT count(*) FROM {table}")).results[0]) == [(1,)]
    finally:
        broker.execute(request(f"DROP PROCEDURE {table}_p()"))


def test_bc_dates_and_timestamps_come_back_as_text_not_as_wrong_ad_values(broker: Any) -> None:
    reply = broker.execute(
        request(
            "SELECT date '0044-03-15 BC', timestamp '2000-01-01 10:00:00 BC', "
            "ARRAY[timestamp '2000-01-01 00:00:00 BC'], date '2024-02-29'"
        )
    )
    assert rows(reply.results[0]) == [
        ("0044-03-15 BC", "2000-01-01 10:00:00 BC", ["2000-01-01 00:00:00 BC"], date(2024, 2, 29))
    ]
