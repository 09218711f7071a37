"""Client cold start and footprint: `lambda_client` against pg8000, in fresh interpreters.

A fresh interpreter (cwd: the repository) imports a client and runs its first query, once
per sample; the figures are measured inside it with `time.perf_counter` from before the
import, and the process's whole wall time is kept too (``process_ms``). The first-query
scripts take an optional CA file: with it the connection uses TLS and verifies the server's
certificate (as a Lambda connecting to RDS with the CA bundle would); pg8000 without it
still uses TLS, unverified.

`measure(competitor, args, samples)` is what `bench.harness` calls for its cold-start rows:
``pgbroker`` (``import lambda_client`` + first ``query("SELECT 1")`` over a new gRPC channel)
or ``direct`` (``import pg8000`` + a TLS connection + first query).

``python -m bench.coldstart [--samples 10]`` (`compare`) starts a Postgres that serves TLS (a
self-signed certificate for 127.0.0.1, `devtools.certs`) and two brokers in front of it, one
plaintext and one with TLS, then measures, each as the median of *samples* fresh interpreters:

* ``import lambda_client`` (bare: names resolve lazily) and ``from lambda_client import
  BrokerClient`` (what a handler does: gRPC and protobuf load);
* that import + ``BrokerClient(target).query("SELECT 1")`` on a new channel, plaintext and
  with TLS to the broker (the same self-signed certificate, verified);
* the same through the PEP 249 module, as Django and SQLAlchemy use it: ``from lambda_client
  import dbapi``, ``dbapi.connect(target, autocommit=True)`` and a first ``cursor.execute``;
* ``import pg8000.native`` + a TLS connection that verifies the certificate + ``SELECT 1``;

and the installed size of the client layer (``pip install --target`` of
``client/lambda_client/requirements.txt`` plus the package) next to pg8000's.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from devtools.brokerproc import BrokerProcess
from devtools.certs import self_signed_cert
from devtools.localpg import LocalPostgres

ROOT = Path(__file__).resolve().parent.parent
CLIENT = ROOT / "client" / "lambda_client"

_BARE_IMPORT = """
import json, time
t0 = time.perf_counter()
import lambda_client
print(json.dumps({"ms": (time.perf_counter() - t0) * 1000}))
"""

_CLIENT_IMPORT = """
import json, time
t0 = time.perf_counter()
from lambda_client import BrokerClient
print(json.dumps({"ms": (time.perf_counter() - t0) * 1000}))
"""

# argv: target [root certificate file: TLS, verified]
_CLIENT_FIRST_QUERY = """
import json, sys, time
t0 = time.perf_counter()
from lambda_client import BrokerClient
t1 = time.perf_counter()
if len(sys.argv) > 2:
    with open(sys.argv[2], "rb") as f:
        roots = f.read()
    db = BrokerClient(sys.argv[1], tls=True, root_certificates=roots)
else:
    db = BrokerClient(sys.argv[1])
assert db.query("SELECT 1").scalar() == 1
t2 = time.perf_counter()
assert db.query("SELECT 1").scalar() == 1
t3 = time.perf_counter()
print(json.dumps({"import_ms": (t1 - t0) * 1000, "first_query_ms": (t2 - t0) * 1000,
                  "connect_query_ms": (t2 - t1) * 1000,
                  "warm_query_ms": (t3 - t2) * 1000}))
"""

# argv: target [root certificate file: TLS, verified]. What Django and SQLAlchemy do first:
# PEP 249 connect (autocommit, the Lambda default in docs/dbapi.md) and one cursor.execute.
_DBAPI_FIRST_QUERY = """
import json, sys, time
t0 = time.perf_counter()
from lambda_client import dbapi
t1 = time.perf_counter()
if len(sys.argv) > 2:
    with open(sys.argv[2], "rb") as f:
        roots = f.read()
    conn = dbapi.connect(sys.argv[1], autocommit=True, tls=True, root_certificates=roots)
else:
    conn = dbapi.connect(sys.argv[1], autocommit=True)
