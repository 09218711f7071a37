"""Run ``python -m broker run`` as a child process, for client tests, the demo and benchmarks.

`BrokerProcess(database_url, listen="127.0.0.1:0").start()` starts a real broker, waits for its
``listening on`` log line and reads the bound port from it. Its stdout and stderr (JSON log
lines) go to a temporary file, readable with `log()`. `stop()` sends SIGTERM to the process by
pid (then SIGKILL), `kill()` sends SIGKILL at once; `start()` again brings a broker back on the
same port.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import TracebackType

__all__ = ["BrokerProcess"]

ROOT = Path(__file__).resolve().parent.parent


class BrokerProcess:
    """One broker child process; *settings* become flags (``pool_size=1`` → ``--pool-size 1``).

    *log_level* must be INFO or DEBUG: the port is read from the INFO ``listening on`` line.
    """

    def __init__(
        self,
        database_url: str,
        *,
        listen: str = "127.0.0.1:0",
        log_level: str = "DEBUG",
        start_timeout: float = 30.0,
        env: dict[str, str] | None = None,
        **settings: object,
    ) -> None:
        if log_level.upper() not in ("DEBUG", "INFO"):
            raise ValueError("log_level must be DEBUG or INFO (the port is read from the log)")
        self.database_url = database_url
        self.listen = listen
        self.log_level = log_level
        self.start_timeout = start_timeout
        self.settings = settings
        self.env = dict(env or {})  # extra PGBROKER_* variables (settings that have no flag)
        self.host = listen.rsplit(":", 1)[0].strip("[]")
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        fd, name = tempfile.mkstemp(prefix="pgbroker-broker-", suffix=".log")
        os.close(fd)
        self.log_path = Path(name)

    @property
    def target(self) -> str:
        """``host:port`` for a gRPC client."""
        return f"{self.host}:{self.port}"

    def argv(self) -> list[str]:
        # Once a port is known, restarts reuse it so clients find the broker at the same address.
        listen = f"{self.host}:{self.port}" if self.port else self.listen
        argv = [sys.executable, "-m", "broker", "run", "--listen", listen]
        argv += ["--database-url", self.database_url, "--log-level", self.log_level]
        for name, value in self.settings.items():
            argv += ["--" + name.replace("_", "-"), str(value)]
        return argv

    def start(self) -> BrokerProcess:
        """Start the broker and wait until it listens; raise RuntimeError with its log if it
        exits or does not listen within *start_timeout* seconds."""
        offset = self.log_path.stat().st_size
        env = {k: v for k, v in os.environ.items() if not k.startswith("PGBROKER_")}
        env.update(self.env)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                self.argv(),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=ROOT,
                env=env,
                start_new_session=True,
            )
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
