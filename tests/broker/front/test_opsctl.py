"""The operator's controls (issue 16): PAUSE/RESUME, RELOAD (RPC, SIGHUP, the config file),
the admin identity, and ``top``. A real Postgres; real brokers, in a child process where
signals or the CLI matter."""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import pytest

from broker.config import ConfigError, load_settings
from devtools.brokerproc import BrokerProcess
from lambda_client._proto.pgbroker.v1 import broker_pb2 as pb
from lambda_client._proto.pgbroker.v1 import broker_pb2_grpc as pb_grpc
from tests.support import wait_until

ADMIN = "ops:admin-token-0123456789"
APP = "app:app-token-0123456789abc"
ADMIN_MD = (("authorization", "Bearer admin-token-0123456789"),)
APP_MD = (("authorization", "Bearer app-token-0123456789abc"),)
ROOT = Path(__file__).resolve().parents[3]


def _insert(table: str, tag: str, sleep: float = 0.0) -> pb.ExecuteRequest:
    sql = [pb.Statement(sql=f"INSERT INTO {table} (name) VALUES ($1)", params=[pb.Value(text=tag)])]
    if sleep:
        sql.insert(0, pb.Statement(sql=f"SELECT pg_sleep({sleep})"))
    return pb.ExecuteRequest(statements=sql)


def _rows(admin: Any, table: str) -> int:
    return int(admin.run(f"SELECT count(*) FROM {table}")[0][0])


def _admin(broker: Any) -> Any:
    channel = grpc.insecure_channel(broker.target)
    broker._channels.append(channel)
    return pb_grpc.AdminStub(channel)


class _Transaction:
    """A Transact stream fed step by step from the test."""

    def __init__(self, stub: Any) -> None:
        self.requests: queue.Queue[pb.TransactRequest | None] = queue.Queue()
        self.responses = stub.Transact(iter(self.requests.get, None), timeout=30)

    def step(self, request: pb.TransactRequest) -> pb.TransactResponse:
        self.requests.put(request)
        return next(self.responses)


# -- PAUSE / RESUME ------------------------------------------------------------------------------


def test_pause_queues_new_work_while_running_work_and_leases_finish(
    start_inproc_broker: Any, admin: Any, table: str
) -> None:
    admin.run(f"CREATE TABLE {table} (id serial PRIMARY KEY, name text)")
    broker = start_inproc_broker(pool_size=3, queue_timeout=30, admin_tokens=ADMIN)
    stub, control = broker.stub(), _admin(broker)
    # An open lease (Transact) and a running batch, both begun before the pause.
    lease = _Transaction(stub)
    assert lease.step(pb.TransactRequest(begin=pb.TransactionOptions())).HasField("begun")
    with ThreadPoolExecutor(8) as threads:
        running = threads.submit(stub.Execute, _insert(table, "running", sleep=0.6), timeout=30)
        wait_until(lambda: broker.stats()["pool_active"] == 2, what="the batch to start")
        reply = control.Pause(pb.PauseRequest(), timeout=5, metadata=ADMIN_MD)
        assert reply.paused and reply.stats["pool_paused"] == 1
        # New work of every kind queues, though a connection is idle.
        queued: list[Future[Any]] = [
            threads.submit(stub.Execute, _insert(table, f"queued{i}"), timeout=30) for i in range(3)
        ]
        begun_later = _Transaction(stub)
        queued.append(
            threads.submit(begun_later.step, pb.TransactRequest(begin=pb.TransactionOptions()))
        )
        wait_until(lambda: broker.stats()["requests_waiting"] == 4, what="4 queued requests")
        # Running work finishes: the batch, and the lease that keeps its connection.
        running.result(timeout=10)
        executed = lease.step(
            pb.TransactRequest(
                execute=pb.TransactRequest.Execute(statements=_insert(table, "lease").statements)
            )
        )
        assert not executed.executed.HasField("error")
        assert lease.step(pb.TransactRequest(commit=pb.TransactRequest.Commit())).ended.committed
        drained = control.Pause(pb.PauseRequest(wait=True), timeout=10, metadata=ADMIN_MD)
        assert drained.message == "paused: nothing runs" and drained.stats["pool_active"] == 0
        # Nothing queued reached Postgres: only the two that ran before the pause wrote.
        time.sleep(0.3)
        assert _rows(admin, table) == 2
        assert not any(f.done() for f in queued)
        assert broker.stats()["requests_waiting"] == 4
        control.Resume(pb.ResumeRequest(), timeout=5, metadata=ADMIN_MD)
        for future in queued:
            future.result(timeout=10)
        assert begun_later.step(
            pb.TransactRequest(rollback=pb.TransactRequest.Rollback())
        ).HasField("ended")
    assert _rows(admin, table) == 5
    assert broker.stats()["pool_paused"] == 0


