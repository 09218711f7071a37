"""SQL nested deeper than pglast can walk on a thread's stack (issue 15): refused as too deep,
or planned (the plan reads libpg_query's JSON tree without recursion: broker/sql/tree.py;
a big request's analysis runs on a parser thread), never a crash of the process."""

from __future__ import annotations

import subprocess
import sys
import threading
from typing import Any

import grpc
import pytest

from broker.sql.plan import DIRECT_PARSE_CHARS, plan_request, plan_statement
from broker.sql.sessionstate import TOO_DEEP, SessionStateError
from broker.sql.stack import ParserThreads, on_parser_thread, parser_threads
from lambda_client._proto.pgbroker.v1 import broker_pb2_grpc as pb_grpc
from tests.support import request, rows, status_of

# 25,000 terms, 50 KB: what killed the broker with SIGSEGV inside pglast.parse_sql.
CRASH_SQL = "SELECT " + "+".join(["1"] * 25_000)
# 32,000 casts: under libpg_query's depth check, but ~8.4 MB of C stack in pglast.
DEEP_CASTS = "SELECT 1" + "::int" * 32_000


def test_the_crash_input_kills_a_plain_pglast_parse() -> None:
    """The hazard itself, in a child process: pglast on a thread's default 8 MB stack."""
    code = f"import pglast; pglast.parse_sql({CRASH_SQL!r})"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=60)
    assert result.returncode == -11  # SIGSEGV: if pglast learns to check, this test can go


def test_sql_too_deep_for_libpg_query_is_refused_as_too_deep() -> None:
    assert plan_statement(CRASH_SQL).refusal is TOO_DEEP
    with pytest.raises(SessionStateError) as refused:
        plan_request(["SELECT 1", CRASH_SQL])
    assert refused.value.statement_index == 1
    assert "nests too deeply" in str(refused.value) and "54001" in str(refused.value)


def test_deep_sql_that_libpg_query_accepts_is_planned_on_any_thread() -> None:
    plan = plan_statement(DEEP_CASTS)
    assert plan.refusal is None and not plan.opaque and plan.placeholders == 0


def test_short_sql_is_parsed_where_it_is_asked() -> None:
    sql = "SELECT " + "+".join(["1"] * (DIRECT_PARSE_CHARS // 2 - 4))
    assert len(sql) <= DIRECT_PARSE_CHARS
    assert plan_statement(sql).refusal is None


def test_parser_threads_run_calls_in_order_and_return_their_exceptions() -> None:
    threads = ParserThreads(threads=1, stack_bytes=64 * 1024 * 1024)
    try:
        assert threads.submit(on_parser_thread).result(10) is True
        assert not on_parser_thread()
        with pytest.raises(ZeroDivisionError):
            threads.submit(lambda: 1 / 0).result(10)
        assert [threads.submit(str, n).result(10) for n in range(3)] == ["0", "1", "2"]
    finally:
        threads.shutdown()
    with pytest.raises(RuntimeError):
        threads.submit(str, 1)
    # Other threads started afterwards get the default stack size back.
    assert threading.stack_size() == 0
    assert parser_threads() is parser_threads()


def test_the_crash_input_is_refused_by_a_broker_process_that_keeps_serving(
    start_broker_process: Any,
) -> None:
    broker = start_broker_process()
    with grpc.insecure_channel(broker.target) as channel:
        stub = pb_grpc.BrokerStub(channel)
        for sql in (CRASH_SQL, "SELECT " + "||".join(["'a'"] * 40_000)):
            with pytest.raises(grpc.RpcError) as refused:
                stub.Execute(request(sql), timeout=60)
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "nests too deeply" in refused.value.details()
            assert status_of(refused.value).reason == "BAD_REQUEST"
        # Deep, but within libpg_query's check: analysed on a parser thread, then Postgres
        # decides (it has its own stack limit: 54001 is a clean error too).
        try:
            reply = stub.Execute(request(DEEP_CASTS), timeout=60)
            assert rows(reply.results[0]) == [(1,)]
        except grpc.RpcError as exc:
            assert status_of(exc).database_error.sqlstate == "54001"
        summed = stub.Execute(request("SELECT " + "+".join(["1"] * 2_000)), timeout=60)
        assert rows(summed.results[0]) == [(2_000,)]
        assert rows(stub.Execute(request("SELECT 1"), timeout=10).results[0]) == [(1,)]
    assert broker.proc is not None and broker.proc.poll() is None
