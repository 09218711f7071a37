"""The per-call hot path's shortcuts (issue 14, client side) give what the general code gives.

Every call builds its request (`query_request`, `codec.encode`), checks its timeout
(`seconds`) and decodes its rows (`Result.from_proto`, `codec.decode_row`); the Django
backend binds its literals (`lambda_client.django._adapt.mogrify`). Each has a shortcut for
the common case; these tests pin that the shortcut and the general path agree, edge cases
included, without a database (the round trips are in test_codec, test_bad_input and
test_django_backend).
"""

from __future__ import annotations

import enum
import math
import re
from collections import UserList
from typing import Any

import pytest

from lambda_client._proto.pgbroker.v1 import broker_pb2 as pb
from lambda_client._requests import query_request, seconds, transaction_request
from lambda_client._result import Result
from lambda_client.codec import (
    _kind_of,
    add_params,
    decode,
    decode_row,
    encode,
    encode_params,
    utf8_text,
)


class Colour(enum.IntEnum):
    RED = 1


class Name(str):
    pass


def _general(value: object, name: str = "value") -> pb.Value:
    """`encode` without its shortcuts: `_kind_of`, then the Value of that kind."""
    kind, payload = _kind_of(value, name)
    return pb.Value(**{kind: payload})


@pytest.mark.parametrize(
    "value",
    [
        *(0, 7, -(2**63), 2**63 - 1, 2**63, -(2**63) - 1, 10**30, True, False, Colour.RED),
        *("", "SELECT 1", "héllo ✓ 😀", Name("sub"), None, 1.5),
    ],
    ids=repr,
)
def test_encode_gives_what_the_general_path_gives(value: object) -> None:
    assert encode(value) == _general(value)
    assert encode(value).WhichOneof("kind") == _general(value).WhichOneof("kind")


def test_a_bool_and_an_int_enum_are_not_taken_for_plain_ints() -> None:
    assert encode(True).WhichOneof("kind") == "bool"
    assert encode(Colour.RED) == pb.Value(int64=1)
    assert encode(2**63) == pb.Value(numeric=str(2**63))


def test_text_with_a_lone_surrogate_still_names_its_parameter() -> None:
    with pytest.raises(ValueError, match=r"\$2: text has a lone surrogate"):
        encode_params(["ok", "\ud800"])
    with pytest.raises(ValueError, match=r"\$1: text has a lone surrogate"):
        encode_params((Name("\udfff"),))


@pytest.mark.parametrize("params", [[1, "a"], (1, "a"), UserList([1, "a"])], ids=repr)
def test_any_sequence_of_parameters_is_taken(params: Any) -> None:
    assert encode_params(params) == [pb.Value(int64=1), pb.Value(text="a")]


@pytest.mark.parametrize("params", ["ab", b"ab", {"a": 1}, {1, 2}, 5], ids=repr)
def test_parameters_that_are_not_a_sequence_are_refused(params: Any) -> None:
    with pytest.raises(TypeError, match="params must be a list or tuple"):
        encode_params(params)


_EDGE_PARAMS: list[Any] = [
    *(0, 7, -(2**63), 2**63 - 1, 2**63, -(2**63) - 1, True, False, Colour.RED, None, 1.5),
    *("", "SELECT 1", "héllo ✓ 😀", Name("sub"), b"\x00", [1, None], {"a": [1]}),
]


@pytest.mark.parametrize("params", [[], _EDGE_PARAMS, tuple(_EDGE_PARAMS)], ids=len)
def test_add_params_adds_what_encode_params_gives(params: Any) -> None:
    added = pb.Statement()
    add_params(added.params, params)
    assert added == pb.Statement(params=encode_params(params))
    assert (
        added.SerializeToString() == pb.Statement(params=encode_params(params)).SerializeToString()
    )
    kinds = [v.WhichOneof("kind") for v in added.params]
    assert kinds == [encode(v).WhichOneof("kind") for v in params]


def test_add_params_names_a_bad_parameter_and_refuses_what_encode_params_refuses() -> None:
    with pytest.raises(ValueError, match=r"\$3: text has a lone surrogate"):
        add_params(pb.Statement().params, [1, "ok", "\ud800"])
    with pytest.raises(TypeError, match=r"\$2: cannot send a value of type object"):
        add_params(pb.Statement().params, [1, object()])
    for not_params in ("ab", b"ab", {"a": 1}, {1, 2}, 5):
        with pytest.raises(TypeError, match="params must be a list or tuple"):
            add_params(pb.Statement().params, not_params)  # type: ignore[arg-type]


