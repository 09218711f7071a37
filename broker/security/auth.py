"""Who is calling: ``PGBROKER_AUTH`` = ``iam`` | ``token`` | ``none``, as a gRPC interceptor.

`AuthInterceptor` authenticates every ``pgbroker.v1.Broker`` call before the servicer runs
(the broker's server registers the handlers wrapped once with `AuthInterceptor.wrap`, so no
interceptor runs per call); health checks and reflection stay open so load balancers can
probe the broker. A verified
caller is an `Identity`, available to the servicer through `current_identity` (for the role
map and per-identity limits). Failures end the call with UNAUTHENTICATED (no, bad or expired
credentials) or PERMISSION_DENIED (a valid identity that is not allowed), a
``google.rpc.ErrorInfo`` with the same reason, a log line with the reason and the caller ARN
when known — never the token — and one more ``auth_failures`` in the stats.

Modes:

* ``iam`` (`broker.security.iam`) — the client signs ``sts:GetCallerIdentity`` with its own (Lambda
  role) credentials and a signed ``x-pgbroker-audience`` header, and sends the signed request as
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
import contextvars
import fnmatch
import hashlib
import hmac
import inspect
import json
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import grpc
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from lambda_client.auth import AUDIENCE_HEADER  # one name for signer and verifier

if TYPE_CHECKING:
    from broker.config import Settings

__all__ = [
    "AUDIENCE_HEADER",
    "AuthError",
    "AuthInterceptor",
    "AuthStats",
    "Authenticator",
    "Identity",
    "LogBudget",
    "NoAuth",
    "TokenAuth",
    "authenticator_for_settings",
    "check_auth_listen",
    "current_identity",
]

log = logging.getLogger("pgbroker.auth")

IAM_SCHEME = "AWS4-STS"
BEARER_SCHEME = "Bearer"
PROTECTED_SERVICE_PREFIX = "/pgbroker.v1.Broker/"

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


def unauthenticated(message: str, caller_arn: str | None = None) -> AuthError:
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


def split_scheme(metadata: Mapping[str, str], expected: str) -> str:
    value = metadata.get("authorization")
    if not value:
        raise unauthenticated(
            f"missing 'authorization' metadata; this broker expects '{expected} <token>'"
        )
    if len(value) > MAX_AUTHORIZATION_BYTES:
        raise unauthenticated("'authorization' metadata is too large")
    scheme, _, credential = value.strip().partition(" ")
    if scheme.lower() != expected.lower() or not credential.strip():
        raise unauthenticated(
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
        presented = split_scheme(metadata, BEARER_SCHEME)
        if self._load_secret is not None and self._due(self._refresh_interval):
            await self._reload_tokens()
        label = self._lookup(presented)
        if label is None and self._load_secret is not None and self._due(self._min_reload_interval):
            await self._reload_tokens()
            label = self._lookup(presented)
        if label is None:
            raise unauthenticated("unknown bearer token")
        return Identity("token", label)

    def _lookup(self, presented: str) -> str | None:
        found = None
        # Fixed-length digests, compared with every token: timing tells neither the length of
        # a token nor which one came close.
        given = hashlib.sha256(presented.encode()).digest()
        for token, label in self._tokens.items():
            if hmac.compare_digest(given, hashlib.sha256(token.encode()).digest()):
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
        log_budget: LogBudget | None = None,
    ) -> None:
        self.authenticator = authenticator
        self.stats = stats or getattr(authenticator, "stats", None) or AuthStats()
        self.protected_prefix = protected_prefix
        self._log_budget = log_budget or LogBudget()
        # Wrapped handlers per method, built once (handler → wrapped), not per call.
        self._wrapped: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}
        # PGBROKER_AUTH=none admits everyone as the same identity: no metadata to read.
        self._anonymous: Identity | None = (
            NoAuth._anonymous if isinstance(authenticator, NoAuth) else None
        )

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method  # type: ignore[attr-defined]
        if handler is None or not method.startswith(self.protected_prefix):
            return handler
        cached = self._wrapped.get(method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        wrapped = self.wrap(method, handler)
        self._wrapped[method] = (handler, wrapped)
        return wrapped

    def wrap(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        """*handler* (of the protected *method*, ``/package.Service/Method``) authenticating
        each call first, from that call's metadata. The server registers the Broker's
        handlers wrapped this way once, so no interceptor runs per call."""
        return _wrap_handler(handler, lambda context: self._admit_call(method, context))

    async def _admit_call(self, method: str, context: grpc.aio.ServicerContext) -> Identity:
        if self._anonymous is not None:
            return self._anonymous
        metadata = _metadata_dict(context.invocation_metadata())
        return await self._admit(method, metadata, context)

    async def _admit(
        self, method: str, metadata: Mapping[str, str], context: grpc.aio.ServicerContext
    ) -> Identity:
        try:
            return await self.authenticator.authenticate(metadata)
        except AuthError as exc:
            self.stats.auth_failures += 1
            if self._log_budget.take():
                log.warning(
                    "auth refused %s: %s (caller %s, function %s)",
                    method,
                    exc.message,
                    exc.caller_arn or "unknown",
                    metadata.get("x-lambda-function-name", "-")[:64],
                    extra={"suppressed": self._log_budget.pop_suppressed()},
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
    return _status(code, exc.message, exc.reason, exc.retry_after)


def _status(code: int, message: str, reason: str, retry_after: float | None = None) -> grpc.Status:
    status = status_pb2.Status(code=code, message=message)
    info = error_details_pb2.ErrorInfo(domain="pgbroker", reason=reason)
    status.details.add().Pack(info)
    if retry_after is not None:
        retry = error_details_pb2.RetryInfo()
        retry.retry_delay.FromNanoseconds(int(retry_after * 1e9))
        status.details.add().Pack(retry)
    return rpc_status.to_status(status)


class LogBudget:
    """At most *per_window* log lines per *window* seconds, so a flood of bad requests cannot
    flood the logs; the next line logged says how many were suppressed (the counter in
    GetStats, ``auth_failures``, stays exact)."""

    def __init__(self, per_window: int = 20, window: float = 10.0) -> None:
        self.per_window = per_window
        self.window = window
        self._started = time.monotonic()
        self._used = 0
        self._suppressed = 0

    def take(self) -> bool:
        now = time.monotonic()
        if now - self._started >= self.window:
            self._started, self._used = now, 0
        if self._used < self.per_window:
            self._used += 1
            return True
        self._suppressed += 1
        return False

    def pop_suppressed(self) -> int:
        suppressed, self._suppressed = self._suppressed, 0
        return suppressed


Admit = Callable[[grpc.aio.ServicerContext], Awaitable[Identity]]


def _wrap_handler(handler: grpc.RpcMethodHandler, admit: Admit) -> grpc.RpcMethodHandler:
    """The same handler, authenticating first and running with `current_identity` set.

    grpc.aio runs each RPC in its own task (its own context), so the identity set here is
    seen by that RPC's handler only and needs no reset. A unary request is decoded only after
    authentication, and a request that is not valid protobuf (bad UTF-8, nesting too deep)
    gets INVALID_ARGUMENT/BAD_REQUEST rather than gRPC's UNKNOWN.
    """
    h: Any = handler
    kwargs = {
        "request_deserializer": h.request_deserializer,
        "response_serializer": h.response_serializer,
    }
    if h.unary_unary is not None:
        inner_uu = h.unary_unary
        decode = h.request_deserializer
        kwargs["request_deserializer"] = None  # raw bytes; decoded below, after admission

        async def unary_unary(raw: Any, context: grpc.aio.ServicerContext) -> Any:
            current_identity.set(await admit(context))
            request = await _decode(decode, raw, context)
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


async def _decode(
    decode: Callable[[bytes], Any] | None, raw: Any, context: grpc.aio.ServicerContext
) -> Any:
    if decode is None or not isinstance(raw, bytes):
        return raw
    try:
        return decode(raw)
    except Exception as exc:  # protobuf DecodeError (bad UTF-8, too deep, corrupt)
        message = f"the request is not a valid message: {str(exc)[:200]}"
        await context.abort_with_status(_status(code_pb2.INVALID_ARGUMENT, message, "BAD_REQUEST"))
        raise


async def _maybe_await(value: Any) -> Any:
    return await value if inspect.isawaitable(value) else value


# --------------------------------------------------------------------------------------------
# configuration


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
