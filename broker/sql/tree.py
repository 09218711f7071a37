"""Postgres' parse tree of a SQL text as plain dicts, from libpg_query's JSON output.

`broker.sql.plan` and `broker.sql.sessionstate` judge a statement by its parse tree. They
used to read pglast's Python AST (``pglast.parse_sql``), which builds a Python object per
node: ~90 µs of a ~140 µs plan for a short Django query (``SELECT … WHERE "aid" = 3986 LIMIT
21``), and Django sends a new text for every new value (it binds on the client). The same tree
as JSON is built in C by the same libpg_query (``pglast.parser.parse_sql_json``, ~5 µs) and
decoded by ``json.loads`` (~10 µs); the checks then read dicts.

The JSON is libpg_query's ``outfuncs`` format (the same struct fields pglast exposes, under
the same names):

* a field typed ``Node *`` (or a ``List *`` item) holds a *wrapped* node, ``{"SelectStmt":
  {…fields…}}``: one key, the node type, which always starts with a capital letter (no field
  name does);
* a field typed with one node type, such as ``RangeVar *relation`` or ``SelectStmt *larg``,
  holds the fields *inline*, ``{"relname": …}``: the type comes from the field
  (`_INLINE_TYPES`, read from pglast's own table of the structs);
* an ``A_Const`` holds its value inline under the value's field name (``"ival": {"ival":
  1}``, ``"sval": {"sval": "x"}``, ``"boolval": {}`` for false);
* fields at their zero value (false, 0, NULL, an empty list) are left out, enums are their
  names (``"kind": "VAR_SET_VALUE"``).

`Node` is ``(type name, fields)``; `walk` visits every node of a tree, inline ones included,
as pglast's AST walk did (tests/broker/sql/test_tree.py compares the two planners over a
corpus).

Depth: ``json.loads`` recurses in C under Python's recursion limit and raises RecursionError
for a tree about 500 levels deep (``SELECT 1+1+…`` of 500 terms; a long ``UNION ALL``). Such a
tree is decoded by `_loads_deep` instead, without recursion. How deep a tree may be at all is
libpg_query's own stack check ("stack depth limit exceeded", `parse`), as before.
"""

from __future__ import annotations

import json
import re
from typing import Any

from pglast import ast
from pglast.parser import parse_sql_json

__all__ = ["Node", "constant_value", "fields_of", "parse", "sval", "walk"]

# (type name, fields): fields as libpg_query wrote them (zero values left out).
Node = tuple[str, dict[str, Any]]

# A_Const's value field → the value node's type (``"ival": {"ival": 1}`` is an Integer).
_CONST_VALUES = {
    "ival": "Integer",
    "fval": "Float",
    "boolval": "Boolean",
    "sval": "String",
    "bsval": "BitString",
}


def _inline_types() -> dict[str, dict[str, str]]:
    """Per node type, its fields typed with one node type (written inline), and that type.
    ``Node *`` and ``List *`` fields hold wrapped nodes; ``Expr *`` is abstract, written
    wrapped too (a wrapped value is recognised by its one capitalised key anyway)."""
    inline: dict[str, dict[str, str]] = {}
    for name, cls in vars(ast).items():
        slots = getattr(cls, "__slots__", None)
        if not (isinstance(cls, type) and issubclass(cls, ast.Node) and isinstance(slots, dict)):
            continue
        for field, info in slots.items():
            target = info.c_type.removesuffix("*")
            if (
                info.c_type.endswith("*")
                and target not in ("Node", "List", "Expr", "char", "Bitmapset")
                and isinstance(getattr(ast, target, None), type)
            ):
                inline.setdefault(name, {})[field] = target
    return inline


_INLINE_TYPES = _inline_types()

# ``json.loads`` holds the GIL for its whole run, about 25 ms per MB of JSON (a 65,535-parameter
# statement is 5.7 MB: 133 ms in one piece, and other callers' p99 rose from ~100 to ~300 ms
# while it was planned on a parser thread). A tree this big is decoded by `_loads_deep`, in
# Python, which lets the event loop take the GIL back at every switch interval: about six times
# the CPU, for requests that are rare and heavy anyway (issue 15: nothing blocks the loop).
GIL_FRIENDLY_CHARS = 1 << 20
_NO_INLINE: dict[str, str] = {}


def parse(sql: str) -> list[Node]:
    """The statements of *sql*, each its top-level node (``RawStmt.stmt``); raise
    ``pglast.parser.ParseError`` as ``parse_sql`` does (its message says "stack depth limit
    exceeded" for SQL nested deeper than libpg_query allows)."""
    text = parse_sql_json(sql)
    if len(text) > GIL_FRIENDLY_CHARS:
        tree = _loads_deep(text)
    else:
        try:
            tree = json.loads(text)
        except RecursionError:
            tree = _loads_deep(text)
    return [_wrapped(raw["stmt"]) for raw in tree.get("stmts", ())]


