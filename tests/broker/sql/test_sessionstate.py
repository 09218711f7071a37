"""Session-state SQL is refused by the parser-based classifier, tricky spellings included."""

from __future__ import annotations

import pytest

from broker.sql.plan import plan_request, plan_statement
from broker.sql.sessionstate import (
    REASON_BAD_REQUEST,
    REASON_SESSION_STATE,
    Refusal,
    SessionStateError,
)


def check_statement(sql: str, *, role_locked: bool = False) -> Refusal | None:
    """The session-state verdict in *sql*'s plan."""
    return plan_statement(sql, role_locked=role_locked).refusal


# (sql, command named in the refusal)
REFUSED = [
    ("SET search_path = app", "SET search_path"),
    ("set SESSION search_path to app", "SET search_path"),
    ("SeT   work_mem = '64MB'", "SET work_mem"),
    ('SET "work_mem" = 1024', "SET work_mem"),
    ("SET TIME ZONE 'UTC'", "SET timezone"),
    ("SET NAMES 'LATIN1'", "SET client_encoding"),
    ("/* harmless? */ SET statement_timeout = 0 -- no", "SET statement_timeout"),
    ("\n\t-- a comment\n  SET application_name = $$x$$", "SET application_name"),
    ("RESET search_path", "RESET search_path"),
    ("reset all", "RESET ALL"),
    ("SET ROLE postgres", "SET ROLE"),
    ("RESET ROLE", "RESET ROLE"),
    ("SET SESSION AUTHORIZATION postgres", "SET SESSION AUTHORIZATION"),
    ("SET LOCAL SESSION AUTHORIZATION postgres", "SET SESSION AUTHORIZATION"),
    ("RESET SESSION AUTHORIZATION", "RESET SESSION AUTHORIZATION"),
    ("SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY", "SET SESSION CHARACTERISTICS"),
    ("SELECT set_config('search_path', 'app', false)", "set_config(..., false)"),
    ("select SET_CONFIG('a.b', 'c', FALSE)", "set_config(..., false)"),
    ("SELECT \"set_config\"('a.b', 'c', false)", "set_config(..., false)"),
    ("SELECT pg_catalog.set_config('a.b', 'c', 'f')", "set_config(..., false)"),
    ("SELECT set_config('a.b', 'c', $1)", "set_config(..., false)"),
    ("SELECT set_config('a.b', 'c', 1 = 1)", "set_config(..., false)"),
    ("SELECT * FROM set_config('a.b', 'c', false)", "set_config(..., false)"),
    ("SELECT x FROM t WHERE set_config('a.b', x, false) IS NOT NULL", "set_config(..., false)"),
    (
        "SELECT set_config(setting_name => 'a.b', new_value => 'c', is_local => false)",
        "set_config(..., false)",
    ),
    ("SELECT set_config('session_authorization', 'x', true)", "SET SESSION AUTHORIZATION"),
    ("LISTEN jobs", "LISTEN"),
    ('listen "Jobs"', "LISTEN"),
    ("UNLISTEN *", "UNLISTEN"),
    ("PREPARE q (int) AS SELECT $1", "PREPARE"),
    ("DEALLOCATE ALL", "DEALLOCATE"),
    ("deallocate prepare q", "DEALLOCATE"),
    ("EXECUTE q(1)", "EXECUTE"),
    ("CREATE TABLE t AS EXECUTE q(1)", "EXECUTE"),
    ("DECLARE c CURSOR WITH HOLD FOR SELECT 1", "DECLARE ... WITH HOLD"),
    ("declare c no scroll cursor with hold for select 1", "DECLARE ... WITH HOLD"),
    ("CREATE TEMP TABLE scratch (id int)", "CREATE TEMP TABLE"),
    ("create temporary table scratch (id int) on commit delete rows", "CREATE TEMP TABLE"),
    ("CREATE LOCAL TEMP TABLE scratch (id int) ON COMMIT PRESERVE ROWS", "CREATE TEMP TABLE"),
    ("CREATE TABLE pg_temp.scratch (id int)", "CREATE TEMP TABLE"),
    ('CREATE TABLE "pg_temp".scratch (id int)', "CREATE TEMP TABLE"),
    ("CREATE TEMP TABLE scratch AS SELECT 1 AS id", "CREATE TEMP TABLE ... AS"),
    ("SELECT 1 AS id INTO TEMP scratch", "SELECT ... INTO TEMP"),
    ("EXPLAIN ANALYZE CREATE TEMP TABLE scratch AS SELECT 1", "CREATE TEMP TABLE ... AS"),
    ("CREATE TEMP VIEW v AS SELECT 1", "CREATE TEMP VIEW"),
    ("CREATE TEMP SEQUENCE s", "CREATE TEMP SEQUENCE"),
    ("CREATE FUNCTION pg_temp.f() RETURNS int LANGUAGE sql RETURN 1", "CREATE FUNCTION pg_temp..."),
    ("CREATE DOMAIN pg_temp.d AS int", "CREATE DOMAIN pg_temp..."),
    ("CREATE TYPE pg_temp.pair AS (a int, b int)", "CREATE TYPE pg_temp..."),
    ("SELECT pg_advisory_lock(42)", "pg_advisory_lock()"),
    ("select PG_ADVISORY_LOCK_SHARED(1, 2)", "pg_advisory_lock_shared()"),
    ("SELECT pg_try_advisory_lock(hashtext($1))", "pg_try_advisory_lock()"),
    ("SELECT * FROM pg_try_advisory_lock_shared(7)", "pg_try_advisory_lock_shared()"),
    ("SELECT postgres.pg_catalog.pg_advisory_lock(1)", "pg_advisory_lock()"),
    ("SELECT CASE WHEN $1 THEN pg_advisory_lock(1) END", "pg_advisory_lock()"),
    ("SELECT dblink_connect('conn', 'dbname=x')", "dblink_connect()"),
    ("LOAD 'auto_explain'", "LOAD"),
    ("DISCARD ALL", "DISCARD"),
    ("discard plans", "DISCARD"),
    ("BEGIN", "BEGIN"),
    ("START TRANSACTION ISOLATION LEVEL SERIALIZABLE", "START TRANSACTION"),
    ("COMMIT", "COMMIT"),
    ("END", "COMMIT"),
    ("ROLLBACK", "ROLLBACK"),
    ("abort", "ROLLBACK"),
    ("PREPARE TRANSACTION 'gid'", "PREPARE TRANSACTION"),
]

