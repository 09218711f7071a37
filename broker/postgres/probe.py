"""A pool connect function that reads something from the first connection it opens."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Generic, TypeVar

from broker.postgres.pg import PgConnection

__all__ = ["FirstConnectionProbe"]

_T = TypeVar("_T")


class FirstConnectionProbe(Generic[_T]):
    """A pool connect function that runs *read* on the first connection it opens.

    Call it as the pool would call *connect*; it returns the same connections. The first one
    also runs *read* (on the connecting thread, before the pool sees it) and keeps the result
    in `value`; later ones are returned untouched. A failure to read is kept in `error`, so a
    connection is never lost to the probe. Probes wrap each other to read several things.
    """

    def __init__(
        self, connect: Callable[[], PgConnection], read: Callable[[PgConnection], _T]
    ) -> None:
        self._connect = connect
        self._read = read
        self._lock = threading.Lock()
        self.value: _T | None = None
        self.error: str | None = None

    def __call__(self) -> PgConnection:
        conn = self._connect()
        with self._lock:
            if self.value is None and self.error is None:
                try:
                    self.value = self._read(conn)
                except Exception as exc:  # reported by the owner; the connection stays usable
                    self.error = f"{type(exc).__name__}: {exc}"
        return conn
