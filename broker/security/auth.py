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

from typing import TYPE_CHECKING

from broker.security.identity import Authenticator, AuthStats, NoAuth
from broker.security.tokens import TokenAuth, parse_tokens, secret_loader

if TYPE_CHECKING:
    from broker.config import Settings

__all__ = ["authenticator_for_settings", "default_sts_endpoint"]


def default_sts_endpoint(region: str) -> str | None:
    """``https://sts.REGION.amazonaws.com/`` for the task's *region*, or None if it is empty."""
    return f"https://sts.{region}.amazonaws.com/" if region else None


def authenticator_for_settings(settings: Settings, stats: AuthStats | None = None) -> Authenticator:
    """The authenticator for ``settings.auth``, built from its auth settings.

    Raise ValueError with one line naming the variable to fix. Reads no secret yet: a token
    secret is read on the first call (and cached).
    """
    stats = stats or AuthStats()
    mode = settings.auth
    if mode == "none":
        return NoAuth()
    if mode == "token":
        if settings.tokens_secret_id:
            return TokenAuth(load_secret=secret_loader(settings.tokens_secret_id))
        if settings.tokens:
            try:
                return TokenAuth(parse_tokens(settings.tokens))
            except ValueError as exc:
                raise ValueError(f"PGBROKER_TOKENS: {exc}") from None
        raise ValueError("PGBROKER_AUTH=token needs PGBROKER_TOKENS or PGBROKER_TOKENS_SECRET_ID")
    if mode == "iam":
        audience = settings.auth_audience.strip()
        roles = [r.strip() for r in settings.iam_allowed_roles.split(",")]
        roles = [r for r in roles if r]
        endpoint = settings.sts_endpoint or default_sts_endpoint(settings.aws_region)
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
