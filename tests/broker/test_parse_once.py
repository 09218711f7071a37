"""Through a real broker, a request's SQL is parsed once: the plan made before it queues is
what the audit decision, the placeholder check and a lost link's verdict read."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

import pytest
from brokertest import request, rows

from broker.sql import plan as plan_module


def test_a_three_statement_request_parses_each_sql_text_once(
    start_broker: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    broker = start_broker(pool_size=1)
    parsed: list[str] = []
    real: Callable[..., Any] = plan_module.parse_sql

    def counted(sql: str) -> Any:
        parsed.append(sql)
        return real(sql)

    monkeypatch.setattr(plan_module, "parse_sql", counted)
    tag = uuid.uuid4().hex  # texts no earlier request planned
    req = request(
        (f"SELECT $1::int + 1 AS n /* {tag} */", [41]),
        (f"SELECT lower($1) AS s /* {tag} */", ["ABC"]),
        (f"SELECT now() IS NOT NULL AS t /* {tag} */", []),
    )
    reply = broker.execute(req)
    assert [rows(r) for r in reply.results] == [[(42,)], [("abc",)], [(True,)]]
    assert len(parsed) == 3
    broker.execute(req)
    assert len(parsed) == 3  # warm: the cached plans
