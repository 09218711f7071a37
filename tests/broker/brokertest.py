"""Helpers for the broker's tests: an in-process broker on port 0, requests, polling."""

from __future__ import annotations

from typing import Any

import grpc
from support import InProcessServer, request, rows, wait_until

from broker.config import Settings
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


class InProcessBroker(InProcessServer):
    """A real BrokerServer on port 0 with its pool filled, and a Broker stub on one channel."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings, grace=2)
        try:
            # start() returns once one connection is open; tests count on the whole pool.
            wait_until(lambda: self.server.pool.filled, timeout=30, what="the pool to fill")
        except BaseException:
            super().close()
            raise
        self.channel = grpc.insecure_channel(self.target)
        self.stub = pb_grpc.BrokerStub(self.channel)

    def stats(self) -> dict[str, int]:
        return dict(self.stub.GetStats(pb.GetStatsRequest(), timeout=5).stats)

    def execute(self, req: pb.ExecuteRequest, timeout: float = 10, **kw: Any) -> pb.ExecuteResponse:
        return self.stub.Execute(req, timeout=timeout, **kw)

    def close(self) -> None:
        self.channel.close()
        super().close()
