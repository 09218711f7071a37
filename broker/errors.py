"""The base every broker failure derives from, so turning an error into a gRPC status is a
lookup of what the error declares, not a chain of ``isinstance`` checks.

A subclass declares its status as class attributes: ``code`` (`lambda_client._status.Code`,
no gRPC import needed, so the pool and the SQL analysis can raise these), ``reason`` (the
``ErrorInfo`` reason, `lambda_client._status.Reason`) and ``retry_after`` (seconds for
``RetryInfo``, None for no retry hint). An instance may override any of them, and adds
``metadata`` for the ``ErrorInfo`` and a Postgres ``database_error``. The front
(`broker.front.status`) packs them with `lambda_client._status.pack`; an exception that is not
a `BrokerFailure` becomes INTERNAL with its class name only (never its text, which may hold
SQL or secrets).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, ClassVar

from lambda_client._status import Code, Reason

if TYPE_CHECKING:
    from lambda_client._proto.pgbroker.v1 import broker_pb2 as pb

__all__ = ["BrokerFailure", "Code", "Reason"]

# Seconds suggested in RetryInfo when a retry may help at once.
RETRY_SOON = 0.1


class BrokerFailure(Exception):
    """A request failure with the status the caller gets: ``code``, ``reason``,
    ``retry_after`` (class defaults, overridable per instance), the message (``str(exc)``,
    sent to the caller: never secrets), ``metadata`` and ``database_error``."""

    code: ClassVar[Code] = Code.INTERNAL
    reason: ClassVar[Reason | None] = None
    retry_after: ClassVar[float | None] = None

    def __init__(
        self,
        message: str,
        *,
        code: Code | None = None,
        reason: Reason | None = None,
        retry_after: float | None = None,
        metadata: Mapping[str, str] | None = None,
        database_error: pb.DatabaseError | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        # Instance values shadow the class declaration only where given.
        if code is not None:
            self.code = code  # type: ignore[misc]
        if reason is not None:
            self.reason = reason  # type: ignore[misc]
        if retry_after is not None:
            self.retry_after = retry_after  # type: ignore[misc]
        self.metadata: dict[str, str] = dict(metadata or {})
        self.database_error = database_error
