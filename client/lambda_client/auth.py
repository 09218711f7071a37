"""Credentials a `BrokerClient` sends: an IAM proof of identity or a bearer token.

``iam`` (the default the SAM template uses): `IamAuth` signs an ``sts:GetCallerIdentity``
request with the function's own role credentials (AWS Signature Version 4) and a signed
``x-pgbroker-audience`` header that binds it to one broker, and sends it as
``authorization: AWS4-STS <base64 JSON>``. The broker forwards it to STS, which answers with
the caller's ARN only if the signature is valid. Nothing secret is stored; the proof is
re-signed every *refresh_after* seconds (5 minutes), not per call, and the broker caches its
verdict for that proof. Signing uses the standard library and the credentials Lambda puts in
the environment, so a cold start imports nothing heavy (botocore only when credentials must
come from its provider chain).

``token``: `BearerAuth` sends ``authorization: Bearer <token>``.

`auth_for` picks one from the client's configuration (`lambda_client._config.ClientConfig`:
``PGBROKER_AUTH`` (``iam`` | ``token`` | ``none``), ``PGBROKER_TOKEN``,
``PGBROKER_AUTH_AUDIENCE`` (default: ``PGBROKER_URL``) and ``PGBROKER_STS_ENDPOINT`` (default:
regional STS of ``AWS_REGION``)); `auth_from_env` reads that configuration first.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from lambda_client._config import ClientConfig

__all__ = ["AUDIENCE_HEADER", "BearerAuth", "IamAuth", "auth_for", "auth_from_env"]

AUDIENCE_HEADER = "x-pgbroker-audience"
_BODY = "Action=GetCallerIdentity&Version=2011-06-15"
_CONTENT_TYPE = "application/x-www-form-urlencoded; charset=utf-8"

Metadata = Sequence[tuple[str, str]]


class BearerAuth:
    """``authorization: Bearer <token>`` on every call (``token`` mode).

    Surrounding whitespace (a file's last newline) is stripped; raise ValueError naming
    *variable* for an empty token or one holding a character gRPC metadata cannot carry
    (gRPC itself would fail every call with a bare "Invalid metadata")."""

    def __init__(self, token: str, variable: str = "PGBROKER_TOKEN") -> None:
        token = token.strip()
        if not token:
            raise ValueError(f"an empty bearer token ({variable})")
        if any(not " " <= c <= "~" for c in token):
            raise ValueError(
                f"{variable}: the bearer token holds a character gRPC metadata cannot carry "
                "(a line break, a control or non-ASCII character); use the token alone"
            )
        self._metadata = (("authorization", f"Bearer {token}"),)

    def __call__(self) -> Metadata:
        return self._metadata

    def __repr__(self) -> str:
        return "BearerAuth(<redacted>)"


@dataclass(frozen=True)
class _Keys:
    access_key: str
    secret_key: str = field(repr=False)
    token: str | None = field(default=None, repr=False)


class IamAuth:
    """A signed GetCallerIdentity proof for *audience*, re-signed every *refresh_after* s.

    *sts_endpoint* must be the endpoint the broker verifies with (its
    ``PGBROKER_STS_ENDPOINT``; default ``https://sts.REGION.amazonaws.com/``). *credentials*
    (an object with ``get_frozen_credentials()``, e.g. botocore's) default to the
    ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``/``AWS_SESSION_TOKEN`` variables Lambda sets,
    else botocore's credential chain. The SigV4 signature is computed with the standard
    library (no botocore import on a Lambda cold start; the broker's STS checks it).
    Thread-safe. Raises RuntimeError when no AWS credentials are found.
    """

    def __init__(
        self,
        audience: str,
        *,
        sts_endpoint: str | None = None,
        region: str | None = None,
        credentials: Any = None,
        refresh_after: float = 300.0,
        clock: Callable[[], float] = time.monotonic,
        utcnow: Callable[[], datetime] = lambda: datetime.now(timezone.utc),
    ) -> None:
        if not audience:
            raise ValueError("an audience is required (the broker's PGBROKER_AUTH_AUDIENCE)")
        self.region = region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        if not self.region:
            raise ValueError("no AWS region: pass region= or set AWS_REGION")
        self.audience = audience
        self.sts_endpoint = sts_endpoint or f"https://sts.{self.region}.amazonaws.com/"
        self._credentials = credentials
        self._refresh_after = refresh_after
        self._clock = clock
        self._utcnow = utcnow
        self._lock = threading.Lock()
        self._metadata: Metadata | None = None
        self._signed_at = 0.0

    def __call__(self) -> Metadata:
        with self._lock:
            now = self._clock()
            if self._metadata is None or now - self._signed_at >= self._refresh_after:
                self._metadata = (("authorization", f"AWS4-STS {self.sign()}"),)
                self._signed_at = now
            return self._metadata

    def sign(self) -> str:
        """A fresh proof: base64 JSON ``{"headers": {...}, "body": "..."}``."""
        import base64  # here and below, not at the top: only IAM auth needs them

        keys = self._keys()
        headers = {
            "Content-Type": _CONTENT_TYPE,
            "Host": canonical_host(self.sts_endpoint),
            "X-Amz-Date": self._utcnow().strftime("%Y%m%dT%H%M%SZ"),
            AUDIENCE_HEADER: self.audience,
        }
        if keys.token:
            headers["X-Amz-Security-Token"] = keys.token
        headers["Authorization"] = sigv4_authorization(
            keys, self.region or "", "sts", self.sts_endpoint, headers, _BODY
        )
        token = {"headers": headers, "body": _BODY}
        return base64.b64encode(json.dumps(token).encode()).decode()

    def _keys(self) -> _Keys:
        credentials = self._credentials
        if credentials is None:
            env = os.environ
            if env.get("AWS_ACCESS_KEY_ID") and env.get("AWS_SECRET_ACCESS_KEY"):
                return _Keys(
                    env["AWS_ACCESS_KEY_ID"],
                    env["AWS_SECRET_ACCESS_KEY"],
                    env.get("AWS_SESSION_TOKEN") or None,
                )
            import botocore.session

            credentials = botocore.session.get_session().get_credentials()
            if credentials is None:
                raise RuntimeError("no AWS credentials found to sign the pgbroker IAM proof")
            # Kept for warm invocations: botocore refreshes temporary credentials itself.
            self._credentials = credentials
        frozen = credentials.get_frozen_credentials()
        return _Keys(frozen.access_key, frozen.secret_key, frozen.token)

    def __repr__(self) -> str:
        return f"IamAuth(audience={self.audience!r}, sts_endpoint={self.sts_endpoint!r})"


def canonical_host(url: str) -> str:
    """The Host header SigV4 signs for *url*: lower-case, default port dropped."""
    from urllib.parse import urlsplit  # with ipaddress: 2 ms of a cold start without IAM

    parts = urlsplit(url)
    host = (parts.hostname or "").lower()
    if ":" in host:
        host = f"[{host}]"
    default = {"https": 443, "http": 80}.get(parts.scheme)
    return host if parts.port in (None, default) else f"{host}:{parts.port}"


def sigv4_authorization(
    keys: _Keys, region: str, service: str, url: str, headers: Mapping[str, str], body: str
) -> str:
    """The ``Authorization`` value of AWS Signature Version 4 for a POST of *body* to *url*
    signing every header in *headers* (names compared in lower case)."""
    import hashlib  # here, not at the top: only IAM auth pays for OpenSSL's libcrypto
    import hmac
    from urllib.parse import quote, urlsplit

    amz_date = next(v for k, v in headers.items() if k.lower() == "x-amz-date")
    canonical = {k.lower(): " ".join(v.strip().split()) for k, v in headers.items()}
    signed = ";".join(sorted(canonical))
    canonical_request = "\n".join(
        [
            "POST",
            quote(urlsplit(url).path or "/", safe="/~"),
            "",  # no query string
            "".join(f"{k}:{canonical[k]}\n" for k in sorted(canonical)),
            signed,
            hashlib.sha256(body.encode()).hexdigest(),
        ]
    )
    scope = f"{amz_date[:8]}/{region}/{service}/aws4_request"
    string_to_sign = "\n".join(
        [
            "AWS4-HMAC-SHA256",
            amz_date,
            scope,
            hashlib.sha256(canonical_request.encode()).hexdigest(),
        ]
    )
    key = ("AWS4" + keys.secret_key).encode()
    for part in (amz_date[:8], region, service, "aws4_request"):
        key = hmac.new(key, part.encode(), hashlib.sha256).digest()
    signature = hmac.new(key, string_to_sign.encode(), hashlib.sha256).hexdigest()
    return (
        f"AWS4-HMAC-SHA256 Credential={keys.access_key}/{scope}, "
        f"SignedHeaders={signed}, Signature={signature}"
    )


def auth_from_env(
    environ: Mapping[str, str] | None = None, *, default_audience: str | None = None
) -> Callable[[], Metadata] | None:
    """`auth_for` the configuration in *environ* (default ``os.environ``)."""
    return auth_for(ClientConfig.from_env(environ), default_audience=default_audience)


def auth_for(
    config: ClientConfig, *, default_audience: str | None = None
) -> Callable[[], Metadata] | None:
    """The auth hook *config* asks for (``PGBROKER_AUTH``), or None for ``none``.

    ``iam`` needs an audience (``PGBROKER_AUTH_AUDIENCE``, else ``PGBROKER_URL``, else
    *default_audience*); ``token`` needs ``PGBROKER_TOKEN``. Raise ValueError naming the
    missing variable, or the mode when it is none of these. Nothing is signed until the first
    call.
    """
    if config.auth == "none":
        return None
    if config.auth == "token":
        if not config.token:
            raise ValueError("PGBROKER_AUTH=token needs PGBROKER_TOKEN")
        return BearerAuth(config.token)
    if config.auth == "iam":
        audience = config.auth_audience or config.target or default_audience
        if not audience:
            raise ValueError("PGBROKER_AUTH=iam needs PGBROKER_AUTH_AUDIENCE or PGBROKER_URL")
        return IamAuth(audience, sts_endpoint=config.sts_endpoint, region=config.aws_region)
    raise ValueError(f"PGBROKER_AUTH={config.auth!r}: must be iam, token or none")
