"""Torch threads that fit the CPUs this process may use.

torch sizes its intra-op pool from the node's cores. That oversubscribes a node shared with other jobs or other
ranks: OpenMP threads spin at every barrier while a sibling thread waits for a core, and on the loaded 2-core
development machine one thread ran a HEP epoch 2.2x faster than torch's default of two (docs/performance.md).

`configure_threads` is called once per process when a run starts (`sciml.run.run`), from the top-level config key
`threads`:

- `auto` (default): the CPUs this process may use (affinity mask, `SLURM_CPUS_PER_TASK`, cgroup CPU quota; see
  `sciml.resources.usable_cpus`) divided by the training processes on the node (`LOCAL_WORLD_SIZE`,
  `SLURM_NTASKS_PER_NODE`, the Trainer's devices). A single process also leaves out the CPUs of its allowed set
  that other work keeps busy (sampled from /proc/stat for a fraction of a second), since threads on busy cores
  only wait. `OMP_NUM_THREADS` set by the user wins.
- an integer: exactly that many threads.
- `null`: leave torch's own choice.
"""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import torch

from sciml.errors import SciMLError
from sciml.resources import PROC, local_ranks, usable_cpus

log = logging.getLogger("sciml")


def busy_cpus(cpus: set[int] | None = None, interval: float = 0.3, proc: Path = PROC) -> float | None:
    """How many of `cpus` (default: this process's affinity) other work keeps busy, in CPUs, from two samples of
    /proc/stat `interval` seconds apart (this process sleeps in between, so the load is someone else's)."""
    def sample() -> dict[int, tuple[int, int]]:
        stats: dict[int, tuple[int, int]] = {}
        try:
            lines = (proc / "stat").read_text().splitlines()
        except OSError:
            return stats
        for line in lines:
            name, *values = line.split()
            if name.startswith("cpu") and name[3:].isdigit():
                numbers = [int(v) for v in values[:8]]
                idle = numbers[3] + (numbers[4] if len(numbers) > 4 else 0)  # idle + iowait
                stats[int(name[3:])] = (sum(numbers), idle)
        return stats

    if cpus is None:
        try:
            cpus = os.sched_getaffinity(0)
        except (AttributeError, OSError):
            return None
    before = sample()
    time.sleep(interval)
    after = sample()
    busy = 0.0
    for cpu in cpus:
        if cpu not in before or cpu not in after:
            return None
        total = after[cpu][0] - before[cpu][0]
        idle = after[cpu][1] - before[cpu][1]
        busy += (total - idle) / total if total > 0 else 0.0
    return busy


def auto_threads(devices=None, measure_load: bool = True) -> tuple[int, str]:
    """The intra-op thread count for this process and a one-line reason."""
    if omp := os.environ.get("OMP_NUM_THREADS", "").strip():
        if omp.isdigit() and int(omp) > 0:
            return int(omp), f"OMP_NUM_THREADS={omp}"
    cpus = usable_cpus()
    ranks, ranks_from = local_ranks(devices)
    threads = max(cpus.count // ranks, 1)
    reason = f"{cpus.count} usable CPUs ({cpus.describe()}) / {ranks} local rank(s) ({ranks_from})"
    if measure_load and ranks == 1 and threads > 1:
        busy = busy_cpus()
        if busy is not None:
            free = max(1, round(cpus.count - busy))
            if free < threads:
                threads = free
                reason += f"; {busy:.1f} of them busy with other work"
    return threads, reason


def configure_threads(setting="auto", devices=None) -> int:
    """Set torch's intra-op and inter-op threads from the config key `threads` (auto | N | null); log it."""
    if setting is None or (isinstance(setting, str) and setting.lower() in ("null", "none", "torch")):
        log.info("threads: %d (torch's default; threads=null)", torch.get_num_threads())
        return torch.get_num_threads()
    if isinstance(setting, str) and setting.lower() == "auto":
        threads, reason = auto_threads(devices)
    elif isinstance(setting, int) and not isinstance(setting, bool) and setting > 0:
        threads, reason = setting, f"threads={setting}"
    elif isinstance(setting, str) and setting.isdigit() and int(setting) > 0:
        threads, reason = int(setting), f"threads={setting}"
    else:
        raise SciMLError(f"threads: '{setting}' is not auto, null or a positive integer")
    torch.set_num_threads(threads)
    try:  # only possible before the first inter-op parallel work of the process
        torch.set_num_interop_threads(threads)
    except RuntimeError:
        pass
    log.info("threads: %d intra-op, %d inter-op (%s)", torch.get_num_threads(), torch.get_num_interop_threads(),
             reason)
    return threads
