"""What a pipelined call writes to Postgres (`broker.postgres.pg`), read off the real socket."""

from __future__ import annotations

import struct
import uuid
from typing import Any

from broker.flow.batch import Batch, run_transaction
from broker.postgres import keys
from broker.postgres.pg import PgConnection
from broker.sql.plan import plan_request
from lambda_client._proto.pgbroker.v1 import broker_pb2 as pb


class _RecordingSocket:
    """The connection's buffered socket, keeping what is written to it."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self.written = bytearray()

    def write(self, data: bytes) -> int:
        self.written += data
        return int(self._inner.write(data))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


def _message_types(data: bytes) -> list[str]:
    """The frontend messages in *data*, by their type byte ("B" Bind, "H" Flush, "S" Sync …)."""
    types, at = [], 0
    while at < len(data):
        (length,) = struct.unpack_from("!i", data, at + 1)
        types.append(chr(data[at]))
        at += 1 + length
    return types


def test_a_keyed_batch_sends_no_flush_only_syncs(keyed_pg: PgConnection, table: str) -> None:
    """Postgres answers a Flush by sending what it has at once: a Flush behind each Bind
    (pg8000's) made it send every BindComplete alone, two send() calls per statement."""
    conn = keyed_pg
    conn.execute_simple(f"CREATE TABLE {table} (note text)")
    sqls = [f"INSERT INTO {table} VALUES ($1)", f"SELECT count(*) FROM {table}"]
    plan = plan_request(sqls)

    def batch() -> Batch:
        statements = [pb.Statement(sql=sqls[0], params=[pb.Value(text="x")])]
        statements.append(pb.Statement(sql=sqls[1]))
        claim = keys.KeyClaim("wire", f"wire-{uuid.uuid4()}", b"\x01", 60.0)
        return Batch(statements=statements, plan=plan, claim=claim)

    for _ in range(2):  # unnamed, then prepared: cached from now on
        run_transaction(conn, batch(), None, 30)
    sock = _RecordingSocket(conn._core._sock)
    conn._core._sock = sock
    run_transaction(conn, batch(), None, 30)
    types = _message_types(bytes(sock.written))
    assert "H" not in types, types
    # BEGIN and the claim's two statements; the batch's two; the store and COMMIT; the reset
    # and the probe: all prepared, no simple query; one Sync per group and per statement.
    assert types.count("B") == 3 + 2 + 2 + 2, types
    assert types.count("Q") == 0, types
    assert types.count("S") == 1 + 2 + 1 + 1, types
