"""One plan per request: every fact the broker needs about a request's SQL, from one parse.

A request's SQL is parsed by libpg_query (through ``pglast``'s JSON output, read as dicts:
broker/sql/tree.py) once per distinct text, and the facts read from that one tree travel with
the batch, so nothing downstream parses again:

* the session-state verdict (`broker.sql.sessionstate`): refused, with the message and
  reason, or allowed;
* whether the statement is *opaque* — a ``DO`` block, a ``CALL``, or SQL that does not
  parse — so the session is audited after the transaction (broker/postgres/audit.py), and a
  lost link during it may follow a COMMIT inside it (broker/flow/batch.py);
* the functions it calls, so a call outside ``pg_catalog``'s names (read from the server at
  start, after the plan may already be cached) is audited too;
* how many values it takes (its highest ``$n``), so a wrong count is refused before anything
  is sent (broker/postgres/pg.py);
* whether it is DDL (`StatementPlan.ddl`), so the pool's prepared statements are dropped once
  it commits (broker/pooling/pool.py, "statement cache" in docs/broker.md);
* whether a read replica may run it (`StatementPlan.replica_safe`) and the functions it calls
  by name (`StatementPlan.functions`), for ``PGBROKER_ROUTING=auto`` (broker/flow/routing.py).

Plans are cached by SQL text (and the broker-wide ``role_locked``) in one LRU of
``CACHE_ENTRIES`` plans, for texts up to ``CACHE_MAX_SQL_CHARS`` characters: an application's
distinct statements number in the hundreds, so warm requests parse nothing, while a caller
sending ever new SQL pins at most ~8 MB of text (plans themselves are a few hundred bytes).
Longer SQL is planned again for each request, still once per request.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import re
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from pglast.parser import ParseError, scan

from broker.sql.sessionstate import (
    TOO_DEEP,
    Refusal,
    SessionStateError,
    classify,
    function_name,
    lone_in_autocommit,
    transaction_scoped,
)
from broker.sql.tree import Node, node_of, parse, sval, walk

__all__ = [
    "CACHE_ENTRIES",
    "CACHE_MAX_SQL_CHARS",
    "RequestPlan",
    "StatementPlan",
    "cache_info",
    "placeholder_count",
    "plan_request",
    "plan_statement",
]

CACHE_ENTRIES = 2048
CACHE_MAX_SQL_CHARS = 4096
# SQL up to this long is planned where it is asked (on the event loop: broker/front/service.py);
# longer SQL, whose parse takes milliseconds per 100 KB, on a parser thread (broker/sql/stack.py).
DIRECT_PARSE_CHARS = 2048
# Texts longer than this are planned with the cyclic garbage collector paused
# (`_collector_paused`): only heavy requests, on the parser threads, have such SQL.
HUGE_SQL_CHARS = 64 * 1024
_pause_lock = threading.Lock()
_planners = 0  # threads inside `_collector_paused`
_we_disabled = False  # whether the first of them turned the collector off
# libpg_query's message when its own stack check refuses (Postgres' SQLSTATE 54001).
_STACK_DEPTH_EXCEEDED = "stack depth limit exceeded"


@dataclass(frozen=True, slots=True)
class StatementPlan:
    """What one SQL text does, as far as parsing can tell.

    ``refusal`` is why it may not run on a pooled connection (None: it may). ``opaque`` is
    true for a ``DO`` block, a ``CALL`` or SQL that does not parse: what it does to the
    session cannot be seen. ``placeholders`` is how many values it takes, as Postgres counts
    them (``SELECT $2`` takes two), or None when Postgres must count them itself (SQL that
    does not parse, ``$n`` that are a SQL-standard function body's arguments, ``EXPLAIN``).
    ``catalog_calls`` are the called names that may be built-ins; ``foreign_call`` is true
    when some call certainly is not (qualified with another schema, or unparsed SQL).
    ``transaction_scoped`` names the command when all the statement does lasts until the
    end of its transaction (`broker.sql.sessionstate.transaction_scoped`). ``ddl`` is true
    for a utility statement that may change the catalog (CREATE, ALTER, DROP, RENAME,
    COMMENT, GRANT, ``SELECT … INTO`` …; not SET, SHOW, transaction control, cursors, COPY,
    VACUUM, DO or CALL): once it commits, prepared statements may no longer fit.
    """

    refusal: Refusal | None
    opaque: bool
    placeholders: int | None
    catalog_calls: frozenset[str] = frozenset()
    foreign_call: bool = False
    # "SET LOCAL name" / "SET TRANSACTION": all it does ends with its transaction.
    transaction_scoped: str | None = None
    # Exactly-once (broker/postgres/keys.py): ``read_only`` is a plain query that writes
    # nothing (no data-modifying CTE, no INTO, no side-effecting built-in), so a keyed
    # request of such statements records no key; ``autocommit_only`` is a statement Postgres
    # refuses inside a transaction block (VACUUM, … CONCURRENTLY, CREATE DATABASE), or that
    # may COMMIT itself (CALL; a DO block whose body has the word COMMIT or ROLLBACK, a
    # conservative reading), which therefore runs without a key.
    read_only: bool = False
    autocommit_only: bool = False
    ddl: bool = False
    # Read routing: ``read_only`` without a locking clause (FOR UPDATE/SHARE, anywhere) and not
    # opaque; ``functions`` are the called names as written (``f`` or ``schema.f``), whose
    # pg_proc.provolatile the routing still checks.
    replica_safe: bool = False
    functions: frozenset[str] = frozenset()

    def calls_unknown_function(self, known: frozenset[str] | None) -> bool:
        """True if this calls a function not among *known* (pg_catalog's names; None when
        they could not be read: then every call counts as unknown)."""
        if self.foreign_call:
            return True
        return bool(self.catalog_calls) and (known is None or not self.catalog_calls <= known)


@dataclass(frozen=True, slots=True)
class RequestPlan:
    """The plans of a request's statements, in order (``statements[i]`` is statement *i*),
    and their SQL texts as `plan_request` read them (empty for a plan made without them), so
    the flow does not read each statement's SQL from the request again."""

    statements: tuple[StatementPlan, ...]
    sqls: tuple[str, ...] = ()

    @property
    def ddl(self) -> bool:
        """True if a statement is DDL (`StatementPlan.ddl`)."""
        return any(plan.ddl for plan in self.statements)

    @property
    def replica_safe(self) -> bool:
        """True if every statement may run on a read replica, functions aside
        (`StatementPlan.replica_safe`)."""
        return bool(self.statements) and all(plan.replica_safe for plan in self.statements)

    @property
    def functions(self) -> frozenset[str]:
        """The functions the statements call, by name as written."""
        return frozenset().union(*(plan.functions for plan in self.statements))

    @property
    def needs_audit(self) -> bool:
        """True if a statement is opaque (``DO``, ``CALL``, unparsed): audit the session."""
        return any(plan.opaque for plan in self.statements)

    def exempt_from_key(self, known: frozenset[str] | None) -> bool:
        """True if a keyed request needs no key: it writes nothing (every statement
        `read_only`, calling only built-ins), or is one statement that cannot run inside
        BEGIN … COMMIT (`autocommit_only`)."""
        if len(self.statements) == 1 and self.statements[0].autocommit_only:
            return True
        return all(plan.read_only for plan in self.statements) and not (
            self.calls_unknown_function(known)
        )

    def calls_unknown_function(self, known: frozenset[str] | None) -> bool:
        """True if a statement calls a function outside *known* (see `StatementPlan`).

        Functions reached without a call in the SQL (triggers, views, column defaults,
        operators) are not seen: ``PGBROKER_SESSION_AUDIT=always`` covers those.
        """
        return any(plan.calls_unknown_function(known) for plan in self.statements)

    def check_autocommit(self) -> None:
        """Raise `SessionStateError` (reason ``BAD_REQUEST``) when this is one statement
        that runs in autocommit and only changes its own transaction (``SET LOCAL``): it
        would silently do nothing. Batches of several statements and interactive
        transactions do not ask this."""
        if len(self.statements) == 1 and (command := self.statements[0].transaction_scoped):
            raise lone_in_autocommit(command)


def plan_request(sqls: Sequence[str], *, role_locked: bool = False) -> RequestPlan:
    """Plan each of *sqls*, parsing each distinct text at most once; raise `SessionStateError`
    naming the first statement that is refused.

    *role_locked* is true when the broker sets each caller's role itself (PGBROKER_ROLE_MAP);
    then role changes of any kind are refused as well.
    """
    if len(sqls) == 1:  # most requests: no texts to tell apart
        only = plan_statement(sqls[0], role_locked=role_locked)
        if only.refusal is not None:
            raise SessionStateError(0, only.refusal.message, only.refusal.reason)
        return RequestPlan((only,), tuple(sqls))
    planned: dict[str, StatementPlan] = {}
    for index, sql in enumerate(sqls):
        plan = planned.get(sql)
        if plan is None:
            plan = planned[sql] = plan_statement(sql, role_locked=role_locked)
        if plan.refusal is not None:
            raise SessionStateError(index, plan.refusal.message, plan.refusal.reason)
    return RequestPlan(tuple(planned[sql] for sql in sqls), tuple(sqls))


def plan_statement(sql: str, *, role_locked: bool = False) -> StatementPlan:
    """The plan of one SQL text, cached (see the module docstring). Never raises: SQL that
    does not parse is left for Postgres to report, with its SQLSTATE and position."""
    if len(sql) > HUGE_SQL_CHARS:
        with _collector_paused():
            return _plan(sql, role_locked)
    if len(sql) > CACHE_MAX_SQL_CHARS:
        return _plan(sql, role_locked)
    return _cached_plan(sql, role_locked)


@contextlib.contextmanager
def _collector_paused() -> Iterator[None]:
    """The cyclic garbage collector off while a huge text is planned: its tree is millions of
    young objects that live until the plan is made, and the collections they set off walk them
    all with the GIL held (a 30,000-row VALUES list: one pause of ~200 ms, so the event loop's
    other callers waited; 68 ms without). The plan makes no cycles: nothing is left to
    collect. Several parser threads may plan at once: the last one out turns it back on."""
    global _planners, _we_disabled
    with _pause_lock:
        if _planners == 0:
            _we_disabled = gc.isenabled()
            gc.disable()
        _planners += 1
    try:
        yield
    finally:
        with _pause_lock:
            _planners -= 1
            if _planners == 0 and _we_disabled:
                gc.enable()


def placeholder_count(sql: str) -> int | None:
    """How many values *sql* takes, for SQL that comes without a plan (the broker's own
    queries); see `StatementPlan.placeholders`."""
    if "$" not in sql:
        return 0
    return plan_statement(sql).placeholders


def _plan(sql: str, role_locked: bool) -> StatementPlan:
    try:
        statements = _parse(sql)
    except _TooDeep:
        return _unparsed(sql, TOO_DEEP)
    except ParseError:
        return _unparsed(sql, None)
    except RecursionError:  # not expected (nothing recurses per level): refused, not guessed
        return _unparsed(sql, TOO_DEEP)
    nodes = [node for stmt in statements for node in walk(stmt)]
    calls = [fields for kind, fields in nodes if kind == "FuncCall"]
    names = [function_name(call) for call in calls]
    read_only = _read_only(statements, nodes, names)
    opaque = any(kind in ("DoStmt", "CallStmt") for kind, _ in nodes)
    locking = any(kind == "SelectStmt" and fields.get("lockingClause") for kind, fields in nodes)
    return StatementPlan(
        refusal=classify(statements, role_locked, nodes if len(statements) == 1 else None),
        opaque=opaque,
        placeholders=_highest_placeholder(statements, nodes),
        catalog_calls=frozenset(name for name in names if name),
        foreign_call="" in names,
        transaction_scoped=transaction_scoped(statements),
        read_only=read_only,
        autocommit_only=any(_autocommit_only(stmt) for stmt in statements),
        ddl=any(_is_ddl(stmt) for stmt in statements),
        replica_safe=read_only and not opaque and not locking,
        functions=frozenset(_written_name(call) for call in calls),
    )


def _written_name(call: dict[str, Any]) -> str:
    """A call's function name as written: ``f``, or ``schema.f`` (a database qualifier is
    left out)."""
    parts = [sval(p) for p in call.get("funcname", ())]
    return ".".join(parts[-2:])


# Built-ins with effects a second run would repeat (or that write outside the tables).
_EFFECTFUL_PREFIXES = (
    "nextval",
    "setval",
    "pg_notify",
    "lo_",
    "pg_terminate_backend",
    "pg_cancel_backend",
    "pg_reload_conf",
    "pg_switch_wal",
    "pg_create_",
    "pg_drop_",
    "pg_replication_",
    "pg_stat_reset",
    "pg_file",
    "pg_promote",
    "pg_log_",
    "set_config",
    "dblink",
    "pg_advisory",
    "pg_try_advisory",
    "txid_current",
    "pg_current_xact_id",
)


def _read_only(statements: Sequence[Node], nodes: Sequence[Node], calls: Sequence[str]) -> bool:
    """A SELECT (or VALUES, SHOW, EXPLAIN without ANALYZE) that writes nothing it can see."""
    for stmt in statements:
        kind, fields = stmt
        if kind == "ExplainStmt":
            if any(_defname(o) == "analyze" for o in fields.get("options", ())):
                return False
        elif not _plain_query(stmt):
            return False
    if any(kind in _WRITES for kind, _ in nodes):
        return False
    return not any(name.startswith(_EFFECTFUL_PREFIXES) for name in calls if name)


_WRITES = frozenset({"InsertStmt", "UpdateStmt", "DeleteStmt", "MergeStmt"})
_TRANSACTION_CONTROL = re.compile(r"\b(commit|rollback)\b", re.IGNORECASE)


def _defname(option: Any) -> str:
    """The name of a ``DefElem`` option (``""`` for anything else)."""
    node = node_of(option)
    return str(node[1].get("defname", "")) if node is not None and node[0] == "DefElem" else ""


def _plain_query(stmt: Node) -> bool:
    """SELECT, VALUES or SHOW; not SELECT … INTO, which creates a table."""
    kind, fields = stmt
    if kind == "VariableShowStmt":
        return True
    return kind == "SelectStmt" and fields.get("intoClause") is None


def _autocommit_only(stmt: Node) -> bool:
    """Whether Postgres refuses *stmt* inside a transaction block (25001), or it may run
    transaction control itself (a procedure's COMMIT fails inside BEGIN: 2D000)."""
    kind, fields = stmt
    if kind == "VacuumStmt":
        return bool(fields.get("is_vacuumcmd"))  # ANALYZE alone runs in a transaction
    if kind in ("IndexStmt", "ReindexStmt"):
        return bool(fields.get("concurrent")) or any(
            _defname(o) == "concurrently" for o in fields.get("params", ())
        )
    if kind == "DropStmt":
        return bool(fields.get("concurrent"))
    if kind == "DoStmt":  # a DO block may COMMIT (2D000 inside BEGIN)
        body = " ".join(_option_text(o) for o in fields.get("args", ()))
        return _TRANSACTION_CONTROL.search(body) is not None
    return kind in _AUTOCOMMIT_ONLY


def _option_text(option: Any) -> str:
    """A ``DefElem`` option's ``String`` argument (a DO block's body or language)."""
    node = node_of(option)
    return sval(node[1].get("arg")) if node is not None and node[0] == "DefElem" else ""


_AUTOCOMMIT_ONLY = frozenset(
    {
        "CreatedbStmt",
        "DropdbStmt",
        "CreateTableSpaceStmt",
        "DropTableSpaceStmt",
        "AlterSystemStmt",
        "CreateSubscriptionStmt",
        "DropSubscriptionStmt",
        "CallStmt",
    }
)


# Utility statements that leave the catalog alone (or only touch rows, sessions, cursors):
# every other utility statement counts as DDL. Counting too much costs a re-prepare on each
# pooled connection; counting too little, an error (0A000) once per connection.
_NOT_DDL = frozenset(
    {
        "SelectStmt",
        "InsertStmt",
        "UpdateStmt",
        "DeleteStmt",
        "MergeStmt",
        "TransactionStmt",
        "VariableSetStmt",
        "VariableShowStmt",
        "ConstraintsSetStmt",
        "DiscardStmt",
        "ExplainStmt",
        "CopyStmt",
        "PrepareStmt",
        "ExecuteStmt",
        "DeallocateStmt",
        "DeclareCursorStmt",
        "FetchStmt",
        "ClosePortalStmt",
        "LockStmt",
        "NotifyStmt",
        "ListenStmt",
        "UnlistenStmt",
        "VacuumStmt",
        "ClusterStmt",
        "ReindexStmt",
        "RefreshMatViewStmt",
        "TruncateStmt",
        "CheckPointStmt",
        "LoadStmt",
        "DoStmt",  # opaque: counting every DO/CALL would defeat the cache for procedure users
        "CallStmt",
    }
)


def _is_ddl(stmt: Node) -> bool:
    """Whether *stmt* (a top-level statement) may change the catalog; see `_NOT_DDL`."""
    kind, fields = stmt
    if kind == "SelectStmt":
        return fields.get("intoClause") is not None  # SELECT … INTO creates a table
    return kind not in _NOT_DDL


class _TooDeep(Exception):
    """SQL nested deeper than libpg_query's stack check allows (Postgres: 54001)."""


def _parse(sql: str) -> list[Node]:
    """The statements of *sql* (broker/sql/tree.py); raise `_TooDeep` for SQL nested beyond
    what libpg_query's own stack check allows (issue 15: Postgres refuses it with 54001 too),
    ParseError for SQL it cannot parse.

    libpg_query checks its stack depth as Postgres does while it writes the tree, and the tree
    is read without recursion, so SQL of any length may be planned on any thread (pglast's
    Python AST, read before, recursed in C without a check: a 50 KB ``SELECT 1+1+…`` killed
    the process with SIGSEGV)."""
    try:
        return parse(sql)
    except ParseError as exc:
        if _STACK_DEPTH_EXCEEDED in str(exc):
            raise _TooDeep(str(exc)) from exc
        raise


_cached_plan = functools.lru_cache(maxsize=CACHE_ENTRIES)(_plan)
cache_info = _cached_plan.cache_info


def _unparsed(sql: str, refusal: Refusal | None) -> StatementPlan:
    """SQL pglast cannot read: opaque, every call unknown, and its ``$n`` left to Postgres."""
    return StatementPlan(
        refusal=refusal,
        opaque=True,
        placeholders=0 if not _scans_placeholders(sql) else None,
        foreign_call=True,
    )


def _scans_placeholders(sql: str) -> bool:
    """Whether Postgres' lexer finds a ``$n`` in *sql* (or cannot scan it at all); words in
    literals, dollar quotes and comments do not count."""
    if "$" not in sql:
        return False
    try:
        return any(token.name == "PARAM" for token in scan(sql))
    except ParseError:
        return True


def _highest_placeholder(statements: Sequence[Node], nodes: Sequence[Node]) -> int | None:
    """The highest ``$n`` of the parsed SQL, or None when a ``$n`` may need no value: the
    arguments of a function with a SQL-standard body (``CREATE FUNCTION f(int) … RETURN
    $1 + 1``), or ``EXPLAIN (GENERIC_PLAN)`` from Postgres 16. Postgres then counts them.

    Needed because the statement is prepared with one type per value given: Postgres then
    counts the values, not the placeholders, and ignores values beyond them.
    """
    numbers = [fields.get("number", 0) for kind, fields in nodes if kind == "ParamRef"]
    if numbers and any(_placeholders_may_not_be_values(stmt) for stmt in statements):
        return None
    return max(numbers, default=0)


def _placeholders_may_not_be_values(stmt: Node) -> bool:
    kind, fields = stmt
    return kind == "ExplainStmt" or (
        kind == "CreateFunctionStmt" and fields.get("sql_body") is not None
    )
