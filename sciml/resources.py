"""What this process may really use of the node: CPUs and memory, from the limits the operating system enforces.

A batch system or container caps a job through the CPU affinity mask, cgroup CPU quotas and cgroup memory limits;
none of these shows in `os.cpu_count()` or in the node's total memory. Sizing threads or in-memory data from the
node instead of the limit oversubscribes the CPUs or gets the job killed by the kernel's OOM killer.

Both cgroup versions are read: v1 (`cpu/cpu.cfs_quota_us` + `cpu.cfs_period_us`, `memory/memory.limit_in_bytes`)
and v2 (`cpu.max`, `memory.max`). The limit of this process's own cgroup (from `/proc/self/cgroup`) and of every
ancestor applies, so the smallest along the path counts. `root` and `proc` are parameters so that tests can point
them at fake files.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC = Path("/proc")
# cgroup v1 writes "no limit" as a page-aligned LONG_MAX; anything this large is no limit.
_UNLIMITED = 2**60


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except (OSError, ValueError):
        return None


def _own_cgroups(proc: Path) -> dict[str, str]:
    """Controller -> this process's cgroup path, from /proc/self/cgroup ('' is the v2 unified hierarchy)."""
    paths: dict[str, str] = {}
    for line in (_read(proc / "self" / "cgroup") or "").splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        for controller in parts[1].split(","):
            paths[controller] = parts[2]
    return paths


def _candidate_dirs(base: Path, own: str | None) -> list[Path]:
    """The cgroup directories whose limits apply: this process's own and its ancestors (when mounted), and the
    mount point itself (inside a container the namespaced root *is* the own cgroup)."""
    dirs = [base]
    if own and own != "/":
        parts = Path(own.lstrip("/")).parts
        dirs += [base.joinpath(*parts[:i]) for i in range(1, len(parts) + 1)]
    return [d for d in dict.fromkeys(dirs) if d.is_dir()]


def cgroup_memory_limit(root: Path = CGROUP_ROOT, proc: Path = PROC) -> int | None:
    """The smallest cgroup memory limit (bytes) on this process's path, v1 or v2; None when unlimited."""
    own = _own_cgroups(proc)
    limits = []
    for d in _candidate_dirs(root / "memory", own.get("memory")):  # v1
        value = _read(d / "memory.limit_in_bytes")
        if value and value.isdigit() and int(value) < _UNLIMITED:
            limits.append(int(value))
    for d in _candidate_dirs(root, own.get("")):  # v2: memory.max is "max" or bytes
        value = _read(d / "memory.max")
        if value and value.isdigit():
            limits.append(int(value))
    return min(limits) if limits else None


def cgroup_memory_usage(root: Path = CGROUP_ROOT, proc: Path = PROC) -> int | None:
    """Memory charged to this process's own cgroup (bytes), v1 or v2, less the page cache of files (reclaimed by the
    kernel at the limit: reading the data fills it, up to the limit); None when not found."""
    own = _own_cgroups(proc)
    for d in reversed(_candidate_dirs(root / "memory", own.get("memory"))):
        value = _read(d / "memory.usage_in_bytes")
        if value and value.isdigit():
            return max(int(value) - _file_pages(d, "total_active_file", "total_inactive_file"), 0)
    for d in reversed(_candidate_dirs(root, own.get(""))):
        value = _read(d / "memory.current")
        if value and value.isdigit():
            return max(int(value) - _file_pages(d, "active_file", "inactive_file"), 0)
    return None


def _file_pages(group: Path, *keys: str) -> int:
    """Bytes of file-backed pages in a cgroup's memory.stat (shared memory is not among them: it is not reclaimable
    without swap)."""
    total = 0
    for line in (_read(group / "memory.stat") or "").splitlines():
        key, _, value = line.partition(" ")
        if key in keys and value.strip().isdigit():
            total += int(value)
    return total


def cgroup_cpu_quota(root: Path = CGROUP_ROOT, proc: Path = PROC) -> float | None:
    """The smallest cgroup CPU quota on this process's path, in CPUs (quota / period); None when unlimited."""
    own = _own_cgroups(proc)
    quotas = []
    for name in ("cpu", "cpu,cpuacct", "cpuacct,cpu"):  # v1 mount names vary between distributions
        for d in _candidate_dirs(root / name, own.get("cpu")):
            quota, period = _read(d / "cpu.cfs_quota_us"), _read(d / "cpu.cfs_period_us")
            if quota and period and quota.lstrip("-").isdigit() and int(quota) > 0 and int(period) > 0:
                quotas.append(int(quota) / int(period))
    for d in _candidate_dirs(root, own.get("")):  # v2: "max 100000" or "200000 100000"
        fields = (_read(d / "cpu.max") or "").split()
        if len(fields) == 2 and fields[0].isdigit() and int(fields[1]) > 0:
            quotas.append(int(fields[0]) / int(fields[1]))
    return min(quotas) if quotas else None


