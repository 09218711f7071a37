"""The codec alone: Python values to `pgbroker.v1.Value` and back, without a database."""

from __future__ import annotations

import uuid
from datetime import UTC, date, datetime, time, timedelta, timezone
from decimal import Decimal

import pytest

from lambda_client._proto.pgbroker.v1 import broker_pb2 as pb
from lambda_client.codec import Interval, Json, Jsonb, decode, encode, encode_params

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


def test_mixed_int_and_big_int_array_widens_to_numeric() -> None:
    assert decode(encode([1, 2**70])) == [Decimal(1), Decimal(2**70)]


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
