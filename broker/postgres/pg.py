"""The one module that touches pg8000: connect, run, transaction status, cancel, errors.

pg8000 is blocking; every method here except `cancel` runs on the worker thread that owns the
connection at that moment. `cancel` only reads the backend key and opens its own socket, so the
event loop may call it (through an executor) while a worker is blocked in a query.

Why a subclass of `pg8000.core.CoreConnection` and not `pg8000.native.Connection`:
* statements are prepared once per connection and reused by (SQL text, parameter OIDs) — one
  round trip per execution instead of two for pg8000's unnamed statements; a text's first run
  on a connection goes as the unnamed statement in the same flush as its neighbours (one round
  trip, nothing cached), so SQL with literals written in (Django's) neither costs a prepare
  round trip nor evicts the statements that repeat;
* the command tag ("INSERT 0 1") is kept, which pg8000 drops;
* session SQL (BEGIN, SET LOCAL …, COMMIT) is pipelined with a statement in one flush;
* a result cell whose text pg8000 cannot parse comes back as text instead of raising in the
  middle of the message stream (which would leave the connection out of sync).
"""

from __future__ import annotations

import contextlib
import enum
import socket
import ssl
import struct
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import pg8000.converters as pgc
from pg8000.core import (
    BIND,
    CLOSE,
    COMMAND_COMPLETE,
    DATA_ROW,
    DESCRIBE,
    EMPTY_QUERY_RESPONSE,
    ERROR_RESPONSE,
    EXECUTE_MSG,
    NULL_BYTE,
    PARSE,
    PORTAL,
    PORTAL_SUSPENDED,
    QUERY,
    READY_FOR_QUERY,
    STATEMENT,
    SYNC_MSG,
    Context,
    CoreConnection,
    _flush,
    _read,
    _write,
)
from pg8000.exceptions import DatabaseError, InterfaceError

from broker.configvalues import DatabaseTarget
from broker.postgres import greenio
from broker.postgres.greenio import cooperate
from broker.postgres.params import Bound, bind_params
from broker.security.limits import ResultBudget
from broker.sql.plan import StatementPlan, placeholder_count
from lambda_client import codec
from lambda_client._proto.pgbroker.v1 import broker_pb2 as pb

__all__ = [
    "After",
    "Call",
    "ConnectionLost",
    "PgConnection",
    "PgError",
    "Phase",
    "Session",
    "TransactionStatus",
    "connect",
]

_CANCEL_REQUEST_CODE = 80877102
# `PgConnection.take_counts`: executions of a statement prepared on the connection already,
# of a text's first run (the unnamed statement), and prepares (a text's second run).
STATEMENT_COUNTERS = ("statements_reused", "statements_unnamed", "statements_prepared")
_PLAN_CHANGED = "cached plan must not change result type"


@dataclass(slots=True)
class Call:
    """One of the broker's own statements with its parameters (as text), in the session SQL
    around a call's statements (`Session`): sent with the extended protocol as a statement
    the connection prepares once, so Postgres parses and plans it once per connection
    instead of on every request, as it does simple-protocol SQL with literals.

    Not frozen, though never changed: a request makes several, and a frozen dataclass's
    ``__init__`` costs more than twice as much (0.3 against 0.14 µs)."""

    sql: str
    params: tuple[str | None, ...] = ()


# The session SQL ahead of or behind a call's statements (`PgConnection.run_many`'s *before*
# and *after*): simple-protocol SQL, or its parts in order, some of them `Call`s.
Session = str | Sequence[str | Call]
# What `PgConnection.run_many` sends behind the statements when it is built from their
# results (the response stored under an idempotency key, then COMMIT): held back one round trip.
After = Callable[[list[pb.StatementResult]], Session]


class Phase(enum.Enum):
    """The part of a pipelined call (`PgConnection.run_many`) whose reply was being read when
    it failed (the last one read, while the next group is written).

    Postgres handles messages in order, so the phase says what can have run: a FATAL read
    in `BEFORE` means none of the statements behind it ran.
    """

    SEND = "send"  # no reply read yet
    PREPARE = "prepare"  # preparing a statement not yet cached on the connection
    BEFORE = "before"  # the session SQL ahead of the statements (BEGIN, SET …)
    STATEMENT = "statement"  # one of the statements
    AFTER = "after"  # the session SQL behind them (COMMIT, RESET …)


class TransactionStatus(enum.Enum):
    """The server's transaction status from its last ReadyForQuery (psycopg's names)."""

    IDLE = "idle"
    INTRANS = "in_transaction"
    INERROR = "in_error"  # an aborted transaction: only ROLLBACK is accepted
    UNKNOWN = "unknown"


_TRANSACTION_STATUS = {
    b"I": TransactionStatus.IDLE,
    b"T": TransactionStatus.INTRANS,
    b"E": TransactionStatus.INERROR,
}


@dataclass(frozen=True)
class PgError(Exception):
    """An error Postgres reported (an ErrorResponse); the connection itself is still usable."""

    sqlstate: str
    message: str
    detail: str = ""
    hint: str = ""
    severity: str = "ERROR"
    # Which part of a pipelined call failed (BEFORE, STATEMENT or AFTER); for a statement,
    # its position in the call.
    phase: Phase = Phase.STATEMENT
    index: int = 0

    def __str__(self) -> str:
        return f"{self.severity} {self.sqlstate}: {self.message}"

    @property
    def plan_changed(self) -> bool:
        """True for 0A000 "cached plan must not change result type": a statement prepared on
        the connection no longer fits a table that changed (DDL); it has been forgotten, so the
        same SQL prepares afresh next time."""
        return self.sqlstate == "0A000" and _PLAN_CHANGED in self.message

    @classmethod
    def from_pg8000(cls, exc: DatabaseError) -> PgError:
        """Build from pg8000's DatabaseError, whose first arg is the ErrorResponse field dict."""
        fields = exc.args[0] if exc.args and isinstance(exc.args[0], dict) else {}
        return cls(
            sqlstate=fields.get("C", "XX000"),
            message=fields.get("M", str(exc)),
            detail=fields.get("D", ""),
            hint=fields.get("H", ""),
            severity=str(fields.get("V") or fields.get("S") or "ERROR"),
        )


class ConnectionLost(Exception):
    """The connection to Postgres broke (network error, server gone); it must be discarded.

    `fatal` holds the server's FATAL/PANIC error when it said why (e.g. 57P01 on
    pg_terminate_backend or shutdown). For a break during `PgConnection.run_many`, `phase`
    is the part of the call that was running (None outside one) and `after_sent` is False
    only when the call's *after* SQL (a batch's COMMIT) and the statements sent with it
    certainly did not go out; True when they may have.
    """

    def __init__(
        self,
        message: str,
        fatal: PgError | None = None,
        *,
        phase: Phase | None = None,
        after_sent: bool = True,
    ) -> None:
        super().__init__(message)
        self.fatal = fatal
        self.phase = phase
        self.after_sent = after_sent


# -- result decoding -------------------------------------------------------------------------


class _Raw(str):
    """Cell text pg8000 could not parse; encoded as text rather than breaking the stream."""


