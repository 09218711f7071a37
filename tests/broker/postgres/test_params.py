"""Parameter binding (`broker.postgres.params`): each value kind becomes the text and type OID
Postgres parses as that value, arrays become array literals, NULLs keep their type, and a value
that cannot be sent is refused naming its placeholder."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from broker.config import parse_database_url
from broker.postgres.params import BadParameter, bind_params, bind_value
from broker.postgres.pg import PgConnection, connect
from lambda_client._proto.pgbroker.v1 import broker_pb2 as pb

INT2, INT4, INT8 = 21, 23, 20
UUID = uuid.UUID("12345678-1234-5678-1234-567812345678")


def array(element_type: int, *values: pb.Value) -> pb.Value:
    return pb.Value(array=pb.Array(element_type=element_type, values=values))


def ints(*numbers: int | None) -> pb.Value:
    return array(
        pb.TYPE_INT64,
        *(pb.Value(null=pb.TYPE_INT64) if n is None else pb.Value(int64=n) for n in numbers),
    )


def texts(*strings: str | None) -> pb.Value:
    return array(
        pb.TYPE_TEXT,
        *(pb.Value(null=pb.TYPE_TEXT) if s is None else pb.Value(text=s) for s in strings),
    )


@pytest.mark.parametrize(
    ("value", "text", "oid"),
    [
        (pb.Value(bool=True), "t", 16),
        (pb.Value(bool=False), "f", 16),
        (pb.Value(float64=1.5), "1.5", 701),
        (pb.Value(float64=-0.0), "-0.0", 701),
        (pb.Value(float64=1e308), "1e+308", 701),
        (pb.Value(float64=float("inf")), "inf", 701),
        (pb.Value(float64=float("-inf")), "-inf", 701),
        (pb.Value(float64=float("nan")), "nan", 701),
        (pb.Value(float64=0.1), "0.1", 701),
        (pb.Value(numeric="12345.678900"), "12345.678900", 1700),
        (pb.Value(numeric="NaN"), "NaN", 1700),
        (pb.Value(text="héllo"), "héllo", 0),
        (pb.Value(text=""), "", 0),
        (pb.Value(bytea=b"\x00\xff\\"), "\\x00ff5c", 17),
        (pb.Value(bytea=b""), "\\x", 17),
        (pb.Value(date=0), "1970-01-01", 1082),
        (pb.Value(date=-1), "1969-12-31", 1082),
        (pb.Value(date=-719162), "0001-01-01", 1082),
        (pb.Value(date=2932896), "9999-12-31", 1082),
        (pb.Value(time=0), "00:00:00.000000", 1083),
        (pb.Value(time=45_296_000_007), "12:34:56.000007", 1083),
        (pb.Value(time=86_400_000_000), "24:00:00.000000", 1083),
        (pb.Value(timestamp=0), "1970-01-01 00:00:00", 1114),
        (pb.Value(timestamp=1), "1970-01-01 00:00:00.000001", 1114),
        (pb.Value(timestamp=-1), "1969-12-31 23:59:59.999999", 1114),
        (pb.Value(timestamptz=0), "1970-01-01 00:00:00+00:00", 1184),
        (
            pb.Value(interval=pb.Interval(months=14, days=-3, microseconds=1_500_000)),
            "14 mons -3 days 1500000 microseconds",
            1186,
        ),
        (pb.Value(uuid=UUID.bytes), str(UUID), 2950),
        (pb.Value(json='{"a": [1, null]}'), '{"a": [1, null]}', 114),
        (pb.Value(jsonb='{"a": 1}'), '{"a": 1}', 3802),
    ],
    ids=lambda v: v if isinstance(v, str | int) else v.WhichOneof("kind"),
)
def test_each_scalar_kind_is_sent_as_text_with_its_type_oid(
    value: pb.Value, text: str, oid: int
) -> None:
    assert bind_value(value, "$1") == (text, oid)


@pytest.mark.parametrize(
    ("number", "oid"),
    [
        (0, INT2),
        (2**15 - 1, INT2),
        (-(2**15), INT2),
        (2**15, INT4),
        (-(2**15) - 1, INT4),
        (2**31 - 1, INT4),
        (-(2**31), INT4),
        (2**31, INT8),
        (-(2**31) - 1, INT8),
        (2**63 - 1, INT8),
        (-(2**63), INT8),
    ],
)
def test_an_integer_takes_the_narrowest_type_that_holds_it(number: int, oid: int) -> None:
    assert bind_value(pb.Value(int64=number), "$1") == (str(number), oid)


@pytest.mark.parametrize(
    ("value", "oid"),
    [
        (pb.Value(), 0),
        (pb.Value(null=pb.TYPE_UNSPECIFIED), 0),
        (pb.Value(null=pb.TYPE_TEXT), 0),
        (pb.Value(null=pb.TYPE_INT64), INT8),
        (pb.Value(null=pb.TYPE_BOOL), 16),
        (pb.Value(null=pb.TYPE_DATE), 1082),
        (pb.Value(null=pb.TYPE_TIMESTAMPTZ), 1184),
        (pb.Value(null=pb.TYPE_JSONB), 3802),
    ],
    ids=lambda v: v if isinstance(v, int) else str(v.null),
)
def test_a_null_is_sent_as_no_text_with_the_oid_of_its_type(value: pb.Value, oid: int) -> None:
    assert bind_value(value, "$1") == (None, oid)


@pytest.mark.parametrize(
    ("value", "text", "oid"),
    [
        (texts("a", "b c"), '{"a","b c"}', 1009),
        (texts('say "hi"', "back\\slash", "{,}"), r'{"say \"hi\"","back\\slash","{,}"}', 1009),
        (texts("NULL", None), '{"NULL",NULL}', 1009),
        (texts(), "{}", 1009),
        (ints(1, 2), '{"1","2"}', 1005),
        (ints(1, 2**20), '{"1","1048576"}', 1007),
        (ints(2**40, None, 1), '{"1099511627776",NULL,"1"}', 1016),
        (ints(), "{}", 1005),
        (ints(None), "{NULL}", 1005),
        (array(pb.TYPE_BOOL, pb.Value(bool=True), pb.Value()), '{"t",NULL}', 1000),
        (array(pb.TYPE_FLOAT64, pb.Value(float64=float("nan"))), '{"nan"}', 1022),
        (array(pb.TYPE_NUMERIC, pb.Value(numeric="1.50")), '{"1.50"}', 1231),
        (array(pb.TYPE_BYTEA, pb.Value(bytea=b"\x01")), '{"\\\\x01"}', 1001),
        (array(pb.TYPE_DATE, pb.Value(date=1)), '{"1970-01-02"}', 1182),
        (array(pb.TYPE_UUID, pb.Value(uuid=UUID.bytes)), '{"' + str(UUID) + '"}', 2951),
        (array(pb.TYPE_JSONB, pb.Value(jsonb='{"k": "v"}')), r'{"{\"k\": \"v\"}"}', 3807),
        (array(pb.TYPE_UNSPECIFIED, pb.Value()), "{NULL}", 0),
    ],
    ids=lambda v: v if isinstance(v, str | int) else "",
)
def test_an_array_is_an_array_literal_with_the_array_type_oid(
    value: pb.Value, text: str, oid: int
) -> None:
    assert bind_value(value, "$1") == (text, oid)


def test_a_nested_array_is_multidimensional_and_its_widest_integer_sets_the_type() -> None:
    matrix = array(pb.TYPE_INT64, ints(1, 2), ints(3, 2**31))
    assert bind_value(matrix, "$1") == ('{{"1","2"},{"3","2147483648"}}', 1016)
    words = array(pb.TYPE_TEXT, texts("a", None), texts('"', "\\"))
    assert bind_value(words, "$1") == (r'{{"a",NULL},{"\"","\\"}}', 1009)


@pytest.mark.parametrize(
    ("value", "words"),
    [
        (pb.Value(time=-1), "time value"),
        (pb.Value(time=86_400_000_001), "time value"),
        (pb.Value(date=2**31 - 1), "date value"),
        (pb.Value(timestamp=2**62), "timestamp value"),
        (pb.Value(timestamptz=-(2**62)), "timestamptz value"),
        (pb.Value(uuid=b"\x00" * 15), "uuid value"),
    ],
    ids=["time-negative", "time-after-24h", "date", "timestamp", "timestamptz", "uuid-length"],
)
def test_a_value_postgres_cannot_hold_is_refused_naming_its_placeholder(
    value: pb.Value, words: str
) -> None:
    with pytest.raises(BadParameter, match=rf"^\$3: {words} cannot be sent to Postgres"):
        bind_value(value, "$3")


def test_a_bad_array_element_is_named_by_its_position() -> None:
    bad = array(pb.TYPE_TIME, array(pb.TYPE_TIME, pb.Value(time=1), pb.Value(time=-5)))
    with pytest.raises(BadParameter, match=r"^\$1\[0\]\[1\]: time value"):
        bind_value(bad, "$1")


def test_bind_params_numbers_placeholders_from_one() -> None:
    values = [pb.Value(int64=7), pb.Value(), pb.Value(text="x"), ints(1)]
    assert bind_params(values) == (["7", None, "x", '{"1"}'], (INT2, 0, 0, 1005))
    assert bind_params([]) == ([], ())
    with pytest.raises(BadParameter, match=r"^\$2: "):
        bind_params([pb.Value(int64=1), pb.Value(time=-1)])


# -- what Postgres makes of the bound text ----------------------------------------------------


@pytest.fixture(scope="module")
def conn(postgres: Any) -> Iterator[PgConnection]:
    connection = connect(
        parse_database_url(postgres.dsn + "?sslmode=disable"), timeout=5, statement_timeout=30
    )
    yield connection
    connection.close_quietly()


@pytest.mark.parametrize(
    ("value", "literal"),
    [
        (pb.Value(int64=-(2**63)), "'-9223372036854775808'::int8"),
        (pb.Value(int64=32767), "32767::int2"),
        (pb.Value(float64=float("-inf")), "'-Infinity'::float8"),
        (pb.Value(float64=5e-324), "5e-324::float8"),
        (pb.Value(numeric="-0.000001"), "-0.000001::numeric"),
        (pb.Value(text="it's"), "'it''s'::text"),
        (pb.Value(bytea=b"\x00\\'"), "'\\x005c27'::bytea"),
        (pb.Value(date=-719162), "'0001-01-01'::date"),
        (pb.Value(time=86_400_000_000), "'24:00'::time"),
        (pb.Value(timestamp=-1), "'1969-12-31 23:59:59.999999'::timestamp"),
        (pb.Value(timestamptz=1), "'1970-01-01 00:00:00.000001+00'::timestamptz"),
        (
            pb.Value(interval=pb.Interval(months=-1, days=40, microseconds=-1)),
            "'-1 mon 40 days -00:00:00.000001'::interval",
        ),
        (pb.Value(uuid=UUID.bytes), f"'{UUID}'::uuid"),
        (pb.Value(jsonb='{"b": 2, "a": [1]}'), """'{"a": [1], "b": 2}'::jsonb"""),
        (texts('q"', "b\\s", None, "NULL"), """ARRAY['q"', 'b\\s', NULL, 'NULL']::text[]"""),
        (ints(1, None, 2**40), "ARRAY[1, NULL, 1099511627776]::int8[]"),
        (array(pb.TYPE_INT64, ints(1, 2), ints(3, 4)), "'{{1,2},{3,4}}'::int2[]"),
        (array(pb.TYPE_BYTEA, pb.Value(bytea=b"\xff")), "ARRAY['\\xff'::bytea]"),
        (pb.Value(null=pb.TYPE_DATE), "NULL::date"),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_postgres_reads_the_bound_text_as_the_value_it_stands_for(
    conn: PgConnection, value: pb.Value, literal: str
) -> None:
    result = conn.run(f"SELECT $1 IS NOT DISTINCT FROM {literal}", [value])
    assert result.rows[0].values[0].bool is True