# -- RELOAD ----------------------------------------------------------------------------------------


def test_reload_changes_the_pool_size_live_and_refuses_a_bad_value(
    start_inproc_broker: Any, tmp_path: Path
) -> None:
    config = tmp_path / "pgbroker.env"
    config.write_text("# live settings\nPGBROKER_POOL_SIZE=2\n")
    broker = start_inproc_broker(pool_size=None, config_file=str(config), admin_tokens=ADMIN)
    control = _admin(broker)
    config.write_text("PGBROKER_POOL_SIZE=4\nPGBROKER_QUEUE_TIMEOUT=7\n")
    reply = control.Reload(pb.ReloadRequest(), timeout=5, metadata=ADMIN_MD)
    assert list(reply.changed) == [
        "replica_pool_size: 2 -> 4",  # derived: PGBROKER_POOL_SIZE unless set
        "pool_size: 2 -> 4",
        "queue_timeout: 30.0 -> 7.0",
        "max_inflight_per_caller: 1001 -> 1002",  # derived: half of pool_size + max_waiting
    ]
    wait_until(lambda: broker.stats()["pool_size"] == 4, what="4 connections")
    assert broker.stats()["pool_max"] == 4 and broker.server.pool.queue_timeout == 7
    # An override wins over the file until the next reload; shrinking closes idle connections.
    reply = control.Reload(
        pb.ReloadRequest(overrides={"pool_size": "1"}), timeout=5, metadata=ADMIN_MD
    )
    assert "pool_size: 4 -> 1" in reply.changed
    wait_until(lambda: broker.stats()["pool_size"] == 1, what="1 connection")
    # A bad value refuses the whole reload: nothing changes, each problem is named.
    config.write_text("PGBROKER_POOL_SIZE=0\nPGBROKER_QUEUE_TIMEOUT=3\n")
    with pytest.raises(grpc.RpcError) as refused:
        control.Reload(pb.ReloadRequest(), timeout=5, metadata=ADMIN_MD)
    assert refused.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "PGBROKER_POOL_SIZE='0'" in (refused.value.details() or "")
    assert "must be at least 1" in (refused.value.details() or "")
    assert broker.stats()["pool_max"] == 1 and broker.server.pool.queue_timeout == 7
    for overrides, why in (
        ({"listen": "127.0.0.1:1"}, "needs a restart"),
        ({"no_such": "1"}, "no such setting"),
    ):
        with pytest.raises(grpc.RpcError) as refused:
            control.Reload(pb.ReloadRequest(overrides=overrides), timeout=5, metadata=ADMIN_MD)
        assert why in (refused.value.details() or "")
    assert broker.stats()["pool_max"] == 1


def test_a_smaller_pool_closes_busy_connections_as_they_come_back(
    start_inproc_broker: Any,
) -> None:
    broker = start_inproc_broker(pool_size=2, admin_tokens=ADMIN)
    stub, control = broker.stub(), _admin(broker)
    leases = [_Transaction(stub), _Transaction(stub)]
    for lease in leases:
        assert lease.step(pb.TransactRequest(begin=pb.TransactionOptions())).HasField("begun")
    control.Reload(pb.ReloadRequest(overrides={"pool_size": "1"}), timeout=5, metadata=ADMIN_MD)
    assert broker.stats()["pool_size"] == 2 and broker.stats()["pool_max"] == 1  # both busy
    for lease, left in zip(leases, (1, 1), strict=True):
        assert lease.step(pb.TransactRequest(rollback=pb.TransactRequest.Rollback())).HasField(
            "ended"
        )
        wait_until(lambda n=left: broker.stats()["pool_size"] == n, what=f"{left} connection")
    # The one left serves: no replacement was opened for the one closed.
    assert broker.execute(pb.ExecuteRequest(statements=[pb.Statement(sql="SELECT 1")]))
    assert broker.stats()["pool_size"] == 1 and broker.stats()["pool_connecting"] == 0


