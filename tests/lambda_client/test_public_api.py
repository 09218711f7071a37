"""The public surface of `lambda_client`: pinned names, a cheap import, no server-side imports."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import date
from pathlib import Path

import pytest

import lambda_client
from devtools.brokerproc import BrokerProcess
from lambda_client import Result, errors

PUBLIC_NAMES = {
    "BrokerClient",
    "BrokerError",
    "Cancelled",
    "DataError",
    "DatabaseError",
    "DeadlineExceeded",
    "DeadlockDetected",
    "Error",
    "IntegrityError",
    "InterfaceError",
    "InternalError",
    "Interval",
    "InvalidRequest",
    "Json",
    "Jsonb",
    "NotSupportedError",
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
    "Warning",
    "dbapi",
    "errors",
}


def test_public_names_are_pinned() -> None:
    assert set(lambda_client.__all__) == PUBLIC_NAMES
    for name in PUBLIC_NAMES:
        assert getattr(lambda_client, name) is not None
    assert set(dir(lambda_client)) >= PUBLIC_NAMES


NOT_ERRORS = {"BrokerClient", "Result", "Interval", "Json", "Jsonb", "dbapi", "errors", "Warning"}

# Each public error class and its parent: the PEP 249 tree, with the broker's failures placed.
PARENTS: dict[str, type | str] = {
    "Error": Exception,
    "Warning": Exception,
    "InterfaceError": "Error",
    "DatabaseError": "Error",
    "DataError": "DatabaseError",
    "OperationalError": "DatabaseError",
    "IntegrityError": "DatabaseError",
    "InternalError": "DatabaseError",
    "ProgrammingError": "DatabaseError",
    "NotSupportedError": "DatabaseError",
    "InvalidRequest": "ProgrammingError",
    "PermissionDenied": "ProgrammingError",
    "Overloaded": "OperationalError",
    "Unavailable": "OperationalError",
    "DeadlineExceeded": "OperationalError",
    "Cancelled": "OperationalError",
    "OutcomeUnknown": "OperationalError",
    "Unauthenticated": "OperationalError",
    "TransactionRollback": "OperationalError",
    "SerializationFailure": "TransactionRollback",
    "DeadlockDetected": "TransactionRollback",
    "QueryCanceled": "DeadlineExceeded",
}

# The SQLSTATE classes of `lambda_client.errors` a caller is most likely to catch, by psycopg's
# names, with their SQLSTATE and PEP 249 class.
SQLSTATE_CLASSES = {
    "UniqueViolation": ("23505", "IntegrityError"),
    "ForeignKeyViolation": ("23503", "IntegrityError"),
    "NotNullViolation": ("23502", "IntegrityError"),
    "CheckViolation": ("23514", "IntegrityError"),
    "ExclusionViolation": ("23P01", "IntegrityError"),
    "SerializationFailure": ("40001", "OperationalError"),
    "DeadlockDetected": ("40P01", "OperationalError"),
    "QueryCanceled": ("57014", "OperationalError"),
    "LockNotAvailable": ("55P03", "OperationalError"),
    "UndefinedTable": ("42P01", "ProgrammingError"),
    "UndefinedColumn": ("42703", "ProgrammingError"),
    "SyntaxError": ("42601", "ProgrammingError"),
    "InsufficientPrivilege": ("42501", "ProgrammingError"),
    "InvalidTextRepresentation": ("22P02", "DataError"),
    "DivisionByZero": ("22012", "DataError"),
    "NumericValueOutOfRange": ("22003", "DataError"),
    "InFailedSqlTransaction": ("25P02", "InternalError"),
    "FeatureNotSupported": ("0A000", "NotSupportedError"),
}


def test_every_error_is_a_broker_error() -> None:
    for name in PUBLIC_NAMES - NOT_ERRORS:
        assert issubclass(getattr(lambda_client, name), lambda_client.BrokerError), name
    assert issubclass(lambda_client.QueryCanceled, lambda_client.DeadlineExceeded)
    assert issubclass(lambda_client.SerializationFailure, lambda_client.DatabaseError)


def test_errors_form_the_pep_249_tree() -> None:
    assert lambda_client.BrokerError is lambda_client.Error
    assert set(PARENTS) == PUBLIC_NAMES - NOT_ERRORS - {"BrokerError"} | {"Warning"}
    for name, parent in PARENTS.items():
        expected = parent if isinstance(parent, type) else getattr(lambda_client, parent)
        assert getattr(lambda_client, name).__bases__ == (expected,), name
    assert not issubclass(lambda_client.Warning, lambda_client.Error)


def test_sqlstate_classes_carry_their_sqlstate_as_psycopgs_do() -> None:
    for name, (sqlstate, pep249) in SQLSTATE_CLASSES.items():
        cls = getattr(errors, name)
        assert cls.sqlstate == sqlstate, name
        assert issubclass(cls, getattr(lambda_client, pep249)), name
        assert errors.lookup(sqlstate) is cls
        assert errors.error_class("INVALID_ARGUMENT", sqlstate) is cls
        assert cls("refused").sqlstate == sqlstate
    # A SQLSTATE without a class of its own falls back to its class's PEP 249 class.
    assert errors.lookup("22999") is errors.DataError
    assert errors.lookup("XX999") is errors.InternalError
    assert errors.lookup("ZZ999") is errors.DatabaseError


@pytest.mark.parametrize(
    ("code", "sqlstate", "expected"),
    [
        ("UNAVAILABLE", "08006", "Unavailable"),  # the code says nothing ran
        ("UNKNOWN", "57P01", "OutcomeUnknown"),  # the code says it may have committed
        ("DEADLINE_EXCEEDED", "57014", "QueryCanceled"),
        ("DEADLINE_EXCEEDED", "25P02", "DeadlineExceeded"),
        ("ABORTED", "40001", "SerializationFailure"),
        ("INVALID_ARGUMENT", None, "InvalidRequest"),
        ("PERMISSION_DENIED", None, "PermissionDenied"),
        ("UNAUTHENTICATED", None, "Unauthenticated"),
        ("INTERNAL", None, "InternalError"),
        ("UNIMPLEMENTED", None, "NotSupportedError"),
        ("NOT_FOUND", None, "InterfaceError"),
        ("", None, "InterfaceError"),
    ],
)
def test_a_status_maps_to_one_class(code: str, sqlstate: str | None, expected: str) -> None:
    assert errors.error_class(code, sqlstate) is getattr(errors, expected)


# Modules a blocking client's first answer must not load (each is imported where it is needed).
_FIRST_ANSWER_NEEDS_NOT = (
    "asyncio",
    "grpc.aio",
    "socket",
    "ssl",
    "grpc_status",
    "google.rpc",
    "lambda_client._diagnose",
    "lambda_client.transaction",
    "lambda_client._stream",
    # protobuf's pure-Python message classes, which the upb backend never uses (_proto).
    "google.protobuf.internal.python_message",
    "google.protobuf.text_format",
)


def _fresh(code: str) -> str:
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    ).stdout


def test_bare_import_loads_neither_grpc_nor_protobuf() -> None:
    out = _fresh(
        "import sys, lambda_client; print('grpc' in sys.modules, 'google.protobuf' in sys.modules)"
    )
    assert out.split() == ["False", "False"]


def test_client_import_leaves_uuid_and_hashing_to_first_use() -> None:
    # uuid (and the platform module it imports), hashlib and hmac cost ~4.5 ms of a cold start
    # (docs/performance.md); only a UUID value or IAM signing needs them.
    code = (
        "import sys\n"
        "from lambda_client import BrokerClient\n"
        "db = BrokerClient('127.0.0.1:1')\n"
        "print(sorted(m for m in ('uuid', 'platform', 'hashlib', 'hmac') if m in sys.modules))\n"
    )
    assert _fresh(code).strip() == "[]"


def test_client_import_leaves_transactions_streams_and_random_to_first_use() -> None:
    # Only begin()/stream() and a retry's jitter need them: not a cold start's first query.
    code = (
        "import sys\n"
        "from lambda_client import BrokerClient\n"
        "db = BrokerClient('127.0.0.1:1')\n"
        "names = ('lambda_client.transaction', 'lambda_client._stream', 'random', 'queue')\n"
        "print(sorted(m for m in names if m in sys.modules))\n"
    )
    assert _fresh(code).strip() == "[]"


def test_first_query_leaves_asyncio_ssl_and_error_decoding_to_first_use(
    broker: BrokerProcess,
) -> None:
    # asyncio (with ssl, subprocess, socket) is about half of what `import grpc` costs on a
    # cold start, and a blocking client never runs an event loop (lambda_client._grpc); the
    # rest decode errors or explain an unreachable broker (docs/performance.md, "Cold start").
    code = (
        "import sys\n"
        "from lambda_client import BrokerClient\n"
        f"assert BrokerClient({broker.target!r}).query('SELECT 1').scalar() == 1\n"
        f"print(sorted(m for m in {_FIRST_ANSWER_NEEDS_NOT!r} if m in sys.modules))\n"
    )
    assert _fresh(code).strip() == "[]"


def test_first_query_in_a_plain_layer_leaves_pathlib_and_urllib_to_first_use(
    broker: BrokerProcess,
) -> None:
    # As in a Lambda layer: no site hooks (this venv's editable install loads pathlib and
    # urllib.parse at startup), only the client's directory and the installed packages on
    # the path. pathlib reads a PEM file, urllib.parse (with ipaddress) signs IAM proofs.
    path = [str(Path(lambda_client.__file__).parent.parent), *sys.path[1:]]
    code = (
        "import sys\n"
        "before = set(sys.modules)\n"
        "from lambda_client import BrokerClient\n"
        f"assert BrokerClient({broker.target!r}).query('SELECT 1').scalar() == 1\n"
        "names = ('pathlib', 'urllib.parse', 'ipaddress', 'asyncio', 'ssl')\n"
        "print(sorted(m for m in names if m in sys.modules and m not in before))\n"
    )
    out = subprocess.run(
        [sys.executable, "-S", "-c", code],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(path)},
    ).stdout
    assert out.strip() == "[]"


def test_dbapi_first_query_leaves_transactions_and_asyncio_to_first_use(
    broker: BrokerProcess,
) -> None:
    # What Django and SQLAlchemy (AUTOCOMMIT) do first: connect, then one autocommit statement.
    names = (*_FIRST_ANSWER_NEEDS_NOT, "secrets", "random")
    code = (
        "import sys\n"
        "from lambda_client import dbapi\n"
        f"cur = dbapi.connect({broker.target!r}, autocommit=True).cursor()\n"
        "cur.execute('SELECT 1')\n"
        "assert cur.fetchone() == (1,)\n"
        f"print(sorted(m for m in {names!r} if m in sys.modules))\n"
    )
    assert _fresh(code).strip() == "[]"


def test_modules_loaded_before_the_client_are_never_replaced(broker: BrokerProcess) -> None:
    # A handler that imported socket (boto3, requests) before the client: grpc must see that
    # module, and no second copy may appear (a socket from one would not be an instance of
    # the other's class).
    code = (
        "import socket, sys\n"
        "from lambda_client import BrokerClient\n"
        f"assert BrokerClient({broker.target!r}).query('SELECT 1').scalar() == 1\n"
        "import grpc\n"
        "print(sys.modules['socket'] is socket, grpc._cython.cygrpc.__dict__['socket'] is socket)\n"
    )
    assert _fresh(code).split() == ["True", "True"]


def test_asyncio_after_the_blocking_client_gets_the_real_grpc_aio(
    broker: BrokerProcess,
) -> None:
    # grpc was imported without asyncio (lambda_client._grpc): importing asyncio and using
    # grpc.aio afterwards must still work, with grpc's own references rebound to the real
    # modules.
    code = (
        "import sys\n"
        "from lambda_client import BrokerClient\n"
        f"assert BrokerClient({broker.target!r}).query('SELECT 1').scalar() == 1\n"
        "import asyncio\n"
        "import grpc\n"
        "from lambda_client.aio import AsyncBrokerClient\n"
        "async def main():\n"
        f"    db = AsyncBrokerClient({broker.target!r})\n"
        "    return (await db.query('SELECT 2')).scalar()\n"
        "print(asyncio.run(main()))\n"
        "print(grpc.aio is sys.modules['grpc.aio'], grpc.aio.AioRpcError.__name__)\n"
        "print(grpc._cython.cygrpc.__dict__['asyncio'] is asyncio)\n"
    )
    assert _fresh(code).split("\n")[:3] == ["2", "True AioRpcError", "True"]


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


def test_dbapi_loads_on_first_use_and_needs_only_the_client() -> None:
    code = (
        "import sys, lambda_client\n"
        "print('lambda_client.dbapi' in sys.modules)\n"
        "conn = lambda_client.dbapi.connect('127.0.0.1:1')\n"
        "print(type(conn).__name__, conn.client.channels_created)\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in "
        "('broker', 'pg8000', 'devtools', 'psycopg', 'sqlalchemy', 'django')))\n"
    )
    assert _fresh(code).split("\n")[:3] == ["False", "Connection 0", "[]"]


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
