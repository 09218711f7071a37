"""``postgresql+pgbroker://`` URLs -> `lambda_client.dbapi.connect` arguments.

==============================================  ===============================================
``postgresql+pgbroker://host:port``             target ``host:port``
``postgresql+pgbroker://TOKEN@host:port``       bearer-token auth (``PGBROKER_AUTH=token``)
``postgresql+pgbroker:///?target=dns:///b:50051``  any gRPC target (DNS round-robin, ipv4:…)
``postgresql+pgbroker://``                      ``PGBROKER_URL`` (the client's default)
``…/dbname``                                    checked once against the database the broker
                                                serves: another name is a clear error
``?tls=true``                                   TLS; ``tls_ca_file=``, ``tls_server_name=``
``?timeout=5``                                  seconds per call (the dialect's default)
``?deadline_margin=0.5&max_attempts=5``         other `BrokerClient` numbers
==============================================  ===============================================

A password in the URL is refused: the broker holds the database credentials, and a secret in
a URL ends up in logs; the user part is the bearer token when there is one. Anything the URL
cannot say (an IAM auth hook, channel options) goes in ``create_engine(connect_args=...)``.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

from sqlalchemy.engine import URL

from lambda_client.auth import BearerAuth

__all__ = ["connect_args_from_url"]

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")
_FLOATS = ("timeout", "deadline_margin", "initial_backoff", "max_backoff", "reconnect_after_idle")
_INTS = ("max_attempts", "max_statements")
_BOOLS = ("tls", "health_check")


def connect_args_from_url(url: URL) -> dict[str, Any]:
    """The keyword arguments of `lambda_client.dbapi.connect` that *url* states. Raise
    `ValueError` naming a query parameter that is unknown or has a bad value, or a password."""
    if url.password:
        raise ValueError(
            "postgresql+pgbroker URLs carry no password: the broker holds the database "
            "credentials; put a bearer token in the user part (TOKEN@host) or use IAM auth"
        )
    query = dict(url.query)
    args: dict[str, Any] = {}
    target = query.pop("target", None)
    if target is not None and url.host:
        raise ValueError("give the broker as host:port or as ?target=, not both")
    if url.host:
        host = f"[{url.host}]" if ":" in url.host else url.host
        target = f"{host}:{url.port or 50051}"
    if target is not None:
        args["target"] = _one(target, "target")
    if url.username:
        args["auth"] = _bearer(url.username)
    if url.database:
        args["dbname"] = url.database
    for name, raw in query.items():
        value = _one(raw, name)
        if name in _FLOATS:
            args[name] = _number(float, name, value)
        elif name in _INTS:
            args[name] = _number(int, name, value)
        elif name in _BOOLS:
            args[name] = _flag(name, value)
        elif name == "tls_ca_file":
            args["root_certificates"] = Path(value).read_bytes()
        elif name == "tls_server_name":
            args["tls_server_name"] = value
        else:
            raise ValueError(f"postgresql+pgbroker URL: unknown query parameter {name!r}")
    return args


@functools.lru_cache(maxsize=16)
def _bearer(token: str) -> BearerAuth:
    """One hook per token: the DB-API shares a client (one channel) per target and options,
    and a new hook object each time would make each connection its own client."""
    return BearerAuth(token)


def _one(value: str | tuple[str, ...], name: str) -> str:
    if isinstance(value, tuple):
        raise ValueError(f"postgresql+pgbroker URL: {name} is given more than once")
    return value


def _number(kind: type, name: str, value: str) -> Any:
    try:
        return kind(value)
    except ValueError:
        raise ValueError(f"postgresql+pgbroker URL: {name}={value!r} is not a number") from None


def _flag(name: str, value: str) -> bool:
    if value.lower() in _TRUE:
        return True
    if value.lower() in _FALSE:
        return False
    raise ValueError(f"postgresql+pgbroker URL: {name}={value!r} must be true or false")
