"""The default ``workers``: the CPUs the task may use (cgroup v2 ``cpu.max``, else affinity)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

import broker.config as config
from broker.config import (
    ConfigError,
    cgroup_cpu_quota,
    cgroup_v1_cpu_quota,
    cpu_max_quota,
    load_settings,
    task_cpus,
)

URL = "postgresql://u@localhost/db"
AFFINITY = len(os.sched_getaffinity(0))


@pytest.mark.parametrize(
    ("line", "cpus"),
    [
        ("200000 100000\n", 2.0),  # a Fargate task of 2 vCPUs
        ("150000 100000", 1.5),  # docker --cpus=1.5
        ("50000 100000", 0.5),
        ("max 100000\n", None),  # no quota
        ("", None),
        ("garbage", None),
        ("0 100000", None),
        ("100000 0", None),
    ],
)
def test_a_cpu_max_line_gives_the_quota_in_cpus(line: str, cpus: float | None) -> None:
    assert cpu_max_quota(line) == cpus


def _cgroup(tmp_path: Path, quotas: dict[str, str], own: str = "/ecs/task/app") -> tuple[str, str]:
    """A cgroup v2 hierarchy under *tmp_path* with ``cpu.max`` files at *quotas*' paths, and
    a /proc/self/cgroup naming *own* as the process's cgroup."""
    root = tmp_path / "cgroup"
    for path, line in quotas.items():
        directory = root / path.strip("/")
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "cpu.max").write_text(line)
    proc = tmp_path / "proc_cgroup"
    proc.write_text(f"0::{own}\n")
    return str(root), str(proc)


def test_the_smallest_quota_from_the_own_cgroup_up_to_the_root_counts(tmp_path: Path) -> None:
    root, proc = _cgroup(
        tmp_path,
        {"/": "max 100000", "/ecs/task": "200000 100000", "/ecs/task/app": "max 100000"},
    )
    assert cgroup_cpu_quota(root, proc) == (2.0, f"{root}/ecs/task/cpu.max")
    root, proc = _cgroup(tmp_path, {"/ecs/task": "400000 100000", "/ecs/task/app": "150000 100000"})
    assert cgroup_cpu_quota(root, proc) == (1.5, f"{root}/ecs/task/app/cpu.max")


def test_no_quota_anywhere_or_no_cgroup_v2_is_none(tmp_path: Path) -> None:
    root, proc = _cgroup(tmp_path, {"/": "max 100000"})
    assert cgroup_cpu_quota(root, proc) is None
    assert cgroup_cpu_quota(str(tmp_path / "missing"), str(tmp_path / "missing")) is None


@pytest.mark.parametrize(
    ("controller", "quota", "cpus"),
    [("cpu", "200000", 2.0), ("cpu,cpuacct", "150000", 1.5), ("cpu", "-1", None)],
)
def test_cgroup_v1_gives_its_cfs_quota(
    tmp_path: Path, controller: str, quota: str, cpus: float | None
) -> None:
    directory = tmp_path / controller
    directory.mkdir()
    (directory / "cpu.cfs_quota_us").write_text(quota + "\n")
    (directory / "cpu.cfs_period_us").write_text("100000\n")
    found = cgroup_v1_cpu_quota(str(tmp_path))
    assert (found[0] if found else None) == cpus
    assert cgroup_v1_cpu_quota(str(tmp_path / "missing")) is None


@pytest.fixture
def cgroup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    """Point the broker's CPU detection at a cgroup hierarchy made of temp files."""

    def make(quota: str) -> None:
        root, proc = _cgroup(tmp_path, {"/": quota}, own="/")
        monkeypatch.setattr(config, "CGROUP_ROOT", root)
        monkeypatch.setattr(config, "PROC_CGROUP", proc)

    return make


@pytest.mark.skipif(AFFINITY < 2, reason="needs 2 CPUs in the affinity mask")
def test_a_quota_below_the_cpus_seen_is_rounded_up(cgroup: Any) -> None:
    cgroup("50000 100000")  # half a CPU: one worker
    cpus, why = task_cpus()
    assert cpus == 1 and "cgroup CPU quota 0.5 CPUs" in why and "rounded up" in why
    assert load_settings({"database_url": URL}, environ={}).workers == 1


def test_without_a_quota_the_affinity_mask_counts(cgroup: Any) -> None:
    cgroup("max 100000")
    assert task_cpus() == (AFFINITY, f"{AFFINITY} CPUs in the process's affinity mask")
    settings = load_settings({"database_url": URL, "pool_size": 64}, environ={})
    assert settings.workers == AFFINITY


def test_a_quota_above_the_cpus_seen_is_capped_by_the_affinity_mask(cgroup: Any) -> None:
    cgroup(f"{(AFFINITY + 3) * 100000} 100000")
    assert task_cpus()[0] == AFFINITY


@pytest.mark.skipif(AFFINITY < 2, reason="needs 2 CPUs in the affinity mask")
def test_the_default_gives_each_worker_at_least_four_connections(cgroup: Any) -> None:
    """A channel reaches one worker and waits for its share of the pool: a small pool stays
    whole in one process."""
    cgroup("max 100000")
    for pool_size, workers in ((1, 1), (3, 1), (7, 1), (8, 2), (20, 2)):
        settings = load_settings({"database_url": URL, "pool_size": pool_size}, environ={})
        assert settings.workers == workers, pool_size


def test_an_explicit_worker_count_wins_over_the_cpus(cgroup: Any) -> None:
    cgroup("100000 100000")  # one CPU
    assert load_settings({"database_url": URL, "workers": 3}, environ={}).workers == 3
    environ = {"PGBROKER_WORKERS": "2"}
    assert load_settings({"database_url": URL}, environ=environ).workers == 2
    # An explicit count above pool_size is still refused, as before.
    with pytest.raises(ConfigError, match="more workers than pool_size 2"):
        load_settings({"database_url": URL, "workers": 3, "pool_size": 2}, environ={})
