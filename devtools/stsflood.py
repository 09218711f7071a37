"""Measure a valid IAM caller's first call while forged proofs flood the broker (issue 15, 7).

    .venv/bin/python -m devtools.stsflood [--seconds 8] [--concurrency 150] [--python PATH]
                                          [--hold SECONDS]

Starts moto's STS (``moto_server``, its own process, signature checking on), a local Postgres
and a real broker (``PGBROKER_AUTH=iam``, its own process; ``--python`` runs another
checkout's broker, e.g. ``/work/main/.venv/bin/python`` for the figures before the bounds).
A flood process sends well-formed proofs signed with made-up secrets from 127.0.0.1, each
once, *concurrency* at a time. A valid caller makes first calls (each a new proof, so nothing
is cached) unloaded, then under the flood, through a TCP proxy whose upstream side is bound to
127.0.0.2 (another source address), and once from 127.0.0.1 (the flood's own address).
Prints medians (and when each loaded call started), the broker's ``auth_sts_calls``,
``auth_throttled`` and ``auth_held``, the proofs sent and the broker's RSS.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import multiprocessing
import secrets
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import grpc

from devtools.brokerproc import BrokerProcess
from devtools.localpg import LocalPostgres, free_port
from devtools.tcpproxy import TcpProxy

REGION = "us-east-1"
STARTED = dt.datetime.now(dt.UTC)
AUDIENCE = "dns:///stsflood.pgbroker.local:50051"
TRUST = json.dumps(
    {
        "Version": "2012-10-17",
        "Statement": [{"Effect": "Allow", "Principal": {"AWS": "*"}, "Action": "sts:AssumeRole"}],
    }
)


def start_moto() -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    moto = Path(sys.executable).with_name("moto_server")
    proc = subprocess.Popen(
        [str(moto), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}/"
    for _ in range(200):
        try:
            urllib.request.urlopen(url + "moto-api/", timeout=1).close()
            return proc, url
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError("moto_server did not start")


def role_credentials(url: str) -> Any:
    """Assume app-role (unchecked), then turn moto's signature checking on."""
    import boto3
    from botocore.credentials import Credentials

    setup = dict(
        endpoint_url=url, region_name=REGION, aws_access_key_id="x", aws_secret_access_key="x"
    )
    arn = boto3.client("iam", **setup).create_role(
        RoleName="app-role", AssumeRolePolicyDocument=TRUST
    )["Role"]["Arn"]
    c = boto3.client("sts", **setup).assume_role(RoleArn=arn, RoleSessionName="fn-1")
    c = c["Credentials"]
    reset = urllib.request.Request(
        url + "moto-api/reset-auth",
        data=b"0",
        method="POST",
        headers={"Content-Type": "text/plain"},
    )
    urllib.request.urlopen(reset, timeout=10).close()
    return Credentials(c["AccessKeyId"], c["SecretAccessKey"], c["SessionToken"])


def proof(url: str, credentials: Any, age: float = 0.0) -> tuple[tuple[str, str], ...]:
    """A signed proof dated *age* seconds before the script started (distinct ages: distinct
    tokens, so each is a first call)."""
    from lambda_client import auth as client_auth

    at = STARTED - dt.timedelta(seconds=age)
    signer = client_auth.IamAuth(
        AUDIENCE, sts_endpoint=url, region=REGION, credentials=credentials, utcnow=lambda: at
    )
    return tuple(signer())


def forged(url: str) -> tuple[tuple[str, str], ...]:
    from botocore.credentials import Credentials

    from lambda_client import auth as client_auth

    key = "ASIA" + secrets.token_hex(8).upper()
    credentials = Credentials(key, secrets.token_urlsafe(30), "forged")
    return tuple(
        client_auth.IamAuth(AUDIENCE, sts_endpoint=url, region=REGION, credentials=credentials)()
    )


def first_call(target: str, metadata: tuple[tuple[str, str], ...]) -> tuple[float, str]:
    from lambda_client._proto.pgbroker.v1 import broker_pb2 as pb
    from lambda_client._proto.pgbroker.v1 import broker_pb2_grpc as pb_grpc

    with grpc.insecure_channel(target) as channel:
        grpc.channel_ready_future(channel).result(timeout=10)
        stub = pb_grpc.BrokerStub(channel)
        started = time.perf_counter()
        try:
            stub.Execute(
                pb.ExecuteRequest(statements=[pb.Statement(sql="SELECT 1")]),
                metadata=metadata,
                timeout=30,
            )
            code = "OK"
        except grpc.RpcError as exc:
            code = exc.code().name
        return time.perf_counter() - started, code


