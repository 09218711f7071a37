"""The example handler (``examples/handler.py``) run as one Lambda container per thread.

The handler uses a module-level client, ``db``, as Lambda code should. The demo replaces it
once with `ContainerLocal`, which hands each thread (each simulated container) its own client:
a `DirectClient` with its own pg8000 connection in phase 1, a `BrokerClient` with its own gRPC
channel in phase 2. Everything else, the SQL, the transaction, the result handling, is the
handler's own code, called as Lambda calls it: ``handler(event, context)``.
"""

from __future__ import annotations

import contextlib
import random
import threading
import time
from collections.abc import Iterator
from typing import Any

import grpc

from demo.burst import Invocation
from demo.direct import DirectClient
from devtools.lambda_context import FakeLambdaContext
from examples import handler as example
from lambda_client import BrokerClient

__all__ = ["BrokerInvocation", "ContainerLocal", "DirectInvocation", "bind_handler", "event_for"]

ACCOUNTS = 100  # schema.sql funds accounts 1..100
LAMBDA_TIMEOUT = 30.0  # seconds, the function's configured timeout


class ContainerLocal:
    """Stands in for the handler's module-level ``db``: each thread sees the client it bound."""

    def __init__(self) -> None:
        self._local = threading.local()

    def bind(self, client: Any) -> None:
        self._local.client = client

    def __getattr__(self, name: str) -> Any:
        return getattr(self._local.client, name)


@contextlib.contextmanager
def bind_handler() -> Iterator[ContainerLocal]:
    """Point ``examples.handler.db`` at a fresh `ContainerLocal` while the block runs."""
    original = example.db
    local = ContainerLocal()
    example.db = local  # type: ignore[assignment]
    try:
        yield local
    finally:
        example.db = original


def event_for(index: int) -> dict[str, Any]:
    """The event of invocation *index*: a transfer of 1.00 between two accounts, the same
    for both phases (seeded by *index*)."""
    rng = random.Random(index)
    source, target = rng.sample(range(1, ACCOUNTS + 1), 2)
    return {"from": source, "to": target, "amount": "1.00"}


def _invoke(local: ContainerLocal, client: Any, index: int) -> None:
    local.bind(client)
    context = FakeLambdaContext(remaining=LAMBDA_TIMEOUT, function_name="pgbroker-demo")
    response = example.handler(event_for(index), context)
    if not response.get("transfer_id"):
        raise RuntimeError(f"handler returned no transfer id: {response!r}")


class DirectInvocation(Invocation):
    """A container that connects to Postgres itself (phase 1)."""

    def __init__(self, index: int, local: ContainerLocal, dsn: str) -> None:
        self.index = index
        self.local = local
        self.client = DirectClient(dsn)

    def invoke(self) -> float | None:
        _invoke(self.local, self.client, self.index)
        return self.client.connected_at

    def close(self) -> None:
        self.client.close()


class _Timing(grpc.UnaryUnaryClientInterceptor):  # type: ignore[misc]
    """Keeps the broker's timing of the last ``Execute`` (``wait_us``, ``run_us``) and when
    its answer arrived; observes only, the call and its errors pass through unchanged."""

    def __init__(self) -> None:
        self.last: tuple[float, int, int] | None = None

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        outcome = continuation(details, request)
        with contextlib.suppress(Exception):
            response = outcome.result()
            if hasattr(response, "run_us"):
                self.last = (time.monotonic(), response.wait_us, response.run_us)
        return outcome


class TimedBrokerClient(BrokerClient):
    """`BrokerClient` whose channel also records the broker's per-call timing (`timing`).

    The client does not hand ``ExecuteResponse.wait_us``/``run_us`` to its caller, so the demo
    reads them with a client interceptor on the channel the client builds.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.timing = _Timing()

    def _new_channel(self) -> grpc.Channel:
        return grpc.intercept_channel(super()._new_channel(), self.timing)


class BrokerInvocation(Invocation):
    """A container with its own `BrokerClient` and so its own channel (phase 2)."""

    def __init__(self, index: int, local: ContainerLocal, target: str) -> None:
        self.index = index
        self.local = local
        # gRPC shares one TCP connection among identical channels of a process unless told
        # not to; separate containers have separate connections.
        self.client = TimedBrokerClient(
            target, tls=False, options=[("grpc.use_local_subchannel_pool", 1)]
        )
        self.queue_wait: float | None = None

    def invoke(self) -> float | None:
        """Run the handler; return when the broker began its transaction (the answer's
        arrival less the broker's ``run_us``), and keep the broker's queue wait."""
        _invoke(self.local, self.client, self.index)
        if self.client.timing.last is None:
            return None
        arrived, wait_us, run_us = self.client.timing.last
        self.queue_wait = wait_us / 1e6
        return arrived - run_us / 1e6

    def close(self) -> None:
        self.client.close()