def _old_statement(sql: str, params: Any) -> pb.Statement:
    """How a statement was built before it was filled in place."""
    return pb.Statement(sql=utf8_text(sql, "sql"), params=encode_params(params))


@pytest.mark.parametrize("params", [None, [], [1, "x", None, 2.5, [1, 2]]], ids=repr)
def test_a_query_request_is_the_same_bytes_as_before(params: Any) -> None:
    sql = "SELECT $1, $2, $3, $4, $5"
    old = pb.ExecuteRequest(statements=[_old_statement(sql, params)])
    assert query_request(sql, params).SerializeToString() == old.SerializeToString()
    read_only = query_request(sql, params, read_only=True)
    assert read_only.options.read_only and len(read_only.statements) == 1
    assert read_only.statements[0] == old.statements[0]


def test_a_transaction_request_is_the_same_bytes_as_before() -> None:
    statements: list[Any] = ["SELECT 1", ("SELECT $1", [5]), ["SELECT $1::text", ("t",)]]
    old = pb.ExecuteRequest(
        statements=[
            _old_statement("SELECT 1", None),
            _old_statement("SELECT $1", [5]),
            _old_statement("SELECT $1::text", ("t",)),
        ],
        options=pb.TransactionOptions(
            isolation=pb.ISOLATION_LEVEL_SERIALIZABLE, read_only=True, deferrable=True
        ),
    )
    new = transaction_request(statements, "serializable", True, True)
    assert new.SerializeToString() == old.SerializeToString()


def test_a_transaction_request_with_default_options_is_the_same_bytes_as_before() -> None:
    statements: list[Any] = [("SELECT $1", [5, "x"]), "SELECT 1", ("SELECT $1", None)]
    old = pb.ExecuteRequest(
        statements=[
            _old_statement("SELECT $1", [5, "x"]),
            _old_statement("SELECT 1", None),
            _old_statement("SELECT $1", None),
        ],
        options=pb.TransactionOptions(),
    )
    new = transaction_request(statements, None, False, False)
    assert new.HasField("options")
    assert new.SerializeToString() == old.SerializeToString()
    # A falsy argument that is not the default is still checked, not taken for it.
    with pytest.raises(TypeError, match="read_only must be True or False"):
        transaction_request(statements, None, 0, False)  # type: ignore[arg-type]


def test_a_bad_statement_still_names_its_index_and_its_parameter() -> None:
    with pytest.raises(TypeError, match="statement 1: each statement"):
        transaction_request(["SELECT 1", 5], None, False, False)  # type: ignore[list-item]
    with pytest.raises(TypeError, match=r"\$1: cannot send a value of type object"):
        transaction_request([("SELECT $1", [object()])], None, False, False)
    with pytest.raises(TypeError, match="sql must be a str"):
        query_request(b"SELECT 1", None)  # type: ignore[arg-type]


class Seconds(float):
    pass


@pytest.mark.parametrize("value", [30.0, 1e-9, 1e300, 5, Seconds(2.5)], ids=repr)
def test_a_good_timeout_is_taken_as_a_float(value: Any) -> None:
    taken = seconds("timeout", value)
    assert taken == float(value) and type(taken) is float


@pytest.mark.parametrize(
    "value, error",
    [
        *((0.0, ValueError), (-0.0, ValueError), (-1.5, ValueError), (math.nan, ValueError)),
        *((math.inf, ValueError), (-math.inf, ValueError), (Seconds("nan"), ValueError)),
        *((True, TypeError), ("5", TypeError)),
    ],
    ids=repr,
)
def test_a_bad_timeout_is_still_refused(value: Any, error: type[Exception]) -> None:
    with pytest.raises(error, match="timeout must be a"):
        seconds("timeout", value)
    assert seconds("timeout", 0.0, allow_zero=True) == 0.0


def _values() -> list[pb.Value]:
    return [
        pb.Value(int64=3),
        pb.Value(null=pb.TYPE_INT64),
        pb.Value(),  # no kind set: NULL too
        pb.Value(text="x"),
        pb.Value(numeric="1.50"),
        pb.Value(array=pb.Array(element_type=pb.TYPE_INT64, values=[pb.Value(int64=1)])),
    ]


