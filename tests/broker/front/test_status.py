"""Every broker failure becomes the status the table in broker/front/service.py documents, by
what it declares (broker/front/status.py), and anything else becomes a bare INTERNAL."""

from __future__ import annotations

from dataclasses import dataclass, field

import grpc
import pytest

import broker.front.service  # noqa: F401 (imports every module that defines a failure)
from broker.errors import BrokerFailure
from broker.flow.batch import DeadlineBeforeStart, StatementFailed, TransactionLost
from broker.flow.lease import End, LeaseTimeout, TransactionAborted
from broker.front.admin import FanoutTimeout, NotForwardable
from broker.front.reload import ReloadRefused
from broker.front.service import BadRequest
from broker.front.status import failure_for, status_for
from broker.front.stream import ReaderStalled
from broker.front.transact import StepRefused
from broker.pooling.pool import (
    DeadlineExpired,
    PoolClosed,
    PoolUnavailable,
    QueueFull,
    QueueTimeout,
)
from broker.postgres.keys import KeyInProgress, KeyReused, StoreUnavailable
from broker.postgres.params import BadParameter
from broker.postgres.pg import ConnectionLost, PgError, Phase
from broker.security.identity import (
    AuthError,
    AuthUnavailable,
    Identity,
    PermissionDenied,
    SourceThrottled,
)
from broker.security.limits import LimitExceeded
from broker.security.roles import RoleRefused
from broker.sql.sessionstate import SessionStateError
from lambda_client._status import Reason, unpack


@dataclass
class Expected:
    code: grpc.StatusCode
    reason: Reason | None
    retry_after: float | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    sqlstate: str | None = None  # the DatabaseError detail's, when one is sent


def _lost(**kwargs: bool) -> TransactionLost:
    return TransactionLost(ConnectionLost("connection to Postgres lost: EOF"), **kwargs)


def _terminated() -> TransactionLost:
    fatal = PgError("57P01", "terminating connection", severity="FATAL")
    cause = ConnectionLost(str(fatal), fatal, phase=Phase.STATEMENT, after_sent=True)
    return TransactionLost(cause, nothing_committed=True)


def _failed(sqlstate: str, index: int = 0) -> StatementFailed:
    return StatementFailed(PgError(sqlstate, "it failed"), index)


