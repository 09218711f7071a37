"""Column types for the pgbroker dialect: what the client's codec sends and returns.

The broker sends each parameter with the OID of its Python type (text as "unknown", so
Postgres infers varchar, enum, citext…), as pg8000 and psycopg 3 do; like their dialects,
this one renders an explicit cast (``$1::VARCHAR``) where a bind's type matters
(``render_bind_cast``). Results come decoded by the codec: ints, floats, Decimal for numeric,
parsed json/jsonb, date/time types, UUID, arrays as lists.
"""

from __future__ import annotations

import decimal
import json
from typing import Any

from sqlalchemy import exc
from sqlalchemy.dialects.postgresql import ENUM, INTERVAL, JSON, JSONB
from sqlalchemy.dialects.postgresql.array import ARRAY as PGARRAY
from sqlalchemy.dialects.postgresql.base import _DECIMAL_TYPES, _FLOAT_TYPES, _INT_TYPES
from sqlalchemy.dialects.postgresql.pg_catalog import INT2VECTOR, OIDVECTOR
from sqlalchemy.engine import processors
from sqlalchemy.sql import sqltypes

__all__ = ["COLSPECS"]


class _String(sqltypes.String):
    render_bind_cast = True


# SQLAlchemy 2.1 shares Numeric's and Float's behaviour in NumericCommon; 2.0 has Float under
# Numeric.
_NumericBase: Any = getattr(sqltypes, "NumericCommon", sqltypes.Numeric)


class _NumericCommon(_NumericBase):  # type: ignore[misc]
    """numeric comes back as Decimal, float8 as float, integers as int (the codec's
    choices); convert where the column asks for the other."""

    render_bind_cast = True

    def result_processor(self, dialect: Any, coltype: Any) -> Any:
        if coltype not in (*_FLOAT_TYPES, *_DECIMAL_TYPES, *_INT_TYPES):
            raise exc.InvalidRequestError(f"Unknown PG numeric type: {coltype}")
        if self.asdecimal:
            if coltype in _FLOAT_TYPES:
                return processors.to_decimal_processor_factory(
                    decimal.Decimal, self._effective_decimal_return_scale
                )
            return None
        if coltype in _FLOAT_TYPES:
            return None
        return processors.to_float


class _Numeric(_NumericCommon, sqltypes.Numeric):  # type: ignore[misc]
    def bind_processor(self, dialect: Any) -> None:
        return None  # the codec sends Decimal exactly, float as float8


class _Float(_NumericCommon, sqltypes.Float):  # type: ignore[misc]
    pass


class _JSONResult:
    """json/jsonb arrive parsed by the codec. A custom ``json_deserializer`` given to
    `create_engine` gets the value re-encoded as JSON text (``json.dumps``), since the text
    Postgres sent is not kept."""

    def result_processor(self, dialect: Any, coltype: Any) -> Any:
        deserializer = dialect._json_deserializer
        if deserializer is None:
            return None

        def process(value: Any) -> Any:
            return None if value is None else deserializer(json.dumps(value))

        return process


class _JSON(_JSONResult, JSON):  # type: ignore[misc]
    render_bind_cast = True


class _JSONB(_JSONResult, JSONB):  # type: ignore[misc]
    render_bind_cast = True


class _JSONIntIndexType(sqltypes.JSON.JSONIntIndexType):
    __visit_name__ = "json_int_index"
    render_bind_cast = True


class _JSONStrIndexType(sqltypes.JSON.JSONStrIndexType):
    __visit_name__ = "json_str_index"
    render_bind_cast = True


class _Interval(INTERVAL):
    render_bind_cast = True

    @classmethod
    def adapt_emulated_to_native(cls, impl: Any, **kw: Any) -> Any:  # type: ignore[override]
        return _Interval(precision=impl.second_precision)


class _Enum(ENUM):
    """PostgreSQL's ENUM (CREATE TYPE … AS ENUM with the table); values travel as text."""

    def get_dbapi_type(self, dbapi: Any) -> None:
        return None


class _SpaceVector:
    """int2vector and oidvector (the catalog's index columns) have no codec mapping and
    arrive as Postgres' text, ``"1 3"``; reflection wants a list of ints."""

    def result_processor(self, dialect: Any, coltype: Any) -> Any:
        def process(value: Any) -> Any:
            if not isinstance(value, str):
                return value
            return [int(part) for part in value.split()]

        return process


class _INT2VECTOR(_SpaceVector, INT2VECTOR):
    cache_ok = True


class _OIDVECTOR(_SpaceVector, OIDVECTOR):
    cache_ok = True


def _cast(base: type) -> type:
    """*base* with ``render_bind_cast`` on (``$1::TYPE``)."""
    return type("_" + base.__name__, (base,), {"render_bind_cast": True})


COLSPECS: dict[Any, Any] = {
    sqltypes.String: _String,
    sqltypes.Numeric: _Numeric,
    sqltypes.Float: _Float,
    sqltypes.JSON: _JSON,
    JSONB: _JSONB,
    sqltypes.JSON.JSONIntIndexType: _JSONIntIndexType,
    sqltypes.JSON.JSONStrIndexType: _JSONStrIndexType,
    sqltypes.Interval: _Interval,
    INTERVAL: _Interval,
    sqltypes.Enum: _Enum,
    sqltypes.Boolean: _cast(sqltypes.Boolean),
    sqltypes.DateTime: _cast(sqltypes.DateTime),
    sqltypes.Date: _cast(sqltypes.Date),
    sqltypes.Time: _cast(sqltypes.Time),
    sqltypes.Integer: _cast(sqltypes.Integer),
    sqltypes.SmallInteger: _cast(sqltypes.SmallInteger),
    sqltypes.BigInteger: _cast(sqltypes.BigInteger),
    sqltypes.ARRAY: _cast(PGARRAY),
    INT2VECTOR: _INT2VECTOR,
    OIDVECTOR: _OIDVECTOR,
}
