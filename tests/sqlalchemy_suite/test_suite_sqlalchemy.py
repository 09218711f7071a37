"""SQLAlchemy's dialect compliance suite, from the installed wheel (README.dialects.rst).

One override: `ServerSideCursorsTest._is_server_side` recognises a server-side cursor by a
hard-coded list of drivers (a TODO in SQLAlchemy says so: "this is a huge issue as it prevents
these tests from being usable by third party dialects"); for pgbroker it checks for the
DB-API's named cursor, for the others it asks SQLAlchemy's own answer.
"""

from sqlalchemy.testing.suite import *  # noqa: F403
from sqlalchemy.testing.suite import ServerSideCursorsTest as _ServerSideCursorsTest

from lambda_client.dbapi import ServerCursor


class ServerSideCursorsTest(_ServerSideCursorsTest):
    def _is_server_side(self, cursor):  # type: ignore[no-untyped-def]
        if self.engine.dialect.driver == "pgbroker":
            return isinstance(cursor, ServerCursor)
        return super()._is_server_side(cursor)
