"""TLS on both hops with throwaway CAs: client↔broker (TLS, mTLS) and broker↔Postgres
(sslmode=verify-full against a Postgres serving a test certificate)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from broker.pooling.pool import PoolUnavailable
from devtools.localpg import LocalPostgres
from lambda_client import BrokerClient, DeadlineExceeded, Unavailable
from lambda_client._proto.pgbroker.v1 import broker_pb2 as pb
from tests.fixtures.brokers import InProcessBroker
from tests.fixtures.certs import TestCA
from tests.support import request, rows


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    directory = tmp_path_factory.mktemp("pki")
    ca = TestCA(directory, "pgbroker test CA")
    other = TestCA(directory, "untrusted CA")
    return {
        "ca": ca,
        "other": other,
        "broker": ca.issue("broker", ["localhost", "127.0.0.1"]),
        # For localhost only: connecting to 127.0.0.1 is then a host name mismatch.
        "postgres": ca.issue("postgres", ["localhost"]),
        "client": ca.issue("lambda-client", ["client"], client=True),
        "rogue_client": other.issue("rogue", ["client"], client=True),
    }


@pytest.fixture(scope="module")
def tls_broker(postgres: Any, pki: dict[str, Any]) -> Iterator[InProcessBroker]:
    with InProcessBroker(
        postgres.dsn, tls_cert=pki["broker"].cert_file, tls_key=pki["broker"].key_file
    ) as broker:
        yield broker


def test_client_that_trusts_the_ca_queries_over_tls(tls_broker: InProcessBroker, pki: dict) -> None:
    client = BrokerClient(
        tls_broker.target, tls=True, root_certificates=pki["ca"].cert_pem, auth=lambda: ()
    )
    try:
        assert client.query("SELECT 21 * 2").scalar() == 42
    finally:
        client.close()


def test_client_that_does_not_trust_the_ca_fails_cleanly(
    tls_broker: InProcessBroker, pki: dict
) -> None:
    client = BrokerClient(
        tls_broker.target,
        tls=True,
        root_certificates=pki["other"].cert_pem,
        timeout=1,
        max_attempts=1,
        auth=lambda: (),
    )
    try:
        # The handshake never completes: the call ends at its deadline (the client waits for
        # a ready channel) with an error, never a hang or a plaintext fallback.
        with pytest.raises((Unavailable, DeadlineExceeded)) as caught:
            client.query("SELECT 1")
    finally:
        client.close()
    assert caught.value.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


def test_plaintext_client_cannot_talk_to_a_tls_broker(tls_broker: InProcessBroker) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        tls_broker.stub().Execute(request("SELECT 1"), timeout=3)
    assert caught.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


@pytest.fixture(scope="module")
def mtls_broker(postgres: Any, pki: dict[str, Any]) -> Iterator[InProcessBroker]:
    with InProcessBroker(
        postgres.dsn,
        tls_cert=pki["broker"].cert_file,
        tls_key=pki["broker"].key_file,
        tls_client_ca=pki["ca"].cert_file,
    ) as broker:
        yield broker


def _mtls_call(
    broker: InProcessBroker, pki: dict[str, Any], client_cert: Any
) -> pb.ExecuteResponse:
    credentials = grpc.ssl_channel_credentials(
        root_certificates=pki["ca"].cert_pem,
        private_key=client_cert.key_pem if client_cert else None,
        certificate_chain=client_cert.cert_pem if client_cert else None,
    )
    return broker.stub(credentials).Execute(request("SELECT 1"), timeout=5)


def test_mtls_admits_a_client_certificate_from_the_client_ca(
    mtls_broker: InProcessBroker, pki: dict
) -> None:
    assert rows(_mtls_call(mtls_broker, pki, pki["client"]).results[0]) == [(1,)]


@pytest.mark.parametrize("which", [None, "rogue_client"])
def test_mtls_refuses_clients_without_a_trusted_certificate(
    mtls_broker: InProcessBroker, pki: dict, which: str | None
) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        _mtls_call(mtls_broker, pki, pki[which] if which else None)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE


def test_mtls_client_certificate_from_the_environment(
    mtls_broker: InProcessBroker, pki: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PGBROKER_TLS_CLIENT_CERT_FILE", pki["client"].cert_file)
    monkeypatch.setenv("PGBROKER_TLS_CLIENT_KEY_FILE", pki["client"].key_file)
    client = BrokerClient(
        mtls_broker.target, tls=True, root_certificates=pki["ca"].cert_pem, auth=lambda: ()
    )
    try:
        assert client.query("SELECT 'mtls'").scalar() == "mtls"
    finally:
        client.close()


def test_unreadable_tls_files_refuse_to_start_naming_the_variable(
    postgres: Any, tmp_path: Path
) -> None:
    missing = str(tmp_path / "missing.pem")
    with pytest.raises(ValueError, match="PGBROKER_TLS_CERT"):
        InProcessBroker(postgres.dsn, tls_cert=missing, tls_key=missing)
    with pytest.raises(ValueError, match="must be set together"):
        InProcessBroker(postgres.dsn, tls_cert=missing)


# -- broker -> Postgres ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def tls_postgres(pki: dict[str, Any]) -> Iterator[LocalPostgres]:
    pair = (pki["postgres"].cert_file, pki["postgres"].key_file)
    with LocalPostgres(max_connections=20, ssl=pair) as server:
        yield server


def _dsn(server: LocalPostgres, host: str, query: str) -> str:
    return f"postgresql://{server.user}@{host}:{server.port}/{server.database}?{query}"


def test_broker_verifies_postgres_with_verify_full(tls_postgres: LocalPostgres, pki: dict) -> None:
    dsn = _dsn(tls_postgres, "localhost", f"sslmode=verify-full&sslrootcert={pki['ca'].cert_file}")
    with InProcessBroker(dsn) as broker:
        reply = broker.stub().Execute(
            request("SELECT ssl, version FROM pg_stat_ssl WHERE pid = pg_backend_pid()"),
            timeout=10,
        )
    encrypted, version = rows(reply.results[0])[0]
    assert encrypted is True
    assert version.startswith("TLS")


def test_broker_refuses_postgres_signed_by_another_ca(
    tls_postgres: LocalPostgres, pki: dict
) -> None:
    query = f"sslmode=verify-full&sslrootcert={pki['other'].cert_file}"
    dsn = _dsn(tls_postgres, "localhost", query)
    with pytest.raises(PoolUnavailable) as caught:
        InProcessBroker(dsn, connect_timeout=1)
    assert "certificate verify failed" in str(caught.value)
    assert "password" not in str(caught.value).lower()


def test_verify_full_refuses_a_certificate_for_another_host(
    tls_postgres: LocalPostgres, pki: dict
) -> None:
    ca = pki["ca"].cert_file
    with pytest.raises(PoolUnavailable) as caught:
        InProcessBroker(
            _dsn(tls_postgres, "127.0.0.1", f"sslmode=verify-full&sslrootcert={ca}"),
            connect_timeout=1,
        )
    assert "certificate verify failed" in str(caught.value)
    assert "127.0.0.1" in str(caught.value)
    # verify-ca checks the chain only, so the same server is accepted under that name.
    with InProcessBroker(
        _dsn(tls_postgres, "127.0.0.1", f"sslmode=verify-ca&sslrootcert={ca}")
    ) as broker:
        reply = broker.stub().Execute(request("SELECT 1"), timeout=10)
    assert rows(reply.results[0]) == [(1,)]


def test_sslmode_require_still_encrypts_without_verifying(tls_postgres: LocalPostgres) -> None:
    with InProcessBroker(_dsn(tls_postgres, "127.0.0.1", "sslmode=require")) as broker:
        reply = broker.stub().Execute(
            request("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()"), timeout=10
        )
    assert rows(reply.results[0]) == [(True,)]


def _broker_command(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """``python -m broker ARGS`` with only *env* (and PATH) in its environment."""
    return subprocess.run(
        [sys.executable, "-m", "broker", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **env},
    )


def test_health_and_stats_commands_speak_tls(tls_broker: InProcessBroker, pki: dict) -> None:
    env = {
        "PGBROKER_TLS_CERT": pki["broker"].cert_file,
        "PGBROKER_TLS_CA_FILE": pki["ca"].cert_file,
    }
    for command in ("health", "stats"):
        proc = _broker_command(env, command, "--target", tls_broker.target)
        assert proc.returncode == 0, (command, proc.stdout, proc.stderr)
    assert "pool_size" in proc.stdout


def test_tls_variables_may_hold_the_pem_itself(postgres: Any, pki: dict) -> None:
    """ECS puts a Secrets Manager value in the environment, not in a file (template.yaml's
    BrokerTlsSecretArn): the broker and its health/stats commands take the PEM text."""
    cert, key = pki["broker"].cert_pem.decode(), pki["broker"].key_pem.decode()
    with InProcessBroker(postgres.dsn, tls_cert=cert, tls_key=key) as broker:
        client = BrokerClient(
            broker.target, tls=True, root_certificates=pki["ca"].cert_pem, auth=lambda: ()
        )
        try:
            assert client.query("SELECT 'inline'").scalar() == "inline"
        finally:
            client.close()
        env = {"PGBROKER_TLS_CERT": cert, "PGBROKER_TLS_CA_FILE": pki["ca"].cert_pem.decode()}
        proc = _broker_command(env, "health", "--target", broker.target)
        assert (proc.returncode, proc.stdout.strip()) == (0, "SERVING"), proc.stderr


def test_health_with_an_unreadable_tls_file_says_which_variable(tmp_path: Path) -> None:
    env = {"PGBROKER_TLS_CERT": str(tmp_path / "missing.pem")}
    proc = _broker_command(env, "health", "--target", "127.0.0.1:1")
    assert proc.returncode == 1
    assert proc.stderr.strip().startswith("pgbroker: PGBROKER_TLS_CERT=")
    assert "Traceback" not in proc.stderr
