"""Read replicas (issue 16): routing, read-your-writes and fail-over, against the session's
real Postgres and a real streaming replica of it (``replica``, made with pg_basebackup -R).

Where a read ran is read from the server itself: ``pg_is_in_recovery()`` is true only on the
replica.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pg8000.native
import pytest

from broker.flow.routing import Router
from broker.pooling.targets import Target, TargetSet, _History
from broker.postgres.replication import commit_position, format_lsn, parse_lsn
from devtools.localpg import LocalReplica
from lambda_client import BrokerClient
from lambda_client._proto.pgbroker.v1 import broker_pb2 as pb
from lambda_client.aio import AsyncBrokerClient
from tests.fixtures.brokers import InProcessBroker
from tests.support import calling_in_a_loop, wait_until

ON_REPLICA = "SELECT pg_is_in_recovery()"
# The same, calling no volatile function (pg_is_in_recovery() is one), for auto routing.
IN_STANDBY = "current_setting('in_hot_standby') = 'on'"


def on_replica(result: Any) -> bool:
    return bool(result.rows[0][0])


def replica_flags(replica: LocalReplica, **flags: Any) -> dict[str, Any]:
    return {
        "replica_urls": replica.dsn + "?sslmode=disable",
        "replica_check_interval": 0.2,
        "queue_timeout": 5,
        **flags,
    }


@pytest.fixture
def broker_with_replica(
    start_inproc_broker: Callable[..., InProcessBroker], replica: LocalReplica
) -> Callable[..., InProcessBroker]:
    """Factory: a broker on the session's Postgres with *replica* as ``replica1``, started
    once the replica is in the rotation."""

    def start(**flags: Any) -> InProcessBroker:
        broker = start_inproc_broker(**replica_flags(replica, **flags))
        wait_until(lambda: broker.stats()["target.replica1.in_rotation"] == 1, 10)
        return broker

    return start


@pytest.fixture
def client(request: pytest.FixtureRequest) -> Iterator[Callable[[InProcessBroker], BrokerClient]]:
    made: list[BrokerClient] = []

    def make(broker: InProcessBroker, target: str | None = None) -> BrokerClient:
        made.append(BrokerClient(target or broker.target, timeout=20))
        return made[-1]

    yield make
    for each in made:
        each.close()


def wait_replayed(primary: pg8000.native.Connection, replica: pg8000.native.Connection) -> None:
    """Wait until *replica* has replayed everything *primary* has written so far."""
    (lsn,) = primary.run("SELECT pg_current_wal_insert_lsn()::text")[0]
    wait_until(
        lambda: replica.run("SELECT pg_last_wal_replay_lsn() >= $1::pg_lsn", lsn=lsn)[0][0],
        10,
        what="the replica to replay",
    )


def test_read_only_work_runs_on_the_replica_and_the_rest_on_the_primary(
    broker_with_replica: Callable[..., InProcessBroker],
    client: Callable[..., BrokerClient],
    admin: pg8000.native.Connection,
    replica_admin: pg8000.native.Connection,
    table: str,
) -> None:
    broker = broker_with_replica()
    db = client(broker)
    assert on_replica(db.query(ON_REPLICA, read_only=True))
    assert on_replica(db.transaction([ON_REPLICA, "SELECT 1"], read_only=True)[0])
    with db.stream(ON_REPLICA, read_only=True) as rows:
        assert list(rows) == [(True,)]
    with db.begin(read_only=True) as tx:
        assert on_replica(tx.query(ON_REPLICA))
    # Not marked read_only: the primary (the default routing is explicit).
    assert not on_replica(db.query(ON_REPLICA))
    with db.begin() as tx:
        assert not on_replica(tx.query(ON_REPLICA))
    # SERIALIZABLE cannot run on a hot standby: the primary, even when read only.
    assert not on_replica(db.transaction([ON_REPLICA], read_only=True, isolation="serializable")[0])

    # The replica's pool and the monitor's connection show in the replica's own
    # pg_stat_activity.
    pool_size = broker.settings.replica_pool_size
    broker_backends = (
        "SELECT application_name, count(*) FROM pg_stat_activity"
        " WHERE application_name LIKE 'pgbroker%' GROUP BY 1 ORDER BY 1"
    )
    assert replica_admin.run(broker_backends) == [["pgbroker", pool_size], ["pgbroker-monitor", 1]]

    # Writes and SELECT … FOR UPDATE go to the primary.
    db.query(f"CREATE TABLE {table} (id int)")
    db.query(f"INSERT INTO {table} VALUES (1)")
    row = db.query(f"SELECT id, pg_is_in_recovery() FROM {table} FOR UPDATE").rows[0]
    assert row == (1, False)
    stats = broker.stats()
    assert stats["target.replica1.in_rotation"] == 1
    assert stats["target.replica1.routed_num"] == 4
    assert stats["target.replica1.pool_max"] == pool_size
    assert stats["target.primary.pool_max"] == stats["pool_max"]
    assert stats["target.replica1.replica_lag_ms"] >= 0


def test_auto_routing_reads_the_plan_and_pg_proc(
    broker_with_replica: Callable[..., InProcessBroker],
    client: Callable[..., BrokerClient],
    admin: pg8000.native.Connection,
    replica_admin: pg8000.native.Connection,
    table: str,
) -> None:
    name = table
    admin.run(f"CREATE TABLE {name} (id int); INSERT INTO {name} VALUES (1)")
    admin.run(f"CREATE SEQUENCE {name}_s")
    admin.run(f"CREATE FUNCTION {name}_v() RETURNS int VOLATILE LANGUAGE sql AS 'SELECT 1'")
    admin.run(f"CREATE FUNCTION {name}_st() RETURNS int STABLE LANGUAGE sql AS 'SELECT 1'")
    try:
        wait_replayed(admin, replica_admin)
        broker = broker_with_replica(routing="auto")
        db = client(broker)
        assert on_replica(db.query(f"SELECT {IN_STANDBY}"))
        assert on_replica(db.query(f"SELECT {IN_STANDBY}, {name}_st(), now()"))
        # pg_is_in_recovery() itself is volatile in pg_proc: the primary.
        assert not on_replica(db.query(ON_REPLICA))
        # nextval() and a volatile user function: the primary.
        assert not on_replica(db.query(f"SELECT {IN_STANDBY}, nextval('{name}_s')"))
        assert not on_replica(db.query(f"SELECT {IN_STANDBY}, {name}_v()"))
        # A locking clause, a data-modifying CTE: the primary.
        assert not on_replica(db.query(f"SELECT {IN_STANDBY} FROM {name} FOR SHARE"))
        cte = f"WITH d AS (DELETE FROM {name} RETURNING id) SELECT {IN_STANDBY}"
        assert not on_replica(db.query(cte))
        with db.begin() as tx:  # an interactive transaction not begun read_only
            assert not on_replica(tx.query(f"SELECT {IN_STANDBY}"))
    finally:
        admin.run(f"DROP FUNCTION {name}_v(); DROP FUNCTION {name}_st(); DROP SEQUENCE {name}_s")


def test_routing_hook_names_the_target_and_a_bad_answer_means_the_primary(
    broker_with_replica: Callable[..., InProcessBroker], client: Callable[..., BrokerClient]
) -> None:
    broker = broker_with_replica(routing_hook="tests.fixtures.replicas:route_by_comment")
    db = client(broker)
    assert on_replica(db.query("/* replica */ SELECT pg_is_in_recovery()"))
    assert not on_replica(db.query("/* primary */ SELECT pg_is_in_recovery()", read_only=True))
    assert on_replica(db.query(ON_REPLICA, read_only=True))  # None: the built-in rules
    assert not on_replica(db.query("/* bad */ SELECT pg_is_in_recovery()", read_only=True))
    assert not on_replica(db.query("/* boom */ SELECT pg_is_in_recovery()", read_only=True))
    assert broker.stats()["hook_errors"] == 2


def test_a_client_reads_its_own_write_while_the_replica_lags(
    broker_with_replica: Callable[..., InProcessBroker],
    client: Callable[..., BrokerClient],
    admin: pg8000.native.Connection,
    replica_admin: pg8000.native.Connection,
    table: str,
) -> None:
    admin.run(f"CREATE TABLE {table} (id int)")
    wait_replayed(admin, replica_admin)
    broker = broker_with_replica()
    writer = client(broker)
    # Another spelling of the same broker: a process that has seen no write (a new Lambda).
    fresh = client(broker, f"ipv4:127.0.0.1:{broker.port}")
    count = f"SELECT count(*), pg_is_in_recovery() FROM {table}"
    assert fresh.query(count, read_only=True).rows[0] == (0, True)

    replica_admin.run("SELECT pg_wal_replay_pause()")
    writer.query(f"INSERT INTO {table} VALUES (1)")
    assert writer.query(count, read_only=True).rows[0] == (1, False)  # the primary
    assert fresh.query(count, read_only=True).rows[0] == (0, True)  # the (paused) replica
    with writer.begin() as tx:  # a write through an interactive transaction
        tx.query(f"INSERT INTO {table} VALUES (2)")
    with writer.stream(count, read_only=True) as rows:
        assert list(rows) == [(2, False)]

    async def async_write_then_read() -> tuple[Any, ...]:
        async with AsyncBrokerClient(broker.target, timeout=20) as db:
            await db.query(f"INSERT INTO {table} VALUES (3)")
            return (await db.query(count, read_only=True)).rows[0]

    assert asyncio.run(async_write_then_read()) == (3, False)

    replica_admin.run("SELECT pg_wal_replay_resume()")
    # Replayed: the writer's reads are back on the replica, and see every write.
    wait_until(lambda: writer.query(count, read_only=True).rows[0] == (3, True), 10)
    assert fresh.query(count, read_only=True).rows[0] == (3, True)


def test_with_fallback_wait_a_read_waits_for_the_replica_then_takes_the_primary(
    broker_with_replica: Callable[..., InProcessBroker],
    client: Callable[..., BrokerClient],
    admin: pg8000.native.Connection,
    replica_admin: pg8000.native.Connection,
    table: str,
) -> None:
    admin.run(f"CREATE TABLE {table} (id int)")
    wait_replayed(admin, replica_admin)
    broker = broker_with_replica(replica_fallback="wait", replica_wait=3)
    db = client(broker)
    count = f"SELECT count(*), pg_is_in_recovery() FROM {table}"
    replica_admin.run("SELECT pg_wal_replay_pause()")
    db.query(f"INSERT INTO {table} VALUES (1)")
    assert db.query(count, read_only=True).rows[0] == (1, False)  # waited, then the primary
    assert broker.stats()["replica_fallbacks"] == 1
    # Resumed during the wait: the read runs on the replica once it has replayed the write.
    db.query(f"INSERT INTO {table} VALUES (2)")
    threading.Timer(0.05, replica_admin.run, ["SELECT pg_wal_replay_resume()"]).start()
    assert db.query(count, read_only=True).rows[0] == (2, True)
    assert broker.stats()["replica_fallbacks"] == 1


def test_a_replica_stopped_under_load_fails_no_read_and_is_used_again(
    broker_with_replica: Callable[..., InProcessBroker],
    client: Callable[..., BrokerClient],
    replica: LocalReplica,
    replica_admin: pg8000.native.Connection,
) -> None:
    broker = broker_with_replica(pool_size=3, replica_pool_size=3)
    db = client(broker)
    reads = calling_in_a_loop(lambda: on_replica(db.query(ON_REPLICA, read_only=True)))
    with reads as (served, failures):
        wait_until(lambda: served.get(True, 0) >= 50, 10, what="reads on the replica")
        replica.shutdown()  # fast: its backends are terminated mid-read
        wait_until(lambda: broker.stats()["target.replica1.in_rotation"] == 0, 10)
        on_primary = served.get(False, 0)
        wait_until(lambda: served.get(False, 0) >= on_primary + 50, 10, what="reads on the primary")
        replica.start()
        before = served[True]
        wait_until(lambda: served[True] >= before + 50, 20, what="the replica to serve again")
    assert failures == []
    assert broker.stats()["target.replica1.in_rotation"] == 1


def test_without_replicas_nothing_changes(
    start_inproc_broker: Callable[..., InProcessBroker],
    client: Callable[..., BrokerClient],
    admin: pg8000.native.Connection,
    table: str,
) -> None:
    broker = start_inproc_broker()
    db = client(broker)
    admin.run(f"CREATE TABLE {table} (id int)")
    write = pb.ExecuteRequest(statements=[pb.Statement(sql=f"INSERT INTO {table} VALUES (1)")])
    assert broker.execute(write).commit_lsn == 0  # no position read without replicas
    assert not on_replica(db.query(ON_REPLICA, read_only=True))
    stats = broker.stats()
    assert sorted(k for k in stats if k.startswith("target.")) == sorted(
        f"target.primary.{key}"
        for key in (
            "pool_size",
            "pool_active",
            "pool_max",
            "pool_available",
            "requests_waiting",
            "requests_num",
            "routed_num",
        )
    )
    assert "replica_fallbacks" not in stats


# -- the parts, without servers ---------------------------------------------------------------


def test_positions_parse_format_and_skip_a_page_header() -> None:
    assert parse_lsn("16/B374D848") == (0x16 << 32) | 0xB374D848
    assert format_lsn(parse_lsn("16/B374D848")) == "16/B374D848"
    assert parse_lsn(None) == 0
    page = 5 * 8192
    assert commit_position(page + 24) == page  # just past a short page header
    assert commit_position(page + 48) == page + 48
    segment = 16 * 1024 * 1024
    assert commit_position(segment + 40) == segment  # just past a segment's long header
    assert commit_position(page + 40) == page + 40  # mid-segment: a record may end there


def test_lag_is_the_age_of_the_first_primary_position_past_the_replay() -> None:
    history = _History()
    assert history.lag(100, 10.0) is None
    history.add(1.0, 100)
    history.add(2.0, 200)
    history.add(3.0, 300)
    history.add(4.0, 300)  # idle primary: unchanged position, no new sample
    assert history.lag(300, 50.0) == 0.0  # caught up: no lag however idle
    assert history.lag(250, 5.0) == pytest.approx(2.0)  # the primary passed 250 at t=3
    assert history.lag(50, 5.0) == pytest.approx(4.0)


class _FakePool:
    def __init__(self, busy: int) -> None:
        self.busy = busy

    def get_stats(self) -> dict[str, int]:
        return {"pool_active": self.busy, "requests_waiting": 0}


def test_pick_takes_a_replica_in_rotation_that_has_replayed_the_position() -> None:
    primary = Target("primary", _FakePool(0))  # type: ignore[arg-type]
    one = Target("replica1", _FakePool(2), replica=True, replay_lsn=100)  # type: ignore[arg-type]
    two = Target("replica2", _FakePool(1), replica=True, replay_lsn=50)  # type: ignore[arg-type]
    targets = TargetSet(primary, [one, two])
    assert targets.pick(0) is two  # the less busy
    assert targets.pick(80) is one  # only one has replayed 80
    assert targets.pick(150) is None
    two.in_rotation = False
    assert targets.pick(0) is one
    router = Router(targets)
    routing = asyncio.run(
        router.choose(read_only=True, plan=None, sqls=["SELECT 1"], caller=None, after_lsn=150)
    )
    assert routing.target is primary and not routing.report_position
    assert router.stats["replica_fallbacks"] == 1
    write = asyncio.run(router.choose(read_only=False, plan=None, sqls=["x"], caller=None))
    assert write.target is primary and write.report_position
