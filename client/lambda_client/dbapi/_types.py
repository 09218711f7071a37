"""PEP 249's type objects and constructors.

A cursor's ``description`` gives each column's Postgres type OID as its ``type_code``; the
type objects compare equal to the OIDs of their group (``description[0][1] == NUMBER``).
"""

from __future__ import annotations

import datetime as _dt
import time as _time

__all__ = [
    "BINARY",
    "DATETIME",
    "NUMBER",
    "ROWID",
    "STRING",
    "Binary",
    "DBAPITypeObject",
    "Date",
    "DateFromTicks",
    "Time",
    "TimeFromTicks",
    "Timestamp",
    "TimestampFromTicks",
]


class DBAPITypeObject:
    """A group of Postgres type OIDs that equals each of them."""

    def __init__(self, name: str, *oids: int) -> None:
        self.name = name
        self.values = frozenset(oids)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, DBAPITypeObject):
            return self.values == other.values
        return other in self.values

    def __hash__(self) -> int:
        return hash(self.values)

    def __repr__(self) -> str:
        return f"<DBAPITypeObject {self.name}>"


# text, varchar, bpchar, name, char, citext-like unknowns go as text; json/jsonb/xml are text
STRING = DBAPITypeObject("STRING", 25, 1043, 1042, 19, 18, 114, 3802, 142, 705)
BINARY = DBAPITypeObject("BINARY", 17)
# int2, int4, int8, float4, float8, numeric, money, oid
NUMBER = DBAPITypeObject("NUMBER", 21, 23, 20, 700, 701, 1700, 790, 26)
# date, time, timetz, timestamp, timestamptz, interval
DATETIME = DBAPITypeObject("DATETIME", 1082, 1083, 1266, 1114, 1184, 1186)
ROWID = DBAPITypeObject("ROWID", 26)  # oid, as psycopg has it

Date = _dt.date
Time = _dt.time
Timestamp = _dt.datetime
Binary = bytes


def DateFromTicks(ticks: float) -> _dt.date:
    """The local date of *ticks* seconds since the epoch."""
    return Date(*_time.localtime(ticks)[:3])


def TimeFromTicks(ticks: float) -> _dt.time:
    """The local time of day of *ticks* seconds since the epoch."""
    return Time(*_time.localtime(ticks)[3:6])


def TimestampFromTicks(ticks: float) -> _dt.datetime:
    """The local (naive) date and time of *ticks* seconds since the epoch."""
    return Timestamp(*_time.localtime(ticks)[:6])
