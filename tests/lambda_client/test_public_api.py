"""The public surface of `lambda_client`: pinned names, a cheap import, no server-side imports."""

from __future__ import annotations

import subprocess
import sys
from datetime import date

import pytest

import lambda_client
from lambda_client import Result

PUBLIC_NAMES = {
    "BrokerClient",
    "BrokerError",
    "Cancelled",
    "DataError",
    "DatabaseError",
    "DeadlineExceeded",
    "DeadlockDetected",
    "IntegrityError",
    "Interval",
    "InvalidRequest",
    "Json",
    "Jsonb",
    "OperationalError",
    "OutcomeUnknown",
    "Overloaded",
    "PermissionDenied",
    "ProgrammingError",
    "QueryCanceled",
    "Result",
    "SerializationFailure",
    "TransactionRollback",
    "Unauthenticated",
    "Unavailable",
    "errors",
}


def test_public_names_are_pinned() -> None:
    assert set(lambda_client.__all__) == PUBLIC_NAMES
    for name in PUBLIC_NAMES:
        assert getattr(lambda_client, name) is not None
    assert set(dir(lambda_client)) >= PUBLIC_NAMES


def test_every_error_is_a_broker_error() -> None:
    for name in PUBLIC_NAMES - {"BrokerClient", "Result", "Interval", "Json", "Jsonb", "errors"}:
        assert issubclass(getattr(lambda_client, name), lambda_client.BrokerError), name
    assert issubclass(lambda_client.QueryCanceled, lambda_client.DeadlineExceeded)
    assert issubclass(lambda_client.SerializationFailure, lambda_client.DatabaseError)


def _fresh(code: str) -> str:
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    ).stdout


def test_bare_import_loads_neither_grpc_nor_protobuf() -> None:
    out = _fresh(
        "import sys, lambda_client; print('grpc' in sys.modules, 'google.protobuf' in sys.modules)"
    )
    assert out.split() == ["False", "False"]


def test_client_never_imports_broker_pg8000_or_devtools() -> None:
    code = (
        "import sys\n"
        "from lambda_client import BrokerClient, errors\n"
        "import lambda_client.codec\n"
        "db = BrokerClient('127.0.0.1:1')\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in "
        "('broker', 'pg8000', 'devtools', 'aws_lambda_powertools', 'boto3')))\n"
    )
    assert _fresh(code).strip() == "[]"


def test_construction_connects_nothing() -> None:
    db = lambda_client.BrokerClient("127.0.0.1:1")
    assert db.channels_created == 0


def test_result_helpers() -> None:
    result = Result(
        columns=("id", "day"), rows=[(1, date(2024, 1, 2))], rows_affected=1, command_tag="SELECT 1"
    )
    assert result.one() == (1, date(2024, 1, 2))
    assert result.one_or_none() == (1, date(2024, 1, 2))
    assert result.scalar() == 1
    assert result.dicts() == [{"id": 1, "day": date(2024, 1, 2)}]
    assert list(result) == result.rows and len(result) == 1


def test_result_helpers_refuse_the_wrong_number_of_rows() -> None:
    empty = Result(columns=("id",), rows=[], rows_affected=0, command_tag="SELECT 0")
    two = Result(columns=("id",), rows=[(1,), (2,)], rows_affected=2, command_tag="SELECT 2")
    assert empty.one_or_none() is None and empty.scalar() is None
    with pytest.raises(LookupError):
        empty.one()
    with pytest.raises(LookupError):
        two.one()
    with pytest.raises(LookupError):
        two.one_or_none()


def test_unmappable_parameter_fails_before_any_channel_exists() -> None:
    db = lambda_client.BrokerClient("127.0.0.1:1")
    with pytest.raises(TypeError, match=r"\$2"):
        db.query("SELECT $1, $2", [1, object()])
    with pytest.raises(TypeError, match=r"\$1"):
        db.transaction([("SELECT 1", []), ("SELECT $1", [{1, 2}])])
    with pytest.raises(ValueError, match="isolation"):
        db.transaction(["SELECT 1"], isolation="chaos")
    assert db.channels_created == 0
