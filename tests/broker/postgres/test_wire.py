"""What `PgConnection` writes and reads itself instead of through pg8000's helpers
(broker/postgres/pg.py: `bind_message`, the cleanup group encoded once per connection, the
message reader): the same bytes as pg8000's encoders, less the Flush pg8000 puts behind each
Bind, against a real Postgres; what a pipelined keyed call writes, read off the socket; and
how a batch inside BEGIN is read when its statements share one Sync group (`run_many`'s
*one_sync*): one ReadyForQuery per group, an error naming its statement, the rest skipped."""

from __future__ import annotations

import io
import struct
import uuid
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any

import pytest
from pg8000.core import (
    EXECUTE_MSG,
    FLUSH_MSG,
    NULL_BYTE,
    QUERY,
    READY_FOR_QUERY,
    SYNC_MSG,
    CoreConnection,
)

from broker.config import parse_database_url
from broker.flow.batch import Batch, StatementFailed, run_transaction
from broker.postgres import keys
from broker.postgres.audit import CLEANUP
from broker.postgres.params import bind_params
from broker.postgres.pg import (
    PgConnection,
    PgError,
    Phase,
    TransactionStatus,
    bind_message,
    connect,
)
from broker.security.limits import Limits, ResultBudget
from broker.sql.plan import plan_request
from lambda_client._proto.pgbroker.v1 import broker_pb2 as pb


@pytest.fixture
def conn(postgres: Any) -> Iterator[PgConnection]:
    connection = connect(
        parse_database_url(postgres.dsn + "?sslmode=disable"), timeout=5, statement_timeout=30
    )
    yield connection
    connection.close_quietly()


class Tap:
    """The connection's buffered file, recording what is written through it."""

    def __init__(self, file: Any) -> None:
        self.file = file
        self.sent = bytearray()

    def write(self, data: bytes) -> int:
        self.sent += data
        return int(self.file.write(data))

    def __getattr__(self, name: str) -> Any:
        return getattr(self.file, name)


def _tapped(conn: PgConnection, call: Callable[[], Any]) -> tuple[Any, bytes]:
    core = conn._core
    tap = Tap(core._sock)
    core._sock = tap
    try:
        return call(), bytes(tap.sent)
    finally:
        core._sock = tap.file


def _pg8000_wire(conn: PgConnection, send: Callable[[CoreConnection], None]) -> bytes:
    """What pg8000's own encoders write for *send* (into a buffer, not the socket)."""
    core = conn._core
    saved, core._sock = core._sock, io.BytesIO()
    try:
        send(core)
        return bytes(core._sock.getvalue())
    finally:
        core._sock = saved


PARAMS = [
    [],
    [pb.Value(int64=5)],
    [pb.Value(text="żółw ' \\"), pb.Value(null=pb.TYPE_TEXT), pb.Value(text="")],
    [pb.Value(bytea=b"\x00" * 300)],
]


@pytest.mark.parametrize("name", [NULL_BYTE, b"pg8000_statement_12\x00"])
@pytest.mark.parametrize("params", PARAMS)
def test_bind_message_is_pg8000s_bind(
    conn: PgConnection, name: bytes, params: list[pb.Value]
) -> None:
    texts, _ = bind_params(params)
    expected = _pg8000_wire(conn, lambda core: CoreConnection.send_BIND(core, name, texts))
    assert bind_message(name, texts, conn._core._client_encoding) + FLUSH_MSG == expected


def _pg8000_bind(core: CoreConnection, name: bytes, texts: Any) -> None:
    """pg8000's Bind into *core*'s buffer, without the Flush it writes behind it (the broker
    sends none: Sync follows)."""
    CoreConnection.send_BIND(core, name, texts)
    data = core._sock.getvalue()
    assert data.endswith(FLUSH_MSG)
    core._sock.seek(len(data) - len(FLUSH_MSG))
    core._sock.truncate()


def _request_as_pg8000_sends_it(
    conn: PgConnection, sql: str, params: list[pb.Value], before: str
) -> bytes:
    """SET …, then Bind/Execute/Sync of the prepared *sql*, then the cleanup group."""
    texts, oids = bind_params(params)
    name = conn._cache[(sql, oids)].name

    def send(core: CoreConnection) -> None:
        CoreConnection._send_message(core, QUERY, before.encode() + NULL_BYTE)
        _pg8000_bind(core, name, texts)
        core._sock.write(EXECUTE_MSG + SYNC_MSG)
        for cleanup_sql in CLEANUP:
            _pg8000_bind(core, conn._own[cleanup_sql].name, ())
            core._sock.write(EXECUTE_MSG)
        core._sock.write(SYNC_MSG)

    return _pg8000_wire(conn, send)