_S = grpc.StatusCode
_DEADLINE = {"cause": "deadline"}
CASES: list[tuple[BaseException, Expected]] = [
    (QueueFull("full"), Expected(_S.RESOURCE_EXHAUSTED, Reason.QUEUE_FULL, 0.1)),
    (QueueTimeout("waited"), Expected(_S.RESOURCE_EXHAUSTED, Reason.QUEUE_TIMEOUT)),
    (PoolUnavailable("down"), Expected(_S.UNAVAILABLE, Reason.POOL_UNAVAILABLE, 1.0)),
    (
        DeadlineExpired("late"),
        Expected(_S.DEADLINE_EXCEEDED, Reason.QUEUE_TIMEOUT, None, _DEADLINE),
    ),
    (
        DeadlineBeforeStart("late"),
        Expected(_S.DEADLINE_EXCEEDED, Reason.QUEUE_TIMEOUT, None, _DEADLINE),
    ),
    (PoolClosed("closing"), Expected(_S.UNAVAILABLE, Reason.SHUTTING_DOWN, 0.1)),
    (_failed("23505"), Expected(_S.INVALID_ARGUMENT, None, sqlstate="23505")),
    (_failed("22021"), Expected(_S.INVALID_ARGUMENT, None, sqlstate="22021")),
    (_failed("42601"), Expected(_S.INVALID_ARGUMENT, None, sqlstate="42601")),
    (_failed("08P01"), Expected(_S.INVALID_ARGUMENT, None, sqlstate="08P01")),
    (_failed("40001"), Expected(_S.ABORTED, None, 0.1, sqlstate="40001")),
    (_failed("40P01"), Expected(_S.ABORTED, None, 0.1, sqlstate="40P01")),
    (_failed("57014"), Expected(_S.DEADLINE_EXCEEDED, None, sqlstate="57014")),
    (_failed("08006"), Expected(_S.UNAVAILABLE, None, 0.1, sqlstate="08006")),
    (_failed("57P01"), Expected(_S.UNAVAILABLE, None, 0.1, sqlstate="57P01")),
    (_failed("P0001", -1), Expected(_S.FAILED_PRECONDITION, None, sqlstate="P0001")),
    (_lost(nothing_committed=True), Expected(_S.UNAVAILABLE, Reason.POOL_UNAVAILABLE, 0.1)),
    (_lost(nothing_committed=False), Expected(_S.UNKNOWN, Reason.CONNECTION_LOST)),
    (
        _lost(nothing_committed=True, gave_up=True),
        Expected(_S.UNAVAILABLE, Reason.CONNECTION_LOST),
    ),
    (_terminated(), Expected(_S.UNAVAILABLE, Reason.POOL_UNAVAILABLE, 0.1, sqlstate="57P01")),
    (BadRequest("no statements"), Expected(_S.INVALID_ARGUMENT, Reason.BAD_REQUEST)),
    (BadParameter("$1: bad"), Expected(_S.INVALID_ARGUMENT, Reason.BAD_REQUEST)),
    (
        SessionStateError(2, "SET changes the session"),
        Expected(_S.INVALID_ARGUMENT, Reason.SESSION_STATE, None, {"statement_index": "2"}),
    ),
    (
        SessionStateError(0, "two statements", Reason.BAD_REQUEST),
        Expected(_S.INVALID_ARGUMENT, Reason.BAD_REQUEST, None, {"statement_index": "0"}),
    ),
    (
        RoleRefused(Identity("token", "reporting")),
        Expected(_S.PERMISSION_DENIED, Reason.PERMISSION_DENIED, None, {"cause": "role_map"}),
    ),
    (
        LimitExceeded("PGBROKER_MAX_STATEMENTS", 10, 11, "too many"),
        Expected(
            _S.RESOURCE_EXHAUSTED,
            Reason.LIMIT_EXCEEDED,
            None,
            {"limit": "PGBROKER_MAX_STATEMENTS", "maximum": "10", "observed": "11"},
        ),
    ),
    (
        LimitExceeded("PGBROKER_MAX_RESULT_ROWS", 5, 6, "too many rows", completed=True),
        Expected(
            _S.RESOURCE_EXHAUSTED,
            Reason.LIMIT_EXCEEDED,
            None,
            {
                "limit": "PGBROKER_MAX_RESULT_ROWS",
                "maximum": "5",
                "observed": "6",
                "completed": "true",
            },
        ),
    ),
    (
        LimitExceeded("PGBROKER_MAX_INFLIGHT_PER_CALLER", 1, 2, "busy", retry_after=0.1),
        Expected(
            _S.RESOURCE_EXHAUSTED,
            Reason.LIMIT_EXCEEDED,
            0.1,
            {"limit": "PGBROKER_MAX_INFLIGHT_PER_CALLER", "maximum": "1", "observed": "2"},
        ),
    ),
    (
        LeaseTimeout(End.IDLE_TRANSACTION_TIMEOUT, "idle", Reason.IDLE_TRANSACTION_TIMEOUT),
        Expected(
            _S.DEADLINE_EXCEEDED,
            Reason.IDLE_TRANSACTION_TIMEOUT,
            None,
            {"bound": "idle_transaction_timeout"},
        ),
    ),
    (
        LeaseTimeout(End.TRANSACTION_TIMEOUT, "too long", Reason.TRANSACTION_TIMEOUT),
        Expected(
            _S.DEADLINE_EXCEEDED,
            Reason.TRANSACTION_TIMEOUT,
            None,
            {"bound": "transaction_timeout"},
        ),
    ),
    (TransactionAborted(), Expected(_S.FAILED_PRECONDITION, None, sqlstate="25P02")),
    (StepRefused("execute before begin"), Expected(_S.INVALID_ARGUMENT, Reason.BAD_REQUEST)),
    (KeyReused("other request"), Expected(_S.INVALID_ARGUMENT, Reason.IDEMPOTENCY_KEY_REUSED)),
    (KeyInProgress("running"), Expected(_S.ABORTED, Reason.IDEMPOTENCY_KEY_IN_PROGRESS, 0.1)),
    (
        StoreUnavailable("no store"),
        Expected(_S.FAILED_PRECONDITION, Reason.IDEMPOTENCY_UNAVAILABLE),
    ),
    (
        ReaderStalled("no rows taken"),
        Expected(_S.DEADLINE_EXCEEDED, Reason.IDLE_TRANSACTION_TIMEOUT),
    ),
    (AuthError("no credentials"), Expected(_S.UNAUTHENTICATED, Reason.UNAUTHENTICATED)),
    (
        PermissionDenied("role not allowed"),
        Expected(_S.PERMISSION_DENIED, Reason.PERMISSION_DENIED),
    ),
    (
        AuthUnavailable("STS unreachable", retry_after=1.0),
        Expected(_S.UNAVAILABLE, Reason.AUTH_UNAVAILABLE, 1.0),
    ),
    (
        SourceThrottled("too many proofs failed", retry_after=4.0),
        Expected(_S.UNAVAILABLE, Reason.AUTH_UNAVAILABLE, 4.0),
    ),
    (ReloadRefused("pool_size: bad"), Expected(_S.INVALID_ARGUMENT, Reason.BAD_REQUEST)),
    (NotForwardable("overrides"), Expected(_S.FAILED_PRECONDITION, Reason.BAD_REQUEST)),
    (FanoutTimeout("no forward"), Expected(_S.UNAVAILABLE, None)),
]