def _interval_in(text: str) -> codec.Interval:
    """Parse Postgres' default interval output (IntervalStyle postgres) exactly.

    "1 year 2 mons -3 days -04:05:06.789" -> months, days, microseconds. Any other style
    raises ValueError (the cell then comes back as text).
    """
    months = days = micros = 0
    tokens = text.split()
    i = 0
    while i < len(tokens):
        token = tokens[i]
        if ":" in token:
            sign = -1 if token.startswith("-") else 1
            hours, minutes, seconds = token.lstrip("+-").split(":")
            whole, _, frac = seconds.partition(".")
            clock = (int(hours) * 3600 + int(minutes) * 60 + int(whole)) * 1_000_000
            micros += sign * (clock + int((frac + "000000")[:6]))
            i += 1
            continue
        number, unit = int(token), tokens[i + 1]
        i += 2
        if unit.startswith("year"):
            months += 12 * number
        elif unit.startswith("mon"):
            months += number
        elif unit.startswith("day"):
            days += number
        else:
            raise ValueError(f"unexpected interval unit {unit!r}")
    return codec.Interval(months=months, days=days, microseconds=micros)


def _time_in(text: str) -> Any:
    # Postgres allows 24:00:00, Python's time does not: keep it as microseconds.
    if text.startswith("24:"):
        return _Micros(86_400_000_000)
    return pgc.time_in(text)


class _Micros(int):
    """A time of day in microseconds that Python's `time` cannot hold (24:00:00)."""


_JSON_OIDS = {114: "json", 3802: "jsonb", 199: "json", 3807: "jsonb"}


