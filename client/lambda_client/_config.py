"""The client's settings from its environment, read once, and the gRPC channel built from them.

``ClientConfig.from_env()`` is the only place the client reads ``os.environ`` for a
``PGBROKER_*`` name:

=================================  ==========================================================
``PGBROKER_URL``                   the broker target (empty counts as unset; unset:
                                   ``127.0.0.1:50051``, except inside a Lambda, where a
                                   call then fails at once naming ``PGBROKER_URL``)
``PGBROKER_TLS``                   1/true/yes/on: TLS to the broker
``PGBROKER_TLS_CA_FILE``           the CA to trust (default: the system roots)
``PGBROKER_TLS_CLIENT_CERT_FILE``  with ``_KEY_FILE``: a client certificate (mTLS)
``PGBROKER_TLS_CLIENT_KEY_FILE``
``PGBROKER_TLS_SERVER_NAME``       the name to check in the broker's certificate
``PGBROKER_AUTH``                  iam | token | none (`lambda_client.auth.auth_for`)
``PGBROKER_TOKEN``                 the bearer token (``token``); surrounding whitespace,
                                   such as a file's last newline, is stripped
``PGBROKER_AUTH_AUDIENCE``         the audience of the IAM proof (default: the target)
``PGBROKER_STS_ENDPOINT``          the STS endpoint the broker verifies with (``iam``)
=================================  ==========================================================

Each TLS variable holds a path or the PEM text itself (a secret injected into the environment
is not a file). The files are read when a channel opens; one that cannot be used raises
`ConfigError` naming the variable, never the file's content. The broker's ``health`` and
``stats`` commands open their channel with the same builder (`open_channel`).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = ["ClientConfig", "ConfigError", "Pem", "open_channel", "tls_credentials"]

_TRUE = ("1", "true", "yes", "on")
_SERVER_NAME_OPTION = "grpc.ssl_target_name_override"


class ConfigError(ValueError):
    """A setting cannot be used; the message names the variable."""


@dataclass(frozen=True)
class Pem:
    """A PEM setting: the *variable* it came from (for messages) and its *value*, a path or
    the PEM text itself."""

    variable: str
    value: str

    @property
    def inline(self) -> bool:
        """Whether the value is the PEM text itself, not a path."""
        return self.value.lstrip().startswith("-----BEGIN ")

    def read(self) -> bytes:
        """The PEM bytes; raise `ConfigError` naming the variable if the file cannot be read
        or holds no PEM."""
        if self.inline:
            return self.value.encode()
        try:
            with open(self.value, "rb") as file:  # not pathlib: a cold start need not load it
                data = file.read()
        except OSError as exc:
            raise ConfigError(
                f"{self.variable}={self.value!r}: cannot read ({exc.strerror})"
            ) from None
        if b"-----BEGIN " not in data:
            raise ConfigError(f"{self.variable}={self.value!r}: not a PEM file")
        return data

    def __repr__(self) -> str:
        # A private key may be the value itself: never print PEM text.
        shown = "<PEM text>" if self.inline else repr(self.value)
        return f"Pem({self.variable!r}, {shown})"


@dataclass(frozen=True)
class ClientConfig:
    """What the environment says about reaching the broker; fields are None where unset."""

    target: str | None = None
    tls: bool = False
    tls_ca: Pem | None = None
    tls_client_cert: Pem | None = None
    tls_client_key: Pem | None = None
    tls_server_name: str | None = None
    auth: str = "none"
    token: str | None = field(default=None, repr=False)
    auth_audience: str | None = None
    sts_endpoint: str | None = None
    aws_region: str | None = None
    lambda_function: str | None = None  # AWS_LAMBDA_FUNCTION_NAME: running inside a Lambda

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> ClientConfig:
        """Read the variables above from *environ* (default ``os.environ``). Nothing is
        checked here: a bad target or auth mode is refused where it is used, naming the
        variable."""
        env = os.environ if environ is None else environ

        def text(name: str) -> str | None:
            return env.get(name, "").strip() or None

        def pem(name: str) -> Pem | None:
            value = env.get(name)
            return Pem(name, value) if value else None

        return cls(
            target=text("PGBROKER_URL"),
            tls=(text("PGBROKER_TLS") or "").lower() in _TRUE,
            tls_ca=pem("PGBROKER_TLS_CA_FILE"),
            tls_client_cert=pem("PGBROKER_TLS_CLIENT_CERT_FILE"),
            tls_client_key=pem("PGBROKER_TLS_CLIENT_KEY_FILE"),
            tls_server_name=text("PGBROKER_TLS_SERVER_NAME"),
            auth=(text("PGBROKER_AUTH") or "none").lower(),
            # A token from a file or a secret often ends in a newline, which gRPC refuses in
            # metadata ("Invalid metadata"): whitespace is never part of a token.
            token=text("PGBROKER_TOKEN"),
            auth_audience=env.get("PGBROKER_AUTH_AUDIENCE") or None,
            sts_endpoint=env.get("PGBROKER_STS_ENDPOINT") or None,
            aws_region=env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or None,
            lambda_function=text("AWS_LAMBDA_FUNCTION_NAME"),
        )

    def replace(self, **changes: Any) -> ClientConfig:
        """A copy with *changes* (field=value)."""
        return dataclasses.replace(self, **changes)


def tls_credentials(config: ClientConfig, root_certificates: bytes | None = None) -> Any:
    """``grpc.ChannelCredentials`` for *config*: trust *root_certificates* (else the CA of
    ``tls_ca``, else the system roots), and present the client certificate when both halves
    are set. Raise `ConfigError` for an unusable PEM."""
    from lambda_client._grpc import grpc

    roots = root_certificates
    if roots is None and config.tls_ca is not None:
        roots = config.tls_ca.read()
    chain = key = None
    if config.tls_client_cert is not None and config.tls_client_key is not None:
        chain, key = config.tls_client_cert.read(), config.tls_client_key.read()
    return grpc.ssl_channel_credentials(
        root_certificates=roots, private_key=key, certificate_chain=chain
    )


def open_channel(
    target: str,
    config: ClientConfig,
    options: Sequence[tuple[str, Any]] = (),
    *,
    root_certificates: bytes | None = None,
    aio: bool = False,
) -> Any:
    """A channel to *target* (``grpc.aio`` with *aio*) with *options*: plaintext, or TLS as
    *config* says, checking ``tls_server_name`` unless *options* already name a server. Raise
    `ConfigError` for an unusable PEM."""
    from lambda_client._grpc import grpc

    module: Any = grpc.aio if aio else grpc
    options = list(options)
    if not config.tls:
        return module.insecure_channel(target, options=options)
    if config.tls_server_name and _SERVER_NAME_OPTION not in dict(options):
        options.append((_SERVER_NAME_OPTION, config.tls_server_name))
    credentials = tls_credentials(config, root_certificates)
    return module.secure_channel(target, credentials, options=options)
