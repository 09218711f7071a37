"""The broker's side of issue 17: admin commands that name the variable to set, failure log
lines a reader can act on, and SIGTERM during start-up.

Real brokers: in-process (TLS, token auth) or ``python -m broker`` child processes.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from tests.fixtures.brokers import InProcessBroker
from tests.fixtures.certs import TestCA
from tests.support import request, temp_table

TOKEN = "first-hour-admin-token-0123"


def _broker_command(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """``python -m broker ARGS`` with only *env* (and PATH) in its environment."""
    return subprocess.run(
        [sys.executable, "-m", "broker", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **env},
    )


# -- 4. admin commands against an authenticated broker ----------------------------------------


@pytest.fixture(scope="module")
def token_broker(postgres: Any) -> Iterator[InProcessBroker]:
    with InProcessBroker(postgres.dsn, auth="token", tokens=f"admin:{TOKEN}") as broker:
        yield broker


def test_stats_without_a_token_names_pgbroker_token(token_broker: InProcessBroker) -> None:
    proc = _broker_command({}, "stats", "--target", token_broker.target)
    assert proc.returncode == 1
    assert "UNAUTHENTICATED" in proc.stderr
    assert "set PGBROKER_AUTH=token with PGBROKER_TOKEN" in proc.stderr


def test_stats_with_the_token_works(token_broker: InProcessBroker) -> None:
    env = {"PGBROKER_AUTH": "token", "PGBROKER_TOKEN": TOKEN + "\n"}
    proc = _broker_command(env, "stats", "--target", token_broker.target)
    assert proc.returncode == 0, proc.stderr
    assert "pool_size" in proc.stdout


def test_the_brokers_tokens_lose_surrounding_whitespace() -> None:
    from broker.security.tokens import parse_tokens

    expected = {TOKEN: "admin"}
    assert parse_tokens(f" admin:{TOKEN} \n") == expected
    assert parse_tokens(f'{{"admin": "{TOKEN}\\n"}}') == expected
    assert parse_tokens(f'["{TOKEN} "]') == {TOKEN: "token"}


# -- 2. health/stats against a TLS broker ------------------------------------------------------


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    directory = tmp_path_factory.mktemp("pki")
    ca = TestCA(directory, "first hour CA")
    return {"ca": ca, "broker": ca.issue("broker", ["localhost", "127.0.0.1"])}


@pytest.fixture(scope="module")
def tls_broker(postgres: Any, pki: dict[str, Any]) -> Iterator[InProcessBroker]:
    cert, key = pki["broker"].cert_file, pki["broker"].key_file
    with InProcessBroker(postgres.dsn, tls_cert=cert, tls_key=key) as broker:
        yield broker


def test_health_in_plaintext_against_a_tls_broker_names_pgbroker_tls(
    tls_broker: InProcessBroker,
) -> None:
    proc = _broker_command({}, "health", "--target", tls_broker.target)
    assert proc.returncode == 1
    assert proc.stdout.startswith("NOT_SERVING")
    assert "the broker speaks TLS and this client plaintext: set PGBROKER_TLS=1" in proc.stderr


def test_health_with_pgbroker_tls_and_the_ca_reports_serving(
    tls_broker: InProcessBroker, pki: dict[str, Any]
) -> None:
    env = {"PGBROKER_TLS": "1", "PGBROKER_TLS_CA_FILE": pki["ca"].cert_file}
    proc = _broker_command(env, "health", "--target", tls_broker.target)
    assert (proc.returncode, proc.stdout.strip()) == (0, "SERVING"), proc.stderr


def test_stats_with_tls_but_no_ca_names_the_ca_variable(tls_broker: InProcessBroker) -> None:
    proc = _broker_command({"PGBROKER_TLS": "1"}, "stats", "--target", tls_broker.target)
    assert proc.returncode == 1
    assert "TLS handshake failed" in proc.stderr
    assert "set PGBROKER_TLS_CA_FILE" in proc.stderr


# -- 8. failure log lines ----------------------------------------------------------------------


def test_a_database_error_is_logged_as_such_with_sqlstate_and_request(
    postgres: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="pgbroker.service")
    metadata = (("x-lambda-request-id", "req-17"), ("x-lambda-function-name", "orders"))
    with (
        InProcessBroker(postgres.dsn) as broker,
        temp_table(postgres, "first_hour", "id int PRIMARY KEY") as table,
    ):
        insert = f"INSERT INTO {table} VALUES (1)"
        with pytest.raises(grpc.RpcError):
            broker.stub().Execute(request("SELECT 1", insert, insert), metadata=metadata)
    [record] = [r for r in caplog.records if r.name == "pgbroker.service"]
    fields = record.__dict__
    assert record.getMessage() == "request failed: database error"
    assert "invalid argument" not in record.getMessage().lower()
    assert fields["kind"] == "database error"
    assert (fields["sqlstate"], fields["statement_index"]) == ("23505", 2)
    assert (fields["request_id"], fields["function"]) == ("req-17", "orders")
    assert "caller" in fields


def test_a_broker_refusal_is_logged_as_such(
    postgres: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="pgbroker.service")
    with InProcessBroker(postgres.dsn) as broker, pytest.raises(grpc.RpcError):
        broker.stub().Execute(request("SET work_mem = '8MB'"), timeout=10)
    [record] = [r for r in caplog.records if r.name == "pgbroker.service"]
    assert record.getMessage() == "request failed: broker refusal"
    assert record.__dict__["reason"] == "SESSION_STATE"
    assert record.__dict__["sqlstate"] is None


def test_a_lease_ended_by_a_database_error_logs_its_sqlstate(
    postgres: Any, caplog: pytest.LogCaptureFixture
) -> None:
    import lambda_client as lc

    caplog.set_level(logging.INFO, logger="pgbroker.transact")
    columns = "id int UNIQUE DEFERRABLE INITIALLY DEFERRED"  # violated at COMMIT
    with (
        InProcessBroker(postgres.dsn) as broker,
        lc.BrokerClient(broker.target) as client,
        temp_table(postgres, "first_hour", columns) as table,
        pytest.raises(lc.errors.UniqueViolation),
        client.begin() as tx,
    ):
        tx.query(f"INSERT INTO {table} VALUES (1), (1)")
    [record] = [r for r in caplog.records if r.getMessage() == "lease ended abnormally"]
    fields = record.__dict__
    assert (fields["kind"], fields["sqlstate"], fields["end"]) == (
        "database error",
        "23505",
        "error",
    )
    assert fields["statement_index"] == -1  # COMMIT
    assert "request_id" in fields and "caller" in fields


# -- 9. SIGTERM during start-up ----------------------------------------------------------------


@pytest.fixture
def silent_database() -> Iterator[str]:
    """A database URL whose server accepts connections and never answers: start-up waits."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(16)
        yield f"postgresql://u:p@127.0.0.1:{server.getsockname()[1]}/db?sslmode=disable"


