"""``manage.py dbshell``: not through a broker (it speaks gRPC, not the Postgres protocol)."""

from __future__ import annotations

from typing import Any

from django.core.management.base import CommandError
from django.db.backends.base.client import BaseDatabaseClient


class DatabaseClient(BaseDatabaseClient):
    executable_name = "psql"

    def runshell(self, parameters: Any) -> None:
        raise CommandError(
            "dbshell is not supported through pgbroker: the broker speaks gRPC, not the "
            "Postgres wire protocol. Run psql with the database's direct URL instead, e.g. "
            '`psql "$PGBROKER_DATABASE_URL"` where the broker\'s own settings are (its task '
            "definition or secret), from a host that can reach the database."
        )
