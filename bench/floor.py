"""The floor competitor: the broker's own gRPC stack with nothing behind it.

``python -m bench.floor`` serves the Broker service on ``127.0.0.1:0`` exactly as
`broker.front.server.BrokerServer` builds it — ``grpc.aio`` on the same event loop (the
``event_loop`` setting), the same channel options (`broker.front.server.grpc_options` of the
default settings), the Broker's handlers wrapped once by `broker.security.gate.AuthGate`
(``PGBROKER_AUTH=none``, as the bench runs the broker),
``grpc.health.v1`` and Python's default GIL switch interval — but its ``Execute`` returns a canned
one-row reply without touching Postgres. The broker's CPU per request divided by this
server's, under the same load (`bench.harness`), is how far the broker is from what its own
stack allows (issue 14).

It prints one JSON line ``{"event": "listening", "port": N}`` and serves until SIGTERM/SIGINT.
"""

from __future__ import annotations

import asyncio
import json
import signal
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from broker.config import load_settings
from broker.front.server import SERVICE_NAME, broker_method_handlers, grpc_options, run
from broker.security.gate import AuthGate
from broker.security.identity import NoAuth
from lambda_client._proto.pgbroker.v1 import broker_pb2 as pb
from lambda_client._proto.pgbroker.v1 import broker_pb2_grpc as pb_grpc

# What the broker answers to W1's point select: one int column, one row.
CANNED_REPLY = pb.ExecuteResponse(
    results=[
        pb.StatementResult(
            columns=[pb.Column(name="abalance", type_oid=23)],
            rows=[pb.Row(values=[pb.Value(int64=0)])],
            rows_affected=1,
            command_tag="SELECT 1",
        )
    ],
    wait_us=1,
    run_us=1,
)


class FloorService(pb_grpc.BrokerServicer):
    """``Execute`` answers every request with the same one-row reply."""

    async def Execute(self, request: pb.ExecuteRequest, context: Any) -> pb.ExecuteResponse:
        return CANNED_REPLY

    async def GetStats(self, request: Any, context: Any) -> pb.GetStatsResponse:
        return pb.GetStatsResponse()

    def Stream(self, request: Any, context: Any) -> Any:
        raise NotImplementedError("the floor serves Execute only")

    def Transact(self, request_iterator: Any, context: Any) -> Any:
        raise NotImplementedError("the floor serves Execute only")


SETTINGS = load_settings({"database_url": "postgresql://floor@127.0.0.1/floor"}, {})


async def serve(service: pb_grpc.BrokerServicer | None = None) -> None:
    """Serve *service* (`FloorService` by default) on the broker's stack until a signal."""
    settings = SETTINGS
    server = grpc.aio.server(options=grpc_options(settings))
    handlers = broker_method_handlers(service or FloorService())
    AuthGate(NoAuth()).add_service(server, SERVICE_NAME, handlers)
    checks = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(checks, server)
    for name in ("", SERVICE_NAME):
        await checks.set(name, health_pb2.HealthCheckResponse.SERVING)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(json.dumps({"event": "listening", "port": port}), flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(1)


if __name__ == "__main__":
    run(SETTINGS, serve())
