"""The session-state classifier as it was on pglast's Python AST (``pglast.parse_sql``),
kept as the oracle of tests/broker/sql/test_tree.py: broker/sql/sessionstate.py now reads
libpg_query's JSON tree (broker/sql/tree.py) and must decide every statement the same way.
Copied from broker/sql/sessionstate.py at 3acf7f6; the refusals are the broker's own classes.

The original docstring follows.
Refuse SQL that would change a pooled connection's session, before anything runs.

pgbroker pools connections per transaction (PgBouncer's ``pool_mode=transaction``): the
connection that ran one caller's transaction runs the next caller's transaction a moment
later. Anything that outlives the transaction — a ``SET`` without ``LOCAL``, a prepared
statement, a ``WITH HOLD`` cursor, a temporary table, a session-level advisory lock, a
``LISTEN`` — would leak into somebody else's transaction, or be lost when the caller's next
request lands on another connection. RDS Proxy "pins" a connection in that case; pgbroker
refuses the statement instead, naming it and the transaction-scoped alternative.

Classification uses Postgres' own grammar through ``pglast`` (never regular expressions), so
words inside string literals, dollar quotes, comments and quoted identifiers are not
mistaken for commands. This module judges a parsed statement; `broker.sql.plan` parses each
SQL text once and caches the verdict with the other facts a request needs.

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

from collections.abc import Iterator, Sequence

from pglast import ast
from pglast.enums import OnCommitAction, TransactionStmtKind, VariableSetKind

from broker.errors import Reason

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
    TransactionStmtKind.TRANS_STMT_BEGIN: "BEGIN",
    TransactionStmtKind.TRANS_STMT_START: "START TRANSACTION",
    TransactionStmtKind.TRANS_STMT_COMMIT: "COMMIT",
    TransactionStmtKind.TRANS_STMT_ROLLBACK: "ROLLBACK",
    TransactionStmtKind.TRANS_STMT_PREPARE: "PREPARE TRANSACTION",
}


from broker.sql.sessionstate import Refusal, SessionStateError  # noqa: E402


def classify(raw_statements: Sequence[ast.RawStmt], role_locked: bool = False) -> Refusal | None:
    """Return why the SQL that parsed into *raw_statements* is refused, or ``None`` when it is
    safe on a pooled connection. Never raises.

    *role_locked* is true when the broker sets each caller's role itself; then role changes
    of any kind are refused as well. A text of several statements (or none) is refused with
    ``BAD_REQUEST``. SQL that does not parse is not judged here: Postgres' grammar is the
    server's, so the server rejects it too, with SQLSTATE and position.
    """
    if len(raw_statements) != 1:
        return _not_one_statement(len(raw_statements))
    return _classify_node(raw_statements[0].stmt, role_locked)


from broker.sql.sessionstate import TOO_DEEP  # noqa: E402


def _not_one_statement(count: int) -> Refusal:
    if count == 0:
        return Refusal("empty", "the SQL text holds no statement", REASON_BAD_REQUEST)
    return Refusal(
        "multiple statements",
        f"the SQL text holds {count} statements; send each as its own Statement of the"
        " same request (they run in one transaction, and parameters bind to one statement)",
        REASON_BAD_REQUEST,
    )


def _classify_node(stmt: ast.Node | None, role_locked: bool) -> Refusal | None:
    if isinstance(stmt, ast.ExplainStmt):
        return _classify_node(stmt.query, role_locked)
    top = _classify_top_level(stmt, role_locked)
    if top is not None:
        return top
    for node in walk(stmt):
        found = _classify_nested(node, role_locked)
        if found is not None:
            return found
    return None


def _classify_top_level(stmt: ast.Node | None, role_locked: bool) -> Refusal | None:
    """Statements that only make sense as a whole command (``SET`` inside ``ALTER ROLE …
    SET`` or ``CREATE FUNCTION … SET`` is persistent configuration, not session state)."""
    match stmt:
        case ast.VariableSetStmt():
            return _classify_set(stmt, role_locked)
        case ast.TransactionStmt() if stmt.kind in _REFUSED_TRANSACTION_KINDS:
            return _transaction_control(stmt)
        case ast.ListenStmt() | ast.UnlistenStmt():
            verb = "LISTEN" if isinstance(stmt, ast.ListenStmt) else "UNLISTEN"
            return Refusal(
                verb,
                f"{verb} registers the pooled connection, not the caller, and notifications"
                " would reach whichever caller holds it next; listen on a dedicated"
                " connection, or poll a table (NOTIFY and pg_notify() are allowed)",
            )
        case ast.PrepareStmt() | ast.DeallocateStmt():
            verb = "PREPARE" if isinstance(stmt, ast.PrepareStmt) else "DEALLOCATE"
            return Refusal(
                verb,
                f"{verb} manages session-level prepared statements; send the SQL with $1..$n"
                " parameters instead (the broker prepares and caches statements per"
                " connection itself)",
            )
        case ast.DeclareCursorStmt() if (stmt.options or 0) & _CURSOR_OPT_HOLD:
            return Refusal(
                "DECLARE ... WITH HOLD",
                "DECLARE ... WITH HOLD creates a cursor that outlives the transaction on a"
                " pooled connection; declare it WITHOUT HOLD and FETCH within the same"
                " request, or page with WHERE key > $1 ORDER BY key LIMIT n",
            )
        case ast.LoadStmt():
            return Refusal(
                "LOAD",
                "LOAD loads a library into the pooled connection for the rest of its life;"
                " configure shared_preload_libraries / session_preload_libraries instead",
            )
        case ast.DiscardStmt():
            return Refusal(
                "DISCARD",
                "DISCARD would drop the broker's own prepared statements; there is nothing to"
                " discard, because every request starts on a clean session",
            )
        case ast.CopyStmt() if stmt.filename is None:
            verb = "COPY FROM STDIN" if stmt.is_from else "COPY TO STDOUT"
            return Refusal(
                verb,
                f"{verb} streams data over the database connection, which the broker does not"
                " relay; insert rows with INSERT … SELECT * FROM unnest($1::int[], $2::text[]),"
                " read them with SELECT",
                REASON_BAD_REQUEST,
            )
        case ast.DoStmt() if role_locked:
            return Refusal(
                "DO",
                "DO blocks are refused while the broker sets each caller's role"
                " (PGBROKER_ROLE_MAP), because their dynamic SQL could change the role;"
                " call a function created by the schema owner instead",
            )
    return _classify_temporary(stmt)


def _transaction_control(stmt: ast.TransactionStmt) -> Refusal:
    verb = _REFUSED_TRANSACTION_KINDS[stmt.kind]  # type: ignore[index]
    return Refusal(
        verb,
        f"{verb} is transaction control, which the broker does itself: the statements of one"
        " request already run as one transaction (set isolation, read_only and deferrable in"
        " the request's options); SAVEPOINT, RELEASE and ROLLBACK TO are allowed",
    )


def transaction_scoped(raw_statements: Sequence[ast.RawStmt]) -> str | None:
    """The command (``SET LOCAL name``, ``SET TRANSACTION``) when *raw_statements* is one
    statement whose only effect lasts until the end of its transaction, else None. Sent as a
    request of its own it runs in autocommit, so it would end before anything it was meant
    for ran (`lone_in_autocommit`)."""
    if len(raw_statements) != 1:
        return None
    stmt = raw_statements[0].stmt
    if not isinstance(stmt, ast.VariableSetStmt):
        return None
    name = stmt.name or ""
    if stmt.kind == VariableSetKind.VAR_SET_MULTI:
        return "SET TRANSACTION" if name.startswith("TRANSACTION") else None
    return f"SET LOCAL {name}" if stmt.is_local else None


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


def _classify_set(stmt: ast.VariableSetStmt, role_locked: bool) -> Refusal | None:
    name = stmt.name or ""
    kind = stmt.kind
    if name in _ROLE_SETTINGS and (role_locked or not stmt.is_local or name != "role"):
        return _role_change(name, role_locked, reset=kind == VariableSetKind.VAR_RESET)
    if kind == VariableSetKind.VAR_SET_MULTI:  # SET TRANSACTION … / SET SESSION CHARACTERISTICS …
        if name.startswith("TRANSACTION"):
            return None  # applies to the current transaction only
        return Refusal(
            "SET SESSION CHARACTERISTICS",
            "SET SESSION CHARACTERISTICS changes every later transaction of the pooled"
            " connection; set isolation, read_only and deferrable in the request's options"
            " (or SET TRANSACTION … as the first statement)",
        )
    if stmt.is_local:
        return None
    if kind in (VariableSetKind.VAR_RESET, VariableSetKind.VAR_RESET_ALL):
        target = "ALL" if kind == VariableSetKind.VAR_RESET_ALL else name
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


def _classify_temporary(stmt: ast.Node | None) -> Refusal | None:
    """Temporary objects that survive COMMIT (only ``ON COMMIT DROP`` tables do not)."""
    match stmt:
        case ast.CreateStmt():
            if _is_temp_rangevar(stmt.relation) and not _on_commit_drop(stmt.oncommit):
                return _temp_table_refusal("CREATE TEMP TABLE")
            return None
        case ast.CreateTableAsStmt() if stmt.into is not None:
            if _is_temp_rangevar(stmt.into.rel) and not _on_commit_drop(stmt.into.onCommit):
                return _temp_table_refusal("CREATE TEMP TABLE ... AS")
            return None
        case ast.ViewStmt() if _is_temp_rangevar(stmt.view):
            return _temp_object_refusal("CREATE TEMP VIEW", "use a WITH query (CTE) instead")
        case ast.CreateSeqStmt() if _is_temp_rangevar(stmt.sequence):
            return _temp_object_refusal(
                "CREATE TEMP SEQUENCE", "use generate_series() or row_number() instead"
            )
        case ast.CompositeTypeStmt() if _is_temp_rangevar(stmt.typevar):
            return _temp_object_refusal("CREATE TYPE pg_temp...", "create it in a real schema")
    for field in ("funcname", "defnames", "domainname", "typeName"):
        names = getattr(stmt, field, None)
        if type(stmt).__name__.startswith(("Create", "Define")) and _is_temp_name(names):
            return _temp_object_refusal(
                f"{_command_name(stmt)} pg_temp...",
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


def _classify_nested(node: ast.Node, role_locked: bool) -> Refusal | None:
    """Checks that apply anywhere in a statement: function calls, SELECT INTO, EXECUTE."""
    match node:
        case ast.FuncCall():
            return _classify_call(node, role_locked)
        case ast.IntoClause() if _is_temp_rangevar(node.rel) and not _on_commit_drop(node.onCommit):
            return _temp_table_refusal("SELECT ... INTO TEMP")
        case ast.ExecuteStmt():
            return Refusal(
                "EXECUTE",
                "EXECUTE runs a session-level prepared statement, which does not exist for"
                " you on a pooled connection; send the SQL with $1..$n parameters instead",
            )
    return None


def _classify_call(call: ast.FuncCall, role_locked: bool) -> Refusal | None:
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


def _classify_set_config(call: ast.FuncCall, role_locked: bool) -> Refusal | None:
    setting, is_local = _set_config_args(call.args or ())
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


def _set_config_args(args: Sequence[ast.Node]) -> tuple[ast.Node | None, ast.Node | None]:
    positional = [a for a in args if not isinstance(a, ast.NamedArgExpr)]
    named = {a.name: a.arg for a in args if isinstance(a, ast.NamedArgExpr)}
    setting = positional[0] if positional else named.get("setting_name")
    is_local = positional[2] if len(positional) > 2 else named.get("is_local")
    return setting, is_local


def _is_true_constant(node: ast.Node | None) -> bool:
    if isinstance(node, ast.TypeCast):
        type_name = node.typeName
        type_names = [getattr(n, "sval", "") for n in (type_name.names or ())] if type_name else []
        if type_names[-1:] not in (["bool"], ["boolean"]):
            return False
        node = node.arg
    if not isinstance(node, ast.A_Const) or node.isnull:
        return False
    value = node.val
    if isinstance(value, ast.Boolean):
        return bool(value.boolval)
    if isinstance(value, ast.String):
        return (value.sval or "").strip().lower() in _TRUE_WORDS
    return False


def _constant_text(node: ast.Node | None) -> str | None:
    if isinstance(node, ast.TypeCast):
        node = node.arg
    if isinstance(node, ast.A_Const) and isinstance(node.val, ast.String):
        return str(node.val.sval)
    return None


def function_name(call: ast.FuncCall) -> str:
    """The name *call* reaches in ``pg_catalog`` if it is a built-in (unqualified or
    ``pg_catalog.``-qualified), or ``""`` when it is qualified with another schema."""
    parts = [getattr(p, "sval", "") for p in (call.funcname or ())]
    if len(parts) >= 2 and parts[-2] != "pg_catalog":
        return ""  # a user function of the same name in another schema
    return parts[-1] if parts else ""


def _is_temp_rangevar(rangevar: ast.RangeVar | None) -> bool:
    if rangevar is None:
        return False
    return rangevar.relpersistence == "t" or _is_temp_schema(rangevar.schemaname)


def _is_temp_name(names: object) -> bool:
    if not isinstance(names, tuple) or len(names) < 2:
        return False
    return _is_temp_schema(getattr(names[0], "sval", None))


def _is_temp_schema(schema: str | None) -> bool:
    return schema is not None and (schema == "pg_temp" or schema.startswith("pg_temp_"))


def _on_commit_drop(action: object) -> bool:
    return action == OnCommitAction.ONCOMMIT_DROP


def _command_name(stmt: ast.Node | None) -> str:
    return "CREATE " + type(stmt).__name__.removeprefix("Create").removesuffix("Stmt").upper()


def walk(root: object) -> Iterator[ast.Node]:
    """Every node below *root*, including *root* itself (iterative: SQL nests deeply)."""
    pending = [root]
    while pending:
        node = pending.pop()
        if isinstance(node, ast.Node):
            yield node
            pending.extend(getattr(node, field) for field in node)
        elif isinstance(node, tuple):
            pending.extend(node)
