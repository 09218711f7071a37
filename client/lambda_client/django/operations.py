"""Django's postgresql operations and schema editor, writing literals without a psycopg
connection (`lambda_client.django._adapt.mogrify`), as psycopg's ClientCursor would."""

from __future__ import annotations

import functools
from typing import Any

from django.conf import settings
from django.db.backends.postgresql import operations as stock_ops
from django.db.backends.postgresql import schema as stock_schema
from django.db.backends.postgresql.psycopg_any import get_adapters_template
from psycopg import adapt

from lambda_client import errors
from lambda_client.django import _adapt


def _adapters(connection: Any) -> Any:
    if connection.connection is not None:
        return connection.connection.adapters
    return _unconnected_adapters(settings.USE_TZ, connection.timezone)


@functools.lru_cache
def _unconnected_adapters(use_tz: bool, timezone: Any) -> Any:
    return _adapt.adapters_for(get_adapters_template(use_tz, timezone))


class DatabaseOperations(stock_ops.DatabaseOperations):
    def compose_sql(self, sql: str, params: Any) -> str:
        return _adapt.mogrify(sql, params, _adapters(self.connection))

    def last_executed_query(self, cursor: Any, sql: str, params: Any) -> str | None:
        """The SQL sent (after execute wrappers), as the stock backend reads psycopg's."""
        if (sent := getattr(cursor, "query", None)) is not None:
            return str(sent)
        try:
            return self.compose_sql(sql, params)
        except errors.Error:
            return None


class DatabaseSchemaEditor(stock_schema.DatabaseSchemaEditor):
    def quote_value(self, value: Any) -> str:
        """psycopg's ``sql.quote``, as the stock editor (no ``%`` doubled: the SQL it goes
        into is executed without parameters)."""
        return bytes(adapt.Transformer(_adapters(self.connection)).as_literal(value)).decode()
