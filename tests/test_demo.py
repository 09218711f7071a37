"""`make demo` and `make run` end to end: real embedded Postgres, real broker process.

The demo runs small (150 invocations against max_connections 50 and a pool of 5) and the test
reads its ``--json`` summary; it asserts outcomes only, never timings.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lambda_client import BrokerClient

ROOT = Path(__file__).resolve().parent.parent
INVOCATIONS = 150
POOL_SIZE = 5


# Settings that would point the demo elsewhere; PGBROKER_PG_BINDIR/PG_USER stay.
_OVERRIDES = ("PGBROKER_DATABASE_URL", "PGBROKER_URL", "PGBROKER_LISTEN", "PGBROKER_AUTH")


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _OVERRIDES}
    env = {k: v for k, v in env.items() if not k.startswith("PGBROKER_TLS")}
    env["PYTHONPATH"] = str(ROOT)
    return env


@pytest.mark.slow
def test_burst_fails_direct_and_succeeds_through_broker_within_pool(tmp_path: Path) -> None:
    chart = tmp_path / "chart.png"
    proc = subprocess.run(
        [sys.executable, "-m", "demo", "--invocations", str(INVOCATIONS),
         "--max-connections", "50", "--pool-size", str(POOL_SIZE),
         "--json", "--chart", str(chart)],
        cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout)
    direct, broker = summary["phases"]["direct"], summary["phases"]["broker"]

    assert summary["ok"] is True
    assert summary["max_connections"] == 50
    assert direct["failed"] > 0
    assert direct["succeeded"] + direct["failed"] == INVOCATIONS
    assert any("SQLSTATE 53300" in e["message"] for e in direct["errors"]), direct["errors"]
    assert direct["peak_backends"] < 50

    assert broker["failed"] == 0
    assert broker["succeeded"] == INVOCATIONS
    assert 0 < broker["peak_backends"] <= POOL_SIZE

    assert chart.stat().st_size > 0
    assert summary["data_dir"] and not Path(summary["data_dir"]).exists()


def _read_until(proc: subprocess.Popen[str], pattern: str, timeout: float) -> re.Match[str]:
    """Read *proc*'s stdout line by line until *pattern* matches; fail after *timeout*."""
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    seen = []
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line and proc.poll() is not None:
            break
        seen.append(line)
        if match := re.search(pattern, line):
            return match
    raise AssertionError(f"no {pattern!r} in output:\n{''.join(seen)}")


@pytest.mark.slow
def test_make_run_serves_the_example_handler_and_stops_everything_on_sigterm() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "demo.run", "--listen", "127.0.0.1:0", "--pool-size", "2"],
        cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        start_new_session=True,
    )  # fmt: skip
    try:
        target = _read_until(proc, r"serving on (127\.0\.0\.1:\d+)", timeout=60)[1]
        data_dir = _read_until(proc, r"data in (\S+)", timeout=5)[1]
        assert Path(data_dir).is_dir()
        # One query by hand comes first, grpcurl (often not installed) after it.
        _read_until(proc, r"python -m lambda_client", timeout=5)
        _read_until(proc, r"grpcurl", timeout=5)
        by_hand = subprocess.run(
            [sys.executable, "-m", "lambda_client",
             "SELECT id, balance FROM accounts WHERE id = $1::int", "1"],
            cwd=ROOT, env={**_env(), "PGBROKER_URL": target}, capture_output=True,
            text=True, timeout=60, check=True,
        )  # fmt: skip
        assert by_hand.stdout.splitlines()[-1] == "(1 row)", by_hand.stdout
        with BrokerClient(target, tls=False, timeout=10) as client:
            assert client.query("SELECT $1::int + 1", [41]).scalar() == 42
        out = subprocess.run(
            [sys.executable, "-c",
             "from examples.handler import handler;"
             "from devtools.lambda_context import FakeLambdaContext as C;"
             "print(handler({'from': 1, 'to': 2, 'amount': '10.00'}, C())['balances'])"],
            cwd=ROOT, env={**_env(), "PGBROKER_URL": target}, capture_output=True,
            text=True, timeout=60, check=True,
        )  # fmt: skip
        assert "'1': '999990.00'" in out.stdout and "'2': '1000010.00'" in out.stdout
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
    assert not Path(data_dir).exists()


@pytest.mark.slow
def test_django_burst_fails_direct_and_succeeds_through_broker_within_pool(
    tmp_path: Path,
) -> None:
    """`make demo DJANGO=1` small: the example Django app under Zappa's handler, stock
    backend first (Postgres refuses connections), then lambda_client.django via the broker."""
    proc = subprocess.run(
        [sys.executable, "-m", "demo", "--django", "--invocations", str(INVOCATIONS),
         "--max-connections", "50", "--pool-size", str(POOL_SIZE),
         "--json", "--chart", str(tmp_path / "chart.png")],
        cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=180, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout)
    direct, broker = summary["phases"]["direct"], summary["phases"]["broker"]

    assert summary["ok"] is True and summary["app"] == "django"
    assert direct["failed"] > 0
    assert direct["succeeded"] + direct["failed"] == INVOCATIONS
    messages = [e["message"] for e in direct["errors"]]
    # Postgres' own refusals, reported from Django's OperationalError.
    assert all(m.startswith("FATAL: ") for m in messages), messages
    assert any("too many clients" in m or "connection slots are reserved" in m for m in messages), (
        messages
    )

    assert broker["failed"] == 0
    assert broker["succeeded"] == INVOCATIONS
    assert 0 < broker["peak_backends"] <= POOL_SIZE
    # Every request that succeeded, in either phase, counted exactly one click.
    assert broker["clicks_recorded"] == direct["succeeded"] + INVOCATIONS
    assert (tmp_path / "chart.png").stat().st_size > 0
