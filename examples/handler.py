"""Example Lambda handler: move money between two accounts through pgbroker.

Deploy with ``Handler: handler.handler`` and the environment variable ``PGBROKER_URL`` (e.g.
``dns:///broker.pgbroker.local:50051``); the tables come from ``schema.sql`` beside this file
(`create_schema` runs it through the broker). Event::

    {"from": 1, "to": 2, "amount": "10.00"}

The client is built once, at module level, so warm invocations reuse its channel; every call
passes ``context`` so the broker gets the invocation's deadline and request id.
"""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path
from typing import Any

from lambda_client import BrokerClient

SCHEMA_PATH = Path(__file__).with_name("schema.sql")

db = BrokerClient()

# One statement moves the money, so the two rows are locked together; a deadlock with a
# concurrent opposite transfer (40P01) is retried by the client because the whole transaction
# is resent (retry_serialization=True).
MOVE = """
UPDATE accounts
   SET balance = balance + CASE WHEN id = $1 THEN -$3::numeric ELSE $3::numeric END
 WHERE id IN ($1, $2)
RETURNING id, balance
"""
RECORD = """
INSERT INTO transfers (request_id, from_id, to_id, amount)
VALUES ($1, $2, $3, $4)
RETURNING id
"""


def handler(event: dict[str, Any], context: Any) -> dict[str, Any]:
    """Transfer ``amount`` from account ``from`` to account ``to``; return the new balances.

    Raises `lambda_client.IntegrityError` when the balance would go negative (the CHECK
    constraint), and `lambda_client.DeadlineExceeded` when the invocation runs out of time.
    """
    source, target = int(event["from"]), int(event["to"])
    amount = Decimal(str(event["amount"]))
    moved, recorded = db.transaction(
        [
            (MOVE, [source, target, amount]),
            (RECORD, [context.aws_request_id, source, target, amount]),
        ],
        context=context,
        retry_serialization=True,
    )
    balances = dict(moved.rows)
    return {
        "transfer_id": recorded.scalar(),
        "balances": {str(k): str(v) for k, v in sorted(balances.items())},
    }


def schema_statements() -> list[str]:
    """The statements of ``schema.sql``, one per entry (it has no ``;`` inside strings)."""
    text = SCHEMA_PATH.read_text()
    lines = [line for line in text.splitlines() if not line.lstrip().startswith("--")]
    return [s.strip() for s in "\n".join(lines).split(";") if s.strip()]


def create_schema(client: BrokerClient | None = None) -> None:
    """Create the example's tables and 100 funded accounts (idempotent) through the broker."""
    (client or db).transaction(schema_statements())