def test_a_request_sends_what_pg8000s_encoders_send(conn: PgConnection) -> None:
    sql = "SELECT $1::int + 1, $2::text"
    params = [pb.Value(int64=41), pb.Value(text="żółw")]
    before = "SET application_name = 'pgbroker:f:r'"

    def run() -> pb.StatementResult:
        return conn.run(sql, params, before=before, cleanup=CLEANUP)

    for _ in range(2):  # the unnamed statement, then prepared
        run()
    for _ in range(2):  # the cleanup group encoded once, sent on every request
        result, sent = _tapped(conn, run)
        assert sent == _request_as_pg8000_sends_it(conn, sql, params, before)
        assert [v.int64 for v in result.rows[0].values[:1]] == [42]
        assert conn.cleanup_rows == [[""]]
    # Prepared afresh after DDL, and encoded again: under other names, once another
    # statement took the first free one.
    old = {conn._own[s].name for s in CLEANUP}
    conn.drop_statements()
    for _ in range(2):
        conn.run("SELECT 2")
    for _ in range(3):
        run()
    assert old != {conn._own[s].name for s in CLEANUP}
    result, sent = _tapped(conn, run)
    assert sent == _request_as_pg8000_sends_it(conn, sql, params, before)
    assert conn.cleanup_rows == [[""]]


def test_replies_larger_than_the_buffer_and_empty_ones_are_read_whole(conn: PgConnection) -> None:
    big = conn.run("SELECT repeat('x', 100000), ''", cleanup=CLEANUP)
    assert [len(v.text) for v in big.rows[0].values] == [100000, 0]
    assert conn.execute_simple("") == []  # EmptyQueryResponse: a message without a body
    assert conn.run("SELECT 1").rows[0].values[0].int64 == 1


def test_a_result_budget_keeps_the_limit_and_counts_the_rest(conn: PgConnection) -> None:
    """Under a `ResultBudget` (row limit 10) a 100,000-row result keeps 11 rows and counts the
    rest; its command tag still says how many there were; the connection reads on in sync;
    a later run of the same budget starts from nothing."""
    budget = ResultBudget(replace(Limits(0, 0, 0, 0, 0), max_result_rows=10))
    results = conn.run_many(
        [("SELECT g FROM generate_series(1, 100000) AS g", ()), ("SELECT 7", ())],
        cleanup=CLEANUP,
        budget=budget,
    )
    assert [len(result.rows) for result in results] == [11, 0]
    assert results[0].rows_affected == 100000 and results[1].rows_affected == 1
    assert (budget.rows, budget.dropped_rows) == (11, 99990)
    assert conn.cleanup_rows == [[""]]  # the probe behind it was read: still in sync
    again = conn.run("SELECT g FROM generate_series(1, 5) AS g", budget=budget)
    assert len(again.rows) == 5 and (budget.rows, budget.full) == (5, False)
    assert len(conn.run("SELECT generate_series(1, 50)").rows) == 50  # no budget: all kept


def test_integer_cells_come_back_as_codec_encodes_them(conn: PgConnection) -> None:
    """The fast path for integer columns gives what `codec.encode` gives (and NULL stays
    NULL)."""
    from lambda_client import codec

    sql = (
        "SELECT (-32768)::int2, 2147483647::int4, (-9223372036854775808)::int8,"
        " 9223372036854775807::int8, 4294967295::oid, NULL::int4, true"
    )
    values = list(conn.run(sql).rows[0].values)
    expected = [-32768, 2147483647, -(2**63), 2**63 - 1, 4294967295, None, True]
    assert values == [codec.encode(value) for value in expected]


def _message_types(data: bytes) -> list[str]:
    """The frontend messages in *data*, by their type byte ("B" Bind, "H" Flush, "S" Sync …)."""
    types, at = [], 0
    while at < len(data):
        (length,) = struct.unpack_from("!i", data, at + 1)
        types.append(chr(data[at]))
        at += 1 + length
    return types


