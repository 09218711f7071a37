"""``PGBROKER_AUTH=iam``: callers prove their IAM identity with a signed GetCallerIdentity.

The client (`lambda_client.auth.IamAuth`) signs ``POST sts:GetCallerIdentity`` with its role
credentials and a signed ``x-pgbroker-audience`` header, and sends the signed headers and body
as ``authorization: AWS4-STS <base64 JSON>``. `IamAuth.authenticate`:

1. decodes the token and checks its shape: body exactly ``Action=GetCallerIdentity&
   Version=2011-06-15``, a SigV4 ``Authorization`` for service ``sts`` whose SignedHeaders
   include ``host``, ``x-amz-date`` and ``x-pgbroker-audience``;
2. checks the audience equals ``PGBROKER_AUTH_AUDIENCE``, the signature date is at most
   15 minutes old (and not more than 5 minutes ahead), and the signed host is the broker's
   own STS endpoint's;
3. forwards exactly the signed headers and the body to ``PGBROKER_STS_ENDPOINT`` — never to a
   host named by the token, never following redirects — and reads the ``Arn`` STS returns,
   which it does only for a valid signature by live credentials;
4. admits ``arn:…:sts::ACCOUNT:assumed-role/ROLE/SESSION`` when ROLE (or the role ARN, or the
   caller ARN) matches ``PGBROKER_IAM_ALLOWED_ROLES``; anything else is PERMISSION_DENIED.

Verdicts are cached per token (by SHA-256, never the token itself): an admitted identity until
the token expires or 10 minutes pass, a refusal for 1 minute. Concurrent requests with the
same new token share one STS call. A refusal is also cached by the exact request forwarded to
STS (its signature and the headers it signs), so a forged proof re-sent with other unsigned
parts (JSON spacing, extra headers) costs no second call.

STS calls are bounded per source address (`broker.security.stsgate.VerifyGate`): at most 32 at
once broker-wide, given round-robin across sources; at most 64 pending per source, and a
source with 32 refused proofs in 10 s is refused without STS calls for the rest of the window
(`SourceThrottled`; the gate then holds such refusals a while: `broker.security.tarpit`).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import json
import logging
import time
import urllib.error
import urllib.request
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qs
from xml.etree import ElementTree

from broker.security.identity import (
    AuthError,
    AuthStats,
    AuthUnavailable,
    Identity,
    PermissionDenied,
    split_scheme,
)
from broker.security.stsgate import STS_CONCURRENCY, VerifyGate
from lambda_client.auth import AUDIENCE_HEADER, canonical_host  # one name for signer and verifier

__all__ = [
    "IamAuth",
    "decode_iam_token",
    "http_post",
    "parse_caller_arn",
]

log = logging.getLogger("pgbroker.auth")

IAM_SCHEME = "AWS4-STS"

GET_CALLER_IDENTITY_BODY = {"Action": ["GetCallerIdentity"], "Version": ["2011-06-15"]}
TOKEN_MAX_AGE = 900.0  # seconds; AWS itself refuses SigV4 signatures older than 15 minutes
FUTURE_SKEW = 300.0  # seconds a signature date may lie in the future (clock skew)
POSITIVE_CACHE_TTL = 600.0  # never longer than the token's own remaining lifetime
NEGATIVE_CACHE_TTL = 60.0  # a refused token is not re-sent to STS for this long
CACHE_MAX_ENTRIES = 10_000
STS_TIMEOUT = 5.0


@dataclass(frozen=True)
class SignedRequest:
    """A client's signed GetCallerIdentity request, as carried in the token."""

    headers: dict[str, str]  # lower-case names
    body: str
    signed_headers: frozenset[str]
    signed_at: float  # epoch seconds of X-Amz-Date
    access_key_hint: str = field(default="", repr=False)
    access_key: str = field(default="", repr=False)  # claimed; proven only by STS


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
        raise AuthError(
            "malformed AWS4-STS token (expected base64 JSON with headers and body)"
        ) from None
    if parse_qs(body, keep_blank_values=True) != GET_CALLER_IDENTITY_BODY:
        raise AuthError("the AWS4-STS token must sign sts:GetCallerIdentity and nothing else")
    sigv4 = headers.get("authorization", "")
    fields = _sigv4_fields(sigv4)
    scope = fields.get("Credential", "").split("/")
    if not sigv4.startswith("AWS4-HMAC-SHA256 ") or len(scope) != 5 or scope[3] != "sts":
        raise AuthError("the AWS4-STS token carries no SigV4 signature for sts")
    signed = frozenset(fields.get("SignedHeaders", "").split(";"))
    missing = {"host", "x-amz-date", AUDIENCE_HEADER} - signed
    if missing or not fields.get("Signature"):
        raise AuthError(
            f"the AWS4-STS token must sign {', '.join(sorted(missing)) or 'a signature'}"
        )
    if not signed <= set(headers):
        raise AuthError("the AWS4-STS token lacks some of its signed headers")
    try:
        signed_at = datetime.strptime(headers["x-amz-date"], "%Y%m%dT%H%M%SZ")
    except ValueError:
        raise AuthError("the AWS4-STS token has a malformed X-Amz-Date") from None
    return SignedRequest(
        headers=headers,
        body=body,
        signed_headers=signed,
        signed_at=signed_at.replace(tzinfo=UTC).timestamp(),
        access_key_hint=scope[0][:4],
        access_key=scope[0][:128],
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
        raise AuthError("STS returned an unexpected caller ARN")
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
        gate: VerifyGate | None = None,
    ) -> None:
        if not audience:
            raise ValueError("an audience is required for iam authentication")
        if not allowed_roles:
            raise ValueError("PGBROKER_IAM_ALLOWED_ROLES must name at least one role")
        self.sts_endpoint = sts_endpoint
        self._sts_host = canonical_host(sts_endpoint)
        self.audience = audience
        self.allowed_roles = tuple(allowed_roles)
        self.stats = stats or AuthStats()
        self._post = post
        # Own threads for STS calls: a burst of new Lambda sandboxes brings many new proofs
        # at once, and the default executor (a few threads on 2 cores) would queue them.
        self._sts_threads = ThreadPoolExecutor(
            max_workers=STS_CONCURRENCY, thread_name_prefix="pgbroker-sts"
        )
        self._max_age = max_age
        self._clock = clock
        # token digest -> (expires at, epoch seconds; Identity or AuthError)
        self._verdicts: OrderedDict[bytes, tuple[float, Identity | AuthError]] = OrderedDict()
        self._in_flight: dict[bytes, asyncio.Future[Identity]] = {}
        self.gate = gate or VerifyGate()

    async def authenticate(self, metadata: Mapping[str, str], source: str = "") -> Identity:
        """The caller proven by the ``AWS4-STS`` token in *metadata*; *source* is its network
        address (bounds on STS calls per source: `VerifyGate`). Raise `AuthError`,
        `PermissionDenied`, or `AuthUnavailable` (STS unreachable, or the source over its
        bounds: retry later)."""
        credential = split_scheme(metadata, IAM_SCHEME)
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
            identity = await self._verify(credential, key, source)
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

    async def _verify(self, credential: str, key: bytes, source: str) -> Identity:
        signed = decode_iam_token(credential)
        self._check_claims(signed)
        now = self._clock()
        token_expires = signed.signed_at + self._max_age
        headers = _forwarded_headers(signed)
        # The exact request STS would see: a refusal of it holds for any token carrying it.
        request_key = _request_digest(headers, signed.body)
        cached = self._cached(request_key)
        if isinstance(cached, AuthError):
            self.stats.auth_cache_hits += 1
            self._remember(key, cached, min(now + NEGATIVE_CACHE_TTL, token_expires))
            raise cached
        try:
            arn = await self._call_sts_bounded(headers, signed, source)
            identity = parse_caller_arn(arn)
            self._check_allowed(identity)
        except AuthError as exc:
            if not isinstance(exc, AuthUnavailable):
                expires = min(now + NEGATIVE_CACHE_TTL, token_expires)
                self._remember(key, exc, expires)
                self._remember(request_key, exc, expires)
            raise
        self._remember(key, identity, min(now + POSITIVE_CACHE_TTL, token_expires))
        return identity

    async def _call_sts_bounded(
        self, headers: dict[str, str], signed: SignedRequest, source: str
    ) -> str:
        """`_call_sts` within *source*'s bounds; an STS refusal counts against them."""
        source = source or f"claim:{signed.access_key}"
        try:
            async with self.gate.verifying(source):
                arn = await self._call_sts(headers, signed.body)
        except AuthUnavailable:
            self.stats.auth_throttled = self.gate.throttled
            raise
        except AuthError:
            self.gate.refused(source)
            raise
        return arn

    def _check_claims(self, signed: SignedRequest) -> None:
        if not hmac.compare_digest(
            signed.headers[AUDIENCE_HEADER].encode(), self.audience.encode()
        ):
            raise AuthError(
                "the AWS4-STS token is for another audience; sign it with this broker's"
                " audience (PGBROKER_AUTH_AUDIENCE)"
            )
        age = self._clock() - signed.signed_at
        if age > self._max_age:
            raise AuthError(
                f"the AWS4-STS token expired ({int(age)} s old, at most {int(self._max_age)});"
                " sign a new one"
            )
        if age < -FUTURE_SKEW:
            raise AuthError("the AWS4-STS token is dated in the future; check the clock")
        if signed.headers["host"].lower() != self._sts_host:
            raise AuthError(
                f"the AWS4-STS token was signed for STS host {signed.headers['host']!r}; this"
                f" broker verifies with {self._sts_host!r} (PGBROKER_STS_ENDPOINT)"
            )

    async def _call_sts(self, headers: dict[str, str], body: str) -> str:
        self.stats.auth_sts_calls += 1
        try:
            status, answer = await asyncio.get_running_loop().run_in_executor(
                self._sts_threads, self._post, self.sts_endpoint, headers, body.encode()
            )
        except OSError as exc:
            log.error("STS unreachable at %s: %s", self.sts_endpoint, type(exc).__name__)
            raise AuthUnavailable(
                "the broker cannot reach STS to verify the caller; retry later",
                retry_after=1.0,
            ) from exc
        return _arn_from_sts_response(status, answer)

    def _check_allowed(self, identity: Identity) -> None:
        if any(identity.matches(pattern) for pattern in self.allowed_roles):
            return
        raise PermissionDenied(
            f"{identity.arn} is not allowed by PGBROKER_IAM_ALLOWED_ROLES",
            caller_arn=identity.arn,
        )


def _forwarded_headers(signed: SignedRequest) -> dict[str, str]:
    """Exactly what goes to STS: the signed headers, the signature and a content type."""
    headers = {name: signed.headers[name] for name in signed.signed_headers}
    headers["authorization"] = signed.headers["authorization"]
    headers.setdefault(
        "content-type", signed.headers.get("content-type", "application/x-www-form-urlencoded")
    )
    return headers


def _request_digest(headers: Mapping[str, str], body: str) -> bytes:
    canonical = json.dumps([sorted(headers.items()), body], separators=(",", ":"))
    return hashlib.sha256(b"sts-request\0" + canonical.encode()).digest()


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
    raise AuthUnavailable(
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
    raise AuthError(f"STS refused the token: {code}: {hints.get(code, 'not valid')}")
