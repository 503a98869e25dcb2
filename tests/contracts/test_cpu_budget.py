"""The CPU budget from the affinity mask and cgroup v1/v2 quotas."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from contracts.cpu_budget import cgroup_cpu_quota, cpu_budget

ROOT = Path(__file__).resolve().parents[2]


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_cgroup_v2_quota_of_the_process_and_its_ancestors(tmp_path: Path) -> None:
    root = tmp_path / "cgroup"
    _write(tmp_path / "self", "0::/kubepods/pod1/c1\n")
    _write(root / "kubepods/pod1/c1/cpu.max", "max 100000\n")
    _write(root / "kubepods/pod1/cpu.max", "150000 100000\n")
    _write(root / "kubepods/cpu.max", "400000 100000\n")
    assert cgroup_cpu_quota(root, tmp_path / "self") == pytest.approx(1.5)
    budget = cpu_budget(root, tmp_path / "self")
    assert budget.quota == pytest.approx(1.5)
    if budget.affinity > 1:
        assert (budget.cpus, budget.source) == (1, "cgroup quota")
    assert "cgroup quota 1.5 CPUs" in budget.describe()


def test_cgroup_v1_quota(tmp_path: Path) -> None:
    root = tmp_path / "cgroup"
    _write(tmp_path / "self", "4:cpu,cpuacct:/job\n3:memory:/job\n")
    _write(root / "cpu,cpuacct/job/cpu.cfs_quota_us", "300000\n")
    _write(root / "cpu,cpuacct/job/cpu.cfs_period_us", "100000\n")
    _write(root / "cpu,cpuacct/cpu.cfs_quota_us", "-1\n")
    _write(root / "cpu,cpuacct/cpu.cfs_period_us", "100000\n")
    assert cgroup_cpu_quota(root, tmp_path / "self") == pytest.approx(3.0)


def test_no_quota_anywhere_means_the_affinity(tmp_path: Path) -> None:
    _write(tmp_path / "self", "0::/\n")
    _write(tmp_path / "cgroup/cpu.max", "max 100000\n")
    budget = cpu_budget(tmp_path / "cgroup", tmp_path / "self")
    assert budget.quota is None
    assert budget.cpus == len(os.sched_getaffinity(0))
    assert budget.source == "cpu affinity"


def test_unreadable_cgroup_files_are_no_quota(tmp_path: Path) -> None:
    _write(tmp_path / "cgroup/cpu.max", "garbage\n")
    assert cgroup_cpu_quota(tmp_path / "cgroup", tmp_path / "missing") is None


def test_affinity_of_one_core_is_a_budget_of_one() -> None:
    code = "from contracts.cpu_budget import cpu_budget; print(cpu_budget().cpus)"
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
        preexec_fn=lambda: os.sched_setaffinity(0, {min(os.sched_getaffinity(0))}),
    )
    assert result.stdout.strip() == "1"