def flood(target: str, url: str, seconds: float, concurrency: int, sent: Any, began: Any) -> None:
    """A child process: forged proofs, *concurrency* at a time, for *seconds* (*began*: when
    it started sending, ``time.monotonic``, the same clock in every process)."""
    from lambda_client._proto.pgbroker.v1 import broker_pb2 as pb
    from lambda_client._proto.pgbroker.v1 import broker_pb2_grpc as pb_grpc

    async def run() -> None:
        began.value = time.monotonic()
        end = began.value + seconds
        async with grpc.aio.insecure_channel(target) as channel:
            stub = pb_grpc.BrokerStub(channel)

            async def one() -> None:
                while time.monotonic() < end:
                    with sent.get_lock():
                        sent.value += 1
                    with contextlib.suppress(grpc.aio.AioRpcError):
                        await stub.Execute(pb.ExecuteRequest(), metadata=forged(url), timeout=30)

            await asyncio.gather(*(one() for _ in range(concurrency)))

    asyncio.run(run())


def stats(target: str) -> dict[str, int]:
    from lambda_client._proto.pgbroker.v1 import broker_pb2 as pb
    from lambda_client._proto.pgbroker.v1 import broker_pb2_grpc as pb_grpc

    with grpc.insecure_channel(target) as channel:
        # GetStats is authenticated too: use a valid proof (cached after the first).
        return dict(
            pb_grpc.BrokerStub(channel)
            .GetStats(pb.GetStatsRequest(), metadata=STATS_PROOF, timeout=10)
            .stats
        )


STATS_PROOF: tuple[tuple[str, str], ...] = ()


def rss_mib(pid: int | None) -> str:
    """The resident memory of process *pid*, MiB ("?" when unknown: not Linux)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return "?"
    kib = next((line.split()[1] for line in status.splitlines() if line.startswith("VmRSS")), "")
    return f"{int(kib) / 1024:.0f}" if kib else "?"


def main() -> None:
    global STATS_PROOF
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--concurrency", type=int, default=150)
    parser.add_argument("--samples", type=int, default=5)
    parser.add_argument("--python", default=sys.executable)
    parser.add_argument(
        "--hold", help="the broker's PGBROKER_AUTH_REFUSAL_HOLD (0: no hold); its default if unset"
    )
    args = parser.parse_args()
    moto, url = start_moto()
    pg = LocalPostgres().start()
    broker = BrokerProcess(
        pg.dsn + "?sslmode=disable",
        log_level="INFO",
        auth="iam",
        auth_audience=AUDIENCE,
        iam_allowed_roles="app-role",
        sts_endpoint=url,
        pool_size=2,
    )
    # The broker runs from this checkout's directory: keep it off sys.path, so --python's own
    # (editable) broker is the one imported.
    broker.env["PYTHONSAFEPATH"] = "1"
    if args.hold is not None:
        broker.env["PGBROKER_AUTH_REFUSAL_HOLD"] = args.hold
    original_argv = broker.argv
    broker.argv = lambda: [args.python, *original_argv()[1:]]  # type: ignore[method-assign]
    try:
        creds = role_credentials(url)
        broker.start()
        broker.wait_serving()
        STATS_PROOF = proof(url, creds, age=600)
        with TcpProxy(("127.0.0.1", broker.port), source_host="127.0.0.2") as proxy:
            ages = iter(range(1, 500))
            unloaded = [
                first_call(proxy.address, proof(url, creds, next(ages)))
                for _ in range(args.samples)
            ]
            before = stats(broker.target)
            rss_before = rss_mib(broker.pid)
            spawn = multiprocessing.get_context("spawn")
            sent, began = spawn.Value("l", 0), spawn.Value("d", 0.0)
            child = spawn.Process(
                target=flood,
                args=(broker.target, url, args.seconds, args.concurrency, sent, began),
            )
            child.start()
            time.sleep(min(2.0, args.seconds / 4))
            loaded, offsets = [], []
            for _ in range(args.samples):
                offsets.append(round(time.monotonic() - began.value, 2) if began.value else None)
                loaded.append(first_call(proxy.address, proof(url, creds, next(ages))))
                time.sleep(0.2)
            same_source = first_call(broker.target, proof(url, creds, next(ages)))
            rss_loaded = rss_mib(broker.pid)
            child.join()
            after = stats(broker.target)
        median = lambda xs: statistics.median(t for t, _ in xs) * 1000  # noqa: E731
        print(f"broker python: {args.python}; hold: {args.hold or 'default'}")
        print(f"unloaded first call (127.0.0.2): median {median(unloaded):.0f} ms {unloaded}")
        print(f"under flood      (127.0.0.2): median {median(loaded):.0f} ms {loaded}")
        print(f"  started at (s after the flood began): {offsets}")
        print(f"ratio: {median(loaded) / median(unloaded):.2f}x")
        print(f"from the flood's own address (127.0.0.1): {same_source}")
        sts = after.get("auth_sts_calls", 0) - before.get("auth_sts_calls", 0)
        print(
            f"forged proofs sent: {sent.value}; STS calls during the flood: {sts};"
            f" throttled: {after.get('auth_throttled', 'n/a')};"
            f" held: {after.get('auth_held', 'n/a')}"
        )
        print(f"broker RSS: {rss_before} MiB before the flood, {rss_loaded} MiB during it")
    finally:
        broker.close()
        pg.stop()
        moto.terminate()
        moto.wait(10)


if __name__ == "__main__":
    main()