_IDS = [f"{type(failure).__name__}-{i}" for i, (failure, _) in enumerate(CASES)]


@pytest.mark.parametrize(("failure", "expected"), CASES, ids=_IDS)
def test_failure_becomes_its_documented_status(failure: BaseException, expected: Expected) -> None:
    status = status_for(failure_for(failure))
    details = unpack(status.trailing_metadata)
    assert status.code == expected.code
    assert status.details == str(failure)
    assert details.reason == expected.reason
    assert details.retry_after == expected.retry_after
    assert details.metadata == expected.metadata
    sqlstate = details.database_error.sqlstate if details.database_error else None
    assert sqlstate == expected.sqlstate


def test_every_broker_failure_has_a_case() -> None:
    """A new failure class gets a row in broker/front/service.py's table and a case here."""
    covered = {type(failure) for failure, _ in CASES}
    assert _subclasses(BrokerFailure) - covered == set()


def test_statement_failed_names_the_statement_or_commit_begin() -> None:
    assert str(_failed("23505", 3)) == "statement 3: it failed"
    assert str(_failed("40001", -1)) == "COMMIT/BEGIN: it failed"
    failure = status_for(_failed("23505", 3))
    database_error = unpack(failure.trailing_metadata).database_error
    assert database_error is not None and database_error.statement_index == 3


def test_a_lost_connection_fatal_is_sent_as_the_database_error_of_no_statement() -> None:
    database_error = unpack(status_for(_terminated()).trailing_metadata).database_error
    assert database_error is not None
    assert (database_error.severity, database_error.statement_index) == ("FATAL", -1)


def test_any_other_exception_is_internal_naming_only_its_class() -> None:
    status = status_for(failure_for(KeyError("SELECT secret FROM vault")))
    assert status.code == grpc.StatusCode.INTERNAL
    assert status.details == "internal error (KeyError)"
    details = unpack(status.trailing_metadata)
    assert (details.reason, details.retry_after, details.database_error) == (None, None, None)


def _subclasses(cls: type) -> set[type]:
    found = set()
    for sub in cls.__subclasses__():
        found |= {sub} | _subclasses(sub)
    return found
