"""Broker settings: one resolver, explicit flag > ``PGBROKER_*`` environment > default.

`load_settings` reads every setting, validates all of them and raises `ConfigError` listing
each bad value once (``PGBROKER_POOL_SIZE=0: must be at least 1``), so a misconfigured ECS task
fails at start with one line that names what to fix. The database password never appears in a
message, a log line or a `repr`.

Durations accept seconds (``30``, ``2.5``) or a unit suffix (``500ms``, ``30s``, ``5m``).
"""

from __future__ import annotations

import ipaddress
import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar
from urllib.parse import parse_qsl, unquote, urlsplit

__all__ = [
    "AUTH_MODES",
    "SSL_MODES",
    "ConfigError",
    "DatabaseTarget",
    "Settings",
    "load_settings",
    "parse_listen",
]

ENV_PREFIX = "PGBROKER_"

# Authentication modes (`broker/security/auth.py`); `none` only on a loopback listener.
AUTH_MODES: tuple[str, ...] = ("iam", "token", "none")

SSL_MODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
_URL_QUERY_KEYS = ("sslmode", "sslrootcert", "application_name", "connect_timeout")


class ConfigError(ValueError):
    """One or more settings are invalid; `problems` holds one message per bad value."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("; ".join(problems))


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


@dataclass(frozen=True)
class Settings:
    """Everything the broker process needs, validated. Durations are in seconds."""

    database: DatabaseTarget
    listen_host: str = "127.0.0.1"
    listen_port: int = 50051
    pool_size: int = 20
    max_waiting: int = 2000
    queue_timeout: float = 30.0
    statement_timeout: float = 30.0
    max_lifetime: float = 3600.0
    connect_timeout: float = 10.0
    shutdown_grace: float = 20.0
    max_connection_age: float = 300.0
    max_connection_age_grace: float = 30.0
    auth: str = "none"
    log_level: str = "INFO"
    statement_cache_size: int = 100
    # Deploy (issue 7): the connection budget across replicas, EMF metrics. See docs/deploy.md.
    max_replicas: int = 1
    metrics_interval: float = 0.0
    # Security (issue 6): auth details, TLS, role map, limits. See docs/security.md.
    auth_audience: str = ""
    iam_allowed_roles: str = ""
    sts_endpoint: str = ""
    tokens: str = field(default="", repr=False)
    tokens_secret_id: str = ""
    tls_cert: str = ""
    tls_key: str = ""
    tls_client_ca: str = ""
    role_map: str = ""
    default_role: str = ""
    session_audit: str = "opaque"
    database_secret_id: str = ""
    database_iam_auth: bool = False
    max_statements: int = 1000
    max_request_bytes: int = 8 * 1024 * 1024
    max_result_rows: int = 1_000_000
    max_result_bytes: int = 32 * 1024 * 1024
    max_inflight_per_caller: int = 1000
    # Server processes sharing the listen port (broker/front/workers.py); pool_size is their total.
    workers: int = 1
    # Bounds of a Transact lease (broker/flow/lease.py), PgBouncer's idle_transaction_timeout
    # and transaction_timeout; 0 turns one off. transaction_timeout defaults to
    # statement_timeout, so neither style holds a connection longer than a batch may run.
    idle_transaction_timeout: float = 10.0
    transaction_timeout: float = 30.0

    @property
    def listen(self) -> str:
        host = f"[{self.listen_host}]" if ":" in self.listen_host else self.listen_host
        return f"{host}:{self.listen_port}"


# name -> (parser, default). A default of None means "required" (or derived, for auth).
_T = TypeVar("_T")


def _duration(text: str) -> float:
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(ms|s|m|h)?\s*", text)
    if not match:
        raise ValueError("must be a duration in seconds, e.g. 30, 2.5, 500ms, 5m")
    scale = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}[match.group(2) or "s"]
    value = float(match.group(1)) * scale
    if not math.isfinite(value):
        raise ValueError("must be finite")
    return value


def _integer(text: str) -> int:
    try:
        return int(text.strip())
    except ValueError:
        raise ValueError("must be a whole number") from None


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


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class _Resolver:
    """Looks each setting up (flag, then environment, then default) and collects problems."""

    def __init__(self, flags: Mapping[str, Any], environ: Mapping[str, str]) -> None:
        self.flags = flags
        self.environ = environ
        self.problems: list[str] = []

    def raw(self, name: str) -> tuple[str | None, str]:
        """The text of setting *name* and where it came from (for messages)."""
        flag = self.flags.get(name)
        if flag is not None:
            return str(flag), f"--{name.replace('_', '-')}"
        env_name = ENV_PREFIX + name.upper()
        if env_name in self.environ and self.environ[env_name] != "":
            return self.environ[env_name], env_name
        return None, env_name

    def get(
        self,
        name: str,
        parse: Callable[[str], _T],
        default: _T,
        check: Callable[[_T], str | None] = lambda _: None,
    ) -> _T:
        text, source = self.raw(name)
        if text is None:
            return default
        try:
            value = parse(text)
        except ValueError as exc:
            self.problems.append(f"{source}={_shown(name, text)}: {exc}")
            return default
        problem = check(value)
        if problem:
            self.problems.append(f"{source}={_shown(name, text)}: {problem}")
            return default
        return value


def _shown(name: str, text: str) -> str:
    """The value as it may appear in a message: never the database URL (it holds a password)."""
    return "<redacted>" if name == "database_url" else repr(text)


def _at_least(minimum: float) -> Callable[[float], str | None]:
    return lambda v: None if v >= minimum else f"must be at least {minimum:g}"


def _positive(v: float) -> str | None:
    return None if v > 0 else "must be greater than 0"


def load_settings(
    flags: Mapping[str, Any] | None = None, environ: Mapping[str, str] | None = None
) -> Settings:
    """Resolve every setting (explicit flag > PGBROKER_* env > default) and validate it.

    *flags* maps setting names (``pool_size``) to values; ``None`` means "not given".
    Raise `ConfigError` with one message per bad or missing value.
    """
    r = _Resolver(flags or {}, os.environ if environ is None else environ)
    url_text, url_source = r.raw("database_url")
    database: DatabaseTarget | None = None
    if url_text is None and r.raw("database_secret_id")[0]:
        # Everything comes from the secret (RDS JSON with host, port, dbname); verify TLS.
        database = DatabaseTarget(host="", port=5432, user="", database="postgres")
        database = replace(database, sslmode="verify-full")
    elif url_text is None:
        r.problems.append(f"{url_source} is required (postgresql://user:password@host:5432/db)")
    else:
        database = r.get("database_url", parse_database_url, None)  # type: ignore[arg-type]
    listen_host, listen_port = r.get("listen", parse_listen, ("127.0.0.1", 50051))
    values: dict[str, Any] = {
        "pool_size": r.get("pool_size", _integer, 20, _at_least(1)),
        "max_waiting": r.get("max_waiting", _integer, 2000, _at_least(0)),
        "queue_timeout": r.get("queue_timeout", _duration, 30.0, _positive),
        "statement_timeout": r.get("statement_timeout", _duration, 30.0, _positive),
        "max_lifetime": r.get("max_lifetime", _duration, 3600.0, _positive),
        "connect_timeout": r.get("connect_timeout", _duration, 10.0, _positive),
        "shutdown_grace": r.get("shutdown_grace", _duration, 20.0, _at_least(0)),
        "max_connection_age": r.get("max_connection_age", _duration, 300.0, _positive),
        "max_connection_age_grace": r.get(
            "max_connection_age_grace", _duration, 30.0, _at_least(0)
        ),
        "statement_cache_size": r.get("statement_cache_size", _integer, 100, _at_least(1)),
        "log_level": r.get("log_level", lambda s: s.strip().upper(), "INFO", _one_of(LOG_LEVELS)),
        "max_replicas": r.get("max_replicas", _integer, 1, _at_least(1)),
        "metrics_interval": r.get("metrics_interval", _duration, 0.0, _at_least(0)),
        "workers": r.get("workers", _integer, 1, _at_least(1)),
        "idle_transaction_timeout": r.get(
            "idle_transaction_timeout", _duration, 10.0, _at_least(0)
        ),
    }
    values["transaction_timeout"] = r.get(
        "transaction_timeout", _duration, values["statement_timeout"], _at_least(0)
    )
    if values["workers"] > values["pool_size"]:
        source = r.raw("workers")[1]
        r.problems.append(
            f"{source}={values['workers']}: more workers than pool_size {values['pool_size']} "
            "(each worker holds pool_size // workers connections, at least 1); "
            "raise PGBROKER_POOL_SIZE or lower PGBROKER_WORKERS"
        )
    values["auth"] = _check_auth(r, listen_host)
    values.update(_security_values(r, values))
    if r.problems or database is None:
        raise ConfigError(r.problems or ["PGBROKER_DATABASE_URL is not valid"])
    return Settings(database=database, listen_host=listen_host, listen_port=listen_port, **values)


def _one_of(choices: tuple[str, ...]) -> Callable[[str], str | None]:
    return lambda v: None if v in choices else f"must be one of {', '.join(choices)}"


def _check_auth(r: _Resolver, listen_host: str) -> str:
    """Auth mode: defaults to `none` on a loopback listener; anything else must be chosen.

    Hook for iam/token: add the mode to `AUTH_MODES`; `none` stays loopback-only so a broker
    reachable from the network never runs without authentication.
    """
    text, source = r.raw("auth")
    mode = (text or "").strip().lower()
    if not mode:
        if _is_loopback(listen_host):
            return "none"
        r.problems.append(
            f"{source} is required when listening on {listen_host!r} (not loopback); "
            f"supported: {', '.join(AUTH_MODES)}"
        )
        return "none"
    if mode not in AUTH_MODES:
        r.problems.append(f"{source}={text!r}: must be one of {', '.join(AUTH_MODES)}")
    elif mode == "none" and not _is_loopback(listen_host):
        r.problems.append(
            f"{source}=none is only allowed on a loopback listener, not {listen_host!r}"
        )
    return mode


def _security_values(r: _Resolver, values: Mapping[str, Any]) -> dict[str, Any]:
    """Auth details, TLS files and limits (issue 6); problems are added to *r*."""
    auth_mode = values["auth"]
    text = {
        name: r.get(name, str.strip, "")
        for name in (
            "auth_audience",
            "iam_allowed_roles",
            "sts_endpoint",
            "tokens",
            "tokens_secret_id",
            "tls_cert",
            "tls_key",
            "tls_client_ca",
            "role_map",
            "default_role",
            "database_secret_id",
        )
    }
    text["session_audit"] = r.get(
        "session_audit", lambda s: s.strip().lower(), "opaque", _one_of(("opaque", "always", "off"))
    )
    sizes = {
        name: r.get(name, _integer, default, _at_least(0))
        for name, default in (
            ("max_statements", 1000),
            ("max_request_bytes", 8 * 1024 * 1024),
            ("max_result_rows", 1_000_000),
            ("max_result_bytes", 32 * 1024 * 1024),
            # Default: half of what the broker admits, so one caller cannot fill the queue.
            ("max_inflight_per_caller", (values["pool_size"] + values["max_waiting"]) // 2),
        )
    }
    if bool(text["tls_cert"]) != bool(text["tls_key"]):
        r.problems.append("PGBROKER_TLS_CERT and PGBROKER_TLS_KEY must be set together")
    if text["tls_client_ca"] and not text["tls_cert"]:
        r.problems.append("PGBROKER_TLS_CLIENT_CA (mTLS) needs PGBROKER_TLS_CERT and _KEY")
    from broker.security.roles import RoleMap

    try:
        RoleMap.parse(text["role_map"], text["default_role"])  # problems now, not at start
    except ValueError as exc:
        r.problems.append(str(exc))
    if auth_mode in ("iam", "token"):
        from broker.security.auth import authenticator_from_env

        environ = {ENV_PREFIX + k.upper(): v for k, v in text.items() if v}
        for key in ("AWS_REGION", "AWS_DEFAULT_REGION"):
            if r.environ.get(key):
                environ[key] = r.environ[key]
        try:
            authenticator_from_env(auth_mode, environ)
        except ValueError as exc:
            r.problems.append(str(exc))
    iam_db = r.get("database_iam_auth", _boolean, False)
    if iam_db and text["database_secret_id"]:
        r.problems.append(
            "PGBROKER_DATABASE_IAM_AUTH and PGBROKER_DATABASE_SECRET_ID exclude each other"
        )
    return {**text, **sizes, "database_iam_auth": iam_db}


def _boolean(text: str) -> bool:
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off", ""):
        return False
    raise ValueError("must be true or false")
