"""Run ``python -m broker run`` as a child process, for client tests, the demo and benchmarks.

`BrokerProcess(database_url, listen="127.0.0.1:0").start()` starts a real broker, waits for its
``listening on`` log line and reads the bound port from it; `wait_serving()` then waits for its
pool (gRPC health SERVING). The database URL reaches the broker through
``PGBROKER_DATABASE_URL``, never argv, so ``ps`` does not show a password. Its stdout and stderr
(JSON log lines) go to a temporary file, readable with `log()` and echoed live to *echo* if
given. `stop()` sends SIGTERM to the process by pid (then SIGKILL), `kill()` sends SIGKILL at
once; `start()` again brings a broker back on the same port. The child runs in its own session,
so a Ctrl-C in the terminal reaches only the parent, which stops the broker itself.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import TextIO

__all__ = ["BrokerProcess"]

ROOT = Path(__file__).resolve().parent.parent

# Where to reach a broker that listens on every address.
_WILDCARD_TO_LOOPBACK = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}


class BrokerProcess:
    """One broker child process; *settings* become flags (``pool_size=1`` → ``--pool-size 1``),
    *extra_args* are passed after them as they are.

    The child gets no ``PGBROKER_*`` variable from this process' environment: only *env*
    (settings that have no flag) and ``PGBROKER_DATABASE_URL``. *log_level* must be INFO or
    DEBUG: the port is read from the INFO ``listening on`` line.
    """

    def __init__(
        self,
        database_url: str,
        *,
        listen: str = "127.0.0.1:0",
        log_level: str = "DEBUG",
        start_timeout: float = 30.0,
        env: dict[str, str] | None = None,
        extra_args: Sequence[str] = (),
        echo: TextIO | None = None,
        **settings: object,
    ) -> None:
        if log_level.upper() not in ("DEBUG", "INFO"):
            raise ValueError("log_level must be DEBUG or INFO (the port is read from the log)")
        self.database_url = database_url
        self.listen = listen
        self.log_level = log_level
        self.start_timeout = start_timeout
        self.settings = settings
        self.extra_args = tuple(extra_args)
        self.env = dict(env or {})  # extra PGBROKER_* variables (settings that have no flag)
        self.echo = echo
        self.host = listen.rsplit(":", 1)[0].strip("[]")
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self._echo_stop = threading.Event()
        self._echo_thread: threading.Thread | None = None
        fd, name = tempfile.mkstemp(prefix="pgbroker-broker-", suffix=".log")
        os.close(fd)
        self.log_path = Path(name)

    @property
    def target(self) -> str:
        """``host:port`` for a gRPC client (loopback when the broker listens on every address)."""
        host = _WILDCARD_TO_LOOPBACK.get(self.host, self.host)
        return f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"

    @property
    def pid(self) -> int | None:
        """The running broker's process id, None when it is not started or has been stopped."""
        return self.proc.pid if self.proc is not None else None

    def argv(self) -> list[str]:
        """The broker's command line; it holds no database URL (that goes in the environment)."""
        # Once a port is known, restarts reuse it so clients find the broker at the same address.
        listen = f"{self.listen.rsplit(':', 1)[0]}:{self.port}" if self.port else self.listen
        argv = [sys.executable, "-m", "broker", "run", "--listen", listen]
        argv += ["--log-level", self.log_level]
        for name, value in self.settings.items():
            argv += ["--" + name.replace("_", "-"), str(value)]
        return argv + list(self.extra_args)

    def child_env(self) -> dict[str, str]:
        """The child's environment: ours without ``PGBROKER_*``, then *env* and the URL."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("PGBROKER_")}
        env.update(self.env)
        env["PGBROKER_DATABASE_URL"] = self.database_url
        return env

    def start(self) -> BrokerProcess:
        """Start the broker and wait until it listens; raise RuntimeError with its log if it
        exits or does not listen within *start_timeout* seconds."""
        offset = self.log_path.stat().st_size
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                self.argv(),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=ROOT,
                env=self.child_env(),
                start_new_session=True,
            )
        if self.echo is not None:
            self._start_echo(offset)
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if (port := self._listening_port(offset)) is not None:
                self.port = port
                return self
            if self.proc.poll() is not None:
                break
            time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"broker did not start: {self.argv()[3:6]}\n{self.log()[-3000:]}")

    def _listening_port(self, offset: int) -> int | None:
        with open(self.log_path, "rb") as f:
            f.seek(offset)
            for line in f:
                if b"listening on" not in line:
                    continue
                with contextlib.suppress(ValueError, KeyError, TypeError):
                    return int(json.loads(line)["port"])
        return None

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

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM (graceful shutdown), then SIGKILL after *timeout* seconds."""
        self._signal(signal.SIGTERM, timeout)

    def kill(self) -> None:
        """SIGKILL: the broker vanishes without a goodbye (a crashed or replaced task)."""
        self._signal(signal.SIGKILL, 10.0)

    def _signal(self, sig: int, timeout: float) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, sig)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGKILL)
                proc.wait(10)
        self._stop_echo()

    def _start_echo(self, offset: int) -> None:
        self._stop_echo()
        self._echo_stop.clear()
        self._echo_thread = threading.Thread(
            target=self._tail, args=(offset,), name="broker-log-echo", daemon=True
        )
        self._echo_thread.start()

    def _stop_echo(self) -> None:
        """Let the echo thread copy the broker's last lines, then end it."""
        thread, self._echo_thread = self._echo_thread, None
        if thread is not None:
            self._echo_stop.set()
            thread.join(5)

    def _tail(self, offset: int) -> None:
        """Copy complete lines the broker appends to its log, from *offset* on, to *echo*."""
        assert self.echo is not None
        with open(self.log_path, "rb") as f:
            f.seek(offset)
            pending = b""
            while True:
                stopping = self._echo_stop.is_set()  # read once more after the stop request
                chunk = f.read()
                if chunk:
                    pending += chunk
                    *lines, pending = pending.split(b"\n")
                    for line in lines:
                        self.echo.write(line.decode(errors="replace") + "\n")
                    self.echo.flush()
                elif stopping:
                    if pending:
                        self.echo.write(pending.decode(errors="replace") + "\n")
                        self.echo.flush()
                    return
                else:
                    time.sleep(0.05)

    def log(self) -> str:
        """Everything the broker has written so far."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def close(self) -> None:
        """Stop the broker and remove its log file."""
        self.stop()
        self.log_path.unlink(missing_ok=True)

    def __enter__(self) -> BrokerProcess:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