cur = conn.cursor()
cur.execute("SELECT 1")
assert cur.fetchone() == (1,)
t2 = time.perf_counter()
cur.execute("SELECT 1")
assert cur.fetchone() == (1,)
t3 = time.perf_counter()
print(json.dumps({"import_ms": (t1 - t0) * 1000, "first_query_ms": (t2 - t0) * 1000,
                  "connect_query_ms": (t2 - t1) * 1000,
                  "warm_query_ms": (t3 - t2) * 1000}))
"""

# argv: host port [CA file: verify chain and host (IP SAN); else TLS without verification]
_PG8000_FIRST_QUERY = """
import json, sys, time
t0 = time.perf_counter()
import ssl
import pg8000.native
t1 = time.perf_counter()
if len(sys.argv) > 3:
    context = ssl.create_default_context(cafile=sys.argv[3])
else:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
conn = pg8000.native.Connection("postgres", host=sys.argv[1], port=int(sys.argv[2]),
                                database="postgres", ssl_context=context)
assert conn.run("SELECT 1") == [[1]]
t2 = time.perf_counter()
assert conn.run("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()") == [[True]]
t3 = time.perf_counter()
print(json.dumps({"import_ms": (t1 - t0) * 1000, "first_query_ms": (t2 - t0) * 1000,
                  "connect_query_ms": (t2 - t1) * 1000,
                  "warm_query_ms": (t3 - t2) * 1000}))
