"""One large read, its time and peak memory: through pgbroker (``db.stream``) or pg8000 directly.

    python -m bench.stream_memory broker --target 127.0.0.1:50051 --broker-pid 1234 --rows 5000000
    python -m bench.stream_memory pg8000 --dsn postgresql://u@127.0.0.1:5432/db --rows 5000000
    python -m bench.stream_memory compare --rows 5000000   # both, on a private Postgres

Reads ``SELECT g, md5(g::text) FROM generate_series(1, rows)`` (an int and 32 characters a row),
or with ``--bytea-mb N`` N rows of 1 MiB of bytes each (checksummed on both ends). The
resident set size (VmRSS) of this process and, given ``--broker-pid``, of the broker is sampled
every 20 ms; one JSON line reports rows, seconds, and idle and peak RSS in MB of each. pg8000
reads a whole result into memory, which is what the comparison shows.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import threading
import time
import urllib.parse
from typing import Any


def rss_mb(pid: int | str = "self") -> float:
    """VmRSS of *pid* in MB (0 when it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


class Sampler:
    """Peak RSS of this process and *broker_pid*, sampled on a thread."""

    def __init__(self, broker_pid: int | None) -> None:
        self.broker_pid = broker_pid
        self.idle = {"client": rss_mb(), "broker": rss_mb(broker_pid) if broker_pid else 0.0}
        self.peak = dict(self.idle)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self.peak["client"] = max(self.peak["client"], rss_mb())
            if self.broker_pid:
                self.peak["broker"] = max(self.peak["broker"], rss_mb(self.broker_pid))

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def _sql(args: argparse.Namespace) -> str:
    if args.bytea_mb:
        return (
            "SELECT g, b, md5(b) FROM (SELECT g, decode(repeat(md5(g::text), 65536), 'hex')"
            f" AS b FROM generate_series(1, {args.bytea_mb}) g) s"
        )
    return f"SELECT g, md5(g::text) FROM generate_series(1, {args.rows}) g"


def run(args: argparse.Namespace) -> dict[str, Any]:
    sql = _sql(args)
    count = 0
    digest = hashlib.md5()
    mismatches = 0
    started = 0.0
    if args.mode == "broker":
        from lambda_client import BrokerClient

        db = BrokerClient(args.target, timeout=600)
        db.query("SELECT 1")  # the channel is up before the idle RSS is read
        with Sampler(args.broker_pid) as sampler:
            started = time.monotonic()
            with db.stream(sql) as rows:
                for row in rows:
                    count += 1
                    if args.bytea_mb:
                        digest.update(row[1])
                        mismatches += hashlib.md5(row[1]).hexdigest() != row[2]
            seconds = time.monotonic() - started
    else:
        import pg8000.native

        url = urllib.parse.urlsplit(args.dsn)
        conn = pg8000.native.Connection(
            urllib.parse.unquote(url.username or "postgres"),
            host=url.hostname or "127.0.0.1",
            port=url.port or 5432,
            database=url.path.lstrip("/") or None,
            password=urllib.parse.unquote(url.password) if url.password else None,
        )
        with Sampler(None) as sampler:
            started = time.monotonic()
            for row in conn.run(sql):
                count += 1
                if args.bytea_mb:
                    digest.update(row[1])
                    mismatches += hashlib.md5(row[1]).hexdigest() != row[2]
            seconds = time.monotonic() - started
        conn.close()
    return {
        "mode": args.mode,
        "rows": count,
        "seconds": round(seconds, 2),
        "client_idle_mb": round(sampler.idle["client"], 1),
        "client_peak_mb": round(sampler.peak["client"], 1),
        "broker_idle_mb": round(sampler.idle["broker"], 1),
        "broker_peak_mb": round(sampler.peak["broker"], 1),
        "mismatches": mismatches,
    }


def compare(args: argparse.Namespace) -> None:
    """Start a private Postgres and a broker (pool 2), run both modes, one line each."""
    import subprocess
    import sys

    from devtools.brokerproc import BrokerProcess
    from devtools.localpg import LocalPostgres

    extra = ["--rows", str(args.rows), "--bytea-mb", str(args.bytea_mb)]
    server = LocalPostgres(max_connections=20).start()
    try:
        with BrokerProcess(server.dsn + "?sslmode=disable", pool_size=2, auth="none") as broker:
            runs = [
                ["broker", "--target", broker.target, "--broker-pid", str(broker.pid)],
                ["pg8000", "--dsn", server.dsn],
            ]
            for mode in runs:
                argv = [sys.executable, "-m", "bench.stream_memory", *mode, *extra]
                subprocess.run(argv, check=True)
    finally:
        server.stop()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=("broker", "pg8000", "compare"))
    parser.add_argument("--target", default="127.0.0.1:50051")
    parser.add_argument("--broker-pid", type=int)
    parser.add_argument("--dsn")
    parser.add_argument("--rows", type=int, default=5_000_000)
    parser.add_argument("--bytea-mb", type=int, default=0)
    args = parser.parse_args(argv)
    if args.mode == "compare":
        compare(args)
    else:
        print(json.dumps(run(args)), flush=True)


if __name__ == "__main__":
    main()
