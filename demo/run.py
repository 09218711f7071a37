"""``python -m demo.run`` (``make run`` without a database URL): a broker on an embedded Postgres.

Starts a private Postgres (as the demo does), creates the example's tables, starts
``python -m broker run`` against it (listening on ``127.0.0.1:50051`` unless ``--listen`` is
among the arguments; every argument is passed to the broker), prints how to call it from the
client library and from ``grpcurl``, and waits for Ctrl-C; then stops the broker and Postgres
by process id and removes the data. With ``PGBROKER_DATABASE_URL`` set it uses that database.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import sys
import threading
from types import FrameType

from demo.database import DemoDatabase
from demo.direct import DirectClient
from devtools.brokerproc import BrokerProcess
from examples import handler as example

__all__ = ["instructions", "main"]


def instructions(target: str, database: DemoDatabase, admin_token: str | None = None) -> str:
    """How to call the broker at *target*: one query by hand (``python -m lambda_client``),
    client library, example handler, then grpcurl (often not installed); with *admin_token*
    (this run's operator token), the operator's commands too."""
    q = "'"
    execute = json.dumps(
        {
            "statements": [
                {"sql": "SELECT id, balance FROM accounts WHERE id = $1",
                 "params": [{"int64": "1"}]}
            ]
        }
    )  # fmt: skip
    return f"""
pgbroker is serving on {target} (auth: none, loopback only)
database: {database.describe()}

One query by hand (like psql -c; --json for JSON):
  PGBROKER_URL={target} .venv/bin/python -m lambda_client \
    "SELECT id, balance FROM accounts WHERE id = $1::int" 1

From Python, with the client library:
  PGBROKER_URL={target} .venv/bin/python -c {q}from lambda_client import BrokerClient; \\
print(BrokerClient().query("SELECT now(), $1::text", ["hello"]).one()){q}

The example Lambda handler (tables created, accounts 1..100 funded):
  PGBROKER_URL={target} .venv/bin/python -c {q}from examples.handler import handler; \\
from devtools.lambda_context import FakeLambdaContext; \\
print(handler({{"from": 1, "to": 2, "amount": "10.00"}}, FakeLambdaContext())){q}

From grpcurl, if installed (server reflection is on):
  grpcurl -plaintext {target} list
  grpcurl -plaintext -d {q}{execute}{q} \\
    {target} pgbroker.v1.Broker/Execute
  grpcurl -plaintext {target} pgbroker.v1.Broker/GetStats
  grpcurl -plaintext {target} grpc.health.v1.Health/Check

Pool figures: .venv/bin/python -m broker stats --target {target}
{_operator(target, admin_token)}Press Ctrl-C to stop the broker and Postgres.
"""


def _operator(target: str, admin_token: str | None) -> str:
    if admin_token is None:
        return ""
    return f"""Operator controls (pause, resume, reload; top with callers), with this run's token:
  PGBROKER_ADMIN_TOKEN={admin_token} .venv/bin/python -m broker top --target {target}
"""


def _listen(args: list[str]) -> tuple[str, list[str]]:
    """The ``--listen`` value among *args* (default 127.0.0.1:50051) and the other args."""
    listen = os.environ.get("PGBROKER_LISTEN", "127.0.0.1:50051")
    rest: list[str] = []
    it = iter(args)
    for arg in it:
        if arg == "--listen":
            listen = next(it, listen)
        elif arg.startswith("--listen="):
            listen = arg.split("=", 1)[1]
        else:
            rest.append(arg)
    return listen, rest


def _broker_env(admin_token: str | None) -> dict[str, str]:
    """``PGBROKER_*`` settings from our environment for the broker (the user configures it
    this way too); auth ``none`` unless they say otherwise (it listens on loopback), and an
    operator token made for this run so `pause`, `resume`, `reload` and `top` work at once."""
    env = {k: v for k, v in os.environ.items() if k.startswith("PGBROKER_")}
    if admin_token is not None:
        env["PGBROKER_ADMIN_TOKENS"] = f"operator:{admin_token}"
    return {"PGBROKER_AUTH": "none", **env}


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args and args[0] in ("run", "serve"):
        args = args[1:]
    listen, rest = _listen(args)
    # An operator token for this run only, unless the user configures their own.
    admin_token = None
    if not any(k.startswith("PGBROKER_ADMIN_TOKENS") for k in os.environ):
        admin_token = secrets.token_urlsafe(24)
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    with contextlib.ExitStack() as stack:
        print("starting Postgres ...", file=sys.stderr)
        database = stack.enter_context(
            DemoDatabase(os.environ.get("PGBROKER_DATABASE_URL"), max_connections=100)
        )
        client = DirectClient(database.app_dsn, application_name="pgbroker-run-setup")
        try:
            example.create_schema(client)  # type: ignore[arg-type]
        finally:
            client.close()
        url = database.app_dsn + ("?sslmode=disable" if database.embedded else "")
        broker = BrokerProcess(
            url,
            listen=listen,
            log_level="INFO",
            env=_broker_env(admin_token),
            extra_args=rest,
            echo=sys.stderr,
        )
        try:
            broker.start()
        except RuntimeError as exc:
            print(exc, file=sys.stderr)
            return 1
        stack.callback(broker.close)
        print(instructions(broker.target, database, admin_token), flush=True)
        while not stop.wait(0.5):
            if broker.proc is None or broker.proc.poll() is not None:
                print("the broker exited", file=sys.stderr)
                return 1
        print("stopping the broker and Postgres ...", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
