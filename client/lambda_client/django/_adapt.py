"""Values in and out, the way Django's stock postgresql backend sees them through psycopg.

In: the stock backend (psycopg 3, ``server_side_binding`` off, Django's default) binds on the
client: psycopg's ``ClientCursor`` merges the parameters into the SQL as literals. `mogrify`
does the same with psycopg's own dumpers and Django's adapters map (`get_adapters_template`),
without a psycopg connection, so the SQL Postgres receives is the stock backend's, byte for
byte, and every value psycopg can send (Jsonb, ranges, Inet, arrays, hstore dicts, …) works.
The broker then receives a statement without parameters.

Out: the broker decodes values to Python (`lambda_client.codec`); `RowLoader` turns them into
what Django's adapters map would have returned: jsonb as text (JSONField decodes it itself),
inet/cidr as text, timestamptz in the connection's time zone (UTC with ``USE_TZ``; naive
local time without), and the types the broker sends as text (ranges, hstore, …) through
psycopg's loader for the column's type OID.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime, tzinfo
from typing import Any, cast

import psycopg
from psycopg import adapt
from psycopg.pq import Format
from psycopg.types.datetime import TimestamptzLoader
from psycopg.types.string import BytesDumper

from lambda_client import codec, errors

# %s, %(name)s and %% as psycopg's ClientCursor reads them; any other %x is an error there too.
_PLACEHOLDER = re.compile(rb"%(?:\((?P<name>[^)]*)\))?(?P<kind>.)", re.S)

JSONB_OID = 3802
JSONB_ARRAY_OID = 3807
TIMESTAMPTZ_ARRAY_OID = 1185
INET_OIDS = (869, 650)
TIMESTAMPTZ_OID = 1184


def mogrify(sql: str, params: Sequence[Any] | Mapping[str, Any] | None, context: Any) -> str:
    """*sql* with *params* merged in as psycopg's ``ClientCursor.mogrify`` would (``%%`` → ``%``);
    *sql* unchanged when *params* is None. Raise `errors.ProgrammingError` when the
    placeholders and the parameters do not match, `errors.DataError` when psycopg cannot
    dump a value."""
    if params is None:
        return sql
    transformer = adapt.Transformer(context)
    query, placeholders = _placeholders(sql)
    parts: list[bytes] = []
    position = 0
    sequential = 0
    named = isinstance(params, Mapping)
    for start, end, kind, name in placeholders:
        parts.append(query[position:start])
        position = end
        if kind == b"%" and name is None:
            parts.append(b"%")
            continue
        if kind not in (b"s", b"b", b"t"):
            raise errors.ProgrammingError(
                f"only '%s', '%b', '%t' are allowed as placeholders, got "
                f"{query[start:end].decode()!r}"
            )
        if name is not None:
            if not named:
                raise errors.ProgrammingError("named placeholder with positional parameters")
            value = cast(Mapping[str, Any], params)[name.decode()]
        else:
            if named:
                raise errors.ProgrammingError("positional placeholder with named parameters")
            if sequential >= len(params):
                raise errors.ProgrammingError(
                    f"the query has more placeholders than the {len(params)} parameters passed"
                )
            value = cast(Sequence[Any], params)[sequential]
            sequential += 1
        parts.append(_literal(transformer, value))
    parts.append(query[position:])
    if not named and sequential != len(params):
        raise errors.ProgrammingError(
            f"the query has {sequential} placeholders but {len(params)} parameters were passed"
        )
    return b"".join(parts).decode()


_Placeholders = tuple[tuple[int, int, bytes, bytes | None], ...]
# Longer texts (a bulk INSERT's thousands of placeholders) are parsed each time, not kept.
_CACHED_SQL_CHARS = 4096


def _placeholders(sql: str) -> tuple[bytes, _Placeholders]:
    """*sql* encoded, and its placeholders as (start, end, kind, name); remembered for the
    last 512 texts up to `_CACHED_SQL_CHARS` long: the parse depends on the text alone, an
    ORM sends the same few texts over and over, and parsing was half of `mogrify`'s cost."""
    return _parse_cached(sql) if len(sql) <= _CACHED_SQL_CHARS else _parse(sql)


def _parse(sql: str) -> tuple[bytes, _Placeholders]:
    query = sql.encode()
    return query, tuple(
        (m.start(), m.end(), m.group("kind"), m.group("name")) for m in _PLACEHOLDER.finditer(query)
    )


_parse_cached = functools.lru_cache(maxsize=512)(_parse)


