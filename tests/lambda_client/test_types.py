"""Every Python type the codec maps makes the round trip client → broker → Postgres → back."""

from __future__ import annotations

import math
import uuid
from datetime import UTC, date, datetime, time, timedelta, timezone
from decimal import Decimal

import pg8000.native
import pytest

from devtools.brokerproc import BrokerProcess
from lambda_client import BrokerClient, Interval, Json, Jsonb

UTC = UTC
CEST = timezone(timedelta(hours=2))

VALUES = [
    None,
    True,
    False,
    0,
    -(2**31),
    2**63 - 1,
    -(2**63),
    10**30,
    1.5,
    0.1,
    -1e300,
    math.inf,
    Decimal("12345.678900"),
    Decimal("-0.000001"),
    Decimal("NaN"),
    "",
    "héllo ✓ 'quoted' \\ back",
    b"",
    b"\x00\xffbytes",
    date(2024, 2, 29),
    date(1, 1, 1),
    time(0, 0),
    time(23, 59, 59, 999999),
    datetime(2024, 2, 29, 12, 30, 5, 123456),
    datetime(1969, 12, 31, 23, 59, 59),
    datetime(2024, 6, 1, 12, 0, tzinfo=UTC),
    datetime(2024, 6, 1, 14, 0, 0, 1, tzinfo=CEST),
    timedelta(0),
    timedelta(days=-1, seconds=5),
    timedelta(days=400, microseconds=7),
    Interval(months=14, days=3, microseconds=5),
    uuid.UUID("12345678-1234-5678-1234-567812345678"),
    {"a": [1, 2, {"b": None}], "ü": "✓"},
    Json({"kept": "as json"}),
    Jsonb([1, "two", None]),
    [1, 2, 3],
    [[1, 2], [3, 4]],
    ["a", None, "c"],
    [Decimal("1.5"), None],
    [True, False],
    [date(2024, 1, 1)],
    [uuid.UUID(int=1)],
    [1, 10**30],
]


def expected(value: object) -> object:
    if isinstance(value, Json | Jsonb):
        return value.obj
    # Beyond int64 an int travels as numeric (an int array with a huge element as numeric[])
    # and comes back as int.
    return value


def same(got: object, want: object) -> bool:
    if isinstance(want, Decimal) and want.is_nan():
        return isinstance(got, Decimal) and got.is_nan()
    return got == want and type(got) is type(want)


def test_every_type_round_trips(broker: BrokerProcess) -> None:
    db = BrokerClient(broker.target)
    results = db.transaction([("SELECT $1", [value]) for value in VALUES])
    for value, result in zip(VALUES, results, strict=True):
        got = result.scalar()
        assert same(got, expected(value)), f"{value!r} came back as {got!r}"


def test_aware_datetimes_come_back_in_utc(broker: BrokerProcess) -> None:
    db = BrokerClient(broker.target)
    got = db.query("SELECT $1", [datetime(2024, 6, 1, 14, 0, tzinfo=CEST)]).scalar()
    assert got == datetime(2024, 6, 1, 12, 0, tzinfo=UTC) and got.utcoffset() == timedelta(0)


def test_nan_float_round_trips(broker: BrokerProcess) -> None:
    assert math.isnan(BrokerClient(broker.target).query("SELECT $1", [math.nan]).scalar())


def test_text_parameters_let_postgres_infer_the_type(broker: BrokerProcess) -> None:
    db = BrokerClient(broker.target)
    result = db.query("SELECT $1::varchar(3) AS v, $2::date + 1 AS d", ["abc", "2024-02-28"])
    assert result.columns == ("v", "d")
    assert result.one() == ("abc", date(2024, 2, 29))


def test_unsupported_type_fails_before_anything_is_sent(broker: BrokerProcess) -> None:
    db = BrokerClient(broker.target)
    db.query("SELECT 1")
    before = db.stats()
    with pytest.raises(TypeError, match=r"\$2: cannot send a value of type set"):
        db.query("SELECT $1, $2", [1, {1, 2}])
    with pytest.raises(TypeError, match=r"\$1"):
        db.execute_many("SELECT $1", [[1], [object()]])
    after = db.stats()
    assert after["rpcs_num"] == before["rpcs_num"]
    assert after["requests_num"] == before["requests_num"]


def test_results_carry_columns_rows_affected_and_tag(broker: BrokerProcess) -> None:
    db = BrokerClient(broker.target)
    _, insert, select, _ = db.transaction(
        [
            "CREATE TEMP TABLE t (id int, name text) ON COMMIT DROP",
            ("INSERT INTO t VALUES ($1, $2), ($3, $4)", [1, "a", 2, "b"]),
            "SELECT id, name FROM t ORDER BY id",
            "DROP TABLE t",
        ]
    )
    assert insert.rows_affected == 2 and insert.command_tag == "INSERT 0 2"
    assert select.columns == ("id", "name")
    assert select.rows == [(1, "a"), (2, "b")]
    assert select.dicts() == [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]
    assert select.command_tag == "SELECT 2"


def test_an_interval_beyond_timedelta_after_commit_comes_back_as_text(
    broker: BrokerProcess, admin: pg8000.native.Connection
) -> None:
    # A decoding error here would make a committed insert look failed, and a retry insert twice.
    db = BrokerClient(broker.target)
    db.query("CREATE TABLE iv_after_commit (id int PRIMARY KEY, d interval)")
    try:
        inserted, _ = db.transaction(
            [
                (
                    "INSERT INTO iv_after_commit VALUES ($1, interval '1000000000 days') "
                    "RETURNING d",
                    [1],
                ),
                "SELECT 1",
            ]
        )
        assert inserted.scalar() == "1000000000 days"
        assert admin.run("SELECT count(*) FROM iv_after_commit") == [[1]]
    finally:
        db.query("DROP TABLE iv_after_commit")


# Values Postgres returns that Python's types cannot hold: each comes back as Postgres' text.
AS_TEXT = [
    "interval '1000000000 days'",
    "interval '-1000000000 days 02:00:00.5'",
    "interval '2147483647 days 2562047788 hours'",
    "date 'infinity'",
    "date '-infinity'",
    "date '10000-01-01'",
    "date '2000-01-01 BC'",
    "timestamp 'infinity'",
    "timestamp '10000-01-01 12:00:00.25'",
    "timestamp '0300-06-01 12:00 BC'",
    "timestamptz '-infinity'",
    "timestamptz '10000-01-01 00:00+00'",
]


def test_values_python_cannot_hold_come_back_as_postgres_text(broker: BrokerProcess) -> None:
    db = BrokerClient(broker.target)
    results = db.transaction(
        ["SET LOCAL TimeZone = 'UTC'"] + [f"SELECT {v}, ({v})::text" for v in AS_TEXT]
    )
    for value, result in zip(AS_TEXT, results[1:], strict=True):
        got, text = result.one()
        assert got == text, f"{value} came back as {got!r}, Postgres says {text!r}"


def test_time_2400_and_json_python_cannot_parse_come_back_without_raising(
    broker: BrokerProcess,
) -> None:
    db = BrokerClient(broker.target)
    big = "9" * 5000  # beyond int()'s 4300-digit limit
    deep = "[" * 5000 + "]" * 5000  # deeper than Python's recursion limit
    row = db.query("SELECT time '24:00', $1::text::jsonb, $2::text::json", [f"[{big}]", deep]).one()
    assert row == (time.max, [Decimal(big)], deep)
