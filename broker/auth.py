"""Who is calling: ``PGBROKER_AUTH`` = ``iam`` | ``token`` | ``none``, as a gRPC interceptor.

`AuthInterceptor` authenticates every ``pgbroker.v1.Broker`` call before the servicer runs;
health checks and reflection stay open so load balancers can probe the broker. A verified
caller is an `Identity`, available to the servicer through `current_identity` (for the role
map and per-identity limits). Failures end the call with UNAUTHENTICATED (no, bad or expired
credentials) or PERMISSION_DENIED (a valid identity that is not allowed), a
``google.rpc.ErrorInfo`` with the same reason, a log line with the reason and the caller ARN
when known — never the token — and one more ``auth_failures`` in the stats.

Modes:

* ``iam`` — the client signs ``sts:GetCallerIdentity`` with its own (Lambda role) credentials
  and a signed ``x-pgbroker-audience`` header, and sends the signed request as
  ``authorization: AWS4-STS <base64 JSON>``. The broker checks the audience and the signature
  date, then forwards the signed headers to the STS endpoint *it* is configured with
  (``PGBROKER_STS_ENDPOINT``; never a host from the token). STS answers with the caller's ARN
  only if the signature is valid. ``assumed-role/ROLE/…`` is admitted when ROLE matches
  ``PGBROKER_IAM_ALLOWED_ROLES`` (names or ARNs, ``*`` patterns). Verdicts are cached per
  token for less than its lifetime, so STS is called once per token, not per request.
* ``token`` — ``authorization: Bearer <token>`` compared in constant time with the tokens of
  ``PGBROKER_TOKENS`` (comma separated, ``label:token`` names the caller) or of a Secrets
  Manager secret ``PGBROKER_TOKENS_SECRET_ID`` (read through aws-lambda-powertools, cached,
  re-read when an unknown token arrives so rotation needs no restart). Several tokens are
  valid at once during a rotation.
* ``none`` — everyone is ``anonymous``; only allowed when the broker listens on loopback
  (`check_auth_listen`).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextvars
import fnmatch
import hashlib
import hmac
import inspect
import json
import logging
import time
import urllib.error
import urllib.request
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol
from urllib.parse import parse_qs, urlsplit
from xml.etree import ElementTree

import grpc
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

__all__ = [
    "AUDIENCE_HEADER",
    "AuthError",
    "AuthInterceptor",
    "AuthStats",
    "Authenticator",
    "IamAuth",
    "Identity",
    "NoAuth",
    "TokenAuth",
    "authenticator_from_env",
    "check_auth_listen",
    "current_identity",
    "parse_allowed_roles",
]

log = logging.getLogger("pgbroker.auth")

AUDIENCE_HEADER = "x-pgbroker-audience"
IAM_SCHEME = "AWS4-STS"
BEARER_SCHEME = "Bearer"
PROTECTED_SERVICE_PREFIX = "/pgbroker.v1.Broker/"
GET_CALLER_IDENTITY_BODY = {"Action": ["GetCallerIdentity"], "Version": ["2011-06-15"]}

MAX_AUTHORIZATION_BYTES = 6_144  # a real proof is ~2-3 KiB; gRPC caps metadata at 8 KiB
TOKEN_MAX_AGE = 900.0  # seconds; AWS itself refuses SigV4 signatures older than 15 minutes
FUTURE_SKEW = 300.0  # seconds a signature date may lie in the future (clock skew)
POSITIVE_CACHE_TTL = 600.0  # never longer than the token's own remaining lifetime
NEGATIVE_CACHE_TTL = 60.0  # a rejected token is not re-sent to STS for this long
CACHE_MAX_ENTRIES = 10_000
STS_TIMEOUT = 5.0


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


# The caller of the RPC being served; set by `AuthInterceptor` around the handler.
current_identity: contextvars.ContextVar[Identity | None] = contextvars.ContextVar(
    "pgbroker_identity", default=None
)


def _without_role_path(pattern: str) -> str:
    """``arn:…:role/service-role/app`` → ``arn:…:role/app``: an assumed-role ARN carries no
    path, so a role ARN with one is compared by its account and name."""
    head, sep, rest = pattern.partition(":role/")
    return f"{head}{sep}{rest.rsplit('/', 1)[-1]}" if sep and ":iam::" in head else pattern


class AuthError(Exception):
    """The caller is refused: ``code`` UNAUTHENTICATED or PERMISSION_DENIED (UNAVAILABLE when
    STS could not be reached). ``message`` goes to the caller and the log; it never holds a
    token. ``caller_arn`` is logged when known."""

    def __init__(
        self,
        code: grpc.StatusCode,
        message: str,
        *,
        caller_arn: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.caller_arn = caller_arn
        self.retry_after = retry_after

    @property
    def reason(self) -> str:
        return {
            grpc.StatusCode.PERMISSION_DENIED: "PERMISSION_DENIED",
            grpc.StatusCode.UNAVAILABLE: "AUTH_UNAVAILABLE",
        }.get(self.code, "UNAUTHENTICATED")


def _unauthenticated(message: str, caller_arn: str | None = None) -> AuthError:
    return AuthError(grpc.StatusCode.UNAUTHENTICATED, message, caller_arn=caller_arn)


class Authenticator(Protocol):
    """Turns a call's metadata into an `Identity` or raises `AuthError`."""

    mode: str

    async def authenticate(self, metadata: Mapping[str, str]) -> Identity: ...