def test_config_file_names_a_bad_line_and_loses_to_the_environment(tmp_path: Path) -> None:
    config = tmp_path / "pgbroker.env"
    url = "postgresql://u@127.0.0.1/db?sslmode=disable"
    config.write_text(f"PGBROKER_DATABASE_URL={url}\nexport PGBROKER_POOL_SIZE='9'\n")
    environ = {"PGBROKER_CONFIG_FILE": str(config), "PGBROKER_MAX_WAITING": "5"}
    assert load_settings(environ=environ).pool_size == 9
    assert load_settings(environ={**environ, "PGBROKER_POOL_SIZE": "3"}).pool_size == 3
    config.write_text("PGBROKER_POOLSIZE=9\n")
    with pytest.raises(ConfigError, match="line 1: PGBROKER_POOLSIZE is not a setting"):
        load_settings(environ=environ)


# -- the admin identity ----------------------------------------------------------------------------


def test_admin_rpc_refuses_without_an_admin_identity_configured(start_inproc_broker: Any) -> None:
    broker = start_inproc_broker()
    with pytest.raises(grpc.RpcError) as refused:
        _admin(broker).Pause(pb.PauseRequest(), timeout=5)
    assert refused.value.code() is grpc.StatusCode.PERMISSION_DENIED
    assert "no admin identity is configured" in (refused.value.details() or "")
    assert broker.stats()["pool_paused"] == 0


def test_admin_rpc_refuses_a_caller_identity(start_inproc_broker: Any) -> None:
    broker = start_inproc_broker(auth="token", tokens=APP, admin_tokens=ADMIN)
    control = _admin(broker)
    for metadata, code, text in (
        (APP_MD, grpc.StatusCode.PERMISSION_DENIED, "token:app is a caller, not an admin"),
        ((("authorization", "Bearer x" * 3),), grpc.StatusCode.UNAUTHENTICATED, "unknown"),
        ((), grpc.StatusCode.UNAUTHENTICATED, "admin"),
    ):
        with pytest.raises(grpc.RpcError) as refused:
            control.Pause(pb.PauseRequest(), timeout=5, metadata=metadata)
        assert refused.value.code() is code, refused.value.details()
        assert text in (refused.value.details() or "")
    assert broker.stats()["pool_paused"] == 0
    # The app's token still serves the Broker service; the admin's serves Admin.
    assert broker.stub().GetStats(pb.GetStatsRequest(), timeout=5, metadata=APP_MD).stats
    assert control.Pause(pb.PauseRequest(), timeout=5, metadata=ADMIN_MD).paused


def test_an_admin_token_that_is_also_a_callers_is_refused_at_start() -> None:
    with pytest.raises(ConfigError, match="a token is also in PGBROKER_TOKENS"):
        load_settings(
            {
                "database_url": "postgresql://u@h/db",
                "auth": "token",
                "tokens": APP,
                "admin_tokens": "ops:" + APP.split(":")[1],
            },
            environ={},
        )


# -- signals and the CLI, on a broker process ------------------------------------------------------


@pytest.fixture
def config_broker(postgres: Any, tmp_path: Path) -> Iterator[tuple[BrokerProcess, Path]]:
    """A broker process whose pool size comes from its config file (2), with an admin token.

    One process (``--workers 1``); the workers' controls have their own tests
    (test_workers_all_reload_and_pause_through_the_supervisor and those after it)."""
    config = tmp_path / "pgbroker.env"
    config.write_text("PGBROKER_POOL_SIZE=2\n")
    env = {"PGBROKER_CONFIG_FILE": str(config), "PGBROKER_ADMIN_TOKENS": ADMIN}
    process = BrokerProcess(
        postgres.dsn + "?sslmode=disable", env=env, auth="none", shutdown_grace=2, workers=1
    )
    with process:  # started by the with
        assert process.wait_serving()
        yield process, config


def _cli(
    process: BrokerProcess, *args: str, admin: bool = True
) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PGBROKER_")}
    if admin:
        env["PGBROKER_ADMIN_TOKEN"] = ADMIN.split(":")[1]
    return subprocess.run(
        [sys.executable, "-m", "broker", args[0], "--target", process.target, *args[1:]],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=60,
    )


