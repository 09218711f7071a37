"""One worker of ``--workers N`` (`broker.front.workers`) without the supervisor: its share of
the pool, the role the supervisor hands it in the environment, its readiness pipe, and the
port reservation. The whole supervisor runs in test_workers.py."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from collections.abc import Iterator
from typing import Any

import pytest

from broker.config import ConfigError, load_settings, task_cpus
from broker.front.reload import Reloader, ReloadRefused
from broker.front.workers import WORKER_ENV, WorkerRole, _reserve, worker_pool_size, worker_role
from tests.fixtures.brokers import InProcessBroker
from tests.support import request, rows


def settings(environ: dict[str, str] | None = None, **flags: Any) -> Any:
    base = {"database_url": "postgresql://app@db.internal/app", "listen": "127.0.0.1:0"}
    return load_settings({**base, **flags}, environ=environ or {})


@pytest.mark.parametrize(
    ("pool_size", "workers", "each"),
    [
        (20, 1, [20]),
        (20, 2, [10, 10]),
        (20, 3, [7, 7, 6]),
        (7, 2, [4, 3]),
        (3, 2, [2, 1]),
        (4, 4, [1, 1, 1, 1]),
        (5, 4, [2, 1, 1, 1]),
        (100, 8, [13, 13, 13, 13, 12, 12, 12, 12]),
    ],
)
def test_the_workers_share_pool_size_exactly(pool_size: int, workers: int, each: list[int]) -> None:
    configured = settings(pool_size=pool_size, workers=workers)
    assert [worker_pool_size(configured, index) for index in range(workers)] == each
    assert sum(each) == pool_size


def test_more_workers_than_connections_is_refused_by_the_settings() -> None:
    with pytest.raises(ConfigError, match="more workers than pool_size 3"):
        settings(pool_size=3, workers=4)


def test_without_the_marker_the_process_is_no_worker() -> None:
    assert worker_role(settings({})) is None
    assert worker_role(settings({WORKER_ENV: ""})) is None
    assert worker_role(settings({"PGBROKER_WORKERS": "4"})) is None


def test_the_marker_gives_index_port_and_readiness_pipe() -> None:
    role = worker_role(settings({WORKER_ENV: "2,50051,9"}))
    assert role == WorkerRole(index=2, port=50051, ready_fd=9)


def test_the_marker_gives_the_directory_of_the_figure_sockets() -> None:
    # A directory name may hold a comma: it is everything after the third one.
    role = worker_role(settings({WORKER_ENV: "1,50051,9,/tmp/pgbroker-workers-a,b"}))
    assert role == WorkerRole(
        index=1, port=50051, ready_fd=9, sibling_dir="/tmp/pgbroker-workers-a,b"
    )


@pytest.mark.parametrize("marker", ["1,2", "a,b,c", "1,2,3,4", "1,2,x,/tmp/d", " "])
def test_a_malformed_marker_is_an_error_not_a_silent_single_process(marker: str) -> None:
    with pytest.raises(ConfigError, match=WORKER_ENV):
        worker_role(settings({WORKER_ENV: marker}))


def test_a_role_puts_the_reserved_port_in_the_settings_and_keeps_the_rest() -> None:
    configured = settings(pool_size=6, workers=3)
    applied = WorkerRole(index=1, port=43210, ready_fd=-1).apply(configured)
    assert applied.listen_port == 43210
    assert applied.listen_host == "127.0.0.1"
    assert (applied.pool_size, applied.workers) == (6, 3)


def test_ready_writes_one_byte_and_closes_the_pipe() -> None:
    read_end, write_end = os.pipe()
    try:
        WorkerRole(index=0, port=1, ready_fd=write_end).report_ready()
        assert os.read(read_end, 8) == b"1"
        assert os.read(read_end, 8) == b""  # closed: the supervisor sees end of file
    finally:
        os.close(read_end)


def test_ready_after_the_supervisor_went_away_does_not_raise() -> None:
    read_end, write_end = os.pipe()
    os.close(read_end)  # the supervisor's end: a write now fails with EPIPE
    try:
        WorkerRole(index=0, port=1, ready_fd=write_end).report_ready()
    finally:
        with contextlib.suppress(OSError):
            os.close(write_end)


@pytest.fixture
def reservation() -> Iterator[socket.socket]:
    with _reserve("127.0.0.1", 0) as sock:
        yield sock


def test_the_reservation_keeps_the_port_from_a_process_without_reuseport(
    reservation: socket.socket,
) -> None:
    port = reservation.getsockname()[1]
    assert port != 0
    with socket.socket() as plain, pytest.raises(OSError):
        plain.bind(("127.0.0.1", port))
    with socket.socket() as worker:
        worker.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        worker.bind(("127.0.0.1", port))  # a worker binds it too


def test_a_port_something_listens_on_cannot_be_reserved() -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        with pytest.raises(OSError):
            _reserve("127.0.0.1", listener.getsockname()[1]).close()


def test_a_worker_serves_on_the_reserved_port_with_its_share_and_reports_ready(
    postgres: Any, reservation: socket.socket
) -> None:
    port = reservation.getsockname()[1]
    read_end, write_end = os.pipe()
    try:
        role = WorkerRole(index=1, port=port, ready_fd=write_end)
        with InProcessBroker(postgres.dsn, pool_size=5, workers=2, worker=role) as broker:
            assert broker.port == port
            assert os.read(read_end, 8) == b"1"
            reply = broker.stub().Execute(request("SELECT 41 + 1"), timeout=10)
            assert rows(reply.results[0]) == [(42,)]
            stats = broker.stats()
            assert stats["pool_size"] == 2  # worker 1 of 2: 5 // 2 (worker 0 holds the third)
            assert (stats["worker"], stats["workers"], stats["worker_pid"]) == (1, 2, os.getpid())
    finally:
        os.close(read_end)


def test_a_reload_below_one_connection_per_running_worker_is_refused(
    postgres: Any, reservation: socket.socket
) -> None:
    if task_cpus()[0] < 2:
        pytest.skip("the default worker count is 1 here")
    role = WorkerRole(index=0, port=reservation.getsockname()[1], ready_fd=-1)
    # workers=None: the default (one per CPU, at most one per 4 connections of pool_size),
    # which a reload of a smaller pool_size would lower, while the running workers stay.
    with InProcessBroker(postgres.dsn, pool_size=8, workers=None, worker=role) as broker:
        assert broker.settings.workers == 2
        with pytest.raises(ReloadRefused, match="fewer connections than the 2 workers"):
            broker.call(broker.server.controls.reload({"pool_size": "1"}))
        assert broker.server.pool.size == 4  # 8 // 2, kept
        broker.call(broker.server.controls.reload({"pool_size": "2"}))
        assert broker.server.pool.size == 1


def test_the_overrides_in_effect_are_recorded_whole_private_and_cleared(tmp_path: Any) -> None:
    role = WorkerRole(0, 1, -1, str(tmp_path))
    assert role.overrides_in_effect() == {} and not role.starts_paused()
    role.record_overrides({"pool_size": "6", "PGBROKER_ADMIN_TOKENS": "ops:x" * 4})
    assert WorkerRole(1, 1, -1, str(tmp_path)).overrides_in_effect() == {
        "pool_size": "6",
        "PGBROKER_ADMIN_TOKENS": "ops:x" * 4,
    }
    assert os.stat(tmp_path / "overrides.json").st_mode & 0o777 == 0o600  # may hold a token
    assert os.listdir(tmp_path) == ["overrides.json"]  # no partial file left
    role.record_overrides({})  # a plain reload ends them
    assert role.overrides_in_effect() == {} and os.listdir(tmp_path) == []
    (tmp_path / "paused").touch()  # the supervisor's marker
    assert role.starts_paused()


def test_a_restart_applies_the_overrides_all_or_nothing(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="pgbroker.reload")
    environ = {"PGBROKER_DATABASE_URL": "postgresql://app@db.internal/app"}
    reloader = Reloader(settings(pool_size=4, workers=2), {"pool_size": 4}, environ=environ)
    base = reloader.settings
    restored = reloader.restore({"queue_timeout": "5", "max_waiting": "9"}, why="worker 1")
    assert (restored.queue_timeout, restored.max_waiting) == (5, 9)
    assert reloader.settings is restored
    assert (
        "worker 1: starting with the reload overrides in effect (max_waiting, queue_timeout)"
        in caplog.text
    )
    assert "max_waiting: 2000 -> 9; queue_timeout: 30.0 -> 5.0" in caplog.text
    # One bad override refuses them all: the worker starts with none of them.
    reloader = Reloader(base, {"pool_size": 4}, environ=environ)
    kept = reloader.restore({"queue_timeout": "5", "max_waiting": "-1"}, why="worker 1")
    assert kept is base and reloader.settings is base
    refused = [r for r in caplog.records if r.levelname == "ERROR"]
    assert len(refused) == 1 and "starts without them" in refused[0].getMessage()


def test_a_restart_logs_no_secret_of_the_overrides(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="pgbroker.reload")
    environ = {"PGBROKER_DATABASE_URL": "postgresql://app@db.internal/app"}
    reloader = Reloader(settings(pool_size=4, workers=2), {"pool_size": 4}, environ=environ)
    restored = reloader.restore({"admin_tokens": "ops:secret-token-0123456789"}, why="worker 1")
    assert restored.admin_tokens == "ops:secret-token-0123456789"
    assert "admin_tokens: changed" in caplog.text and "secret-token" not in caplog.text
