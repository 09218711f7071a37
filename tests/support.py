"""Helpers shared by the test folders (importable as ``support``: pytest puts ``tests/``, the
root conftest's folder, on sys.path): polling and a direct Postgres connection."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pg8000.native
import pytest

__all__ = ["connect", "wait_until"]


def wait_until(predicate: Callable[[], Any], timeout: float = 10.0, what: str = "") -> Any:
    """Poll *predicate* until it returns something truthy; fail the test after *timeout*."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what or predicate}")
        time.sleep(0.01)


def connect(postgres: Any) -> pg8000.native.Connection:
    """A direct pg8000 connection to *postgres* (the ``postgres`` fixture's server), as its
    superuser and not through a broker; the caller closes it."""
    return pg8000.native.Connection(
        postgres.user,
        host=postgres.host,
        port=postgres.port,
        database=postgres.database,
        password=getattr(postgres, "password", None),
    )
