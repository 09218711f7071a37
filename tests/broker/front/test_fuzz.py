"""Property-based fuzzing (hypothesis) of what faces untrusted input (issue 15): the request
decoder and validation, the SQL analysis, and a real broker fed messages built from the
contract. Each property may refuse its input, with one of the broker's declared failures or
statuses, but never raises anything else, never crashes, and the broker keeps serving.

Bounded for CI: a few dozen examples each, a deadline per example, a few seconds in all.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import grpc
import pytest
from google.protobuf import message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import DecodeError, Message
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from broker.errors import BrokerFailure
from broker.front.service import validate
from broker.security.limits import Limits
from broker.sql.plan import plan_statement
from lambda_client._proto.pgbroker.v1 import broker_pb2 as pb
from tests.support import request, rows

LIMITS = Limits(
    max_statements=1000,
    max_request_bytes=8 << 20,
    max_result_rows=1_000_000,
    max_result_bytes=32 << 20,
    max_inflight_per_caller=0,
)
SETTINGS = settings(
    max_examples=60,
    deadline=timedelta(seconds=5),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    database=None,  # no example database in the worktree: each run is fresh and bounded
)

# SQL the analysis must read as well as garbage: placeholders, session-state changes,
# several statements, dollar quotes, comments, DO blocks, unterminated text.
SQL_SAMPLES = [
    "SELECT 1",
    "SELECT $1",
    "SELECT $1::int + $2::int",
    "SELECT $70000",
    "SET search_path = evil",
    "SET LOCAL statement_timeout = 0",
    "SELECT set_config('app.x', '1', false)",
    "SELECT 1; SELECT 2",
    "DO $$ BEGIN PERFORM 1; END $$",
    "SELECT '$1' /* $2 */ -- $3",
    "SELECT $$ unterminated",
    "RESET ALL",
    "DISCARD ALL",
    "LISTEN x",
    "PREPARE p AS SELECT 1",
    "SELECT 1 FROM (SELECT 2) AS s WHERE 1 = ANY($1)",
    "SELECT \x00",
]

# The left-recursive chains whose depth grows with the SQL's length (broker/sql/stack.py).
CHAIN_LINKS = ["+1", "::int", "||'a'", " IS NULL", " AND true", "-1", ' COLLATE "C"']


@st.composite
def deep_sql(draw: st.DrawFn) -> str:
    """A long chain of one or two kinds of links, or deep brackets, up to 40,000 levels."""
    links = draw(st.lists(st.sampled_from(CHAIN_LINKS), min_size=1, max_size=2))
    levels = draw(st.integers(min_value=1, max_value=40_000))
    if draw(st.booleans()):
        return "SELECT " + "(" * min(levels, 12_000) + "1" + ")" * min(levels, 12_000)
    return "SELECT 1" + "".join(links) * (levels // len(links))


def sql_text() -> st.SearchStrategy[str]:
    return st.one_of(
        st.sampled_from(SQL_SAMPLES),
        st.text(max_size=200),
        st.lists(st.sampled_from(SQL_SAMPLES), max_size=4).map("; ".join),
    )


def _scalar(field: FieldDescriptor) -> st.SearchStrategy[Any]:
    kind = field.type
    if kind == FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if kind in (FieldDescriptor.TYPE_INT32, FieldDescriptor.TYPE_SINT32):
        return st.integers(-(2**31), 2**31 - 1)
    if kind in (FieldDescriptor.TYPE_INT64, FieldDescriptor.TYPE_SINT64):
        return st.integers(-(2**63), 2**63 - 1)
    if kind == FieldDescriptor.TYPE_UINT32:
        return st.integers(0, 2**32 - 1)
    if kind == FieldDescriptor.TYPE_UINT64:
        return st.integers(0, 2**64 - 1)
    if kind in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
        return st.floats(width=64 if kind == FieldDescriptor.TYPE_DOUBLE else 32)
    if kind == FieldDescriptor.TYPE_BYTES:
        return st.binary(max_size=40)
    if kind == FieldDescriptor.TYPE_ENUM:
        # proto3 enums are open: a sender may put any number there.
        return st.one_of(
            st.sampled_from([v.number for v in field.enum_type.values]), st.integers(-3, 99)
        )
    if kind == FieldDescriptor.TYPE_STRING:
        if field.name == "sql":
            return sql_text()
        if field.name in ("numeric", "json", "jsonb"):
            return st.one_of(st.sampled_from(["1.5", "NaN", "-Infinity", "{}", "[1]"]), st.text())
        return st.text(max_size=40)
    raise AssertionError(f"no strategy for {field.full_name} ({kind})")


@st.composite
def message(draw: st.DrawFn, descriptor: Descriptor, depth: int = 4) -> Message:
    """A message of *descriptor* with a random subset of its fields set (one field of each
    oneof at most), nesting at most *depth* messages: built from the contract itself, so a
    field added to the .proto is fuzzed too."""
    built = message_factory.GetMessageClass(descriptor)()
    chosen_oneof = {
        oneof.name: draw(st.sampled_from([None, *oneof.fields])) for oneof in descriptor.oneofs
    }
    for field in descriptor.fields:
        oneof = field.containing_oneof
        if oneof is not None and chosen_oneof[oneof.name] is not field:
            continue
        if oneof is None and not draw(st.booleans()):
            continue
        if field.message_type is not None:
            if depth <= 0:
                continue
            if field.is_repeated:
                if field.message_type.GetOptions().map_entry:
                    continue
                for item in draw(st.lists(message(field.message_type, depth - 1), max_size=3)):
                    getattr(built, field.name).add().CopyFrom(item)
            else:
                getattr(built, field.name).CopyFrom(draw(message(field.message_type, depth - 1)))
        elif field.is_repeated:
            getattr(built, field.name).extend(draw(st.lists(_scalar(field), max_size=3)))
        else:
            setattr(built, field.name, draw(_scalar(field)))
    return built


def _validate(req: pb.ExecuteRequest) -> None:
    # A declared refusal is fine: BadRequest, BadParameter, LimitExceeded, SessionStateError.
    with contextlib.suppress(BrokerFailure):
        validate(req, LIMITS)


@SETTINGS
@given(message(pb.ExecuteRequest.DESCRIPTOR))
def test_validation_of_any_request_returns_or_refuses(req: pb.ExecuteRequest) -> None:
    _validate(req)


@SETTINGS
@given(message(pb.ExecuteRequest.DESCRIPTOR), st.data())
def test_decoding_any_bytes_returns_a_message_or_a_decode_error(
    req: pb.ExecuteRequest, data: st.DataObject
) -> None:
    wire = bytearray(req.SerializeToString())
    for _ in range(data.draw(st.integers(0, 4))):  # corrupt a few bytes, or cut it short
        if wire and data.draw(st.booleans()):
            wire[data.draw(st.integers(0, len(wire) - 1))] = data.draw(st.integers(0, 255))
        else:
            wire = wire[: data.draw(st.integers(0, len(wire)))]
    try:
        decoded = pb.ExecuteRequest.FromString(bytes(wire))
    except DecodeError:
        return  # the gate answers INVALID_ARGUMENT/BAD_REQUEST (broker/security/gate.py)
    _validate(decoded)


@settings(SETTINGS, max_examples=25, deadline=timedelta(seconds=10))
@given(st.one_of(deep_sql(), st.text(max_size=5000)))
def test_analysing_any_sql_returns_a_plan(sql: str) -> None:
    plan = plan_statement(sql)
    assert plan.placeholders is None or plan.placeholders >= 0


@pytest.fixture(scope="module")
def broker(postgres: Any) -> Iterator[Any]:
    from tests.fixtures.brokers import InProcessBroker

    with InProcessBroker(postgres.dsn, pool_size=2) as started:
        started.transact_stub = started.stub()
        yield started


# What a refused request may get: never INTERNAL or UNKNOWN (a bug, or a crash).
DECLARED = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.ABORTED,
}
# A Transact stream that ends without commit or rollback is rolled back and answered CANCELLED
# (broker/front/transact.py): declared too.
TRANSACT_DECLARED = DECLARED | {grpc.StatusCode.CANCELLED}


@settings(SETTINGS, max_examples=40)
@given(message(pb.ExecuteRequest.DESCRIPTOR))
def test_a_broker_answers_any_execute_request_with_a_declared_status(
    broker: Any, req: pb.ExecuteRequest
) -> None:
    req.options.read_only = True  # fuzzed SQL must not write to the shared test database
    try:
        broker.execute(req, timeout=30)
    except grpc.RpcError as exc:
        assert exc.code() in DECLARED, (exc.code(), exc.details())
    assert rows(broker.execute(request("SELECT 1")).results[0]) == [(1,)]


@settings(SETTINGS, max_examples=30)
@given(st.lists(message(pb.TransactRequest.DESCRIPTOR), min_size=1, max_size=4))
def test_a_broker_answers_any_transact_stream_with_a_declared_status(
    broker: Any, steps: list[pb.TransactRequest]
) -> None:
    begin = pb.TransactRequest(begin=pb.TransactionOptions(read_only=True))
    stub = broker.transact_stub
    try:
        for _ in stub.Transact(iter([begin, *steps]), timeout=30):
            pass
    except grpc.RpcError as exc:
        assert exc.code() in TRANSACT_DECLARED, (exc.code(), exc.details())
    assert rows(broker.execute(request("SELECT 1")).results[0]) == [(1,)]
