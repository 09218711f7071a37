"""Through a real broker, each call's session is named from that call's own metadata, although
the broker keeps what it derived from metadata it saw before (`_Caller.of` in
broker/front/service.py)."""

from __future__ import annotations

from typing import Any

from broker.flow.batch import application_name
from lambda_client._status import FUNCTION_NAME_KEY, REQUEST_ID_KEY
from tests.support import request, rows

NAME_SQL = "SELECT current_setting('application_name')"


def test_each_call_names_its_session_from_its_own_metadata(start_inproc_broker: Any) -> None:
    broker = start_inproc_broker(pool_size=1)

    def session_name(request_id: str | None, function: str | None) -> str:
        metadata = [(REQUEST_ID_KEY, request_id)] if request_id else []
        metadata += [(FUNCTION_NAME_KEY, function)] if function else []
        reply = broker.execute(request(NAME_SQL), metadata=metadata)
        return str(rows(reply.results[0])[0][0])

    # Repeats and near-repeats: a request id with another function, a function without one.
    calls = [
        ("req-a", "fn-1"),
        ("req-b", "fn-1"),
        ("req-a", "fn-1"),
        ("req-a", "fn-2"),
        (None, "fn-1"),
        (None, None),
        ("req-b", "fn-1"),
        (None, None),
    ]
    names = [session_name(request_id, function) for request_id, function in calls]
    assert names == [application_name(function, request_id) for request_id, function in calls]
    assert len(set(names)) == 5