def _stats(process: BrokerProcess) -> dict[str, int]:
    done = _cli(process, "stats", "--json", admin=False)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_sighup_reloads_logs_and_does_not_exit(config_broker: tuple[BrokerProcess, Path]) -> None:
    process, config = config_broker
    config.write_text("PGBROKER_POOL_SIZE=3\n")
    os.kill(process.pid or 0, signal.SIGHUP)
    wait_until(lambda: _stats(process)["pool_size"] == 3, what="the reloaded pool size")
    assert "reloading the configuration (SIGHUP)" in process.log()
    assert "reload: pool_size: 2 -> 3" in process.log()
    config.write_text("PGBROKER_POOL_SIZE=many\n")
    os.kill(process.pid or 0, signal.SIGHUP)
    wait_until(lambda: "reload refused" in process.log(), what="the refusal in the log")
    assert process.proc is not None and process.proc.poll() is None
    assert _stats(process)["pool_max"] == 3


def test_cli_pause_resume_reload_and_top(config_broker: tuple[BrokerProcess, Path]) -> None:
    process, _ = config_broker
    done = _cli(process, "reload", "pool_size=3")
    assert done.returncode == 0 and "pool_size: 2 -> 3" in done.stdout, done.stderr
    done = _cli(process, "reload", "pool_size=0")
    assert done.returncode == 1 and "INVALID_ARGUMENT" in done.stderr
    assert "at least 1" in done.stderr
    done = _cli(process, "pause", "--wait")
    assert done.returncode == 0 and "paused: nothing runs" in done.stdout, done.stderr
    done = _cli(process, "top", "--once")
    assert done.returncode == 0, done.stderr
    for text in ("PAUSED", "pools", "primary", "busiest callers", "open leases"):
        assert text in done.stdout
    assert _cli(process, "resume").returncode == 0
    assert _stats(process)["pool_paused"] == 0 and _stats(process)["pool_max"] == 3
    # The live view redraws until Ctrl-C, then exits 0.
    env = {**os.environ, "PGBROKER_ADMIN_TOKEN": ADMIN.split(":")[1]}
    live = subprocess.Popen(
        [sys.executable, "-m", "broker", "top", "--target", process.target, "--interval", "0.2"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=ROOT,
    )
    try:
        time.sleep(1.5)
        live.send_signal(signal.SIGINT)
        out, err = live.communicate(timeout=10)
    finally:
        if live.poll() is None:
            live.kill()
    assert live.returncode == 0 and "pools" in out and "Traceback" not in err
    done = _cli(process, "pause", admin=False)  # no admin token: one line saying what to set
    assert done.returncode == 1 and "UNAUTHENTICATED" in done.stderr
    assert "PGBROKER_ADMIN_TOKEN" in done.stderr
    assert "PAUSE (admin RPC by token:ops)" in process.log()


def _workers_broker(postgres: Any, tmp_path: Path, config_lines: str = "") -> BrokerProcess:
    """Two workers (not started), pool_size 2 from the config file ``tmp_path/pgbroker.env``
    (and *config_lines*), with an admin token."""
    config = tmp_path / "pgbroker.env"
    config.write_text("PGBROKER_POOL_SIZE=2\n" + config_lines)
    env = {"PGBROKER_CONFIG_FILE": str(config), "PGBROKER_ADMIN_TOKENS": ADMIN}
    return BrokerProcess(
        postgres.dsn + "?sslmode=disable", env=env, auth="none", shutdown_grace=2, workers=2
    )


def test_workers_all_reload_and_pause_through_the_supervisor(postgres: Any, tmp_path: Path) -> None:
    config = tmp_path / "pgbroker.env"
    with _workers_broker(postgres, tmp_path) as process:
        assert process.wait_serving()
        config.write_text("PGBROKER_POOL_SIZE=4\n")
        os.kill(process.pid or 0, signal.SIGHUP)
        wait_until(lambda: process.log().count("reload: pool_size: 2 -> 4") == 2, what="2 reloads")
        done = _cli(process, "pause")
        assert done.returncode == 0, done.stderr
        wait_until(lambda: process.log().count("PAUSE (SIGUSR1)") == 2, what="2 paused workers")
        # Overrides cannot travel in a signal: the worker asked reloads, then its sibling
        # over the private socket; a bad value is refused by the first and changes nothing.
        done = _cli(process, "reload", "pool_size=6")
        assert done.returncode == 0, done.stderr
        wait_until(lambda: process.log().count("reload: pool_size: 4 -> 6") == 2, what="2 reloads")
        assert _stats(process)["pool_size"] == 6
        done = _cli(process, "reload", "pool_size=abc")
        assert done.returncode == 1 and "pool_size" in done.stderr
        assert process.log().count("reload: pool_size") == 4  # 2 -> 4 and 4 -> 6, twice each
        assert _cli(process, "resume").returncode == 0
        wait_until(lambda: process.log().count("RESUME (SIGUSR2)") == 2, what="2 resumed workers")


# -- a worker restarted after a crash starts in the broker's state ------------------------------


def _worker_pids(process: BrokerProcess) -> list[int]:
    """The worker pids of the supervisor's ``listening on`` line."""
    for line in process.log().splitlines():
        if "listening on" in line:
            return [int(pid) for pid in json.loads(line)["worker_pids"]]
    raise AssertionError("no listening on line")


def _kill_and_wait_restart(process: BrokerProcess, index: int, pid: int) -> None:
    """SIGKILL worker *index* (*pid*) and wait until the supervisor restarted it."""
    restarts = process.log().count(f"worker {index} restarted")
    os.kill(pid, signal.SIGKILL)
    wait_until(
        lambda: process.log().count(f"worker {index} restarted") > restarts,
        timeout=30,
        what=f"worker {index} restarted",
    )


def test_a_worker_restarted_while_paused_starts_paused_and_resumes_with_the_others(
    postgres: Any, tmp_path: Path
) -> None:
    with (
        _workers_broker(postgres, tmp_path) as process,
        grpc.insecure_channel(process.target) as admin_channel,
    ):
        assert process.wait_serving()
        admin = pb_grpc.AdminStub(admin_channel)
        reply = admin.Pause(pb.PauseRequest(), metadata=ADMIN_MD, timeout=30)
        # The reply answers for the broker: both workers paused, figures of both.
        assert reply.paused and reply.stats["workers_answered"] == 2
        assert reply.stats["pool_paused"] == 1
        _kill_and_wait_restart(process, 0, _worker_pids(process)[0])
        assert "PAUSE (worker 0 started while the broker is paused)" in process.log()
        _queue_on_both_workers_until_resumed(process, admin)
        # Restarted now, it starts unpaused: the resume removed the supervisor's marker.
        _kill_and_wait_restart(process, 1, _stats(process)["worker.1.worker_pid"])
        wait_until(lambda: _stats(process)["workers_answered"] == 2, what="both workers answer")
        assert _stats(process)["pool_paused"] == 0
        assert process.log().count("started while the broker is paused") == 1


def _queue_on_both_workers_until_resumed(process: BrokerProcess, admin: Any) -> None:
    """New work queues on both workers, a restarted one too (40 connections, each to the
    worker the kernel picks: 1 in 2^39 to miss one), and nothing runs until Resume."""
    channels = [
        grpc.insecure_channel(process.target, options=[("grpc.use_local_subchannel_pool", 1)])
        for _ in range(40)
    ]
    try:
        calls = [
            pb_grpc.BrokerStub(channel).Execute.future(
                pb.ExecuteRequest(statements=[pb.Statement(sql="SELECT 1")]),
                timeout=60,
                wait_for_ready=True,
            )
            for channel in channels
        ]
        wait_until(lambda: _stats(process)["requests_waiting"] == 40, timeout=30, what="queued")
        stats = _stats(process)
        assert stats["workers_answered"] == 2
        assert stats["worker.0.requests_waiting"] > 0 and stats["worker.1.requests_waiting"] > 0
        assert not [call for call in calls if call.done()]
        reply = admin.Resume(pb.ResumeRequest(), metadata=ADMIN_MD, timeout=30)
        assert not reply.paused and reply.stats["workers_answered"] == 2
        assert all(call.result(timeout=30).results for call in calls)
        assert _stats(process)["pool_paused"] == 0
    finally:
        for channel in channels:
            channel.close()


def test_a_restarted_worker_has_the_reload_overrides_until_a_plain_reload(
    postgres: Any, tmp_path: Path
) -> None:
    with _workers_broker(postgres, tmp_path) as process:
        assert process.wait_serving()
        done = _cli(process, "reload", "pool_size=4")  # each worker 1 -> 2 connections
        assert done.returncode == 0, done.stderr
        assert _stats(process)["pool_max"] == 4
        _kill_and_wait_restart(process, 1, _worker_pids(process)[1])
        wait_until(lambda: _stats(process)["workers_answered"] == 2, what="both workers answer")
        assert _stats(process)["pool_max"] == 4
        # Logged as a reload logs it (derived settings such as replica_pool_size follow).
        restored = [
            json.loads(line)["message"]
            for line in process.log().splitlines()
            if "starting with the reload overrides in effect" in line
        ]
        assert len(restored) == 1 and " pool_size: 2 -> 4" in restored[0], restored
        assert restored[0].startswith("worker 1: starting with the reload overrides in effect")
        # A plain reload ends the overrides (docs/broker.md): in the running workers and for
        # a worker restarted after it.
        os.kill(process.pid or 0, signal.SIGHUP)
        wait_until(lambda: process.log().count("reload: pool_size: 4 -> 2") == 2, what="reloads")
        assert _stats(process)["pool_max"] == 2
        _kill_and_wait_restart(process, 0, _stats(process)["worker.0.worker_pid"])
        wait_until(lambda: _stats(process)["workers_answered"] == 2, what="both workers answer")
        assert _stats(process)["pool_max"] == 2
        assert process.log().count("starting with the reload overrides in effect") == 1


def test_pause_wait_waits_for_a_lease_on_any_worker(postgres: Any, tmp_path: Path) -> None:
    # The lease stays open through the calls below (10 s idle by default).
    with (
        _workers_broker(postgres, tmp_path, "PGBROKER_IDLE_TRANSACTION_TIMEOUT=60\n") as process,
        grpc.insecure_channel(process.target) as lease_channel,
    ):
        assert process.wait_serving()
        lease = _Transaction(pb_grpc.BrokerStub(lease_channel))
        assert lease.step(pb.TransactRequest(begin=pb.TransactionOptions())).HasField("begun")
        # The lease holds a connection on one worker; each Pause(wait) goes on a new connection
        # to whichever worker the kernel picks (5 calls: 1 in 32 that all reach the lease's).
        for _ in range(5):
            with grpc.insecure_channel(
                process.target, options=[("grpc.use_local_subchannel_pool", 1)]
            ) as channel:
                reply = pb_grpc.AdminStub(channel).Pause(
                    pb.PauseRequest(wait=True), metadata=ADMIN_MD, timeout=2
                )
            assert reply.message.startswith("paused, but work still runs"), reply.message
            assert reply.stats["pool_active"] == 1 and reply.stats["workers_answered"] == 2
        assert lease.step(pb.TransactRequest(rollback=pb.TransactRequest.Rollback())).ended
        done = _cli(process, "pause", "--wait", "--timeout", "10")
        assert done.returncode == 0 and "paused: nothing runs" in done.stdout, done.stderr


def _children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(child) for child in f.read().split()]


