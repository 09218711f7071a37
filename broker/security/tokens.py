"""``PGBROKER_AUTH=token``: ``authorization: Bearer <token>`` checked against known tokens.

The tokens come from ``PGBROKER_TOKENS`` (comma separated, ``label:token`` names the caller)
or from a Secrets Manager secret ``PGBROKER_TOKENS_SECRET_ID`` (read through
aws-lambda-powertools, cached, re-read when an unknown token arrives so rotation needs no
restart). Several tokens are valid at once during a rotation. A presented token is compared in
constant time with every known one; an unknown token is UNAUTHENTICATED, a secret that cannot
be read while no token is known yet is UNAVAILABLE (`AuthUnavailable`).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

from broker.security.identity import AuthError, AuthUnavailable, Identity, split_scheme

__all__ = ["BEARER_SCHEME", "TokenAuth", "parse_tokens", "secret_loader"]

log = logging.getLogger("pgbroker.auth")

BEARER_SCHEME = "Bearer"


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
            entries = [("token", str(t).strip()) for t in data]
        elif isinstance(data, dict):  # whitespace is never part of a token (as below)
            entries = [(str(k), str(v).strip()) for k, v in data.items()]
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
        self._tokens: dict[str, str] = {}
        # (sha256 of a known token, its label): hashed once per (re)load, not on every call.
        self._digests: list[tuple[bytes, str]] = []
        self._set_tokens(dict(tokens or {}))
        self._load_secret = load_secret
        self._refresh_interval = refresh_interval
        self._min_reload_interval = min_reload_interval
        self._loaded_at: float | None = None
        self._reload: asyncio.Task[None] | None = None

    async def authenticate(self, metadata: Mapping[str, str], source: str = "") -> Identity:
        presented = split_scheme(metadata, BEARER_SCHEME)
        if self._load_secret is not None and self._due(self._refresh_interval):
            await self._reload_tokens()
        label = self._lookup(presented)
        if label is None and self._load_secret is not None and self._due(self._min_reload_interval):
            await self._reload_tokens()
            label = self._lookup(presented)
        if label is None:
            raise AuthError("unknown bearer token")
        return Identity("token", label)

    def _set_tokens(self, tokens: dict[str, str]) -> None:
        self._digests = [
            (hashlib.sha256(t.encode()).digest(), label) for t, label in tokens.items()
        ]
        self._tokens = tokens

    def _lookup(self, presented: str) -> str | None:
        found = None
        # Fixed-length digests, compared with every token: timing tells neither the length of
        # a token nor which one came close.
        given = hashlib.sha256(presented.encode()).digest()
        for digest, label in self._digests:
            if hmac.compare_digest(given, digest):
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
            self._set_tokens(parse_tokens(text))
        except Exception as exc:  # keep serving with the tokens already known
            log.error("cannot read the bearer tokens secret: %s", type(exc).__name__)
            if not self._tokens:
                raise AuthUnavailable(
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
