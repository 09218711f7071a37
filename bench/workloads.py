"""The benchmark's workloads on pgbench's schema, as SQL for each kind of client.

* W1 point select: ``SELECT abalance FROM pgbench_accounts WHERE aid = $1`` (autocommit).
* W2 transfer: pgbench's TPC-B-like transaction (update account, select balance, update
  teller, update branch, insert history). Interactive clients (direct, PgBouncer) send it
  statement by statement with *think* time before each statement after BEGIN and before
  COMMIT; pgbroker sends it as one batch after the same total think time, so every client
  does the same work per transaction and only where the pooled connection is held differs.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

W1_SQL = "SELECT abalance FROM pgbench_accounts WHERE aid = $1"
# W1 as Django's ORM sends it (W4's query, bench/django_view.py): the value merged into the SQL
# as a literal, so every new value is a new SQL text for the broker (bench.ab's ``w1literal``).
W1_LITERAL_SQL = (
    'SELECT "pgbench_accounts"."abalance" AS "abalance" FROM "pgbench_accounts"'
    ' WHERE "pgbench_accounts"."aid" = {aid} LIMIT 21'
)

W2_SQL = (
    "UPDATE pgbench_accounts SET abalance = abalance + $1 WHERE aid = $2",
    "SELECT abalance FROM pgbench_accounts WHERE aid = $1",
    "UPDATE pgbench_tellers SET tbalance = tbalance + $1 WHERE tid = $2",
    "UPDATE pgbench_branches SET bbalance = bbalance + $1 WHERE bid = $2",
    "INSERT INTO pgbench_history (tid, bid, aid, delta, mtime)"
    " VALUES ($1, $2, $3, $4, CURRENT_TIMESTAMP)",
)

# Think pauses per W2 transaction: before each of the five statements and before COMMIT.
W2_THINKS = len(W2_SQL) + 1


@dataclass(frozen=True)
class Transfer:
    """One W2 transaction's random inputs (pgbench's ranges for *scale*)."""

    aid: int
    bid: int
    tid: int
    delta: int

    @classmethod
    def random(cls, rng: random.Random, scale: int) -> Transfer:
        return cls(
            aid=rng.randint(1, 100_000 * scale),
            bid=rng.randint(1, scale),
            tid=rng.randint(1, 10 * scale),
            delta=rng.randint(-5000, 5000),
        )

    def statements(self) -> list[tuple[str, list[int]]]:
        """The five statements with their ``$n`` parameters."""
        params: list[list[int]] = [
            [self.delta, self.aid],
            [self.aid],
            [self.delta, self.tid],
            [self.delta, self.bid],
            [self.tid, self.bid, self.aid, self.delta],
        ]
        return list(zip(W2_SQL, params, strict=True))


def random_aid(rng: random.Random, scale: int) -> int:
    return rng.randint(1, 100_000 * scale)


def pgbench_script(workload: str, think_ms: float) -> str:
    """A pgbench custom script for W1 or W2, think time written as ``\\sleep``."""
    if workload == "w1":
        return (
            "\\set aid random(1, 100000 * :scale)\n"
            "SELECT abalance FROM pgbench_accounts WHERE aid = :aid;\n"
        )
    sleep = f"\\sleep {int(think_ms * 1000)} us\n" if think_ms > 0 else ""
    body = [
        "UPDATE pgbench_accounts SET abalance = abalance + :delta WHERE aid = :aid;",
        "SELECT abalance FROM pgbench_accounts WHERE aid = :aid;",
        "UPDATE pgbench_tellers SET tbalance = tbalance + :delta WHERE tid = :tid;",
        "UPDATE pgbench_branches SET bbalance = bbalance + :delta WHERE bid = :bid;",
        "INSERT INTO pgbench_history (tid, bid, aid, delta, mtime)"
        " VALUES (:tid, :bid, :aid, :delta, CURRENT_TIMESTAMP);",
    ]
    lines = [
        "\\set aid random(1, 100000 * :scale)",
        "\\set bid random(1, 1 * :scale)",
        "\\set tid random(1, 10 * :scale)",
        "\\set delta random(-5000, 5000)",
        "BEGIN;",
    ]
    text = "\n".join(lines) + "\n"
    for statement in [*body, "END;"]:
        text += sleep + statement + "\n"
    return text