def _exec_done(pids: set[int]) -> bool:
    """Whether a process of *pids* runs its own program and does not catch SIGUSR1 (yet): the
    forked child caught it with the supervisor's handler until exec."""
    for pid in pids:
        with open(f"/proc/{pid}/status") as f:
            caught = next(line for line in f if line.startswith("SigCgt:")).split()[1]
        if not int(caught, 16) & (1 << (signal.SIGUSR1 - 1)):
            return True
    return False


def test_a_control_during_a_restart_waits_until_the_worker_serves(
    postgres: Any, tmp_path: Path
) -> None:
    with _workers_broker(postgres, tmp_path) as process:
        assert process.wait_serving()
        pids = _worker_pids(process)
        os.kill(pids[0], signal.SIGKILL)
        wait_until(lambda: _exec_done(set(_children(process.pid or 0)) - set(pids)), what="exec")
        # Worker 0 is starting: a SIGUSR1 now, before it handles the signal, would kill it.
        os.kill(process.pid or 0, signal.SIGUSR1)
        wait_until(lambda: "worker 0 restarted" in process.log(), timeout=30, what="restarted")
        # Paused by the forwarded signal once it serves, or at its start (the marker).
        started_paused = "PAUSE (worker 0 started while the broker is paused)"
        wait_until(
            lambda: (
                process.log().count("PAUSE (SIGUSR1)") + process.log().count(started_paused) == 2
            ),
            what="both workers paused",
        )
        assert "killed by SIGUSR1" not in process.log()
        assert _stats(process)["workers_answered"] == 2
        assert process.proc is not None and process.proc.poll() is None
