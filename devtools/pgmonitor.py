"""Count Postgres client backends while something runs: the demo's and the deploy tests'
peak-connection figures.

`BackendMonitor(connect, role=...)` polls ``pg_stat_activity`` every *interval* seconds on a
thread from its own connection (``connect()`` returns a pg8000 native connection) and keeps
every `Sample`; `peak(start, end)` is the most backends *role* held in a window. Open it
before a burst, as a superuser: it then keeps a reserved slot when the burst has taken the
others.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = ["BackendMonitor", "Sample"]

_SQL = (
    "SELECT count(*) FILTER (WHERE usename = :role), count(*) FROM pg_stat_activity "
    "WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()"
)
_SQL_ANY_ROLE = (
    "SELECT count(*), count(*) FROM pg_stat_activity "
    "WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()"
)


@dataclass(frozen=True)
class Sample:
    """One poll: seconds on the monotonic clock, client backends of the monitored role (all
    of them when no role is given) and every client backend, the monitor's own excluded."""

    at: float
    role_backends: int
    all_backends: int


class BackendMonitor:
    """See the module docstring. `start()` connects, takes a first sample and starts the
    thread; `stop()` ends it and closes the connection. A failed poll on the thread is
    counted in `errors`, not raised."""

    def __init__(
        self, connect: Callable[[], Any], *, role: str | None = None, interval: float = 0.05
    ) -> None:
        self.connect = connect
        self.role = role
        self.interval = interval
        self.samples: list[Sample] = []
        self.errors = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._conn: Any = None

    def start(self) -> BackendMonitor:
        self._conn = self.connect()
        self.poll()
        self._thread = threading.Thread(target=self._loop, name="pg-monitor", daemon=True)
        self._thread.start()
        return self

    def poll(self) -> Sample:
        """Take one sample now (also used to wait for backends to go)."""
        if self.role is None:
            rows = self._conn.run(_SQL_ANY_ROLE)
        else:
            rows = self._conn.run(_SQL, role=self.role)
        sample = Sample(time.monotonic(), int(rows[0][0]), int(rows[0][1]))
        self.samples.append(sample)
        return sample

    def wait_for(self, predicate: Callable[[Sample], bool], timeout: float = 10.0) -> bool:
        """Wait until a new sample satisfies *predicate*; False after *timeout* seconds."""
        deadline = time.monotonic() + timeout
        since = time.monotonic()
        while time.monotonic() < deadline:
            if self.samples and self.samples[-1].at > since and predicate(self.samples[-1]):
                return True
            time.sleep(self.interval)
        return False

    def peak(self, start: float = float("-inf"), end: float = float("inf")) -> int:
        """The most role backends seen in [start, end] (monotonic seconds; default: ever)."""
        return max((s.role_backends for s in self.samples if start <= s.at <= end), default=0)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self._conn is not None:
            with contextlib.suppress(Exception):
                self._conn.close()
            self._conn = None

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.poll()
            except Exception:
                # A lost sample is not worth stopping the caller for; the count is reported.
                self.errors += 1
