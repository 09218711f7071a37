"""A scripted stand-in broker: a real gRPC server whose `Execute` answers from a script.

For the client behaviours a real broker cannot be made to show on demand (UNKNOWN during
COMMIT, a bare transport UNAVAILABLE). Every request and its metadata is recorded.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent import futures
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from lambda_client._proto.pgbroker.v1 import broker_pb2 as pb
from lambda_client._proto.pgbroker.v1 import broker_pb2_grpc as pb_grpc

OK = pb.ExecuteResponse(
    results=[
        pb.StatementResult(
            columns=[pb.Column(name="one", type_oid=23)],
            rows=[pb.Row(values=[pb.Value(int64=1)])],
            rows_affected=1,
            command_tag="SELECT 1",
        )
    ]
)


def failure(
    code: grpc.StatusCode,
    message: str = "failed",
    *,
    sqlstate: str | None = None,
    statement_index: int = -1,
    retry_after: float | None = None,
    reason: str | None = None,
) -> status_pb2.Status:
    """A rich status like the broker's: DatabaseError, RetryInfo, ErrorInfo details."""
    details = []
    if sqlstate is not None:
        details.append(
            pb.DatabaseError(
                sqlstate=sqlstate,
                message=message,
                detail="the detail",
                hint="the hint",
                statement_index=statement_index,
            )
        )
    if retry_after is not None:
        delay = duration_pb2.Duration()
        delay.FromTimedelta(__import__("datetime").timedelta(seconds=retry_after))
        details.append(error_details_pb2.RetryInfo(retry_delay=delay))
    if reason is not None:
        details.append(error_details_pb2.ErrorInfo(domain="pgbroker", reason=reason))
    packed = []
    for detail in details:
        any_detail = any_pb2.Any()
        any_detail.Pack(detail)
        packed.append(any_detail)
    return status_pb2.Status(code=code.value[0], message=message, details=packed)


def bare(code: grpc.StatusCode, message: str = "transport failure") -> status_pb2.Status:
    """A status with no details, as gRPC itself reports a transport failure."""
    return status_pb2.Status(code=code.value[0], message=message)


@dataclass
class Script(pb_grpc.BrokerServicer):
    """Answers `Execute` with the next scripted status (OK once the script runs out)."""

    answers: list[status_pb2.Status | None] = field(default_factory=list)
    requests: list[pb.ExecuteRequest] = field(default_factory=list)
    metadata: list[dict[str, str]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    pause: float = 0.0  # seconds each answer waits before it is sent

    def Execute(self, request: pb.ExecuteRequest, context: Any) -> pb.ExecuteResponse:
        with self.lock:
            self.requests.append(request)
            self.metadata.append(dict(context.invocation_metadata()))
            answer = self.answers.pop(0) if self.answers else None
        time.sleep(self.pause)
        if answer is None or answer.code == code_pb2.OK:
            return OK
        context.abort_with_status(rpc_status.to_status(answer))
        raise AssertionError("unreachable")

    def GetStats(self, request: pb.GetStatsRequest, context: Any) -> pb.GetStatsResponse:
        return pb.GetStatsResponse(stats={"rpcs_num": len(self.requests)})


@contextmanager
def standin(*answers: status_pb2.Status | None, health: Any = None) -> Iterator[tuple[str, Script]]:
    """Serve a `Script` on 127.0.0.1 (free port), with *health* (a grpc_health
    ``HealthServicer``) if given; yield (target, script); stop on exit."""
    script = Script(answers=list(answers))
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    pb_grpc.add_BrokerServicer_to_server(script, server)
    if health is not None:
        from grpc_health.v1 import health_pb2_grpc

        health_pb2_grpc.add_HealthServicer_to_server(health, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"127.0.0.1:{port}", script
    finally:
        server.stop(None)
