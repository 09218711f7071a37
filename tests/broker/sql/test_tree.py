"""The planner on libpg_query's JSON tree (broker/sql/tree.py) decides every statement as the
planner on pglast's Python AST did (reference_plan.py, the code it replaced): the same plan,
refusal included, for every SQL text in this repository's sources and tests, and for SQL
built by hypothesis from session-changing fragments; and it sees the same nodes.
"""

from __future__ import annotations

import ast as pyast
import dataclasses
import json
from collections import Counter
from datetime import timedelta
from pathlib import Path
from typing import Any

import pglast
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pglast.parser import ParseError, parse_sql_json

from broker.sql import plan as plan_module
from broker.sql import tree
from tests.broker.sql import reference_plan, reference_sessionstate

ROOT = Path(__file__).resolve().parents[3]


def _string_constants() -> list[str]:
    """Every string literal of the broker's, the client's, the bench's and the tests' Python
    sources: their SQL (and much that is not SQL, which must be left unparsed alike)."""
    found: set[str] = set()
    for folder in ("broker", "client", "bench", "tests", "devtools", "examples"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            try:
                module = pyast.parse(path.read_text(encoding="utf-8"))
            except (SyntaxError, UnicodeDecodeError):
                continue
            for node in pyast.walk(module):
                value = node.value if isinstance(node, pyast.Constant) else None
                if isinstance(value, str) and 0 < len(value) <= 20_000 and "\x00" not in value:
                    found.add(value)
    return sorted(found)


CORPUS = _string_constants()


def _fields(plan: Any) -> dict[str, Any]:
    return {f.name: getattr(plan, f.name) for f in dataclasses.fields(plan)}


def assert_same_plan(sql: str) -> None:
    for role_locked in (False, True):
        try:
            old = reference_plan._plan(sql, role_locked)
        except UnicodeEncodeError:
            with pytest.raises(UnicodeEncodeError):
                plan_module._plan(sql, role_locked)
            return
        new = plan_module._plan(sql, role_locked)
        if _empty_copy_file_name(sql):
            # The one known difference: libpg_query's JSON leaves out an empty string field, so
            # `COPY t FROM ''` reads as `COPY t FROM STDIN` and is refused (stricter, never
            # looser: a server file named '' cannot be opened anyway).
            assert old.refusal is None and new.refusal is not None
            assert new.refusal.command in ("COPY FROM STDIN", "COPY TO STDOUT")
            old = dataclasses.replace(old, refusal=new.refusal)
        assert _fields(new) == _fields(old), (sql, role_locked)


def _empty_copy_file_name(sql: str) -> bool:
    try:
        statements = pglast.parse_sql(sql)
    except ParseError:
        return False
    return len(statements) == 1 and getattr(statements[0].stmt, "filename", None) == ""


def _old_kinds(sql: str) -> Counter[str]:
    return Counter(
        type(node).__name__
        for raw in pglast.parse_sql(sql)
        for node in reference_sessionstate.walk(raw.stmt)
    )


def _new_kinds(sql: str) -> Counter[str]:
    # libpg_query writes a list inside a list as a List node; pglast makes it a tuple.
    return Counter(
        kind for stmt in tree.parse(sql) for kind, _ in tree.walk(stmt) if kind != "List"
    )


def _parses(sql: str) -> bool:
    try:
        parse_sql_json(sql)
    except (ParseError, UnicodeEncodeError):
        return False
    return True


def test_the_corpus_is_mostly_sql_that_parses() -> None:
    """A test over a corpus that silently lost its SQL could not fail."""
    parsed = [sql for sql in CORPUS if _parses(sql)]
    assert len(parsed) > 500
    kinds = Counter(kind for sql in parsed for kind, _ in tree.parse(sql))
    for kind in ("SelectStmt", "VariableSetStmt", "InsertStmt", "CreateStmt", "DoStmt"):
        assert kinds[kind] > 0, kind


def test_both_planners_agree_on_every_sql_text_of_the_repository() -> None:
    for sql in CORPUS:
        assert_same_plan(sql)


def test_both_walks_see_the_same_nodes() -> None:
    """Every node pglast's AST has, the JSON tree has, of the same type: no inline field is
    mistyped or missed (an unknown inline type would show as ``?``)."""
    for sql in CORPUS:
        if _parses(sql):
            assert _new_kinds(sql) == _old_kinds(sql), sql


def test_deep_json_is_decoded_as_json_loads_decodes_it() -> None:
    for sql in CORPUS:
        if _parses(sql):
            text = parse_sql_json(sql)
            assert tree._loads_deep(text) == json.loads(text)
    odd = '{"a":[1,-2,3.5e2,true,false,null,"q\\"\\\\x\\u00e9\\n",{}],"b":{"c":[]}}'
    assert tree._loads_deep(odd) == json.loads(odd)


@pytest.mark.parametrize(
    "sql",
    [
        "",
        ";",
        " ; ; ",
        "SELECT 1; SELECT 2",
        "SELECT 'a\x01\x1f\x7f\u2028\"\\'",
        'SELECT "a\x02b"',
        "SELECT E'\\xff'",  # bytes that are not UTF-8: Postgres' lexer refuses them
        "SELECT set_config('a', E'\\377', false)",
        "SELECT U&'\\D800'",
        "SELECT '\ud7ff\U0010ffff', $1, $99",
        "SELECT set_config('\u0430', 'x', 'TRUE ')",
        "COPY t FROM ''",
        "SELECT 99999999999999999999, -0.0e-0, 1e400",
    ],
)
def test_both_planners_agree_on_odd_text(sql: str) -> None:
    assert_same_plan(sql)


def test_sql_deeper_than_json_loads_goes_is_planned_alike() -> None:
    for sql in (
        "SELECT " + "+".join(["$1"] * 3_000),
        " UNION ALL ".join(f"SELECT {n}" for n in range(2_000)),
        "SELECT set_config('a', 'b', " + "NOT " * 600 + "false)",
        "SELECT 1" + "::int" * 2_000 + " FOR UPDATE",
    ):
        with pytest.raises(RecursionError):
            json.loads(parse_sql_json(sql))
        assert_same_plan(sql)


# -- generated SQL ----------------------------------------------------------------------------

_NAMES = st.sampled_from(
    ["t", "pg_temp.t", "pg_temp_3.t", "public.t", '"T"', "x", "pg_catalog.t", "app.set_config"]
)
_SETTINGS = st.sampled_from(
    ["'search_path'", "'role'", "'ROLE '", "'session_authorization'", "'a.b'", "$1", "name"]
)
_BOOLS = st.sampled_from(
    ["true", "false", "'t'", "'on'", "' Yes '", "'0'", "1", "$2", "true::bool", "'f'::boolean",
     "'t'::text", "NULL", "1 = 1", "(true)"]
)  # fmt: skip
_FUNCS = st.sampled_from(
    ["set_config", "pg_catalog.set_config", "pg_advisory_lock", "pg_advisory_xact_lock",
     "pg_try_advisory_lock_shared", "dblink_connect", "nextval", "lower", "app.f", "now",
     "pg_notify", "txid_current", "lo_import", "db.s.f"]
)  # fmt: skip


@st.composite
def _set_config(draw: st.DrawFn) -> str:
    func = draw(st.sampled_from(["set_config", "pg_catalog.set_config", '"set_config"']))
    setting, value, is_local = draw(_SETTINGS), draw(st.sampled_from(["'x'", "$3"])), draw(_BOOLS)
    if draw(st.booleans()):
        args = [f"setting_name => {setting}", f"new_value => {value}", f"is_local => {is_local}"]
        args = draw(st.permutations(args))
        return f"{func}({', '.join(args)})"
    return f"{func}({setting}, {value}, {is_local})"


@st.composite
def _expression(draw: st.DrawFn) -> str:
    choice = draw(st.integers(0, 5))
    if choice == 0:
        return draw(_set_config())
    if choice == 1:
        return f"{draw(_FUNCS)}({draw(st.sampled_from(['1', '$1', chr(39) + 'x' + chr(39)]))})"
    if choice == 2:
        return f"${draw(st.integers(1, 12))}"
    if choice == 3:
        return draw(st.sampled_from(["1", "'a'", "NULL", "true", "1.5", "B'01'", "now()"]))
    if choice == 4:
        inner = draw(_expression())
        return f"(SELECT {inner} FROM {draw(_NAMES)} FOR UPDATE)"
    return f"({draw(_expression())} + {draw(_expression())})"


@st.composite
def _statement(draw: st.DrawFn) -> str:
    expr, name = draw(_expression()), draw(_NAMES)
    templates = [
        f"SELECT {expr}",
        f"SELECT {expr} FROM {name} WHERE a = {draw(_expression())} LIMIT 21",
        f"SELECT {expr} INTO {draw(st.sampled_from(['TEMP', 'UNLOGGED', '']))} {name}",
        f"EXPLAIN {draw(st.sampled_from(['', '(ANALYZE)', '(GENERIC_PLAN)', 'ANALYZE']))}"
        f" SELECT {expr}",
        f"WITH w AS (UPDATE {name} SET a = {expr} RETURNING a) SELECT * FROM w",
        f"INSERT INTO {name} VALUES ({expr})",
        f"DELETE FROM {name} WHERE a = {expr}",
        f"SET {draw(st.sampled_from(['', 'LOCAL ', 'SESSION ']))}"
        f"{draw(st.sampled_from(['role', 'search_path', 'session_authorization', 'x.y']))}"
        f" = {draw(st.sampled_from(['DEFAULT', '1', chr(39) + 'v' + chr(39)]))}",
        f"RESET {draw(st.sampled_from(['ALL', 'role', 'search_path']))}",
        f"SET {draw(st.sampled_from(['', 'LOCAL ', 'SESSION ']))}ROLE postgres",
        f"SET {draw(st.sampled_from(['TRANSACTION', 'SESSION CHARACTERISTICS AS TRANSACTION']))}"
        " READ ONLY",
        f"CREATE {draw(st.sampled_from(['TEMP ', '', 'UNLOGGED ']))}TABLE {name} (a int)"
        f"{draw(st.sampled_from(['', ' ON COMMIT DROP', ' ON COMMIT DELETE ROWS']))}",
        f"CREATE {draw(st.sampled_from(['TEMP ', '']))}TABLE {name}"
        f"{draw(st.sampled_from(['', ' ON COMMIT DROP']))} AS SELECT {expr}",
        f"CREATE {draw(st.sampled_from(['TEMP ', '']))}VIEW {name} AS SELECT {expr}",
        f"CREATE {draw(st.sampled_from(['TEMP ', '']))}SEQUENCE {name}",
        f"CREATE FUNCTION {name}(int) RETURNS int RETURN {expr}",
        f"CREATE DOMAIN {name} AS int",
        f"CREATE TYPE {name} AS (a int)",
        f"DO $$ BEGIN PERFORM {expr}; {draw(st.sampled_from(['COMMIT;', '', 'rollback;']))} END $$",
        f"CALL {draw(_FUNCS)}({expr})",
        f"DECLARE c {draw(st.sampled_from(['', 'BINARY ']))}CURSOR"
        f" {draw(st.sampled_from(['WITH HOLD', 'WITHOUT HOLD', '']))} FOR SELECT {expr}",
        f"COPY {name} {draw(st.sampled_from(['FROM STDIN', 'TO STDOUT', 'FROM ' + chr(39) + 'f' + chr(39)]))}",  # noqa: E501
        f"{draw(st.sampled_from(['BEGIN', 'COMMIT', 'ROLLBACK', 'SAVEPOINT s', 'START TRANSACTION', 'PREPARE TRANSACTION ' + chr(39) + 'x' + chr(39), 'COMMIT PREPARED ' + chr(39) + 'x' + chr(39)]))}",  # noqa: E501
        f"{draw(st.sampled_from(['LISTEN c', 'UNLISTEN *', 'NOTIFY c', 'LOAD ' + chr(39) + 'x' + chr(39), 'DISCARD ALL', 'DEALLOCATE ALL', 'PREPARE q AS SELECT 1', 'EXECUTE q']))}",  # noqa: E501
        f"{draw(st.sampled_from(['VACUUM', 'ANALYZE', 'VACUUM (ANALYZE)', 'REINDEX (CONCURRENTLY) TABLE', 'CLUSTER', 'TRUNCATE', 'LOCK']))} {name}",  # noqa: E501
        f"CREATE INDEX {draw(st.sampled_from(['CONCURRENTLY ', '']))}i ON {name} (a)",
        f"DROP INDEX {draw(st.sampled_from(['CONCURRENTLY ', '']))}i",
        f"SELECT * FROM {name} {draw(st.sampled_from(['FOR SHARE', 'FOR NO KEY UPDATE', '']))}",
        f"SELECT {expr} UNION ALL (SELECT 1 FROM {name} FOR UPDATE)",
    ]
    return draw(st.sampled_from(templates))


@given(sql=st.lists(_statement(), min_size=1, max_size=2).map("; ".join))
@settings(
    max_examples=400,
    deadline=timedelta(seconds=5),
    suppress_health_check=[HealthCheck.too_slow],
)
def test_both_planners_agree_on_generated_sql(sql: str) -> None:
    assert_same_plan(sql)
    if _parses(sql):
        assert _new_kinds(sql) == _old_kinds(sql)


_SQL_CHARACTERS = list("SELECT set_config('$1', true)::bool;-- \n\"ab")


@given(sql=st.text(st.sampled_from(_SQL_CHARACTERS), max_size=60))
@settings(max_examples=200, deadline=timedelta(seconds=5))
def test_both_planners_agree_on_arbitrary_text(sql: str) -> None:
    assert_same_plan(sql)
