"""Cold start: a fresh Python process imports a client and runs its first query.

pgbroker: ``import lambda_client`` + first ``query("SELECT 1")`` over a new gRPC channel.
direct: ``import pg8000`` + connect with TLS (a fresh SSL context, as a Lambda builds it) +
first query. Each sample is a new interpreter; the figures are measured inside it with
`time.perf_counter` from before the import, and the process's whole wall time is kept too.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from typing import Any

from bench.procs import ROOT

_PGBROKER = """
import json, sys, time
t0 = time.perf_counter()
from lambda_client import BrokerClient
t1 = time.perf_counter()
client = BrokerClient(sys.argv[1])
client.query("SELECT 1")
t2 = time.perf_counter()
print(json.dumps({"import_ms": (t1 - t0) * 1000, "first_query_ms": (t2 - t0) * 1000}))
"""

_DIRECT_TLS = """
import json, sys, time
t0 = time.perf_counter()
import ssl
import pg8000.native
t1 = time.perf_counter()
context = ssl.create_default_context()
context.check_hostname = False
context.verify_mode = ssl.CERT_NONE  # the benchmark's server has a self-signed certificate
conn = pg8000.native.Connection(
    "postgres", host=sys.argv[1], port=int(sys.argv[2]), database="postgres",
    ssl_context=context,
)
assert conn.run("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")[0][0]
t2 = time.perf_counter()
print(json.dumps({"import_ms": (t1 - t0) * 1000, "first_query_ms": (t2 - t0) * 1000}))
"""


def _sample(script: str, args: list[str]) -> dict[str, float]:
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", script, *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        check=False,
    )
    wall = (time.perf_counter() - started) * 1000
    if done.returncode != 0:
        raise RuntimeError(done.stderr.strip()[-500:])
    figures: dict[str, float] = json.loads(done.stdout.strip().splitlines()[-1])
    figures["process_ms"] = wall
    return figures


def measure(competitor: str, args: list[str], samples: int) -> dict[str, Any]:
    """Median (and min/max) over *samples* fresh processes; errors are counted, not raised."""
    script = _PGBROKER if competitor == "pgbroker" else _DIRECT_TLS
    runs: list[dict[str, float]] = []
    errors: dict[str, int] = {}
    for _ in range(samples):
        try:
            runs.append(_sample(script, args))
        except (RuntimeError, subprocess.TimeoutExpired, ValueError) as exc:
            message = " ".join(str(exc).split())[-160:]
            errors[message] = errors.get(message, 0) + 1
    result: dict[str, Any] = {
        "competitor": competitor,
        "samples": len(runs),
        "errors": sum(errors.values()),
        "error_messages": errors,
    }
    for key in ("import_ms", "first_query_ms", "process_ms"):
        values = [r[key] for r in runs]
        result[key] = {
            "median": round(statistics.median(values), 2) if values else None,
            "min": round(min(values), 2) if values else None,
            "max": round(max(values), 2) if values else None,
        }
    return result
