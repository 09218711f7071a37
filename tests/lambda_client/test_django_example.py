"""The Django example (examples/django_lambda) under Zappa's handler, through a real broker.

It runs in a child process, as Lambda runs it: its own settings module (Django is configured
once per process, and test_django_backend configures this one), ``PGBROKER_URL`` as the only
database setting, API Gateway events to ``zappa.handler.lambda_handler``, and Zappa's async
tasks delivered to the same handler in threads (`demo.django_app.LocalTaskInvoke`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from devtools.brokerproc import BrokerProcess
from tests.support import connect

pytest.importorskip("zappa")

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = r"""
import json
from demo import django_app
from devtools.lambda_context import FakeLambdaContext

handler = django_app.load_handler()  # the settings read PGBROKER_URL
django_app.migrate(handler)  # Zappa's manage event, through the broker

from django.db import connections
out = {"engine": connections["default"].settings_dict["ENGINE"],
       "vendor": connections["default"].vendor}
event = django_app.api_gateway_event
out["counts"] = [
    django_app.invoke(handler, event("POST", "/clicks/one"), FakeLambdaContext())["clicks"]
    for _ in range(5)
]
try:
    django_app.invoke(handler, event("GET", "/clicks/one"), FakeLambdaContext())
except django_app.RequestFailed as exc:
    out["get"] = exc.report
context = FakeLambdaContext()
out["fanout_request_id"] = context.aws_request_id
with django_app.LocalTaskInvoke(handler).installed() as tasks:
    out["fanout"] = django_app.invoke(
        handler, event("POST", "/clicks/fan/fanout", {"n": "40"}), context
    )
    out["task_failures"] = [repr(e) for e in tasks.wait(120)]
    out["tasks"] = len(tasks.threads)
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def example_broker(postgres: Any) -> Iterator[BrokerProcess]:
    with BrokerProcess(
        postgres.dsn + "?sslmode=disable", log_level="INFO", pool_size=3, auth="none"
    ) as process:
        yield process


def run_example(broker: BrokerProcess) -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PGBROKER_", "DJANGO_"))}
    env.update(PYTHONPATH=str(ROOT), PGBROKER_URL=broker.target)
    env.pop("AWS_LAMBDA_FUNCTION_NAME", None)
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=240, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


@pytest.mark.slow
def test_django_example_serves_requests_and_async_tasks_through_the_broker(
    example_broker: BrokerProcess, postgres: Any
) -> None:
    admin = connect(postgres)
    try:
        admin.run("DROP TABLE IF EXISTS clicks_click, clicks_tally CASCADE")
        if admin.run("SELECT to_regclass('django_migrations') IS NOT NULL")[0][0]:
            admin.run("DELETE FROM django_migrations WHERE app = 'clicks'")
        out = run_example(example_broker)

        assert out["engine"] == "lambda_client.django" and out["vendor"] == "postgresql"
        assert out["counts"] == [1, 2, 3, 4, 5]
        assert out["get"] == "HTTP 405"  # require_POST: an answer, not a failure of the app
        assert out["fanout"] == {"name": "fan", "queued": 40}
        assert out["tasks"] == 40 and out["task_failures"] == []
        # Each task, its own invocation, counted once and recorded its id.
        [[clicks]] = admin.run("SELECT clicks FROM clicks_tally WHERE name = 'fan'")
        assert clicks == 40
        ids = [
            row[0]
            for row in admin.run(
                "SELECT c.request_id FROM clicks_click c JOIN clicks_tally t "
                "ON t.id = c.tally_id WHERE t.name = 'fan'"
            )
        ]
        prefix = out["fanout_request_id"] + "/"
        assert sorted(ids) == sorted(f"{prefix}{i}" for i in range(40))
        # The tables came from the migration, run through the broker.
        [[applied]] = admin.run(
            "SELECT count(*) FROM django_migrations WHERE app = 'clicks' AND name = '0001_initial'"
        )
        assert applied == 1
    finally:
        admin.close()
