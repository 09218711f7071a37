"""The codec alone: Python values to `pgbroker.v1.Value` and back, without a database."""

from __future__ import annotations

import uuid
from datetime import UTC, date, datetime, time, timedelta, timezone
from decimal import Decimal

import pytest

from lambda_client._proto.pgbroker.v1 import broker_pb2 as pb
from lambda_client.codec import Interval, Json, JsonArray, Jsonb, decode, encode, encode_params

ROUND_TRIP = [
    None,
    True,
    False,
    0,
    -(2**63),
    2**63 - 1,
    1.5,
    float("inf"),
    Decimal("123456789012345678901234567890.123456789"),
    "",
    "héllo wörld ✓ 😀",
    b"",
    b"\x00\x01\xff",
    date(1, 1, 1),
    date(2024, 2, 29),
    time(0, 0),
    time(23, 59, 59, 999999),
    datetime(1969, 12, 31, 23, 59, 59, 999999),
    datetime(9999, 12, 31, 23, 59, 59, 999999),
    timedelta(days=-3, microseconds=7),
    Interval(months=14, days=-2, microseconds=3),
    uuid.UUID("12345678-1234-5678-1234-567812345678"),
    {"a": [1, "two", None, {"b": 2.5}]},
    [[1, 2], [3, None]],
    ["x", None, "y"],
    [],
]


@pytest.mark.parametrize("value", ROUND_TRIP, ids=repr)
def test_value_round_trips_exactly(value: object) -> None:
    decoded = decode(encode(value))
    assert decoded == value
    assert type(decoded) is type(value)


def test_aware_datetime_comes_back_as_the_same_instant_in_utc() -> None:
    value = datetime(2024, 3, 10, 2, 30, tzinfo=timezone(timedelta(hours=-5)))
    decoded = decode(encode(value))
    assert decoded == value
    assert decoded.tzinfo == UTC


def test_numeric_nan_round_trips() -> None:
    assert decode(encode(Decimal("NaN"))).is_nan()


def test_ints_beyond_int64_travel_as_exact_numeric() -> None:
    assert encode(2**64).WhichOneof("kind") == "numeric"
    assert decode(encode(2**64)) == Decimal(2**64)


def test_json_wrappers_choose_json_or_jsonb() -> None:
    assert encode(Json([1, 2])).WhichOneof("kind") == "json"
    assert encode(Jsonb([1, 2])).WhichOneof("kind") == "jsonb"
    assert decode(encode(Jsonb([1, 2]))) == [1, 2]


def test_array_element_type_is_inferred_from_non_null_leaves() -> None:
    value = encode([[None, 1], [2, 3]])
    assert value.array.element_type == pb.TYPE_INT64
    assert value.array.values[0].array.element_type == pb.TYPE_INT64


def test_mixed_int_and_big_int_array_widens_to_numeric_and_comes_back_as_ints() -> None:
    value = encode([1, 2**70])
    assert value.array.element_type == pb.TYPE_NUMERIC
    back = decode(value)
    assert back == [1, 2**70] and [type(v) for v in back] == [int, int]


