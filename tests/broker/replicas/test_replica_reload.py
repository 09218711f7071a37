"""RELOAD of the replica settings (issue 16): replicas join and leave a running broker, against
the session's real Postgres and a real streaming replica of it.

Where a read ran is read from the server itself (``pg_is_in_recovery()``); the replica's
``pg_stat_activity`` shows whether the broker still holds connections there.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pg8000.native
import pytest

from devtools.localpg import LocalReplica
from lambda_client import BrokerClient
from lambda_client._proto.pgbroker.v1 import broker_pb2 as pb
from lambda_client._proto.pgbroker.v1 import broker_pb2_grpc as pb_grpc
from tests.fixtures.brokers import InProcessBroker
from tests.support import calling_in_a_loop, wait_until

ADMIN = "ops:admin-token-0123456789"
ADMIN_MD = (("authorization", "Bearer admin-token-0123456789"),)
ON_REPLICA = "SELECT pg_is_in_recovery()"
BROKER_BACKENDS = "SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE 'pgbroker%'"


def replica_url(replica: LocalReplica, name: str = "pgbroker") -> str:
    """*replica*'s URL; another *name* makes another URL for the same server."""
    return f"{replica.dsn}?sslmode=disable&application_name={name}"


def on_replica(db: BrokerClient) -> bool:
    return bool(db.query(ON_REPLICA, read_only=True).rows[0][0])


def replica_keys(broker: InProcessBroker) -> set[str]:
    return {key.split(".")[1] for key in broker.stats() if key.startswith("target.replica")}


def backends(conn: pg8000.native.Connection) -> int:
    return int(conn.run(BROKER_BACKENDS)[0][0])


@pytest.fixture
def reload(
    start_inproc_broker: Callable[..., InProcessBroker],
) -> Iterator[Callable[..., Any]]:
    """Factory: ``reload(broker, **overrides)``, the Admin ``Reload`` RPC."""
    channels: list[grpc.Channel] = []

    def call(broker: InProcessBroker, **overrides: Any) -> pb.AdminReply:
        channel = grpc.insecure_channel(broker.target)
        channels.append(channel)
        request = pb.ReloadRequest(overrides={k: str(v) for k, v in overrides.items()})
        return pb_grpc.AdminStub(channel).Reload(request, timeout=15, metadata=ADMIN_MD)

    yield call
    for channel in channels:
        channel.close()


@pytest.fixture
def client() -> Iterator[Callable[[InProcessBroker], BrokerClient]]:
    made: list[BrokerClient] = []

    def make(broker: InProcessBroker) -> BrokerClient:
        made.append(BrokerClient(broker.target, timeout=20))
        return made[-1]

    yield make
    for each in made:
        each.close()


def start(start_inproc_broker: Callable[..., InProcessBroker], **flags: Any) -> InProcessBroker:
    return start_inproc_broker(
        admin_tokens=ADMIN, replica_check_interval=0.2, queue_timeout=5, **flags
    )


def test_reload_adds_a_replica_then_removes_it_under_load_without_a_failed_read(
    start_inproc_broker: Callable[..., InProcessBroker],
    client: Callable[[InProcessBroker], BrokerClient],
    reload: Callable[..., pb.AdminReply],
    replica: LocalReplica,
    replica_admin: pg8000.native.Connection,
) -> None:
    broker = start(start_inproc_broker, pool_size=3, replica_pool_size=2)
    db = client(broker)
    assert not on_replica(db) and replica_keys(broker) == set()

    # Added: its pool and the monitor connect, and read_only reads land there once healthy.
    reply = reload(broker, replica_urls=replica_url(replica))
    assert list(reply.changed) == ["replica_urls: changed"]
    wait_until(lambda: broker.stats().get("target.replica1.in_rotation") == 1, 10)
    assert on_replica(db)
    stats = broker.stats()
    assert stats["target.replica1.pool_max"] == 2 and stats["target.replica1.routed_num"] >= 1
    wait_until(lambda: backends(replica_admin) == 3, 10, what="2 pooled + 1 monitor connection")

    # A second URL (the same server under another name) is replica2; then the first URL goes:
    # names follow positions, so replica1 is now a new pool for that URL and replica2 is gone.
    reload(broker, replica_urls=f"{replica_url(replica)},{replica_url(replica, 'pgbroker-b')}")
    wait_until(lambda: broker.stats().get("target.replica2.in_rotation") == 1, 10)
    first = broker.server.targets.get("replica1")
    reload(broker, replica_urls=replica_url(replica, "pgbroker-b"))
    assert replica_keys(broker) == {"replica1"}
    assert broker.server.targets.get("replica1") is not first
    wait_until(lambda: broker.stats()["target.replica1.in_rotation"] == 1, 10)
    assert on_replica(db)

    # Removed while 4 readers keep reading: none fails, and reads go to the primary.
    with calling_in_a_loop(lambda: on_replica(db)) as (served, failures):
        wait_until(lambda: served.get(True, 0) >= 50, 10, what="reads on the replica")
        # A read-only transaction open on the replica finishes there after the removal.
        with db.begin(read_only=True) as tx:
            assert tx.query(ON_REPLICA).rows[0][0]
            reply = reload(broker, replica_urls="")
            assert list(reply.changed) == ["replica_urls: changed"]
            on_primary = served.get(False, 0)
            wait_until(
                lambda: served.get(False, 0) >= on_primary + 50, 10, what="reads on the primary"
            )
            assert tx.query(ON_REPLICA).rows[0][0]
            assert backends(replica_admin) >= 1  # the transaction's connection
    assert failures == []
    assert not on_replica(db) and replica_keys(broker) == set()
    # Its pool closed once the reads running on it finished; the monitor closed too.
    wait_until(lambda: backends(replica_admin) == 0, 10, what="the replica's connections to close")


