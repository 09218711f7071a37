"""Python values ⇄ `pgbroker.v1.Value`: the one codec both the client and the broker use.

=====================  ==========================  ==========================================
Python                 Value kind                  Postgres
=====================  ==========================  ==========================================
None                   null                        NULL
bool                   bool                        boolean
int                    int64 (numeric if larger)   int2 / int4 / int8 / numeric (by value)
float                  float64                     double precision
Decimal                numeric                     numeric (exact, as text)
str                    text                        text (Postgres infers varchar, enum, …)
bytes, bytearray       bytea                       bytea
date                   date                        date
time (naive)           time                        time
datetime (naive)       timestamp                   timestamp
datetime (aware)       timestamptz                 timestamptz (returned in UTC)
timedelta              interval                    interval (days + microseconds)
Interval               interval                    interval with months
UUID                   uuid                        uuid
dict, Jsonb(x)         jsonb                       jsonb
Json(x)                json                        json
list, tuple            array                       array of the elements' type
=====================  ==========================  ==========================================

A list is always an array; wrap a JSON array in `Jsonb` (or `Json`) to send it as JSON, as with
psycopg. A value with no mapping raises `TypeError` naming the parameter (``$2``), and a value
that cannot travel (text with a lone surrogate) `ValueError`, before anything is sent.

Results decode the other way: a numeric that is an integer beyond int64 comes back as `int`
(that is how such an int was sent), other numerics as `Decimal`; intervals without months come
back as `timedelta`, timestamptz as an aware `datetime` in UTC, json/jsonb parsed (a JSON array
inside a json/jsonb array as `JsonArray`, a list, so it differs from a dimension). Decoding
never raises on a value Postgres can return, since a failure after COMMIT would hide a
committed transaction: what Python's types cannot hold comes back as Postgres' text instead (an
interval beyond `timedelta`'s ±999999999 days; dates and timestamps that are infinite, BC or
after 9999, which the broker already sends as text), time 24:00:00 as `time.max`, a JSON
integer beyond Python's int/str conversion limit as `Decimal`, and JSON nested deeper than
Python can parse as its text.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta, timezone
from decimal import Decimal
from typing import Any

from lambda_client._proto.pgbroker.v1 import broker_pb2 as pb

__all__ = [
    "TYPE_OF_KIND",
    "Interval",
    "Json",
    "JsonArray",
    "Jsonb",
    "decode",
    "decode_row",
    "encode",
    "encode_params",
    "utf8_text",
]

_EPOCH = datetime(1970, 1, 1)
_EPOCH_UTC = datetime(1970, 1, 1, tzinfo=timezone.utc)
_EPOCH_DATE = date(1970, 1, 1)
_MICROSECOND = timedelta(microseconds=1)
_DAY_US = 86_400_000_000
_INT64 = (-(2**63), 2**63 - 1)


@dataclass(frozen=True)
class Interval:
    """A Postgres interval kept exact: months and days are not a fixed number of seconds.

    Returned for intervals that have months; intervals without months come back as
    `datetime.timedelta`.
    """

    months: int = 0
    days: int = 0
    microseconds: int = 0


@dataclass(frozen=True)
class Json:
    """Send *obj* as ``json`` (text kept as written by `json.dumps`)."""

    obj: Any


@dataclass(frozen=True)
class Jsonb:
    """Send *obj* as ``jsonb``; the way to send a JSON array, since a list is an array."""

    obj: Any


def encode(value: object, name: str = "value") -> pb.Value:
    """Return the `Value` for *value*; raise `TypeError` naming *name* if it has no mapping."""
    # The commonest parameters first, by exact type (bool and other subclasses of int or str
    # take `_kind_of`'s way): every parameter of every call comes through here.
    if type(value) is int:
        if _INT64[0] <= value <= _INT64[1]:
            return pb.Value(int64=value)
    elif type(value) is str:
        return pb.Value(text=utf8_text(value, name))
    kind, payload = _kind_of(value, name)
    if kind == "array":
        return pb.Value(array=payload)
    if kind == "interval":
        return pb.Value(interval=payload)
    return pb.Value(**{kind: payload})


def encode_params(params: Sequence[object] | None) -> list[pb.Value]:
    """Encode statement parameters, naming a bad one by its placeholder (``$2``)."""
    if params is None:
        return []
    _check_params(params)
    return [encode(value, f"${i}") for i, value in enumerate(params, start=1)]


def add_params(target: Any, params: Sequence[object]) -> None:
    """Append `encode_params` (*params*)'s values to *target*, a ``Statement.params`` field:
    the same values, and the same errors, without a `Value` made and then copied for each
    one. An int64 and a str, most parameters, are added in place (``target.add``), and their
    ``$n`` name is made only for an error: per parameter of every call, this was two thirds
    of building a request (docs/performance.md, "the client library's Python per call")."""
    _check_params(params)
    add = target.add
    low, high = _INT64
    for index, value in enumerate(params, start=1):
        kind = type(value)
        if kind is int and low <= value <= high:  # type: ignore[operator]
            add(int64=value)
        elif kind is str and value.isascii():  # type: ignore[attr-defined]
            add(text=value)
        else:
            target.append(encode(value, f"${index}"))


def _check_params(params: Sequence[object]) -> None:
    cls = type(params)  # list and tuple, the usual ones, need no isinstance checks
    if (
        cls is not list
        and cls is not tuple
        and (isinstance(params, str | bytes | dict) or not isinstance(params, Sequence))
    ):
        raise TypeError(
            f"params must be a list or tuple of values for $1..$n, not {type(params).__name__}"
        )


def decode(value: pb.Value) -> Any:
    """Return the Python value a `Value` stands for (see the module docstring)."""
    kind = value.WhichOneof("kind")
    if kind is None or kind == "null":
        return None
    return _DECODERS[kind](getattr(value, kind))


def decode_row(values: Iterable[pb.Value]) -> tuple[Any, ...]:
    """Decode one result row into a tuple (`decode` inlined: this runs for every value of
    every result, where a call per value was a third of the row's cost)."""
    row: list[Any] = []
    for value in values:
        kind = value.WhichOneof("kind")
        if kind is None or kind == "null":
            row.append(None)
        else:
            row.append(_DECODERS[kind](getattr(value, kind)))
    return tuple(row)


# -- encoding -----------------------------------------------------------------------------


def _kind_of(value: object, name: str) -> tuple[str, Any]:
    """The oneof field name and its payload for *value*."""
    # Order matters: bool is an int, datetime is a date.
    if value is None:
        return "null", pb.TYPE_UNSPECIFIED
    if isinstance(value, bool):
        return "bool", value
    if isinstance(value, int):
        if _INT64[0] <= value <= _INT64[1]:
            return "int64", value
        # Via Decimal: str() refuses ints over 4300 digits (sys.get_int_max_str_digits()).
        return "numeric", str(Decimal(value))
    if isinstance(value, float):
        return "float64", value
    if isinstance(value, Decimal):
        if value.is_snan():
            raise TypeError(f"{name}: signalling NaN has no Postgres value")
        return "numeric", str(value)
    if isinstance(value, str):
        return "text", utf8_text(value, name)
    if isinstance(value, bytes | bytearray | memoryview):
        return "bytea", bytes(value)
    if isinstance(value, datetime):
        if value.tzinfo is None or value.utcoffset() is None:
            return "timestamp", (value - _EPOCH) // _MICROSECOND
        return "timestamptz", (value - _EPOCH_UTC) // _MICROSECOND
    if isinstance(value, date):
        return "date", (value - _EPOCH_DATE).days
    if isinstance(value, time):
        return "time", _time_micros(value, name)
    if isinstance(value, timedelta):
        return "interval", pb.Interval(
            days=value.days, microseconds=value.seconds * 1_000_000 + value.microseconds
        )
    if isinstance(value, Interval):
        return "interval", pb.Interval(
            months=value.months, days=value.days, microseconds=value.microseconds
        )
    # A UUID instance exists only once its module is loaded: no import (platform, …) here.
    uuids = sys.modules.get("uuid")
    if uuids is not None and isinstance(value, uuids.UUID):
        return "uuid", value.bytes
    if isinstance(value, dict):
        return "jsonb", _dumps(value, name)
    if isinstance(value, Jsonb):
        return "jsonb", _dumps(value.obj, name)
    if isinstance(value, Json):
        return "json", _dumps(value.obj, name)
    if isinstance(value, list | tuple):
        return "array", _array(value, name)
    raise TypeError(
        f"{name}: cannot send a value of type {type(value).__name__} to Postgres; "
        "use int, float, Decimal, str, bytes, bool, None, date, time, datetime, timedelta, "
        "UUID, dict (jsonb), Json/Jsonb, or a list of these"
    )


def _time_micros(value: time, name: str) -> int:
    if value.tzinfo is not None:
        raise TypeError(
            f"{name}: time with a time zone (timetz) is not supported; use a naive time"
        )
    return ((value.hour * 60 + value.minute) * 60 + value.second) * 1_000_000 + value.microsecond


def utf8_text(text: str, name: str) -> str:
    """*text*, or `ValueError` naming *name* if it cannot be sent as UTF-8 (a lone surrogate,
    which protobuf would refuse only while serialising, naming nothing)."""
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise ValueError(
                f"{name}: text has a lone surrogate {text[exc.start]!r} at index {exc.start}; "
                "it cannot be encoded as UTF-8"
            ) from exc
    return text


def _dumps(obj: Any, name: str) -> str:
    try:
        text = json.dumps(obj, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError, RecursionError) as exc:
        raise TypeError(f"{name}: value is not JSON-serialisable: {exc}") from exc
    # Checked after dumps, which has refused cycles.
    _check_keys(obj, name)
    return utf8_text(text, name)


def _check_keys(obj: Any, name: str) -> None:
    """`TypeError` naming *name* if a dict in *obj* (or nested in its dicts, lists and
    tuples) has a key that is not a str: json.dumps would turn 1 into "1", and
    {1: "a", "1": "b"} would silently lose an entry."""
    stack = [obj]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            for key, value in item.items():
                if not isinstance(key, str):
                    raise TypeError(
                        f"{name}: JSON object keys must be str, got {key!r} ({type(key).__name__})"
                    )
                stack.append(value)
        elif isinstance(item, list | tuple):
            stack.extend(item)


# The Value oneof field for each element `Type` (and back): the broker picks parameter oids by it.
TYPE_OF_KIND = {
    "bool": pb.TYPE_BOOL,
    "int64": pb.TYPE_INT64,
    "float64": pb.TYPE_FLOAT64,
    "numeric": pb.TYPE_NUMERIC,
    "text": pb.TYPE_TEXT,
    "bytea": pb.TYPE_BYTEA,
    "date": pb.TYPE_DATE,
    "time": pb.TYPE_TIME,
    "timestamp": pb.TYPE_TIMESTAMP,
    "timestamptz": pb.TYPE_TIMESTAMPTZ,
    "interval": pb.TYPE_INTERVAL,
    "uuid": pb.TYPE_UUID,
    "json": pb.TYPE_JSON,
    "jsonb": pb.TYPE_JSONB,
}


def _array(items: Sequence[object], name: str) -> pb.Array:
    """An array whose element type is that of its non-null leaves (ints widen to numeric)."""
    values = [encode(item, f"{name}[{i}]") for i, item in enumerate(items)]
    kinds = {kind for v in values if (kind := _leaf_kind(v)) is not None}
    if kinds == {"int64", "numeric"}:
        kinds = {"numeric"}
        values = [_as_numeric(v) for v in values]
    if len(kinds) > 1:
        raise TypeError(f"{name}: array elements must share one type, got {sorted(kinds)}")
    element_type = TYPE_OF_KIND[kinds.pop()] if kinds else pb.TYPE_UNSPECIFIED
    return pb.Array(element_type=element_type, values=values)


def _leaf_kind(value: pb.Value) -> str | None:
    kind = value.WhichOneof("kind")
    if kind == "array":
        element_type = value.array.element_type
        return None if element_type == pb.TYPE_UNSPECIFIED else _KIND_OF_TYPE[element_type]
    return None if kind == "null" else kind


def _as_numeric(value: pb.Value) -> pb.Value:
    kind = value.WhichOneof("kind")
    if kind == "int64":
        return pb.Value(numeric=str(value.int64))
    if kind == "array":
        return pb.Value(
            array=pb.Array(
                element_type=pb.TYPE_NUMERIC, values=[_as_numeric(v) for v in value.array.values]
            )
        )
    return value


_KIND_OF_TYPE = {t: k for k, t in TYPE_OF_KIND.items()}


# -- decoding -----------------------------------------------------------------------------
# Never raise on a value Postgres can return: decoding happens after COMMIT, and an exception
# there would make a committed transaction look failed (and a retry insert twice).


def _decode_interval(value: pb.Interval) -> timedelta | Interval | str:
    if value.months:
        return Interval(value.months, value.days, value.microseconds)
    try:
        return timedelta(days=value.days, microseconds=value.microseconds)
    except OverflowError:  # beyond timedelta's ±999999999 days
        return _interval_text(value.days, value.microseconds)


def _interval_text(days: int, micros: int) -> str:
    """Postgres' output (IntervalStyle postgres) for an interval without months:
    ``1000000000 days``, ``-1000000000 days +02:00:00``."""
    parts = [f"{days} day{'' if days == 1 else 's'}"] if days else []
    if micros or not days:
        sign = "-" if micros < 0 else "+" if days < 0 else ""
        parts.append(sign + _clock(abs(micros)))
    return " ".join(parts)


def _clock(micros: int) -> str:
    """``HH:MM:SS`` (hours may pass 24) and the fraction without trailing zeros."""
    seconds, fraction = divmod(micros, 1_000_000)
    minutes, second = divmod(seconds, 60)
    hours, minute = divmod(minutes, 60)
    text = f"{hours:02d}:{minute:02d}:{second:02d}"
    return f"{text}.{fraction:06d}".rstrip("0") if fraction else text


def _decode_time(micros: int) -> time:
    seconds, micro = divmod(micros, 1_000_000)
    minutes, second = divmod(seconds, 60)
    hour, minute = divmod(minutes, 60)
    if hour == 24:  # Postgres allows 24:00:00; Python's time does not
        return time.max
    return time(hour, minute, second, micro)


# The broker sends infinite, BC and after-9999 dates and timestamps as text already; these
# fallbacks keep the int forms total too.
def _decode_date(days: int) -> date | str:
    try:
        return _EPOCH_DATE + timedelta(days=days)
    except OverflowError:
        return _date_text(days)


def _decode_timestamp(micros: int) -> datetime | str:
    try:
        return _EPOCH + micros * _MICROSECOND
    except OverflowError:
        days, rest = divmod(micros, _DAY_US)
        return _date_text(days, f" {_clock(rest)}")


def _decode_timestamptz(micros: int) -> datetime | str:
    try:
        return _EPOCH_UTC + micros * _MICROSECOND
    except OverflowError:
        days, rest = divmod(micros, _DAY_US)
        return _date_text(days, f" {_clock(rest)}+00")


def _date_text(days: int, clock: str = "") -> str:
    """Postgres' ISO output for the day *days* after 1970-01-01, any year: ``10000-01-01``,
    ``0300-01-01 BC`` (proleptic Gregorian, year 0 is 1 BC; H. Hinnant's civil_from_days)."""
    z = days + 719_468
    era, day_of_era = divmod(z, 146_097)
    year_of_era = (
        day_of_era - day_of_era // 1460 + day_of_era // 36_524 - day_of_era // 146_096
    ) // 365
    day_of_year = day_of_era - (365 * year_of_era + year_of_era // 4 - year_of_era // 100)
    m = (5 * day_of_year + 2) // 153
    day = day_of_year - (153 * m + 2) // 5 + 1
    month = m + 3 if m < 10 else m - 9
    year = year_of_era + era * 400 + (month <= 2)
    if year <= 0:
        return f"{1 - year:04d}-{month:02d}-{day:02d}{clock} BC"
    return f"{year:04d}-{month:02d}-{day:02d}{clock}"


def _decode_json(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        pass  # an integer over int()'s digit limit (sys.get_int_max_str_digits()): see below
    except RecursionError:
        return text  # nested deeper than Python's parser goes; Postgres allows more
    try:
        return json.loads(text, parse_int=_exact_int)
    except (ValueError, RecursionError):
        return text


def _exact_int(digits: str) -> int | Decimal:
    try:
        return int(digits)
    except ValueError:
        return Decimal(digits)


def _decode_numeric(text: str) -> Decimal | int:
    """numeric text as `Decimal`, except an integer beyond int64, which comes back as `int`:
    an `int` is sent as numeric only when it is that large, so it round-trips (a `Decimal`
    that large and integral comes back as `int` too; it compares equal)."""
    if len(text) >= 19 and _INTEGER.fullmatch(text):
        try:
            number = int(text)
        except ValueError:  # over int()'s digit limit (sys.get_int_max_str_digits())
            return Decimal(text)
        if not _INT64[0] <= number <= _INT64[1]:
            return number
    return Decimal(text)


class JsonArray(list):  # type: ignore[type-arg]
    """A JSON array that is an element of a json[]/jsonb[] array: a list, which a caller can
    tell from the array's own dimensions (plain lists): ``'{"[1, 2]"}'::jsonb[]`` is
    ``[JsonArray([1, 2])]``, ``'{{1, 2}}'::jsonb[]`` is ``[[1, 2]]``."""


def _decode_array(array: pb.Array) -> list[Any]:
    """An array's elements; a numeric array holding an integer beyond int64 comes back with
    all its integral elements as `int`, as `encode` widened a list of ints to numeric; a JSON
    array element of a json/jsonb array as `JsonArray`."""
    items = [decode(v) for v in array.values]
    if array.element_type == pb.TYPE_NUMERIC and _holds_big_int(items):
        return _integral_as_int(items)
    if array.element_type in (pb.TYPE_JSON, pb.TYPE_JSONB):
        return [
            JsonArray(item) if isinstance(item, list) and v.WhichOneof("kind") != "array" else item
            for item, v in zip(items, array.values, strict=True)
        ]
    return items


def _holds_big_int(items: list[Any]) -> bool:
    return any(
        (isinstance(i, int) and not isinstance(i, bool))
        or (isinstance(i, list) and _holds_big_int(i))
        for i in items
    )


def _integral_as_int(items: list[Any]) -> list[Any]:
    return [
        _integral_as_int(i)
        if isinstance(i, list)
        else int(i)
        if isinstance(i, Decimal) and i.is_finite() and i.as_tuple().exponent == 0
        else i
        for i in items
    ]


_INTEGER = re.compile(r"-?[0-9]+")


def _decode_uuid(data: bytes) -> Any:
    import uuid  # on the first UUID decoded, not at import (cold starts)

    return uuid.UUID(bytes=data)


_DECODERS: dict[str, Any] = {
    "bool": bool,
    "int64": int,
    "float64": float,
    "numeric": _decode_numeric,
    "text": str,
    "bytea": bytes,
    "date": _decode_date,
    "time": _decode_time,
    "timestamp": _decode_timestamp,
    "timestamptz": _decode_timestamptz,
    "interval": _decode_interval,
    "uuid": _decode_uuid,
    "json": _decode_json,
    "jsonb": _decode_json,
    "array": _decode_array,
}