@dataclass
class AuthStats:
    """Counters for GetStats: ``auth_failures``, ``auth_sts_calls``, ``auth_cache_hits``."""

    auth_failures: int = 0
    auth_sts_calls: int = 0
    auth_cache_hits: int = 0

    def as_dict(self) -> dict[str, int]:
        return {
            "auth_failures": self.auth_failures,
            "auth_sts_calls": self.auth_sts_calls,
            "auth_cache_hits": self.auth_cache_hits,
        }


# --------------------------------------------------------------------------------------------
# none


class NoAuth:
    """Everyone is ``anonymous``. Use only on loopback (`check_auth_listen` enforces it)."""

    mode = "none"
    _anonymous = Identity("none", "anonymous")

    async def authenticate(self, metadata: Mapping[str, str]) -> Identity:
        return self._anonymous


def check_auth_listen(mode: str, listen_hosts: Iterable[str]) -> str | None:
    """One-line reason why *mode* may not serve on *listen_hosts*, or None if it may.

    ``none`` is allowed only when every listen address is loopback.
    """
    if mode != "none":
        return None
    import ipaddress

    for host in listen_hosts:
        bare = host.strip("[]")
        if bare == "localhost":
            continue
        try:
            if ipaddress.ip_address(bare).is_loopback:
                continue
        except ValueError:
            pass
        return (
            f"PGBROKER_AUTH=none is only allowed on a loopback listener, not {host!r}; "
            "set PGBROKER_AUTH=iam or token"
        )
    return None


# --------------------------------------------------------------------------------------------
# token


def _split_scheme(metadata: Mapping[str, str], expected: str) -> str:
    value = metadata.get("authorization")
    if not value:
        raise _unauthenticated(
            f"missing 'authorization' metadata; this broker expects '{expected} <token>'"
        )
    if len(value) > MAX_AUTHORIZATION_BYTES:
        raise _unauthenticated("'authorization' metadata is too large")
    scheme, _, credential = value.strip().partition(" ")
    if scheme.lower() != expected.lower() or not credential.strip():
        raise _unauthenticated(
            f"'authorization' metadata must be '{expected} <token>' for this broker"
        )
    return credential.strip()