def test_a_keyed_batch_sends_no_flush_only_syncs(keyed_pg: PgConnection, table: str) -> None:
    """Postgres answers a Flush by sending what it has at once: a Flush behind each Bind
    (pg8000's) made it send every BindComplete alone, two send() calls per statement."""
    conn = keyed_pg
    conn.execute_simple(f"CREATE TABLE {table} (note text)")
    sqls = [f"INSERT INTO {table} VALUES ($1)", f"SELECT count(*) FROM {table}"]
    plan = plan_request(sqls)

    def batch() -> Batch:
        statements = [pb.Statement(sql=sqls[0], params=[pb.Value(text="x")])]
        statements.append(pb.Statement(sql=sqls[1]))
        claim = keys.KeyClaim("wire", f"wire-{uuid.uuid4()}", b"\x01", 60.0)
        return Batch(statements=statements, plan=plan, claim=claim)

    for _ in range(2):  # unnamed, then prepared: cached from now on
        run_transaction(conn, batch(), None, 30)
    _, sent = _tapped(conn, lambda: run_transaction(conn, batch(), None, 30))
    types = _message_types(sent)
    assert "H" not in types, types
    # BEGIN and the claim's INSERT (its delete of an expired key only when the INSERT met
    # one); the batch's two; the store and COMMIT; the reset and the probe: all prepared, no
    # simple query; one Sync for BEGIN, the claim and the statements (inside BEGIN), one for
    # the store and COMMIT, one for the reset and probe.
    assert types.count("B") == 2 + 2 + 2 + 2, types
    assert types.count("Q") == 0, types
    assert types.count("S") == 1 + 1 + 1, types


class Ready:
    """Counts the ReadyForQuery messages the connection reads: Postgres sends one, and sends
    what it has (a send() call), at each Sync and behind each simple query."""

    def __init__(self, conn: PgConnection) -> None:
        self.count = 0
        handlers = conn._core.message_types
        handle = handlers[READY_FOR_QUERY]

        def counted(data: bytes, context: Any) -> None:
            self.count += 1
            handle(data, context)

        handlers[READY_FOR_QUERY] = counted


def _explicit(sqls: list[str], key: str | None = None) -> Batch:
    """A batch inside BEGIN … COMMIT (several statements), keyed with *key*."""
    statements = [pb.Statement(sql=sql) for sql in sqls]
    claim = None if key is None else keys.KeyClaim("wire", key, b"\x01", 60.0)
    return Batch(statements=statements, plan=plan_request(sqls), claim=claim)


@pytest.mark.parametrize(("keyed", "groups"), [(False, 4), (True, 3)], ids=["plain", "keyed"])
def test_statements_inside_begin_share_one_sync_group(
    keyed_pg: PgConnection, table: str, keyed: bool, groups: int
) -> None:
    """Plain: BEGIN (a simple query), the three statements (one group), COMMIT (a simple
    query), the reset and probe. Keyed: BEGIN, the claim and the statements (one group); the
    store and COMMIT; the reset and probe. One Sync per statement made 6 and 7."""
    conn = keyed_pg
    conn.execute_simple(f"CREATE TABLE {table} (n int)")
    sqls = [f"INSERT INTO {table} VALUES (1)", f"UPDATE {table} SET n = n + 1"]
    sqls.append(f"INSERT INTO {table} VALUES (5)")

    def batch() -> Batch:
        return _explicit(sqls, f"wire-{uuid.uuid4()}" if keyed else None)

    for _ in range(2):  # unnamed, then prepared: cached from now on
        run_transaction(conn, batch(), None, 30)
    ready = Ready(conn)
    results, sent = _tapped(conn, lambda: run_transaction(conn, batch(), None, 30))
    assert ready.count == groups
    assert _message_types(sent).count("S") == groups - (0 if keyed else 2)  # 2 simple queries
    assert [r.command_tag for r in results] == ["INSERT 0 1", "UPDATE 5", "INSERT 0 1"]
    assert conn.transaction_status is TransactionStatus.IDLE
    assert conn.cleanup_rows and conn.session_dirty is None
    assert conn.execute_simple(f"SELECT count(*), sum(n) FROM {table}") == [[6, 27]]


# A statement that fails when it runs (a prepared one as well as the unnamed one), one that
# sends two rows before it fails, and one that fails to parse (unnamed: in the group; its
# second run prepares it alone, which fails there).
FAILING = [
    "SELECT 1 / 0",
    "SELECT 1 / (3 - g) FROM generate_series(1, 5) g",
    "SELEC 1",
]


