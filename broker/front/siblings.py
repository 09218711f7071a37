"""With ``--workers N``: the broker's figures over all workers, whichever worker is asked.

A client's call reaches the worker the kernel chose for its connection, but a user reads
``GetStats`` (``python -m broker stats``, ``top``), ``ShowCallers`` and the EMF metrics as the
broker's. So each worker also serves its own figures on a private unix socket, ``<dir>/<index>
.sock`` in a directory the supervisor created with mode 0700 (no other user can connect, and
the socket carries no credentials); the worker that answers a call asks its siblings there and
combines the answers with its own (`combine`).

A sibling that does not answer within `ASK_TIMEOUT` (restarting, stuck) is left out: the
figures then say ``workers_answered`` < ``workers``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from typing import Any

import grpc

from lambda_client._proto.pgbroker.v1 import broker_pb2 as pb

__all__ = [
    "ASK_TIMEOUT",
    "PER_WORKER",
    "Siblings",
    "combine",
    "merge_callers",
    "socket_path",
]

log = logging.getLogger("pgbroker.workers")

# Seconds a worker waits for a sibling's figures (they come from memory: a healthy sibling
# answers in about a millisecond, even when busy it answers within its event loop's turn).
ASK_TIMEOUT = 1.0
# Seconds a sibling may take to reload (it may open or close connections).
RELOAD_TIMEOUT = 30.0
# Seconds a stopping worker keeps serving its figures for worker 0's last metrics period.
LINGER = 3 * ASK_TIMEOUT
_SERVICE = "pgbroker.internal.Worker"
_STATS = f"/{_SERVICE}/GetStats"
_CALLERS = f"/{_SERVICE}/ShowCallers"
_RELOAD = f"/{_SERVICE}/Reload"

# Figures that are the largest of the workers', not their sum: the oldest wait, the longest
# checkout or lease, whether any pool is paused, and (an approximation) the slowest worker's
# median lease (medians do not add up). ``workers`` is the same on every worker.
_MAXIMA = frozenset(
    {
        "maxwait",
        "maxwait_us",
        "pool_active_max_ms",
        "leases_max_ms",
        "leases_p50_ms",
        "pool_paused",
        "workers",
    }
)
# Per-target figures (``target.<name>.<key>``) by their last part: a replica's lag is the
# worst any worker measured, and it is in rotation only if it is on every worker.
_TARGET_MAXIMA = frozenset({"replica_lag_ms"})
_TARGET_MINIMA = frozenset({"in_rotation"})
# Which worker answered: meaningless for the sum; kept per worker in the breakdown.
_DROPPED = frozenset({"worker", "worker_pid"})
# The per-worker breakdown (``worker.<index>.<key>``) in the combined figures.
PER_WORKER = ("rpcs_num", "pool_active", "requests_waiting", "worker_pid")


def socket_path(directory: str, index: int) -> str:
    """The unix socket worker *index* serves its figures on."""
    return os.path.join(directory, f"{index}.sock")


def _rule(key: str) -> Callable[[Iterable[int]], int]:
    if key in _MAXIMA:
        return max
    last = key.rpartition(".")[2]
    if key.startswith("target.") and last in _TARGET_MAXIMA:
        return max
    if key.startswith("target.") and last in _TARGET_MINIMA:
        return min
    return sum


def combine(parts: Sequence[Mapping[str, int]]) -> dict[str, int]:
    """The broker's figures from each worker's (*parts*): per key, the sum (counters, and
    gauges such as ``pool_active`` or ``requests_waiting``), except the maxima and minima
    above; a key some worker lacks counts from the others. Plus ``workers_answered`` and
    ``worker.<index>.<key>`` for `PER_WORKER` of each part that says its index."""
    keys: dict[str, None] = {}
    for part in parts:
        keys.update(dict.fromkeys(part))
    combined = {
        key: int(_rule(key)(int(part[key]) for part in parts if key in part))
        for key in keys
        if key not in _DROPPED
    }
    combined["workers_answered"] = len(parts)
    for part in parts:
        if "worker" in part:
            prefix = f"worker.{int(part['worker'])}."
            combined.update({prefix + key: int(part[key]) for key in PER_WORKER if key in part})
    return combined


def merge_callers(replies: Sequence[pb.ShowCallersResponse], limit: int) -> pb.ShowCallersResponse:
    """One ShowCallers answer from each worker's: a caller's in-flight and waiting requests
    added up over the workers, busiest first; the longest-held leases of all of them."""
    callers: dict[str, list[int]] = {}
    for reply in replies:
        for load in reply.callers:
            figures = callers.setdefault(load.caller, [0, 0])
            figures[0] += load.in_flight
            figures[1] += load.waiting
    merged = pb.ShowCallersResponse()
    busiest = sorted(callers.items(), key=lambda item: (-item[1][0], item[0]))[:limit]
    for caller, (in_flight, waiting) in busiest:
        merged.callers.add(caller=caller, in_flight=in_flight, waiting=waiting)
    leases = [lease for reply in replies for lease in reply.leases]
    merged.leases.extend(sorted(leases, key=lambda lease: -lease.held_ms)[:limit])
    return merged


class Siblings:
    """Worker *index* of *workers*: serves its own figures (*stats*, *callers*) on its socket in
    *directory*, and gathers its siblings'."""

    def __init__(
        self,
        directory: str,
        index: int,
        workers: int,
        stats: Callable[[], dict[str, int]],
        callers: Callable[[pb.ShowCallersRequest], Awaitable[pb.ShowCallersResponse]],
        reload: Callable[[dict[str, str]], Awaitable[str]] | None = None,
    ) -> None:
        self.directory = directory
        self.index = index
        self.workers = workers
        self.stats = stats
        self.callers = callers
        # A reload with key=value overrides, as this worker does it; its message, or it raises
        # with the reason (the overrides cannot travel in the signal the supervisor forwards).
        self.reload = reload
        self._server: grpc.aio.Server | None = None
        self._channels: dict[int, grpc.aio.Channel] = {}

    async def start(self) -> None:
        """Serve this worker's figures on its socket (a stale one of a previous run of this
        worker is replaced)."""
        path = socket_path(self.directory, self.index)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        server = grpc.aio.server()
        server.add_generic_rpc_handlers((self._handler(),))
        if server.add_insecure_port(f"unix:{path}") == 0:
            raise RuntimeError(f"cannot serve the worker's figures on {path}")
        await server.start()
        self._server = server

    def _handler(self) -> grpc.GenericRpcHandler:
        async def stats(request: pb.GetStatsRequest, context: Any) -> pb.GetStatsResponse:
            return pb.GetStatsResponse(stats=self.stats())

        async def callers(request: pb.ShowCallersRequest, context: Any) -> pb.ShowCallersResponse:
            return await self.callers(request)

        async def reload(request: pb.ReloadRequest, context: Any) -> pb.AdminReply:
            if self.reload is None:
                await context.abort(grpc.StatusCode.UNIMPLEMENTED, "no reload here")
            assert self.reload is not None
            try:
                return pb.AdminReply(message=await self.reload(dict(request.overrides)))
            except Exception as exc:  # its reason goes back to the worker that was asked
                await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
                raise

        return grpc.method_handlers_generic_handler(
            _SERVICE,
            {
                "GetStats": grpc.unary_unary_rpc_method_handler(
                    stats,
                    request_deserializer=pb.GetStatsRequest.FromString,
                    response_serializer=pb.GetStatsResponse.SerializeToString,
                ),
                "ShowCallers": grpc.unary_unary_rpc_method_handler(
                    callers,
                    request_deserializer=pb.ShowCallersRequest.FromString,
                    response_serializer=pb.ShowCallersResponse.SerializeToString,
                ),
                "Reload": grpc.unary_unary_rpc_method_handler(
                    reload,
                    request_deserializer=pb.ReloadRequest.FromString,
                    response_serializer=pb.AdminReply.SerializeToString,
                ),
            },
        )

    async def stop(self) -> None:
        """Stop serving this worker's figures; its socket is removed (`linger` waits for
        that)."""
        for channel in self._channels.values():
            await channel.close()
        self._channels.clear()
        if self._server is not None:
            await self._server.stop(0)
            self._server = None
            with contextlib.suppress(FileNotFoundError):
                os.unlink(socket_path(self.directory, self.index))

    async def linger(self, index: int, timeout: float = LINGER) -> None:
        """While stopping: wait (at most *timeout* seconds) until worker *index* has stopped
        serving its figures, so its last look at this worker's still finds them (worker 0
        writes the last EMF period of every worker while they all drain)."""
        deadline = time.monotonic() + timeout
        while os.path.exists(socket_path(self.directory, index)) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)

    def _channel(self, index: int) -> grpc.aio.Channel:
        channel = self._channels.get(index)
        if channel is None:
            target = f"unix:{socket_path(self.directory, index)}"
            channel = self._channels[index] = grpc.aio.insecure_channel(target)
        return channel

    async def _ask(self, index: int, method: str, request: Any, reply_type: Any) -> Any | None:
        """Sibling *index*'s answer, or None if it gave none in time."""
        call = self._channel(index).unary_unary(
            method,
            request_serializer=type(request).SerializeToString,
            response_deserializer=reply_type.FromString,
        )
        try:
            return await call(request, timeout=ASK_TIMEOUT)
        except grpc.RpcError as exc:
            log.debug("worker %d did not give its figures: %s", index, exc.code())
            return None

    async def _gather(self, method: str, request: Any, reply_type: Any) -> list[Any]:
        others = [index for index in range(self.workers) if index != self.index]
        replies = await asyncio.gather(
            *(self._ask(index, method, request, reply_type) for index in others)
        )
        return [reply for reply in replies if reply is not None]

    async def parts(self) -> list[dict[str, int]]:
        """Each answering worker's figures, this worker's first."""
        replies = await self._gather(_STATS, pb.GetStatsRequest(), pb.GetStatsResponse)
        return [self.stats(), *(dict(reply.stats) for reply in replies)]

    async def get_stats(self) -> dict[str, int]:
        """The broker's figures: `combine` over the workers that answered."""
        return combine(await self.parts())

    async def show_callers(
        self, request: pb.ShowCallersRequest, limit: int
    ) -> pb.ShowCallersResponse:
        """ShowCallers over the workers that answered (`merge_callers`)."""
        own = await self.callers(request)
        replies = await self._gather(_CALLERS, request, pb.ShowCallersResponse)
        return merge_callers([own, *replies], limit)

    async def reload_others(self, overrides: Mapping[str, str]) -> list[str]:
        """Reload every other worker with *overrides*; what went wrong, one line per worker
        that did not reload ([] when all did)."""
        request = pb.ReloadRequest(overrides=dict(overrides))
        others = [index for index in range(self.workers) if index != self.index]
        outcomes = await asyncio.gather(*(self._reload_one(index, request) for index in others))
        return [problem for problem in outcomes if problem]

    async def _reload_one(self, index: int, request: pb.ReloadRequest) -> str:
        call = self._channel(index).unary_unary(
            _RELOAD,
            request_serializer=pb.ReloadRequest.SerializeToString,
            response_deserializer=pb.AdminReply.FromString,
        )
        try:
            await call(request, timeout=RELOAD_TIMEOUT)
        except grpc.RpcError as exc:
            return f"worker {index}: {exc.details() or exc.code().name}"
        return ""
