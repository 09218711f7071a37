"""The DatabaseWrapper: Django's postgresql one with a broker connection (see the package
docstring and `lambda_client.django._connection`).

Importing it imports psycopg: the stock backend's modules do, and this backend uses psycopg's
adapters to write literals and read values exactly as the stock backend does
(`lambda_client.django._adapt`); psycopg never opens a connection here.
"""

from __future__ import annotations

import threading
from typing import Any

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.db.backends.postgresql import base as stock
from django.db.backends.postgresql.psycopg_any import IsolationLevel, get_adapters_template

from lambda_client import dbapi
from lambda_client.django import _adapt, operations
from lambda_client.django._connection import Connection, ServerInfo
from lambda_client.django._streaming import StreamingCursor
from lambda_client.django.client import DatabaseClient
from lambda_client.django.creation import DatabaseCreation
from lambda_client.django.features import DatabaseFeatures

# OPTIONS keys passed to BrokerClient as they are (the rest of BrokerClient's arguments have
# PGBROKER_* variables or sensible defaults).
CLIENT_OPTIONS = (
    "target",
    "tls",
    "tls_server_name",
    "deadline_margin",
    "max_attempts",
    "health_check",
    "max_open_transactions",
)
OWN_OPTIONS = ("timeout", "token", "tls_ca_file", "isolation_level")
# The stock backend's keys accepted as it treats them: "pool" only when false (the broker
# pools), "client_encoding" ignored (the stock backend forces UTF8; the broker speaks UTF-8),
# "assume_role" refused at connect (`_configure_role`).
STOCK_OPTIONS = ("pool", "client_encoding", "assume_role")

_infos: dict[int, ServerInfo] = {}
_lock = threading.Lock()


class DatabaseWrapper(stock.DatabaseWrapper):
    display_name = "PostgreSQL"  # Django's messages say "PostgreSQL 14 or later is required"
    # Django wraps exceptions by their PEP 249 names and takes Binary from here.
    Database = dbapi
    client_class = DatabaseClient
    creation_class = DatabaseCreation
    features_class = DatabaseFeatures
    ops_class = operations.DatabaseOperations
    SchemaEditorClass = operations.DatabaseSchemaEditor

    @property
    def pool(self) -> None:
        """No psycopg pool: the broker pools."""
        return None

    def get_connection_params(self) -> dict[str, Any]:
        """BrokerClient's arguments from OPTIONS (target, tls, token, …) and the timeout;
        unset ones come from the PGBROKER_* environment. Raise ImproperlyConfigured for an
        unknown option."""
        options = dict(self.settings_dict["OPTIONS"])
        unknown = set(options) - set(CLIENT_OPTIONS) - set(OWN_OPTIONS) - set(STOCK_OPTIONS)
        if unknown:
            raise ImproperlyConfigured(
                f"unknown OPTIONS for lambda_client.django: {', '.join(sorted(unknown))} "
                f"(known: {', '.join(CLIENT_OPTIONS + OWN_OPTIONS)})"
            )
        if options.get("pool"):
            raise ImproperlyConfigured("OPTIONS['pool'] does not apply: the broker pools")
        params = {k: options[k] for k in CLIENT_OPTIONS if k in options}
        if "token" in options:
            from lambda_client.auth import BearerAuth

            params["auth"] = BearerAuth(options["token"])
        if "tls_ca_file" in options:
            with open(options["tls_ca_file"], "rb") as pem:
                params["root_certificates"] = pem.read()
        params["timeout"] = float(options.get("timeout", 30.0))
        return params

    def get_new_connection(self, conn_params: dict[str, Any]) -> Connection:
        options = self.settings_dict["OPTIONS"]
        try:
            self.isolation_level = IsolationLevel(
                options.get("isolation_level", IsolationLevel.READ_COMMITTED)
            )
        except ValueError as exc:
            raise ImproperlyConfigured(
                f"Invalid transaction isolation level {options['isolation_level']} "
                f"specified. Use one of the psycopg.IsolationLevel values."
            ) from exc
        timeout = conn_params["timeout"]
        client = _client_for(conn_params)
        connection = Connection(
            client,
            timeout=timeout,
            # A copy: contrib.postgres registers hstore/citext on it per connection.
            adapters=_adapt.adapters_for(get_adapters_template(settings.USE_TZ, self.timezone)),
            info=_server_info(client, timeout),
            aware=settings.USE_TZ,
        )
        if "isolation_level" in options:
            connection.isolation_level = self.isolation_level
        return connection

    def _configure_timezone(self, connection: Connection) -> bool:
        """Django's SET TIME ZONE, carried by each transaction instead of the session."""
        connection.set_time_zone(self.timezone_name)
        return False

    def _configure_role(self, connection: Connection) -> bool:
        if self.settings_dict["OPTIONS"].get("assume_role"):
            raise ImproperlyConfigured(
                "assume_role is session state; the broker sets roles (PGBROKER_ROLE_MAP)"
            )
        return False

    def create_cursor(self, name: str | None = None) -> Any:
        cursor = self.connection.cursor()
        if self.timezone is not None:
            # As the stock backend's per-cursor tz loader: aware in the current self.timezone
            # (a test may change the database's TIME_ZONE between cursors).
            cursor.zone = self.timezone
        return cursor

    def chunked_cursor(self) -> Any:
        """For .iterator(): a cursor declared WITHOUT HOLD inside a lease, read in chunks
        (`lambda_client.django._streaming`); never the WITH HOLD cursor psycopg would
        declare, which a pooler refuses. With DISABLE_SERVER_SIDE_CURSORS = True Django does
        not ask for it and reads the whole result at once."""
        self.ensure_connection()
        with self.wrap_database_errors:
            cursor = StreamingCursor(self.connection)
        if self.timezone is not None:
            cursor.zone = self.timezone
        return self._prepare_cursor(cursor)

    def is_usable(self) -> bool:
        """Outside a lease, True while open: every call finds its own pooled connection, so
        there is no socket of this process' own to go stale. Inside one, whether the lease
        still answers (False when it is aborted or gone), as psycopg's SELECT 1 says."""
        if self.connection is None or self.connection.closed:
            return False
        if not self.connection.in_transaction:
            return True
        try:
            self.connection.run("SELECT 1")
        except dbapi.Error:
            return False
        return True


def _client_for(params: dict[str, Any]) -> Any:
    """The process's BrokerClient (one gRPC channel) for these options, shared with
    `lambda_client.dbapi` connections: Django opens a connection per request and thread,
    Lambda reuses the process."""
    options = dict(params)
    return dbapi.client_for(options.pop("target", None), options)


def _server_info(client: Any, timeout: float) -> ServerInfo:
    """The server version and the pooled connections' TimeZone, asked once per client."""
    with _lock:
        info = _infos.get(id(client))
    if info is None:
        row = client.query(
            "SELECT current_setting('server_version_num')::int, current_setting('TimeZone')",
            timeout=timeout,
        ).one()
        info = ServerInfo(row[0], {"TimeZone": row[1]})
        with _lock:
            _infos[id(client)] = info
    return info