@pytest.mark.parametrize("failing", FAILING, ids=["execute", "after-rows", "parse"])
@pytest.mark.parametrize("at", [0, 1, 3])
@pytest.mark.parametrize("keyed", [False, True], ids=["plain", "keyed"])
def test_an_error_inside_begin_names_its_statement_and_rolls_back(
    keyed_pg: PgConnection, table: str, failing: str, at: int, keyed: bool
) -> None:
    """Postgres skips what follows an error up to the group's Sync: the error read is the
    failed statement's (its index), nothing behind it ran (the sequence did not move), COMMIT
    (ROLLBACK now) and the reset still ran, and the connection is idle and in sync for the
    next batch. Three runs of the failing statement: unnamed, prepared (its prepare splits
    the group; SELEC's fails), cached (SELEC: prepared again, failing again)."""
    conn = keyed_pg
    conn.execute_simple(f"CREATE TABLE {table} (n int); CREATE SEQUENCE {table}_seq")
    work = [f"INSERT INTO {table} VALUES (1)", f"SELECT nextval('{table}_seq')"]
    work.append(f"UPDATE {table} SET n = n + 1")

    def key() -> str | None:
        return f"wire-{uuid.uuid4()}" if keyed else None

    for _ in range(2):  # the work's statements (and the broker's own) prepared and cached
        run_transaction(conn, _explicit(work, key()), None, 30)
    sqls = [*work[:at], failing, *work[at:]]
    expected = "42601" if failing == "SELEC 1" else "22012"
    ready = Ready(conn)
    for run in range(3):
        ready.count = 0
        claim = key()
        with pytest.raises(StatementFailed) as failure:
            run_transaction(conn, _explicit(sqls, claim), None, 30)
        error = failure.value.__cause__
        assert isinstance(error, PgError)
        assert (error.sqlstate, error.phase, error.index) == (expected, Phase.STATEMENT, at)
        assert conn.transaction_status is TransactionStatus.IDLE
        assert conn.session_dirty is None
        if not keyed and (run == 0 or (run == 2 and failing != "SELEC 1")):
            # One flush: BEGIN, the statements (one group), COMMIT, the reset and probe, all
            # read. (A keyed batch's store and COMMIT wait for the results: not sent.)
            assert (ready.count, conn.cleanup_rows) == (4, [[""]])
        assert conn.execute_simple(f"SELECT count(*), sum(n) FROM {table}") == [[2, 5]]
        moved = conn.execute_simple(f"SELECT last_value FROM {table}_seq")
        assert moved == [[3 if at >= 2 else 2]], "a statement behind the error ran"
        conn.execute_simple(f"SELECT setval('{table}_seq', 2)")
        if claim is not None:
            assert conn.execute_simple(
                f"SELECT count(*) FROM {keys.TABLE} WHERE key = {keys._literal(claim)}"
            ) == [[0]]
    # In sync and clean: the work without the failing statement commits.
    results = run_transaction(conn, _explicit(work, key()), None, 30)
    assert results[0].command_tag == "INSERT 0 1"
    assert conn.execute_simple(f"SELECT count(*), sum(n) FROM {table}") == [[3, 9]]
    assert conn.transaction_status is TransactionStatus.IDLE


def test_a_batch_that_reports_an_error_committed_nothing(
    keyed_pg: PgConnection, table: str
) -> None:
    """A `ROLLBACK TO SAVEPOINT` behind the failed statement is skipped with the rest of the
    group: with a Sync per statement it ran, the INSERT behind it too, and COMMIT committed
    that while the caller was told the batch failed (`StatementFailed`: rolled back)."""
    conn = keyed_pg
    conn.execute_simple(f"CREATE TABLE {table} (n int)")
    sqls = ["SAVEPOINT s", "SELECT 1 / 0", "ROLLBACK TO SAVEPOINT s"]
    sqls.append(f"INSERT INTO {table} VALUES (1)")
    for _ in range(3):  # unnamed, prepared, cached
        with pytest.raises(StatementFailed) as failure:
            run_transaction(conn, _explicit(sqls), None, 30)
        assert failure.value.database_error.statement_index == 1
        assert conn.execute_simple(f"SELECT count(*) FROM {table}") == [[0]]
        assert conn.transaction_status is TransactionStatus.IDLE
