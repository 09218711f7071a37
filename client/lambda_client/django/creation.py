"""Test databases through a broker: the broker serves one database, so the test database is
that one, named by ``TEST: {"NAME": ...}`` and used with ``--keepdb``.

Why not CREATE DATABASE through the broker: a broker's pool is bound to one database, so a
database it creates is one it cannot reach; and letting an identity create and drop databases
through a pooler is a privilege a Lambda role should not hold. Test runs point a broker at a
database made for them (CI creates it with psql, as for any managed Postgres) and run
``manage.py test --keepdb``; Django then flushes tables between tests as usual.
"""

from __future__ import annotations

from typing import Any

from django.core.exceptions import ImproperlyConfigured
from django.db.backends.postgresql import creation as stock


class DatabaseCreation(stock.DatabaseCreation):
    def _create_test_db(self, verbosity: int, autoclobber: bool, keepdb: bool = False) -> Any:
        """Use the broker's database as the test database; raise ImproperlyConfigured
        without *keepdb* (nothing is created or dropped through a broker)."""
        name = self._get_test_db_name()
        if not keepdb:
            raise ImproperlyConfigured(
                f"lambda_client.django does not create test databases through the broker: "
                f"point a broker at a test database, set TEST: {{'NAME': {name!r}}} to its "
                f"name and run the tests with --keepdb (see docs/django.md)."
            )
        return name

    def _destroy_test_db(self, test_database_name: str, verbosity: int) -> None:
        """Nothing to drop: the database is the broker's (kept, as with --keepdb)."""

    def _clone_test_db(self, suffix: Any, verbosity: int, keepdb: bool = False) -> None:
        raise ImproperlyConfigured(
            "parallel tests need cloned databases, which a broker cannot create: --parallel=1"
        )