def parse_tokens(text: str) -> dict[str, str]:
    """Tokens from ``PGBROKER_TOKENS`` or a secret, as ``{token: label}``.

    Accepts ``tok1,tok2`` or ``label:tok,…``, a JSON list of tokens, or a JSON object
    ``{"tokens": [...]}`` / ``{"tokens": {"label": "tok"}}`` / ``{"label": "tok"}``.
    Raise ValueError (naming no token) if nothing usable is found.
    """
    text = text.strip()
    entries: list[tuple[str, str]] = []
    if text.startswith(("[", "{")):
        data: Any = json.loads(text)
        if isinstance(data, dict) and "tokens" in data:
            data = data["tokens"]
        if isinstance(data, list):
            entries = [("token", str(t)) for t in data]
        elif isinstance(data, dict):
            entries = [(str(k), str(v)) for k, v in data.items()]
    else:
        for item in text.split(","):
            label, _, token = item.strip().rpartition(":")
            entries.append((label.strip() or "token", token.strip()))
    tokens = {token: label for label, token in entries if token}
    if not tokens:
        raise ValueError("no tokens found")
    short = [label for token, label in tokens.items() if len(token) < 16]
    if short:
        raise ValueError(f"tokens must be at least 16 characters (labels: {sorted(set(short))})")
    return tokens


class TokenAuth:
    """Bearer tokens, compared in constant time; several valid at once for rotation.

    *tokens* is fixed (``PGBROKER_TOKENS``) or *load_secret* returns the secret's text
    (``PGBROKER_TOKENS_SECRET_ID``), re-read every *refresh_interval* seconds and, at most
    every *min_reload_interval* seconds, when an unknown token arrives (a rotation just added
    it). A failed re-read keeps the tokens already known.
    """

    mode = "token"

    def __init__(
        self,
        tokens: Mapping[str, str] | None = None,
        *,
        load_secret: Callable[[], str] | None = None,
        refresh_interval: float = 300.0,
        min_reload_interval: float = 30.0,
    ) -> None:
        if (tokens is None) == (load_secret is None):
            raise ValueError("give either tokens or load_secret")
        self._tokens: dict[str, str] = dict(tokens or {})
        self._load_secret = load_secret
        self._refresh_interval = refresh_interval
        self._min_reload_interval = min_reload_interval
        self._loaded_at: float | None = None
        self._reload: asyncio.Task[None] | None = None

    async def authenticate(self, metadata: Mapping[str, str]) -> Identity:
        presented = _split_scheme(metadata, BEARER_SCHEME)
        if self._load_secret is not None and self._due(self._refresh_interval):
            await self._reload_tokens()
        label = self._lookup(presented)
        if label is None and self._load_secret is not None and self._due(self._min_reload_interval):
            await self._reload_tokens()
            label = self._lookup(presented)
        if label is None:
            raise _unauthenticated("unknown bearer token")
        return Identity("token", label)

    def _lookup(self, presented: str) -> str | None:
        found = None
        given = presented.encode()
        for token, label in self._tokens.items():
            # Compare against every token, so timing does not tell which one came close.
            if hmac.compare_digest(given, token.encode()):
                found = label
        return found

    def _due(self, interval: float) -> bool:
        return self._loaded_at is None or time.monotonic() - self._loaded_at >= interval

    async def _reload_tokens(self) -> None:
        if self._reload is None or self._reload.done():
            self._reload = asyncio.ensure_future(self._do_reload())
        await asyncio.shield(self._reload)

    async def _do_reload(self) -> None:
        assert self._load_secret is not None
        try:
            text = await asyncio.to_thread(self._load_secret)
            self._tokens = parse_tokens(text)
        except Exception as exc:  # keep serving with the tokens already known
            log.error("cannot read the bearer tokens secret: %s", type(exc).__name__)
            if not self._tokens:
                raise AuthError(
                    grpc.StatusCode.UNAVAILABLE,
                    "the broker cannot read its token secret; retry later",
                    retry_after=5.0,
                ) from exc
        finally:
            self._loaded_at = time.monotonic()


def secret_loader(secret_id: str, *, max_age: int = 300) -> Callable[[], str]:
    """A loader reading *secret_id* with aws-lambda-powertools' parameters utility.

    Powertools caches the value for *max_age* seconds; ``force_fetch`` bypasses it when
    `TokenAuth` re-reads after an unknown token. The endpoint follows the usual AWS
    configuration (``AWS_ENDPOINT_URL_SECRETS_MANAGER`` in tests).
    """

    def load() -> str:
        from aws_lambda_powertools.utilities import parameters

        value = parameters.get_secret(secret_id, max_age=max_age, force_fetch=True)
        return value.decode() if isinstance(value, bytes) else str(value)

    return load


