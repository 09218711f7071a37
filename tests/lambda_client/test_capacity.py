"""Retries against a real broker: a full queue is retried until capacity frees; a rolled-back
transaction is resent only when asked; calls spread over (and survive) several replicas."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import pg8000.native
import pytest

from devtools.brokerproc import BrokerProcess
from lambda_client import BrokerClient, SerializationFailure
from tests.support import port_free_on, wait_until

RAISE_40001 = "DO $$ BEGIN RAISE EXCEPTION 'conflict' USING ERRCODE = '40001'; END $$"


def in_background(fn: Callable[[], Any]) -> tuple[threading.Thread, list[Any]]:
    """Run *fn* on a thread; its result (or exception) lands in the returned list."""
    out: list[Any] = []

    def run() -> None:
        try:
            out.append(fn())
        except Exception as exc:  # reported by the test's assertions
            out.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    return thread, out


LOCK_KEY = 4345


def test_full_queue_is_retried_and_succeeds_when_capacity_frees(
    start_broker_process: Callable[..., BrokerProcess], admin: pg8000.native.Connection
) -> None:
    broker = start_broker_process(pool_size=1, max_waiting=1)
    observer = BrokerClient(broker.target)
    # The holder waits on an advisory lock the test holds: the connection stays busy (and the
    # queue full) until the test releases it, after the retried call met the full queue.
    admin.run("SELECT pg_advisory_lock(:k)", k=LOCK_KEY)
    try:
        holder, held = in_background(
            lambda: BrokerClient(broker.target).query(f"SELECT pg_advisory_xact_lock({LOCK_KEY})")
        )
        wait_until(lambda: observer.stats()["pool_active"] == 1, what="the connection to be busy")
        waiter, waited = in_background(lambda: BrokerClient(broker.target).query("SELECT 'queued'"))
        wait_until(lambda: observer.stats()["requests_waiting"] == 1, what="a waiter in the queue")

        db = BrokerClient(broker.target, max_attempts=200, initial_backoff=0.05, max_backoff=0.2)
        retrier, retried = in_background(lambda: db.query("SELECT 'retried'"))
        wait_until(
            lambda: observer.stats()["rpcs_rejected"] >= 1, what="a call to meet a full queue"
        )
        assert not retried  # still retrying: capacity has not freed yet
        admin.run("SELECT pg_advisory_unlock_all()")
        for thread in (holder, waiter, retrier):
            thread.join(30)
    finally:
        admin.run("SELECT pg_advisory_unlock_all()")
    assert not any(isinstance(r[0], Exception) for r in (held, waited, retried)), (
        held,
        waited,
        retried,
    )
    assert (waited[0].scalar(), retried[0].scalar()) == ("queued", "retried")


def test_serialization_failure_is_not_retried_by_default(broker: BrokerProcess) -> None:
    db = BrokerClient(broker.target, initial_backoff=0.01)
    before = db.stats()["rpcs_num"]
    with pytest.raises(SerializationFailure) as info:
        db.transaction(["SELECT 1", RAISE_40001])
    assert info.value.sqlstate == "40001" and info.value.statement_index == 1
    assert db.stats()["rpcs_num"] == before + 1


def test_serialization_failure_is_resent_with_retry_serialization(broker: BrokerProcess) -> None:
    db = BrokerClient(broker.target, max_attempts=3, initial_backoff=0.01, max_backoff=0.02)
    before = db.stats()["rpcs_num"]
    with pytest.raises(SerializationFailure):
        db.transaction([RAISE_40001], retry_serialization=True)
    assert db.stats()["rpcs_num"] == before + 3


def test_round_robin_spreads_calls_and_survives_a_stopped_replica(
    start_broker_process: Callable[..., BrokerProcess],
) -> None:
    hosts = ["127.0.0.1", "127.0.0.2", "127.0.0.3"]
    port = port_free_on(hosts)
    brokers = [start_broker_process(listen=f"{host}:{port}", pool_size=1) for host in hosts]
    db = BrokerClient("ipv4:" + ",".join(f"{host}:{port}" for host in hosts))

    def served() -> list[int]:
        return [BrokerClient(b.target).stats()["rpcs_num"] for b in brokers]

    # Round robin spreads calls over the subchannels that are READY; on a loaded machine one
    # may connect (and pass its health check) only after the first calls went elsewhere.
    wait_until(
        lambda: db.query("SELECT 1").scalar() == 1 and all(served()),
        timeout=30,
        what="every replica served a call",
    )
    before = served()
    for n in range(30):
        assert db.query("SELECT $1::int", [n]).scalar() == n
    counts = served()
    spread = [after - earlier for after, earlier in zip(counts, before, strict=True)]
    assert all(calls > 0 for calls in spread), spread
    assert sum(spread) == 30

    # Keep calling while one replica shuts down: no call is lost.
    stop = threading.Event()

    def call_until_stopped() -> int:
        calls = 0
        while not stop.is_set():
            assert db.query("SELECT 1").scalar() == 1
            calls += 1
        return calls

    caller, called = in_background(call_until_stopped)
    wait_until(lambda: BrokerClient(brokers[0].target).stats()["rpcs_num"] > counts[0] + 5)
    brokers[1].stop()
    for n in range(30):
        assert db.query("SELECT $1::int", [n]).scalar() == n
    stop.set()
    caller.join(20)
    assert isinstance(called[0], int) and called[0] > 0, called
    survivors = [BrokerClient(brokers[i].target).stats()["rpcs_num"] for i in (0, 2)]
    assert survivors[0] > counts[0] and survivors[1] > counts[2]
