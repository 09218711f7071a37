"""Samples Postgres client backends and the pooler's RSS while a benchmark run is going."""

from __future__ import annotations

import contextlib
import threading
from typing import Any

from bench.procs import rss_bytes

BACKENDS_SQL = (
    "SELECT count(*) FROM pg_stat_activity "
    "WHERE backend_type = 'client backend' AND usename = :role"
)


class Monitor:
    """A thread polling ``pg_stat_activity`` and ``/proc/<pooler>/status`` every *interval* s.

    `begin(pooler_pid, role)` resets the peaks; `end()` returns
    ``(peak_backends, peak_rss_bytes)``. Each competitor logs in to Postgres as its own role,
    so only *role*'s backends count (not another pooler's idle pool, nor the monitor).
    """

    def __init__(
        self, host: str, port: int, user: str, database: str, interval: float = 0.05
    ) -> None:
        import pg8000.native

        self._conn: Any = pg8000.native.Connection(
            user, host=host, port=port, database=database, ssl_context=False
        )
        self.interval = interval
        self._lock = threading.Lock()
        self._pid: int | None = None
        self._role = ""
        self._peak_backends = 0
        self._peak_rss = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-monitor", daemon=True)
        self._thread.start()

    def begin(self, pooler_pid: int | None, role: str) -> None:
        with self._lock:
            self._pid = pooler_pid
            self._role = role
            self._peak_backends = 0
            self._peak_rss = 0
        self._sample()

    def end(self) -> tuple[int, int | None]:
        self._sample()
        with self._lock:
            rss = self._peak_rss if self._pid is not None else None
            return self._peak_backends, rss

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        with contextlib.suppress(Exception):
            self._conn.close()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            with contextlib.suppress(Exception):
                self._sample()

    def _sample(self) -> None:
        with self._lock:
            count = int(self._conn.run(BACKENDS_SQL, role=self._role)[0][0])
            self._peak_backends = max(self._peak_backends, count)
            if self._pid is not None:
                self._peak_rss = max(self._peak_rss, rss_bytes(self._pid) or 0)
