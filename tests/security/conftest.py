"""Fixtures for the security tests: moto in server mode on loopback, with SigV4 checking on.

moto checks request signatures only once ``INITIAL_NO_AUTH_ACTION_COUNT`` requests have been
served; the fixture creates roles and assumes them first (unchecked), then sets the count to
0 through ``/moto-api/reset-auth`` so every later request — the broker's forwarded
GetCallerIdentity included — must carry a valid signature from credentials moto issued. The
previous count is restored at teardown, since moto's settings are process-wide.
"""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

REGION = "us-east-1"
ACCOUNT = "123456789012"
TRUST_ANYONE = json.dumps(
    {
        "Version": "2012-10-17",
        "Statement": [{"Effect": "Allow", "Principal": {"AWS": "*"}, "Action": "sts:AssumeRole"}],
    }
)


@dataclass
class MotoAws:
    """A running moto server: its URL and credentials of roles assumed in it."""

    url: str
    role_credentials: dict[str, Any]  # role name -> botocore Credentials
    user_credentials: Any  # an IAM user's access key

    def client(self, service: str) -> Any:
        import boto3

        frozen = self.user_credentials
        return boto3.client(
            service,
            endpoint_url=self.url,
            region_name=REGION,
            aws_access_key_id=frozen.access_key,
            aws_secret_access_key=frozen.secret_key,
        )


def _reset_auth(url: str, count: str) -> str:
    request = urllib.request.Request(
        url + "moto-api/reset-auth",
        data=count.encode(),
        method="POST",
        headers={"Content-Type": "text/plain"},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return str(json.load(response)["PREVIOUS_INITIAL_NO_AUTH_ACTION_COUNT"])


@pytest.fixture(scope="session")
def moto_aws() -> Iterator[MotoAws]:
    """moto on 127.0.0.1 with signature checking on; roles app-role, reporting-role and
    batch-role assumed (session name fn-1), and an IAM user ``admin`` with an access key."""
    import boto3
    from botocore.credentials import Credentials
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    url = f"http://{host}:{port}/"
    setup = {
        "endpoint_url": url,
        "region_name": REGION,
        "aws_access_key_id": "setup",
        "aws_secret_access_key": "setup",
    }
    iam = boto3.client("iam", **setup)
    sts = boto3.client("sts", **setup)
    roles = {}
    for name in ("app-role", "reporting-role", "batch-role"):
        arn = iam.create_role(RoleName=name, AssumeRolePolicyDocument=TRUST_ANYONE)["Role"]["Arn"]
        c = sts.assume_role(RoleArn=arn, RoleSessionName="fn-1")["Credentials"]
        roles[name] = Credentials(c["AccessKeyId"], c["SecretAccessKey"], c["SessionToken"])
    iam.create_user(UserName="admin")
    iam.put_user_policy(
        UserName="admin",
        PolicyName="all",
        PolicyDocument=json.dumps(
            {
                "Version": "2012-10-17",
                "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}],
            }
        ),
    )
    key = iam.create_access_key(UserName="admin")["AccessKey"]
    user = Credentials(key["AccessKeyId"], key["SecretAccessKey"])
    previous = _reset_auth(url, "0")
    try:
        yield MotoAws(url=url, role_credentials=roles, user_credentials=user)
    finally:
        _reset_auth(url, previous)
        server.stop()
