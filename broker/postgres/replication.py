"""What the broker asks Postgres about streaming replication (blocking; no asyncio here).

* `wal_position`: the WAL position that covers a commit just made, read behind its COMMIT
  in the same flush (`POSITION_SQL`): ``pg_current_wal_insert_lsn()``, not
  ``pg_current_wal_lsn()``, because with ``synchronous_commit = off`` the write position may
  not yet include the commit record; the insert position always does.
* `PrimaryStatus` / `ReplicaStatus`: one query on each side per health check. The primary's
  *flush* position is compared with the replica's ``pg_last_wal_replay_lsn()``: both are
  record ends, so an idle replica that has replayed everything equals it exactly.
* `read_volatility`: ``pg_proc.provolatile`` of called functions, for ``PGBROKER_ROUTING=auto``.

Positions travel as 64-bit integers (``pg_lsn`` ``X/Y`` is ``X << 32 | Y``).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from broker.postgres.pg import PgConnection
from lambda_client import codec

__all__ = [
    "POSITION_SQL",
    "PrimaryStatus",
    "ReplicaStatus",
    "format_lsn",
    "parse_lsn",
    "read_volatility",
    "wal_position",
]

# Behind a write's COMMIT (simple protocol, same flush): one row, the insert position as text.
POSITION_SQL = "SELECT pg_catalog.pg_current_wal_insert_lsn()::text"
# WAL page layout (Postgres' XLOG_BLCKSZ and page headers): the insert position right after a
# page header is where the next record would start, while the last record ended at the page
# boundary itself (a replica's replay position then stops there).
WAL_PAGE = 8192
SHORT_PAGE_HEADER = 24
LONG_PAGE_HEADER = 40  # the first page of a WAL segment

_PRIMARY_SQL = (
    "SELECT pg_catalog.pg_is_in_recovery(), pg_catalog.pg_current_wal_flush_lsn()::text,"
    " pg_catalog.current_setting('wal_segment_size')"
)
_REPLICA_SQL = "SELECT pg_catalog.pg_is_in_recovery(), pg_catalog.pg_last_wal_replay_lsn()::text"
# Every overload of the named functions, in any schema: a name counts as volatile when one of
# its overloads is (or when it is not found), so the routing errs towards the primary.
_VOLATILITY_SQL = (
    "SELECT n.nspname::text, p.proname::text, p.provolatile::text"
    " FROM pg_catalog.pg_proc AS p JOIN pg_catalog.pg_namespace AS n ON n.oid = p.pronamespace"
    " WHERE p.proname = ANY($1::text[])"
)


def parse_lsn(text: str | None) -> int:
    """``16/B374D848`` as an integer; 0 for None or empty."""
    if not text:
        return 0
    high, _, low = text.partition("/")
    return (int(high, 16) << 32) | int(low, 16)


def format_lsn(lsn: int) -> str:
    """An integer position as Postgres writes it (``16/B374D848``)."""
    return f"{lsn >> 32:X}/{lsn & 0xFFFFFFFF:X}"


def commit_position(insert_lsn: int, segment_size: int = 16 * 1024 * 1024) -> int:
    """The position a replica must replay to have the commit whose insert position (read just
    after it) is *insert_lsn*: the page boundary when *insert_lsn* sits right behind a page
    header (nothing was written on that page yet), else *insert_lsn* itself."""
    offset = insert_lsn % WAL_PAGE
    if offset == SHORT_PAGE_HEADER:
        return insert_lsn - SHORT_PAGE_HEADER
    if offset == LONG_PAGE_HEADER and insert_lsn % segment_size == LONG_PAGE_HEADER:
        return insert_lsn - LONG_PAGE_HEADER
    return insert_lsn


def wal_position(rows: list[list[object]]) -> int:
    """The commit position from the rows of the SQL behind COMMIT, where `POSITION_SQL`
    came first (0 when its row is missing)."""
    if not rows or not rows[0]:
        return 0
    return commit_position(parse_lsn(str(rows[0][0])))


@dataclass(frozen=True)
class PrimaryStatus:
    """The primary's flush position and WAL segment size, read by one health check."""

    in_recovery: bool
    flush_lsn: int
    segment_size: int

    @classmethod
    def read(cls, conn: PgConnection) -> PrimaryStatus:
        row = codec.decode_row(conn.run(_PRIMARY_SQL).rows[0].values)
        in_recovery, flush, segment = row
        return cls(bool(in_recovery), parse_lsn(str(flush)), _bytes(str(segment)))


@dataclass(frozen=True)
class ReplicaStatus:
    """Whether the server is a standby, and how far it has replayed (0: unknown)."""

    in_recovery: bool
    replay_lsn: int

    @classmethod
    def read(cls, conn: PgConnection) -> ReplicaStatus:
        in_recovery, replay = codec.decode_row(conn.run(_REPLICA_SQL).rows[0].values)
        return cls(bool(in_recovery), parse_lsn(None if replay is None else str(replay)))


def read_volatility(conn: PgConnection, names: Iterable[str]) -> dict[str, bool]:
    """For each function name (``f`` or ``schema.f``), whether calling it may be volatile:
    true when an overload is volatile (``provolatile = 'v'``) or none exists. An unqualified
    name counts every schema's functions of that name (the search path is the caller's)."""
    wanted = sorted(set(names))
    bare = sorted({name.rpartition(".")[2] for name in wanted})
    result = conn.run(_VOLATILITY_SQL, [codec.encode(bare)])
    found: dict[str, list[tuple[str, bool]]] = {}
    for row in result.rows:
        schema, name, volatility = codec.decode_row(row.values)
        found.setdefault(str(name), []).append((str(schema), volatility == "v"))
    verdicts = {}
    for name in wanted:
        schema, _, bare_name = name.rpartition(".")
        overloads = [v for s, v in found.get(bare_name, []) if not schema or s == schema]
        verdicts[name] = not overloads or any(overloads)
    return verdicts


def _bytes(setting: str) -> int:
    """``16MB`` (current_setting's form) in bytes."""
    units = {"kB": 1024, "MB": 1024**2, "GB": 1024**3}
    for unit, scale in units.items():
        if setting.endswith(unit):
            return int(setting[: -len(unit)]) * scale
    return int(setting)
