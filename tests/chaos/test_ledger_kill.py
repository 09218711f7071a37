"""A ledger under broker SIGKILL plus restart: exactly-once with keys, OutcomeUnknown without.

Writers move money between accounts, each transfer one `transaction` with its own transfer
id, through a real broker child process on a real Postgres, while the broker is SIGKILLed
and restarted on the same port. The transfers table has no unique constraint on the id, so
a transfer applied twice shows as two rows.

* with keys (the client's default): every transfer is acknowledged, none lost, none
  applied twice, none left unknown, and the balances add up;
* without keys: an acknowledged transfer is never lost, the in-flight ones fail as
  `OutcomeUnknown` (never `Unavailable`, which says nothing ran), and the test counts them.

Bounded: ``PGBROKER_CHAOS_TRANSFERS`` transfers (200) and ``PGBROKER_CHAOS_KILLS`` kills (2);
``make chaos`` runs more. Each run prints one ``chaos-ledger`` JSON line with its figures.
"""

from __future__ import annotations

import json
import os
import queue
import threading
import time
import uuid
from collections import Counter
from typing import Any

import pytest

import lambda_client as lc
from devtools.brokerproc import BrokerProcess

pytestmark = pytest.mark.slow

TRANSFERS = int(os.environ.get("PGBROKER_CHAOS_TRANSFERS", "200"))
KILLS = int(os.environ.get("PGBROKER_CHAOS_KILLS", "2"))
WRITERS = 8
ACCOUNTS = 10
START_BALANCE = 1_000_000


@pytest.fixture
def ledger(admin: Any) -> Any:
    name = f"ledger_{uuid.uuid4().hex[:8]}"
    admin.run(f"CREATE TABLE {name}_accounts (id int PRIMARY KEY, balance bigint NOT NULL)")
    admin.run(
        f"INSERT INTO {name}_accounts"
        f" SELECT g, {START_BALANCE} FROM generate_series(1, {ACCOUNTS}) g"
    )
    admin.run(f"CREATE TABLE {name}_transfers (id text NOT NULL, src int, dst int, amount int)")
    yield name
    admin.run(f"DROP TABLE {name}_accounts, {name}_transfers")


def _transfer(name: str, tid: str, n: int) -> list[Any]:
    src, dst, amount = n % ACCOUNTS + 1, (n * 7 + 3) % ACCOUNTS + 1, n % 97 + 1
    # The lower account id first, so two transfers never wait on each other's rows in
    # opposite orders (a deadlock would be the application's error, not the broker's).
    first, second = sorted([(src, -amount), (dst, amount)])
    update = f"UPDATE {name}_accounts SET balance = balance + $1 WHERE id = $2"
    return [
        (f"INSERT INTO {name}_transfers VALUES ($1, $2, $3, $4)", [tid, src, dst, amount]),
        (update, [first[1], first[0]]),
        (update, [second[1], second[0]]),
        # A little work inside the transaction, so kills land mid-transaction too.
        ("SELECT pg_sleep(0.005)", []),
    ]


def _run(broker: BrokerProcess, name: str, keys: bool) -> dict[str, Any]:
    """Run the transfers with *KILLS* kills spread over them; return what each one got."""
    db = lc.BrokerClient(
        broker.target,
        timeout=30,
        max_attempts=20,
        initial_backoff=0.05,
        max_backoff=0.5,
        idempotency=keys,
        auth=lambda: (),
    )
    work: queue.Queue[int] = queue.Queue()
    for n in range(TRANSFERS):
        work.put(n)
    outcomes: dict[str, str] = {}
    lock = threading.Lock()
    done = [0]

    def writer() -> None:
        while True:
            try:
                n = work.get_nowait()
            except queue.Empty:
                return
            tid = f"t{n}"
            try:
                db.transaction(_transfer(name, tid, n))
                outcome = "ok"
            except lc.Error as exc:
                outcome = type(exc).__name__
            with lock:
                outcomes[tid] = outcome
                done[0] += 1

    threads = [threading.Thread(target=writer, daemon=True) for _ in range(WRITERS)]
    for thread in threads:
        thread.start()
    kills = 0
    for k in range(1, KILLS + 1):
        target = TRANSFERS * k // (KILLS + 1)
        while done[0] < target and any(t.is_alive() for t in threads):
            time.sleep(0.005)
        if not any(t.is_alive() for t in threads):
            break
        broker.kill()
        kills += 1
        broker.start()
    for thread in threads:
        thread.join(120)
    db.close()
    return {"outcomes": outcomes, "kills": kills}


def _audit(admin: Any, name: str, outcomes: dict[str, str]) -> dict[str, int]:
    applied = Counter(row[0] for row in admin.run(f"SELECT id FROM {name}_transfers"))
    total = admin.run(f"SELECT sum(balance) FROM {name}_accounts")[0][0]
    assert total == ACCOUNTS * START_BALANCE  # each transfer's two updates went together
    acked = {tid for tid, outcome in outcomes.items() if outcome == "ok"}
    unknown = {tid for tid, outcome in outcomes.items() if outcome == "OutcomeUnknown"}
    return {
        "transfers": len(outcomes),
        "acknowledged": len(acked),
        "lost": sum(1 for tid in acked if applied[tid] == 0),
        "duplicated": sum(1 for count in applied.values() if count > 1),
        "unknown": len(unknown),
        "unknown_committed": sum(1 for tid in unknown if applied[tid] == 1),
        "unavailable": sum(1 for o in outcomes.values() if o == "Unavailable"),
        "other_errors": sum(1 for o in outcomes.values() if o not in ("ok", "OutcomeUnknown")),
    }


def _report(mode: str, figures: dict[str, int], kills: int, outcomes: dict[str, str]) -> None:
    errors = Counter(o for o in outcomes.values() if o != "ok")
    line = {"chaos-ledger": mode, "kills": kills, **figures, "errors": dict(errors)}
    print(json.dumps(line))


def test_with_keys_no_transfer_is_lost_duplicated_or_unknown(
    start_broker_process: Any, admin: Any, ledger: str
) -> None:
    # One process: SIGKILL must hit the process serving the calls (a supervisor's workers
    # would get SIGTERM and drain, which is no crash).
    broker = start_broker_process(pool_size=4, workers=1)
    run = _run(broker, ledger, keys=True)
    figures = _audit(admin, ledger, run["outcomes"])
    _report("keys", figures, run["kills"], run["outcomes"])
    assert run["kills"] == KILLS
    assert figures["transfers"] == TRANSFERS
    assert (figures["lost"], figures["duplicated"], figures["unknown"]) == (0, 0, 0)
    assert figures["acknowledged"] == TRANSFERS, Counter(run["outcomes"].values())


def test_without_keys_in_flight_transfers_are_outcome_unknown_never_unavailable(
    start_broker_process: Any, admin: Any, ledger: str
) -> None:
    broker = start_broker_process(pool_size=4, workers=1)  # one process, as above
    run = _run(broker, ledger, keys=False)
    figures = _audit(admin, ledger, run["outcomes"])
    _report("no-keys", figures, run["kills"], run["outcomes"])
    assert run["kills"] == KILLS
    assert (figures["lost"], figures["duplicated"]) == (0, 0)
    assert figures["unavailable"] == 0, Counter(run["outcomes"].values())
    assert figures["other_errors"] == 0, Counter(run["outcomes"].values())
    assert figures["unknown"] >= 1  # a kill mid-load leaves some in flight
