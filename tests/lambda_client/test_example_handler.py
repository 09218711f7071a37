"""The example handler (examples/handler.py) run as Lambda runs it, against a real broker."""

from __future__ import annotations

import importlib.util
from decimal import Decimal
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from devtools.brokerproc import BrokerProcess
from devtools.lambda_context import FakeLambdaContext
from lambda_client import BrokerClient, IntegrityError

HANDLER = Path(__file__).resolve().parents[2] / "examples" / "handler.py"


def load_handler(monkeypatch: pytest.MonkeyPatch, target: str) -> ModuleType:
    """Import examples/handler.py fresh, as module ``handler``, with PGBROKER_URL set."""
    monkeypatch.setenv("PGBROKER_URL", target)
    spec = importlib.util.spec_from_file_location("handler", HANDLER)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def balance(db: BrokerClient, account: int) -> Any:
    return db.query("SELECT balance FROM accounts WHERE id = $1", [account]).scalar()


def test_example_handler_moves_money_and_records_each_invocation(
    broker: BrokerProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    module = load_handler(monkeypatch, broker.target)
    module.create_schema()
    module.create_schema()  # idempotent
    db = BrokerClient(broker.target)
    start = (balance(db, 7), balance(db, 8))
    contexts = [FakeLambdaContext(remaining=3) for _ in range(20)]
    for context in contexts:
        reply = module.handler({"from": 7, "to": 8, "amount": "1.25"}, context)
    assert reply["balances"] == {"7": str(start[0] - 25), "8": str(start[1] + 25)}
    recorded = db.query(
        "SELECT count(*) FROM transfers WHERE request_id = ANY($1)",
        [[c.aws_request_id for c in contexts]],
    ).scalar()
    assert recorded == 20
    assert module.db.channels_created == 1


def test_example_handler_refuses_an_overdraft_and_changes_nothing(
    broker: BrokerProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    module = load_handler(monkeypatch, broker.target)
    module.create_schema()
    db = BrokerClient(broker.target)
    before = balance(db, 9)
    with pytest.raises(IntegrityError) as info:
        module.handler({"from": 9, "to": 10, "amount": str(before + 1)}, FakeLambdaContext())
    assert info.value.sqlstate == "23514" and info.value.statement_index == 0
    assert balance(db, 9) == before == Decimal(before)
