"""Database credentials: from the URL, a Secrets Manager secret, or RDS IAM authentication.

* URL (default): the user and password in ``PGBROKER_DATABASE_URL``.
* ``PGBROKER_DATABASE_SECRET_ID``: a secret in RDS's JSON shape (``{"username": …,
  "password": …}``, optionally ``host``, ``port``, ``dbname`` which then override the URL's).
  Read through aws-lambda-powertools' parameters utility and cached; when Postgres rejects the
  password (SQLSTATE 28P01/28000, e.g. after a rotation) the secret is re-read once and the
  connection retried, so rotation needs no restart.
* ``PGBROKER_DATABASE_IAM_AUTH=true``: the password is an RDS IAM auth token
  (``rds.generate_db_auth_token``, signed locally with the task role), regenerated well before
  its 15-minute expiry. RDS requires TLS for IAM authentication, so ``sslmode`` must not be
  ``disable``.

Secrets never appear in a log line, an error message or a ``repr``.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any, Protocol

from broker.configvalues import DatabaseTarget
from broker.postgres import pg

__all__ = [
    "IamTokenCredentials",
    "RenamedCredentials",
    "ReplicaCredentials",
    "SecretCredentials",
    "StaticCredentials",
    "connect_with_credentials",
    "credentials_for",
    "replica_credentials_for",
]

log = logging.getLogger("pgbroker.credentials")

# 28P01 invalid_password, 28000 invalid_authorization_specification (e.g. pg_hba or IAM).
AUTH_FAILURES = ("28P01", "28000")
IAM_TOKEN_REFRESH = 600.0  # seconds; tokens are valid for 900


class CredentialSource(Protocol):
    def target(self, refresh: bool = False) -> DatabaseTarget:
        """The target with current credentials; *refresh* re-reads them first."""
        ...

    @property
    def refreshable(self) -> bool: ...


class StaticCredentials:
    """The user and password of the URL, as they are."""

    refreshable = False

    def __init__(self, base: DatabaseTarget) -> None:
        self._base = base

    def target(self, refresh: bool = False) -> DatabaseTarget:
        return self._base


class SecretCredentials:
    """User and password (and optionally host, port, dbname) from a Secrets Manager secret.

    *load* returns the secret's text (default: powertools ``get_secret``); it is called at
    the first connect and again only when *refresh* is asked (an authentication failure).
    Raise ValueError (naming the secret, never its content) when the secret is not RDS JSON.
    """

    refreshable = True

    def __init__(
        self, base: DatabaseTarget, secret_id: str, load: Callable[[], str] | None = None
    ) -> None:
        self._base = base
        self._secret_id = secret_id
        self._load = load or _powertools_loader(secret_id)
        self._lock = threading.Lock()
        self._current: DatabaseTarget | None = None
        self.reads = 0

    def target(self, refresh: bool = False) -> DatabaseTarget:
        with self._lock:
            if self._current is None or refresh:
                self._current = self._read()
            return self._current

    def _read(self) -> DatabaseTarget:
        self.reads += 1
        try:
            data: Any = json.loads(self._load())
            user, password = str(data["username"]), str(data["password"])
        except (ValueError, KeyError, TypeError):
            raise ValueError(
                f"secret {self._secret_id!r} is not RDS JSON with username and password"
            ) from None
        changes: dict[str, Any] = {"user": user, "password": password}
        if data.get("host"):
            changes["host"] = str(data["host"])
        if data.get("port"):
            changes["port"] = int(data["port"])
        if data.get("dbname"):
            changes["database"] = str(data["dbname"])
        if not changes.get("host", self._base.host):
            raise ValueError(
                f"secret {self._secret_id!r} has no host and PGBROKER_DATABASE_URL is not set"
            )
        log.info("read database credentials", extra={"secret_id": self._secret_id})
        return replace(self._base, **changes)


def _powertools_loader(secret_id: str) -> Callable[[], str]:
    def load() -> str:
        from aws_lambda_powertools.utilities import parameters

        value = parameters.get_secret(secret_id, force_fetch=True)
        return value.decode() if isinstance(value, bytes) else str(value)

    return load


class IamTokenCredentials:
    """The URL's user with an RDS IAM auth token as password, regenerated every
    *refresh_after* seconds (tokens live 15 minutes). *generate* defaults to boto3's
    ``rds.generate_db_auth_token`` in *region*."""

    refreshable = True

    def __init__(
        self,
        base: DatabaseTarget,
        region: str | None = None,
        *,
        generate: Callable[[DatabaseTarget], str] | None = None,
        refresh_after: float = IAM_TOKEN_REFRESH,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if base.sslmode == "disable":
            raise ValueError("RDS IAM authentication needs TLS: sslmode must not be disable")
        self._base = base
        self._generate = generate or _boto3_token(region)
        self._refresh_after = refresh_after
        self._clock = clock
        self._lock = threading.Lock()
        self._current: DatabaseTarget | None = None
        self._made_at = 0.0

    def target(self, refresh: bool = False) -> DatabaseTarget:
        with self._lock:
            now = self._clock()
            if self._current is None or refresh or now - self._made_at >= self._refresh_after:
                self._current = replace(self._base, password=self._generate(self._base))
                self._made_at = now
            return self._current


def _boto3_token(region: str | None) -> Callable[[DatabaseTarget], str]:
    client: Any = None

    def generate(target: DatabaseTarget) -> str:
        nonlocal client
        if client is None:
            import boto3

            client = boto3.client("rds", region_name=region)
        return str(
            client.generate_db_auth_token(
                DBHostname=target.host, Port=target.port, DBUsername=target.user
            )
        )

    return generate


def credentials_for(settings: Any) -> CredentialSource:
    """The credential source *settings* ask for (secret, IAM token, or the URL)."""
    base: DatabaseTarget = settings.database
    if settings.database_secret_id:
        return SecretCredentials(base, settings.database_secret_id)
    if settings.database_iam_auth:
        return IamTokenCredentials(base, settings.aws_region or None)
    return StaticCredentials(base)


class ReplicaCredentials:
    """A read replica's URL (``PGBROKER_REPLICA_URLS``) as it is when it has a password,
    else with the primary's user and password (from its URL or secret, re-read with it)."""

    def __init__(self, primary: CredentialSource, replica: DatabaseTarget) -> None:
        self._primary = primary
        self._replica = replica

    @property
    def refreshable(self) -> bool:
        return self._replica.password is None and self._primary.refreshable

    def target(self, refresh: bool = False) -> DatabaseTarget:
        if self._replica.password is not None:
            return self._replica
        primary = self._primary.target(refresh)
        return replace(self._replica, user=primary.user, password=primary.password)


