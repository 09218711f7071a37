"""The client's policy without I/O: what is resent and when (`lambda_client._policy`), the
configuration read once from the environment (`lambda_client._config`), and the asyncio
client following the same plan as the blocking one against a scripted stand-in broker."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest

import lambda_client as lc
from lambda_client import errors
from lambda_client._config import ClientConfig, ConfigError, Pem
from lambda_client._policy import CallPolicy
from lambda_client._status import NOTHING_RAN, Reason
from lambda_client.aio import AsyncBrokerClient
from lambda_client.auth import BearerAuth, IamAuth, auth_for
from tests.lambda_client.standin import bare, failure, standin

SC = grpc.StatusCode
POLICY = CallPolicy(max_attempts=3, initial_backoff=0.1, max_backoff=0.4)


def error(cls: type[errors.Error], **fields: object) -> errors.Error:
    return cls("failed", **fields)  # type: ignore[arg-type]


@pytest.mark.parametrize("reason", sorted(NOTHING_RAN - {Reason.BROKER_UNREACHABLE}))
def test_a_refusal_where_nothing_ran_is_resent_with_backoff(reason: str) -> None:
    for cls in (errors.Overloaded, errors.Unavailable):
        delay = POLICY.retry_delay(error(cls, reason=reason), 1, retry_aborted=False)
        assert delay is not None and 0.05 <= delay <= 0.1


def test_retry_info_is_honoured_and_jittered_by_the_backoff() -> None:
    delay = POLICY.retry_delay(error(errors.Overloaded, retry_after=2.0), 2, retry_aborted=False)
    assert delay is not None and 2.0 <= delay <= 2.2


@pytest.mark.parametrize(
    "failed",
    [
        error(errors.Overloaded, reason=Reason.LIMIT_EXCEEDED),  # fails the same way again
        error(errors.Overloaded),  # gRPC's message size cap: no reason
        error(errors.Unavailable),  # a transport failure mid-call: it may have run
        error(errors.Unavailable, reason=Reason.AUTH_UNAVAILABLE),
        error(errors.OutcomeUnknown, reason=Reason.CONNECTION_LOST),
        error(errors.DeadlineExceeded),
        error(errors.Cancelled),
        error(errors.SerializationFailure, retry_after=0.01),  # not asked to resend
        error(errors.UniqueViolation),
    ],
    ids=lambda e: f"{type(e).__name__}-{e.reason}",
)
def test_what_may_have_run_is_never_resent(failed: errors.Error) -> None:
    assert POLICY.retry_delay(failed, 1, retry_aborted=False) is None


def test_a_rolled_back_transaction_is_resent_only_when_asked_and_within_max_attempts() -> None:
    deadlock = error(errors.DeadlockDetected)
    assert POLICY.retry_delay(deadlock, 1, retry_aborted=True) is not None
    assert POLICY.retry_delay(deadlock, 3, retry_aborted=True) is None  # max_attempts=3


def test_policy_settings_are_checked_naming_them() -> None:
    with pytest.raises(ValueError, match="timeout"):
        CallPolicy(timeout=0)
    with pytest.raises(TypeError, match="deadline_margin"):
        CallPolicy(deadline_margin="1")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_attempts"):
        CallPolicy(max_attempts=0)


def test_the_environment_is_read_once_into_a_config(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PGBROKER_URL", "broker.internal:50051")
    monkeypatch.setenv("PGBROKER_AUTH", "token")
    monkeypatch.setenv("PGBROKER_TOKEN", "secret")
    db = lc.BrokerClient()
    monkeypatch.setenv("PGBROKER_URL", "other.internal:50051")
    monkeypatch.setenv("PGBROKER_AUTH", "none")
    assert db.target == "broker.internal:50051"
    assert isinstance(db.auth, BearerAuth)
    assert db.config.auth == "token"


def test_config_from_env_names_every_setting() -> None:
    config = ClientConfig.from_env(
        {
            "PGBROKER_URL": " dns:///broker.internal:50051 ",
            "PGBROKER_TLS": "Yes",
            "PGBROKER_TLS_CA_FILE": "/opt/ca.pem",
            "PGBROKER_TLS_SERVER_NAME": "broker.internal",
            "PGBROKER_AUTH": "IAM",
            "PGBROKER_STS_ENDPOINT": "https://sts.example/",
            "AWS_REGION": "eu-west-1",
        }
    )
    assert config.target == "dns:///broker.internal:50051"
    assert config.tls and config.tls_ca == Pem("PGBROKER_TLS_CA_FILE", "/opt/ca.pem")
    assert (config.tls_server_name, config.auth) == ("broker.internal", "iam")
    signer = auth_for(config)
    assert isinstance(signer, IamAuth)
    assert (signer.audience, signer.sts_endpoint) == (config.target, "https://sts.example/")
    assert ClientConfig.from_env({"PGBROKER_URL": "", "PGBROKER_TLS": "0"}) == ClientConfig()


def test_a_pem_setting_takes_a_path_or_the_pem_itself(tmp_path: Path) -> None:
    text = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"
    (tmp_path / "ca.pem").write_text(text)
    assert Pem("PGBROKER_TLS_CA_FILE", str(tmp_path / "ca.pem")).read() == text.encode()
    assert Pem("PGBROKER_TLS_CA_FILE", text).read() == text.encode()
    with pytest.raises(ConfigError, match=r"^PGBROKER_TLS_CA_FILE='.*missing.pem': cannot read"):
        Pem("PGBROKER_TLS_CA_FILE", str(tmp_path / "missing.pem")).read()
    (tmp_path / "junk").write_text("not a certificate")
    with pytest.raises(ConfigError, match="not a PEM file"):
        Pem("PGBROKER_TLS_CA_FILE", str(tmp_path / "junk")).read()


def test_a_config_never_shows_a_secret_in_its_repr() -> None:
    key = "-----BEGIN PRIVATE KEY-----\nc2VjcmV0\n-----END PRIVATE KEY-----\n"
    config = ClientConfig.from_env(
        {"PGBROKER_TLS_CLIENT_KEY_FILE": key, "PGBROKER_AUTH": "token", "PGBROKER_TOKEN": "s3cr3t"}
    )
    assert "c2VjcmV0" not in repr(config) and "s3cr3t" not in repr(config)
    assert "PGBROKER_TLS_CLIENT_KEY_FILE" in repr(config)


def test_an_unreadable_ca_file_fails_the_first_call_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("PGBROKER_TLS_CA_FILE", str(tmp_path / "missing.pem"))
    db = lc.BrokerClient("127.0.0.1:1", tls=True, auth=lambda: ())
    with pytest.raises(ValueError, match="PGBROKER_TLS_CA_FILE"):
        db.query("SELECT 1")


def test_the_async_client_resends_and_refuses_exactly_as_the_blocking_one() -> None:
    full = failure(SC.RESOURCE_EXHAUSTED, "queue full", retry_after=0.01, reason="QUEUE_FULL")
    lost = bare(SC.UNKNOWN, "connection lost during COMMIT")

    async def run(target: str) -> None:
        db = AsyncBrokerClient(
            target, timeout=10, initial_backoff=0.01, max_backoff=0.02, idempotency=False
        )
        assert (await db.query("SELECT 1")).scalar() == 1  # after two QUEUE_FULL
        with pytest.raises(lc.OutcomeUnknown):
            await db.transaction(["SELECT 1"])
        await db.close()

    with standin(full, full, None, lost) as (target, script):
        asyncio.run(run(target))
    assert len(script.requests) == 4


def test_the_async_client_resends_an_unknown_outcome_with_the_same_key() -> None:
    lost = bare(SC.UNAVAILABLE, "Socket closed")

    async def run(target: str) -> None:
        db = AsyncBrokerClient(target, timeout=10, initial_backoff=0.01, max_backoff=0.02)
        assert (await db.transaction(["INSERT 1"])) is not None
        keyless = AsyncBrokerClient(target, timeout=10, idempotency=False)
        with pytest.raises(lc.OutcomeUnknown):  # without a key it is never Unavailable
            await keyless.query("INSERT 2")
        await db.close()
        await keyless.close()

    with standin(lost, None, lost) as (target, script):
        asyncio.run(run(target))
    keys = [r.idempotency_key for r in script.requests]
    assert len(keys) == 3 and keys[0] == keys[1] != "" and keys[2] == ""
