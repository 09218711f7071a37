"""`BrokerProcess`: ``python -m broker run`` as a child process on a free loopback port.

Started in its own session so a Ctrl-C in the terminal reaches the demo, which then stops the
broker itself (SIGTERM by pid, SIGKILL if it has not exited within *grace* seconds).
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Mapping
from typing import TextIO

__all__ = ["BrokerProcess"]

# The broker's startup line names the address it listens on, e.g. "listening on 127.0.0.1:43123".
_ADDRESS = re.compile(r"(127\.0\.0\.1|localhost|\[::1\]|0\.0\.0\.0):(\d{2,5})\b")
_LISTENING = re.compile(r"listen|serving", re.IGNORECASE)


class BrokerProcess:
    """A broker serving *database_url* with *pool_size* connections on *listen*; `start`
    returns once it has printed its port, or raises RuntimeError with its output. Its output
    is kept (the last 200 lines) and also written to *echo* if given. ``PGBROKER_AUTH``
    defaults to ``none`` (loopback only); *env* overrides the environment."""

    def __init__(
        self,
        database_url: str,
        *,
        pool_size: int | None = None,
        listen: str = "127.0.0.1:0",
        extra_args: tuple[str, ...] = (),
        env: Mapping[str, str] | None = None,
        echo: TextIO | None = None,
        start_timeout: float = 30.0,
    ) -> None:
        self.database_url = database_url
        self.pool_size = pool_size
        self.listen = listen
        self.echo = echo
        self.extra_args = extra_args
        self.env = dict(env or {})
        self.start_timeout = start_timeout
        self.proc: subprocess.Popen[str] | None = None
        self.port: int | None = None
        self.output: deque[str] = deque(maxlen=200)
        self._port_seen = threading.Event()

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def start(self) -> BrokerProcess:
        env = {"PGBROKER_AUTH": "none", **os.environ, **self.env}
        # The URL goes through the environment, not argv, so `ps` does not show a password.
        env["PGBROKER_DATABASE_URL"] = self.database_url
        argv = [sys.executable, "-m", "broker", "run", "--listen", self.listen]
        if self.pool_size is not None:
            argv += ["--pool-size", str(self.pool_size)]
        argv += self.extra_args
        self.proc = subprocess.Popen(
            argv,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            text=True,
            env=env,
            start_new_session=True,
        )
        threading.Thread(target=self._drain, name="broker-output", daemon=True).start()
        deadline = time.monotonic() + self.start_timeout
        while not self._port_seen.wait(0.05):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(
                    "the broker did not start:\n" + "\n".join(list(self.output)[-30:])
                )
        return self

    def wait_serving(self, timeout: float = 30.0) -> bool:
        """Poll the gRPC health service until the broker reports SERVING (its pool is
        filled); False if it did not within *timeout* seconds."""
        import grpc
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        deadline = time.monotonic() + timeout
        with grpc.insecure_channel(self.target) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while time.monotonic() < deadline:
                with contextlib.suppress(grpc.RpcError):
                    reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=2)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return True
                time.sleep(0.1)
        return False

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM the broker by pid, then SIGKILL after *grace* seconds."""
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)
            proc.wait(5)

    def __enter__(self) -> BrokerProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _drain(self) -> None:
        proc = self.proc
        if proc is None or proc.stdout is None:
            return
        for line in proc.stdout:
            self.output.append(line.rstrip())
            if self.echo is not None:
                self.echo.write(line)
                self.echo.flush()
            match = _ADDRESS.search(line) if _LISTENING.search(line) else None
            if self.port is None and match and int(match[2]) != 0:
                self.port = int(match[2])
                self._port_seen.set()
