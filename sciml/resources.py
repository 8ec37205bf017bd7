"""What this process may use of the node: memory (cgroup limits, available memory, ranks on the node)."""
from __future__ import annotations

import os
from pathlib import Path

CGROUP = Path("/sys/fs/cgroup")


def _read_number(path: Path) -> float | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return None if text in ("", "max") else float(text)


def cgroup_memory_limit(root: Path = CGROUP, membership: Path = Path("/proc/self/cgroup")) -> float | None:
    """This process's cgroup memory limit in bytes (v2 `memory.max` or v1 `memory.limit_in_bytes`), None if
    unlimited. The process's own cgroup is found through /proc/self/cgroup (`membership`)."""
    limits = []
    try:
        lines = membership.read_text().splitlines()
    except OSError:
        lines = []
    for line in lines:
        _, controllers, path = line.split(":", 2)
        rel = path.lstrip("/")
        if controllers == "":  # v2 unified hierarchy
            limits.append(_read_number(root / rel / "memory.max"))
        elif "memory" in controllers.split(","):
            limits.append(_read_number(root / "memory" / rel / "memory.limit_in_bytes"))
    limits = [v for v in limits if v is not None and v < 2**60]  # v1 reports "unlimited" as a huge number
    return min(limits) if limits else None


def available_memory() -> float:
    """MemAvailable of /proc/meminfo in bytes (total physical memory where it is missing)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return float(line.split()[1]) * 1024
    except OSError:
        pass
    return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def local_ranks() -> int:
    """Processes of this job on this node (torchrun, SLURM), 1 outside a distributed launch."""
    for key in ("LOCAL_WORLD_SIZE", "SLURM_NTASKS_PER_NODE"):
        value = os.environ.get(key, "")
        if value.split("(")[0].isdigit():
            return max(1, int(value.split("(")[0]))
    return 1


def usable_memory_bytes() -> float:
    """Memory this process may fill: the smaller of its cgroup limit and the available memory, shared among the
    ranks on the node."""
    limit = cgroup_memory_limit()
    usable = available_memory() if limit is None else min(limit, available_memory())
    return usable / local_ranks()
