"""What a call sends, built and checked before anything is sent.

Every argument a user passes (statements, parameters, isolation, timeouts, the Lambda context,
the target) is checked here, and a bad one raises `TypeError` or `ValueError` naming it, so a
mistake never reaches the broker or waits out a deadline.
"""

from __future__ import annotations

import math
import numbers
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Protocol

from lambda_client._proto.pgbroker.v1 import broker_pb2 as pb
from lambda_client.codec import add_params, utf8_text

# A statement is its SQL alone or (sql, params).
Statement = str | tuple[str, Sequence[Any] | None]


class LambdaContext(Protocol):
    """The parts of the Lambda context object the client reads."""

    aws_request_id: str
    function_name: str

    def get_remaining_time_in_millis(self) -> int: ...


_ISOLATION = {
    None: pb.ISOLATION_LEVEL_UNSPECIFIED,
    "read committed": pb.ISOLATION_LEVEL_READ_COMMITTED,
    "repeatable read": pb.ISOLATION_LEVEL_REPEATABLE_READ,
    "serializable": pb.ISOLATION_LEVEL_SERIALIZABLE,
}
# gRPC's name resolvers; any other "scheme://" (http://, grpc://) is a mistake gRPC would only
# report by never connecting.
_GRPC_SCHEMES = frozenset(
    {"dns", "ipv4", "ipv6", "unix", "unix-abstract", "vsock", "xds", "google-c2p"}
)
_URL_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://")


def query_request(
    sql: str, params: Sequence[Any] | None, read_only: bool = False
) -> pb.ExecuteRequest:
    """The request for one statement; raise `TypeError` for an unmappable parameter."""
    request = pb.ExecuteRequest()
    _fill(request.statements.add(), sql, params)
    if read_only is not False:
        request.options.CopyFrom(_options(None, read_only, False))
    return request


def transaction_request(
    statements: Sequence[Statement], isolation: str | None, read_only: bool, deferrable: bool
) -> pb.ExecuteRequest:
    """The request for a transaction; raise `TypeError`/`ValueError` before anything is sent."""
    # A str is iterable too: "SELECT 1" would run as eight one-character statements. A list
    # or tuple (the usual) needs no ABC checks.
    cls = type(statements)
    if (cls is not list and cls is not tuple) and (
        isinstance(statements, str | bytes | Mapping) or not isinstance(statements, Iterable)
    ):
        raise TypeError(
            "statements must be a list of SQL strings or (sql, params) pairs, "
            f"not {type(statements).__name__}"
        )
    request = pb.ExecuteRequest()
    if isolation is None and read_only is False and deferrable is False:
        # The defaults (most calls): the same empty options, set in place rather than built
        # as a message and copied in.
        request.options.SetInParent()
    else:
        request.options.CopyFrom(_options(isolation, read_only, deferrable))
    add = request.statements.add
    for index, statement in enumerate(statements):
        if type(statement) is tuple and len(statement) == 2:  # the usual (sql, params)
            _fill(add(), statement[0], statement[1])
        else:
            _fill(add(), *_split(statement, index))
    return request


def many_statements(sql: str, param_sets: Iterable[Sequence[Any]]) -> list[Statement]:
    """`execute_many`'s statements: (*sql*, params) for each of *param_sets*."""
    if isinstance(param_sets, str | bytes | Mapping) or not isinstance(param_sets, Iterable):
        raise TypeError(
            "param_sets must be a list of parameter lists, one per execution, "
            f"not {type(param_sets).__name__}"
        )
    return [(sql, params) for params in param_sets]


def _statement(sql: str, params: Sequence[Any] | None) -> pb.Statement:
    return _fill(pb.Statement(), sql, params)


def _fill(statement: pb.Statement, sql: str, params: Sequence[Any] | None) -> pb.Statement:
    """*statement* with *sql* and *params* set. The requests build their statements in place
    with this (``statements.add()``): a `pb.Statement` passed to ``statements=[…]`` is
    copied, which cost a third of building a one-statement request."""
    if not isinstance(sql, str):
        raise TypeError(f"sql must be a str, not {type(sql).__name__}")
    if params and not _DOLLAR_PLACEHOLDER.search(sql) and _PYFORMAT_PLACEHOLDER.search(sql):
        # The broker would refuse it too ("no parameters but 1 value"), pointing nowhere.
        raise ValueError(
            "sql has %s-style placeholders, but BrokerClient takes Postgres' $1, $2, …; "
            "write $1 … $n, or use lambda_client.dbapi, whose cursors take %s and %(name)s"
        )
    statement.sql = utf8_text(sql, "sql")
    if params is not None:
        add_params(statement.params, params)
    return statement


# With values and no $n, a %s or %(name)s is a placeholder written for another driver.
_DOLLAR_PLACEHOLDER = re.compile(r"\$[0-9]")
_PYFORMAT_PLACEHOLDER = re.compile(r"%(?:\([^)]+\))?s")


