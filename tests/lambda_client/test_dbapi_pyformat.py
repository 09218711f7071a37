"""The %s / %(name)s translator of `lambda_client.dbapi` (no broker needed): psycopg's rules,
checked case by case and against Python's own ``%`` operator, which reads a query with
parameters exactly as psycopg does for the placeholders it accepts."""

from __future__ import annotations

import random
import re

import pytest

from lambda_client.dbapi import ProgrammingError
from lambda_client.dbapi._pyformat import bind, translate


@pytest.mark.parametrize(
    ("query", "params", "sql", "values"),
    [
        ("SELECT 1", None, "SELECT 1", []),
        ("SELECT '50%'", None, "SELECT '50%'", []),
        ("SELECT '%s'", None, "SELECT '%s'", []),  # untouched without parameters
        ("SELECT '100%%', %s", [1], "SELECT '100%', $1", [1]),
        ("SELECT $$a%%b$$, %s", [1], "SELECT $$a%b$$, $1", [1]),
        ("SELECT '%s'", [1], "SELECT '$1'", [1]),  # a %-format string: literals too
        ("SELECT %s, %s, %s", (1, 2, 3), "SELECT $1, $2, $3", [1, 2, 3]),
        ("SELECT %(a)s, %(b)s, %(a)s", {"a": 1, "b": 2}, "SELECT $1, $2, $1", [1, 2]),
        ("SELECT %(a b)s", {"a b": 1}, "SELECT $1", [1]),
        ("SELECT 1", {}, "SELECT 1", []),
        ("SELECT 1", {"extra": 1}, "SELECT 1", []),
        ("SELECT 1", [], "SELECT 1", []),
        ("SELECT '%%%%'", [], "SELECT '%%'", []),
        ("SELECT %s%%%s", ["a", "b"], "SELECT $1%$2", ["a", "b"]),
        ("SELECT 'é%%', %s", ["ü"], "SELECT 'é%', $1", ["ü"]),
    ],
)
def test_translation(query: str, params: object, sql: str, values: list[object]) -> None:
    assert bind(query, params) == (sql, values)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ("SELECT %d", "'%d' at position 7"),
        ("SELECT %b", "'%b' at position 7"),
        ("SELECT % s", "'% ' at position 7"),
        ("SELECT 1 %", "a '%' at the end"),
        ("SELECT 1 %\n", "at position 9"),
        ("SELECT %(a", "incomplete placeholder '%(a'"),
        ("SELECT %()s", "at position 7"),
        ("SELECT %(a)d", "'%(a)d'"),
        ("SELECT %(a)%", "'%(a)%'"),
        ("SELECT %s, %(a)s", "cannot be mixed"),
        ("SELECT %(a)s, %s", "cannot be mixed"),
    ],
)
def test_a_percent_that_is_no_placeholder_is_a_programming_error(query: str, message: str) -> None:
    with pytest.raises(ProgrammingError, match=message.replace("(", r"\(").replace(")", r"\)")):
        translate(query)


def test_parameters_must_be_a_sequence_or_a_mapping() -> None:
    for params in ("ab", b"ab", 5, {1, 2}):
        with pytest.raises(TypeError, match=r"sequence .* or a mapping"):
            bind("SELECT %s", params)  # type: ignore[arg-type]


def test_counts_and_names_are_checked() -> None:
    with pytest.raises(ProgrammingError, match="1 placeholder but 2 parameters"):
        bind("SELECT %s", [1, 2])
    with pytest.raises(ProgrammingError, match="0 placeholders but 1 parameter were"):
        bind("SELECT 1", [1])
    with pytest.raises(ProgrammingError, match="missing: a, c"):
        bind("SELECT %(a)s, %(b)s, %(c)s", {"b": 1})
    with pytest.raises(ProgrammingError, match="pass a mapping"):
        bind("SELECT %(a)s", [1])
    with pytest.raises(ProgrammingError, match="pass a sequence"):
        bind("SELECT %s", {"a": 1})


# No space, digit, "-", "+", "#", "." or "*": Python reads those as flags and widths (``% s``),
# which psycopg refuses.
ALPHABET = [
    "%",
    "%",
    "s",
    "(",
    ")",
    "a",
    "b",
    "'",
    "$",
    "x",
    "\n",
    "é",
    "%%",
    "%s",
    "%(a)s",
    "%(b)s",
]
NESTED_NAME = re.compile(r"%\([^)]*\(")  # Python allows %(a(b))s; psycopg does not


def test_translation_agrees_with_python_percent_formatting() -> None:
    """For random queries made of %, s, (, ), names and quotes: where Python's ``query %
    values`` accepts the query with only %s, %(name)s and %%, the translation is the same
    text with $n in place of the values; where Python refuses, or reads another conversion,
    so does the translator."""
    rng = random.Random(12)
    agreed = refused = 0
    for _ in range(20_000):
        query = "".join(rng.choice(ALPHABET) for _ in range(rng.randint(0, 12)))
        if NESTED_NAME.search(query):
            continue
        expected = _python_reading(query)
        if expected is None:
            with pytest.raises(ProgrammingError):
                translate(query)
            refused += 1
        else:
            assert translate(query) == expected, query
            agreed += 1
    assert agreed > 2000 and refused > 2000  # both branches well exercised


def _python_reading(query: str) -> tuple[str, int | tuple[str, ...]] | None:
    """What the translator must return for *query*, as Python's % operator reads it; None
    where Python refuses it, reads a conversion other than s, or mixes the styles."""
    for count in range(13):
        values = _Values(count)
        try:
            text = query % tuple(values.items)
        except (TypeError, ValueError):
            continue
        return None if values.bad else (text, count)
    named = _Values(0)
    try:
        text = query % named
    except (TypeError, ValueError, KeyError):
        return None
    if named.bad or not named.order:
        return None
    return text, tuple(named.order)


class _Values(dict):  # type: ignore[type-arg]
    """Values rendering as $1, $2, …: *count* positional ones, or any name (as a mapping,
    one $n per name in order of first use). A conversion other than s marks them bad."""

    def __init__(self, count: int) -> None:
        super().__init__()
        self.bad = False
        self.order: list[str] = []
        self.items = [_Value(n, self) for n in range(1, count + 1)]

    def __getitem__(self, name: str) -> _Value:
        if not name:
            self.bad = True
        if name not in self.order:
            self.order.append(name)
        return _Value(self.order.index(name) + 1, self)

    def __str__(self) -> str:  # an unnamed %s given a mapping formats the mapping itself
        self.bad = True
        return ""

    __repr__ = __str__


class _Value:
    """One placeholder's value: ``$n`` under %s; any other conversion marks its owner bad."""

    def __init__(self, n: int, owner: _Values) -> None:
        self.n = n
        self.owner = owner

    def __str__(self) -> str:
        return f"${self.n}"

    def _bad(self) -> int:
        self.owner.bad = True
        return 0

    def __int__(self) -> int:
        return self._bad()

    __index__ = __int__

    def __float__(self) -> float:
        return float(self._bad())

    def __repr__(self) -> str:
        self._bad()
        return ""
