"""A real broker (in process, port 0) for the security tests, with auth, TLS and limits set
through the same settings resolver the CLI uses."""

from __future__ import annotations

from typing import Any

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from support import InProcessServer, request, rows

from broker.config import load_settings
from lambda_client._proto.pgbroker.v1 import broker_pb2_grpc as pb_grpc

# request and rows come from tests/support.py; the security tests import them here.
__all__ = ["Broker", "error_info", "has_retry_info", "request", "rows"]


class Broker(InProcessServer):
    """A started `BrokerServer` with its event loop on a background thread."""

    def __init__(self, dsn: str, **flags: Any) -> None:
        settings = load_settings(
            {
                "database_url": dsn if "?" in dsn else dsn + "?sslmode=disable",
                "listen": "127.0.0.1:0",
                "pool_size": 2,
                "connect_timeout": 10,
                "shutdown_grace": 1,
                **flags,
            },
            environ={},
        )
        self._channels: list[grpc.Channel] = []
        super().__init__(settings, grace=1)

    def stub(self, credentials: grpc.ChannelCredentials | None = None, **options: Any) -> Any:
        """A Broker stub on a new channel (TLS when *credentials* are given)."""
        opts = list(options.items())
        if credentials is None:
            channel = grpc.insecure_channel(self.target, options=opts)
        else:
            channel = grpc.secure_channel(self.target, credentials, options=opts)
        self._channels.append(channel)
        return pb_grpc.BrokerStub(channel)

    def stats(self) -> dict[str, int]:
        return dict(self.server.service.get_stats())

    def close(self) -> None:
        for channel in self._channels:
            channel.close()
        super().close()

    def __enter__(self) -> Broker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def error_info(error: grpc.RpcError) -> error_details_pb2.ErrorInfo | None:
    """The pgbroker ErrorInfo detail of a failed call, if any."""
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    for detail in status.details if status is not None else ():
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return info
    return None


def has_retry_info(error: grpc.RpcError) -> bool:
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    return status is not None and any(
        d.Is(error_details_pb2.RetryInfo.DESCRIPTOR) for d in status.details
    )
