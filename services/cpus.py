"""How many CPUs this process may use, and torch threads sized to them.

torch sizes its thread pools from the machine's cores, not from what the
process may use: a pod limited to 2 CPUs on a 64-core node starts 64
OpenMP threads, and processes started together on one machine each take
every core. OpenMP's default spin-wait then burns the cores whenever a
partner thread is descheduled. So each process here:

- counts the CPUs it may use: the affinity mask, and the cgroup CPU quota
  (cgroup v2 `cpu.max`, v1 `cpu.cfs_quota_us / cpu.cfs_period_us`) of its
  cgroup and every parent, whichever is smallest;
- divides them by RLHF_PROCESSES_PER_HOST when a launcher started several
  processes together (the demo, the tests, the benchmarks, LocalMesh);
- sets torch's intra-op threads to that (at least 1) and inter-op threads
  to 1, unless the config gives `num_threads`;
- asks OpenMP to wait passively (OMP_WAIT_POLICY=PASSIVE) unless the user
  set a policy. OpenMP reads it when it loads, so `set_passive_openmp` runs
  before torch is imported (the `rlhf` command does it first thing).
"""

from __future__ import annotations

import logging
import math
import os
import pathlib
from dataclasses import dataclass

log = logging.getLogger(__name__)

PROCESSES_ENV = "RLHF_PROCESSES_PER_HOST"  # set by launchers that start several processes on one machine
CGROUP_ROOT = pathlib.Path("/sys/fs/cgroup")


def set_passive_openmp(environ=os.environ) -> None:
    """OMP_WAIT_POLICY=PASSIVE unless the user chose a policy; call before torch is imported."""
    environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def _read(path: pathlib.Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _cgroup_paths(proc_cgroup: str) -> dict[str, str]:
    """controller (or "" for cgroup v2) -> this process's cgroup path, from /proc/self/cgroup."""
    paths = {}
    for line in proc_cgroup.splitlines():
        parts = line.split(":", 2)
        if len(parts) == 3:
            for controller in parts[1].split(",") if parts[1] else [""]:
                paths[controller] = parts[2]
    return paths


def _ancestors(root: pathlib.Path, path: str) -> list[pathlib.Path]:
    """root/path and each parent directory up to root (a quota on a parent limits its children too)."""
    out = [root]
    current = root
    for part in [p for p in path.split("/") if p]:
        current = current / part
        out.append(current)
    return out


def cgroup_cpus(root: pathlib.Path = CGROUP_ROOT, proc_cgroup: str | None = None) -> float | None:
    """The smallest CPU quota (in CPUs) on this process's cgroup path; None when there is none."""
    if proc_cgroup is None:
        proc_cgroup = _read(pathlib.Path("/proc/self/cgroup")) or ""
    paths = _cgroup_paths(proc_cgroup)
    limits = []
    for directory in _ancestors(root, paths.get("", "/")):  # cgroup v2
        value = _read(directory / "cpu.max")
        if value and not value.startswith("max"):
            quota, _, period = value.partition(" ")
            limits.append(int(quota) / int(period or 100000))
    v1 = root / "cpu" if (root / "cpu").is_dir() else root / "cpu,cpuacct"
    for directory in _ancestors(v1, paths.get("cpu", "/")):  # cgroup v1
        quota, period = _read(directory / "cpu.cfs_quota_us"), _read(directory / "cpu.cfs_period_us")
        if quota and period and int(quota) > 0:
            limits.append(int(quota) / int(period))
    return min(limits) if limits else None


def affinity_cpus() -> int:
    """CPUs in this process's affinity mask (os.cpu_count() where the platform has no masks)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


@dataclass(frozen=True)
class ThreadPlan:
    """How many torch threads a process runs, and why."""

    cpus: float  # CPUs this process may use (affinity and quota), before sharing
    processes: int  # processes sharing them (RLHF_PROCESSES_PER_HOST)
    intra_op: int
    inter_op: int
    source: str  # "config", or how `cpus` was found

    def describe(self) -> str:
        shared = f" shared by {self.processes} processes" if self.processes > 1 else ""
        return (f"{self.intra_op} intra-op / {self.inter_op} inter-op torch threads ({self.source}: "
                f"{self.cpus:g} CPUs{shared}; OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')})")


def plan_threads(configured: int | None = None, environ=os.environ, quota: float | None = None,
                 affinity: int | None = None) -> ThreadPlan:
    """The thread counts for this process: `configured` when given, else its share of the CPUs it may use."""
    affinity = affinity_cpus() if affinity is None else affinity
    quota = cgroup_cpus() if quota is None else quota
    cpus = float(affinity) if quota is None else min(float(affinity), quota)
    source = "affinity mask" if quota is None or affinity <= quota else "cgroup CPU quota"
    try:
        processes = max(1, int(environ.get(PROCESSES_ENV, "1")))
    except ValueError:
        processes = 1
    if configured:
        return ThreadPlan(cpus, processes, configured, 1, "config")
    return ThreadPlan(cpus, processes, max(1, math.floor(cpus / processes)), 1, source)


def apply_threads(configured: int | None = None) -> ThreadPlan:
    """Set torch's thread pools from plan_threads and log the choice."""
    import torch

    plan = plan_threads(configured)
    torch.set_num_threads(plan.intra_op)
    try:
        torch.set_num_interop_threads(plan.inter_op)
    except RuntimeError:  # already set, or inter-op work already ran in this process
        pass
    log.info("%s", plan.describe())
    return plan