ALLOWED = [
    "SELECT 1",
    "SELECT 1;",
    "SET LOCAL search_path = app",
    "set local statement_timeout = '5s'",
    "SET LOCAL ROLE reader",
    "SET TRANSACTION ISOLATION LEVEL SERIALIZABLE",
    "SET TRANSACTION SNAPSHOT '00000003-0000001B-1'",
    "SET CONSTRAINTS ALL DEFERRED",
    "SELECT set_config('app.user', $1, true)",
    "SELECT set_config('app.user', $1, 'on')",
    "SELECT set_config('app.user', $1, 'true'::boolean)",
    "SELECT set_config(setting_name => 'a.b', new_value => 'c', is_local => true)",
    "SELECT current_setting('search_path')",
    "SELECT pg_advisory_xact_lock(42)",
    "SELECT pg_try_advisory_xact_lock_shared(42)",
    "SELECT myschema.pg_advisory_lock(1)",  # a user's own function of the same name
    'SELECT "PG_ADVISORY_LOCK"(1)',  # a different (quoted, upper-case) name
    "NOTIFY jobs, 'payload'",
    "SELECT pg_notify('jobs', $1)",
    "DECLARE c CURSOR FOR SELECT 1",
    "DECLARE c CURSOR WITHOUT HOLD FOR SELECT 1",
    "CREATE TEMP TABLE scratch (id int) ON COMMIT DROP",
    "CREATE TEMP TABLE scratch ON COMMIT DROP AS SELECT 1 AS id",
    "CREATE TABLE pg_temp.scratch (id int) ON COMMIT DROP",
    "CREATE TABLE app.items (id int)",
    "SAVEPOINT a",
    "RELEASE SAVEPOINT a",
    "ROLLBACK TO SAVEPOINT a",
    "COMMIT PREPARED 'gid'",
    "ALTER ROLE app SET search_path = app",
    "ALTER DATABASE postgres SET work_mem = '8MB'",
    "CREATE FUNCTION app.f() RETURNS int LANGUAGE sql SET search_path = app RETURN 1",
    "DO $$ BEGIN PERFORM 1; END $$",
    "EXPLAIN SELECT 1",
    # The same words inside literals, dollar quotes, comments and identifiers:
    "SELECT 'SET search_path = x; LISTEN y; DISCARD ALL'",
    "SELECT $$ SET ROLE postgres $$",
    "SELECT $tag$ PREPARE q AS SELECT 1; $tag$",
    "SELECT E'pg_advisory_lock(1)\\' ; LOAD ''x'''",
    "SELECT 1 /* SET search_path = x */",
    "SELECT 1 -- ; DISCARD ALL",
    "SELECT 1 /* nested /* LISTEN x */ still a comment */",
    'SELECT 1 AS "SET search_path = x"',
    'SELECT "listen", "discard", "load" FROM (VALUES (1, 2, 3)) AS t("listen", "discard", "load")',
    "INSERT INTO notes (body) VALUES ('BEGIN; COMMIT; SET ROLE postgres')",
    "SELECT U&'\\0053ET search_path'",
]


