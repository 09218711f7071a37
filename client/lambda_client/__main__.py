"""python -m lambda_client "SELECT …" [PARAM …] [--json]: one query by hand, as ``psql -c``.

Sends one statement (autocommit) through the broker a handler would reach, configured the
same way (``PGBROKER_URL``, ``PGBROKER_TLS*``, ``PGBROKER_AUTH``, ``PGBROKER_TOKEN``, …),
and prints the rows as a plain-text table, or with ``--json`` one JSON object
(``columns``, ``rows``, ``rows_affected``, ``command_tag``). Each PARAM is sent as text and
binds to ``$1``, ``$2``, … (cast in the SQL where the type matters: ``$1::int``); ``--null``
sends SQL NULL in place of a PARAM equal to ``\\N``.

Exit status: 0 on success; 1 when the call fails (the error's class and message on stderr,
which name the setting to fix); 2 for bad usage or a bad setting.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

__all__ = ["format_table", "main"]

NULL_MARK = "\\N"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m lambda_client",
        description="Send one SQL statement through a pgbroker broker and print the rows. "
        "Configured by the environment a handler uses: PGBROKER_URL (default "
        "127.0.0.1:50051), PGBROKER_TLS, PGBROKER_TLS_CA_FILE, PGBROKER_AUTH, PGBROKER_TOKEN.",
    )
    parser.add_argument("sql", help="one statement; $1, $2, … take the PARAMs")
    parser.add_argument("params", nargs="*", metavar="PARAM", help="sent as text")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument(
        "--null", action="store_true", help=f"a PARAM equal to {NULL_MARK} is sent as NULL"
    )
    parser.add_argument("--target", help="the broker (default PGBROKER_URL)")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds (default 10)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from lambda_client import BrokerClient, errors

    params: list[Any] = [None if args.null and p == NULL_MARK else p for p in args.params]
    try:
        client = BrokerClient(args.target, timeout=args.timeout)
    except (TypeError, ValueError) as exc:  # a bad target or auth setting, named
        print(f"lambda_client: {exc}", file=sys.stderr)
        return 2
    try:
        result = client.query(args.sql, params or None)
    except errors.Error as exc:
        print(f"lambda_client: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    finally:
        client.close()
    if args.json:
        print(json.dumps(_as_json(result), default=str))
    else:
        print(format_table(result.columns, result.rows, result.command_tag))
    return 0


def _as_json(result: Any) -> dict[str, Any]:
    return {
        "columns": list(result.columns),
        "rows": [list(row) for row in result.rows],
        "rows_affected": result.rows_affected,
        "command_tag": result.command_tag,
    }


def format_table(
    columns: Sequence[str], rows: Sequence[Sequence[Any]], command_tag: str = ""
) -> str:
    """*rows* under *columns* as psql's aligned format draws them, with a ``(N rows)`` line
    (or only *command_tag* for a statement without columns). NULL prints empty, as in psql."""
    if not columns:
        return command_tag
    cells = [[_cell(value) for value in row] for row in rows]
    widths = [max([len(name)] + [len(row[i]) for row in cells]) for i, name in enumerate(columns)]
    lines = [
        " | ".join(name.center(width) for name, width in zip(columns, widths, strict=True)),
        "-+-".join("-" * width for width in widths),
    ]
    lines += [
        " | ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True))
        for row in cells
    ]
    lines.append(f"({len(rows)} row{'' if len(rows) == 1 else 's'})")
    return "\n".join(line.rstrip() for line in lines)


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bytes):
        return "\\x" + value.hex()
    if isinstance(value, dict | list):
        return json.dumps(value, default=str)
    return str(value).replace("\n", "\\n")


if __name__ == "__main__":
    sys.exit(main())
