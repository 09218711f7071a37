"""TLS between clients and the broker (``PGBROKER_TLS_CERT``/``_KEY``, optional mTLS).

`server_credentials` reads the PEM files once at start; a missing or unreadable file is a
one-line `TlsConfigError` naming the variable (never the file's content). Each variable holds
a path or the PEM text itself: ECS injects a Secrets Manager value into the environment, not
into a file (template.yaml's ``BrokerTlsSecretArn``). With
``PGBROKER_TLS_CLIENT_CA`` set, clients must present a certificate signed by that CA (mTLS).
Broker→Postgres TLS is `broker.postgres.pg.ssl_context_for` (``sslmode``/``sslrootcert`` in the
URL).
"""

from __future__ import annotations

from typing import Any

import grpc

from lambda_client._config import ConfigError, Pem

__all__ = ["TlsConfigError", "read_pem", "server_credentials"]


class TlsConfigError(ValueError):
    """A TLS file cannot be used; the message names the variable and the path."""


def read_pem(variable: str, value: str) -> bytes:
    """The PEM that *variable* holds: its value when that is PEM text, else the file it names.
    Read as the client reads its own (`lambda_client._config.Pem`); raise `TlsConfigError`."""
    try:
        return Pem(variable, value).read()
    except ConfigError as exc:
        raise TlsConfigError(str(exc)) from None


def server_credentials(settings: Any) -> grpc.ServerCredentials | None:
    """Server credentials from *settings* (``tls_cert``, ``tls_key``, ``tls_client_ca``),
    or None when TLS is off. Raise `TlsConfigError` for an unusable file."""
    if not settings.tls_cert:
        return None
    cert = read_pem("PGBROKER_TLS_CERT", settings.tls_cert)
    key = read_pem("PGBROKER_TLS_KEY", settings.tls_key)
    client_ca = (
        read_pem("PGBROKER_TLS_CLIENT_CA", settings.tls_client_ca)
        if settings.tls_client_ca
        else None
    )
    return grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=client_ca, require_client_auth=client_ca is not None
    )
