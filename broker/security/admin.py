"""The operator's identity: who may call the ``pgbroker.v1.Admin`` RPCs (pause, resume, reload,
show callers).

An admin identity is separate from a caller's, as PgBouncer's ``admin_users`` are from its
``auth_file`` users:

* a bearer token of ``PGBROKER_ADMIN_TOKENS`` (``label:token``, at least 16 characters, none
  of them also in ``PGBROKER_TOKENS``) or of the secret ``PGBROKER_ADMIN_TOKENS_SECRET_ID``;
* with ``PGBROKER_AUTH=iam``, an IAM role of ``PGBROKER_ADMIN_ROLES`` (names or ARNs, ``*``
  patterns), proven by the same signed ``sts:GetCallerIdentity`` a Lambda sends.

`AdminAuth` refuses:

* every call when neither is configured (PERMISSION_DENIED, naming what to set): a broker
  whose operator never chose an admin identity has no admin door, even on loopback;
* a caller the Broker service admits but who is no admin (PERMISSION_DENIED, naming the
  identity);
* anything else as the callers' authenticator would (UNAUTHENTICATED).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from broker.security.identity import (
    Authenticator,
    AuthError,
    AuthStats,
    Identity,
    PermissionDenied,
)
from broker.security.tokens import BEARER_SCHEME, TokenAuth, parse_tokens, secret_loader

if TYPE_CHECKING:
    from broker.config import Settings

__all__ = ["NOT_CONFIGURED", "AdminAuth", "admin_authenticator_for_settings"]

NOT_CONFIGURED = (
    "no admin identity is configured on this broker: set PGBROKER_ADMIN_TOKENS (or"
    " PGBROKER_ADMIN_TOKENS_SECRET_ID), or PGBROKER_ADMIN_ROLES with PGBROKER_AUTH=iam, then"
    " reload or restart it (docs/security.md)"
)


class AdminAuth:
    """Admits admin identities only (see the module docstring). *tokens* checks the operators'
    bearer tokens, *iam* their IAM roles (its allowed roles are the admin roles); *callers* is
    the Broker service's authenticator, asked only to tell a known caller (PERMISSION_DENIED)
    from a stranger (UNAUTHENTICATED)."""

    def __init__(
        self,
        *,
        tokens: TokenAuth | None,
        iam: Authenticator | None,
        callers: Authenticator | None,
    ) -> None:
        self.tokens = tokens
        self.iam = iam
        self.callers = callers

    @property
    def configured(self) -> bool:
        return self.tokens is not None or self.iam is not None

    async def authenticate(self, metadata: Mapping[str, str], source: str = "") -> Identity:
        if not self.configured:
            raise PermissionDenied(NOT_CONFIGURED)
        scheme = (metadata.get("authorization") or "").strip().partition(" ")[0].lower()
        if scheme == BEARER_SCHEME.lower() and self.tokens is not None:
            try:
                return await self.tokens.authenticate(metadata, source)
            except AuthError:
                await self._refuse_known_caller(metadata, source)
                raise AuthError("unknown admin token") from None
        if scheme != BEARER_SCHEME.lower() and self.iam is not None:
            try:
                return await self.iam.authenticate(metadata, source)
            except PermissionDenied as exc:
                raise PermissionDenied(
                    f"{exc.caller_arn or 'the caller'} is not an admin role (PGBROKER_ADMIN_ROLES)",
                    caller_arn=exc.caller_arn,
                ) from None
        await self._refuse_known_caller(metadata, source)
        expected = [BEARER_SCHEME + " <admin token>"] if self.tokens else []
        expected += ["AWS4-STS <proof of an admin role>"] if self.iam else []
        raise AuthError(f"the Admin RPCs need an admin identity: {' or '.join(expected)}")

    async def _refuse_known_caller(self, metadata: Mapping[str, str], source: str) -> None:
        """Raise PermissionDenied if *metadata* proves a caller of the Broker service."""
        if self.callers is None or not metadata.get("authorization"):
            return
        try:
            identity = await self.callers.authenticate(metadata, source)
        except AuthError:
            return
        raise PermissionDenied(
            f"{identity} is a caller, not an admin identity (PGBROKER_ADMIN_TOKENS,"
            " PGBROKER_ADMIN_ROLES)",
            caller_arn=identity.arn,
        )


def admin_authenticator_for_settings(
    settings: Settings, callers: Authenticator | None = None, stats: AuthStats | None = None
) -> AdminAuth:
    """The `AdminAuth` of *settings*; raise ValueError with one line naming the variable to
    fix. Reads no secret yet (a token secret is read on the first admin call)."""
    tokens: TokenAuth | None = None
    if settings.admin_tokens_secret_id:
        tokens = TokenAuth(load_secret=secret_loader(settings.admin_tokens_secret_id))
    elif settings.admin_tokens:
        try:
            known = parse_tokens(settings.admin_tokens)
        except ValueError as exc:
            raise ValueError(f"PGBROKER_ADMIN_TOKENS: {exc}") from None
        _refuse_shared_tokens(known, settings.tokens)
        tokens = TokenAuth(known)
    iam: Authenticator | None = None
    roles = [role.strip() for role in settings.admin_roles.split(",") if role.strip()]
    if roles and settings.auth == "iam":
        from broker.security.auth import default_sts_endpoint
        from broker.security.iam import IamAuth

        endpoint = settings.sts_endpoint or default_sts_endpoint(settings.aws_region)
        if endpoint and settings.auth_audience:  # else the callers' check names what is missing
            iam = IamAuth(
                sts_endpoint=endpoint,
                audience=settings.auth_audience.strip(),
                allowed_roles=roles,
                stats=stats,
            )
    return AdminAuth(tokens=tokens, iam=iam, callers=callers)


def _refuse_shared_tokens(admin: Mapping[str, str], callers_text: str) -> None:
    """An operator's token that is also a caller's would make every such caller an admin."""
    try:
        callers = parse_tokens(callers_text) if callers_text else {}
    except ValueError:
        return  # PGBROKER_TOKENS' own check names its problem
    shared = sorted({admin[token] for token in admin if token in callers})
    if shared:
        raise ValueError(
            f"PGBROKER_ADMIN_TOKENS: a token is also in PGBROKER_TOKENS (admin labels: {shared});"
            " an operator's token must be its own"
        )