def test_numeric_is_decimal_except_integers_beyond_int64() -> None:
    assert type(decode(pb.Value(numeric="5"))) is Decimal
    assert type(decode(pb.Value(numeric=str(2**63 - 1)))) is Decimal
    assert decode(pb.Value(numeric=str(2**63))) == 2**63
    assert type(decode(pb.Value(numeric=str(-(2**63) - 1)))) is int
    assert type(decode(pb.Value(numeric=str(2**70) + ".0"))) is Decimal
    assert type(decode(pb.Value(numeric="1" * 5000))) is Decimal  # over int()'s digit limit
    decimals = decode(encode([Decimal("1.5"), Decimal("2")]))
    assert [type(v) for v in decimals] == [Decimal, Decimal]


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ([1, object()], r"\$2: cannot send a value of type object"),
        ([[1, "a"]], r"\$1: array elements must share one type"),
        ([{"a": object()}], r"\$1: value is not JSON-serialisable"),
        ([time(1, tzinfo=UTC)], r"\$1: time with a time zone"),
        ("SELECT 1", "params must be a list or tuple"),
        ({"a": 1}, "params must be a list or tuple"),
    ],
)
def test_unmapped_values_raise_type_error_naming_the_parameter(
    params: object, message: str
) -> None:
    with pytest.raises(TypeError, match=message):
        encode_params(params)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("params", "message"),
    [
        (["ok", "\ud800"], r"\$2: text has a lone surrogate '\\ud800' at index 0"),
        ([["a", "b\udfff"]], r"\$1\[1\]: text has a lone surrogate"),
        ([{"k": "\ud800"}], r"\$1: text has a lone surrogate"),
    ],
)
def test_text_that_is_not_utf8_raises_value_error_naming_the_parameter(
    params: list[object], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        encode_params(params)


@pytest.mark.parametrize("obj", [{1: "a", "1": "b"}, Jsonb([{"x": {2: None}}]), Json({None: 1})])
def test_json_object_keys_that_are_not_str_raise_type_error(obj: object) -> None:
    # json.dumps would turn 1 into "1" and {1: "a", "1": "b"} would lose an entry.
    with pytest.raises(TypeError, match=r"\$1: JSON object keys must be str"):
        encode_params([obj])


def test_an_int_beyond_the_str_conversion_limit_travels_as_exact_numeric() -> None:
    value = encode(10**5000)
    assert value.numeric == "1" + "0" * 5000
    assert decode(value) == Decimal(10**5000)


@pytest.mark.parametrize(
    ("interval", "text"),
    [
        (pb.Interval(days=1_000_000_000), "1000000000 days"),
        (
            pb.Interval(days=-1_000_000_000, microseconds=7_200_000_001),
            "-1000000000 days +02:00:00.000001",
        ),
        (pb.Interval(days=999_999_999, microseconds=86_400_000_000), "999999999 days 24:00:00"),
        (
            pb.Interval(days=2**31 - 1, microseconds=2**63 - 1),
            "2147483647 days 2562047788:00:54.775807",
        ),
    ],
)
def test_an_interval_beyond_timedelta_decodes_to_postgres_text(
    interval: pb.Interval, text: str
) -> None:
    assert decode(pb.Value(interval=interval)) == text


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (pb.Value(date=(date(9999, 12, 31) - date(1970, 1, 1)).days + 1), "10000-01-01"),
        (pb.Value(date=(date(1, 1, 1) - date(1970, 1, 1)).days - 1), "0001-12-31 BC"),
        (pb.Value(timestamp=-62_135_596_800_000_000 - 1), "0001-12-31 23:59:59.999999 BC"),
        (pb.Value(timestamptz=253_402_300_800_000_000 + 1_500_000), "10000-01-01 00:00:01.5+00"),
    ],
)
def test_a_date_or_timestamp_beyond_python_decodes_to_postgres_text(
    value: pb.Value, text: str
) -> None:
    assert decode(value) == text


def test_json_python_cannot_parse_decodes_without_raising() -> None:
    big = "9" * 5000  # beyond int()'s 4300-digit limit
    assert decode(pb.Value(jsonb=f'{{"n": [{big}, 1]}}')) == {"n": [Decimal(big), 1]}
    deep = "[" * 5000 + "]" * 5000  # deeper than Python's recursion limit
    assert decode(pb.Value(json=deep)) == deep


def test_time_2400_decodes_to_the_last_microsecond_of_the_day() -> None:
    assert decode(pb.Value(time=86_400_000_000)) == time.max


def test_a_json_array_element_of_a_jsonb_array_is_told_from_a_dimension() -> None:
    """'{"[null, 1]"}'::jsonb[] holds one JSON array; '{{1, 2}}'::jsonb[] is two-dimensional.
    Both decode to nested lists; only the first's inner list is a `JsonArray` (Django's
    ArrayField(JSONField()) reads its elements as JSON text by that)."""
    jsonb = pb.TYPE_JSONB
    one_d = pb.Value(
        array=pb.Array(
            element_type=jsonb, values=[pb.Value(jsonb="[null, 1]"), pb.Value(jsonb="2")]
        )
    )
    two_d = pb.Value(
        array=pb.Array(
            element_type=jsonb,
            values=[
                pb.Value(
                    array=pb.Array(
                        element_type=jsonb, values=[pb.Value(jsonb="1"), pb.Value(jsonb="[2]")]
                    )
                )
            ],
        )
    )
    assert decode(one_d) == [[None, 1], 2]
    assert isinstance(decode(one_d)[0], JsonArray)
    inner = decode(two_d)[0]
    assert inner == [1, [2]] and not isinstance(inner, JsonArray)
    assert isinstance(inner[1], JsonArray)
