"""Setting values: text in, a typed value out, or a ValueError whose message completes
``<VARIABLE>=<value>: …`` (broker/config.py adds the variable and the value).

Durations take seconds (``30``, ``2.5``) or a unit (``500ms``, ``30s``, ``5m``); byte sizes a
whole number of bytes or ``KiB``, ``MiB``, ``GiB``; the database URL is parsed into a
`DatabaseTarget` without ever echoing it (it holds the password).
"""

from __future__ import annotations

import ipaddress
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

__all__ = [
    "MIB",
    "SSL_MODES",
    "Check",
    "DatabaseTarget",
    "at_least",
    "boolean",
    "duration",
    "integer",
    "is_loopback",
    "lowercase",
    "one_of",
    "parse_database_url",
    "parse_listen",
    "parse_replica_urls",
    "positive",
    "size",
    "stripped",
    "uppercase",
    "worker_marker",
]

SSL_MODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")
_URL_QUERY_KEYS = ("sslmode", "sslrootcert", "application_name", "connect_timeout")
MIB = 1024 * 1024


@dataclass(frozen=True)
class DatabaseTarget:
    """Where and how to connect to Postgres, parsed from ``PGBROKER_DATABASE_URL``."""

    host: str
    port: int
    user: str
    database: str
    password: str | None = field(default=None, repr=False)
    sslmode: str = "prefer"
    sslrootcert: str | None = None
    application_name: str = "pgbroker"

    @property
    def redacted(self) -> str:
        """The URL without its password, safe for logs and error messages."""
        auth = f"{self.user}:***@" if self.password else f"{self.user}@"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"postgresql://{auth}{host}:{self.port}/{self.database}?sslmode={self.sslmode}"


# ------------------------------------------------------------------------------- parsers


def duration(text: str) -> float:
    """Seconds from ``30``, ``2.5``, ``500ms``, ``30s``, ``5m`` or ``1h``."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(ms|s|m|h)?\s*", text)
    if not match:
        raise ValueError("must be a duration in seconds, e.g. 30, 2.5, 500ms, 5m")
    scale = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}[match.group(2) or "s"]
    value = float(match.group(1)) * scale
    if not math.isfinite(value):
        raise ValueError("must be finite")
    return value


def integer(text: str) -> int:
    """A whole number."""
    try:
        return int(text.strip())
    except ValueError:
        raise ValueError("must be a whole number") from None


def size(text: str) -> int:
    """Bytes: ``8388608`` or ``8MiB`` (also ``KiB``, ``GiB``)."""
    match = re.fullmatch(r"\s*(-?[0-9]+)\s*(kib|mib|gib)?\s*", text, re.IGNORECASE)
    if not match:
        raise ValueError("must be a whole number of bytes, or with KiB, MiB or GiB (e.g. 8MiB)")
    scale = {"": 1, "kib": 1024, "mib": MIB, "gib": 1024 * MIB}[(match.group(2) or "").lower()]
    return int(match.group(1)) * scale


def boolean(text: str) -> bool:
    """``true``/``false`` (also 1/0, yes/no, on/off); empty is false."""
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off", ""):
        return False
    raise ValueError("must be true or false")


def stripped(text: str) -> str:
    """Text without surrounding blanks (any text is accepted)."""
    return text.strip()


def lowercase(text: str) -> str:
    """Stripped and lower-cased, for a choice (`one_of` checks it)."""
    return text.strip().lower()


def uppercase(text: str) -> str:
    """Stripped and upper-cased, for a choice (`one_of` checks it)."""
    return text.strip().upper()


def parse_listen(text: str) -> tuple[str, int]:
    """Split ``host:port`` (``[::1]:50051`` for IPv6); raise ValueError if malformed."""
    match = re.fullmatch(r"\[([^\]]+)\]:(\d+)|([^:\[\]]*):(\d+)", text.strip())
    if not match:
        raise ValueError("must be host:port, e.g. 127.0.0.1:50051 or [::]:50051")
    host = match.group(1) or match.group(3) or "0.0.0.0"
    port = int(match.group(2) or match.group(4))
    if not 0 <= port <= 65535:
        raise ValueError("port must be between 0 and 65535")
    return host, port


_UNESCAPED_PASSWORD = (
    "cannot parse; percent-encode special characters in the user name and password "
    "(@ → %40, / → %2F, : → %3A, ? → %3F, # → %23)"
)


def _password_breaks_authority(url: str) -> bool:
    """True when an unescaped '@', '/', '?' or '#' in the password makes the URL ambiguous.

    A '/', '?' or '#' ends the host part early, so what follows the password's first part
    would be taken for host, port or database (and a fragment of the password would appear
    in "cannot connect to …" logs); the user-info '@' then sits after that point. Two '@'
    are read differently by libpq (the first) and Python (the last).
    """
    rest = url.partition("://")[2]
    host_part = re.split(r"[/?#]", rest, maxsplit=1)[0]
    return rest.count("@") > 1 or rest.count("@") > host_part.count("@")


def parse_database_url(url: str) -> DatabaseTarget:
    """Parse ``postgresql://user:pass@host:port/db?sslmode=…``; messages never echo the URL."""
    if _password_breaks_authority(url.strip()):
        raise ValueError(_UNESCAPED_PASSWORD)
    try:
        parts = urlsplit(url.strip())
        port = parts.port or 5432
    except ValueError:
        raise ValueError("is not a valid URL (expected postgresql://user@host:port/db)") from None
    if parts.scheme not in ("postgresql", "postgres"):
        raise ValueError("must start with postgresql:// (e.g. postgresql://user@host:5432/db)")
    if not parts.hostname:
        raise ValueError("has no host (expected postgresql://user@host:port/db)")
    query = dict(parse_qsl(parts.query, keep_blank_values=True))
    unknown = sorted(set(query) - set(_URL_QUERY_KEYS))
    if unknown:
        raise ValueError(f"has unsupported query parameters {unknown}; known: {_URL_QUERY_KEYS}")
    sslmode = query.get("sslmode", "prefer")
    if sslmode not in SSL_MODES:
        raise ValueError(f"sslmode={sslmode!r} is not one of {', '.join(SSL_MODES)}")
    user = unquote(parts.username) if parts.username else "postgres"
    database = unquote(parts.path.lstrip("/")) or user
    return DatabaseTarget(
        host=parts.hostname,
        port=port,
        user=user,
        database=database,
        password=unquote(parts.password) if parts.password is not None else None,
        sslmode=sslmode,
        sslrootcert=query.get("sslrootcert"),
        application_name=query.get("application_name", "pgbroker"),
    )