def test_a_bad_replica_reload_is_refused_and_the_old_list_kept(
    start_inproc_broker: Callable[..., InProcessBroker],
    client: Callable[[InProcessBroker], BrokerClient],
    reload: Callable[..., pb.AdminReply],
    replica: LocalReplica,
    replica_admin: pg8000.native.Connection,
) -> None:
    broker = start(start_inproc_broker, replica_urls=replica_url(replica), replica_pool_size=2)
    wait_until(lambda: broker.stats()["target.replica1.in_rotation"] == 1, 10)
    db = client(broker)
    target = broker.server.targets.get("replica1")
    wait_until(lambda: backends(replica_admin) == 3, 10, what="2 pooled + 1 monitor connection")
    two = f"{replica_url(replica)},{replica_url(replica, 'pgbroker-b')}"
    refusals: list[tuple[dict[str, str], list[str]]] = [
        # A malformed URL, named by its position (never by its text: it may hold a password).
        ({"replica_urls": f"{two},mysql://x@h/db", "replica_wait": "9"}, ["replica URL 3"]),
        # A larger replica pool that does not fit the server's budget (max_connections 100):
        # the kept replica's, and that of a new one, whose first connection read it.
        (
            {"replica_urls": two, "replica_pool_size": "97"},
            [
                "replica1 (PGBROKER_REPLICA_POOL_SIZE): connection budget exceeded",
                "replica2 (PGBROKER_REPLICA_URLS): connection budget exceeded",
            ],
        ),
        ({"routing_hook": "no_such_module:route"}, ["cannot import 'no_such_module'"]),
        ({"routing": "sometimes"}, ["routing"]),
    ]
    for overrides, whys in refusals:
        with pytest.raises(grpc.RpcError) as refused:
            reload(broker, **overrides)
        assert refused.value.code() is grpc.StatusCode.INVALID_ARGUMENT, overrides
        details = refused.value.details() or ""
        assert "nothing changed" in details
        for why in whys:
            assert why in details, details
    # Every setting kept: the same replica1, its pool; the refused new pool was closed.
    assert broker.server.targets.replicas == (target,)
    assert broker.server.replicas.settings.replica_wait == 1.0
    assert broker.stats()["target.replica1.pool_max"] == 2
    assert replica_keys(broker) == {"replica1"}
    assert on_replica(db)
    wait_until(lambda: backends(replica_admin) == 3, 10, what="the refused pool to close")


def test_reload_changes_the_routing_and_the_replica_pool_live(
    start_inproc_broker: Callable[..., InProcessBroker],
    client: Callable[[InProcessBroker], BrokerClient],
    reload: Callable[..., pb.AdminReply],
    replica: LocalReplica,
    replica_admin: pg8000.native.Connection,
) -> None:
    broker = start(start_inproc_broker, replica_urls=replica_url(replica), replica_pool_size=1)
    wait_until(lambda: broker.stats()["target.replica1.in_rotation"] == 1, 10)
    db = client(broker)
    plain = "SELECT current_setting('in_hot_standby') = 'on'"
    assert not db.query(plain).rows[0][0]  # explicit routing: not marked read_only
    reply = reload(
        broker,
        routing="auto",
        replica_pool_size=3,
        queue_timeout=7,
        replica_check_interval=0.5,
        routing_hook="tests.fixtures.replicas:route_by_comment",
    )
    assert "routing: 'explicit' -> 'auto'" in reply.changed
    # The read above ran on the primary and calls a function, so the client holds its WAL
    # position (read-your-writes): the replica takes its reads once the monitor has seen it
    # replay that far. Two checks after the reload, it has.
    monitor = broker.server.replicas.monitor
    assert monitor is not None and monitor.interval == 0.5
    checks = monitor.checks
    wait_until(lambda: monitor.checks >= checks + 2, 5, what="the monitor to check again")
    assert db.query(plain).rows[0][0]  # auto: the plan proves it read-only
    assert db.query(f"/* primary */ {plain}").rows[0][0] is False  # the new hook
    wait_until(lambda: broker.stats()["target.replica1.pool_size"] == 3, 10)
    pool = broker.server.targets.get("replica1").pool  # type: ignore[union-attr]
    assert pool.queue_timeout == 7
    checks = monitor.checks
    wait_until(lambda: monitor.checks >= checks + 2, 5, what="the monitor to check again")
    assert broker.stats()["target.replica1.in_rotation"] == 1