def test_decode_row_gives_what_decode_gives_per_value() -> None:
    values = _values()
    row = decode_row(values)
    assert row == tuple(decode(v) for v in values)
    assert row[1] is None and row[2] is None and isinstance(row, tuple)


def test_a_result_keeps_its_columns_rows_and_tag() -> None:
    proto = pb.StatementResult(
        columns=[pb.Column(name="a", type_oid=23), pb.Column(name="b", type_oid=25)],
        rows=[pb.Row(values=[pb.Value(int64=1), pb.Value(text="x")]), pb.Row(values=[])],
        rows_affected=2,
        command_tag="SELECT 2",
    )
    result = Result.from_proto(proto)
    assert result == Result(
        columns=("a", "b"),
        rows=[(1, "x"), ()],
        rows_affected=2,
        command_tag="SELECT 2",
        type_oids=(23, 25),
    )
    empty = Result.from_proto(pb.StatementResult(rows_affected=-1, command_tag="CREATE TABLE"))
    assert (empty.columns, empty.rows, empty.type_oids) == ((), [], ())
    assert empty == Result((), [], -1, "CREATE TABLE", ())
    assert repr(empty) == repr(Result((), [], -1, "CREATE TABLE", ()))
    with pytest.raises(AttributeError):
        empty.rows = []  # type: ignore[misc]  # still frozen
    # Rows without columns cannot come from Postgres, but are kept if they do.
    odd = Result.from_proto(pb.StatementResult(rows=[pb.Row(values=[pb.Value(int64=1)])]))
    assert odd.rows == [(1,)] and odd.columns == ()


# -- the Django backend's literals ---------------------------------------------------------


@pytest.fixture()
def adapters() -> Any:
    pytest.importorskip("django")
    psycopg = pytest.importorskip("psycopg")
    from lambda_client.django import _adapt

    return _adapt.adapters_for(psycopg.adapters)


def test_mogrify_binds_each_call_s_own_values_on_a_remembered_text(adapters: Any) -> None:
    from lambda_client.django._adapt import _parse_cached, mogrify

    sql = "SELECT %s, '100%%', %s"
    assert mogrify(sql, [1, "a"], adapters) == "SELECT 1, '100%', 'a'"
    hits = _parse_cached.cache_info().hits
    assert mogrify(sql, [2, "b'c"], adapters) == "SELECT 2, '100%', 'b''c'"
    assert _parse_cached.cache_info().hits == hits + 1
    named = "SELECT %(a)s + %(a)s"
    assert mogrify(named, {"a": 4}, adapters) == "SELECT 4 + 4"
    assert mogrify(sql, None, adapters) == sql


def test_mogrify_parses_a_long_text_each_time_without_keeping_it(adapters: Any) -> None:
    from lambda_client.django._adapt import _CACHED_SQL_CHARS, _parse_cached, mogrify

    count = _CACHED_SQL_CHARS // 4 + 1
    sql = "INSERT INTO t VALUES " + ", ".join(["(%s)"] * count)
    before = _parse_cached.cache_info()
    assert mogrify(sql, list(range(count)), adapters).endswith(f"({count - 1})")
    after = _parse_cached.cache_info()
    assert (after.hits, after.misses, after.currsize) == (
        before.hits,
        before.misses,
        before.currsize,
    )


@pytest.mark.parametrize(
    "sql, params, message",
    [
        ("SELECT %x", [1], "only '%s', '%b', '%t' are allowed as placeholders, got '%x'"),
        ("SELECT %s, %s", [1], "more placeholders than the 1 parameters"),
        ("SELECT %s", [1, 2], "1 placeholders but 2 parameters"),
        ("SELECT %(a)s", [1], "named placeholder with positional parameters"),
        ("SELECT %s", {"a": 1}, "positional placeholder with named parameters"),
    ],
)
def test_mogrify_errors_are_unchanged_on_a_remembered_text(
    adapters: Any, sql: str, params: Any, message: str
) -> None:
    from lambda_client import errors
    from lambda_client.django._adapt import mogrify

    for _ in range(2):  # parsed, then remembered
        with pytest.raises(errors.ProgrammingError, match=re.escape(message)):
            mogrify(sql, params, adapters)
