"""``python -m bench --profile``: sample the broker with py-spy while W1 and W2 run.

For each profiled workload, py-spy records the broker process over the measured window
(``--threads --gil``: where the broker's Python CPU goes) and writes the collapsed stacks to
``profile-<workload>.txt``; the summary lists the threads and the functions with the most
samples. py-spy must be installed (``.venv/bin/pip install py-spy``; it is in the dev extras).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from bench.harness import PGBROKER, Bench, Case, Plan, _log


def _py_spy() -> str:
    found = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(found).exists():
        raise RuntimeError("py-spy is not installed (.venv/bin/pip install py-spy)")
    return found


class _Recorder:
    """Starts py-spy on the window's start marker, stops it (SIGINT) on the end marker."""

    def __init__(self, bench: Bench, pid: int, out: Path, seconds: float) -> None:
        self.bench, self.pid, self.out, self.seconds = bench, pid, out, seconds
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self) -> None:
        # --gil: only the thread holding the GIL is sampled, so the samples show where the
        # broker's Python CPU goes (idle workers blocked in C do not count).
        # --nonblocking: the broker is not paused per sample, so its throughput holds up.
        # --subprocesses: with the default --workers (one per CPU) the pid is the supervisor
        # and the work is in its worker processes.
        argv = [_py_spy(), "record", "-p", str(self.pid), "-r", "200", "--threads", "--gil"]
        argv += ["--subprocesses"]
        argv += ["--nonblocking", "-d", str(max(1, round(self.seconds))), "-f", "raw"]
        argv += ["-o", str(self.out.with_suffix(".txt"))]
        self.procs.append(self.bench.procs.start(argv))

    def end(self) -> None:
        for proc in self.procs:
            try:
                proc.wait(30)
            finally:
                self.bench.procs.stop(proc)


def summarise(raw: Path, top: int = 25) -> dict[str, Any]:
    """Samples per thread, and the functions with the most own / inclusive samples."""
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    threads: Counter[str] = Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = stack.split(";")
        thread, frames = frames[0], frames[1:]
        threads[_thread_group(thread)] += count
        total += count
        if frames:
            own[frames[-1]] += count
        for frame in set(frames):
            inclusive[frame] += count
    return {
        "samples": total,
        "threads": dict(threads.most_common()),
        "own": own.most_common(top),
        "inclusive": inclusive.most_common(top),
    }


def _thread_group(thread: str) -> str:
    """``thread (0x7f..): pgbroker-worker_3`` -> ``pgbroker-worker`` (one line per pool)."""
    name = thread.rsplit("): ", 1)[-1].strip() or thread
    base, _, number = name.rpartition("_")
    return base if base and number.isdigit() else name


def run_profile(plan: Plan, out: Path) -> dict[str, Any]:
    """Profile the broker under W1 and W2 (think 1 ms and 0); return the summaries."""
    out.mkdir(parents=True, exist_ok=True)
    bench = Bench(plan)
    results: dict[str, Any] = {}
    try:
        bench.start()
        if bench.broker is None:
            raise RuntimeError(f"pgbroker did not start: {bench.skipped.get(PGBROKER)}")
        broker_pid = bench.broker.pid
        assert broker_pid is not None  # started and not stopped
        cases = [
            ("w1", Case("W1", "base", PGBROKER, plan.w1_clients, 0.0, 0.0)),
            ("w2", Case("W2", "base", PGBROKER, plan.w2_clients, plan.think_ms, 0.0)),
            ("w2-think0", Case("W2", "think0", PGBROKER, plan.w2_clients, 0.0, 0.0)),
        ]
        for name, case in cases:
            _log(f"profiling the broker under {name}")
            recorder = _Recorder(bench, broker_pid, out / f"profile-{name}", plan.duration)
            row = bench.run_case(case, hooks=(recorder.start, recorder.end))
            results[name] = {
                "tps": row.get("tps"),
                "latency_ms": row.get("latency_ms"),
                "errors": row.get("errors"),
                "pooler": row.get("pooler"),
                **summarise(out / f"profile-{name}.txt"),
            }
    finally:
        bench.close()
    return results


def print_profile(results: dict[str, Any]) -> None:
    for name, summary in results.items():
        print(f"\n== {name}: {summary['tps']} tx/s, p50 {summary['latency_ms']}")
        total = summary["samples"] or 1
        print("threads (samples, % of all):")
        for thread, count in summary["threads"].items():
            print(f"  {count:6d} {count / total:6.1%}  {thread}")
        print("own time:")
        for frame, count in summary["own"]:
            print(f"  {count:6d} {count / total:6.1%}  {frame}")
        print("inclusive:")
        for frame, count in summary["inclusive"][:15]:
            print(f"  {count:6d} {count / total:6.1%}  {frame}")