def _split(statement: Statement, index: int) -> tuple[str, Sequence[Any] | None]:
    if isinstance(statement, str):
        return statement, None
    if isinstance(statement, tuple | list) and len(statement) == 2:
        return statement[0], statement[1]
    raise TypeError(
        f"statement {index}: each statement must be a SQL string or a (sql, params) pair, "
        f"not {type(statement).__name__}"
    )


def _options(isolation: str | None, read_only: bool, deferrable: bool) -> pb.TransactionOptions:
    names = "None, 'read committed', 'repeatable read' or 'serializable'"
    if isolation is not None and not isinstance(isolation, str):
        raise TypeError(f"isolation must be {names}, not {type(isolation).__name__}")
    key = isolation.lower().replace("_", " ") if isolation else None
    if key not in _ISOLATION:
        raise ValueError(f"isolation must be {names}, not {isolation!r}")
    for name, flag in (("read_only", read_only), ("deferrable", deferrable)):
        # protobuf would take 1 and refuse "no" with a message naming no argument.
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be True or False, not {flag!r}")
    return pb.TransactionOptions(
        isolation=_ISOLATION[key], read_only=read_only, deferrable=deferrable
    )


def seconds(name: str, value: object, *, allow_zero: bool = False) -> float:
    """*value* as a float; `TypeError`/`ValueError` naming *name* unless it is a finite number
    of seconds above zero (or zero, with *allow_zero*)."""
    if type(value) is float and 0.0 < value < math.inf:
        return value  # the usual case (every call's timeout), without the ABC check below
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number of seconds, not {type(value).__name__}")
    number = float(value)
    if not math.isfinite(number) or number < 0 or (number == 0 and not allow_zero):
        least = "zero or more" if allow_zero else "more than zero"
        raise ValueError(f"{name} must be a finite number of seconds, {least}, not {value!r}")
    return number


def remaining_seconds(context: LambdaContext) -> float:
    """The Lambda invocation's remaining time; `TypeError` if *context* cannot tell it."""
    get_remaining = getattr(context, "get_remaining_time_in_millis", None)
    if not callable(get_remaining):
        raise TypeError(
            "context must be the Lambda context object (with get_remaining_time_in_millis()), "
            f"not {type(context).__name__}"
        )
    millis = get_remaining()
    if isinstance(millis, bool) or not isinstance(millis, numbers.Real) or math.isnan(millis):
        raise TypeError(
            "context.get_remaining_time_in_millis() must return a number of milliseconds, "
            f"not {millis!r}"
        )
    return float(millis) / 1000


def check_target(target: object, source: str = "target") -> str:
    """*target*; `TypeError`/`ValueError` naming *source* if it is clearly not a gRPC target
    (empty, a URL, a port outside 1..65535), which gRPC would only report by never
    connecting."""
    forms = "use host:port, dns:///host:port or ipv4:addr:port,addr:port"
    if not isinstance(target, str):
        raise TypeError(f"{source} must be a str ({forms}), not {type(target).__name__}")
    if not target.strip():
        raise ValueError(f"{source} is empty; {forms}")
    scheme = _URL_SCHEME.match(target)
    if scheme and scheme.group(1).lower() not in _GRPC_SCHEMES:
        raise ValueError(f"{source} {target!r} is a URL, not a gRPC target; {forms}")
    for port in target_ports(target):
        if port is not None and "/" in port and port.partition("/")[0].isdigit():
            raise ValueError(
                f"{source} {target!r} ends with a path ({'/' + port.partition('/')[2]!r}): a "
                "gRPC target names no database, the broker serves one; drop the path (with "
                "lambda_client.dbapi, pass dbname=... to check which database it is)"
            )
        if port is not None and not (port.isdigit() and 1 <= int(port) <= 65535):
            raise ValueError(f"{source} {target!r}: port {port!r} is not in 1..65535")
    return target


def target_ports(target: str) -> list[str | None]:
    """The port of each address of a host:port, ``dns:`` or ``ipv4:``/``ipv6:`` target (None
    where an address has none); no addresses for other schemes (``unix:``, ``xds:``)."""
    scheme, _, rest = target.partition(":")
    if scheme in ("ipv4", "ipv6"):
        addresses = rest.split(",")
    elif scheme == "dns":  # dns:host:port, dns:///host:port or dns://resolver/host:port
        addresses = [rest[2:].partition("/")[2] if rest.startswith("//") else rest]
    elif scheme in _GRPC_SCHEMES:
        return []
    else:
        addresses = [target]
    return [_port(address) for address in addresses]


def _port(address: str) -> str | None:
    if address.startswith("["):  # [::1]:50051
        after = address.partition("]")[2]
        return after[1:] if after.startswith(":") else None
    host, colon, port = address.rpartition(":")
    return port if colon and ":" not in host else None  # ::1 alone is an address, no port
