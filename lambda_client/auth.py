"""Credentials a `BrokerClient` sends: an IAM proof of identity or a bearer token.

``iam`` (the default the SAM template uses): `IamAuth` signs an ``sts:GetCallerIdentity``
request with the function's own role credentials (SigV4, via botocore, which the Lambda
runtime already ships) and a signed ``x-pgbroker-audience`` header that binds it to one
broker, and sends it as ``authorization: AWS4-STS <base64 JSON>``. The broker forwards it to
STS, which answers with the caller's ARN only if the signature is valid. Nothing secret is
stored; the proof is re-signed every *refresh_after* seconds (5 minutes), not per call, and
the broker caches its verdict for that proof.

``token``: `BearerAuth` sends ``authorization: Bearer <token>``.

`auth_from_env` picks one from ``PGBROKER_AUTH`` (``iam`` | ``token`` | ``none``),
``PGBROKER_TOKEN``, ``PGBROKER_AUTH_AUDIENCE`` (default: ``PGBROKER_URL``) and
``PGBROKER_STS_ENDPOINT`` (default: regional STS of ``AWS_REGION``). botocore is imported only
when an IAM proof is first signed, so importing the client stays cheap.
"""

from __future__ import annotations

import base64
import json
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

__all__ = ["AUDIENCE_HEADER", "BearerAuth", "IamAuth", "auth_from_env"]

AUDIENCE_HEADER = "x-pgbroker-audience"
_BODY = "Action=GetCallerIdentity&Version=2011-06-15"
_CONTENT_TYPE = "application/x-www-form-urlencoded; charset=utf-8"

Metadata = Sequence[tuple[str, str]]


class BearerAuth:
    """``authorization: Bearer <token>`` on every call (``token`` mode)."""

    def __init__(self, token: str) -> None:
        if not token:
            raise ValueError("an empty bearer token")
        self._metadata = (("authorization", f"Bearer {token}"),)

    def __call__(self) -> Metadata:
        return self._metadata

    def __repr__(self) -> str:
        return "BearerAuth(<redacted>)"


class IamAuth:
    """A signed GetCallerIdentity proof for *audience*, re-signed every *refresh_after* s.

    *sts_endpoint* must be the endpoint the broker verifies with (its
    ``PGBROKER_STS_ENDPOINT``; default ``https://sts.REGION.amazonaws.com/``). *credentials*
    (an object with ``get_frozen_credentials()``) defaults to botocore's chain, i.e. the
    Lambda role. Thread-safe. Raises RuntimeError when no AWS credentials are found.
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
        from urllib.parse import urlsplit

        from botocore.auth import SigV4Auth
        from botocore.awsrequest import AWSRequest

        frozen = self._frozen_credentials()
        request = AWSRequest(
            method="POST",
            url=self.sts_endpoint,
            data=_BODY,
            headers={
                "Host": urlsplit(self.sts_endpoint).netloc,
                "Content-Type": _CONTENT_TYPE,
                AUDIENCE_HEADER: self.audience,
            },
        )
        SigV4Auth(frozen, "sts", self.region).add_auth(request)
        token = {"headers": dict(request.headers.items()), "body": _BODY}
        return base64.b64encode(json.dumps(token).encode()).decode()

    def _frozen_credentials(self) -> Any:
        credentials = self._credentials
        if credentials is None:
            import botocore.session

            credentials = botocore.session.get_session().get_credentials()
            if credentials is None:
                raise RuntimeError("no AWS credentials found to sign the pgbroker IAM proof")
        return credentials.get_frozen_credentials()

    def __repr__(self) -> str:
        return f"IamAuth(audience={self.audience!r}, sts_endpoint={self.sts_endpoint!r})"


def auth_from_env(
    environ: Mapping[str, str] | None = None, *, default_audience: str | None = None
) -> Callable[[], Metadata] | None:
    """The auth hook ``PGBROKER_AUTH`` asks for, or None for ``none``/unset.

    ``iam`` needs an audience (``PGBROKER_AUTH_AUDIENCE``, else ``PGBROKER_URL``, else
    *default_audience*); ``token`` needs ``PGBROKER_TOKEN``. Raise ValueError naming the
    missing variable. Nothing is signed until the first call.
    """
    env = os.environ if environ is None else environ
    mode = env.get("PGBROKER_AUTH", "").strip().lower()
    if mode in ("", "none"):
        return None
    if mode == "token":
        token = env.get("PGBROKER_TOKEN", "")
        if not token:
            raise ValueError("PGBROKER_AUTH=token needs PGBROKER_TOKEN")
        return BearerAuth(token)
    if mode == "iam":
        audience = env.get("PGBROKER_AUTH_AUDIENCE") or env.get("PGBROKER_URL") or default_audience
        if not audience:
            raise ValueError("PGBROKER_AUTH=iam needs PGBROKER_AUTH_AUDIENCE or PGBROKER_URL")
        return IamAuth(
            audience,
            sts_endpoint=env.get("PGBROKER_STS_ENDPOINT") or None,
            region=env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or None,
        )
    raise ValueError(f"PGBROKER_AUTH={mode!r}: must be iam, token or none")