# --------------------------------------------------------------------------------------------
# iam


def parse_allowed_roles(text: str) -> tuple[str, ...]:
    """``PGBROKER_IAM_ALLOWED_ROLES``: comma separated role names or ARNs, ``*`` patterns."""
    return tuple(p.strip() for p in text.split(",") if p.strip())


@dataclass(frozen=True)
class SignedRequest:
    """A client's signed GetCallerIdentity request, as carried in the token."""

    headers: dict[str, str]  # lower-case names
    body: str
    signed_headers: frozenset[str]
    signed_at: float  # epoch seconds of X-Amz-Date
    access_key_hint: str = field(default="", repr=False)


def decode_iam_token(credential: str) -> SignedRequest:
    """Parse the base64 JSON token; raise `AuthError` (UNAUTHENTICATED) saying what is wrong.

    Checks shape only (headers, body, SigV4 fields); the signature is STS's to check.
    """
    try:
        data = json.loads(base64.b64decode(credential, validate=True))
        raw_headers = data["headers"]
        body = data["body"]
        if not isinstance(raw_headers, dict) or not isinstance(body, str):
            raise TypeError("headers must be an object and body a string")
        headers = {str(k).lower(): str(v) for k, v in raw_headers.items()}
    except (binascii.Error, ValueError, KeyError, TypeError, UnicodeDecodeError):
        raise _unauthenticated(
            "malformed AWS4-STS token (expected base64 JSON with headers and body)"
        ) from None
    if parse_qs(body, keep_blank_values=True) != GET_CALLER_IDENTITY_BODY:
        raise _unauthenticated(
            "the AWS4-STS token must sign sts:GetCallerIdentity and nothing else"
        )
    sigv4 = headers.get("authorization", "")
    fields = _sigv4_fields(sigv4)
    scope = fields.get("Credential", "").split("/")
    if not sigv4.startswith("AWS4-HMAC-SHA256 ") or len(scope) != 5 or scope[3] != "sts":
        raise _unauthenticated("the AWS4-STS token carries no SigV4 signature for sts")
    signed = frozenset(fields.get("SignedHeaders", "").split(";"))
    missing = {"host", "x-amz-date", AUDIENCE_HEADER} - signed
    if missing or not fields.get("Signature"):
        raise _unauthenticated(
            f"the AWS4-STS token must sign {', '.join(sorted(missing)) or 'a signature'}"
        )
    if not signed <= set(headers):
        raise _unauthenticated("the AWS4-STS token lacks some of its signed headers")
    try:
        signed_at = datetime.strptime(headers["x-amz-date"], "%Y%m%dT%H%M%SZ")
    except ValueError:
        raise _unauthenticated("the AWS4-STS token has a malformed X-Amz-Date") from None
    return SignedRequest(
        headers=headers,
        body=body,
        signed_headers=signed,
        signed_at=signed_at.replace(tzinfo=UTC).timestamp(),
        access_key_hint=scope[0][:4],
    )


def _sigv4_fields(value: str) -> dict[str, str]:
    _, _, rest = value.partition(" ")
    fields = {}
    for part in rest.split(","):
        key, _, val = part.strip().partition("=")
        fields[key] = val
    return fields


def parse_caller_arn(arn: str) -> Identity:
    """An `Identity` from a GetCallerIdentity ARN (assumed role, IAM user or root)."""
    parts = arn.split(":", 5)
    if len(parts) != 6 or parts[0] != "arn":
        raise _unauthenticated("STS returned an unexpected caller ARN")
    account, resource = parts[4], parts[5]
    kind, _, rest = resource.partition("/")
    if kind == "assumed-role":
        role = rest.split("/", 1)[0]
        return Identity("iam", role, arn=arn, account=account)
    name = rest.rsplit("/", 1)[-1] if rest else kind
    return Identity("iam", name, arn=arn, account=account)


PostFn = Callable[[str, Mapping[str, str], bytes], tuple[int, bytes]]


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None  # the signed request goes to the configured endpoint, nowhere else


_opener = urllib.request.build_opener(_NoRedirect())


