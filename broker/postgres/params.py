"""Statement parameters: `pgbroker.v1.Value` -> (text, type OID), chosen like psycopg 3.

Every parameter is sent in Postgres' text format with an explicit OID, so the server parses
it exactly as it would a literal of that type:

* int64 -> int2, int4 or int8 by value (psycopg's choice), so ``WHERE small_col = $1`` and
  ``$1 + 1`` resolve without casts; numeric text -> numeric;
* text -> OID 0 (unknown) so Postgres infers varchar, enum, citext, … from the statement;
* every other kind -> its own OID; a typed NULL carries its type's OID (unspecified -> 0);
* arrays -> the array type's OID and a Postgres array literal (``{"a","b",NULL}``), nested for
  multi-dimensional arrays; arrays of text use text[] so ``$1`` has a known type.

A value that cannot be represented raises `BadParameter` naming the placeholder ($2). How many
values a statement takes is part of its plan (`broker.sql.plan.StatementPlan.placeholders`).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence
from datetime import UTC, date, datetime, timedelta
from typing import Any

from broker.errors import BrokerFailure, Code, Reason
from lambda_client._proto.pgbroker.v1 import broker_pb2 as pb
from lambda_client.codec import TYPE_OF_KIND

__all__ = ["BadParameter", "Bound", "bind_params", "bind_scalars"]

INT2, INT4, INT8, NUMERIC = 21, 23, 20, 1700

# pb.Type -> (scalar OID, array OID). TEXT scalars go as unknown (0).
_OIDS: dict[int, tuple[int, int]] = {
    pb.TYPE_UNSPECIFIED: (0, 0),
    pb.TYPE_BOOL: (16, 1000),
    pb.TYPE_INT64: (INT8, 1016),
    pb.TYPE_FLOAT64: (701, 1022),
    pb.TYPE_NUMERIC: (NUMERIC, 1231),
    pb.TYPE_TEXT: (0, 1009),
    pb.TYPE_BYTEA: (17, 1001),
    pb.TYPE_DATE: (1082, 1182),
    pb.TYPE_TIME: (1083, 1183),
    pb.TYPE_TIMESTAMP: (1114, 1115),
    pb.TYPE_TIMESTAMPTZ: (1184, 1185),
    pb.TYPE_INTERVAL: (1186, 1187),
    pb.TYPE_UUID: (2950, 2951),
    pb.TYPE_JSON: (114, 199),
    pb.TYPE_JSONB: (3802, 3807),
}
_INT_ARRAY_OIDS = {INT2: 1005, INT4: 1007, INT8: 1016, NUMERIC: 1231}
_EPOCH = datetime(1970, 1, 1)
_EPOCH_DATE = date(1970, 1, 1)


class BadParameter(BrokerFailure):
    """A parameter that cannot be sent to Postgres; the message names it ($1, $2[0], …).
    INVALID_ARGUMENT, reason BAD_REQUEST: nothing ran."""

    code = Code.INVALID_ARGUMENT
    reason = Reason.BAD_REQUEST


# Parameters bound for the wire: texts (None for NULL) and type OIDs.
Bound = tuple[list[str | None], tuple[int, ...]]


def bind_params(values: Sequence[pb.Value]) -> Bound:
    """Texts (None for NULL) and OIDs for *values*; raise `BadParameter` on a bad value."""
    bound = _bind(values, arrays=True)
    assert bound is not None
    return bound


def bind_scalars(values: Sequence[pb.Value]) -> Bound | None:
    """`bind_params` (*values*), or None when one is an array (left unbound: a large array
    takes milliseconds, see `broker.front.service.prebind`)."""
    return _bind(values, arrays=False)


def _bind(values: Sequence[pb.Value], arrays: bool) -> Bound | None:
    texts: list[str | None] = []
    oids: list[int] = []
    for value in values:
        kind = value.WhichOneof("kind")
        if kind == "int64":  # the commonest value: `bind_value`'s branch, without a call
            number = value.int64  # each read makes a new int
            texts.append(str(number))
            oids.append(_int_oid(number))
            continue
        if kind == "array" and not arrays:
            return None
        # Other kinds with their name ($n) for an error's message (not made for an int64).
        text, oid = _bind_kind(value, kind, f"${len(texts) + 1}")
        texts.append(text)
        oids.append(oid)
    return texts, tuple(oids)


def bind_value(value: pb.Value, name: str) -> tuple[str | None, int]:
    return _bind_kind(value, value.WhichOneof("kind"), name)


def _bind_kind(value: pb.Value, kind: str | None, name: str) -> tuple[str | None, int]:
    """`bind_value` of a value whose ``WhichOneof("kind")`` is *kind*."""
    if kind is None or kind == "null":
        return None, _OIDS.get(value.null, (0, 0))[0]
    if kind == "int64":
        number = value.int64  # each read makes a new int
        return str(number), _int_oid(number)
    if kind == "array":
        return _array_literal(value.array, name), _array_oid(value.array)
    return _scalar_text(value, kind, name), _OIDS[TYPE_OF_KIND[kind]][0]


def _int_oid(number: int) -> int:
    if -(2**15) <= number < 2**15:
        return INT2
    if -(2**31) <= number < 2**31:
        return INT4
    return INT8


def _scalar_text(value: pb.Value, kind: str, name: str) -> str:
    try:
        return _SCALAR_TEXT[kind](getattr(value, kind))
    except (ValueError, OverflowError) as exc:
        raise BadParameter(f"{name}: {kind} value cannot be sent to Postgres: {exc}") from exc


def _time_text(micros: int) -> str:
    if not 0 <= micros <= 86_400_000_000:
        raise ValueError("time must be between 00:00 and 24:00")
    seconds, micro = divmod(micros, 1_000_000)
    minutes, second = divmod(seconds, 60)
    hour, minute = divmod(minutes, 60)
    return f"{hour:02d}:{minute:02d}:{second:02d}.{micro:06d}"


def _timestamp_text(micros: int) -> str:
    return (_EPOCH + timedelta(microseconds=micros)).isoformat(sep=" ")


def _timestamptz_text(micros: int) -> str:
    return (_EPOCH.replace(tzinfo=UTC) + timedelta(microseconds=micros)).isoformat(sep=" ")


def _interval_text(iv: pb.Interval) -> str:
    return f"{iv.months} mons {iv.days} days {iv.microseconds} microseconds"


def _uuid_text(raw: bytes) -> str:
    return str(uuid.UUID(bytes=raw))


def _float_text(number: float) -> str:
    # repr is the shortest text that reads back to the same double; Postgres accepts
    # inf/-inf/nan spelled this way.
    return repr(number)


_SCALAR_TEXT: dict[str, Callable[[Any], str]] = {
    "bool": lambda b: "t" if b else "f",
    "float64": _float_text,
    "numeric": str,
    "text": str,
    "bytea": lambda raw: "\\x" + raw.hex(),
    "date": lambda days: (_EPOCH_DATE + timedelta(days=days)).isoformat(),
    "time": _time_text,
    "timestamp": _timestamp_text,
    "timestamptz": _timestamptz_text,
    "interval": _interval_text,
    "uuid": _uuid_text,
    "json": str,
    "jsonb": str,
}


def _array_oid(array: pb.Array) -> int:
    if array.element_type == pb.TYPE_INT64:
        widths = {_int_oid(v) for v in _leaves(array) if v is not None}
        widest = next((oid for oid in (INT8, INT4) if oid in widths), INT2)
        return _INT_ARRAY_OIDS[widest]
    return _OIDS.get(array.element_type, (0, 0))[1]


def _leaves(array: pb.Array) -> list[int | None]:
    out: list[int | None] = []
    for v in array.values:
        kind = v.WhichOneof("kind")
        if kind == "array":
            out.extend(_leaves(v.array))
        elif kind == "int64":
            out.append(v.int64)
    return out


def _array_literal(array: pb.Array, name: str) -> str:
    parts = []
    for i, item in enumerate(array.values):
        kind = item.WhichOneof("kind")
        if kind is None or kind == "null":
            parts.append("NULL")
        elif kind == "array":
            parts.append(_array_literal(item.array, f"{name}[{i}]"))
        else:
            text = str(item.int64) if kind == "int64" else _scalar_text(item, kind, f"{name}[{i}]")
            parts.append('"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"')
    return "{" + ",".join(parts) + "}"