@pytest.mark.parametrize(("sql", "command"), REFUSED)
def test_session_state_statement_is_refused_naming_it(sql: str, command: str) -> None:
    refusal = check_statement(sql)
    assert refusal is not None, sql
    assert refusal.reason == REASON_SESSION_STATE
    assert refusal.command == command
    assert command.split(" (")[0].split("(")[0] in refusal.message


@pytest.mark.parametrize("sql", ALLOWED)
def test_transaction_scoped_or_quoted_sql_is_allowed(sql: str) -> None:
    assert check_statement(sql) is None


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT 1; SELECT 2",
        "SELECT 1; SET search_path = x",
        "SELECT 'a;b'; LISTEN x",
        "select 1 /* ; */ ; select 2 -- ;",
        "SELECT $$;$$; SELECT $a$ ; $a$",
    ],
)
def test_several_statements_in_one_string_are_refused_as_bad_request(sql: str) -> None:
    refusal = check_statement(sql)
    assert refusal is not None
    assert refusal.reason == REASON_BAD_REQUEST
    assert "send each as its own Statement" in refusal.message


@pytest.mark.parametrize("sql", ["", "   ", "-- only a comment", "/* x */ ;"])
def test_empty_sql_is_refused_as_bad_request(sql: str) -> None:
    refusal = check_statement(sql)
    assert refusal is not None
    assert refusal.reason == REASON_BAD_REQUEST


@pytest.mark.parametrize(
    ("sql", "command"),
    [("COPY t FROM STDIN", "COPY FROM STDIN"), ("copy (select 1) to stdout", "COPY TO STDOUT")],
)
def test_copy_over_the_connection_is_refused_as_bad_request(sql: str, command: str) -> None:
    refusal = check_statement(sql)
    assert refusal is not None
    assert (refusal.reason, refusal.command) == (REASON_BAD_REQUEST, command)
    assert check_statement("COPY t FROM '/srv/data.csv'") is None  # server-side file: privileges


def test_syntax_errors_are_left_for_postgres_to_report() -> None:
    assert check_statement("SELEC 1") is None
    assert check_statement("SET") is None


@pytest.mark.parametrize(
    "sql",
    [
        "SET LOCAL ROLE postgres",
        "set local role none",
        "RESET ROLE",
        "SELECT set_config('role', 'postgres', true)",
        "SELECT set_config(' ROLE', 'postgres', true)",
        "SELECT set_config($1, $2, true)",
        "DO $$ BEGIN EXECUTE 'SET LOCAL ROLE postgres'; END $$",
    ],
)
def test_role_changes_are_refused_when_the_broker_sets_roles(sql: str) -> None:
    refusal = check_statement(sql, role_locked=True)
    assert refusal is not None
    assert "PGBROKER_ROLE_MAP" in refusal.message


def test_batch_check_reports_the_index_of_the_first_refused_statement() -> None:
    with pytest.raises(SessionStateError) as caught:
        plan_request(["SELECT 1", "SET LOCAL x.y = 1", "LISTEN jobs", "DISCARD ALL"])
    assert caught.value.statement_index == 2
    assert caught.value.reason == REASON_SESSION_STATE
    assert str(caught.value).startswith("statement 2: LISTEN")


def test_refusal_message_never_quotes_the_sql_text() -> None:
    secret = "hunter2-very-secret"
    refusal = check_statement(f"SET app.password = '{secret}'")
    assert refusal is not None
    assert secret not in refusal.message


def test_verdicts_are_cached_by_sql_text() -> None:
    sql = "SELECT pg_advisory_lock(12345) /* cache probe */"
    first = check_statement(sql)
    assert first is not None
    assert check_statement(sql) is first


def test_very_long_sql_is_classified_without_caching() -> None:
    sql = "SELECT " + " + ".join(["1"] * 10_000) + ", pg_advisory_lock(1)"
    refusal = check_statement(sql)
    assert refusal is not None
    assert refusal.command == "pg_advisory_lock()"