def _start(database_url: str, tmp_path: Path, **more: str) -> tuple[subprocess.Popen[str], Path]:
    log = tmp_path / "broker.log"
    env = {
        **more,
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "PGBROKER_DATABASE_URL": database_url,
        "PGBROKER_LISTEN": "127.0.0.1:0",
        "PGBROKER_AUTH": "none",
        "PGBROKER_CONNECT_TIMEOUT": "60",
    }
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "broker"],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            text=True,
        )
    return proc, log


def _catches_sigterm(pid: int) -> bool:
    """Whether the process has installed a SIGTERM handler (Linux: /proc/PID/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigCgt:"):
            return bool(int(line.split()[1], 16) & (1 << (signal.SIGTERM - 1)))
    return False


def _wait_for(condition: Any, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_sigterm_while_loading_exits_0_saying_what_it_stopped(
    silent_database: str, tmp_path: Path
) -> None:
    proc, log = _start(silent_database, tmp_path)
    try:
        _wait_for(lambda: _catches_sigterm(proc.pid), 30)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0, log.read_text()
    finally:
        proc.kill()
    text = log.read_text()
    assert "SIGTERM while" in text or "stopped during start-up" in text, text
    assert "nothing was serving" in text


def test_sigterm_while_waiting_for_the_database_exits_0_naming_it(
    silent_database: str, tmp_path: Path
) -> None:
    proc, log = _start(silent_database, tmp_path)
    try:
        # The broker says when it starts waiting; the database never answers.
        _wait_for(lambda: "connecting to the database" in log.read_text(), 60)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0, log.read_text()
    finally:
        proc.kill()
    text = log.read_text()
    assert "stopped during start-up, while connecting to the database" in text, text


def test_sigterm_while_workers_start_exits_0_naming_it(
    silent_database: str, tmp_path: Path
) -> None:
    proc, log = _start(silent_database, tmp_path, PGBROKER_WORKERS="2")
    try:
        _wait_for(lambda: "connecting to the database" in log.read_text(), 60)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0, log.read_text()
    finally:
        proc.kill()
    text = log.read_text()
    assert "stopped during start-up, while starting workers" in text, text
    assert "stopped during start-up, while connecting to the database" in text, text