def _wrapped(value: dict[str, Any]) -> Node:
    ((kind, fields),) = value.items()
    return kind, fields


def _is_wrapped(value: dict[str, Any]) -> bool:
    """Whether *value* is a wrapped node: one key, a node type (capitalised; no field is)."""
    return len(value) == 1 and next(iter(value))[:1].isupper()


def walk(root: Node) -> list[Node]:
    """Every node below *root*, *root* first (iterative: SQL nests deeply). A list, not a
    generator: the plan reads it several times, and building it is cheaper."""
    found: list[Node] = []
    pending: list[Node] = [root]
    push, pop, add = pending.append, pending.pop, found.append
    while pending:
        node = pop()
        add(node)
        kind, fields = node
        inline = _INLINE_TYPES.get(kind, _NO_INLINE)
        for field, value in fields.items():
            cls = type(value)
            if cls is dict:
                if len(value) == 1 and (key := next(iter(value)))[:1].isupper():
                    push((key, value[key]))
                elif kind == "A_Const" and field in _CONST_VALUES:
                    push((_CONST_VALUES[field], value))
                else:
                    push((inline.get(field, "?"), value))
            elif cls is list:
                _extend(pending, value)
    return found


def _extend(pending: list[Node], items: list[Any]) -> None:
    """List items: wrapped nodes, or lists (``List *`` of lists, as ``{"List": …}``)."""
    stack = [items]
    while stack:
        for item in stack.pop():
            if type(item) is dict:
                if _is_wrapped(item):
                    pending.append(_wrapped(item))
            elif type(item) is list:
                stack.append(item)


def fields_of(value: Any, kind: str) -> dict[str, Any] | None:
    """The fields of *value* (a wrapped node) if it is a *kind* node, else None."""
    if type(value) is dict and len(value) == 1:
        return value.get(kind)
    return None


def node_of(value: Any) -> Node | None:
    """*value* (a wrapped node) as a `Node`, or None if it is not one."""
    if type(value) is dict and _is_wrapped(value):
        return _wrapped(value)
    return None


def sval(value: Any) -> str:
    """The text of a wrapped ``String`` node (``""`` for anything else)."""
    fields = fields_of(value, "String")
    return "" if fields is None else str(fields.get("sval", ""))


def constant_value(fields: dict[str, Any]) -> tuple[str, Any] | None:
    """An ``A_Const``'s value as (value type, value): ``("String", "x")``, ``("Boolean",
    False)``, …; None for NULL."""
    if fields.get("isnull"):
        return None
    for field, kind in _CONST_VALUES.items():
        if field in fields:
            value = fields[field]
            zero: Any = "" if kind in ("String", "BitString", "Float") else 0
            raw = value.get(field, zero) if type(value) is dict else zero
            return kind, bool(raw) if kind == "Boolean" else raw
    return None


# Tokens of libpg_query's JSON (no whitespace in it, but allowed): ',' and ':' are skipped,
# the state (key or value) says what a string is.
_TOKEN = re.compile(
    r'[{}\[\]]|"[^"\\]*(?:\\.[^"\\]*)*"|-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][-+]?[0-9]+)?'
    r"|true|false|null",
    re.DOTALL,
)
_LITERALS = {"true": True, "false": False, "null": None}
_NO_KEY = object()


def _loads_deep(text: str) -> Any:
    """``json.loads(text)`` without recursion, for JSON nested deeper than Python's recursion
    limit lets ``json.loads`` go (libpg_query's well-formed output only)."""
    root: Any = None
    containers: list[Any] = []
    keys: list[Any] = []  # per open container: the dict's pending key (or _NO_KEY)

    def add(value: Any) -> None:
        nonlocal root
        if not containers:
            root = value
        elif type(containers[-1]) is list:
            containers[-1].append(value)
        else:
            containers[-1][keys[-1]] = value
            keys[-1] = _NO_KEY

    for match in _TOKEN.finditer(text):
        token = match.group()
        first = token[0]
        if first in "{[":
            container: Any = {} if first == "{" else []
            add(container)
            containers.append(container)
            keys.append(_NO_KEY)
        elif first in "}]":
            containers.pop()
            keys.pop()
        elif first == '"':
            value = json.loads(token) if "\\" in token else token[1:-1]
            if type(containers[-1]) is dict and keys[-1] is _NO_KEY:
                keys[-1] = value
            else:
                add(value)
        elif token in _LITERALS:
            add(_LITERALS[token])
        else:
            add(float(token) if "." in token or "e" in token or "E" in token else int(token))
    return root