def parse_replica_urls(text: str) -> tuple[DatabaseTarget, ...]:
    """Comma-separated database URLs (``PGBROKER_REPLICA_URLS``), each parsed as
    `parse_database_url` does; blanks between commas are ignored. Messages name the URL by its
    position, never by its text (it may hold a password)."""
    targets = []
    for index, url in enumerate(part for part in text.split(",") if part.strip()):
        try:
            targets.append(parse_database_url(url))
        except ValueError as exc:
            raise ValueError(f"replica URL {index + 1} {exc}") from None
    return tuple(targets)


def worker_marker(text: str) -> tuple[int, int, int, str]:
    """``index,port,ready_fd[,dir]``, written by the supervisor (broker/front/workers.py);
    *dir* is where the workers serve their figures to each other ("" when not given)."""
    head = text.split(",", 3)
    try:
        index, port, ready_fd = (int(part) for part in head[:3])
    except ValueError:
        raise ValueError("must be index,port,ready_fd,dir (set by the supervisor only)") from None
    directory = head[3] if len(head) > 3 else ""
    if len(head) > 3 and not directory.startswith("/"):
        raise ValueError(
            "must be index,port,ready_fd,dir with an absolute dir (set by the supervisor only)"
        )
    return index, port, ready_fd, directory


# ---------------------------------------------------------------------------------- checks

# A check sees a parsed value and says what is wrong with it, or None.
Check = Callable[[Any], str | None]


def at_least(minimum: float) -> Check:
    return lambda v: None if v >= minimum else f"must be at least {minimum:g}"


def positive(v: float) -> str | None:
    return None if v > 0 else "must be greater than 0"


def one_of(choices: tuple[str, ...]) -> Check:
    return lambda v: None if v in choices else f"must be one of {', '.join(choices)}"


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback addresses (127.0.0.0/8, ::1)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
