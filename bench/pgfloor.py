"""The floor with Postgres: the broker's gRPC stack and a minimal round trip to Postgres.

``python -m bench.pgfloor --dsn URL`` serves the Broker service as `bench.floor` does (the same
``grpc.aio`` server, options, `AuthGate` and event loop), but its ``Execute`` answers W1's point
select from Postgres with a minimal round trip: a pool of raw connections
(trust authentication), the statement parsed once per connection, and per request one
pre-encoded Bind + Execute + Sync written and the reply read until ReadyForQuery, its one cell
picked out of the DataRow. No session SQL, no checks, no pg8000, no greenlet.

So its CPU per W1 request is what *any* broker on this stack pays to answer from Postgres:
whatever a broker's own work (the session reset, parsing, limits, keys) costs comes on top.
Issue 14 measures the broker against `bench.floor`; this tells how much of the gap to that
floor is the round trip itself (`docs/performance.md`, "The floor with Postgres").

It prints one JSON line ``{"event": "listening", "port": N}`` and serves until SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import struct
from typing import Any
from urllib.parse import urlsplit

from bench import floor
from bench.floor import CANNED_REPLY, SETTINGS, FloorService
from bench.workloads import W1_SQL
from broker.front.server import run
from broker.postgres.pg import EXECUTE_MSG, SYNC_MSG, bind_message
from lambda_client._proto.pgbroker.v1 import broker_pb2 as pb

_LENGTH = struct.Struct("!i")
_ERROR, _READY = ord("E"), ord("Z")
_EXECUTE_SYNC = EXECUTE_MSG + SYNC_MSG


def _message(kind: bytes, body: bytes) -> bytes:
    return kind + _LENGTH.pack(len(body) + 4) + body


def _bind_execute(aid: int) -> bytes:
    """Bind the statement ``w1`` to *aid* (text), Execute it, Sync: as the broker writes them."""
    return bind_message(b"w1\0", (str(aid),), "ascii") + _EXECUTE_SYNC


class _Connection:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    async def until_ready(self) -> bytes:
        """Read until a ReadyForQuery; return every message read; raise on an ErrorResponse."""
        data, at = b"", 0
        while True:
            chunk = await self.reader.read(65536)
            if not chunk:
                raise ConnectionError("Postgres closed the connection")
            data += chunk
            while at + 5 <= len(data):  # walk the whole messages read so far
                kind = data[at]
                (length,) = _LENGTH.unpack_from(data, at + 1)
                if at + 1 + length > len(data):
                    break
                if kind == _ERROR:
                    raise RuntimeError(f"Postgres refused: {data[at : at + 1 + length]!r}")
                at += 1 + length
                if kind == _READY:
                    return data

    async def point_select(self, aid: int) -> int:
        self.writer.write(_bind_execute(aid))
        reply = await self.until_ready()
        # BindComplete (5 bytes), then DataRow: 'D', length, 1 column, its length, its text.
        if reply[5:6] != b"D":
            raise RuntimeError(f"no row for aid {aid}: {reply!r}")
        (size,) = _LENGTH.unpack_from(reply, 12)
        return int(reply[16 : 16 + size])


async def _connect(url: str) -> _Connection:
    parts = urlsplit(url)
    reader, writer = await asyncio.open_connection(parts.hostname, parts.port or 5432)
    user, database = (parts.username or "postgres"), (parts.path.lstrip("/") or "postgres")
    startup = _LENGTH.pack(196608) + b"user\0%s\0database\0%s\0\0" % (
        user.encode(),
        database.encode(),
    )
    writer.write(_LENGTH.pack(len(startup) + 4) + startup)
    conn = _Connection(reader, writer)
    await conn.until_ready()  # trust authentication: AuthenticationOk, parameters, ready
    parse = b"w1\0" + W1_SQL.encode() + b"\0" + struct.pack("!h", 0)
    writer.write(_message(b"P", parse) + SYNC_MSG)
    await conn.until_ready()
    return conn


class PgFloorService(FloorService):
    """``Execute`` runs W1's point select on a pooled raw connection."""

    def __init__(self, pool: asyncio.Queue[_Connection]) -> None:
        self.pool = pool

    async def Execute(self, request: pb.ExecuteRequest, context: Any) -> pb.ExecuteResponse:
        params = request.statements[0].params
        if not params:  # the load generator's connect: a keyed SELECT 1
            return CANNED_REPLY
        aid = params[0].int64
        conn = await self.pool.get()
        try:
            balance = await conn.point_select(aid)
        finally:
            self.pool.put_nowait(conn)
        return pb.ExecuteResponse(
            results=[
                pb.StatementResult(
                    columns=[pb.Column(name="abalance", type_oid=23)],
                    rows=[pb.Row(values=[pb.Value(int64=balance)])],
                    rows_affected=1,
                    command_tag="SELECT 1",
                )
            ]
        )


async def serve(url: str, pool_size: int) -> None:
    pool: asyncio.Queue[_Connection] = asyncio.Queue()
    for _ in range(pool_size):
        pool.put_nowait(await _connect(url))
    await floor.serve(PgFloorService(pool))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dsn", required=True, help="postgresql://USER@HOST:PORT/DB (trust)")
    parser.add_argument("--pool-size", type=int, default=20)
    args = parser.parse_args()
    run(SETTINGS, serve(args.dsn, args.pool_size))


if __name__ == "__main__":
    main()
