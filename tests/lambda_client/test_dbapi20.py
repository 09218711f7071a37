"""The PEP 249 compliance suite (``dbapi20``, vendored from dbapi-compliance 1.15.0) against
`lambda_client.dbapi` over a real broker and Postgres.

Overrides, each where Postgres or the suite itself leaves the driver no choice:

* ``test_nextset``: the suite's own version raises NotImplementedError ("Drivers need to
  override this test"); it needs a procedure returning two result sets, which Postgres
  functions cannot do. Here: `nextset` returns None, as PEP 249 says when there are no more
  sets.
* ``test_setoutputsize``: the suite raises NotImplementedError ("Driver needed to override");
  Postgres has no output-size hint, so `setoutputsize` does nothing and the cursor still works.
* ``test_non_idempotent_close``: a second ``close()`` does nothing instead of raising, as in
  psycopg (its dbapi20 run overrides the same test); the suite's own comment says reasonable
  persons differ, and frameworks (SQLAlchemy, Django) close defensively.
* ``callproc`` needs no override: ``lower`` is a function, called as ``SELECT * FROM lower(%s)``.

``PGBROKER_DBAPI20_COMPARE=1`` also runs the unmodified suite against pg8000's DB-API
(``pg8000.dbapi``) on the same Postgres, for comparison (`make test-dbapi20` runs both and
prints each one's counts).
"""

from __future__ import annotations

import os
from typing import Any

import pg8000.dbapi
import pytest

from devtools.brokerproc import BrokerProcess
from lambda_client import dbapi
from tests.lambda_client import dbapi20


class TestLambdaClientDbapi20(dbapi20.DatabaseAPI20Test):
    driver = dbapi
    connect_args = ()
    connect_kw_args: dict[str, Any] = {}  # noqa: RUF012 (set by the fixture below)
    lower_func = "lower"

    @pytest.fixture(autouse=True)
    def _target(self, broker_process: BrokerProcess) -> None:
        self.connect_kw_args = {"target": broker_process.target}

    def test_nextset(self) -> None:
        con = self._connect()
        try:
            cur = con.cursor()
            cur.execute("SELECT 1")
            assert cur.nextset() is None
            assert cur.fetchall() == [(1,)]  # the one result set is still there
        finally:
            con.close()

    def test_setoutputsize(self) -> None:
        con = self._connect()
        try:
            cur = con.cursor()
            cur.setoutputsize(1000, 0)
            self._paraminsert(cur)
        finally:
            con.close()

    def test_non_idempotent_close(self) -> None:
        con = self._connect()
        con.close()
        con.close()  # harmless, as in psycopg
        assert con.closed


# Defined only for the comparison run: pytest collects every unittest class it finds.
if os.environ.get("PGBROKER_DBAPI20_COMPARE") == "1":

    class TestPg8000Dbapi20(dbapi20.DatabaseAPI20Test):
        """The same suite, unmodified, against pg8000's DB-API straight to Postgres."""

        driver = pg8000.dbapi
        connect_args = ()
        connect_kw_args: dict[str, Any] = {}  # noqa: RUF012
        lower_func = "lower"

        @pytest.fixture(autouse=True)
        def _postgres(self, postgres: Any) -> None:
            self.connect_kw_args = {
                "user": postgres.user,
                "host": postgres.host,
                "port": postgres.port,
                "database": postgres.database,
                "password": getattr(postgres, "password", None),
            }
