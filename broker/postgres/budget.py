"""One connection budget shared by every broker replica.

Each replica keeps ``pool_size`` connections open, and up to ``max_replicas`` replicas run at
once (the template passes the peak of a rolling deploy). Postgres accepts at most
``max_connections`` minus the slots it keeps for superusers (``superuser_reserved_connections``)
and, from Postgres 16, for ``pg_use_reserved_connections`` roles (``reserved_connections``). At
start the broker reads those settings and refuses to run when ``pool_size × max_replicas``
would not fit, with the arithmetic in the message, which is PgBouncer's advice ("the pool size
should be lower than max_connections") made a check::

    connection budget exceeded: pool_size 25 × max_replicas 4 = 100 > 97 available
    (max_connections 100 − superuser_reserved_connections 3 − reserved_connections 0)

Other clients of the database (migrations, admin sessions, monitoring) are not counted: the
operator leaves room for them.

`BudgetProbe` wraps the pool's connect function and reads the settings on the first connection
the pool opens, before the pool hands it out, so the check costs no extra connection and no
pool request; the server calls `BudgetProbe.check` once the first connection is open and before
it serves anything.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from broker.postgres.pg import PgConnection
from broker.postgres.probe import FirstConnectionProbe
from lambda_client import codec

__all__ = ["BUDGET_SQL", "BudgetExceeded", "BudgetProbe", "ConnectionBudget"]

# current_setting(name, true) is NULL for a setting this server does not have
# (reserved_connections before Postgres 16).
BUDGET_SQL = (
    "SELECT current_setting('max_connections')::int8,"
    " current_setting('superuser_reserved_connections')::int8,"
    " coalesce(current_setting('reserved_connections', true), '0')::int8"
)


class BudgetExceeded(Exception):
    """``pool_size × max_replicas`` does not fit in what Postgres allows; the message says why."""


@dataclass(frozen=True)
class ConnectionBudget:
    """The connection slots a Postgres server offers to ordinary roles."""

    max_connections: int
    superuser_reserved_connections: int
    reserved_connections: int = 0

    @classmethod
    def from_row(cls, row: Sequence[object]) -> ConnectionBudget:
        """Build from the one row `BUDGET_SQL` returns."""
        max_connections, superuser_reserved, reserved = (int(str(v)) for v in row)
        return cls(max_connections, superuser_reserved, reserved)

    @classmethod
    def read(cls, conn: PgConnection) -> ConnectionBudget:
        """Read the budget on *conn* (one statement, autocommit); errors propagate."""
        result = conn.run(BUDGET_SQL)
        return cls.from_row(codec.decode_row(result.rows[0].values))

    @property
    def available(self) -> int:
        """Connections left for ordinary roles such as the broker's."""
        return max(
            0,
            self.max_connections - self.superuser_reserved_connections - self.reserved_connections,
        )

    def explain(self) -> str:
        return (
            f"max_connections {self.max_connections}"
            f" − superuser_reserved_connections {self.superuser_reserved_connections}"
            f" − reserved_connections {self.reserved_connections}"
        )

    def check(self, pool_size: int, max_replicas: int) -> int:
        """Return the connections left over when *max_replicas* pools of *pool_size* are open.

        Raise `BudgetExceeded` with the arithmetic when they do not fit.
        """
        needed = pool_size * max_replicas
        if needed > self.available:
            fitting = self.available // max_replicas if max_replicas else self.available
            smaller_pool = f"lower PGBROKER_POOL_SIZE to at most {fitting}, " if fitting else ""
            raise BudgetExceeded(
                f"connection budget exceeded: pool_size {pool_size} × max_replicas "
                f"{max_replicas} = {needed} > {self.available} available ({self.explain()}); "
                f"{smaller_pool}lower PGBROKER_MAX_REPLICAS, or raise max_connections"
            )
        return self.available - needed


class BudgetProbe(FirstConnectionProbe[ConnectionBudget]):
    """A pool connect function that reads the `ConnectionBudget` on its first connection
    (`FirstConnectionProbe`); `check` reports a failure to read it."""

    def __init__(self, connect: Callable[[], PgConnection]) -> None:
        super().__init__(connect, ConnectionBudget.read)

    @property
    def budget(self) -> ConnectionBudget | None:
        return self.value

    def check(self, pool_size: int, max_replicas: int) -> ConnectionBudget:
        """Check *pool_size* × *max_replicas* against the budget read on the first connection.

        Call once the pool has opened a connection. Raise `BudgetExceeded` when it does not
        fit, or when the budget could not be read (the message says why).
        """
        if self.budget is None:
            reason = self.error or "no database connection has been opened yet"
            raise BudgetExceeded(f"cannot read the connection budget: {reason}")
        self.budget.check(pool_size, max_replicas)
        return self.budget
