"""Helpers for the broker's tests: an in-process broker on port 0, requests, polling."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from typing import Any

import grpc
from support import request, rows, wait_until

from broker.config import Settings
from broker.server import BrokerServer
from lambda_client._proto.pgbroker.v1 import broker_pb2 as pb
from lambda_client._proto.pgbroker.v1 import broker_pb2_grpc as pb_grpc

# request, rows and wait_until come from tests/support.py; the broker tests import them here.
__all__ = ["InProcessBroker", "details_of", "request", "rows", "wait_until"]


def details_of(error: grpc.RpcError) -> dict[str, Any]:
    """The google.rpc.Status details of a failed call, by message type name."""
    from google.rpc import error_details_pb2
    from grpc_status import rpc_status

    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    out: dict[str, Any] = {}
    if status is None:
        return out
    for detail in status.details:
        for cls in (pb.DatabaseError, error_details_pb2.ErrorInfo, error_details_pb2.RetryInfo):
            if detail.Is(cls.DESCRIPTOR):
                message = cls()
                detail.Unpack(message)
                out[cls.DESCRIPTOR.name] = message
    return out


class InProcessBroker:
    """A real BrokerServer on port 0, its event loop on a background thread."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server = BrokerServer(settings)
        self.port = self.call(self.server.start(), timeout=30)
        # start() returns once one connection is open; tests count on the whole pool.
        wait_until(lambda: self.server.pool.filled, timeout=30, what="the pool to fill")
        self.target = f"127.0.0.1:{self.port}"
        self.channel = grpc.insecure_channel(self.target)
        self.stub = pb_grpc.BrokerStub(self.channel)

    def call(self, coro: Any, timeout: float = 30) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stats(self) -> dict[str, int]:
        return dict(self.stub.GetStats(pb.GetStatsRequest(), timeout=5).stats)

    def execute(self, req: pb.ExecuteRequest, timeout: float = 10, **kw: Any) -> pb.ExecuteResponse:
        return self.stub.Execute(req, timeout=timeout, **kw)

    def close(self) -> None:
        self.channel.close()
        with contextlib.suppress(Exception):
            self.call(self.server.stop(grace=2), timeout=30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()