def _literal(transformer: Any, value: Any) -> bytes:
    """psycopg's literal for *value*; its TypeError/ValueError (json.dumps of an object it
    cannot serialise) pass as they are, as with the stock backend; psycopg's own errors
    ("cannot adapt type") become the PEP 249 class of the same name here."""
    try:
        return bytes(transformer.as_literal(value))
    except psycopg.Error as exc:
        cls = getattr(errors, type(exc).__name__, errors.ProgrammingError)
        if not (isinstance(cls, type) and issubclass(cls, errors.Error)):
            cls = errors.ProgrammingError
        raise cls(f"cannot send {type(value).__name__} value: {exc}") from exc


class HexBytesDumper(BytesDumper):
    """bytea literals in hex, as psycopg writes them with a connection (without one it falls
    back to the old escape format: the same value, different SQL)."""

    def quote(self, obj: Any) -> bytes:
        return b"'\\x" + bytes(obj).hex().encode() + b"'"


def adapters_for(template: Any) -> Any:
    """A copy of Django's adapters map *template* (contrib.postgres registers hstore and
    citext on it per connection) writing bytea in hex."""
    adapters = adapt.AdaptersMap(template)
    for cls in (bytes, bytearray, memoryview):
        adapters.register_dumper(cls, HexBytesDumper)
    return adapters


class RowLoader:
    """Converts the broker's decoded rows for one result (its column type OIDs) into the
    values Django's psycopg adapters map returns (see the module docstring)."""

    def __init__(self, type_oids: Sequence[int], context: Any, zone: tzinfo, aware: bool) -> None:
        self._convert: list[Callable[[Any], Any] | None] = [
            self._converter(oid, context, zone, aware) for oid in type_oids
        ]
        self.identity = not any(self._convert)

    def __call__(self, row: tuple[Any, ...]) -> tuple[Any, ...]:
        return tuple(
            value if fn is None or value is None else fn(value)
            for fn, value in zip(self._convert, row, strict=False)
        )

    @staticmethod
    def _converter(
        oid: int, context: Any, zone: tzinfo, aware: bool
    ) -> Callable[[Any], Any] | None:
        if oid == JSONB_OID:
            return _jsonb_text
        if oid == JSONB_ARRAY_OID:
            return _jsonb_array_text
        if oid == TIMESTAMPTZ_ARRAY_OID:
            return lambda v: _nested(v, lambda d: _in_zone(d, zone, aware))
        if oid in INET_OIDS:
            return str
        loader = context.get_loader(oid, Format.TEXT) if oid else None
        if loader is None or loader.__module__.startswith("psycopg.types.string"):
            return None
        # The broker sends types it has no kind for, and values Python's types cannot hold
        # its way, as their text form; psycopg reads those.
        if oid == TIMESTAMPTZ_OID:
            # Text (a year Python's datetime holds but the codec sends as text): read aware,
            # with psycopg's plain loader, then as for the others.
            aware_load = TimestamptzLoader(oid, None).load
            return lambda v: _in_zone(
                v if isinstance(v, datetime) else aware_load(v.encode()), zone, aware
            )
        # Loaded in Django's adapters map, so a range's bounds use its timestamptz loader.
        load = loader(oid, context).load
        return lambda v: load(v.encode()) if isinstance(v, str) else v


def _jsonb_text(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)


def _nested(value: Any, fn: Callable[[Any], Any]) -> Any:
    """*fn* applied to the datetimes of a (nested) array as the codec decodes it."""
    if isinstance(value, list):
        return [_nested(v, fn) for v in value]
    return fn(value) if isinstance(value, datetime) else value


def zone_tz_loader(zone: tzinfo, aware: bool) -> type[TimestamptzLoader]:
    """A timestamptz loader for Django's adapters map that reads text (range bounds the broker
    sends as text) into *zone*, as psycopg's loader does with the session's TimeZone (there
    is no session to ask here): aware, or naive local time when not *aware*."""

    class ZoneTzLoader(TimestamptzLoader):
        def load(self, data: Any) -> datetime:
            return _in_zone(super().load(data), zone, aware)

    return ZoneTzLoader


def _jsonb_array_text(value: Any) -> Any:
    """jsonb[] elements as text, as Django's jsonb loader gives them (arrays nest; an element
    that is a JSON array is a `codec.JsonArray`)."""
    if isinstance(value, list) and not isinstance(value, codec.JsonArray):
        return [None if v is None else _jsonb_array_text(v) for v in value]
    return _jsonb_text(value)


def _in_zone(value: datetime, zone: tzinfo, aware: bool) -> datetime:
    """An aware UTC datetime from the broker as psycopg returns it with Django's session time
    zone *zone*: aware in *zone*, or naive local time there when not *aware* (``USE_TZ =
    False``)."""
    local = value.astimezone(zone)
    return local if aware else local.replace(tzinfo=None)