def http_post(url: str, headers: Mapping[str, str], body: bytes) -> tuple[int, bytes]:
    """POST *body* to *url* with exactly *headers*; return (status, body). Blocking."""
    request = urllib.request.Request(url, data=body, headers=dict(headers), method="POST")
    try:
        with _opener.open(request, timeout=STS_TIMEOUT) as response:
            return response.status, response.read(65536)
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read(65536)


class IamAuth:
    """IAM identities proven by a signed ``sts:GetCallerIdentity`` (see the module docstring).

    *sts_endpoint* is where the broker sends the signed request (``https://sts.REGION.
    amazonaws.com/``); *audience* must equal the signed ``x-pgbroker-audience`` header;
    *allowed_roles* are names or ARN patterns. *post* (blocking) is replaceable for tests that
    count calls; by default it uses urllib without following redirects.
    """

    mode = "iam"

    def __init__(
        self,
        *,
        sts_endpoint: str,
        audience: str,
        allowed_roles: Sequence[str],
        stats: AuthStats | None = None,
        post: PostFn = http_post,
        max_age: float = TOKEN_MAX_AGE,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not audience:
            raise ValueError("an audience is required for iam authentication")
        if not allowed_roles:
            raise ValueError("PGBROKER_IAM_ALLOWED_ROLES must name at least one role")
        self.sts_endpoint = sts_endpoint
        self._sts_host = urlsplit(sts_endpoint).netloc.lower()
        self.audience = audience
        self.allowed_roles = tuple(allowed_roles)
        self.stats = stats or AuthStats()
        self._post = post
        self._max_age = max_age
        self._clock = clock
        # token digest -> (expires at, epoch seconds; Identity or AuthError)
        self._verdicts: OrderedDict[bytes, tuple[float, Identity | AuthError]] = OrderedDict()
        self._in_flight: dict[bytes, asyncio.Future[Identity]] = {}

    async def authenticate(self, metadata: Mapping[str, str]) -> Identity:
        credential = _split_scheme(metadata, IAM_SCHEME)
        key = hashlib.sha256(credential.encode()).digest()
        cached = self._cached(key)
        if cached is not None:
            self.stats.auth_cache_hits += 1
            if isinstance(cached, AuthError):
                raise cached
            return cached
        pending = self._in_flight.get(key)
        if pending is not None:  # the same token is being verified: wait for that verdict
            return await asyncio.shield(pending)
        future: asyncio.Future[Identity] = asyncio.get_running_loop().create_future()
        self._in_flight[key] = future
        try:
            identity = await self._verify(credential, key)
        except AuthError as exc:
            future.set_exception(exc)
            future.exception()  # mark retrieved: waiters re-raise it themselves
            raise
        except BaseException as exc:
            future.cancel()
            raise exc
        else:
            future.set_result(identity)
            return identity
        finally:
            del self._in_flight[key]

    def _cached(self, key: bytes) -> Identity | AuthError | None:
        entry = self._verdicts.get(key)
        if entry is None:
            return None
        expires_at, verdict = entry
        if self._clock() >= expires_at:
            del self._verdicts[key]
            return None
        self._verdicts.move_to_end(key)
        return verdict

    def _remember(self, key: bytes, verdict: Identity | AuthError, expires_at: float) -> None:
        self._verdicts[key] = (expires_at, verdict)
        self._verdicts.move_to_end(key)
        while len(self._verdicts) > CACHE_MAX_ENTRIES:
            self._verdicts.popitem(last=False)

    async def _verify(self, credential: str, key: bytes) -> Identity:
        signed = decode_iam_token(credential)
        self._check_claims(signed)
        now = self._clock()
        token_expires = signed.signed_at + self._max_age
        try:
            arn = await self._call_sts(signed)
            identity = parse_caller_arn(arn)
            self._check_allowed(identity)
        except AuthError as exc:
            if exc.code != grpc.StatusCode.UNAVAILABLE:
                self._remember(key, exc, min(now + NEGATIVE_CACHE_TTL, token_expires))
            raise
        self._remember(key, identity, min(now + POSITIVE_CACHE_TTL, token_expires))
        return identity

    def _check_claims(self, signed: SignedRequest) -> None:
        if not hmac.compare_digest(
            signed.headers[AUDIENCE_HEADER].encode(), self.audience.encode()
        ):
            raise _unauthenticated(
                "the AWS4-STS token is for another audience; sign it with this broker's"
                " audience (PGBROKER_AUTH_AUDIENCE)"
            )
        age = self._clock() - signed.signed_at
        if age > self._max_age:
            raise _unauthenticated(
                f"the AWS4-STS token expired ({int(age)} s old, at most {int(self._max_age)});"
                " sign a new one"
            )
        if age < -FUTURE_SKEW:
            raise _unauthenticated("the AWS4-STS token is dated in the future; check the clock")
        if signed.headers["host"].lower() != self._sts_host:
            raise _unauthenticated(
                f"the AWS4-STS token was signed for STS host {signed.headers['host']!r}; this"
                f" broker verifies with {self._sts_host!r} (PGBROKER_STS_ENDPOINT)"
            )

    async def _call_sts(self, signed: SignedRequest) -> str:
        headers = {name: signed.headers[name] for name in signed.signed_headers}
        headers["authorization"] = signed.headers["authorization"]
        headers.setdefault(
            "content-type", signed.headers.get("content-type", "application/x-www-form-urlencoded")
        )
        self.stats.auth_sts_calls += 1
        try:
            status, body = await asyncio.to_thread(
                self._post, self.sts_endpoint, headers, signed.body.encode()
            )
        except OSError as exc:
            log.error("STS unreachable at %s: %s", self.sts_endpoint, type(exc).__name__)
            raise AuthError(
                grpc.StatusCode.UNAVAILABLE,
                "the broker cannot reach STS to verify the caller; retry later",
                retry_after=1.0,
            ) from exc
        return _arn_from_sts_response(status, body)

    def _check_allowed(self, identity: Identity) -> None:
        if any(identity.matches(pattern) for pattern in self.allowed_roles):
            return
        raise AuthError(
            grpc.StatusCode.PERMISSION_DENIED,
            f"{identity.arn} is not allowed by PGBROKER_IAM_ALLOWED_ROLES",
            caller_arn=identity.arn,
        )


def _arn_from_sts_response(status: int, body: bytes) -> str:
    """The caller ARN from STS' XML answer; AuthError for a refusal or an odd answer."""
    try:
        root = ElementTree.fromstring(body)
    except ElementTree.ParseError:
        root = None
    values = {} if root is None else {el.tag.rsplit("}", 1)[-1]: el.text for el in root.iter()}
    if status == 200 and values.get("Arn"):
        return str(values["Arn"])
    if 400 <= status < 500:
        code = values.get("Code") or f"HTTP {status}"
        return _raise_sts_refusal(str(code))
    log.error("STS answered HTTP %d without a caller ARN", status)
    raise AuthError(
        grpc.StatusCode.UNAVAILABLE,
        "STS could not verify the caller right now; retry later",
        retry_after=1.0,
    )


def _raise_sts_refusal(code: str) -> str:
    hints = {
        "SignatureDoesNotMatch": "the signature does not match (tampered or re-encoded token)",
        "InvalidClientTokenId": "the signing access key is unknown to AWS",
        "ExpiredToken": "the signing credentials have expired",
        "AccessDenied": "STS denied the request",
    }
    raise _unauthenticated(f"STS refused the token: {code}: {hints.get(code, 'not valid')}")


# --------------------------------------------------------------------------------------------
# interceptor


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Authenticate ``pgbroker.v1.Broker`` calls; leave health and reflection open.

    The handler runs with `current_identity` set to the caller. A refused call is aborted
    with the `AuthError`'s status and a ``google.rpc.ErrorInfo(domain="pgbroker")``.
    """

    def __init__(
        self,
        authenticator: Authenticator,
        stats: AuthStats | None = None,
        *,
        protected_prefix: str = PROTECTED_SERVICE_PREFIX,
    ) -> None:
        self.authenticator = authenticator
        self.stats = stats or getattr(authenticator, "stats", None) or AuthStats()
        self.protected_prefix = protected_prefix

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method  # type: ignore[attr-defined]
        if handler is None or not method.startswith(self.protected_prefix):
            return handler
        metadata = _metadata_dict(handler_call_details.invocation_metadata)  # type: ignore[attr-defined]
        return _wrap_handler(handler, lambda ctx: self._admit(method, metadata, ctx))

    async def _admit(
        self, method: str, metadata: Mapping[str, str], context: grpc.aio.ServicerContext
    ) -> Identity:
        try:
            return await self.authenticator.authenticate(metadata)
        except AuthError as exc:
            self.stats.auth_failures += 1
            log.warning(
                "auth refused %s: %s (caller %s, function %s)",
                method,
                exc.message,
                exc.caller_arn or "unknown",
                metadata.get("x-lambda-function-name", "-"),
            )
            await context.abort_with_status(_status_for(exc))
            raise  # abort_with_status raises; this keeps type checkers content


def _metadata_dict(metadata: Iterable[tuple[str, str | bytes]] | None) -> dict[str, str]:
    result: dict[str, str] = {}
    for key, value in metadata or ():
        if isinstance(value, str):
            result.setdefault(key.lower(), value)
    return result


def _status_for(exc: AuthError) -> grpc.Status:
    code = {
        grpc.StatusCode.PERMISSION_DENIED: code_pb2.PERMISSION_DENIED,
        grpc.StatusCode.UNAVAILABLE: code_pb2.UNAVAILABLE,
    }.get(exc.code, code_pb2.UNAUTHENTICATED)
    status = status_pb2.Status(code=code, message=exc.message)
    info = error_details_pb2.ErrorInfo(domain="pgbroker", reason=exc.reason)
    status.details.add().Pack(info)
    if exc.retry_after is not None:
        retry = error_details_pb2.RetryInfo()
        retry.retry_delay.FromNanoseconds(int(exc.retry_after * 1e9))
        status.details.add().Pack(retry)
    return rpc_status.to_status(status)


Admit = Callable[[grpc.aio.ServicerContext], Awaitable[Identity]]


def _wrap_handler(handler: grpc.RpcMethodHandler, admit: Admit) -> grpc.RpcMethodHandler:
    """The same handler, authenticating first and running with `current_identity` set.

    grpc.aio runs each RPC in its own task (its own context), so the identity set here is
    seen by that RPC's handler only and needs no reset.
    """
    h: Any = handler
    kwargs = {
        "request_deserializer": h.request_deserializer,
        "response_serializer": h.response_serializer,
    }
    if h.unary_unary is not None:
        inner_uu = h.unary_unary

        async def unary_unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
            current_identity.set(await admit(context))
            return await _maybe_await(inner_uu(request, context))

        return grpc.unary_unary_rpc_method_handler(unary_unary, **kwargs)
    if h.stream_unary is not None:
        inner_su = h.stream_unary

        async def stream_unary(requests: Any, context: grpc.aio.ServicerContext) -> Any:
            current_identity.set(await admit(context))
            return await _maybe_await(inner_su(requests, context))

        return grpc.stream_unary_rpc_method_handler(stream_unary, **kwargs)
    inner = h.unary_stream or h.stream_stream
    factory = (
        grpc.unary_stream_rpc_method_handler
        if h.unary_stream is not None
        else grpc.stream_stream_rpc_method_handler
    )

    async def streaming(request: Any, context: grpc.aio.ServicerContext) -> Any:
        current_identity.set(await admit(context))
        responses = inner(request, context)
        if hasattr(responses, "__aiter__"):
            async for response in responses:
                yield response
        elif responses is not None and not inspect.isawaitable(responses):
            for response in responses:
                yield response
        else:
            await _maybe_await(responses)

    return factory(streaming, **kwargs)


async def _maybe_await(value: Any) -> Any:
    return await value if inspect.isawaitable(value) else value


# --------------------------------------------------------------------------------------------
# configuration


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
        roles = parse_allowed_roles(environ.get("PGBROKER_IAM_ALLOWED_ROLES", ""))
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
        return IamAuth(sts_endpoint=endpoint, audience=audience, allowed_roles=roles, stats=stats)
    raise ValueError(f"PGBROKER_AUTH={mode!r}: must be one of iam, token, none")
