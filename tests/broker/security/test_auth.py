"""Caller authentication: iam (signed GetCallerIdentity checked by moto's STS), token, none.

Each test serves a real grpc.aio server on 127.0.0.1:0 with a small Broker servicer that
reports the identity it sees (``command_tag``), registered behind `AuthGate` as the broker's
server registers its own, plus the standard health service, and calls it through a real
channel.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import json
import logging
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from broker.config import ConfigError, load_settings
from broker.front.server import SERVICE_NAME, broker_method_handlers
from broker.security.auth import authenticator_for_settings
from broker.security.gate import AuthGate, LogBudget
from broker.security.iam import IamAuth
from broker.security.identity import AuthStats, NoAuth, current_identity
from broker.security.tokens import TokenAuth, parse_tokens, secret_loader
from lambda_client import auth as client_auth
from lambda_client._proto.pgbroker.v1 import broker_pb2 as pb
from lambda_client._proto.pgbroker.v1 import broker_pb2_grpc as pb_grpc
from tests.fixtures.aws import REGION, MotoAws
from tests.support import ExecuteOnly, status_of

DATABASE_URL = {"PGBROKER_DATABASE_URL": "postgresql://app@db.internal/app"}

AUDIENCE = "dns:///broker.pgbroker.local:50051"


class IdentityEcho(ExecuteOnly):
    """Answers Execute with the caller identity the gate set."""

    async def Execute(self, request: pb.ExecuteRequest, context: Any) -> pb.ExecuteResponse:
        identity = current_identity.get()
        return pb.ExecuteResponse(results=[pb.StatementResult(command_tag=str(identity))])


@asynccontextmanager
async def serve(authenticator: Any, stats: AuthStats | None = None) -> AsyncIterator[str]:
    # A log budget window no test outlasts, so what is logged does not depend on speed.
    budget = LogBudget(per_window=20, window=3600)
    gate = AuthGate(authenticator, stats, log_budget=budget)
    server = grpc.aio.server()
    gate.add_service(server, SERVICE_NAME, broker_method_handlers(IdentityEcho()))
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await server.stop(None)


async def call(target: str, metadata: Sequence[tuple[str, str]] = ()) -> str:
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.BrokerStub(channel)
        response = await stub.Execute(
            pb.ExecuteRequest(statements=[pb.Statement(sql="SELECT 1")]),
            metadata=tuple(metadata),
            timeout=10,
        )
        return response.results[0].command_tag


async def refused(target: str, metadata: Sequence[tuple[str, str]] = ()) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call(target, metadata)
    return caught.value


def error_reason(error: grpc.aio.AioRpcError) -> str | None:
    return status_of(error).reason


def iam_metadata(moto_aws: MotoAws, role: str = "app-role", **kwargs: Any) -> list[tuple[str, str]]:
    signer = client_auth.IamAuth(
        kwargs.pop("audience", AUDIENCE),
        sts_endpoint=kwargs.pop("sts_endpoint", moto_aws.url),
        region=REGION,
        credentials=kwargs.pop("credentials", moto_aws.role_credentials.get(role)),
        **kwargs,
    )
    return list(signer())


def iam_auth(moto_aws: MotoAws, stats: AuthStats | None = None, **kwargs: Any) -> IamAuth:
    return IamAuth(
        sts_endpoint=moto_aws.url,
        audience=AUDIENCE,
        allowed_roles=kwargs.pop("allowed_roles", ["app-role", "arn:aws:iam::*:role/report*"]),
        stats=stats or AuthStats(),
        **kwargs,
    )


def edit_token(metadata: list[tuple[str, str]], edit: Any) -> list[tuple[str, str]]:
    """Decode the AWS4-STS token, let *edit* change the dict, re-encode."""
    scheme, token = metadata[0][1].split(" ", 1)
    data = json.loads(base64.b64decode(token))
    edit(data)
    return [("authorization", f"{scheme} {base64.b64encode(json.dumps(data).encode()).decode()}")]


def run(coro: Any) -> Any:
    return asyncio.run(coro)


# ------------------------------------------------------------------------------------ iam


def test_iam_caller_with_allowed_role_is_admitted_as_that_role(moto_aws: MotoAws) -> None:
    async def scenario() -> str:
        async with serve(iam_auth(moto_aws)) as target:
            return await call(target, iam_metadata(moto_aws))

    assert run(scenario()) == "arn:aws:sts::123456789012:assumed-role/app-role/fn-1"


def test_iam_role_allowed_by_arn_pattern_is_admitted(moto_aws: MotoAws) -> None:
    async def scenario() -> str:
        async with serve(iam_auth(moto_aws)) as target:
            return await call(target, iam_metadata(moto_aws, "reporting-role"))

    assert "assumed-role/reporting-role/" in run(scenario())


def test_sts_is_called_once_for_many_requests_with_one_token(moto_aws: MotoAws) -> None:
    stats = AuthStats()
    metadata = iam_metadata(moto_aws)

    async def scenario() -> list[str]:
        async with serve(iam_auth(moto_aws, stats)) as target:
            burst = await asyncio.gather(*(call(target, metadata) for _ in range(20)))
            then = [await call(target, metadata) for _ in range(10)]
            return [*burst, *then]

    identities = run(scenario())
    assert len(identities) == 30
    assert set(identities) == {"arn:aws:sts::123456789012:assumed-role/app-role/fn-1"}
    assert stats.auth_sts_calls == 1
    assert stats.auth_failures == 0


def test_iam_role_not_allowed_is_permission_denied_naming_the_arn(moto_aws: MotoAws) -> None:
    stats = AuthStats()

    async def scenario() -> grpc.aio.AioRpcError:
        async with serve(iam_auth(moto_aws, stats)) as target:
            return await refused(target, iam_metadata(moto_aws, "batch-role"))

    error = run(scenario())
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    assert error_reason(error) == "PERMISSION_DENIED"
    assert "assumed-role/batch-role/fn-1" in (error.details() or "")
    assert stats.auth_failures == 1


def test_iam_user_is_refused_unless_its_arn_is_allowed(moto_aws: MotoAws) -> None:
    user_metadata = iam_metadata(moto_aws, credentials=moto_aws.user_credentials)

    async def scenario() -> tuple[grpc.aio.AioRpcError, str]:
        async with serve(iam_auth(moto_aws)) as target:
            denied = await refused(target, user_metadata)
        allow_user = iam_auth(moto_aws, allowed_roles=["arn:aws:iam::123456789012:user/admin"])
        async with serve(allow_user) as target:
            return denied, await call(target, user_metadata)

    denied, admitted = run(scenario())
    assert denied.code() == grpc.StatusCode.PERMISSION_DENIED
    assert admitted == "arn:aws:iam::123456789012:user/admin"


def test_tampered_signature_is_unauthenticated(moto_aws: MotoAws) -> None:
    def flip_signature(data: dict[str, Any]) -> None:
        header = data["headers"]["Authorization"]
        head, signature = header.rsplit("Signature=", 1)
        data["headers"]["Authorization"] = head + "Signature=" + signature[::-1]

    metadata = edit_token(iam_metadata(moto_aws), flip_signature)
    error = run(_refused_by_iam(moto_aws, metadata))
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "SignatureDoesNotMatch" in (error.details() or "")
    assert error_reason(error) == "UNAUTHENTICATED"


def test_audience_rewritten_after_signing_fails_the_signature(moto_aws: MotoAws) -> None:
    metadata = iam_metadata(moto_aws, audience="dns:///another-broker:50051")
    rewritten = edit_token(
        metadata, lambda d: d["headers"].update({"x-pgbroker-audience": AUDIENCE})
    )
    error = run(_refused_by_iam(moto_aws, rewritten))
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "SignatureDoesNotMatch" in (error.details() or "")


def test_token_for_another_audience_is_unauthenticated(moto_aws: MotoAws) -> None:
    stats = AuthStats()
    metadata = iam_metadata(moto_aws, audience="dns:///another-broker:50051")
    error = run(_refused_by_iam(moto_aws, metadata, stats))
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "another audience" in (error.details() or "")
    assert stats.auth_sts_calls == 0  # refused before STS is asked


def test_audience_header_that_is_not_signed_is_refused(moto_aws: MotoAws) -> None:
    def unsign_audience(data: dict[str, Any]) -> None:
        header = data["headers"]["Authorization"]
        data["headers"]["Authorization"] = header.replace(";x-pgbroker-audience", "")

    error = run(_refused_by_iam(moto_aws, edit_token(iam_metadata(moto_aws), unsign_audience)))
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "must sign x-pgbroker-audience" in (error.details() or "")


def test_stale_signature_date_is_unauthenticated(moto_aws: MotoAws) -> None:
    sixteen_minutes_ago = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=16)
    stats = AuthStats()
    metadata = iam_metadata(moto_aws, utcnow=lambda: sixteen_minutes_ago)
    error = run(_refused_by_iam(moto_aws, metadata, stats))
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "expired" in (error.details() or "")
    assert stats.auth_sts_calls == 0


def test_signature_dated_in_the_future_is_unauthenticated(moto_aws: MotoAws) -> None:
    later = dt.datetime.now(dt.UTC) + dt.timedelta(minutes=30)
    error = run(_refused_by_iam(moto_aws, iam_metadata(moto_aws, utcnow=lambda: later)))
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "future" in (error.details() or "")


def test_cached_identity_expires_with_the_token(moto_aws: MotoAws) -> None:
    now = [0.0]
    metadata = iam_metadata(moto_aws)

    async def scenario() -> grpc.aio.AioRpcError:
        import time

        now[0] = time.time()
        auth = iam_auth(moto_aws, clock=lambda: now[0])
        async with serve(auth) as target:
            await call(target, metadata)
            now[0] += 16 * 60  # the same token, 16 minutes later
            return await refused(target, metadata)

    error = run(scenario())
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "expired" in (error.details() or "")


def test_unknown_access_key_is_unauthenticated(moto_aws: MotoAws) -> None:
    from botocore.credentials import Credentials

    forged = Credentials("AKIAIOSFODNN7FORGED1", "not-a-real-secret-key")
    error = run(_refused_by_iam(moto_aws, iam_metadata(moto_aws, credentials=forged)))
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "InvalidClientTokenId" in (error.details() or "")


def test_token_signed_for_another_sts_host_is_refused_before_forwarding(
    moto_aws: MotoAws,
) -> None:
    stats = AuthStats()
    metadata = iam_metadata(moto_aws, sts_endpoint="https://sts.evil.example/")
    error = run(_refused_by_iam(moto_aws, metadata, stats))
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "PGBROKER_STS_ENDPOINT" in (error.details() or "")
    assert stats.auth_sts_calls == 0


def test_token_signing_another_sts_action_is_refused(moto_aws: MotoAws) -> None:
    metadata = edit_token(
        iam_metadata(moto_aws),
        lambda d: d.update(body="Action=AssumeRole&Version=2011-06-15&RoleArn=x"),
    )
    error = run(_refused_by_iam(moto_aws, metadata))
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "GetCallerIdentity" in (error.details() or "")


@pytest.mark.parametrize(
    ("metadata", "expected"),
    [
        ([], "missing 'authorization' metadata"),
        ([("authorization", "")], "missing 'authorization' metadata"),
        ([("authorization", "AWS4-STS")], "must be 'AWS4-STS <token>'"),
        ([("authorization", "Bearer abcdefabcdefabcdef")], "must be 'AWS4-STS <token>'"),
        ([("authorization", "AWS4-STS !!!not base64!!!")], "malformed AWS4-STS token"),
        ([("authorization", "AWS4-STS " + base64.b64encode(b"not json").decode())], "malformed"),
        ([("authorization", "AWS4-STS " + base64.b64encode(b"[1, 2]").decode())], "malformed"),
        (
            [("authorization", "AWS4-STS " + base64.b64encode(b'{"headers": {}}').decode())],
            "malformed",
        ),
        (
            [
                (
                    "authorization",
                    "AWS4-STS "
                    + base64.b64encode(
                        json.dumps(
                            {"headers": {}, "body": "Action=GetCallerIdentity&Version=2011-06-15"}
                        ).encode()
                    ).decode(),
                )
            ],
            "no SigV4 signature",
        ),
        ([("authorization", "AWS4-STS " + "A" * 7000)], "too large"),
    ],
)
def test_missing_or_garbled_metadata_is_unauthenticated(
    moto_aws: MotoAws, metadata: list[tuple[str, str]], expected: str
) -> None:
    stats = AuthStats()
    error = run(_refused_by_iam(moto_aws, metadata, stats))
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    assert expected in (error.details() or "")
    assert stats.auth_sts_calls == 0
    assert stats.auth_failures == 1


def test_refusals_are_logged_with_reason_and_arn_but_never_the_token(
    moto_aws: MotoAws, caplog: pytest.LogCaptureFixture
) -> None:
    denied = iam_metadata(moto_aws, "batch-role")
    caplog.set_level(logging.INFO, logger="pgbroker.auth")
    run(_refused_by_iam(moto_aws, denied))
    token = denied[0][1].split(" ", 1)[1]
    assert "assumed-role/batch-role/fn-1" in caplog.text
    assert "not allowed" in caplog.text
    assert token[:40] not in caplog.text
    secret = moto_aws.role_credentials["batch-role"]
    assert secret.secret_key not in caplog.text
    assert secret.token[:40] not in caplog.text


def test_health_checks_need_no_credentials(moto_aws: MotoAws) -> None:
    async def scenario() -> int:
        async with (
            serve(iam_auth(moto_aws)) as target,
            grpc.aio.insecure_channel(target) as channel,
        ):
            stub = health_pb2_grpc.HealthStub(channel)
            response = await stub.Check(health_pb2.HealthCheckRequest(), timeout=5)
            return int(response.status)

    assert run(scenario()) == health_pb2.HealthCheckResponse.SERVING


def test_client_reuses_its_proof_until_refresh_is_due(moto_aws: MotoAws) -> None:
    now = [1000.0]
    signer = client_auth.IamAuth(
        AUDIENCE,
        sts_endpoint=moto_aws.url,
        region=REGION,
        credentials=moto_aws.role_credentials["app-role"],
        refresh_after=300,
        clock=lambda: now[0],
    )
    first = signer()
    now[0] += 299
    assert signer() is first
    now[0] += 2
    assert signer() is not first


async def _refused_by_iam(
    moto_aws: MotoAws, metadata: Sequence[tuple[str, str]], stats: AuthStats | None = None
) -> grpc.aio.AioRpcError:
    stats = stats or AuthStats()
    async with serve(iam_auth(moto_aws, stats), stats) as target:
        return await refused(target, metadata)


# ---------------------------------------------------------------------------------- token

OLD_TOKEN = "old-token-0123456789abcdef"
NEW_TOKEN = "new-token-fedcba9876543210"


def test_both_tokens_are_admitted_during_a_rotation() -> None:
    tokens = parse_tokens(f"app:{OLD_TOKEN}, app:{NEW_TOKEN}")

    async def scenario() -> tuple[str, str, grpc.aio.AioRpcError]:
        async with serve(TokenAuth(tokens)) as target:
            old = await call(target, [("authorization", f"Bearer {OLD_TOKEN}")])
            new = await call(target, [("authorization", f"Bearer {NEW_TOKEN}")])
            bad = await refused(target, [("authorization", "Bearer not-a-known-token-xxxxx")])
            return old, new, bad

    old, new, bad = run(scenario())
    assert old == new == "token:app"
    assert bad.code() == grpc.StatusCode.UNAUTHENTICATED
    assert error_reason(bad) == "UNAUTHENTICATED"


@pytest.mark.parametrize(
    "metadata",
    [
        [],
        [("authorization", OLD_TOKEN)],
        [("authorization", f"Basic {OLD_TOKEN}")],
        [("authorization", f"Bearer {OLD_TOKEN}x")],
        [("authorization", f"Bearer {OLD_TOKEN[:-1]}")],
        [("authorization", "Bearer ")],
    ],
)
def test_missing_wrong_scheme_or_near_miss_tokens_are_unauthenticated(
    metadata: list[tuple[str, str]],
) -> None:
    async def scenario() -> grpc.aio.AioRpcError:
        async with serve(TokenAuth(parse_tokens(OLD_TOKEN))) as target:
            return await refused(target, metadata)

    assert run(scenario()).code() == grpc.StatusCode.UNAUTHENTICATED


def test_tokens_from_secrets_manager_follow_a_rotation_without_restart(
    moto_aws: MotoAws, monkeypatch: pytest.MonkeyPatch
) -> None:
    secrets = moto_aws.client("secretsmanager")
    secret_id = "pgbroker/tokens-rotation"
    secrets.create_secret(Name=secret_id, SecretString=json.dumps({"tokens": [OLD_TOKEN]}))
    monkeypatch.setenv("AWS_ENDPOINT_URL_SECRETS_MANAGER", moto_aws.url)
    monkeypatch.setenv("AWS_DEFAULT_REGION", REGION)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", moto_aws.user_credentials.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", moto_aws.user_credentials.secret_key)
    auth = TokenAuth(load_secret=secret_loader(secret_id), min_reload_interval=0)

    async def scenario() -> tuple[str, str, str]:
        async with serve(auth) as target:
            before = await call(target, [("authorization", f"Bearer {OLD_TOKEN}")])
            await asyncio.to_thread(
                secrets.put_secret_value,
                SecretId=secret_id,
                SecretString=json.dumps({"tokens": [OLD_TOKEN, NEW_TOKEN]}),
            )
            during = await call(target, [("authorization", f"Bearer {NEW_TOKEN}")])
            still = await call(target, [("authorization", f"Bearer {OLD_TOKEN}")])
            return before, during, still

    assert run(scenario()) == ("token:token", "token:token", "token:token")


def test_tokens_shorter_than_16_characters_are_refused_at_start() -> None:
    with pytest.raises(ValueError, match="at least 16"):
        parse_tokens("short")
    with pytest.raises(ConfigError, match="PGBROKER_TOKENS"):
        load_settings(environ={**DATABASE_URL, "PGBROKER_AUTH": "token", "PGBROKER_TOKENS": "a,b"})


# ----------------------------------------------------------------------------------- none


def test_none_mode_admits_anonymous_on_loopback() -> None:
    async def scenario() -> str:
        async with serve(NoAuth()) as target:
            return await call(target)

    assert run(scenario()) == "none:anonymous"


def _settings_with_none_auth(listen: str) -> Any:
    flags = {"database_url": "postgresql://app@127.0.0.1:5432/db", "listen": listen}
    return load_settings(flags, environ={"PGBROKER_AUTH": "none"})


@pytest.mark.parametrize(
    "listen", ["0.0.0.0:50051", "[::]:50051", "10.0.0.5:50051", "broker.internal:50051"]
)
def test_none_mode_is_refused_on_a_non_loopback_address(listen: str) -> None:
    with pytest.raises(ConfigError) as refused:
        _settings_with_none_auth(listen)
    [problem] = refused.value.problems
    assert "loopback" in problem
    assert "\n" not in problem


@pytest.mark.parametrize(
    "listen", ["127.0.0.1:50051", "[::1]:50051", "localhost:50051", "127.0.0.2:50051"]
)
def test_none_mode_is_allowed_on_loopback(listen: str) -> None:
    assert _settings_with_none_auth(listen).auth == "none"


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({}, "PGBROKER_AUTH_AUDIENCE"),
        ({"PGBROKER_AUTH_AUDIENCE": "a"}, "PGBROKER_IAM_ALLOWED_ROLES"),
        ({"PGBROKER_AUTH_AUDIENCE": "a", "PGBROKER_IAM_ALLOWED_ROLES": "r"}, "AWS_REGION"),
    ],
)
def test_iam_mode_without_its_settings_refuses_to_start(
    environ: dict[str, str], expected: str
) -> None:
    with pytest.raises(ConfigError, match=expected):
        load_settings(environ={**DATABASE_URL, "PGBROKER_AUTH": "iam", **environ})


def test_iam_mode_takes_the_sts_endpoint_from_the_region() -> None:
    environ = {"PGBROKER_AUTH_AUDIENCE": "a", "PGBROKER_IAM_ALLOWED_ROLES": "r"}
    settings = load_settings(
        environ={**DATABASE_URL, "PGBROKER_AUTH": "iam", "AWS_REGION": REGION, **environ}
    )
    auth = authenticator_for_settings(settings)
    assert isinstance(auth, IamAuth)
    assert auth.sts_endpoint == f"https://sts.{REGION}.amazonaws.com/"


def test_unreachable_sts_is_unavailable_with_retry_info_and_not_cached(moto_aws: MotoAws) -> None:
    import socket

    with socket.socket() as probe:  # a loopback port nobody listens on
        probe.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{probe.getsockname()[1]}/"
    stats = AuthStats()
    auth = IamAuth(sts_endpoint=closed, audience=AUDIENCE, allowed_roles=["app-role"], stats=stats)
    metadata = iam_metadata(moto_aws, sts_endpoint=closed)

    async def scenario() -> list[grpc.aio.AioRpcError]:
        async with serve(auth, stats) as target:
            return [await refused(target, metadata) for _ in range(2)]

    errors = run(scenario())
    assert [e.code() for e in errors] == [grpc.StatusCode.UNAVAILABLE] * 2
    assert error_reason(errors[0]) == "AUTH_UNAVAILABLE"
    assert stats.auth_sts_calls == 2  # a transient failure is not remembered


def test_stdlib_signature_matches_botocore() -> None:
    from botocore.auth import SigV4Auth
    from botocore.awsrequest import AWSRequest
    from botocore.credentials import Credentials

    fixed = dt.datetime(2026, 11, 25, 12, 0, 0, tzinfo=dt.UTC)
    creds = Credentials("AKIAIOSFODNN7EXAMPLE", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY", "tok")
    for endpoint in ("https://sts.eu-west-1.amazonaws.com/", "http://127.0.0.1:5000/"):
        signer = client_auth.IamAuth(
            AUDIENCE,
            sts_endpoint=endpoint,
            region="eu-west-1",
            credentials=creds,
            utcnow=lambda: fixed,
        )
        ours = json.loads(base64.b64decode(signer.sign()))["headers"]
        request = AWSRequest(
            method="POST",
            url=endpoint,
            data="Action=GetCallerIdentity&Version=2011-06-15",
            headers={k: v for k, v in ours.items() if k != "Authorization"},
        )
        request.context["timestamp"] = ours["X-Amz-Date"]
        auth = SigV4Auth(creds.get_frozen_credentials(), "sts", "eu-west-1")
        canonical = auth.canonical_request(request)
        expected = auth.signature(auth.string_to_sign(request, canonical), request)
        assert ours["Authorization"].endswith(f"Signature={expected}")


def test_a_flood_of_refusals_is_counted_exactly_but_logged_sparingly(
    caplog: pytest.LogCaptureFixture,
) -> None:
    stats = AuthStats()
    caplog.set_level(logging.INFO, logger="pgbroker.auth")

    async def scenario() -> None:
        async with serve(TokenAuth(parse_tokens(OLD_TOKEN)), stats) as target:
            for _ in range(30):
                await refused(target, [("authorization", "Bearer wrong-token-0123456789")])

    run(scenario())
    assert stats.auth_failures == 30
    assert caplog.text.count("auth refused") == 20