# Only the types the wire protocol maps; everything else (inet, ranges, …) comes back as text.
def _ad_only(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """*parse*, except that a BC date or timestamp stays text: Python's datetime has no year 0
    or below, and pg8000's fallback parser silently drops the era (2000 BC came back as 2000)."""

    def parse_ad(text: str) -> Any:
        return _Raw(text) if text.endswith(" BC") else parse(text)

    return parse_ad


_IN_FUNCS: dict[int, Callable[[str], Any]] = {
    16: pgc.bool_in,
    17: pgc.bytes_in,
    20: int,
    21: int,
    23: int,
    26: int,
    700: float,
    701: float,
    1700: pgc.numeric_in,
    1082: _ad_only(pgc.date_in),
    1083: _time_in,
    1114: _ad_only(pgc.timestamp_in),
    1184: _ad_only(pgc.timestamptz_in),
    1186: _interval_in,
    2950: pgc.uuid_in,
    114: str,
    3802: str,
}
_ARRAY_OIDS = {  # array oid -> (element oid, element Type)
    1000: (16, pb.TYPE_BOOL),
    1001: (17, pb.TYPE_BYTEA),
    1005: (21, pb.TYPE_INT64),
    1007: (23, pb.TYPE_INT64),
    1016: (20, pb.TYPE_INT64),
    1028: (26, pb.TYPE_INT64),
    1021: (700, pb.TYPE_FLOAT64),
    1022: (701, pb.TYPE_FLOAT64),
    1231: (1700, pb.TYPE_NUMERIC),
    1009: (25, pb.TYPE_TEXT),
    1015: (1043, pb.TYPE_TEXT),
    1014: (1042, pb.TYPE_TEXT),
    1003: (19, pb.TYPE_TEXT),
    1182: (1082, pb.TYPE_DATE),
    1183: (1083, pb.TYPE_TIME),
    1115: (1114, pb.TYPE_TIMESTAMP),
    1185: (1184, pb.TYPE_TIMESTAMPTZ),
    1187: (1186, pb.TYPE_INTERVAL),
    2951: (2950, pb.TYPE_UUID),
    199: (114, pb.TYPE_JSON),
    3807: (3802, pb.TYPE_JSONB),
}
for _array_oid, (_elem_oid, _) in _ARRAY_OIDS.items():
    _IN_FUNCS[_array_oid] = pgc._array_in(_IN_FUNCS.get(_elem_oid, str))


# Integer columns (int8, int2, int4, oid): their values always fit int64.
_INTEGER_OIDS = frozenset((20, 21, 23, 26))


def _encode_cell(value: Any, type_oid: int) -> pb.Value:
    """One result cell as a `Value`, typed by its column's OID."""
    if type_oid in _INTEGER_OIDS and type(value) is int:  # the commonest cell: as codec.encode
        return pb.Value(int64=value)
    if value is None:
        return pb.Value(null=pb.TYPE_UNSPECIFIED)
    if isinstance(value, _Raw):
        return pb.Value(text=str(value))
    if isinstance(value, _Micros):
        return pb.Value(time=int(value))
    if type_oid in _ARRAY_OIDS:
        elem_oid, elem_type = _ARRAY_OIDS[type_oid]
        if isinstance(value, list):
            return _encode_array(value, elem_oid, elem_type)
    json_kind = _JSON_OIDS.get(type_oid)
    if json_kind:
        return pb.Value(**{json_kind: value})
    if type_oid in (700, 701) or isinstance(value, float):
        return pb.Value(float64=value)
    if isinstance(value, str):  # text, unknown types, infinity dates
        return pb.Value(text=value)
    try:
        return codec.encode(value)
    except TypeError:
        return pb.Value(text=str(value))


def _encode_array(items: list[Any], elem_oid: int, elem_type: int) -> pb.Value:
    values = [
        _encode_array(v, elem_oid, elem_type) if isinstance(v, list) else _encode_cell(v, elem_oid)
        for v in items
    ]
    return pb.Value(array=pb.Array(element_type=elem_type, values=values))  # type: ignore[arg-type]


# -- the connection --------------------------------------------------------------------------


# What ends a reply (`_Core.handle_messages`): ReadyForQuery, behind a Sync or a simple
# query; inside a Sync group of several statements (`PgConnection.run_many`'s *one_sync*),
# what ends one statement's: its CommandComplete (EmptyQueryResponse, PortalSuspended) or
# ErrorResponse, after which Postgres skips the rest of the group up to the Sync.
_READY = frozenset((READY_FOR_QUERY,))
_STATEMENT_END = frozenset(
    (COMMAND_COMPLETE, EMPTY_QUERY_RESPONSE, ERROR_RESPONSE, PORTAL_SUSPENDED)
)


class _Core(CoreConnection):  # type: ignore[misc]
    """pg8000's protocol engine with the command tag kept and cell parsing made safe."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # Simple queries sent ahead of the next request (`queue_ahead`); set before the
        # handshake, which already reads messages.
        self._ahead: list[Context] = []
        super().__init__(*args, **kwargs)
        # The handlers for a statement whose rows count against a `ResultBudget`.
        self._budgeted = {**self.message_types, DATA_ROW: self._budgeted_row}

    def queue_ahead(self, sql: str) -> None:
        """Queue *sql* (no flush) to go out with the next request's first flush; its reply is
        read first (`handle_messages`) and an ERROR in it ignored: no round trip of its own."""
        self.send_query_nowait(sql)
        self._ahead.append(Context(sql))

    def handle_messages(self, context: Any, ends: frozenset[bytes] = _READY) -> None:
        """Read the replies queued ahead (`queue_ahead`), then *context*'s: up to
        ReadyForQuery, or with *ends* `_STATEMENT_END` one statement's inside a Sync group."""
        while self._ahead:
            try:
                self._read_messages(self._ahead.pop(0))
            except DatabaseError as exc:
                if PgError.from_pg8000(exc).severity in ("FATAL", "PANIC"):
                    raise
        self._read_messages(context, ends)

    def _read_messages(self, context: Any, ends: frozenset[bytes] = _READY) -> None:
        """pg8000's ``handle_messages`` (every message up to ReadyForQuery, or up to one in
        *ends*, each to its handler, then raise the context's error), reading straight from
        the buffered file: pg8000's ``_read`` copies each header and body twice (a dozen
        messages a request)."""
        read = self._sock.read
        # A statement's rows under a budget (`ResultBudget`) go through `_budgeted_row`.
        budgeted = getattr(context, "budget", None) is not None  # pg8000's own have none
        handlers = self._budgeted if budgeted else self.message_types
        code = None
        while code not in ends:
            try:
                header = read(5)
            except OSError as exc:
                raise InterfaceError("network error") from exc
            if len(header) < 5:  # at EOF (a buffered read returns short only there)
                header += _read(self._sock, 5 - len(header))
            code, length = _HEADER.unpack_from(header)
            try:
                data = read(length - 4)
            except OSError as exc:
                raise InterfaceError("network error") from exc
            if len(data) < length - 4:
                data += _read(self._sock, length - 4 - len(data))
            handlers[code](data, context)
        if context.error is not None:
            raise context.error

    def handle_COMMAND_COMPLETE(self, data: bytes, context: Any) -> None:
        tag = data[:-1].decode(self._client_encoding)
        context.command_tag = tag
        last = tag.rpartition(" ")[2]
        if last.isalpha():  # SET, RESET, BEGIN, COMMIT: no count (a raised ValueError costs µs)
            return
        try:
            count = int(last)
        except ValueError:
            return
        context.row_count = count if context.row_count == -1 else context.row_count + count

    def handle_ERROR_RESPONSE(self, data: bytes, context: Any) -> None:
        super().handle_ERROR_RESPONSE(data, context)
        severity = context.error.args[0].get("V") or context.error.args[0].get("S")
        if severity in ("FATAL", "PANIC"):
            # The server is closing the session: say why now, instead of pg8000 reading on
            # into EOF and reporting a bare "network error".
            raise context.error

    def handle_DATA_ROW(self, data: bytes, context: Any) -> None:
        idx = 2
        row: list[Any] = []
        encoding = self._client_encoding
        for func in context.input_funcs:
            vlen = struct.unpack_from("!i", data, idx)[0]
            idx += 4
            if vlen == -1:
                row.append(None)
                continue
            text = str(data[idx : idx + vlen], encoding=encoding)
            idx += vlen
            try:
                row.append(func(text))
            except Exception:  # never raise mid-stream: the connection would desync
                row.append(_Raw(text))
        context.rows.append(row)

    def _budgeted_row(self, data: bytes, context: Any) -> None:
        """A DataRow counted against the request's `ResultBudget`, kept only while it allows:
        past it, the results are refused anyway, so the row is read but not parsed."""
        if context.budget.keep(len(data)):
            self.handle_DATA_ROW(data, context)

    def handle_ROW_DESCRIPTION(self, data: bytes, context: Any) -> None:
        super().handle_ROW_DESCRIPTION(data, context)
        if getattr(context, "broker_types", False):
            # A FETCH read with the simple protocol: parse cells as prepared statements do.
            context.input_funcs = [_IN_FUNCS.get(c["type_oid"], str) for c in context.columns]

    def send_query_nowait(self, sql: str) -> None:
        """Queue a simple-protocol Query (no flush): its reply is read by `read_reply`."""
        body = sql.encode(self._client_encoding)
        self.send_bytes(QUERY + _LENGTH.pack(len(body) + 5) + body + NULL_BYTE)

    def send_BIND(self, statement_name_bin: bytes, params: Sequence[str | None]) -> None:
        """Bind *params* (text format) to a statement, without pg8000's Flush behind it: every
        Bind is followed by Execute and Sync here, and Postgres sends its output at
        ReadyForQuery anyway. Postgres answered that Flush by sending BindComplete on its own:
        two send() calls per statement instead of one, and two packets for the reader."""
        self.send_bytes(bind_message(statement_name_bin, params, self._client_encoding))

    def send_execute_nowait(
        self, name: bytes, params: Sequence[str | None], sync: bool = True
    ) -> None:
        # Bind and Execute without the Flush pg8000 puts behind each (`send_BIND`): Sync
        # follows at once (or ends the group later, without *sync*), and Postgres sends its
        # output at ReadyForQuery anyway. A Flush made it send every statement's reply in
        # pieces, each a send() for Postgres and a read for the broker.
        tail = _EXECUTE_SYNC if sync else EXECUTE_MSG
        self.send_bytes(bind_message(name, params, self._client_encoding) + tail)

    def send_bytes(self, data: bytes) -> None:
        """Queue *data*, whole protocol messages (no flush), with pg8000's errors
        (``_send_message``): a network error, or a connection closed under it."""
        try:
            self._sock.write(data)
        except OSError as exc:
            raise InterfaceError("network error") from exc
        except ValueError as exc:
            if str(exc) == "write to closed file":
                raise InterfaceError("connection is closed") from exc
            raise
        except AttributeError as exc:
            raise InterfaceError("connection is closed") from exc

    def send_unnamed_nowait(
        self, sql: str, oids: Sequence[int], params: Sequence[str | None], sync: bool = True
    ) -> None:
        """Parse *sql* as the unnamed statement, bind, describe and execute it, no flush: one
        round trip with its neighbours; its RowDescription comes before its rows (read with
        ``broker_types``). Without *sync* a later Sync ends its group."""
        body = bytearray(NULL_BYTE + sql.encode(self._client_encoding) + NULL_BYTE)
        body += struct.pack(f"!H{len(oids)}i", len(oids), *oids)
        self._send_message(PARSE, body)
        self.send_BIND(NULL_BYTE, params)
        self._send_message(DESCRIBE, PORTAL + NULL_BYTE)
        _write(self._sock, EXECUTE_MSG)  # no Flush: as `send_execute_nowait`
        if sync:
            _write(self._sock, SYNC_MSG)

    def queue_close_ahead(self, name: bytes) -> None:
        """Close the prepared statement *name* in the next flush; its reply is read ahead of the
        next request's (`handle_messages`): no round trip of its own."""
        self._send_message(CLOSE, STATEMENT + name)
        _write(self._sock, SYNC_MSG)
        self._ahead.append(Context(None))
        self._statement_nums.discard(name)

    def flush(self) -> None:
        _flush(self._sock)


_HEADER = struct.Struct("!ci")  # a message's type byte and length (with itself)
_LENGTH = struct.Struct("!i")
_COUNTS = struct.Struct("!HH")  # Bind: no parameter format codes (all text), count of values
_NO_VALUES = _COUNTS.pack(0, 0) + b"\x00\x00"  # and no result format codes (all text)
_NULL_VALUE = _LENGTH.pack(-1)
_EXECUTE_SYNC = EXECUTE_MSG + SYNC_MSG


def bind_message(name: bytes, params: Sequence[str | None], encoding: str) -> bytes:
    """The Bind message pg8000's ``send_BIND`` writes for the unnamed portal and the
    statement *name* (NUL-terminated), text values, text results; without the Flush it sends
    behind it."""
    if not params:
        body = NULL_BYTE + name + _NO_VALUES
        return BIND + _LENGTH.pack(len(body) + 4) + body
    parts = bytearray(NULL_BYTE + name + _COUNTS.pack(0, len(params)))
    for value in params:
        if value is None:
            parts += _NULL_VALUE
        else:
            text = value.encode(encoding)
            parts += _LENGTH.pack(len(text))
            parts += text
    parts += b"\x00\x00"
    return BIND + _LENGTH.pack(len(parts) + 4) + parts


@dataclass
class _Prepared:
    name: bytes
    columns: list[dict[str, Any]] | None
    input_funcs: list[Callable[[str], Any]]


@dataclass
class _Cleanup:
    """The broker's own statements behind a transaction (`PgConnection.run_many`'s
    *cleanup*), prepared on the connection, and their one Sync group as sent: constant per
    connection, so encoded once."""

    statements: list[_Prepared]
    wire: bytes


_NO_CLEANUP = _Cleanup([], b"")


# A text run for the first time on a connection: the unnamed statement (`_run_groups`); its
# columns are read from the reply. Empty name: pg8000's prepared names are never empty.
_UNNAMED = _Prepared(b"", None, [])


class PgConnection:
    """One server connection: prepared-statement LRU, pipelined session SQL, cancel, close.

    Every method but `cancel` and `close_quietly` raises `ConnectionLost` when the link breaks
    and `PgError` when Postgres reports an error (the connection is then still in sync).
    """

    def __init__(
        self, core: _Core, target: DatabaseTarget, cache_size: int, statement_timeout_ms: int = 0
    ) -> None:
        self._core = core
        # The session's own statement_timeout (set at connect), in ms: what RESET puts back.
        # A request whose timeout is this one sends no SET for it (broker/flow/batch.py).
        self.default_statement_timeout_ms = statement_timeout_ms
        self._target = target
        self._cache: OrderedDict[tuple[str, tuple[int, ...]], _Prepared] = OrderedDict()
        self._cache_size = cache_size
        # The broker's own statements (`run_many`'s *cleanup*), prepared once, never evicted;
        # and each *cleanup* sequence's statements and encoded Sync group.
        self._own: dict[str, _Prepared] = {}
        self._cleanups: dict[tuple[str, ...], _Cleanup] = {}
        key = core._backend_key_data or b"\0" * 8
        self.backend_pid, self._secret_key = struct.unpack("!ii", key[:8])
        self.closed = False
        # pg8000 resets the status to None after the handshake, whose last message was
        # ReadyForQuery(idle).
        core._transaction_status = b"I"
        # Session-state second line (broker/postgres/audit.py): reported settings at connect,
        # and what an audit found left behind (the connection is then replaced).
        self._reported_at_connect = dict(core.parameter_statuses)
        self.session_dirty: str | None = None
        # The rows of the last `run_many` call's *after* SQL (the commit's WAL position:
        # broker/postgres/replication.py) and of its last *cleanup* statement (the session
        # probe: broker/postgres/audit.py); [] when it had none or it was not sent.
        self.after_rows: list[list[Any]] = []
        self.cleanup_rows: list[list[Any]] = []
        # How far the running `run_many` call got, for the `ConnectionLost` a break raises.
        self._progress = _Progress()
        # Set by `drop_statements`: DEALLOCATE ALL goes out ahead of the next request.
        self._deallocate = False
        # Hashes of (SQL, OIDs) run once as the unnamed statement: seen again, they are
        # prepared (a collision only prepares a text sooner). Bounded, oldest forgotten first.
        self._seen: OrderedDict[int, None] = OrderedDict()
        self._seen_size = max(4 * cache_size, 256)
        # Statement cache counters (`take_counts`), read by the pool between requests.
        self._counts = dict.fromkeys(STATEMENT_COUNTERS, 0)
        # Set by `use_loop_io`: the socket is non-blocking under pg8000.
        self.loop_io = False
        # An error was read in the Sync group being read (`_read_statement`): Postgres skips
        # the rest of the group, so its statements have no reply.
        self._group_failed = False
        # The running `run_many` call's *budget* for its statements' rows.
        self._budget: ResultBudget | None = None

    # state ---------------------------------------------------------------------------------

    @property
    def transaction_status(self) -> TransactionStatus:
        """The status the server reported last (UNKNOWN before it said, or after a break)."""
        status = self._core._transaction_status
        return _TRANSACTION_STATUS.get(status, TransactionStatus.UNKNOWN)

    def reported_changes(self) -> list[str]:
        """Settings Postgres reports (ParameterStatus: TimeZone, DateStyle, …) whose value
        differs from the one at connect time, i.e. changed at session level."""
        now = self._core.parameter_statuses
        before = self._reported_at_connect
        if now == before:  # every request asks (broker/flow/cancel.py): the usual answer, fast
            return []
        return sorted(k for k in now.keys() | before.keys() if now.get(k) != before.get(k))

    @property
    def socket(self) -> socket.socket | None:
        """The underlying socket (for readiness checks), None once closed."""
        return None if self.closed else self._core._usock

    def use_loop_io(self) -> None:
        """Let this connection run in a greenlet on the event loop (`broker.postgres.greenio`;
        on threads it still blocks as before). Call while nothing runs on it."""
        core = self._core
        if self.closed or self.loop_io:
            return
        self.loop_io = True
        old = core._sock
        core._sock = greenio.install(core._usock, core._usock.gettimeout())
        old.close()  # the makefile's reference on the socket; nothing is buffered after idle

    def take_counts(self) -> dict[str, int]:
        """The statement counters since the last call (`STATEMENT_COUNTERS`), reset; called by
        the pool while no worker runs on this connection."""
        counts, self._counts = self._counts, dict.fromkeys(STATEMENT_COUNTERS, 0)
        return counts

    # running SQL ---------------------------------------------------------------------------

    def execute_simple(self, sql: str) -> list[list[Any]]:
        """Run session SQL (BEGIN, ROLLBACK, SET …) with the simple protocol, one round trip;
        return the rows it produced (of every statement in *sql*, in order)."""
        with _Guard(self):
            return list(self._core.execute_simple(sql).rows or ())

    def run(
        self,
        sql: str,
        params: Sequence[pb.Value] = (),
        before: str | None = None,
        after: str | None = None,
        bound: Bound | None = None,
        plan: StatementPlan | None = None,
        cleanup: Sequence[str] = (),
        budget: ResultBudget | None = None,
    ) -> pb.StatementResult:
        """Run one statement, prepared and cached by (SQL, parameter OIDs).

        *before* and *after* are simple-protocol SQL sent in the same flush (one round trip in
        all when the statement is cached). Every reply is read even when one fails, so the
        connection stays in sync; the first error (before, statement, after) is raised as
        `PgError`, or `ConnectionLost` if the link broke.
        """
        return self.run_many(
            [(sql, params)],
            before=before,
            after=after,
            bound=None if bound is None else [bound],
            plans=None if plan is None else [plan],
            cleanup=cleanup,
            budget=budget,
        )[0]

    def run_many(
        self,
        statements: Sequence[tuple[str, Sequence[pb.Value]]],
        before: Session | None = None,
        after: Session | After | None = None,
        bound: Sequence[Bound] | None = None,
        plans: Sequence[StatementPlan] | None = None,
        check: Callable[[list[pb.StatementResult]], None] | None = None,
        cleanup: Sequence[str] = (),
        calls: Sequence[str] = (),
        one_sync: bool = False,
        budget: ResultBudget | None = None,
    ) -> list[pb.StatementResult]:
        """Run *statements* in order, pipelined: one round trip when all are prepared already.

        Prepared statements are sent together in one flush, *before* ahead of them and *after*
        behind the last (BEGIN … COMMIT of a batch). A statement not yet prepared first sends
        what is pending and reads its replies, then is prepared: preparing needs the earlier
        statements to have run (CREATE TABLE, then INSERT into it). Raise `PgError` for the
        first error (``phase``, and ``index`` into *statements*); nothing is sent after a group
        that failed, and nothing at all for a NUL byte in the SQL or a wrong count of values
        (`_check_statements`). `ConnectionLost` carries the ``phase`` that was running and
        ``after_sent``: whether *after* may have been sent.
        *bound* is `bind_params` of each statement's parameters when the caller has it already
        (the service binds them to validate the request); otherwise they are bound here.
        *plans* are the statements' plans (`broker.sql.plan`), which count their placeholders;
        without them the SQL is planned here.
        *after* (a COMMIT) is held back, and follows in a round trip of its own, when it
        needs the results (a callable: ``after(results)`` returns the SQL, e.g. storing the
        response under an idempotency key before COMMIT), or when a statement returns rows
        and *check* is given. Before a held-back *after* the results are read and, when a
        statement returns rows, ``check(results)`` runs: what it (or ``after``) raises
        propagates and *after* is never sent (the caller rolls back). Otherwise *after* stays
        in the statements' flush (one round trip). The rows *after* returned are kept in
        `after_rows` (of its last simple-protocol SQL).
        *before* and *after* may be a list of parts (`Session`): the `Call`s among them are
        prepared once per connection, as *cleanup* is, and a run of them is one Sync group.
        *calls* is the SQL of the `Call`s a callable *after* sends: prepared with *cleanup*,
        before anything is sent (then, not behind *before*'s SET LOCAL ROLE: that role may not
        see the broker's own tables).
        *cleanup* are statements without parameters (the session reset and probe,
        broker/postgres/audit.py) run behind *after*, in the same flush, as statements
        prepared once per connection (Postgres plans them once, not on every call) in one
        more Sync group: they run even when *after* failed, and an error in one skips the
        rest; the last one's rows are kept in `cleanup_rows`.
        *one_sync*: *before* opens a transaction block (BEGIN), so the statements are sent
        with *before*'s last run of `Call`s as one Sync group (Postgres sends its output at
        each Sync: one send() per round trip instead of one per statement). Without BEGIN the
        statements of one Sync group would be one implicit transaction. An error skips the
        rest of the group (those statements get no reply); *after* and *cleanup* stay groups
        of their own, so COMMIT (ROLLBACK, in the aborted transaction) and the reset still run.
        *budget* (reset here) counts the statements' rows and keeps no more of them than the
        result limits let through (`ResultBudget`): the results then lack rows, and the caller
        must refuse them (`check_results` with the budget).
        """
        self._budget = budget
        if budget is not None:
            budget.reset()
        if bound is None:
            bound = [bind_params(params) for _, params in statements]  # may raise BadParameter
        self._check_statements(statements, bound, plans)
        self.after_rows, self.cleanup_rows = [], []
        self._progress = progress = _Progress()
        self._group_failed = False
        with _Guard(self, progress):
            tail = self._own_statements(cleanup)
            if before is not None:
                self._prepare_calls(before, Phase.BEFORE)
            self._prepare_own(calls, Phase.AFTER)
            return self._run_groups(statements, bound, before, after, check, tail, one_sync)

    def prepare(self, sqls: Sequence[str]) -> None:
        """Prepare the broker's own statements *sqls* now, as the session's current role, for
        `Call`s sent later (`run_many`'s *calls*, which prepare just before sending). Raise
        `PgError` if Postgres refuses one (the connection stays in sync) or `ConnectionLost`."""
        with _Guard(self):
            self._prepare_own(sqls, Phase.PREPARE)

    def fetch(
        self, cursor: str, count: int, chunk_bytes: int
    ) -> tuple[list[pb.Column], list[pb.RowChunk], int]:
        """``FETCH FORWARD count FROM cursor`` (an open cursor, a plain identifier): its
        columns, its rows encoded as a prepared statement's rows are and split into chunks of
        about *chunk_bytes* (a larger row travels alone), and the rows' count. Raise
        `PgError` (the transaction is then aborted) or `ConnectionLost`."""
        sql = f"FETCH FORWARD {int(count)} FROM {cursor}"
        context = Context(sql)
        context.broker_types = True
        with _Guard(self):
            self._core.send_query_nowait(sql)
            self._core.flush()
            self._core.handle_messages(context)
        columns = context.columns or []
        oids = [c["type_oid"] for c in columns]
        head = [pb.Column(name=c["name"], type_oid=c["type_oid"]) for c in columns]
        rows = context.rows or ()
        chunks: list[pb.RowChunk] = []
        chunk, size = pb.RowChunk(), 0
        for row in rows:
            if size >= chunk_bytes:
                chunks.append(chunk)
                chunk, size = pb.RowChunk(), 0
            message = chunk.rows.add()
            message.values.extend([_encode_cell(v, oid) for v, oid in zip(row, oids, strict=True)])
            size += message.ByteSize() + 5  # with the field's tag and length
        if chunk.rows:
            chunks.append(chunk)
        return head, chunks, len(rows)

    def _check_statements(
        self,
        statements: Sequence[tuple[str, Sequence[pb.Value]]],
        bound: Sequence[Bound],
        plans: Sequence[StatementPlan] | None,
    ) -> None:
        """Refuse, before anything is sent, what Postgres would reject confusingly or not at all:
        a NUL byte in the SQL (it ends the protocol string: "insufficient data left in
        message"), and a count of values that differs from the statement's placeholders (too
        few: a protocol error naming pg8000's statement; too many: silently ignored).

        Raise `PgError` with the statement's index: 22021 for the NUL byte, as Postgres reports
        one in a value; 42601 for the count, as Postgres reports EXECUTE with a wrong count.
        """
        for index, ((sql, _), (texts, oids)) in enumerate(zip(statements, bound, strict=True)):
            if "\x00" in sql:
                message = "SQL text contains a NUL byte (\\x00), which Postgres does not accept"
                raise PgError("22021", message, index=index)
            if (sql, oids) in self._cache:
                continue  # prepared for as many values as this request has: counted then
            expected = placeholder_count(sql) if plans is None else plans[index].placeholders
            if expected is not None and expected != len(texts):
                raise PgError("42601", _count_mismatch(expected, len(texts)), index=index)

    def _run_groups(
        self,
        statements: Sequence[tuple[str, Sequence[pb.Value]]],
        bound: Sequence[Bound],
        before: Session | None,
        after: Session | After | None,
        check: Callable[[list[pb.StatementResult]], None] | None,
        cleanup: _Cleanup,
        one_sync: bool,
    ) -> list[pb.StatementResult]:
        results: list[pb.StatementResult] = []
        group: list[tuple[int, _Prepared, list[str | None]]] = []
        returns_rows = False
        for index, ((sql, _), (texts, oids)) in enumerate(zip(statements, bound, strict=True)):
            prepared = self._cached(sql, oids)
            if prepared is not None:
                self._counts["statements_reused"] += 1
            elif self._first_sighting(sql, oids):
                prepared = _UNNAMED
                self._counts["statements_unnamed"] += 1
            else:
                if group:
                    results += self._send_group(
                        group, statements, bound, before, None, _NO_CLEANUP, one_sync
                    )
                    before, group = None, []
                prepared = self._prepare_at(sql, oids, index)
                self._counts["statements_prepared"] += 1
            # An unnamed statement's columns are not known before its reply: it may return rows.
            returns_rows = returns_rows or prepared is _UNNAMED or bool(prepared.columns)
            group.append((index, prepared, texts))
        if callable(after) or (check is not None and after is not None and returns_rows):
            # One round trip more, whatever holds *after* back (results to check, to store).
            results += self._send_group(
                group, statements, bound, before, None, _NO_CLEANUP, one_sync
            )
            if check is not None and returns_rows:
                check(results)
            self._send_after(after(results) if callable(after) else after, cleanup)
            return results
        if after is not None:
            self._prepare_calls(after, Phase.AFTER)
        self._progress.after_sent = after is not None or bool(cleanup.statements)
        results += self._send_group(group, statements, bound, before, after, cleanup, one_sync)
        return results

    def _send_after(self, after: Session, cleanup: _Cleanup) -> None:
        """*after* alone (a held-back COMMIT) and *cleanup*; raise the first error as
        `PgError` (phase AFTER)."""
        self._prepare_calls(after, Phase.AFTER)  # before it counts as sent: nothing is yet
        self._progress.after_sent = True
        self._send_session(after)
        self._send_cleanup(cleanup)
        self._core.flush()
        errors: list[PgError] = []
        self._read_after(after, cleanup, errors)
        if errors:
            raise errors[0]

    def _send_cleanup(self, cleanup: _Cleanup) -> None:
        """Queue *cleanup*'s statements as one Sync group (no flush)."""
        if cleanup.wire:
            self._core.send_bytes(cleanup.wire)

    def _read_after(self, after: Session | None, cleanup: _Cleanup, errors: list[PgError]) -> None:
        """Read the replies of *after* and *cleanup*; keep *after*'s rows in `after_rows`
        and the last cleanup statement's in `cleanup_rows`."""
        if after:
            self.after_rows = self._read_session(after, errors, Phase.AFTER)
        if cleanup.statements:
            last = cleanup.statements[-1]
            context = Context("cleanup", columns=last.columns, input_funcs=last.input_funcs)
            self._read_reply(context, errors, Phase.AFTER)
            self.cleanup_rows = list(context.rows or ())

    def _prepare_calls(self, session: Session, phase: Phase) -> None:
        """Prepare the `Call`s in *session* not yet prepared on this connection; a Postgres
        error (e.g. the key store dropped) is raised as *phase*'s, as its SQL's would be."""
        if isinstance(session, str):
            return
        self._prepare_own([part.sql for part in session if isinstance(part, Call)], phase)

    def _prepare_own(self, sqls: Sequence[str], phase: Phase) -> None:
        """`_prepare_calls` of the `Call`s whose SQL is *sqls*."""
        try:
            self._own_statements(sqls)
        except DatabaseError as exc:
            error = PgError.from_pg8000(exc)
            if error.severity in ("FATAL", "PANIC"):
                raise
            raise replace(error, phase=phase) from exc

    def _send_session(self, session: Session, open_end: bool = False) -> None:
        """Queue *session* (no flush): its SQL as simple queries, each run of `Call`s as
        one Sync group (an error in one skips the rest of its run). With *open_end* the last
        run of `Call`s, when *session* ends with one, is left without its Sync: what follows
        joins its group."""
        core = self._core
        runs = _runs(session)
        for at, part in enumerate(runs, start=1):
            if isinstance(part, str):
                core.send_query_nowait(part)
                continue
            encoding = core._client_encoding
            wire = b"".join(
                bind_message(self._own[call.sql].name, call.params, encoding) + EXECUTE_MSG
                for call in part
            )
            core.send_bytes(wire if open_end and at == len(runs) else wire + SYNC_MSG)

    def _read_session(
        self, session: Session, errors: list[PgError], phase: Phase, open_end: bool = False
    ) -> list[list[Any]]:
        """Read the replies of *session* (sent with *open_end* as `_send_session` was); return
        the rows of its last simple-protocol SQL (a `Call`'s rows are read, not kept)."""
        rows: list[list[Any]] = []
        runs = _runs(session)
        for at, part in enumerate(runs, start=1):
            if isinstance(part, str):
                context = Context(part)
                self._read_reply(context, errors, phase)
                rows = list(context.rows or ())
            elif open_end and at == len(runs):  # its group goes on: each call's reply
                for _ in part:
                    self._read_statement(Context(None, columns=[]), errors, phase)
            else:
                self._read_reply(Context(None, columns=[]), errors, phase)
        return rows

    def _own_statements(self, sqls: Sequence[str]) -> _Cleanup:
        """The broker's own statements *sqls*, prepared once per connection (apart from the
        callers' LRU, so they are never evicted), and their Sync group encoded once."""
        if not sqls:
            return _NO_CLEANUP
        key = tuple(sqls)
        cleanup = self._cleanups.get(key)
        if cleanup is not None:
            return cleanup
        own = []
        for sql in sqls:
            prepared = self._own.get(sql)
            if prepared is None:
                self._progress.phase = Phase.PREPARE
                name, columns, _ = self._core.prepare_statement(sql, [])
                funcs = [_IN_FUNCS.get(c["type_oid"], str) for c in columns or ()]
                prepared = self._own[sql] = _Prepared(name, columns, funcs)
            own.append(prepared)
        # Bind and Execute each (no Flush: `_Core.send_BIND`); one Sync for the group.
        wire = b"".join(bind_message(p.name, (), "ascii") + EXECUTE_MSG for p in own)
        cleanup = self._cleanups[key] = _Cleanup(own, wire + SYNC_MSG)
        return cleanup

    def _send_group(
        self,
        group: list[tuple[int, _Prepared, list[str | None]]],
        statements: Sequence[tuple[str, Sequence[pb.Value]]],
        bound: Sequence[Bound],
        before: Session | None,
        after: Session | None,
        cleanup: _Cleanup,
        one_sync: bool = False,
    ) -> list[pb.StatementResult]:
        """Send *before*, the group's statements, *after* and *cleanup* in one flush; read
        every reply. With *one_sync* (`run_many`) the statements, behind *before*'s last run
        of `Call`s, end with one Sync instead of one each."""
        core = self._core
        if before:
            self._send_session(before, open_end=one_sync)
        sync = not one_sync
        for index, prepared, texts in group:
            if prepared is _UNNAMED:
                core.send_unnamed_nowait(statements[index][0], bound[index][1], texts, sync)
            else:
                core.send_execute_nowait(prepared.name, texts, sync)
        if one_sync:
            core.send_bytes(SYNC_MSG)
        if after:
            self._send_session(after)
        self._send_cleanup(cleanup)
        core.flush()
        errors: list[PgError] = []
        if before:
            self._read_session(before, errors, Phase.BEFORE, open_end=one_sync)
        results = []
        read = self._read_statement if one_sync else self._read_reply
        for index, prepared, _ in group:
            sql = statements[index][0]
            context = Context(sql, columns=prepared.columns, input_funcs=prepared.input_funcs)
            context.command_tag = ""
            context.budget = self._budget
            context.broker_types = prepared is _UNNAMED  # cells parsed as a prepared one's
            read(context, errors, Phase.STATEMENT, index)
            if prepared is _UNNAMED:
                prepared = _Prepared(b"", context.columns, context.input_funcs)
            results.append(_result(prepared, context))
        if one_sync:
            self._end_group(errors)
        self._read_after(after, cleanup, errors)
        # Only once every reply is read: closing a statement is a message exchange of its own.
        for error in errors:
            if error.sqlstate == "0A000" and error.phase is Phase.STATEMENT:
                sql, _ = statements[error.index]  # cached plan must not change result type
                self._forget(sql, bound[error.index][1])
        if errors:
            raise errors[0]
        return results

    def _first_sighting(self, sql: str, oids: tuple[int, ...]) -> bool:
        """True the first time (SQL, OIDs) runs here (it is remembered); False after."""
        key = hash((sql, oids))
        if key in self._seen:
            del self._seen[key]
            return False
        self._seen[key] = None
        if len(self._seen) > self._seen_size:
            self._seen.popitem(last=False)
        return True

    def _cached(self, sql: str, oids: tuple[int, ...]) -> _Prepared | None:
        prepared = self._cache.get((sql, oids))
        if prepared is not None:
            self._cache.move_to_end((sql, oids))
        return prepared

    def _prepare_at(self, sql: str, oids: tuple[int, ...], index: int) -> _Prepared:
        """`_prepare`, with a Postgres error (syntax, unknown table) naming its statement."""
        self._progress.phase = Phase.PREPARE
        try:
            return self._prepare(sql, oids)
        except DatabaseError as exc:
            error = PgError.from_pg8000(exc)
            if error.severity in ("FATAL", "PANIC"):
                raise
            raise replace(error, phase=Phase.STATEMENT, index=index) from exc

    def _read_reply(
        self,
        context: Context,
        errors: list[PgError],
        phase: Phase,
        index: int = 0,
        ends: frozenset[bytes] = _READY,
    ) -> bool:
        """Read one reply up to ReadyForQuery (or a message in *ends*); an ERROR is collected
        (True is returned), FATAL propagates."""
        self._progress.phase = phase
        try:
            self._core.handle_messages(context, ends)
        except DatabaseError as exc:
            error = PgError.from_pg8000(exc)
            if error.severity in ("FATAL", "PANIC"):
                raise
            errors.append(replace(error, phase=phase, index=index))
            return True
        return False

    def _read_statement(
        self, context: Context, errors: list[PgError], phase: Phase, index: int = 0
    ) -> None:
        """Read one statement's reply inside a Sync group of several (`_send_group`'s
        *one_sync*), up to its CommandComplete or ErrorResponse (`_read_reply`); after an
        ERROR the rest of the group, which Postgres then skips, is not read."""
        if not self._group_failed:  # else skipped by Postgres: no reply
            self._group_failed = self._read_reply(context, errors, phase, index, _STATEMENT_END)

    def _end_group(self, errors: list[PgError]) -> None:
        """Read the ReadyForQuery that ends a Sync group read with `_read_statement`."""
        self._group_failed = False
        self._read_reply(Context(None), errors, self._progress.phase)

    def _prepare(self, sql: str, oids: tuple[int, ...]) -> _Prepared:
        key = (sql, oids)
        prepared = self._cache.get(key)
        if prepared is not None:
            self._cache.move_to_end(key)
            return prepared
        name, columns, funcs = self._core.prepare_statement(sql, list(oids))
        # pg8000 picked its own input funcs; use ours (only the types the protocol maps).
        funcs = [_IN_FUNCS.get(c["type_oid"], str) for c in columns or ()]
        prepared = _Prepared(name, columns, funcs)
        if self._cache_size > 0:
            self._cache[key] = prepared
            while len(self._cache) > self._cache_size:
                _, evicted = self._cache.popitem(last=False)
                self._core.queue_close_ahead(evicted.name)
        return prepared

    def drop_statements(self) -> None:
        """Forget every prepared statement (DDL committed since they were prepared: their
        plans may no longer fit). Local only, so the event loop may call it on an idle
        connection; ``DEALLOCATE ALL`` is queued ahead of the next request's first round trip
        (`_Guard`), before any statement can be prepared again under a freed name."""
        if not self._cache and not self._own and not self._core._statement_nums:
            return
        self._cache.clear()
        self._own.clear()
        self._cleanups.clear()
        self._core._statement_nums.clear()
        self._deallocate = True

    def _forget(self, sql: str, oids: tuple[int, ...]) -> None:
        evicted = self._cache.pop((sql, oids), None)
        if evicted is not None:
            self._core.close_prepared_statement(evicted.name)

    # cancel and close ----------------------------------------------------------------------

    def cancel(self, timeout: float = 5.0) -> bool:
        """Ask the server to cancel the query this connection is running (CancelRequest).

        Opens its own short-lived socket, so it is safe from any thread. Return False if the
        request could not be delivered; never raises.
        """
        packet = struct.pack("!iiii", 16, _CANCEL_REQUEST_CODE, self.backend_pid, self._secret_key)
        try:
            with socket.create_connection((self._target.host, self._target.port), timeout) as s:
                s.sendall(packet)
                s.recv(1)  # the server closes the socket once it has read the request
        except OSError:
            return False
        return True

    def close_quietly(self) -> None:
        """Send Terminate and close the socket; never raises (the link may already be gone)."""
        if self.closed:
            return
        self.closed = True
        with contextlib.suppress(Exception):
            self._core.close()


@dataclass
class _Progress:
    """How far a `PgConnection.run_many` call got: the part running, and whether the group
    with the *after* SQL has gone out (set just before it is written, as it may then have)."""

    phase: Phase = Phase.SEND
    after_sent: bool = False


class _Guard:
    """Turns pg8000 exceptions into `PgError` / `ConnectionLost`; broken links mark closed.

    With *progress* (a `run_many` call) a `ConnectionLost` carries its phase and after_sent;
    without, neither is known (phase None, after_sent True: assume the worst)."""

    def __init__(self, conn: PgConnection, progress: _Progress | None = None) -> None:
        self.conn = conn
        self.progress = progress

    def __enter__(self) -> None:
        if self.conn.closed:
            raise self._lost("connection is closed")
        if self.conn._deallocate:  # `PgConnection.drop_statements`
            self.conn._deallocate = False
            try:
                self.conn._core.queue_ahead("DEALLOCATE ALL")
            except (OSError, AttributeError) as exc:
                self.conn.close_quietly()
                raise self._lost(f"connection to Postgres lost: {exc}") from exc

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        if exc is None:
            return
        if isinstance(exc, DatabaseError):
            error = PgError.from_pg8000(exc)
            if error.severity in ("FATAL", "PANIC"):
                self.conn.close_quietly()
                raise self._lost(str(error), fatal=error) from exc
            raise error from exc
        if isinstance(exc, InterfaceError | OSError | struct.error | AttributeError):
            # AttributeError: pg8000 after its socket was closed under it.
            self.conn.close_quietly()
            raise self._lost(f"connection to Postgres lost: {exc}") from exc

    def _lost(self, message: str, fatal: PgError | None = None) -> ConnectionLost:
        if self.progress is None:
            return ConnectionLost(message, fatal)
        return ConnectionLost(
            message, fatal, phase=self.progress.phase, after_sent=self.progress.after_sent
        )


def _runs(session: Session) -> list[str | list[Call]]:
    """*session*'s parts in order, each run of `Call`s in one list (one Sync group)."""
    if isinstance(session, str):
        return [session]
    runs: list[str | list[Call]] = []
    for part in session:
        if isinstance(part, str):
            runs.append(part)
        elif runs and isinstance(runs[-1], list):
            runs[-1].append(part)
        else:
            runs.append([part])
    return runs


def _count_mismatch(expected: int, given: int) -> str:
    """E.g. "the statement has 2 parameters ($1..$2) but 1 value was given"."""
    if expected == 0:
        takes = "no parameters"
    elif expected == 1:
        takes = "1 parameter ($1)"
    else:
        takes = f"{expected} parameters ($1..${expected})"
    values = "1 value was" if given == 1 else f"{given} values were"
    return f"the statement has {takes} but {values} given"


# Result rows encoded between two checks whether the loop is due a turn (`_result` on a loop
# greenlet: `greenio.cooperate`).
COOPERATE_ROWS = 64


def _result(prepared: _Prepared, context: Any) -> pb.StatementResult:
    result = pb.StatementResult(
        rows_affected=context.row_count, command_tag=getattr(context, "command_tag", "")
    )
    columns = prepared.columns
    if not columns and not context.rows:  # UPDATE, INSERT, DDL: no loops to set up
        return result
    columns = columns or []
    oids = [c["type_oid"] for c in columns]
    for column in columns:
        result.columns.add(name=column["name"], type_oid=column["type_oid"])
    for index, row in enumerate(context.rows or (), start=1):
        result.rows.add().values.extend(
            _encode_cell(value, oid) for value, oid in zip(row, oids, strict=True)
        )
        if not index % COOPERATE_ROWS:
            cooperate()  # on the event loop (PGBROKER_PG_IO=loop): let other callers in
    return result


# -- connecting ------------------------------------------------------------------------------

_ssl_contexts: dict[tuple[str, str | None], ssl.SSLContext] = {}
_ssl_lock = threading.Lock()


def ssl_context_for(target: DatabaseTarget) -> ssl.SSLContext | bool:
    """The TLS context for *target*'s sslmode, built once and reused (pg8000 builds one per
    connect otherwise, ~20 ms). `False` for sslmode=disable.

    libpq semantics: allow/prefer/require encrypt without verifying; verify-ca checks the
    chain (against sslrootcert, or the system store); verify-full also checks the host name.
    On RDS use ``sslmode=verify-full&sslrootcert=/path/to/global-bundle.pem``.
    """
    if target.sslmode == "disable":
        return False
    key = (target.sslmode, target.sslrootcert)
    with _ssl_lock:
        context = _ssl_contexts.get(key)
        if context is None:
            context = _build_ssl_context(target)
            _ssl_contexts[key] = context
        return context


def _build_ssl_context(target: DatabaseTarget) -> ssl.SSLContext:
    verify = target.sslmode in ("verify-ca", "verify-full")
    cafile = target.sslrootcert if target.sslrootcert not in (None, "system") else None
    context = ssl.create_default_context(cafile=cafile if verify else None)
    context.check_hostname = target.sslmode == "verify-full"
    if not verify:
        context.verify_mode = ssl.CERT_NONE
    return context


def connect(
    target: DatabaseTarget,
    timeout: float,
    statement_timeout: float,
    cache_size: int = 100,
) -> PgConnection:
    """Open a server connection: TCP_NODELAY socket, reused TLS context, startup settings.

    The session's statement_timeout is set to *statement_timeout* so a statement is bounded
    by the server even if the broker stops watching. Raise `ConnectionLost` if the server is
    unreachable or refuses (`fatal` set when it said why, e.g. too many clients).
    """
    context = ssl_context_for(target)
    statement_timeout_ms = max(1, round(statement_timeout * 1000))
    try:
        core = _open(target, timeout, statement_timeout, context)
    except InterfaceError as exc:
        if "refuses SSL" in str(exc) and target.sslmode in ("allow", "prefer"):
            core = _open(target, timeout, statement_timeout, False)
        else:
            raise ConnectionLost(f"cannot connect to {_where(target)}: {exc}") from exc
    return PgConnection(core, target, cache_size, statement_timeout_ms)


def _where(target: DatabaseTarget) -> str:
    return f"{target.host}:{target.port}"


def _detect_dead_peer(sock: socket.socket) -> None:
    """Notice a server that vanished without a reset (failover, dropped packets) in about 25 s
    instead of the OS default of two hours, so a worker never blocks in recv() for that long."""
    for option, value in (("TCP_KEEPIDLE", 10), ("TCP_KEEPINTVL", 5), ("TCP_KEEPCNT", 3)):
        if hasattr(socket, option):
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, option), value)
    if hasattr(socket, "TCP_USER_TIMEOUT"):  # unacknowledged writes
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, 25_000)


def _open(target: DatabaseTarget, timeout: float, statement_timeout: float, context: Any) -> _Core:
    try:
        sock = socket.create_connection((target.host, target.port), timeout)
    except OSError as exc:
        raise ConnectionLost(f"cannot connect to {_where(target)}: {exc}") from exc
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    _detect_dead_peer(sock)
    try:
        core = _Core(
            target.user,
            host=target.host,
            database=target.database,
            port=target.port,
            password=target.password,
            ssl_context=context,
            application_name=target.application_name,
            startup_params={"statement_timeout": str(max(1, round(statement_timeout * 1000)))},
            sock=sock,
        )
    except DatabaseError as exc:
        sock.close()
        error = PgError.from_pg8000(exc)
        raise ConnectionLost(f"{_where(target)} refused the connection: {error}", error) from exc
    except (OSError, struct.error) as exc:
        sock.close()
        raise ConnectionLost(f"cannot connect to {_where(target)}: {exc}") from exc
    except InterfaceError:
        sock.close()
        raise
    # The connect timeout must not bound queries: from here on, block (the broker's own
    # deadline handling and statement_timeout bound the work).
    core._usock.settimeout(None)
    return core