def mem_available(proc: Path = PROC) -> int | None:
    """The kernel's estimate of memory available to new work without swapping (MemAvailable, bytes)."""
    for line in (_read(proc / "meminfo") or "").splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return None


def _env_int(name: str) -> int | None:
    value = os.environ.get(name, "")
    return int(value) if value.isdigit() and int(value) > 0 else None


def local_ranks(devices=None) -> tuple[int, str]:
    """How many training processes share this node, and where that number comes from.

    `LOCAL_WORLD_SIZE` (torchrun), `SLURM_NTASKS_PER_NODE` (srun), else the Trainer's `devices` (an int, a list of
    device ids, or 'auto': all visible GPUs, one process on CPU)."""
    for name in ("LOCAL_WORLD_SIZE", "SLURM_NTASKS_PER_NODE"):
        if value := _env_int(name):
            return value, name
    if isinstance(devices, int) or (isinstance(devices, str) and devices.isdigit()):
        return max(int(devices), 1), "trainer.devices"
    if isinstance(devices, (list, tuple)) or (hasattr(devices, "__len__") and not isinstance(devices, str)):
        return max(len(devices), 1), "trainer.devices"
    if isinstance(devices, str) and "," in devices:
        return len([d for d in devices.split(",") if d.strip()]), "trainer.devices"
    try:
        import torch

        if devices in (None, "auto", "-1", -1) and torch.cuda.is_available():
            return torch.cuda.device_count(), "visible GPUs"
    except ImportError:
        pass
    return 1, "default"


@dataclass
class CPUs:
    """The CPUs this process may use and where each limit comes from."""

    count: int                      # min of the limits below
    limits: dict[str, float] = field(default_factory=dict)

    def describe(self) -> str:
        return ", ".join(f"{k} {v:g}" for k, v in self.limits.items())


def usable_cpus(root: Path = CGROUP_ROOT, proc: Path = PROC) -> CPUs:
    """The CPUs this process may run on: its affinity mask, `SLURM_CPUS_PER_TASK` and the cgroup CPU quota
    (rounded down, at least 1), whichever is smallest."""
    limits: dict[str, float] = {}
    try:
        limits["affinity"] = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        limits["os.cpu_count"] = os.cpu_count() or 1
    if slurm := _env_int("SLURM_CPUS_PER_TASK"):
        limits["SLURM_CPUS_PER_TASK"] = slurm
    if (quota := cgroup_cpu_quota(root, proc)) is not None:
        limits["cgroup quota"] = round(quota, 2)
    return CPUs(max(1, int(math.floor(min(limits.values()) + 1e-9))), limits)


@dataclass
class Memory:
    """The memory one rank of this process's job may use (bytes) and the figures it is derived from."""

    bytes: int
    limits: dict[str, int] = field(default_factory=dict)
    ranks: int = 1

    def describe(self) -> str:
        parts = ", ".join(f"{k} {v / 2**30:.2f} GiB" for k, v in self.limits.items())
        return f"{self.bytes / 2**30:.2f} GiB per rank ({parts}; {self.ranks} local rank(s))"


def usable_memory(ranks: int = 1, root: Path = CGROUP_ROOT, proc: Path = PROC) -> Memory:
    """The memory one of `ranks` processes on this node may still take: the smaller of the cgroup limit less what
    is already charged to it, and MemAvailable, divided by the local ranks (they share both).

    This is the budget a data module compares its rows against to decide in memory or streamed; leave headroom
    (activations, the DataLoader, Python) on top of it."""
    limits: dict[str, int] = {}
    if (limit := cgroup_memory_limit(root, proc)) is not None:
        limits["cgroup limit"] = limit
        used = cgroup_memory_usage(root, proc)
        if used is not None:
            limits["cgroup free"] = max(limit - used, 0)
    if (available := mem_available(proc)) is not None:
        limits["MemAvailable"] = available
    if not limits:  # neither cgroup nor /proc/meminfo (not Linux): the physical memory
        try:
            limits["physical"] = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError, AttributeError):
            limits["assumed"] = 8 * 2**30
    budget = min(v for k, v in limits.items() if k != "cgroup limit" or "cgroup free" not in limits)
    ranks = max(int(ranks), 1)
    return Memory(budget // ranks, limits, ranks)
