"""Who is calling: ``PGBROKER_AUTH`` = ``iam`` | ``token`` | ``none``, built from the settings.

The factory of the authenticator the gate (`broker.security.gate`) puts in front of every
``pgbroker.v1.Broker`` call. Modes:

* ``iam`` (`broker.security.iam`) — the client signs ``sts:GetCallerIdentity`` with its own (Lambda
  role) credentials and a signed ``x-pgbroker-audience`` header, and sends the signed request as
  ``authorization: AWS4-STS <base64 JSON>``. The broker checks the audience and the signature
  date, then forwards the signed headers to the STS endpoint *it* is configured with
  (``PGBROKER_STS_ENDPOINT``; never a host from the token). STS answers with the caller's ARN
  only if the signature is valid. ``assumed-role/ROLE/…`` is admitted when ROLE matches
  ``PGBROKER_IAM_ALLOWED_ROLES`` (names or ARNs, ``*`` patterns). Verdicts are cached per
  token for less than its lifetime, so STS is called once per token, not per request.
* ``token`` (`broker.security.tokens`) — ``authorization: Bearer <token>`` compared in constant
  time with the tokens of ``PGBROKER_TOKENS`` (comma separated, ``label:token`` names the
  caller) or of a Secrets Manager secret ``PGBROKER_TOKENS_SECRET_ID`` (re-read when an unknown
  token arrives so rotation needs no restart). Several tokens are valid at once during a
  rotation.
* ``none`` (`broker.security.identity.NoAuth`) — everyone is ``anonymous``; the configuration
  allows it only when the broker listens on loopback.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from broker.security.identity import Authenticator, AuthStats, NoAuth
from broker.security.tokens import TokenAuth, parse_tokens, secret_loader

__all__ = ["authenticator_for_settings", "authenticator_from_env", "default_sts_endpoint"]


def default_sts_endpoint(environ: Mapping[str, str]) -> str | None:
    """``https://sts.REGION.amazonaws.com/`` for the task's region, or None if unknown."""
    region = environ.get("AWS_REGION") or environ.get("AWS_DEFAULT_REGION")
    return f"https://sts.{region}.amazonaws.com/" if region else None


def authenticator_from_env(
    mode: str, environ: Mapping[str, str], stats: AuthStats | None = None
) -> Authenticator:
    """Build the authenticator for ``PGBROKER_AUTH=mode`` from ``PGBROKER_*`` variables.

    Raise ValueError with one line naming the variable to fix. Reads no secret yet: a token
    secret is read on the first call (and cached).
    """
    stats = stats or AuthStats()
    if mode == "none":
        return NoAuth()
    if mode == "token":
        if environ.get("PGBROKER_TOKENS_SECRET_ID"):
            return TokenAuth(load_secret=secret_loader(environ["PGBROKER_TOKENS_SECRET_ID"]))
        if environ.get("PGBROKER_TOKENS"):
            try:
                return TokenAuth(parse_tokens(environ["PGBROKER_TOKENS"]))
            except ValueError as exc:
                raise ValueError(f"PGBROKER_TOKENS: {exc}") from None
        raise ValueError("PGBROKER_AUTH=token needs PGBROKER_TOKENS or PGBROKER_TOKENS_SECRET_ID")
    if mode == "iam":
        audience = environ.get("PGBROKER_AUTH_AUDIENCE", "").strip()
        roles = [r.strip() for r in environ.get("PGBROKER_IAM_ALLOWED_ROLES", "").split(",")]
        roles = [r for r in roles if r]
        endpoint = environ.get("PGBROKER_STS_ENDPOINT") or default_sts_endpoint(environ)
        if not audience:
            raise ValueError(
                "PGBROKER_AUTH=iam needs PGBROKER_AUTH_AUDIENCE (e.g. the broker's URL; the"
                " client signs the same value)"
            )
        if not roles:
            raise ValueError("PGBROKER_AUTH=iam needs PGBROKER_IAM_ALLOWED_ROLES (role names/ARNs)")
        if not endpoint:
            raise ValueError("PGBROKER_AUTH=iam needs PGBROKER_STS_ENDPOINT or AWS_REGION")
        from broker.security.iam import IamAuth

        return IamAuth(sts_endpoint=endpoint, audience=audience, allowed_roles=roles, stats=stats)
    raise ValueError(f"PGBROKER_AUTH={mode!r}: must be one of iam, token, none")


def authenticator_for_settings(settings: Any, stats: AuthStats | None = None) -> Authenticator:
    """The authenticator for a `broker.config.Settings` (its auth fields)."""
    environ = {
        "PGBROKER_AUTH_AUDIENCE": settings.auth_audience,
        "PGBROKER_IAM_ALLOWED_ROLES": settings.iam_allowed_roles,
        "PGBROKER_STS_ENDPOINT": settings.sts_endpoint,
        "PGBROKER_TOKENS": settings.tokens,
        "PGBROKER_TOKENS_SECRET_ID": settings.tokens_secret_id,
    }
    environ.update(
        {k: v for k, v in os.environ.items() if k in ("AWS_REGION", "AWS_DEFAULT_REGION")}
    )
    return authenticator_from_env(settings.auth, {k: v for k, v in environ.items() if v}, stats)
