"""A request's plan: one pglast parse per SQL text, a bounded cache, and the verdicts and
placeholder counts the broker reads from it."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from pglast.parser import scan

from broker.sql import plan as plan_module
from broker.sql.plan import (
    CACHE_ENTRIES,
    CACHE_MAX_SQL_CHARS,
    cache_info,
    placeholder_count,
    plan_request,
    plan_statement,
)
from broker.sql.sessionstate import REASON_BAD_REQUEST, SessionStateError

KNOWN = frozenset({"lower", "now", "count", "set_config", "pg_advisory_lock"})


@pytest.fixture
def parses(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """The SQL texts libpg_query parses while the test runs, in order."""
    seen: list[str] = []
    real: Callable[..., Any] = plan_module.parse

    def counted(sql: str) -> Any:
        seen.append(sql)
        return real(sql)

    monkeypatch.setattr(plan_module, "parse", counted)
    yield seen


def fresh(sql: str) -> str:
    """*sql* with a comment no other test used, so the plan cache cannot already hold it."""
    return f"{sql} /* {uuid.uuid4().hex} */"


def test_a_request_parses_each_distinct_sql_text_once(parses: list[str]) -> None:
    select, update = fresh("SELECT a FROM t WHERE b = $1"), fresh("UPDATE t SET a = lower($1)")
    plan = plan_request([select, update, select])
    assert sorted(parses) == sorted([select, update])
    assert plan.statements[0] is plan.statements[2]


def test_a_warm_request_parses_nothing(parses: list[str]) -> None:
    sqls = [fresh("SELECT 1"), fresh("SELECT $1::int"), fresh("DO $$ BEGIN END $$")]
    first = plan_request(sqls)
    hits = cache_info().hits
    again = plan_request(sqls)
    assert len(parses) == 3
    assert cache_info().hits == hits + 3
    assert again.statements == first.statements


def test_long_sql_is_parsed_once_per_request_without_caching(parses: list[str]) -> None:
    long = fresh("SELECT " + " + ".join(["$1"] * CACHE_MAX_SQL_CHARS))
    size = cache_info().currsize
    assert plan_request([long, long]).statements[0].placeholders == 1
    plan_request([long])
    assert parses == [long, long]  # once for each of the two requests
    assert cache_info().currsize == size


def test_the_cache_holds_at_most_cache_entries_plans() -> None:
    assert cache_info().maxsize == CACHE_ENTRIES
    for _ in range(CACHE_ENTRIES + 10):
        plan_statement(fresh("SELECT 1"))
    assert cache_info().currsize == CACHE_ENTRIES


def test_role_locked_verdicts_are_planned_apart() -> None:
    sql = fresh("SET LOCAL ROLE app")
    assert plan_statement(sql).refusal is None
    refusal = plan_statement(sql, role_locked=True).refusal
    assert refusal is not None
    assert "PGBROKER_ROLE_MAP" in refusal.message


# (sql, refused command or None, opaque, calls a function outside KNOWN, placeholders)
VERDICTS = [
    ("SELECT a FROM t WHERE b = $1", None, False, False, 1),
    ("SELECT lower($2), now(), count(*) FROM t", None, False, False, 2),
    ("SELECT pg_catalog.lower('x')", None, False, False, 0),
    ("SELECT app.lower('x')", None, False, True, 0),
    ("INSERT INTO t VALUES (app_default())", None, False, True, 0),
    ("SET LOCAL work_mem = '64MB'", None, False, False, 0),
    ("SELECT set_config('x.y', $1, true)", None, False, False, 1),
    ("DO $$ BEGIN PERFORM 1; END $$", None, True, False, 0),
    ("CALL app.refresh($1)", None, True, True, 1),
    ("EXPLAIN SELECT $1", None, False, False, None),
    ("SELEC garbage", None, True, True, 0),
    ("SET search_path = app", "SET search_path", False, False, 0),
    ("LISTEN jobs", "LISTEN", False, False, 0),
    ("SELECT pg_advisory_lock($1)", "pg_advisory_lock()", False, False, 1),
    ("EXPLAIN ANALYZE SELECT pg_advisory_lock(1)", "pg_advisory_lock()", False, False, 0),
    ("SELECT 1; SELECT 2", "multiple statements", False, False, 0),
]


@pytest.mark.parametrize(("sql", "refused", "opaque", "unknown_call", "placeholders"), VERDICTS)
def test_verdicts_for_representative_sql(
    sql: str, refused: str | None, opaque: bool, unknown_call: bool, placeholders: int | None
) -> None:
    plan = plan_statement(sql)
    assert (plan.refusal.command if plan.refusal else None) == refused
    assert plan.opaque is opaque
    assert plan.calls_unknown_function(KNOWN) is unknown_call
    assert plan.placeholders == placeholders


def test_without_pg_catalogs_names_every_call_is_unknown() -> None:
    assert plan_statement("SELECT now()").calls_unknown_function(None)
    assert not plan_statement("SELECT a FROM t WHERE b = $1").calls_unknown_function(None)


def test_a_request_needs_the_audit_if_any_statement_does() -> None:
    assert not plan_request(["SELECT 1", "SELECT lower($1)"]).needs_audit
    assert plan_request(["SELECT 1", "CALL app.refresh()"]).needs_audit
    assert not plan_request(["SELECT lower($1)"]).calls_unknown_function(KNOWN)
    assert plan_request(["SELECT lower($1)", "SELECT f()"]).calls_unknown_function(KNOWN)


def test_a_refused_request_names_its_first_refused_statement() -> None:
    with pytest.raises(SessionStateError) as caught:
        plan_request(["SELECT 1", "SELECT 1; SELECT 2", "LISTEN jobs"])
    assert caught.value.statement_index == 1
    assert caught.value.reason == REASON_BAD_REQUEST


# Placeholder counting: how many values a statement takes, as Postgres counts them.
PLACEHOLDERS = [
    ("SELECT 1", 0),
    ("SELECT $1", 1),
    ("SELECT $2", 2),  # Postgres takes two values, the first unused
    ("SELECT $1 + $1, $1", 1),
    ("SELECT $1[1], ($2).f, ARRAY[$3]", 3),
    ("SELECT x FROM t WHERE a = ANY($12)", 12),
    ("SELECT '$1', $$ $2 $$, $q$ $3 $q$", 0),  # literals and dollar quotes
    ("SELECT a$4 FROM t", 0),  # part of an identifier
    ('SELECT "$5" FROM t', 0),
    ("SELECT 1 /* $6 */ -- $7", 0),
    ("SELECT 1 /* $1 */ + $2", 2),
    ("CREATE FUNCTION f(int) RETURNS int LANGUAGE sql RETURN $1 + 1", None),
    ("CREATE FUNCTION f(int) RETURNS int LANGUAGE sql AS $$ SELECT $1 $$", 0),
    ("EXPLAIN (GENERIC_PLAN) SELECT $1", None),
    ("EXPLAIN SELECT 1", 0),
    ("SELEC $1", None),  # not parsed: Postgres reports the syntax error
    ("SELEC '$1'", 0),  # not parsed, but Postgres' lexer finds no $n
    ("SELECT '$1", None),  # not even scanned
]


@pytest.mark.parametrize(("sql", "expected"), PLACEHOLDERS)
def test_placeholders_are_counted_like_postgres(sql: str, expected: int | None) -> None:
    assert plan_statement(sql).placeholders == expected
    assert placeholder_count(sql) == expected


@pytest.mark.parametrize(
    "sql", [sql for sql, expected in PLACEHOLDERS if expected is not None and "SELEC " not in sql]
)
def test_the_parse_tree_counts_what_postgres_lexer_finds(sql: str) -> None:
    # The tree's ParamRefs are the lexer's PARAM tokens: nothing is lost by not scanning.
    tokens = [int(sql[t.start + 1 : t.end + 1]) for t in scan(sql) if t.name == "PARAM"]
    assert plan_statement(sql).placeholders == max(tokens, default=0)


def test_placeholder_count_of_sql_without_a_dollar_parses_nothing(parses: list[str]) -> None:
    assert placeholder_count(fresh("SELECT count(*) FROM pg_stat_activity")) == 0
    assert parses == []


@pytest.mark.parametrize(
    ("sql", "read_only", "autocommit_only"),
    [
        ("SELECT a FROM t WHERE id = $1", True, False),
        ("VALUES (1)", True, False),
        ("SHOW work_mem", True, False),
        ("EXPLAIN SELECT 1", True, False),
        ("EXPLAIN ANALYZE DELETE FROM t", False, False),
        ("SELECT nextval('s')", False, False),
        ("SELECT pg_notify('c', 'x')", False, False),
        ("WITH d AS (DELETE FROM t RETURNING *) SELECT * FROM d", False, False),
        ("SELECT 1 INTO t2", False, False),
        ("INSERT INTO t VALUES (1)", False, False),
        ("VACUUM t", False, True),
        ("ANALYZE t", False, False),
        ("CREATE INDEX CONCURRENTLY i ON t (a)", False, True),
        ("DROP INDEX CONCURRENTLY i", False, True),
        ("CREATE DATABASE d", False, True),
        ("CALL p()", False, True),
        ("DO $$ BEGIN INSERT INTO t VALUES (1); COMMIT; END $$", False, True),
        ("DO $$ BEGIN INSERT INTO t VALUES (1); END $$", False, False),
    ],
)
def test_the_plan_says_what_a_key_can_skip(
    sql: str, read_only: bool, autocommit_only: bool
) -> None:
    plan = plan_statement(sql)
    assert (plan.read_only, plan.autocommit_only) == (read_only, autocommit_only)


def test_a_request_is_exempt_from_its_key_only_when_nothing_in_it_writes() -> None:
    known = frozenset({"lower", "now"})
    assert plan_request(["SELECT lower('A')", "SELECT now()"]).exempt_from_key(known)
    assert not plan_request(["SELECT my_func()"]).exempt_from_key(known)  # may write
    assert not plan_request(["SELECT 1", "INSERT INTO t VALUES (1)"]).exempt_from_key(known)
    assert plan_request(["VACUUM t"]).exempt_from_key(known)
    assert not plan_request(["VACUUM t", "SELECT 1"]).exempt_from_key(known)  # fails anyway


@pytest.mark.parametrize(
    "sql",
    [
        "CREATE TABLE t (a int)",
        "ALTER TABLE t ALTER a TYPE text",
        "DROP TABLE t",
        "ALTER TABLE t RENAME TO u",
        "COMMENT ON TABLE t IS 'x'",
        "CREATE INDEX i ON t (a)",
        "CREATE VIEW v AS SELECT 1",
        "GRANT SELECT ON t TO PUBLIC",
        "SELECT 1 INTO t",
    ],
)
def test_ddl_is_read_from_the_tree(sql: str) -> None:
    assert plan_statement(sql).ddl
    assert plan_request(["SELECT 1", sql]).ddl


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT 1",
        "INSERT INTO t VALUES (1)",
        "SET LOCAL statement_timeout = 1",
        "SHOW search_path",
        "BEGIN",
        "SAVEPOINT s",
        "LOCK t",
        "TRUNCATE t",
        "VACUUM t",
        "DECLARE c CURSOR FOR SELECT 1",
        "DO $$ BEGIN END $$",
        "EXPLAIN SELECT 1",
        "not sql at all",
    ],
)
def test_other_statements_are_not_ddl(sql: str) -> None:
    assert not plan_statement(sql).ddl


def test_a_huge_text_is_planned_with_the_collector_paused_and_restored() -> None:
    """The cyclic GC's pauses over a huge tree held the GIL for ~200 ms (other callers
    waited): it is off while such a text is planned, and back as it was afterwards."""
    import gc
    import threading

    from broker.sql import plan as planning

    huge = "SELECT count(*) FROM (VALUES " + ",".join(f"(${i})" for i in range(1, 9001)) + ") v"
    assert len(huge) > planning.HUGE_SQL_CHARS
    seen: list[bool] = []
    original = planning._plan

    def spying(sql: str, role_locked: bool) -> Any:
        seen.append(gc.isenabled())
        return original(sql, role_locked)

    planning._plan = spying  # type: ignore[assignment]
    try:
        assert gc.isenabled()
        assert plan_statement(huge).placeholders == 9000
        assert seen == [False] and gc.isenabled()
        # Several parser threads at once: on again only when the last is done.
        threads = [threading.Thread(target=plan_statement, args=(huge,)) for _ in range(3)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert seen[1:] == [False] * 3 and gc.isenabled()
        gc.disable()  # off already: left off
        plan_statement(huge)
        assert not gc.isenabled()
    finally:
        gc.enable()
        planning._plan = original  # type: ignore[assignment]
