"""The mistakes a new user makes (issue 17) get a message that names the setting or the fix.

Real brokers (in-process, with TLS or token auth where the case needs it) or the scripted
stand-in where the status must be exact (a full queue, an outcome-unknown failure).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import grpc
import pytest

import lambda_client as lc
from devtools.brokerproc import BrokerProcess
from lambda_client._config import ClientConfig
from lambda_client.aio import AsyncBrokerClient
from lambda_client.auth import BearerAuth
from tests.fixtures.brokers import InProcessBroker
from tests.fixtures.certs import TestCA
from tests.lambda_client.standin import bare, failure, standin

SC = grpc.StatusCode
TOKEN = "first-hour-token-0123456789"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    directory = tmp_path_factory.mktemp("pki")
    ca = TestCA(directory, "first hour CA")
    return {
        "ca": ca,
        "other": TestCA(directory, "untrusted CA"),
        "broker": ca.issue("broker", ["localhost", "127.0.0.1"]),
    }


@pytest.fixture(scope="module")
def tls_broker(postgres: Any, pki: dict[str, Any]) -> Iterator[InProcessBroker]:
    cert, key = pki["broker"].cert_file, pki["broker"].key_file
    with InProcessBroker(postgres.dsn, tls_cert=cert, tls_key=key) as broker:
        yield broker


def _client(target: str | None, env: dict[str, str], **kwargs: Any) -> lc.BrokerClient:
    """A client configured only by *env*, as a handler with that environment would be."""
    return lc.BrokerClient(target, config=ClientConfig.from_env(env), **kwargs)


def _failure(client: lc.BrokerClient, sql: str = "SELECT 1") -> lc.Error:
    try:
        with pytest.raises(lc.Error) as caught:
            client.query(sql)
    finally:
        client.close()
    return caught.value


# -- 1. no target ----------------------------------------------------------------------------


def test_inside_a_lambda_without_pgbroker_url_the_first_call_fails_at_once() -> None:
    client = _client(None, {"AWS_LAMBDA_FUNCTION_NAME": "orders"}, timeout=30)
    started = time.monotonic()
    error = _failure(client)
    assert time.monotonic() - started < 1  # not the whole deadline
    assert isinstance(error, lc.InterfaceError)
    assert "PGBROKER_URL is not set" in str(error)
    assert "'orders'" in str(error)
    assert client.channels_created == 0  # nothing was sent


def test_outside_a_lambda_the_unreachable_error_says_the_default_was_used() -> None:
    with socket.socket() as probe:
        if probe.connect_ex(("127.0.0.1", 50051)) == 0:
            pytest.skip("something listens on the default port 127.0.0.1:50051")
    error = _failure(_client(None, {}, timeout=1))
    assert isinstance(error, lc.Unavailable)
    assert error.reason == "BROKER_UNREACHABLE"
    assert "PGBROKER_URL is not set, so the default 127.0.0.1:50051 was used" in str(error)


def test_a_defaulted_target_says_so_when_unreachable(monkeypatch: pytest.MonkeyPatch) -> None:
    """As above where 127.0.0.1:50051 is taken (another broker on this machine): the default
    moved to a port nothing listens on, the message is the same."""
    import lambda_client._base as base

    monkeypatch.setattr(base, "DEFAULT_TARGET", "127.0.0.1:1")
    error = _failure(_client(None, {}, timeout=1))
    assert error.reason == "BROKER_UNREACHABLE"
    assert "PGBROKER_URL is not set, so the default" in str(error)
    assert "connection refused" in str(error)


# -- 2. TLS ------------------------------------------------------------------------------------


def test_plaintext_client_against_a_tls_broker_is_told_to_set_pgbroker_tls(
    tls_broker: InProcessBroker,
) -> None:
    error = _failure(_client(tls_broker.target, {}, timeout=1.5))
    assert isinstance(error, lc.Unavailable)
    assert "the broker speaks TLS and this client plaintext: set PGBROKER_TLS=1" in str(error)


def test_the_asyncio_client_says_the_same(tls_broker: InProcessBroker) -> None:
    async def call() -> lc.Error:
        config = ClientConfig.from_env({})
        async with AsyncBrokerClient(tls_broker.target, timeout=1.5, config=config) as client:
            with pytest.raises(lc.Error) as caught:
                await client.query("SELECT 1")
        return caught.value

    error = asyncio.run(call())
    assert "the broker speaks TLS and this client plaintext: set PGBROKER_TLS=1" in str(error)


def test_untrusted_broker_certificate_names_the_ca_variable(
    tls_broker: InProcessBroker, pki: dict[str, Any]
) -> None:
    env = {"PGBROKER_TLS": "1", "PGBROKER_TLS_CA_FILE": pki["other"].cert_file}
    error = _failure(_client(tls_broker.target, env, timeout=1.5))
    assert "TLS handshake failed" in str(error)
    assert "set PGBROKER_TLS_CA_FILE" in str(error)


def test_tls_client_against_a_plaintext_broker_is_told_to_unset_pgbroker_tls() -> None:
    with standin() as (target, _):
        error = _failure(_client(target, {"PGBROKER_TLS": "1"}, timeout=1.5))
    assert "the broker answers in plaintext" in str(error)
    assert "unset PGBROKER_TLS" in str(error)


def test_tls_client_that_trusts_the_ca_still_works(
    tls_broker: InProcessBroker, pki: dict[str, Any]
) -> None:
    env = {"PGBROKER_TLS": "1", "PGBROKER_TLS_CA_FILE": pki["ca"].cert_file}
    with _client(tls_broker.target, env) as client:
        assert client.query("SELECT 1").scalar() == 1


# -- 3. tokens ---------------------------------------------------------------------------------


def test_token_whitespace_from_a_file_or_secret_is_stripped() -> None:
    config = ClientConfig.from_env({"PGBROKER_AUTH": "token", "PGBROKER_TOKEN": f" {TOKEN}\n"})
    assert config.token == TOKEN
    assert BearerAuth(f"{TOKEN}\r\n")() == (("authorization", f"Bearer {TOKEN}"),)


def test_token_with_a_line_break_inside_is_refused_naming_the_variable() -> None:
    with pytest.raises(ValueError, match="PGBROKER_TOKEN"):
        _client("127.0.0.1:1", {"PGBROKER_AUTH": "token", "PGBROKER_TOKEN": "abc\ndef"})


def test_token_ending_in_a_newline_authenticates(postgres: Any) -> None:
    with InProcessBroker(postgres.dsn, auth="token", tokens=f"app:{TOKEN}") as broker:
        env = {"PGBROKER_AUTH": "token", "PGBROKER_TOKEN": f"{TOKEN}\n"}
        with _client(broker.target, env) as client:
            assert client.query("SELECT 'in'").scalar() == "in"


# -- 5. SET LOCAL alone ------------------------------------------------------------------------


def test_set_local_alone_is_refused_naming_batch_and_begin(broker: BrokerProcess) -> None:
    with lc.BrokerClient(broker.target) as client:
        with pytest.raises(lc.InvalidRequest) as caught:
            client.query("SET LOCAL work_mem = '8MB'")
        message = str(caught.value)
        assert caught.value.reason == "BAD_REQUEST"
        assert "autocommit" in message
        assert "BrokerClient.transaction([...])" in message
        assert "BrokerClient.begin()" in message
        # The alternatives work.
        setting = "SELECT current_setting('work_mem')"
        batch = client.transaction(["SET LOCAL work_mem = '8MB'", setting])
        assert batch[1].scalar() == "8MB"
        with client.begin() as tx:
            tx.query("SET LOCAL work_mem = '8MB'")
            assert tx.query(setting).scalar() == "8MB"


# -- 6. retries last as long as the deadline --------------------------------------------------


def test_full_queue_is_retried_past_five_attempts_within_the_deadline() -> None:
    full = failure(SC.RESOURCE_EXHAUSTED, "queue full", retry_after=0.01, reason="QUEUE_FULL")
    with standin(*[full] * 12) as (target, script):
        client = lc.BrokerClient(target, timeout=10, initial_backoff=0.01, max_backoff=0.02)
        assert client.query("SELECT 1").scalar() == 1
        client.close()
    assert len(script.requests) == 13


def test_the_final_error_says_how_many_attempts_over_how_long() -> None:
    full = failure(SC.RESOURCE_EXHAUSTED, "queue full", retry_after=0.05, reason="QUEUE_FULL")
    with standin(*[full] * 1000) as (target, script):
        client = lc.BrokerClient(target, initial_backoff=0.01, max_backoff=0.05)
        error = _failure_of(lambda: client.query("SELECT 1", timeout=1.0))
        client.close()
    attempts = len(script.requests)
    assert attempts > 5
    assert isinstance(error, lc.Overloaded)
    assert f"gave up after {attempts} attempts over " in str(error)
    assert "the next retry would pass the deadline" in str(error)


def test_no_retry_is_sent_that_the_deadline_would_cut_short() -> None:
    """Each refusal takes 0.4 s: a third attempt would start about 0.95 s into a 1 s deadline
    and end in DEADLINE_EXCEEDED, an unknown outcome, instead of the clean refusal."""
    full = failure(SC.RESOURCE_EXHAUSTED, "queue full", retry_after=0.05, reason="QUEUE_FULL")
    with standin(*[full] * 10) as (target, script):
        script.pause = 0.4
        client = lc.BrokerClient(target, initial_backoff=0.01, max_backoff=0.02)
        error = _failure_of(lambda: client.query("SELECT 1", timeout=1.0))
        client.close()
    assert isinstance(error, lc.Overloaded)
    assert len(script.requests) == 2
    assert "gave up after 2 attempts" in str(error)
    assert "the next retry would pass the deadline" in str(error)


def test_an_explicit_max_attempts_still_bounds_retries() -> None:
    full = failure(SC.RESOURCE_EXHAUSTED, "queue full", retry_after=0.01, reason="QUEUE_FULL")
    with standin(*[full] * 10) as (target, script):
        client = lc.BrokerClient(target, max_attempts=3, initial_backoff=0.01, max_backoff=0.02)
        error = _failure_of(lambda: client.query("SELECT 1"))
        client.close()
    assert len(script.requests) == 3
    assert "gave up after 3 attempts" in str(error) and "max_attempts reached" in str(error)


def test_a_burst_on_a_full_queue_all_succeeds_within_the_deadline(
    start_broker_process: Any,
) -> None:
    """Issue 17's case: callers gave up after 5 attempts with most of their deadline unused.
    One pooled connection, one queue slot, 40 callers at once (each its own client, as
    separate Lambdas): every call succeeds."""
    broker = start_broker_process(pool_size=1, max_waiting=1)
    results: list[object] = []

    def call() -> None:
        with lc.BrokerClient(broker.target, timeout=20) as client:
            try:
                results.append(client.query("SELECT pg_sleep(0.02), 'done'").rows[0][1])
            except lc.Error as exc:
                results.append(exc)

    threads = [threading.Thread(target=call) for _ in range(40)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    with lc.BrokerClient(broker.target) as observer:
        rejected = observer.stats()["rpcs_rejected"]
    assert results == ["done"] * 40, [r for r in results if r != "done"][:3]
    assert rejected >= 40  # the queue was full, often: the retries did the work


def _failure_of(call: Any) -> lc.Error:
    with pytest.raises(lc.Error) as caught:
        call()
    return caught.value


# -- 7. client logging -------------------------------------------------------------------------


def test_retries_are_logged_at_info_with_structured_fields(
    caplog: pytest.LogCaptureFixture,
) -> None:
    full = failure(SC.RESOURCE_EXHAUSTED, "queue full", retry_after=0.01, reason="QUEUE_FULL")
    caplog.set_level(logging.INFO, logger="lambda_client")
    with (
        standin(full, full) as (target, _),
        lc.BrokerClient(target, initial_backoff=0.01, max_backoff=0.02) as client,
    ):
        client.query("SELECT 1")
    retries = [r for r in caplog.records if r.name == "lambda_client"]
    assert [(r.levelno, r.reason, r.attempt) for r in retries] == [  # type: ignore[attr-defined]
        (logging.INFO, "QUEUE_FULL", 1),
        (logging.INFO, "QUEUE_FULL", 2),
    ]
    assert retries[0].pgbroker_code == "RESOURCE_EXHAUSTED"  # type: ignore[attr-defined]
    assert "retrying" in retries[0].getMessage()


def test_outcome_unknown_is_logged_at_warning(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="lambda_client")
    unknown = bare(SC.UNKNOWN, "connection lost during COMMIT")
    with (
        standin(unknown) as (target, _),
        # Without an idempotency key: with one, the client resends an unknown outcome.
        lc.BrokerClient(target, idempotency=False) as client,
        pytest.raises(lc.OutcomeUnknown),
    ):
        client.query("SELECT 1")
    [record] = [r for r in caplog.records if r.name == "lambda_client"]
    assert record.levelno == logging.WARNING
    assert record.outcome == "unknown"  # type: ignore[attr-defined]
    assert "may have run" in record.getMessage()


def test_the_client_configures_no_handler_and_is_quiet_below_warning() -> None:
    logger = logging.getLogger("lambda_client")
    assert logger.handlers == []
    assert logger.level == logging.NOTSET  # the application's logging decides
    assert not logger.propagate or logger.parent is logging.getLogger()


# -- 10. one query by hand ---------------------------------------------------------------------


def _cli(target: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PGBROKER_URL": target}
    return subprocess.run(
        [sys.executable, "-m", "lambda_client", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )


def test_python_m_lambda_client_prints_a_table(broker: BrokerProcess) -> None:
    proc = _cli(broker.target, "SELECT $1::int AS n, 'x' AS label, NULL AS nothing", "41")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [
        "n  | label | nothing",
        "---+-------+--------",
        "41 | x     |",
        "(1 row)",
    ]


def test_python_m_lambda_client_json(broker: BrokerProcess) -> None:
    proc = _cli(broker.target, "--json", "SELECT $1::int + 1 AS n", "41")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == {
        "columns": ["n"],
        "rows": [[42]],
        "rows_affected": 1,
        "command_tag": "SELECT 1",
    }


def test_python_m_lambda_client_failure_names_the_fix(broker: BrokerProcess) -> None:
    proc = _cli(broker.target, "SET LOCAL work_mem = '8MB'")
    assert proc.returncode == 1
    assert "InvalidRequest" in proc.stderr and "begin()" in proc.stderr
