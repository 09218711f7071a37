"""pgbench as the C-client reference line: initialisation and custom-script runs."""

from __future__ import annotations

import os
import resource
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.procs import Processes


def pgbench_binary(bindir: Path | None = None) -> str:
    """The pgbench next to the server binaries, else the one on PATH."""
    if bindir is not None and (bindir / "pgbench").is_file():
        return str(bindir / "pgbench")
    found = shutil.which("pgbench")
    if found is None:
        raise RuntimeError("pgbench not found (Debian: apt-get install postgresql-client)")
    return found


def initialise(binary: str, host: str, port: int, user: str, scale: int) -> None:
    """Create pgbench's tables at *scale* (data generated server-side); raise on failure."""
    argv = [binary, "-i", "-q", "-s", str(scale), "-I", "dtGvp"]
    argv += ["-h", host, "-p", str(port), "-U", user, "postgres"]
    done = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=600)
    if done.returncode != 0:
        raise RuntimeError(f"pgbench -i failed: {done.stderr.strip()[-1000:]}")


@dataclass
class PgbenchRun:
    """One pgbench run: *clients* for *warmup* + *duration* seconds of *script*."""

    binary: str
    host: str
    port: int
    user: str
    scale: int
    clients: int
    duration: float
    warmup: float
    script: str


def run(procs: Processes, run: PgbenchRun, on_start: Any, on_end: Any) -> dict[str, Any]:
    """Run pgbench, call *on_start()*/*on_end()* around it, and return figures like
    `bench.load`'s result: transactions completed in the window (per-transaction log),
    latency percentiles, errors from stderr and pgbench's own CPU seconds."""
    workdir = Path(tempfile.mkdtemp(prefix="pgbroker-bench-pgbench-"))
    try:
        script = workdir / "script.sql"
        script.write_text(run.script)
        seconds = max(1, round(run.warmup + run.duration + 0.5))
        argv = [run.binary, "-n", "-c", str(run.clients), "-j", "2", "-T", str(seconds)]
        argv += ["-s", str(run.scale), "-f", str(script), "-l"]
        argv += ["--log-prefix", str(workdir / "tx"), "-h", run.host, "-p", str(run.port)]
        argv += ["-U", run.user, "postgres"]
        err_path = workdir / "stderr"
        with open(err_path, "wb") as err:
            on_start()
            started = time.monotonic()
            proc = procs.start(argv, stdout=subprocess.DEVNULL, stderr=err.fileno(), cwd=workdir)
            _, status, usage = os.wait4(proc.pid, 0)
            proc.returncode = os.waitstatus_to_exitcode(status)
            procs.forget(proc)
            elapsed = time.monotonic() - started
            on_end()
        stderr = err_path.read_text(errors="replace")
        return _figures(run, workdir, stderr, proc.returncode, usage, elapsed)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _figures(
    run: PgbenchRun,
    workdir: Path,
    stderr: str,
    returncode: int,
    usage: resource.struct_rusage,
    elapsed: float,
) -> dict[str, Any]:
    finished: list[tuple[float, float]] = []  # (completion time, latency s)
    for log in workdir.glob("tx.*"):
        for line in log.read_text().splitlines():
            parts = line.split()
            if len(parts) >= 6 and parts[2].isdigit():
                finished.append((int(parts[4]) + int(parts[5]) / 1e6, int(parts[2]) / 1e6))
    finished.sort()
    window: list[float] = []
    if finished:
        start = finished[0][0] + run.warmup
        window = [lat for t, lat in finished if start <= t < start + run.duration]
    errors = [
        " ".join(line.split())[:160]
        for line in stderr.splitlines()
        if "error" in line.lower() or "fatal" in line.lower() or "abort" in line.lower()
    ]
    if returncode != 0 and not errors:
        errors.append(f"pgbench exited with {returncode}")
    messages: dict[str, int] = {}
    for message in errors:
        messages[message] = messages.get(message, 0) + 1
    cpu = usage.ru_utime + usage.ru_stime
    ordered = sorted(window)

    def pick(q: float) -> float | None:
        if not ordered:
            return None
        return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000, 3)

    return {
        "tx": len(window),
        "tx_total": len(finished),
        "tps": round(len(window) / run.duration, 1),
        "latency_ms": {
            "p50": pick(0.5),
            "p95": pick(0.95),
            "p99": pick(0.99),
            "mean": round(sum(ordered) / len(ordered) * 1000, 3) if ordered else None,
        },
        "errors": len(errors),
        "error_messages": dict(sorted(messages.items(), key=lambda kv: -kv[1])[:10]),
        "elapsed_s": round(elapsed, 3),
        "loadgen_cpu_s": round(cpu, 3),
        "loadgen_cpu_util": round(cpu / elapsed, 3) if elapsed > 0 else None,
    }
