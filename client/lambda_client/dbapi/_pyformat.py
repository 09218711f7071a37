"""``%s`` and ``%(name)s`` placeholders (PEP 249 "format" and "pyformat") to Postgres' ``$n``.

The rules are psycopg's, which Django, SQLAlchemy and the dbapi20 suite rely on:

* with parameters (a sequence or a mapping, even empty) the query is a %-format string:
  ``%s`` and ``%(name)s`` are placeholders and ``%%`` is a literal ``%`` everywhere, inside
  string literals and dollar-quoted bodies too, exactly as Python's ``query % params`` reads
  it;
* without parameters (None) the query is sent untouched (``'50%'`` stays as written);
* a ``%(name)s`` used twice is one ``$n`` (the value is sent once);
* a ``%`` followed by anything but ``s``, ``(`` or ``%``, a ``%`` at the end, an unclosed
  ``%(``, and ``%s`` mixed with ``%(name)s`` raise `ProgrammingError` naming the spot.

No maintained library does this within the client's dependencies (grpcio and protobuf only):
psycopg's ``psycopg/_queries.py`` is the reference but psycopg is not a dependency, pg8000's
converter leaves ``%%`` inside string literals alone (not psycopg's rule), and ``sqlparams``
would be a new dependency. The translation is cached per query text, so an ``executemany``
or a warm Lambda parses each query once.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping, Sequence
from typing import Any

from lambda_client.errors import ProgrammingError

__all__ = ["Translated", "bind", "translate"]

# A % and what follows it: an optional (name), then one character (or none at the end).
_PERCENT = re.compile(r"%(?:\((?P<name>[^)]*)\))?(?P<conv>.?)", re.DOTALL)

# The query with $n placeholders, and what fills them: a count (%s) or names in $n order.
Translated = tuple[str, int | tuple[str, ...]]


@functools.lru_cache(maxsize=1024)
def translate(query: str) -> Translated:
    """*query*'s placeholders as ``$1 … $n``, and how many positional values (an int) or which
    names, in ``$n`` order (a tuple), fill them. Raise `ProgrammingError` for a ``%`` that is
    neither a placeholder nor ``%%``, or placeholders of both styles."""
    out: list[str] = []
    names: dict[str, int] = {}
    positional = 0
    last = 0
    for match in _PERCENT.finditer(query):
        out.append(query[last : match.start()])
        last = match.end()
        name, conv = match.group("name"), match.group("conv")
        if conv == "%" and name is None:
            out.append("%")
            continue
        if conv != "s" or name == "":
            raise ProgrammingError(_bad_percent(query, match.start(), match.group(0)))
        if name is None:
            positional += 1
            out.append(f"${positional}")
        else:
            out.append(f"${names.setdefault(name, len(names) + 1)}")
        if positional and names:
            raise ProgrammingError(
                "positional (%s) and named (%(name)s) placeholders cannot be mixed in one query"
            )
    out.append(query[last:])
    return "".join(out), tuple(names) if names else positional


def _bad_percent(query: str, at: int, found: str) -> str:
    """The message for a ``%`` at *at* that is not a placeholder."""
    if found == "%":
        what = "a '%' at the end of the query"
    elif found.startswith("%(") and not found.endswith("s"):
        snippet = query[at : at + 20].split()[0] if query[at:].strip() else found
        what = f"an incomplete placeholder {snippet!r}"
    else:
        what = f"{found!r}"
    return (
        f"{what} at position {at}: only %s and %(name)s are placeholders; with parameters "
        "the query is a %-format string, so write '%%' for a literal '%' (also inside "
        "string literals)"
    )


def bind(query: str, params: Sequence[Any] | Mapping[str, Any] | None) -> tuple[str, list[Any]]:
    """The SQL to send for *query* and *params* and the values for ``$1 … $n``.

    Without *params* (None) the query goes untouched, with no values. Raise `TypeError` if
    *params* is neither a sequence nor a mapping, and `ProgrammingError` for a bad ``%``, a
    wrong number of values, a missing name, or a mapping for ``%s`` (a sequence for
    ``%(name)s``)."""
    if params is None:
        return query, []
    if isinstance(params, str | bytes | bytearray) or not isinstance(params, Sequence | Mapping):
        raise TypeError(
            "query parameters must be a sequence (for %s) or a mapping (for %(name)s), "
            f"not {type(params).__name__}"
        )
    sql, fill = translate(query)
    if isinstance(fill, tuple):
        if not isinstance(params, Mapping):
            raise ProgrammingError(
                "the query has named placeholders (%(name)s): pass a mapping of parameters"
            )
        missing = [name for name in fill if name not in params]
        if missing:
            raise ProgrammingError(f"query parameter missing: {', '.join(missing)}")
        return sql, [params[name] for name in fill]
    if isinstance(params, Mapping):
        if fill == 0:  # no placeholders: the names are unused, as psycopg allows
            return sql, []
        raise ProgrammingError(
            "the query has positional placeholders (%s): pass a sequence of parameters"
        )
    if len(params) != fill:
        raise ProgrammingError(
            f"the query has {fill} placeholder{'' if fill == 1 else 's'} but "
            f"{len(params)} parameter{'' if len(params) == 1 else 's'} were passed"
        )
    return sql, list(params)