"""

_FIRST_QUERY = {
    "pgbroker": _CLIENT_FIRST_QUERY,
    "pgbroker_dbapi": _DBAPI_FIRST_QUERY,
    "direct": _PG8000_FIRST_QUERY,
}


def _fresh(script: str, *args: str) -> dict[str, float]:
    """Run *script* in a new interpreter (cwd: the repository) and return the figures of its
    last output line (JSON) plus ``process_ms``, the process's wall time. Raise RuntimeError
    with its stderr if it fails, `subprocess.TimeoutExpired` after 60 s, ValueError if the
    line is not JSON."""
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


def compile_client() -> None:
    """Write the client's bytecode (``__pycache__``) as ``pip install`` does for a Lambda
    layer, so no sample compiles it: pg8000, grpc and protobuf come with theirs, while a
    source tree with ``PYTHONDONTWRITEBYTECODE`` set (or edited since it was last compiled)
    would make every fresh interpreter compile ``lambda_client`` again."""
    import compileall

    compileall.compile_dir(CLIENT, quiet=1)


def measure(competitor: str, args: list[str], samples: int) -> dict[str, Any]:
    """Median (and min/max) over *samples* fresh processes of *competitor*'s (``pgbroker``,
    ``pgbroker_dbapi`` or ``direct``) first-query script with *args*; errors are counted, not
    raised."""
    script = _FIRST_QUERY[competitor]
    if competitor.startswith("pgbroker"):
        compile_client()
    runs: list[dict[str, float]] = []
    errors: dict[str, int] = {}
    for _ in range(samples):
        try:
            runs.append(_fresh(script, *args))
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


def _medians(runs: list[dict[str, float]]) -> dict[str, float]:
    return {key: round(statistics.median(r[key] for r in runs), 1) for key in runs[0]}


def installed_size(requirements: list[str], extra: Path | None = None) -> int:
    """Bytes that ``pip install --target`` of *requirements* (plus *extra*, a package
    directory copied in) occupies, without ``__pycache__``."""
    with tempfile.TemporaryDirectory(prefix="pgbroker-size-") as target:
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "install",
                "-q",
                "--no-compile",
                "--target",
                target,
                *requirements,
            ],
            check=True,
            capture_output=True,
            timeout=600,
        )
        if extra is not None:
            shutil.copytree(
                extra, Path(target) / extra.name, ignore=shutil.ignore_patterns("__pycache__")
            )
        return sum(
            p.stat().st_size
            for p in Path(target).rglob("*")
            if p.is_file() and "__pycache__" not in p.parts
        )


def compare(samples: int = 10, sizes: bool = True) -> dict[str, Any]:
    """Every figure of ``python -m bench.coldstart`` (module docstring), medians over
    *samples* fresh processes; raise RuntimeError if a sample fails.

    The variants are interleaved (one process of each per round), so a machine whose load
    changes during the run weighs on all of them alike.
    """
    figures: dict[str, Any] = {"samples": samples, "python": sys.version.split()[0]}
    compile_client()
    runs: dict[str, list[dict[str, float]]] = {}
    with contextlib.ExitStack() as stack:
        certdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="pgbroker-cert-")))
        cert, key = self_signed_cert(certdir)
        pg = stack.enter_context(LocalPostgres(ssl=(cert, key)))
        dsn = f"{pg.dsn}?sslmode=require"
        plain = stack.enter_context(BrokerProcess(dsn, pool_size=2, auth="none", log_level="INFO"))
        tls_env = {"PGBROKER_TLS_CERT": cert, "PGBROKER_TLS_KEY": key}
        tls = stack.enter_context(
            BrokerProcess(dsn, pool_size=2, auth="none", log_level="INFO", env=tls_env)
        )
        variants: dict[str, tuple[str, ...]] = {
            "import_lambda_client": (_BARE_IMPORT,),
            "import_broker_client": (_CLIENT_IMPORT,),
            "lambda_client": (_CLIENT_FIRST_QUERY, plain.target),
            "lambda_client_tls": (_CLIENT_FIRST_QUERY, tls.target, cert),
            "dbapi": (_DBAPI_FIRST_QUERY, plain.target),
            "dbapi_tls": (_DBAPI_FIRST_QUERY, tls.target, cert),
            "pg8000_tls": (_PG8000_FIRST_QUERY, pg.host, str(pg.port), cert),
        }
        for _ in range(samples):
            for name, (script, *args) in variants.items():
                runs.setdefault(name, []).append(_fresh(script, *args))
    figures["import_lambda_client_ms"] = _medians(runs.pop("import_lambda_client"))["ms"]
    figures["import_broker_client_ms"] = _medians(runs.pop("import_broker_client"))["ms"]
    figures.update({name: _medians(values) for name, values in runs.items()})
    if sizes:
        requirements = ["-r", str(CLIENT / "requirements.txt")]
        figures["layer_bytes"] = installed_size(requirements, CLIENT)
        figures["pg8000_bytes"] = installed_size(["pg8000"])
    return figures


def render(figures: dict[str, Any]) -> str:
    """A Markdown table of *figures*."""
    names = ["lambda_client", "lambda_client_tls", "dbapi", "dbapi_tls", "pg8000_tls"]
    columns = [figures[name] for name in names if name in figures]
    mib = 1024 * 1024

    def row(label: str, key: str) -> str:
        return f"| {label} | " + " | ".join(f"{c[key]} ms" for c in columns) + " |"

    pg8000_ms = figures["pg8000_tls"]["first_query_ms"]
    lines = [
        f"Median of {figures['samples']} fresh processes, Python {figures['python']}, loopback.",
        "",
        "| measure | lambda_client, plaintext | lambda_client, TLS | lambda_client.dbapi, "
        "plaintext | lambda_client.dbapi, TLS | pg8000, TLS (verified) |",
        "| --- | --- | --- | --- | --- | --- |",
        row("import", "import_ms"),
        row("connect + first query", "connect_query_ms"),
        row("import + connect + first query", "first_query_ms"),
        row("next (warm) query", "warm_query_ms"),
        "",
        "Import + connect + first query as a multiple of pg8000's (issue 14: ≤ 0.6×): "
        + "; ".join(
            f"{name} {figures[name]['first_query_ms'] / pg8000_ms:.2f}×"
            for name in names[:-1]
            if name in figures
        )
        + ".",
        "",
        f"`import lambda_client` alone: {figures['import_lambda_client_ms']} ms; "
        f"`from lambda_client import BrokerClient`: {figures['import_broker_client_ms']} ms.",
    ]
    if "layer_bytes" in figures:
        lines.append(
            f"Installed size: lambda_client + grpcio + protobuf + grpcio-status "
            f"{figures['layer_bytes'] / mib:.1f} MiB; pg8000 with its dependencies "
            f"{figures['pg8000_bytes'] / mib:.1f} MiB."
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=int, default=10)
    parser.add_argument("--no-sizes", action="store_true", help="skip the pip install sizes")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args(argv)
    started = time.monotonic()
    figures = compare(args.samples, sizes=not args.no_sizes)
    figures["elapsed_s"] = round(time.monotonic() - started, 1)
    print(json.dumps(figures, indent=2) if args.json else render(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
