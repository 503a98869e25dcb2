"""How many CPUs this process may really use: the affinity mask and the cgroup quota.

torch and onnxruntime size their thread pools by the host's cores; a pod limited to 2 CPUs of
a 64-core node then runs dozens of threads that the kernel throttles (onnxruntime issue 29510).
Both halves size their pools from this budget instead.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_SELF_CGROUP = Path("/proc/self/cgroup")


@dataclass(frozen=True)
class CpuBudget:
    """The CPUs a process may use, and where the limit came from."""

    cpus: int
    affinity: int
    quota: float | None
    host_cpus: int
    source: str

    def describe(self) -> str:
        """One line for the start-up log."""
        quota = "none" if self.quota is None else f"{self.quota:g} CPUs"
        return (
            f"cpu budget {self.cpus} (from {self.source}; affinity {self.affinity} of "
            f"{self.host_cpus} host CPUs, cgroup quota {quota})"
        )


def cpu_budget(
    cgroup_root: Path = CGROUP_ROOT, proc_self_cgroup: Path = PROC_SELF_CGROUP
) -> CpuBudget:
    """Whole CPUs this process may keep busy: min(affinity, cgroup quota rounded down), >= 1."""
    host = os.cpu_count() or 1
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else host
    quota = cgroup_cpu_quota(cgroup_root, proc_self_cgroup)
    if quota is not None and math.floor(quota) < affinity:
        return CpuBudget(max(1, math.floor(quota)), affinity, quota, host, "cgroup quota")
    return CpuBudget(max(1, affinity), affinity, quota, host, "cpu affinity")


def cgroup_cpu_quota(
    cgroup_root: Path = CGROUP_ROOT, proc_self_cgroup: Path = PROC_SELF_CGROUP
) -> float | None:
    """The tightest CPU quota (in CPUs) on this process's cgroup and its ancestors, if any.

    cgroup v2 keeps ``cpu.max`` ("QUOTA PERIOD" or "max PERIOD") in the unified hierarchy; v1
    keeps ``cpu.cfs_quota_us`` (-1: none) and ``cpu.cfs_period_us`` in the cpu controller's.
    """
    quotas = [
        quota
        for directory in _cgroup_directories(cgroup_root, proc_self_cgroup)
        if (quota := _read_quota(directory)) is not None
    ]
    return min(quotas) if quotas else None


def _cgroup_directories(cgroup_root: Path, proc_self_cgroup: Path) -> list[Path]:
    """The process's cgroup directories (v2 and the v1 cpu controller) and their ancestors."""
    try:
        lines = proc_self_cgroup.read_text().splitlines()
    except OSError:
        lines = []
    leaves = []
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        relative = path.strip().lstrip("/")
        if controllers == "":
            leaves.append(cgroup_root / relative)
        elif "cpu" in controllers.split(","):
            leaves += [cgroup_root / name / relative for name in ("cpu,cpuacct", "cpu")]
    leaves += [cgroup_root, cgroup_root / "cpu,cpuacct", cgroup_root / "cpu"]
    directories: list[Path] = []
    for leaf in leaves:
        # In a container the namespace maps our cgroup to "/", so the walk usually stops at once.
        for directory in (leaf, *leaf.parents):
            if directory not in directories and directory.is_relative_to(cgroup_root):
                directories.append(directory)
    return directories


def _read_quota(directory: Path) -> float | None:
    try:
        fields = (directory / "cpu.max").read_text().split()
        if len(fields) == 2 and fields[0] != "max" and int(fields[1]) > 0:
            return int(fields[0]) / int(fields[1])
    except (OSError, ValueError):
        pass
    try:
        quota = int((directory / "cpu.cfs_quota_us").read_text())
        period = int((directory / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return quota / period if quota > 0 and period > 0 else None
