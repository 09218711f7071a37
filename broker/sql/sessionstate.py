"""Refuse SQL that would change a pooled connection's session, before anything runs.

pgbroker pools connections per transaction (PgBouncer's ``pool_mode=transaction``): the
connection that ran one caller's transaction runs the next caller's transaction a moment
later. Anything that outlives the transaction — a ``SET`` without ``LOCAL``, a prepared
statement, a ``WITH HOLD`` cursor, a temporary table, a session-level advisory lock, a
``LISTEN`` — would leak into somebody else's transaction, or be lost when the caller's next
request lands on another connection. RDS Proxy "pins" a connection in that case; pgbroker
refuses the statement instead, naming it and the transaction-scoped alternative.

Classification uses Postgres' own grammar through ``pglast`` (never regular expressions), so
words inside string literals, dollar quotes, comments and quoted identifiers are not
mistaken for commands. This module judges a parsed statement (libpg_query's parse tree as
dicts: broker/sql/tree.py); `broker.sql.plan` parses each SQL text once and caches the verdict
with the other facts a request needs.

Decisions worth knowing:

* One statement per ``Statement``. Parameters bind to exactly one statement and Postgres'
  extended protocol refuses several anyway; a string with several statements (or none) is
  refused with reason ``BAD_REQUEST`` and a message saying to send one ``Statement`` each.
* ``NOTIFY`` / ``pg_notify()`` are allowed: notifications are queued by the transaction and
  sent at COMMIT, and change nothing in the session. ``LISTEN``/``UNLISTEN`` are refused.
* Transaction control (``BEGIN``, ``COMMIT``, ``ROLLBACK``, ``PREPARE TRANSACTION``) is
  refused: the broker wraps the batch itself, and a stray ``BEGIN`` would leave the pooled
  connection inside an open transaction. ``SAVEPOINT``/``RELEASE``/``ROLLBACK TO`` are fine.
* ``EXPLAIN`` of a refused statement is refused (``EXPLAIN ANALYZE`` runs it).
* SQL that pglast cannot parse is let through so Postgres reports the syntax error with its
  SQLSTATE and position; the broker's second line (the session fingerprint after each
  transaction) covers what parsing cannot see, such as a ``DO`` block running dynamic SQL.
* When the broker sets the caller's role (``role_locked``, i.e. ``PGBROKER_ROLE_MAP`` is
  set), any change of role is refused, even ``SET LOCAL ROLE``/``RESET ROLE`` and
  ``set_config('role', …, true)``, and so are ``DO`` blocks, whose dynamic SQL could do it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from broker.errors import BrokerFailure, Code, Reason
from broker.sql.tree import Node, constant_value, fields_of, node_of, sval, walk

__all__ = [
    "REASON_BAD_REQUEST",
    "REASON_SESSION_STATE",
    "TOO_DEEP",
    "Refusal",
    "SessionStateError",
    "classify",
    "function_name",
    "lone_in_autocommit",
    "transaction_scoped",
    "walk",
]

REASON_SESSION_STATE = Reason.SESSION_STATE
REASON_BAD_REQUEST = Reason.BAD_REQUEST

_CURSOR_OPT_HOLD = 0x0020  # parsenodes.h: DECLARE ... WITH HOLD

_SESSION_ADVISORY_LOCKS = frozenset(
    {
        "pg_advisory_lock",
        "pg_advisory_lock_shared",
        "pg_try_advisory_lock",
        "pg_try_advisory_lock_shared",
    }
)
_PERSISTENT_CONNECTION_FUNCS = frozenset({"dblink_connect", "dblink_connect_u"})
_ROLE_SETTINGS = frozenset({"role", "session_authorization"})
_TRUE_WORDS = frozenset({"t", "true", "on", "y", "yes", "1"})


# The broker runs BEGIN/COMMIT itself; savepoints and two-phase COMMIT/ROLLBACK PREPARED are fine.
_REFUSED_TRANSACTION_KINDS = {
    "TRANS_STMT_BEGIN": "BEGIN",
    "TRANS_STMT_START": "START TRANSACTION",
    "TRANS_STMT_COMMIT": "COMMIT",
    "TRANS_STMT_ROLLBACK": "ROLLBACK",
    "TRANS_STMT_PREPARE": "PREPARE TRANSACTION",
}


@dataclass(frozen=True)
class Refusal:
    """Why one SQL string is refused: the ``command`` it names and the full ``message``."""

    command: str
    message: str
    reason: Reason = REASON_SESSION_STATE


class SessionStateError(BrokerFailure):
    """A statement of the batch was refused before anything ran: INVALID_ARGUMENT.

    ``statement_index`` indexes ``ExecuteRequest.statements`` (also in the ErrorInfo
    metadata); ``reason`` is ``SESSION_STATE`` for session-changing SQL, ``BAD_REQUEST`` for
    several or no statements in one string. The message names the statement and the safe
    alternative, never the SQL text (which may hold secrets).
    """

    code = Code.INVALID_ARGUMENT

    def __init__(
        self, statement_index: int, message: str, reason: Reason = REASON_SESSION_STATE
    ) -> None:
        super().__init__(
            f"statement {statement_index}: {message}",
            reason=reason,
            metadata={"statement_index": str(statement_index)},
        )
        self.statement_index = statement_index


def classify(
    statements: Sequence[Node], role_locked: bool = False, nodes: Sequence[Node] | None = None
) -> Refusal | None:
    """Return why the SQL that parsed into *statements* is refused, or ``None`` when it is
    safe on a pooled connection. Never raises.

    *role_locked* is true when the broker sets each caller's role itself; then role changes
    of any kind are refused as well. A text of several statements (or none) is refused with
    ``BAD_REQUEST``. SQL that does not parse is not judged here: Postgres' grammar is the
    server's, so the server rejects it too, with SQLSTATE and position.

    *nodes* are ``walk(statements[0])`` when the caller has them (`broker.sql.plan` does),
    so the tree is not walked twice.
    """
    if len(statements) != 1:
        return _not_one_statement(len(statements))
    return _classify_node(statements[0], role_locked, nodes)


# SQL nested deeper than libpg_query's stack check allows: refused, not guessed at.
TOO_DEEP = Refusal(
    "too deeply nested",
    "the statement nests too deeply for the broker to check (Postgres refuses such SQL as"
    " well: 54001 stack depth limit exceeded); simplify it",
    REASON_BAD_REQUEST,
)


def _not_one_statement(count: int) -> Refusal:
    if count == 0:
        return Refusal("empty", "the SQL text holds no statement", REASON_BAD_REQUEST)
    return Refusal(
        "multiple statements",
        f"the SQL text holds {count} statements; send each as its own Statement of the"
        " same request (they run in one transaction, and parameters bind to one statement)",
        REASON_BAD_REQUEST,
    )


def _classify_node(
    stmt: Node, role_locked: bool, nodes: Sequence[Node] | None = None
) -> Refusal | None:
    kind, fields = stmt
    if kind == "ExplainStmt":  # judged as the statement it explains (ANALYZE runs it)
        query = node_of(fields.get("query"))
        return None if query is None else _classify_node(query, role_locked)
    top = _classify_top_level(stmt, role_locked)
    if top is not None:
        return top
    for node in walk(stmt) if nodes is None else nodes:
        found = _classify_nested(node, role_locked)
        if found is not None:
            return found
    return None


def _classify_top_level(stmt: Node, role_locked: bool) -> Refusal | None:
    """Statements that only make sense as a whole command (``SET`` inside ``ALTER ROLE …
    SET`` or ``CREATE FUNCTION … SET`` is persistent configuration, not session state)."""
    kind, fields = stmt
    match kind:
        case "VariableSetStmt":
            return _classify_set(fields, role_locked)
        case "TransactionStmt" if fields.get("kind") in _REFUSED_TRANSACTION_KINDS:
            return _transaction_control(fields)
        case "ListenStmt" | "UnlistenStmt":
            verb = "LISTEN" if kind == "ListenStmt" else "UNLISTEN"
            return Refusal(
                verb,
                f"{verb} registers the pooled connection, not the caller, and notifications"
                " would reach whichever caller holds it next; listen on a dedicated"
                " connection, or poll a table (NOTIFY and pg_notify() are allowed)",
            )
        case "PrepareStmt" | "DeallocateStmt":
            verb = "PREPARE" if kind == "PrepareStmt" else "DEALLOCATE"
            return Refusal(
                verb,
                f"{verb} manages session-level prepared statements; send the SQL with $1..$n"
                " parameters instead (the broker prepares and caches statements per"
                " connection itself)",
            )
        case "DeclareCursorStmt" if fields.get("options", 0) & _CURSOR_OPT_HOLD:
            return Refusal(
                "DECLARE ... WITH HOLD",
                "DECLARE ... WITH HOLD creates a cursor that outlives the transaction on a"
                " pooled connection; declare it WITHOUT HOLD and FETCH within the same"
                " request, or page with WHERE key > $1 ORDER BY key LIMIT n",
            )
        case "LoadStmt":
            return Refusal(
                "LOAD",
                "LOAD loads a library into the pooled connection for the rest of its life;"
                " configure shared_preload_libraries / session_preload_libraries instead",
            )
        case "DiscardStmt":
            return Refusal(
                "DISCARD",
                "DISCARD would drop the broker's own prepared statements; there is nothing to"
                " discard, because every request starts on a clean session",
            )
        # libpg_query's JSON leaves out an empty file name: `COPY t FROM ''` (a server file
        # named '', which cannot be opened) is refused as COPY FROM STDIN as well.
        case "CopyStmt" if not fields.get("filename"):
            verb = "COPY FROM STDIN" if fields.get("is_from") else "COPY TO STDOUT"
            return Refusal(
                verb,
                f"{verb} streams data over the database connection, which the broker does not"
                " relay; insert rows with INSERT … SELECT * FROM unnest($1::int[], $2::text[]),"
                " read them with SELECT",
                REASON_BAD_REQUEST,
            )
        case "DoStmt" if role_locked:
            return Refusal(
                "DO",
                "DO blocks are refused while the broker sets each caller's role"
                " (PGBROKER_ROLE_MAP), because their dynamic SQL could change the role;"
                " call a function created by the schema owner instead",
            )
    return _classify_temporary(stmt)


def _transaction_control(stmt: dict[str, Any]) -> Refusal:
    verb = _REFUSED_TRANSACTION_KINDS[stmt["kind"]]
    return Refusal(
        verb,
        f"{verb} is transaction control, which the broker does itself: the statements of one"
        " request already run as one transaction (set isolation, read_only and deferrable in"
        " the request's options); SAVEPOINT, RELEASE and ROLLBACK TO are allowed",
    )


def transaction_scoped(statements: Sequence[Node]) -> str | None:
    """The command (``SET LOCAL name``, ``SET TRANSACTION``) when *statements* is one
    statement whose only effect lasts until the end of its transaction, else None. Sent as a
    request of its own it runs in autocommit, so it would end before anything it was meant
    for ran (`lone_in_autocommit`)."""
    if len(statements) != 1:
        return None
    kind, stmt = statements[0]
    if kind != "VariableSetStmt":
        return None
    name = stmt.get("name", "")
    if stmt.get("kind") == "VAR_SET_MULTI":
        return "SET TRANSACTION" if name.startswith("TRANSACTION") else None
    return f"SET LOCAL {name}" if stmt.get("is_local") else None


def lone_in_autocommit(command: str) -> SessionStateError:
    """The refusal of *command* (`transaction_scoped`) sent as a request's only statement:
    it would run in a transaction of its own and silently change nothing."""
    return SessionStateError(
        0,
        f"{command} alone runs in autocommit, in a transaction of its own, so it would end"
        " before any other statement and change nothing; send it with the statements it is"
        " for in one batch (BrokerClient.transaction([...])), or run it inside"
        " BrokerClient.begin() (an interactive transaction)",
        REASON_BAD_REQUEST,
    )


def _classify_set(stmt: dict[str, Any], role_locked: bool) -> Refusal | None:
    name = stmt.get("name", "")
    kind = stmt.get("kind")
    is_local = bool(stmt.get("is_local"))
    if name in _ROLE_SETTINGS and (role_locked or not is_local or name != "role"):
        return _role_change(name, role_locked, reset=kind == "VAR_RESET")
    if kind == "VAR_SET_MULTI":  # SET TRANSACTION … / SET SESSION CHARACTERISTICS …
        if name.startswith("TRANSACTION"):
            return None  # applies to the current transaction only
        return Refusal(
            "SET SESSION CHARACTERISTICS",
            "SET SESSION CHARACTERISTICS changes every later transaction of the pooled"
            " connection; set isolation, read_only and deferrable in the request's options"
            " (or SET TRANSACTION … as the first statement)",
        )
    if is_local:
        return None
    if kind in ("VAR_RESET", "VAR_RESET_ALL"):
        target = "ALL" if kind == "VAR_RESET_ALL" else name
        return Refusal(
            f"RESET {target}",
            f"RESET {target} changes the session of the pooled connection; every request"
            " already starts from the server defaults — use SET LOCAL name TO DEFAULT inside"
            " the transaction if you need the default back",
        )
    return Refusal(
        f"SET {name}",
        f"SET {name} without LOCAL changes the session of the pooled connection and would"
        f" leak into the next caller's transaction; use SET LOCAL {name} … (or"
        " set_config(name, value, true)) in the same request",
    )


def _role_change(name: str, role_locked: bool, *, reset: bool = False) -> Refusal:
    verb = "RESET" if reset else "SET"
    if name == "session_authorization":
        return Refusal(
            f"{verb} SESSION AUTHORIZATION",
            "SET/RESET SESSION AUTHORIZATION changes who the pooled connection is; it is never"
            " allowed — map callers to roles with PGBROKER_ROLE_MAP",
        )
    if role_locked:
        return Refusal(
            f"{verb} ROLE",
            "the broker sets each caller's role (PGBROKER_ROLE_MAP), so SET ROLE, SET LOCAL"
            " ROLE and RESET ROLE are refused; ask the operator to map your identity to the"
            " role you need",
        )
    return Refusal(
        f"{verb} ROLE",
        "SET ROLE / RESET ROLE without LOCAL changes the role of the pooled connection for"
        " the next caller; use SET LOCAL ROLE … in the same request",
    )


def _classify_temporary(stmt: Node) -> Refusal | None:
    """Temporary objects that survive COMMIT (only ``ON COMMIT DROP`` tables do not)."""
    kind, fields = stmt
    match kind:
        case "CreateStmt":
            if _is_temp_rangevar(fields.get("relation")) and not _on_commit_drop(
                fields.get("oncommit")
            ):
                return _temp_table_refusal("CREATE TEMP TABLE")
            return None
        case "CreateTableAsStmt" if (into := fields.get("into")) is not None:
            if _is_temp_rangevar(into.get("rel")) and not _on_commit_drop(into.get("onCommit")):
                return _temp_table_refusal("CREATE TEMP TABLE ... AS")
            return None
        case "ViewStmt" if _is_temp_rangevar(fields.get("view")):
            return _temp_object_refusal("CREATE TEMP VIEW", "use a WITH query (CTE) instead")
        case "CreateSeqStmt" if _is_temp_rangevar(fields.get("sequence")):
            return _temp_object_refusal(
                "CREATE TEMP SEQUENCE", "use generate_series() or row_number() instead"
            )
        case "CompositeTypeStmt" if _is_temp_rangevar(fields.get("typevar")):
            return _temp_object_refusal("CREATE TYPE pg_temp...", "create it in a real schema")
    for field in ("funcname", "defnames", "domainname", "typeName"):
        names = fields.get(field)
        if kind.startswith(("Create", "Define")) and _is_temp_name(names):
            return _temp_object_refusal(
                f"{_command_name(kind)} pg_temp...",
                "objects in pg_temp live as long as the pooled connection; create it in a"
                " real schema",
            )
    return None


def _temp_table_refusal(verb: str) -> Refusal:
    return Refusal(
        verb,
        f"{verb} without ON COMMIT DROP leaves the table on the pooled connection for the next"
        " caller; add ON COMMIT DROP and use it within the same request",
    )


def _temp_object_refusal(verb: str, alternative: str) -> Refusal:
    return Refusal(
        verb,
        f"{verb} creates a temporary object that outlives the transaction on the pooled"
        f" connection; {alternative}",
    )


def _classify_nested(node: Node, role_locked: bool) -> Refusal | None:
    """Checks that apply anywhere in a statement: function calls, SELECT INTO, EXECUTE."""
    kind, fields = node
    match kind:
        case "FuncCall":
            return _classify_call(fields, role_locked)
        case "IntoClause" if _is_temp_rangevar(fields.get("rel")) and not _on_commit_drop(
            fields.get("onCommit")
        ):
            return _temp_table_refusal("SELECT ... INTO TEMP")
        case "ExecuteStmt":
            return Refusal(
                "EXECUTE",
                "EXECUTE runs a session-level prepared statement, which does not exist for"
                " you on a pooled connection; send the SQL with $1..$n parameters instead",
            )
    return None


def _classify_call(call: dict[str, Any], role_locked: bool) -> Refusal | None:
    name = function_name(call)
    if name in _SESSION_ADVISORY_LOCKS:
        xact = name.replace("advisory_lock", "advisory_xact_lock")
        return Refusal(
            f"{name}()",
            f"{name}() takes a session-level lock that would stay with the pooled connection;"
            f" use {xact}(), which is released at COMMIT or ROLLBACK",
        )
    if name in _PERSISTENT_CONNECTION_FUNCS:
        return Refusal(
            f"{name}()",
            f"{name}() keeps a named connection open on the pooled session; pass the"
            " connection string to dblink() itself",
        )
    if name == "set_config":
        return _classify_set_config(call, role_locked)
    return None


def _classify_set_config(call: dict[str, Any], role_locked: bool) -> Refusal | None:
    setting, is_local = _set_config_args(call.get("args", ()))
    setting_name = _constant_text(setting)
    if setting_name is not None and setting_name.strip().lower() == "session_authorization":
        return _role_change("session_authorization", role_locked)
    if role_locked and (setting_name is None or setting_name.strip().lower() in _ROLE_SETTINGS):
        return Refusal(
            "set_config()",
            "the broker sets each caller's role (PGBROKER_ROLE_MAP), so set_config() may not"
            " change role or session_authorization, and its setting name must be a constant",
        )
    if _is_true_constant(is_local):
        return None
    return Refusal(
        "set_config(..., false)",
        "set_config() with is_local false (or not a constant true) changes the session of"
        " the pooled connection; call set_config(name, value, true), which lasts until"
        " COMMIT",
    )


def _set_config_args(args: Sequence[Any]) -> tuple[Any, Any]:
    """set_config's setting_name and is_local arguments (wrapped nodes), positional or named."""
    positional = [a for a in args if fields_of(a, "NamedArgExpr") is None]
    named = {
        f.get("name"): f.get("arg") for a in args if (f := fields_of(a, "NamedArgExpr")) is not None
    }
    setting = positional[0] if positional else named.get("setting_name")
    is_local = positional[2] if len(positional) > 2 else named.get("is_local")
    return setting, is_local