class RenamedCredentials:
    """*source*'s target under another ``application_name`` (the replica monitor's own
    connections show as ``pgbroker-monitor`` in pg_stat_activity)."""

    def __init__(self, source: CredentialSource, application_name: str) -> None:
        self._source = source
        self._name = application_name

    @property
    def refreshable(self) -> bool:
        return self._source.refreshable

    def target(self, refresh: bool = False) -> DatabaseTarget:
        return replace(self._source.target(refresh), application_name=self._name)


def replica_credentials_for(
    settings: Any, primary: CredentialSource, replica: DatabaseTarget
) -> CredentialSource:
    """The credential source of one read replica: an RDS IAM token signed for the replica's
    own host with ``PGBROKER_DATABASE_IAM_AUTH``, else `ReplicaCredentials`."""
    if settings.database_iam_auth and replica.password is None:
        user = replica.user if replica.user != "postgres" else settings.database.user
        return IamTokenCredentials(replace(replica, user=user), settings.aws_region or None)
    return ReplicaCredentials(primary, replica)


def connect_with_credentials(
    source: CredentialSource, timeout: float, statement_timeout: float, cache_size: int = 100
) -> pg.PgConnection:
    """`pg.connect` with *source*'s credentials; when Postgres rejects them and the source
    can re-read (a rotated secret, an expired token), re-read once and try again.
    Raise `pg.ConnectionLost` as `pg.connect` does."""
    try:
        return pg.connect(source.target(), timeout, statement_timeout, cache_size)
    except pg.ConnectionLost as exc:
        if not (source.refreshable and exc.fatal and exc.fatal.sqlstate in AUTH_FAILURES):
            raise
        log.warning(
            "database rejected the credentials; re-reading them",
            extra={"sqlstate": exc.fatal.sqlstate},
        )
    return pg.connect(source.target(refresh=True), timeout, statement_timeout, cache_size)
