"""The client in a Lambda: deadlines from the context, one channel across warm invocations,
a broker restart, and the request id in the broker's log and in pg_stat_activity."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import pg8000.native
import pytest

from devtools.brokerproc import BrokerProcess
from devtools.lambda_context import FakeLambdaContext
from devtools.localpg import free_port
from lambda_client import BrokerClient, DeadlineExceeded, Unavailable
from lambda_client.client import BROKER_UNREACHABLE, broker_unreachable
from tests.support import wait_until

SLEEP = "SELECT pg_sleep(60)"  # far longer than any wait below: gone means cancelled


def sleeping_backends(admin: pg8000.native.Connection) -> int:
    # wait_event, not just state: a statement being parsed is already 'active' with its text.
    rows = admin.run(
        "SELECT count(*) FROM pg_stat_activity "
        "WHERE state = 'active' AND wait_event = 'PgSleep' AND query = :q",
        q=SLEEP,
    )
    return int(rows[0][0])


def test_deadline_from_context_stops_a_long_query_and_leaves_the_connection_clean(
    start_broker_process: Callable[..., BrokerProcess], admin: pg8000.native.Connection
) -> None:
    broker = start_broker_process(pool_size=1)
    db = BrokerClient(broker.target)  # default deadline_margin 0.5 s
    backend = db.query("SELECT pg_backend_pid()").scalar()
    before = db.stats()
    # A call deadline of 2.5 s: ample for the sleep to reach Postgres even on a loaded machine.
    context = FakeLambdaContext(remaining=3.0)
    started = time.monotonic()
    with pytest.raises(DeadlineExceeded):
        db.query(SLEEP, context=context)
    # The client gave up at its deadline, not when the query would have ended (a bound far
    # from both, so load cannot make it fail).
    assert time.monotonic() - started < 30
    # The sleep reached Postgres on the one pooled connection (nothing expired in the queue)
    # and was cancelled there: it cannot have ended on its own within this wait.
    after = db.stats()
    assert after["requests_num"] == before["requests_num"] + 1
    assert after["requests_expired"] == before["requests_expired"]
    wait_until(lambda: sleeping_backends(admin) == 0, what="pg_sleep to be cancelled")
    # The one pooled connection was kept (same backend), and it is idle, outside any
    # transaction.
    kept = db.query("SELECT pg_backend_pid()").scalar()
    assert kept == backend, [  # why the broker replaced it, if it did
        line for line in broker.log().splitlines() if "closing" in line or "cancel" in line
    ]
    wait_until(
        lambda: (
            admin.run("SELECT state FROM pg_stat_activity WHERE pid = :p", p=backend) == [["idle"]]
        ),
        what="the pooled connection to be idle",
    )
    stats = db.stats()
    assert stats["connections_lost"] == 0
    assert stats["connections_num"] == 1
    assert stats["pool_size"] == 1


def test_a_context_shorter_than_the_margin_sends_nothing(broker: BrokerProcess) -> None:
    db = BrokerClient(broker.target, deadline_margin=0.5)
    before = db.stats()["rpcs_num"]
    with pytest.raises(DeadlineExceeded):
        db.query("SELECT 1", context=FakeLambdaContext(remaining=0.3))
    assert db.stats()["rpcs_num"] == before


def test_channel_is_created_once_across_warm_invocations(broker: BrokerProcess) -> None:
    db = BrokerClient(broker.target)
    assert db.channels_created == 0
    for n in range(50):
        assert db.query("SELECT $1::int", [n], context=FakeLambdaContext()).scalar() == n
    assert db.channels_created == 1


@pytest.mark.parametrize("how", ["sigterm", "sigkill"])
def test_call_after_the_broker_restarted_on_the_same_address_succeeds(
    start_broker_process: Callable[..., BrokerProcess], how: str
) -> None:
    broker = start_broker_process()
    db = BrokerClient(broker.target, timeout=20)
    assert db.query("SELECT 1").scalar() == 1
    broker.stop() if how == "sigterm" else broker.kill()
    broker.start()  # same port
    assert db.query("SELECT 2", context=FakeLambdaContext(remaining=20)).scalar() == 2
    assert db.channels_created == 1


LOCK_KEY = 4346
HELD = f"SELECT pg_advisory_xact_lock({LOCK_KEY})"


def test_request_id_shows_in_broker_log_and_pg_stat_activity(
    broker: BrokerProcess, admin: pg8000.native.Connection
) -> None:
    db = BrokerClient(broker.target)
    context = FakeLambdaContext(remaining=10, function_name="orders-api")
    outcome: list[Any] = []
    # The query waits on an advisory lock the test holds, so it is still running when
    # pg_stat_activity is read; released once its application_name was seen. Waiting on the
    # lock, not just 'active': while the statement is parsed (before the SET that names it)
    # the row is already active with this text and the pool's own application_name.
    admin.run("SELECT pg_advisory_lock(:k)", k=LOCK_KEY)
    worker = threading.Thread(target=lambda: outcome.append(db.query(HELD, context=context)))
    worker.start()
    try:
        names = wait_until(
            lambda: [
                row[0]
                for row in admin.run(
                    "SELECT application_name FROM pg_stat_activity "
                    "WHERE query = :q AND state = 'active' AND wait_event_type = 'Lock'",
                    q=HELD,
                )
            ],
            what="the query in pg_stat_activity",
        )
    finally:
        admin.run("SELECT pg_advisory_unlock_all()")
        worker.join(10)
    assert outcome, "the query failed"
    assert context.aws_request_id in names[0]
    assert "orders-api" in names[0]
    wait_until(lambda: context.aws_request_id in broker.log(), what="the request id in the log")


def test_client_timeout_caps_a_long_lambda_context(broker: BrokerProcess) -> None:
    db = BrokerClient(broker.target, timeout=0.5)
    with pytest.raises(DeadlineExceeded):
        db.query("SELECT pg_sleep(5)", context=FakeLambdaContext(remaining=900))


@pytest.mark.parametrize("host", ["127.0.0.1", "nonexistent.invalid"])
def test_unreachable_broker_ends_at_the_deadline_saying_nothing_was_sent(host: str) -> None:
    target = f"{host}:{free_port()}"
    db = BrokerClient(target, timeout=0.5)
    started = time.monotonic()
    with pytest.raises(Unavailable) as info:
        db.query("SELECT 1", context=FakeLambdaContext(remaining=900))
    assert time.monotonic() - started < 5  # the timeout caps a 15-minute context
    # Not DeadlineExceeded, which says the transaction may have run: the request never left.
    assert not isinstance(info.value, DeadlineExceeded)
    assert info.value.reason == BROKER_UNREACHABLE
    assert f"broker at {target!r} not reachable" in str(info.value)
    assert "nothing was sent" in str(info.value)


def test_unreachable_names_the_default_port_when_the_target_has_none() -> None:
    assert "no port, so gRPC uses 443" in str(broker_unreachable("broker.internal", 1.0))
    assert "443" not in str(broker_unreachable("broker.internal:50051", 1.0))
