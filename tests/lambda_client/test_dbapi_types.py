"""Type round trips through `lambda_client.dbapi` against a real broker and Postgres: every
type the codec carries, both ways; types it does not know as their Postgres text (sent as
text with a cast); integers beyond int64 as int."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import UTC, date, datetime, time, timedelta
from decimal import Decimal
from typing import Any

import pg8000.native
import pytest

from devtools.brokerproc import BrokerProcess
from lambda_client import Interval, Json, Jsonb, dbapi


@pytest.fixture(scope="module")
def cur(broker_process: BrokerProcess) -> Iterator[dbapi.Cursor]:
    conn = dbapi.connect(broker_process.target, autocommit=True)
    yield conn.cursor()
    conn.close()


def roundtrip(cur: dbapi.Cursor, value: Any, cast: str = "") -> Any:
    cur.execute(f"SELECT %s{cast}", [value])
    (row,) = cur.fetchall()
    return row[0]


@pytest.mark.parametrize(
    "value",
    [
        None,
        True,
        False,
        0,
        -(2**15),
        2**31,
        2**63 - 1,
        -(2**63),
        2**70,
        -(2**70),
        10**100,
        1.5,
        float("inf"),
        Decimal("12345.678900"),
        Decimal("NaN"),
        Decimal("5"),
        "text with 'quotes' and % and é",
        "",
        b"\x00\xffbytes",
        date(2024, 2, 29),
        time(23, 59, 59, 999999),
        datetime(2024, 1, 2, 3, 4, 5, 6),
        datetime(2024, 1, 2, 3, 4, 5, 6, tzinfo=UTC),
        timedelta(days=-3, seconds=5, microseconds=7),
        Interval(months=14, days=3, microseconds=1),
        uuid.UUID("12345678-1234-5678-1234-567812345678"),
        {"a": [1, 2, {"b": None}], "c": "é"},
        [1, 2, None],
        [[1, 2], [3, 4]],
        ["a", None, "c"],
        [2**70, 1, -5],
        [Decimal("1.5"), Decimal("2")],
        [date(2024, 1, 1)],
    ],
    ids=repr,
)
def test_codec_types_round_trip(cur: dbapi.Cursor, value: Any) -> None:
    back = roundtrip(cur, value)
    assert back == value or (isinstance(value, Decimal) and value.is_nan() and back.is_nan())
    assert type(back) is type(value)
    if isinstance(value, list):
        assert [type(v) for v in back] == [type(v) for v in value]


def test_integers_beyond_int64_round_trip_as_int(cur: dbapi.Cursor) -> None:
    cur.execute("SELECT %s, %s + 1, pg_typeof(%s)::text", [2**70, 2**70, 2**70])
    assert cur.fetchone() == (2**70, 2**70 + 1, "numeric")
    assert cur.description is not None and cur.description[0][1] == dbapi.NUMBER
    cur.execute("SELECT 5::numeric, 2.50::numeric, (2::numeric ^ 70)::numeric(30, 2)")
    assert cur.fetchone() == (Decimal("5"), Decimal("2.50"), Decimal("1180591620717411303424.00"))


def test_json_wrappers(cur: dbapi.Cursor) -> None:
    assert roundtrip(cur, Jsonb([1, "a"])) == [1, "a"]
    assert roundtrip(cur, Json({"k": 1})) == {"k": 1}
    cur.execute("SELECT pg_typeof(%s)::text, pg_typeof(%s)::text", [Json(1), {"a": 1}])
    assert cur.fetchone() == ("json", "jsonb")


@pytest.mark.parametrize(
    ("sql_type", "text"),
    [
        ("inet", "192.168.0.1/24"),
        ("cidr", "10.0.0.0/8"),
        ("macaddr", "08:00:2b:01:02:03"),
        ("int4range", "[1,10)"),
        ("tstzrange", '["2024-01-01 00:00:00+00","2024-02-01 00:00:00+00")'),
        ("money", "$12.34"),
        ("bit(4)", "1010"),
        ("varbit", "10111"),
        ("tsvector", "'cat':1 'fat':2"),
        ("point", "(1,2)"),
        ("timetz", "12:00:00+02"),
        ("xml", "<a>b</a>"),
        ("inet[]", "{127.0.0.1,::1}"),
    ],
)
def test_unknown_types_come_back_as_postgres_text(
    cur: dbapi.Cursor, sql_type: str, text: str
) -> None:
    cur.execute(f"SELECT %s::{sql_type}, %s::{sql_type}::text", [text, text])
    value, as_text = cur.fetchone() or ()
    assert value == as_text and isinstance(value, str)


@pytest.fixture(scope="module")
def user_types(postgres: Any, admin_module: pg8000.native.Connection) -> Iterator[str]:
    suffix = uuid.uuid4().hex[:8]
    admin_module.run(f"CREATE TYPE mood_{suffix} AS ENUM ('sad', 'ok', 'happy')")
    admin_module.run(f"CREATE TYPE pair_{suffix} AS (a int, b text)")
    admin_module.run(f"CREATE DOMAIN posint_{suffix} AS int CHECK (VALUE > 0)")
    admin_module.run(
        f"CREATE TABLE typed_{suffix} (m mood_{suffix}, p pair_{suffix}, d posint_{suffix})"
    )
    yield suffix
    admin_module.run(f"DROP TABLE typed_{suffix}")
    admin_module.run(f"DROP TYPE mood_{suffix}, pair_{suffix}")
    admin_module.run(f"DROP DOMAIN posint_{suffix}")


@pytest.fixture(scope="module")
def admin_module(postgres: Any) -> Iterator[pg8000.native.Connection]:
    from tests.support import connect

    conn = connect(postgres)
    yield conn
    conn.close()


def test_enums_composites_and_domains(cur: dbapi.Cursor, user_types: str) -> None:
    table = f"typed_{user_types}"
    # Text parameters are untyped: Postgres infers the column's enum, composite and domain.
    cur.execute(f"INSERT INTO {table} VALUES (%s, %s, %s)", ["happy", "(1,x)", 5])
    cur.execute(f"SELECT m, p, d, %s::mood_{user_types} FROM {table}", ["ok"])
    assert cur.fetchone() == ("happy", "(1,x)", 5, "ok")
    with pytest.raises(dbapi.IntegrityError):
        cur.execute(f"INSERT INTO {table} (d) VALUES (%s)", [-1])


def test_type_objects_and_constructors() -> None:
    assert dbapi.STRING == 25 and dbapi.STRING == 1043 and dbapi.STRING != 23
    assert dbapi.NUMBER == 1700 and dbapi.DATETIME == 1184 and dbapi.BINARY == 17
    assert dbapi.ROWID == 26
    assert 23 == dbapi.NUMBER  # noqa: SIM300 (the reflected comparison is the one to test)
    assert dbapi.Date(2024, 1, 2) == date(2024, 1, 2)
    assert dbapi.Binary(b"x") == b"x"
    assert isinstance(dbapi.TimestampFromTicks(0), datetime)
    assert isinstance(dbapi.DateFromTicks(0), date) and isinstance(dbapi.TimeFromTicks(0), time)


def test_hstore_comes_back_as_text(
    cur: dbapi.Cursor, admin_module: pg8000.native.Connection
) -> None:
    try:
        admin_module.run("CREATE EXTENSION IF NOT EXISTS hstore")
    except pg8000.native.DatabaseError as exc:
        pytest.skip(f"the hstore extension is not installed here: {exc}")
    cur.execute("SELECT %s::hstore -> 'a', %s::hstore", ['"a"=>"1"', '"b"=>"2"'])
    assert cur.fetchone() == ("1", '"b"=>"2"')
