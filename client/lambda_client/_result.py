"""`Result`: the rows and command tag of one statement, decoded."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from lambda_client._proto.pgbroker.v1 import broker_pb2 as pb
from lambda_client.codec import decode_row

__all__ = ["Result", "results_of"]


@dataclass(frozen=True)
class Result:
    """The outcome of one statement: rows as tuples, column names, rows affected, tag.

    `rows_affected` is -1 when the command reports no count.
    """

    columns: tuple[str, ...]
    rows: list[tuple[Any, ...]]
    rows_affected: int
    command_tag: str
    type_oids: tuple[int, ...] = field(default=(), repr=False)

    @classmethod
    def from_proto(cls, result: pb.StatementResult) -> Result:
        # Once per statement of every call. The fields go into the instance's __dict__ at
        # once: a frozen dataclass' __init__ sets each through object.__setattr__, which cost
        # more than the decoding of a one-row result; the instance is the same (no
        # __post_init__). A statement without columns (UPDATE, INSERT: most of a batch's)
        # skips the loops.
        new = object.__new__(cls)
        columns, rows = result.columns, result.rows
        new.__dict__.update(
            columns=tuple([c.name for c in columns]) if columns else (),
            rows=[decode_row(row.values) for row in rows] if rows else [],
            rows_affected=result.rows_affected,
            command_tag=result.command_tag,
            type_oids=tuple([c.type_oid for c in columns]) if columns else (),
        )
        return new

    def __iter__(self) -> Iterator[tuple[Any, ...]]:
        return iter(self.rows)

    def __len__(self) -> int:
        return len(self.rows)

    def one(self) -> tuple[Any, ...]:
        """The only row; raise `LookupError` if there are none or several."""
        if len(self.rows) != 1:
            raise LookupError(f"expected exactly one row, got {len(self.rows)}")
        return self.rows[0]

    def one_or_none(self) -> tuple[Any, ...] | None:
        """The only row, or None if there are none; raise `LookupError` if there are several."""
        if len(self.rows) > 1:
            raise LookupError(f"expected at most one row, got {len(self.rows)}")
        return self.rows[0] if self.rows else None

    def scalar(self) -> Any:
        """The first column of the first row, or None if there are no rows."""
        return self.rows[0][0] if self.rows and self.rows[0] else None

    def dicts(self) -> list[dict[str, Any]]:
        """The rows as dicts keyed by column name (a later duplicate name wins)."""
        return [dict(zip(self.columns, row, strict=True)) for row in self.rows]


def results_of(response: pb.ExecuteResponse) -> list[Result]:
    """One `Result` per statement of *response*."""
    return [Result.from_proto(r) for r in response.results]