def _is_true_constant(node: Any) -> bool:
    if (cast := fields_of(node, "TypeCast")) is not None:
        type_name = cast.get("typeName")
        type_names = [sval(n) for n in type_name.get("names", ())] if type_name else []
        if type_names[-1:] not in (["bool"], ["boolean"]):
            return False
        node = cast.get("arg")
    const = fields_of(node, "A_Const")
    value = None if const is None else constant_value(const)
    if value is None:
        return False
    kind, raw = value
    if kind == "Boolean":
        return bool(raw)
    if kind == "String":
        return str(raw).strip().lower() in _TRUE_WORDS
    return False


def _constant_text(node: Any) -> str | None:
    if (cast := fields_of(node, "TypeCast")) is not None:
        node = cast.get("arg")
    const = fields_of(node, "A_Const")
    value = None if const is None else constant_value(const)
    if value is not None and value[0] == "String":
        return str(value[1])
    return None


def function_name(call: dict[str, Any]) -> str:
    """The name a ``FuncCall`` (its fields) reaches in ``pg_catalog`` if it is a built-in
    (unqualified or ``pg_catalog.``-qualified), or ``""`` when it is qualified with another
    schema."""
    parts = [sval(p) for p in call.get("funcname", ())]
    if len(parts) >= 2 and parts[-2] != "pg_catalog":
        return ""  # a user function of the same name in another schema
    return parts[-1] if parts else ""


def _is_temp_rangevar(rangevar: dict[str, Any] | None) -> bool:
    """Whether a ``RangeVar`` (its fields, written inline) names a temporary relation."""
    if rangevar is None:
        return False
    return rangevar.get("relpersistence") == "t" or _is_temp_schema(rangevar.get("schemaname"))


def _is_temp_name(names: object) -> bool:
    if not isinstance(names, list) or len(names) < 2:
        return False
    first = fields_of(names[0], "String")
    return first is not None and _is_temp_schema(first.get("sval", ""))


def _is_temp_schema(schema: str | None) -> bool:
    return schema is not None and (schema == "pg_temp" or schema.startswith("pg_temp_"))


def _on_commit_drop(action: object) -> bool:
    return action == "ONCOMMIT_DROP"


def _command_name(kind: str) -> str:
    return "CREATE " + kind.removeprefix("Create").removesuffix("Stmt").upper()
