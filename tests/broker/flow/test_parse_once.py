"""Through a real broker, a request's SQL is parsed once: the plan made before it queues is
what the audit decision, the placeholder check and a lost link's verdict read."""

from __future__ import annotations

import uuid
from typing import Any

from broker.sql.plan import cache_info
from tests.support import request, rows


def test_a_three_statement_request_parses_each_sql_text_once(start_inproc_broker: Any) -> None:
    broker = start_inproc_broker(pool_size=1)
    tag = uuid.uuid4().hex  # texts no earlier request planned
    req = request(
        (f"SELECT $1::int + 1 AS n /* {tag} */", [41]),
        (f"SELECT lower($1) AS s /* {tag} */", ["ABC"]),
        (f"SELECT now() IS NOT NULL AS t /* {tag} */", []),
    )
    before = cache_info()
    reply = broker.execute(req)
    assert [rows(r) for r in reply.results] == [[(42,)], [("abc",)], [(True,)]]
    cold = cache_info()
    # A miss is one parse; pg.py and the flow read the plan instead of planning again.
    assert (cold.misses - before.misses, cold.hits - before.hits) == (3, 0)
    broker.execute(req)
    warm = cache_info()
    assert (warm.misses - cold.misses, warm.hits - cold.hits) == (0, 3)
