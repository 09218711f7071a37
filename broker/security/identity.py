"""Who is calling, in words every authentication mode shares.

An `Authenticator` turns a call's metadata into an `Identity` or raises an `AuthError`:
UNAUTHENTICATED (no, bad or expired credentials), `PermissionDenied` (a valid identity that is
not allowed) or `AuthUnavailable` (the identity could not be verified right now). The gate
(`broker.security.gate`) sets `current_identity` for the handler and counts refusals in
`AuthStats`. `NoAuth` is ``PGBROKER_AUTH=none``; token and IAM authentication live in
`broker.security.tokens` and `broker.security.iam`, and read the ``authorization`` metadata
with `split_scheme`.

Imports only the shared error vocabulary (`broker.errors`), so every other security module
can import this one.
"""

from __future__ import annotations

import contextvars
import fnmatch
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

from broker.errors import BrokerFailure, Code, Reason

__all__ = [
    "AuthError",
    "AuthStats",
    "AuthUnavailable",
    "Authenticator",
    "Identity",
    "NoAuth",
    "PermissionDenied",
    "SourceThrottled",
    "current_identity",
    "split_scheme",
]

MAX_AUTHORIZATION_BYTES = 6_144  # a real proof is ~2-3 KiB; gRPC caps metadata at 8 KiB


@dataclass(frozen=True)
class Identity:
    """An authenticated caller.

    ``kind`` is ``iam``, ``token`` or ``none``; ``name`` is the IAM role (or user) name, the
    token's label, or ``anonymous``; ``arn`` is the caller ARN STS returned (iam only).
    """

    kind: str
    name: str
    arn: str | None = None
    account: str | None = None

    @property
    def role_arn(self) -> str | None:
        """``arn:…:iam::ACCOUNT:role/NAME`` for an assumed role (the path is not known)."""
        if self.arn is None or ":assumed-role/" not in self.arn:
            return None
        partition = self.arn.split(":")[1]
        return f"arn:{partition}:iam::{self.account}:role/{self.name}"

    def matches(self, pattern: str) -> bool:
        """True if *pattern* (a name, or an ARN when it starts with ``arn:``; ``*`` and ``?``
        wildcards) matches this identity. Case-sensitive, like ARNs."""
        if pattern.startswith("arn:"):
            if self.role_arn and fnmatch.fnmatchcase(self.role_arn, _without_role_path(pattern)):
                return True
            return self.arn is not None and fnmatch.fnmatchcase(self.arn, pattern)
        return fnmatch.fnmatchcase(self.name, pattern)

    def __str__(self) -> str:
        return self.arn or f"{self.kind}:{self.name}"


# The caller of the RPC being served; set by the gate around the handler.
current_identity: contextvars.ContextVar[Identity | None] = contextvars.ContextVar(
    "pgbroker_identity", default=None
)


def _without_role_path(pattern: str) -> str:
    """``arn:…:role/service-role/app`` → ``arn:…:role/app``: an assumed-role ARN carries no
    path, so a role ARN with one is compared by its account and name."""
    head, sep, rest = pattern.partition(":role/")
    return f"{head}{sep}{rest.rsplit('/', 1)[-1]}" if sep and ":iam::" in head else pattern


class AuthError(BrokerFailure):
    """The caller is refused: UNAUTHENTICATED (no, bad or expired credentials), or a subclass's
    status. ``message`` goes to the caller and the log; it never holds a token. ``caller_arn``
    is logged when known.

    Tree::

        AuthError          UNAUTHENTICATED / UNAUTHENTICATED
        ├── PermissionDenied  PERMISSION_DENIED / PERMISSION_DENIED
        └── AuthUnavailable   UNAVAILABLE / AUTH_UNAVAILABLE (retry_after set)
            └── SourceThrottled  the same; the address is over its STS refusal budget

    ``counts_against_source``: whether the refusal counts towards its address's budget of
    refusals (`broker.security.tarpit.Tarpit`).
    """

    code = Code.UNAUTHENTICATED
    reason = Reason.UNAUTHENTICATED
    counts_against_source = True

    def __init__(
        self, message: str, *, caller_arn: str | None = None, retry_after: float | None = None
    ) -> None:
        super().__init__(message, retry_after=retry_after)
        self.caller_arn = caller_arn


class PermissionDenied(AuthError):
    """A verified identity that is not allowed to call this broker."""

    code = Code.PERMISSION_DENIED
    reason = Reason.PERMISSION_DENIED


class AuthUnavailable(AuthError):
    """The identity could not be verified right now (STS or the token secret unreachable);
    a retry after ``retry_after`` seconds may succeed, so the verdict is never cached."""

    code = Code.UNAVAILABLE
    reason = Reason.AUTH_UNAVAILABLE
    # Not the caller's doing: STS or a secret out of reach refuses every caller alike.
    counts_against_source = False


class SourceThrottled(AuthUnavailable):
    """Refused without an STS call: the caller's address had too many proofs refused by STS
    (`broker.security.stsgate.VerifyGate`). Retryable, but counted against the address."""

    counts_against_source = True


class Authenticator(Protocol):
    """Turns a call's metadata into an `Identity` or raises `AuthError`."""

    async def authenticate(self, metadata: Mapping[str, str], source: str = "") -> Identity:
        """*source*: the caller's network address (`broker.security.stsgate.peer_host`),
        "" when unknown; authenticators that call out per new credential bound by it."""
        ...


@dataclass
class AuthStats:
    """Counters for GetStats: ``auth_failures``, ``auth_sts_calls``, ``auth_cache_hits``,
    ``auth_throttled`` (proofs refused without an STS call: broker/security/stsgate.py),
    ``auth_held`` (of them, held before their refusal: a source over its STS refusal budget)."""

    auth_failures: int = 0
    auth_sts_calls: int = 0
    auth_cache_hits: int = 0
    auth_throttled: int = 0
    auth_held: int = 0

    def as_dict(self) -> dict[str, int]:
        return {
            "auth_failures": self.auth_failures,
            "auth_sts_calls": self.auth_sts_calls,
            "auth_cache_hits": self.auth_cache_hits,
            "auth_throttled": self.auth_throttled,
            "auth_held": self.auth_held,
        }


class NoAuth:
    """``PGBROKER_AUTH=none``: everyone is ``anonymous``. The configuration allows it only on
    a loopback listener (`broker.config.load_settings` refuses it anywhere else)."""

    anonymous = Identity("none", "anonymous")

    async def authenticate(self, metadata: Mapping[str, str], source: str = "") -> Identity:
        return self.anonymous


def split_scheme(metadata: Mapping[str, str], expected: str) -> str:
    """The credential of ``authorization: <expected> <credential>`` (the scheme compared
    case-insensitively); raise `AuthError` if the metadata is missing, too large or of another
    scheme."""
    value = metadata.get("authorization")
    if not value:
        raise AuthError(
            f"missing 'authorization' metadata; this broker expects '{expected} <token>'"
        )
    if len(value) > MAX_AUTHORIZATION_BYTES:
        raise AuthError("'authorization' metadata is too large")
    scheme, _, credential = value.strip().partition(" ")
    if scheme.lower() != expected.lower() or not credential.strip():
        raise AuthError(f"'authorization' metadata must be '{expected} <token>' for this broker")
    return credential.strip()
